//! New TCP connections per second: short connections (connect, one byte
//! each way, close by the client), from rotating source addresses or to
//! rotating destinations so that TIME_WAIT never throttles the client.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    bench::{
        cpu::{CpuDelta, CpuTimes},
        sock::{self, IO_TIMEOUT, POLL},
    },
    netns::Netns,
};

/// A server answering each connection's byte and waiting for the client to
/// close; stopped on drop.
#[derive(Debug)]
pub struct ConnServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ConnServer {
    /// Listens on `port` in `ns` with `threads` accepting threads.
    pub fn start(ns: &Netns, port: u16, threads: usize) -> Result<Self> {
        let listener = sock::listen_in(ns, port)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..threads.max(1) {
            let l = listener.try_clone()?;
            let flag = stop.clone();
            handles.push(std::thread::spawn(move || serve(&l, &flag)));
        }
        Ok(Self {
            stop,
            threads: handles,
        })
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            // A panicked server has reported itself already.
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => answer(conn),
            Err(e) if sock::is_timeout(&e) => {}
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Reads the request byte, answers one, waits for the client's close.
fn answer(mut conn: TcpStream) {
    if conn.set_read_timeout(Some(IO_TIMEOUT)).is_err() {
        return;
    }
    let mut b = [0u8; 1];
    if conn.read_exact(&mut b).is_err() || conn.write_all(&b).is_err() {
        return;
    }
    // The client closes first (TIME_WAIT stays on its side); an error
    // or timeout ends the wait just as well.
    let _ = conn.read(&mut b);
}

/// Who connects where.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Source addresses, used in turn (`None`: the kernel's choice).
    pub sources: Vec<Option<Ipv4Addr>>,
    /// Destinations, used in turn.
    pub dests: Vec<SocketAddrV4>,
    /// Client threads.
    pub threads: usize,
    /// How long to connect.
    pub duration: Duration,
    /// The most connections to make.
    pub max: usize,
}

/// One run's figures.
#[derive(Clone, Debug, Default)]
pub struct ConnResult {
    /// Completed connections (connect, exchange, close).
    pub completed: usize,
    /// Failed attempts.
    pub failed: usize,
    /// Handshake times of the completed connections, microseconds.
    pub connect_us: Vec<f64>,
    /// Seconds the run lasted.
    pub secs: f64,
    /// CPU spent machine-wide while it ran.
    pub cpu: CpuDelta,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

impl ConnResult {
    /// Completed connections per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.completed as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// A failure share above which a run is reported as broken.
const MAX_FAILED_SHARE: f64 = 0.01;

/// Makes connections from `ns` according to `plan`; fails if more than
/// 1 % of them did.
pub fn run(ns: &Netns, plan: &Plan) -> Result<ConnResult> {
    let result = measure(ns, plan)?;
    let attempts = result.completed + result.failed;
    if result.completed == 0 || result.failed as f64 > MAX_FAILED_SHARE * attempts as f64 {
        bail!(
            "{} of {attempts} connections failed (first: {})",
            result.failed,
            result.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(result)
}

/// Makes connections from `ns` according to `plan`, counting failures.
pub fn measure(ns: &Netns, plan: &Plan) -> Result<ConnResult> {
    if plan.sources.is_empty() || plan.dests.is_empty() {
        bail!("a connection plan needs sources and destinations");
    }
    let threads = plan.threads.max(1);
    let started = Arc::new(AtomicUsize::new(0));
    let before = CpuTimes::now();
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let plan = plan.clone();
            let started = started.clone();
            ns.spawn_thread(move || client(&plan, &started, start))
        })
        .collect();
    let mut result = ConnResult::default();
    for h in handles {
        let part = h
            .join()
            .map_err(|_| anyhow::anyhow!("a connection client panicked"))?;
        result.completed += part.completed;
        result.failed += part.failed;
        result.connect_us.extend(part.connect_us);
        result.first_error = result.first_error.or(part.first_error);
    }
    result.secs = start.elapsed().as_secs_f64();
    result.cpu = CpuTimes::now().since(&before);
    Ok(result)
}

/// One client thread: takes connection numbers from `started` until the
/// plan's time or count is used up.
fn client(plan: &Plan, started: &AtomicUsize, start: Instant) -> ConnResult {
    let mut out = ConnResult::default();
    while start.elapsed() < plan.duration {
        let i = started.fetch_add(1, Ordering::Relaxed);
        if i >= plan.max {
            break;
        }
        let src = plan.sources[i % plan.sources.len()];
        let dst = plan.dests[i % plan.dests.len()];
        match once(src, dst) {
            Ok(t) => {
                out.completed += 1;
                out.connect_us.push(t.as_secs_f64() * 1e6);
            }
            Err(e) => {
                out.failed += 1;
                out.first_error
                    .get_or_insert_with(|| format!("{src:?} → {dst}: {e:#}"));
                // Back off a little: a failure often means a queue is full.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    out
}

/// One short connection; returns its handshake time.
fn once(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> Result<Duration> {
    let (mut conn, took) = sock::connect_from(src, dst)?;
    conn.write_all(b"x")?;
    let mut b = [0u8; 1];
    conn.read_exact(&mut b)?;
    Ok(took)
}
