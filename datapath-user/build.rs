//! Builds the eBPF programs (datapath-ebpf) with nightly for
//! bpfel-unknown-none; the object lands in OUT_DIR and is embedded by
//! `datapath::EBPF_OBJECT`.
//!
//! aya-build hands every line the nested cargo prints (`Compiling core`,
//! `Finished`, …) to cargo as a `cargo:warning`, dozens of them on every
//! build. So the build runs in a child process (this script again, with
//! [`CHILD`] set) whose output is held back: on success, cargo's progress
//! lines are dropped and everything else (directives, the compiler's own
//! warnings) passes; on failure, all of it is shown.

use std::{
    env,
    process::{Command, Stdio},
};

/// Set in the child that runs the build.
const CHILD: &str = "DATAPATH_EBPF_BUILD_CHILD";

fn main() -> anyhow::Result<()> {
    if env::var_os(CHILD).is_some() {
        return build();
    }
    let out = Command::new(env::current_exe()?)
        .env(CHILD, "1")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    let ok = out.status.success();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let progress = line.strip_prefix("cargo:warning=").is_some_and(is_progress);
        if !(ok && progress) {
            println!("{line}");
        }
    }
    if !ok {
        anyhow::bail!(
            "building the eBPF programs failed ({}); the nested cargo's output is above",
            out.status
        );
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "datapath-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../datapath-ebpf"),
        ..Default::default()
    };
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../datapath-common/src")
    );
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

/// Whether `line` is one of cargo's progress lines: a capitalised status
/// word right-aligned in twelve columns, then a space (`   Compiling x`,
/// `    Finished ...`), unlike a diagnostic (`warning: ...`, ` --> ...`).
fn is_progress(line: &str) -> bool {
    let Some((head, tail)) = line.split_at_checked(12) else {
        return false;
    };
    let word = head.trim_start();
    word.starts_with(|c: char| c.is_ascii_uppercase())
        && word.chars().all(|c| c.is_ascii_alphabetic())
        && tail.starts_with(' ')
}
