//! Latency tails (issue 22): whether anything the agent does shows up on
//! the packet path, this datapath's TC hook against iptables-nft, with
//! 10,000 ports published in both.
//!
//! * **Connect, repeated**: the connection-rate run through the published
//!   port and through the masquerade, [`Plan::reps`] times in a row per
//!   mode (modes interleaved), each repetition's connect p50, p99 and
//!   worst, and the agent's CPU seconds during it (`/proc/<pid>/stat`):
//!   the first and the last repetition must look alike (no drift within
//!   a run).
//! * **Updates under load**: one mapping added and removed
//!   [`Plan::updates`] times while new connections run through another
//!   published port, with the agent's CPU seconds during it.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::bench::{
    bed::{Bed, CONN_PORT},
    connrate::{self, ConnResult},
    mode::Mode,
    stats::percentile,
};

/// How much the section measures.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Repetitions of each connect run per mode.
    pub reps: usize,
    /// Length of each connect run.
    pub window: Duration,
    /// Client threads of the connect runs and of the load.
    pub threads: usize,
    /// Adds and removes timed under load, each.
    pub updates: usize,
    /// The longest the load runs while the updates are timed.
    pub load: Duration,
}

impl Plan {
    /// The full run's plan.
    pub fn full(threads: usize) -> Self {
        Self {
            reps: 6,
            window: Duration::from_secs(2),
            threads,
            updates: 100,
            load: Duration::from_secs(8),
        }
    }

    /// The quick run's plan.
    pub fn quick(threads: usize) -> Self {
        Self {
            reps: 3,
            window: Duration::from_secs(1),
            updates: 40,
            load: Duration::from_secs(4),
            ..Self::full(threads)
        }
    }
}

/// The modes the section compares.
pub fn compared(mode: Mode) -> bool {
    matches!(mode, Mode::DatapathTc | Mode::IptablesNft)
}

/// Where a connect run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Client → published port → container (DNAT).
    Published,
    /// Container → outside (masquerade).
    Masquerade,
}

impl Path {
    /// Both, in schedule order.
    pub const ALL: [Path; 2] = [Path::Published, Path::Masquerade];

    /// For people.
    pub fn label(self) -> &'static str {
        match self {
            Path::Published => "through a published port",
            Path::Masquerade => "through the masquerade",
        }
    }

    /// For JSON.
    pub fn id(self) -> &'static str {
        match self {
            Path::Published => "published",
            Path::Masquerade => "masquerade",
        }
    }
}

/// One connect run.
#[derive(Clone, Debug)]
pub struct ConnectRow {
    /// The mode.
    pub mode: Mode,
    /// Where the connections went.
    pub path: Path,
    /// Repetition (0: the first).
    pub rep: usize,
    /// New connections per second, thousands.
    pub rate: f64,
    /// Connect time p50, p99 and worst, µs.
    pub p50: f64,
    /// p99.
    pub p99: f64,
    /// Worst.
    pub max: f64,
    /// Failed connections.
    pub failed: usize,
    /// The agent's CPU seconds during the run (datapath modes).
    pub agent_cpu_s: Option<f64>,
}

/// The updates timed under load in one mode.
#[derive(Clone, Debug)]
pub struct UpdateRow {
    /// The mode.
    pub mode: Mode,
    /// Add times, ms.
    pub add_ms: Vec<f64>,
    /// Remove times, ms.
    pub del_ms: Vec<f64>,
    /// The load's connection rate meanwhile (thousands per second) and its
    /// connect p99 (µs).
    pub load_rate: f64,
    /// The load's connect p99.
    pub load_p99: f64,
    /// The agent's CPU seconds meanwhile (datapath modes).
    pub agent_cpu_s: Option<f64>,
}

/// Everything the section measured.
#[derive(Clone, Debug, Default)]
pub struct TailsResults {
    /// Published ports present.
    pub ports: usize,
    /// Connect runs, in the order made.
    pub connect: Vec<ConnectRow>,
    /// Updates under load, one row per mode.
    pub updates: Vec<UpdateRow>,
}

impl TailsResults {
    /// The runs of `mode` on `path`, by repetition.
    pub fn runs(&self, mode: Mode, path: Path) -> Vec<&ConnectRow> {
        let mut v: Vec<&ConnectRow> = self
            .connect
            .iter()
            .filter(|r| r.mode == mode && r.path == path)
            .collect();
        v.sort_by_key(|r| r.rep);
        v
    }
}

/// p50, p99 and worst of `samples`.
pub fn tail(samples: &[f64]) -> (f64, f64, f64) {
    (
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        samples.iter().copied().fold(0.0, f64::max),
    )
}

/// The connect plan of `path` in `bed`.
fn plan_of(bed: &Bed<'_>, path: Path, plan: &Plan, duration: Duration) -> connrate::Plan {
    match path {
        Path::Published => connrate::Plan {
            sources: bed.client_addrs().iter().copied().map(Some).collect(),
            dests: vec![bed.ingress(CONN_PORT)],
            threads: plan.threads,
            duration,
            max: 2_000_000,
        },
        Path::Masquerade => connrate::Plan {
            sources: vec![None],
            dests: bed.egress_conn_dests(),
            threads: plan.threads,
            duration,
            max: 2_000_000,
        },
    }
}

