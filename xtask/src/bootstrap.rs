//! The bootstrap: idempotent checks of everything the build and the tests
//! need, installing only what is missing.
//!
//! Every check is a file lookup or one cheap process (`rustc +nightly
//! --print sysroot`, `bpf-linker --version`), so a machine that has
//! everything passes in a few tens of milliseconds.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    io::{self, Write as _},
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd::{find_in, find_on_path, is_executable, output, run, runs};

/// The bpf-linker release the eBPF build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Overrides the directory bpf-linker and its LLVM symlinks are installed
/// under (normally `$CARGO_HOME`), and makes the check ignore any bpf-linker
/// on `PATH`: lets the install path be exercised without touching the real
/// one.
const BOOTSTRAP_ROOT_VAR: &str = "DATAPATH_BOOTSTRAP_ROOT";

/// Directories searched for the test programs besides `PATH`: bpftool, nft,
/// iptables and friends live there, and a non-root `PATH` often lacks them.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// Every program the tests (and the build: protoc) run, with the Debian
/// package that ships it.
const TEST_PROGRAMS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("iperf3", "iperf3"),
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("hping3", "hping3"),
    ("wrk", "wrk"),
    ("conntrack", "conntrack"),
    ("curl", "curl"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("busybox", "busybox-static"),
    ("ping", "iputils-ping"),
    ("socat", "socat"),
    ("podman", "podman"),
    ("runc", "runc"),
    // Cluster mode: the tests' store, and the compiler of its client's
    // protocol definitions (the build needs it).
    ("etcd", "etcd-server"),
    ("protoc", "protobuf-compiler"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("unshare", "util-linux"),
    ("sysctl", "procps"),
    ("nginx", "nginx-light"),
];

/// What the later steps need from the bootstrap.
#[derive(Debug)]
pub struct Tools {
    /// `PATH` for every child process: the caller's, with the directory
    /// holding bpf-linker in front when it was not already on it.
    pub path: OsString,
}

/// Checks each prerequisite in turn, installing the missing ones, and prints
/// one line per step.
pub fn bootstrap() -> Result<Tools> {
    let started = Instant::now();
    let mut path = env::var_os("PATH").unwrap_or_default();
    let nightly = nightly_toolchain()?;
    rust_src(&nightly)?;
    stable_components()?;
    if let Some(dir) = bpf_linker(&nightly, &path)? {
        let dirs = std::iter::once(dir).chain(env::split_paths(&path));
        path = env::join_paths(dirs).context("cannot put bpf-linker's directory on PATH")?;
    }
    test_programs(&path)?;
    cargo_fuzz(&path)?;
    println!("bootstrap done in {:.2?}", started.elapsed());
    Ok(Tools { path })
}

/// Prints the start of a step's line; the caller finishes it.
fn checking(what: &str) {
    print!("checking {what}… ");
    // Only the progress display suffers if stdout is gone.
    let _ = io::stdout().flush();
}

/// Attaches the commands that do a failed step by hand.
fn by_hand(commands: &str) -> String {
    format!(
        "to do this step by hand, run:\n    {}",
        commands.replace('\n', "\n    ")
    )
}

/// Checks that the nightly toolchain is installed (the eBPF crate needs
/// `-Z build-std`) and returns its sysroot.
fn nightly_toolchain() -> Result<PathBuf> {
    checking("nightly toolchain");
    if let Ok(sysroot) = nightly_sysroot() {
        println!("ok");
        return Ok(sysroot);
    }
    println!("missing");
    println!("installing nightly toolchain…");
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
    .and_then(|()| nightly_sysroot())
    .with_context(|| by_hand("rustup toolchain install nightly --component rust-src"))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    ensure!(
        sysroot.is_dir(),
        "nightly sysroot {} does not exist",
        sysroot.display()
    );
    Ok(sysroot)
}

/// Checks that nightly has the standard library's source, which
/// `-Z build-std=core` compiles for the BPF target.
fn rust_src(nightly: &Path) -> Result<()> {
    checking("rust-src for nightly");
    let core = nightly.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        println!("ok");
        return Ok(());
    }
    println!("missing");
    println!("installing rust-src for nightly…");
    (|| {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        ensure!(
            core.is_dir(),
            "{} still missing after installing rust-src",
            core.display()
        );
        Ok(())
    })()
    .with_context(|| by_hand("rustup component add rust-src --toolchain nightly"))
}

