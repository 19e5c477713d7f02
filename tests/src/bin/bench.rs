//! `cargo xtask bench [--quick]`: this datapath against iptables, nftables
//! and plain routing in namespace nodes; writes `bench/results/`.
//!
//! Run through the xtask (it builds the release agent and sets
//! `DATAPATH_BIN`; `cargo xtask bench --only ratelimit` runs the rate
//! section alone, `--only flowcore` the conntrack one, `--only control` the
//! control plane's, `--only cluster` the cluster's, `--only tails` the
//! latency tails, `--only local` the node's connections to a published port
//! on its loopback). Options, for working on the bench itself:
//! `--modes route,datapath-tc`,
//! `--only conn,rr,ratelimit,flowcore,control,cluster,tails,local`, `--reps N`,
//! `--sizes 1000,10000`, `--conn-threads N`, `--out DIR`.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use datapath_tests::{
    bench::{
        bed::{self, Bed, MAX_FILLERS},
        mode::Mode,
        report::{self, Meta},
        run::{self, Config, Kind, Runner},
    },
    lock::TrafficLock,
};

/// Programs the bench runs.
const TOOLS: [&str; 7] = [
    "iperf3",
    "iptables-legacy",
    "iptables",
    "nft",
    "conntrack",
    "ss",
    "sysctl",
];

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line: the configuration and where to write.
struct Args {
    cfg: Config,
    out: PathBuf,
    command: String,
    /// The sections chosen with `--only`, if not all.
    only: Option<String>,
}

