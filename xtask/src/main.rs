//! `cargo xtask`: sets up the toolchain and test tools, then builds, runs,
//! tests and benchmarks the datapath.
//!
//! Every subcommand starts with the bootstrap, which checks the nightly
//! toolchain, rust-src, bpf-linker and the programs the tests run, and
//! installs whatever is missing. It depends on nothing in the workspace, so
//! it builds before the eBPF toolchain exists.

mod bootstrap;
mod cmd;
mod fuzz;
mod leftovers;
mod workspace;

use std::{
    ffi::OsString,
    path::Path,
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    cmd::{exec, run},
    leftovers::{Leftovers, Owner},
    workspace::{HOST_CRATES, Profile, Workspace},
};

/// Build, run and test the datapath; installs missing prerequisites first.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Check the toolchain and test tools; install whatever is missing.
    Bootstrap,
    /// Build the agent, the eBPF object and the tests.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Check formatting and lints, build, run every test, check that the
    /// tests left nothing behind, then fuzz every target briefly.
    Test {
        /// Passed to the test binaries (e.g. a name filter, `--nocapture`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the sandbox, or with ARGS the datapath binary itself
    /// (e.g. `cargo xtask run -- agent --uplink eth0`).
    Run {
        /// The cluster sandbox: three nodes, an underlay and etcd (ARGS
        /// go to the sandbox, e.g. `-- --once`).
        #[arg(long)]
        cluster: bool,
        /// Arguments for the datapath binary.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the cargo-fuzz targets of fuzz/ (nightly), each for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Run the benchmarks (release build).
    Bench {
        /// Shorter runs, for a quick look.
        #[arg(long)]
        quick: bool,
        /// Only these sections, comma-separated (e.g. `ratelimit`, or
        /// `conn,rr`; the bench's `--help` lists them).
        #[arg(long, value_name = "KINDS")]
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The chain, without the backtrace RUST_BACKTRACE would add: the
            // messages say what failed and what to do.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(task: Task) -> Result<()> {
    let tools = bootstrap::bootstrap()?;
    let workspace = Workspace::new(&tools);
    match task {
        Task::Bootstrap => Ok(()),
        Task::Build { release } => workspace.build(if release {
            Profile::Release
        } else {
            Profile::Debug
        }),
        Task::Test { args } => test(&workspace, &args),
        Task::Run { cluster, args } => run_datapath(&workspace, cluster, &args),
        Task::Fuzz { seconds, targets } => fuzz::fuzz(&workspace, seconds, &targets),
        Task::Bench { quick, only } => bench(&workspace, quick, only.as_deref()),
    }
}

/// fmt, clippy, build, the tests, and the leftover check.
fn test(workspace: &Workspace, args: &[OsString]) -> Result<()> {
    run(&mut workspace.cargo(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    let mut clippy = workspace.cargo(["clippy"]);
    clippy
        .args(HOST_CRATES)
        .args(["--all-targets", "--", "-D", "warnings"]);
    run(&mut clippy).context("clippy found problems: fix its warnings")?;
    workspace.build(Profile::Debug)?;
    let datapath = workspace.binary(Profile::Debug, "datapath")?;

    let before = Leftovers::find().context("cannot look for leftovers of earlier runs")?;
    let (stale, present) = before.split(|owner| owner == Owner::Gone);
    if !stale.is_empty() {
        println!("removing leftovers of earlier runs (their processes are gone):\n{stale}");
        stale.remove()?;
    }
    if !present.is_empty() {
        println!("leaving alone (they may belong to tests running now):\n{present}");
    }

    let started = Instant::now();
    let outcome = run_tests(workspace, &datapath, args);
    println!("the tests ran for {:.0?}", started.elapsed());

    // Only what appeared during the run, and not what tests that are still
    // running (another run on the same machine) own.
    let new = Leftovers::find()
        .context("cannot look for what the tests left behind")?
        .without(&present);
    let (running, leaked) = new.split(|owner| matches!(owner, Owner::Running(_)));
    if !running.is_empty() {
        println!("leaving alone (tests of other processes, still running):\n{running}");
    }
    if !leaked.is_empty() {
        println!("the tests left these behind:\n{leaked}");
        let removed = leaked.remove();
        outcome?;
        removed?;
        bail!("the tests did not clean up after themselves (removed now)");
    }
    outcome?;
    println!("all tests passed; nothing left behind");
    fuzz::fuzz(workspace, fuzz::TEST_SECONDS, &[])?;
    Ok(())
}

/// How many tests run at once. Most namespace tests spend their time
/// waiting (for an agent to start, a flow to expire, a crash to be
/// noticed), so more run than there are cores; the ones whose traffic
/// would disturb each other hold the harness's traffic lock.
const TEST_THREADS: &str = "8";

/// Every test of the host crates, against the agent binary `datapath`,
/// with `args` for the test binaries (a filter, `--nocapture`, …). With
/// cargo-nextest, every test binary's tests run side by side (a process
/// each), then the documentation examples; without it, `cargo test`.
fn run_tests(workspace: &Workspace, datapath: &Path, args: &[OsString]) -> Result<()> {
    let nextest = workspace
        .cargo(["nextest", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    let mut tests = if nextest {
        let mut cmd = workspace.cargo(["nextest", "run"]);
        cmd.args(HOST_CRATES)
            .args(["--no-fail-fast", "--test-threads", TEST_THREADS]);
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        cmd
    } else {
        let mut cmd = workspace.cargo(["test"]);
        cmd.args(HOST_CRATES)
            .args(["--no-fail-fast", "--", "--test-threads", TEST_THREADS])
            .args(args);
        cmd
    };
    tests.env("DATAPATH_BIN", datapath);
    let outcome = run(&mut tests).context("tests failed");
    let doc = if nextest && args.is_empty() {
        let mut doc = workspace.cargo(["test", "--doc"]);
        doc.args(HOST_CRATES);
        run(&mut doc).context("documentation examples failed")
    } else {
        Ok(())
    };
    outcome.and(doc)
}

/// The sandbox (with `cluster`, the cluster sandbox) without arguments,
/// else the datapath binary with them.
fn run_datapath(workspace: &Workspace, cluster: bool, args: &[OsString]) -> Result<()> {
    workspace.build(Profile::Debug)?;
    let datapath = workspace.binary(Profile::Debug, "datapath")?;
    if args.is_empty() || cluster {
        let mut sandbox = workspace.cargo(["run", "-p", "datapath-tests", "--bin", "sandbox"]);
        if cluster {
            sandbox.args(["--", "--cluster"]).args(args);
        }
        sandbox.env("DATAPATH_BIN", &datapath);
        return Err(exec(&mut sandbox));
    }
    let mut cmd = Command::new(&datapath);
    cmd.args(args).env("PATH", workspace.path());
    Err(exec(&mut cmd))
}

/// The benchmark runner, against a release build.
fn bench(workspace: &Workspace, quick: bool, only: Option<&str>) -> Result<()> {
    workspace.build(Profile::Release)?;
    let datapath = workspace.binary(Profile::Release, "datapath")?;
    let mut bench = workspace.cargo(["run", "--release", "-p", "datapath-tests", "--bin", "bench"]);
    bench.env("DATAPATH_BIN", &datapath).arg("--");
    let mut command = String::from("cargo xtask bench");
    if quick {
        bench.arg("--quick");
        command.push_str(" --quick");
    }
    if let Some(only) = only {
        bench.args(["--only", only]);
        command.push_str(&format!(" --only {only}"));
    }
    // How the results say they were made.
    bench.env("BENCH_COMMAND", command);
    Err(exec(&mut bench))
}