/// Checks that the toolchain running xtask has clippy and rustfmt, which
/// `cargo xtask test` runs.
fn stable_components() -> Result<()> {
    checking("clippy and rustfmt");
    // cargo sets CARGO to the toolchain's own cargo; rustup's proxies on PATH
    // exist even when the component does not, so look next to it.
    let bin_dir = match env::var_os("CARGO") {
        Some(cargo) => PathBuf::from(cargo).parent().map(Path::to_path_buf),
        None => None,
    };
    let present = |dir: &Option<PathBuf>| {
        ["cargo-clippy", "rustfmt"].iter().all(|tool| match dir {
            Some(dir) => is_executable(&dir.join(tool)),
            None => find_on_path(tool, &env::var_os("PATH").unwrap_or_default()).is_some(),
        })
    };
    if present(&bin_dir) {
        println!("ok");
        return Ok(());
    }
    println!("missing");
    println!("installing clippy and rustfmt…");
    (|| {
        run(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
        ensure!(
            present(&bin_dir),
            "clippy or rustfmt still missing after installing them"
        );
        Ok(())
    })()
    .with_context(|| by_hand("rustup component add clippy rustfmt"))
}

/// Where bpf-linker and the LLVM symlinks it loads go.
struct InstallRoot {
    /// `$CARGO_HOME`, or the testing override.
    dir: PathBuf,
    /// True under the testing override: only `dir` counts.
    isolated: bool,
}

impl InstallRoot {
    fn from_env() -> Result<Self> {
        if let Some(dir) = env::var_os(BOOTSTRAP_ROOT_VAR) {
            return Ok(Self {
                dir: dir.into(),
                isolated: true,
            });
        }
        let dir = match env::var_os("CARGO_HOME") {
            Some(home) => PathBuf::from(home),
            None => {
                PathBuf::from(env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?)
                    .join(".cargo")
            }
        };
        Ok(Self {
            dir,
            isolated: false,
        })
    }

    fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// The `LLVM_PREFIX` bpf-linker is built against; its `lib` holds the
    /// symlinks to nightly's libLLVM and becomes the binary's RUNPATH, so it
    /// must stay in place.
    fn llvm_prefix(&self) -> PathBuf {
        self.dir.join("datapath-llvm")
    }
}

/// Checks that a working bpf-linker exists, else builds one against the
/// nightly's own libLLVM. Returns the directory to put in front of `PATH`
/// when the working one is not already on it.
fn bpf_linker(nightly: &Path, path: &OsStr) -> Result<Option<PathBuf>> {
    checking("bpf-linker");
    let root = InstallRoot::from_env()?;
    let on_path = if root.isolated {
        None
    } else {
        find_on_path("bpf-linker", path)
    };
    let found = on_path
        .clone()
        .or_else(|| find_in("bpf-linker", [root.bin()]));
    match &found {
        Some(linker) if runs(linker) => {
            println!("ok");
            return Ok(if on_path.is_some() {
                None
            } else {
                Some(root.bin())
            });
        }
        Some(linker) => println!("broken ({} does not run)", linker.display()),
        None => println!("missing"),
    }
    println!(
        "installing bpf-linker {BPF_LINKER_VERSION} against nightly's libLLVM (a few minutes)…"
    );
    install_bpf_linker(nightly, &root)?;
    Ok(Some(root.bin()))
}

/// What `rustc +nightly -vV` says about the toolchain.
#[derive(Debug, PartialEq, Eq)]
struct NightlyVersion {
    /// `release:`, e.g. `1.97.0-nightly`.
    release: String,
    /// LLVM's major version, e.g. `22`.
    llvm_major: String,
    /// LLVM's `major.minor`, e.g. `22.1`.
    llvm_major_minor: String,
}

impl NightlyVersion {
    fn parse(verbose_version: &str) -> Result<Self> {
        let field = |name: &str| {
            verbose_version
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("no `{name}` line in rustc's version output"))
        };
        let release = field("release:")?.to_owned();
        let llvm = field("LLVM version:")?;
        let mut parts = llvm.split('.');
        let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
            bail!("unexpected LLVM version `{llvm}`");
        };
        Ok(Self {
            release,
            llvm_major: major.to_owned(),
            llvm_major_minor: format!("{major}.{minor}"),
        })
    }
}

/// The shared libLLVM nightly ships: the exact name first, any
/// `libLLVM.so.*` in the same directory as a fallback.
fn nightly_libllvm(nightly: &Path, version: &NightlyVersion) -> Result<PathBuf> {
    let lib_dir = nightly.join("lib");
    let exact = lib_dir.join(format!(
        "libLLVM.so.{}-rust-{}",
        version.llvm_major_minor, version.release
    ));
    if exact.is_file() {
        return Ok(exact);
    }
    let entries =
        fs::read_dir(&lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", lib_dir.display()))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("libLLVM.so.")
        {
            return Ok(entry.path());
        }
    }
    bail!("nightly ships no libLLVM.so.* in {}", lib_dir.display())
}