fn list<T>(value: Option<String>, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>> {
    let value = value.with_context(|| format!("{what} needs a value"))?;
    value
        .split(',')
        .map(|v| parse(v.trim()).with_context(|| format!("unknown {what} {v:?}")))
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut cfg = Config::full();
    let mut out = workspace_root().join("bench/results");
    let mut quick = false;
    let mut extra: Vec<String> = Vec::new();
    let (mut modes, mut kinds, mut reps, mut sizes) = (None, None, None, None);
    let mut threads = None;
    let mut ratelimit = None;
    let mut flowcore = None;
    let mut cluster = None;
    let mut control_plane = None;
    let mut tails = None;
    let mut local = None;
    let mut only = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                cfg = Config::quick();
                quick = true;
            }
            "--modes" => {
                let m = list(args.next(), "--modes", Mode::parse)?;
                extra.push(format!("--modes {}", join(&m, Mode::name)));
                modes = Some(m);
            }
            "--only" => {
                let value = args.next().context("--only needs a value")?;
                let rate = value.split(',').any(|v| v.trim() == "ratelimit");
                let flow = value.split(',').any(|v| v.trim() == "flowcore");
                let clus = value.split(',').any(|v| v.trim() == "cluster");
                let control = value.split(',').any(|v| v.trim() == "control");
                let tail = value.split(',').any(|v| v.trim() == "tails");
                let loopback = value.split(',').any(|v| v.trim() == "local");
                let rest: Vec<&str> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|v| {
                        ![
                            "ratelimit",
                            "flowcore",
                            "control",
                            "cluster",
                            "tails",
                            "local",
                        ]
                        .contains(v)
                    })
                    .collect();
                let k = if rest.is_empty() {
                    Vec::new()
                } else {
                    list(Some(rest.join(",")), "--only", Kind::parse)?
                };
                extra.push(format!("--only {value}"));
                only = Some(value.clone());
                kinds = Some(k);
                ratelimit = Some(rate);
                flowcore = Some(flow);
                cluster = Some(clus);
                control_plane = Some(control);
                tails = Some(tail);
                local = Some(loopback);
            }
            "--reps" => {
                let r: usize = args.next().context("--reps needs a value")?.parse()?;
                extra.push(format!("--reps {r}"));
                reps = Some(r.clamp(1, 50));
            }
            "--sizes" => {
                let s = list(args.next(), "--sizes", |s| s.parse::<usize>().ok())?;
                if s.iter().any(|s| *s > MAX_FILLERS) {
                    bail!("--sizes: at most {MAX_FILLERS} ports");
                }
                extra.push(format!("--sizes {}", join(&s, |s: usize| s.to_string())));
                sizes = Some(s);
            }
            "--conn-threads" => {
                let t: usize = args
                    .next()
                    .context("--conn-threads needs a value")?
                    .parse()?;
                extra.push(format!("--conn-threads {t}"));
                threads = Some(t.clamp(1, 64));
            }
            "--out" => out = PathBuf::from(args.next().context("--out needs a directory")?),
            "-h" | "--help" => {
                println!(
                    "bench [--quick] [--modes M,…] [--only KIND,…] [--reps N] [--sizes N,…] [--conn-threads N] [--out DIR]\n\
                     modes: {}\nkinds: {},ratelimit,flowcore,control,cluster,tails,local",
                    join(&Mode::ALL, Mode::name),
                    join(&Kind::ALL, Kind::name)
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    cfg.modes = modes.unwrap_or(cfg.modes);
    cfg.kinds = kinds.unwrap_or(cfg.kinds);
    cfg.reps = reps.unwrap_or(cfg.reps);
    cfg.sizes = sizes.unwrap_or(cfg.sizes);
    cfg.conn_threads = threads.unwrap_or(cfg.conn_threads);
    if ratelimit == Some(false) {
        cfg.rate_cases.clear();
        cfg.rr_cases.clear();
    }
    if flowcore == Some(false) {
        cfg.flowcore = None;
    }
    if cluster == Some(false) {
        cfg.cluster = None;
    }
    if let Some(plan) = cfg.flowcore.as_mut() {
        plan.threads = cfg.conn_threads.max(plan.threads);
    }
    if control_plane == Some(false) {
        cfg.control.enabled = false;
    }
    if tails == Some(false) {
        cfg.tails = None;
    }
    if local == Some(false) {
        cfg.local.enabled = false;
    }
    let quick = if quick { " --quick" } else { "" };
    let command = if let Ok(command) = std::env::var("BENCH_COMMAND") {
        // Run by `cargo xtask bench`, which says how.
        command
    } else if extra.is_empty() {
        format!("cargo xtask bench{quick}")
    } else {
        format!(
            "cargo run --release -p datapath-tests --bin bench --{quick} {}",
            extra.join(" ")
        )
    };
    Ok(Args {
        cfg,
        out,
        command,
        only,
    })
}

fn join<T: Copy, S: ToString>(items: &[T], f: impl Fn(T) -> S) -> String {
    items
        .iter()
        .map(|i| f(*i).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the bench builds network namespaces: run it as root");
    }
    for tool in TOOLS {
        if datapath_tests::netns::which(tool).is_none() {
            bail!("{tool} is not installed (cargo xtask bootstrap installs the test programs)");
        }
    }
    let _lock = match TrafficLock::try_acquire() {
        Some(l) => l,
        None => {
            println!("waiting for the traffic lock (tests that push traffic are running)…");
            TrafficLock::acquire()
        }
    };
    run::install_interrupt_handler()?;
    let start = Instant::now();
    let mut meta = machine_meta(&args.command);
    let cfg = args.cfg;
    println!(
        "bench: {} modes, {} repetitions, scaling sizes {:?}",
        cfg.modes.len(),
        cfg.reps,
        cfg.sizes
    );

    // The rate and control-plane sections (`--only ratelimit,control`)
    // build their own nodes; the conntrack and latency-tail sections alone
    // (`--only flowcore,tails`) need only the modes they compare.
    let modes: Vec<Mode> = if !cfg.kinds.is_empty() {
        cfg.modes.clone()
    } else {
        cfg.modes
            .iter()
            .copied()
            .filter(|m| {
                (cfg.flowcore.is_some() && datapath_tests::bench::flowcore::compared(*m))
                    || (cfg.tails.is_some() && datapath_tests::bench::tails::compared(*m))
            })
            .collect()
    };
    let nodes: Vec<_> = modes.iter().map(|m| bed::node_for(*m)).collect();
    let mut beds = Vec::new();
    for (i, (mode, node)) in modes.iter().zip(&nodes).enumerate() {
        let bed =
            Bed::new(*mode, node, 16 + i as u8).with_context(|| format!("setting up {mode}"))?;
        println!("set up {mode}: {}", bed.describe());
        meta.beds.push((*mode, bed.describe()));
        beds.push(bed);
    }
    let mut runner = Runner::new(cfg.clone(), &mut beds);
    runner.run_all()?;
    let results = runner.into_results();
    drop(beds);
    drop(nodes);
    meta.duration_s = start.elapsed().as_secs_f64();

    let md = report::markdown(&meta, &cfg, &results);
    let json = serde_json::to_string_pretty(&report::json(&meta, &cfg, &results))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    // A run of some sections only goes to files of its own, so that it
    // never replaces the results of a whole run.
    let part = args
        .only
        .as_deref()
        .map(|o| format!("-{}", o.replace(',', "+")))
        .unwrap_or_default();
    let kind = if cfg.quick { "quick" } else { "full" };
    let stamp = meta.started.replace([':', '-'], "");
    let latest = if cfg.quick { "latest-quick" } else { "latest" };
    let (kind, latest) = (format!("{kind}{part}"), format!("{latest}{part}"));
    for name in [format!("{stamp}-{kind}"), latest.clone()] {
        for (ext, text) in [("md", &md), ("json", &json)] {
            let path = args.out.join(format!("{name}.{ext}"));
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    println!("\n{}", report::targets_text(&results));
    if !results.notes.is_empty() {
        println!("notes:");
        for n in &results.notes {
            println!("  {n}");
        }
    }
    println!(
        "results: {}/{latest}.md and .json ({:.0} s)",
        args.out.display(),
        meta.duration_s
    );
    Ok(())
}

/// The workspace's root directory (the tests crate's parent).
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The first line of `program args`' output, if it runs.
fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn machine_meta(command: &str) -> Meta {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    let root = workspace_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    // Dirty only if the code changed: results written by earlier runs do
    // not count.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)bench/results",
    ])
    .is_some_and(|s| !s.is_empty());
    let commit = git(&["rev-parse", "--short", "HEAD"]).map_or_else(
        || "?".to_owned(),
        |c| if dirty { format!("{c}-dirty") } else { c },
    );
    Meta {
        started: utc_now(),
        command: command.to_owned(),
        duration_s: 0.0,
        commit,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        tools: vec![
            version("iperf3", &["--version"]),
            version("iptables-legacy", &["--version"]),
            version("iptables", &["--version"]),
            version("nft", &["--version"]),
        ],
        beds: Vec::new(),
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