/// Runs the section over `beds` (already holding their filler ports);
/// `before` runs before each measurement (the runner's quiet wait and
/// interruption check).
pub fn run(
    beds: &mut [Bed<'_>],
    plan: &Plan,
    mut before: impl FnMut() -> Result<()>,
    notes: &mut Vec<String>,
) -> Result<TailsResults> {
    let idx: Vec<usize> = (0..beds.len())
        .filter(|&i| compared(beds[i].mode()))
        .collect();
    let mut out = TailsResults {
        ports: idx
            .first()
            .map_or(0, |&i| beds[i].fillers() + super::run::BASE_PORTS),
        ..TailsResults::default()
    };
    for rep in 0..plan.reps {
        for path in Path::ALL {
            print!("tails {:<10} {}/{}:", path.id(), rep + 1, plan.reps);
            for k in 0..idx.len() {
                let bed = &beds[idx[(k + rep) % idx.len()]];
                before()?;
                bed.flush_conntrack()?;
                let cpu0 = bed.agent_cpu_secs();
                let from = match path {
                    Path::Published => &bed.node().client,
                    Path::Masquerade => bed.container(),
                };
                match connrate::measure(from, &plan_of(bed, path, plan, plan.window)) {
                    Ok(res) if res.completed > 0 => {
                        let agent_cpu_s = cpu0.zip(bed.agent_cpu_secs()).map(|(a, b)| b - a);
                        let (p50, p99, max) = tail(&res.connect_us);
                        print!(
                            "  {} {:.1}k/s p99 {p99:.0} max {max:.0}µs",
                            bed.mode(),
                            res.rate() / 1e3
                        );
                        note_failures(notes, bed.mode(), path, &res);
                        out.connect.push(ConnectRow {
                            mode: bed.mode(),
                            path,
                            rep,
                            rate: res.rate() / 1e3,
                            p50,
                            p99,
                            max,
                            failed: res.failed,
                            agent_cpu_s,
                        });
                    }
                    Ok(res) => notes.push(format!(
                        "{} tails {}: no connection completed (first error: {})",
                        bed.mode(),
                        path.id(),
                        res.first_error.as_deref().unwrap_or("?")
                    )),
                    Err(e) => notes.push(format!("{} tails {}: {e:#}", bed.mode(), path.id())),
                }
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
            }
            println!();
        }
    }
    for &i in &idx {
        before()?;
        let bed = &mut beds[i];
        bed.flush_conntrack()?;
        match updates_under_load(bed, plan) {
            Ok(row) => {
                let (a50, a99, amax) = tail(&row.add_ms);
                let (d50, d99, dmax) = tail(&row.del_ms);
                println!(
                    "tails update: {} add {a50:.2}/{a99:.2}/{amax:.2} ms, remove \
                     {d50:.2}/{d99:.2}/{dmax:.2} ms under {:.1}k conn/s",
                    row.mode, row.load_rate
                );
                out.updates.push(row);
            }
            Err(e) => notes.push(format!("{} tails updates: {e:#}", bed.mode())),
        }
    }
    Ok(out)
}

fn note_failures(notes: &mut Vec<String>, mode: Mode, path: Path, res: &ConnResult) {
    if res.failed > 0 {
        notes.push(format!(
            "{mode} tails {}: {} of {} connections failed (first: {})",
            path.id(),
            res.failed,
            res.failed + res.completed,
            res.first_error.as_deref().unwrap_or("?")
        ));
    }
}

/// Times `plan.updates` adds and removes of one mapping while new
/// connections run through the published port.
fn updates_under_load(bed: &mut Bed<'_>, plan: &Plan) -> Result<UpdateRow> {
    let load = plan_of(bed, Path::Published, plan, plan.load);
    let client = &bed.node().client;
    let cpu0 = bed.agent_cpu_secs();
    let done = AtomicBool::new(false);
    let mut add_ms = Vec::with_capacity(plan.updates);
    let mut del_ms = Vec::with_capacity(plan.updates);
    let mut failure = None;
    let load_result = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let r = connrate::measure(client, &load);
            done.store(true, Ordering::Relaxed);
            r
        });
        // Let the load reach its pace, then time the updates while it
        // lasts (with a margin, so that none is timed after it stopped).
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        let until = plan.load.saturating_sub(Duration::from_millis(800));
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        while add_ms.len() < plan.updates
            && start.elapsed() < until
            && !done.load(Ordering::Relaxed)
        {
            let b = bed.backend();
            match b.time_add().and_then(|a| Ok((a, b.time_del()?))) {
                Ok((a, d)) => {
                    add_ms.push(ms(a));
                    del_ms.push(ms(d));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        load.join()
            .map_err(|_| anyhow::anyhow!("the load panicked"))
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let res = load_result?;
    let agent_cpu_s = cpu0.zip(bed.agent_cpu_secs()).map(|(a, b)| b - a);
    Ok(UpdateRow {
        mode: bed.mode(),
        add_ms,
        del_ms,
        load_rate: res.rate() / 1e3,
        load_p99: percentile(&res.connect_us, 99.0),
        agent_cpu_s,
    })
}
