//! Request/response latency over one TCP connection (netperf's TCP_RR):
//! the client sends one byte, the server echoes it, the client times each
//! round trip. Client and server share one CPU (see [`CPU`]).

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};

use crate::{
    bench::{
        cpu::{CpuDelta, CpuTimes},
        sock::{self, POLL},
    },
    netns::Netns,
};

/// Bytes per request and per response.
const MESSAGE: usize = 1;
/// The CPU both the client and the server run on.
///
/// On one CPU a transaction costs the path twice plus two context
/// switches. Across CPUs it would also cost two cross-CPU wakeups, and on
/// this VM a wakeup of an idle vCPU takes anywhere from a few to ~30 µs
/// depending on what else runs. That would swamp the path's cost.
const CPU: usize = 0;

/// Pins the calling thread to [`CPU`]. Best effort: in a restricted
/// cpuset the thread stays where it is.
fn pin() {
    let mut set = CpuSet::new();
    if set.set(CPU).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// An echo server serving one connection at a time; stopped on drop.
#[derive(Debug)]
pub struct RrServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RrServer {
    /// Listens on `port` in `ns`.
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let listener = sock::listen_in(ns, port)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            pin();
            serve(&listener, &flag)
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for RrServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // A panicked server has reported itself already.
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => echo(conn, stop),
            Err(e) if sock::is_timeout(&e) => {}
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Echoes until the peer closes, an error, or `stop`.
fn echo(mut conn: TcpStream, stop: &AtomicBool) {
    if conn.set_nodelay(true).is_err() || conn.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = [0u8; MESSAGE];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if sock::is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug)]
pub struct RrResult {
    /// Round-trip times, microseconds.
    pub latencies_us: Vec<f64>,
    /// Seconds the run lasted.
    pub secs: f64,
    /// CPU spent machine-wide while it ran.
    pub cpu: CpuDelta,
}

impl RrResult {
    /// Transactions per second.
    pub fn tps(&self) -> f64 {
        if self.secs > 0.0 {
            self.latencies_us.len() as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Runs transactions from `ns` to `target` for `duration` or `max`
/// transactions, whichever comes first, over one connection.
pub fn run(ns: &Netns, target: SocketAddrV4, duration: Duration, max: usize) -> Result<RrResult> {
    transact(ns, target, duration, max, Duration::ZERO)
}

/// Runs one transaction every `gap` (plus its own time) from `ns` to
/// `target` for `duration`, over one connection: latency-sensitive
/// traffic that is light, not a flood.
pub fn run_paced(
    ns: &Netns,
    target: SocketAddrV4,
    duration: Duration,
    gap: Duration,
) -> Result<RrResult> {
    transact(ns, target, duration, usize::MAX, gap)
}

fn transact(
    ns: &Netns,
    target: SocketAddrV4,
    duration: Duration,
    max: usize,
    gap: Duration,
) -> Result<RrResult> {
    ns.exec_closure(|| {
        pin();
        let (mut conn, _) =
            sock::connect_from(None, target).with_context(|| format!("connecting to {target}"))?;
        let mut lat = Vec::with_capacity(max.min(1 << 20));
        let mut buf = [0u8; MESSAGE];
        let before = CpuTimes::now();
        let start = Instant::now();
        while lat.len() < max && start.elapsed() < duration {
            let t = Instant::now();
            conn.write_all(&buf)?;
            conn.read_exact(&mut buf)
                .with_context(|| format!("no answer from {target}"))?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = CpuTimes::now().since(&before);
        if lat.is_empty() {
            bail!("no transaction with {target} completed");
        }
        Ok(RrResult {
            latencies_us: lat,
            secs,
            cpu,
        })
    })
}
