//! The fuzz step: every cargo-fuzz target of `fuzz/` (a crate outside the
//! workspace, built with nightly and sanitizers), each run for a bounded
//! time on its corpus (`fuzz/corpus/<target>`, kept between runs and not
//! committed) and its committed seeds (`fuzz/seeds/<target>`).

use std::{fs, path::Path, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{output, run},
    workspace::Workspace,
};

/// Seconds each target runs for in `cargo xtask test` (seven targets:
/// a little over a minute in all, plus the build).
pub const TEST_SECONDS: u64 = 10;

/// Targets that `cargo xtask fuzz` runs only when named, each with the
/// reason. A target goes here only while a bug it found waits for its fix.
const PENDING: &[(&str, &str)] = &[(
    "state_file",
    "a state file that parses may hold impossible values (no ports, an id handed out \
     twice) until the loader checks them (fix 5 of the issue-8 report)",
)];

/// The targets of `fuzz/Cargo.toml`, as `cargo fuzz list` prints them.
fn targets(workspace: &Workspace) -> Result<Vec<String>> {
    let list = output(&mut workspace.nightly_cargo(["fuzz", "list"]))
        .context("cannot list the fuzz targets")?;
    Ok(list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Builds the targets, then runs each of `only` (all but the pending ones
/// when empty) for `seconds`. A crash fails with the target's name and
/// where libFuzzer saved the input.
pub fn fuzz(workspace: &Workspace, seconds: u64, only: &[String]) -> Result<()> {
    let all = targets(workspace)?;
    let chosen: Vec<String> = if only.is_empty() {
        for (name, why) in PENDING {
            println!("skipping fuzz target {name}: {why}");
        }
        all.iter()
            .filter(|t| !PENDING.iter().any(|(p, _)| p == t))
            .cloned()
            .collect()
    } else {
        for t in only {
            if !all.contains(t) {
                bail!("no fuzz target {t}; the targets are {}", all.join(", "));
            }
        }
        only.to_vec()
    };
    run(&mut workspace.cargo(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))
        .context("the fuzz targets are not formatted: run `cargo fmt` in fuzz/")?;
    run(&mut workspace.nightly_cargo(["fuzz", "build"]))
        .context("the fuzz targets do not build")?;
    let started = Instant::now();
    for target in &chosen {
        let corpus = workspace.root().join("fuzz/corpus").join(target);
        fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut cmd = workspace.nightly_cargo(["fuzz", "run", target.as_str()]);
        cmd.arg(&corpus);
        let seeds = workspace.root().join("fuzz/seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--").args([
            format!("-max_total_time={seconds}"),
            // One input running longer than this is a hang, not slowness.
            "-timeout=10".to_owned(),
        ]);
        run(&mut cmd).with_context(|| crash_hint(workspace.root(), target))?;
    }
    println!(
        "fuzzed {} targets for {seconds} s each in {:.0?}",
        chosen.len(),
        started.elapsed()
    );
    Ok(())
}

fn crash_hint(root: &Path, target: &str) -> String {
    format!(
        "fuzz target {target} failed; the input is under {}/ \
         (reproduce: cargo +nightly fuzz run {target} <that file>)",
        root.join("fuzz/artifacts").join(target).display()
    )
}