/// Builds bpf-linker against nightly's libLLVM through a directory of
/// symlinks, so that bpf-linker and rustc agree on the LLVM bitcode format.
fn install_bpf_linker(nightly: &Path, root: &InstallRoot) -> Result<()> {
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = NightlyVersion::parse(&verbose)?;
    let lib = nightly_libllvm(nightly, &version)?;
    let soname = lib
        .file_name()
        .context("libLLVM path has no file name")?
        .to_owned();
    let prefix = root.llvm_prefix();
    let lib_dir = prefix.join("lib");
    let features = format!("llvm-{}", version.llvm_major);
    let hint = by_hand(&format!(
        "mkdir -p {dir}\n\
         ln -sfn {lib} {dir}/libLLVM.so\n\
         ln -sfn {lib} {dir}/{soname}\n\
         LLVM_PREFIX={prefix} cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --force \
         --no-default-features --features {features} --root {root}",
        dir = lib_dir.display(),
        lib = lib.display(),
        soname = soname.display(),
        prefix = prefix.display(),
        root = root.dir.display(),
    ));

    (|| {
        link_libllvm(&lib_dir, &lib, &soname)?;
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let install = |locked: bool| {
            let mut cmd = Command::new(&cargo);
            cmd.args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args(locked.then_some("--locked"))
            .args(["--no-default-features", "--features", &features, "--root"])
            .arg(&root.dir)
            .env("LLVM_PREFIX", &prefix)
            // Outside the workspace: its config and toolchain files must
            // not apply to an unrelated crate.
            .current_dir(&root.dir);
            run(&mut cmd)
        };
        if install(true).is_err() {
            println!("retrying without --locked…");
            install(false)?;
        }
        let linker = root.bin().join("bpf-linker");
        ensure!(
            runs(&linker),
            "the freshly installed {} does not run",
            linker.display()
        );
        Ok(())
    })()
    .with_context(|| hint)
}

/// Makes `lib_dir` hold exactly `libLLVM.so` and `<soname>`, both pointing
/// at `lib`, replacing symlinks left by an earlier nightly.
fn link_libllvm(lib_dir: &Path, lib: &Path, soname: &OsStr) -> Result<()> {
    fs::create_dir_all(lib_dir).with_context(|| format!("cannot create {}", lib_dir.display()))?;
    for entry in
        fs::read_dir(lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", lib_dir.display()))?;
        let stale = entry.file_name().to_string_lossy().starts_with("libLLVM")
            && entry.file_type().is_ok_and(|kind| kind.is_symlink());
        if stale {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    for name in [OsStr::new("libLLVM.so"), soname] {
        let link = lib_dir.join(name);
        symlink(lib, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), lib.display()))?;
    }
    Ok(())
}

/// Checks that cargo-fuzz (the fuzz step of `cargo xtask test`) is
/// installed, else installs it with cargo.
fn cargo_fuzz(path: &OsStr) -> Result<()> {
    checking("cargo-fuzz");
    let root = InstallRoot::from_env()?;
    let present = |path: &OsStr| {
        find_on_path("cargo-fuzz", path)
            .or_else(|| find_in("cargo-fuzz", [root.bin()]))
            .is_some()
    };
    if present(path) {
        println!("ok");
        return Ok(());
    }
    println!("missing");
    println!("installing cargo-fuzz (a minute or two)…");
    (|| {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
        ensure!(
            present(path),
            "cargo-fuzz still missing after installing it"
        );
        Ok(())
    })()
    .with_context(|| by_hand("cargo install cargo-fuzz --locked"))
}

/// Checks that every program the tests run exists, installing the Debian
/// packages of the missing ones.
fn test_programs(path: &OsStr) -> Result<()> {
    checking("programs the tests run");
    let missing = missing_programs(path);
    if missing.is_empty() {
        println!("ok");
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|(program, _)| *program).collect();
    println!("missing {}", names.join(", "));
    let mut packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    packages.sort_unstable();
    packages.dedup();
    println!("installing Debian packages {}…", packages.join(" "));
    (|| {
        apt_get(path, &["update"])?;
        let mut install = vec!["install", "-y"];
        install.extend(&packages);
        apt_get(path, &install)?;
        let still: Vec<&str> = missing_programs(path)
            .iter()
            .map(|(program, _)| *program)
            .collect();
        ensure!(
            still.is_empty(),
            "still missing after the install: {}",
            still.join(", ")
        );
        Ok(())
    })()
    .with_context(|| {
        by_hand(&format!(
            "apt-get update\nDEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            packages.join(" ")
        ))
    })
}

/// The entries of [`TEST_PROGRAMS`] found neither on `path` nor in the sbin
/// directories.
fn missing_programs(path: &OsStr) -> Vec<(&'static str, &'static str)> {
    let dirs: Vec<PathBuf> = env::split_paths(path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .collect();
    TEST_PROGRAMS
        .iter()
        .filter(|(program, _)| find_in(program, &dirs).is_none())
        .copied()
        .collect()
}

/// Runs `apt-get ARGS` non-interactively, through sudo unless already root.
fn apt_get(path: &OsStr, args: &[&str]) -> Result<()> {
    let dirs: Vec<PathBuf> = env::split_paths(path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .collect();
    let apt = find_in("apt-get", &dirs)
        .context("apt-get not found: install the packages with this system's package manager")?;
    let root = fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0);
    let mut cmd = if root {
        Command::new(&apt)
    } else {
        let sudo = find_in("sudo", &dirs).context("not root and sudo not found")?;
        let mut cmd = Command::new(sudo);
        cmd.arg("DEBIAN_FRONTEND=noninteractive").arg(&apt);
        cmd
    };
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_version_parses_release_and_llvm() {
        let verbose = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\n\
                       binary: rustc\n\
                       commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\n\
                       commit-date: 2026-05-19\n\
                       host: x86_64-unknown-linux-gnu\n\
                       release: 1.97.0-nightly\n\
                       LLVM version: 22.1.4\n";
        assert_eq!(
            NightlyVersion::parse(verbose).expect("parse"),
            NightlyVersion {
                release: "1.97.0-nightly".into(),
                llvm_major: "22".into(),
                llvm_major_minor: "22.1".into(),
            }
        );
    }

    #[test]
    fn nightly_version_without_llvm_line_is_an_error() {
        assert!(NightlyVersion::parse("release: 1.97.0-nightly\n").is_err());
    }

    #[test]
    fn libllvm_falls_back_to_any_versioned_library() {
        let sysroot = env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        let lib_dir = sysroot.join("lib");
        fs::create_dir_all(&lib_dir).expect("create temp dir");
        let version = NightlyVersion {
            release: "1.97.0-nightly".into(),
            llvm_major: "22".into(),
            llvm_major_minor: "22.1".into(),
        };
        assert!(
            nightly_libllvm(&sysroot, &version).is_err(),
            "empty lib dir"
        );

        let other = lib_dir.join("libLLVM.so.22.1-rust-1.96.0-nightly");
        fs::write(&other, "").expect("write");
        assert_eq!(
            nightly_libllvm(&sysroot, &version).expect("fallback"),
            other
        );

        let exact = lib_dir.join("libLLVM.so.22.1-rust-1.97.0-nightly");
        fs::write(&exact, "").expect("write");
        assert_eq!(nightly_libllvm(&sysroot, &version).expect("exact"), exact);
        fs::remove_dir_all(&sysroot).expect("remove temp dir");
    }

    #[test]
    fn link_libllvm_replaces_stale_symlinks() {
        let dir = env::temp_dir().join(format!("xtask-links-{}", std::process::id()));
        let lib_dir = dir.join("lib");
        fs::create_dir_all(&lib_dir).expect("create temp dir");
        symlink(
            "/old/libLLVM.so.21.1-rust-1.90.0-nightly",
            lib_dir.join("libLLVM.so.21.1-rust-1.90.0-nightly"),
        )
        .expect("stale link");
        symlink(
            "/old/libLLVM.so.21.1-rust-1.90.0-nightly",
            lib_dir.join("libLLVM.so"),
        )
        .expect("stale link");
        let lib = Path::new("/new/libLLVM.so.22.1-rust-1.97.0-nightly");

        link_libllvm(
            &lib_dir,
            lib,
            OsStr::new("libLLVM.so.22.1-rust-1.97.0-nightly"),
        )
        .expect("link");

        let mut names: Vec<String> = fs::read_dir(&lib_dir)
            .expect("list")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert_eq!(names, ["libLLVM.so", "libLLVM.so.22.1-rust-1.97.0-nightly"]);
        for name in &names {
            assert_eq!(fs::read_link(lib_dir.join(name)).expect("read link"), lib);
        }
        fs::remove_dir_all(&dir).expect("remove temp dir");
    }
}
