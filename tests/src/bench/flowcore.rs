//! The flow core under load (issue 12), against netfilter in the same run:
//!
//! * **sustained**: new connections through a published port at full rate
//!   for 60 s (quick: 10 s), from the client's 64 addresses, in windows:
//!   the rate over time and the failures. nf_conntrack keeps each closed
//!   connection for its TIME_WAIT timeout (120 s); this datapath lets
//!   closed flows give way.
//! * **fill**: a spoofed SYN flood (hping3 `--rand-source --flood`) at the
//!   published port while new connections are made: their rate and
//!   failures, and the tracked entries afterwards.
//! * **snat**: UDP flows from the container to one destination, one more
//!   at a time, each answered, until the first is not: how many the
//!   masquerade holds, and what the last ones cost.
//! * **gc**: walking the conntrack table at 10k, 100k and 1M entries: with
//!   `BPF_MAP_LOOKUP_BATCH` (what the agent does), key by key (what it did),
//!   `datapath conntrack list`, and the kernel-side flush.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use datapath_common::{CT_F_ORIGINAL, CtEntry, CtKey, CtTimedEntry, ct_action, ct_state, proto};

use crate::{
    agent::Agent,
    bench::{
        bed::{Bed, CONN_PORT},
        connrate,
        mode::Mode,
    },
    netns::Netns,
    node::Node,
};

/// How much of the flow-core section to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Length of the sustained run.
    pub sustained: Duration,
    /// Length of one window of it.
    pub window: Duration,
    /// Length of the SYN flood.
    pub flood: Duration,
    /// The most masqueraded flows to try.
    pub snat_max: usize,
    /// Table sizes of the walk.
    pub gc_sizes: Vec<usize>,
    /// Client threads making connections.
    pub threads: usize,
}

impl Plan {
    /// The full run's.
    pub fn full(threads: usize) -> Self {
        Self {
            sustained: Duration::from_secs(60),
            window: Duration::from_secs(5),
            flood: Duration::from_secs(8),
            snat_max: 20_000,
            gc_sizes: vec![10_000, 100_000, 1_000_000],
            threads,
        }
    }

    /// The quick run's.
    pub fn quick(threads: usize) -> Self {
        Self {
            sustained: Duration::from_secs(10),
            window: Duration::from_millis(2500),
            flood: Duration::from_secs(3),
            snat_max: 6_000,
            gc_sizes: vec![10_000, 100_000],
            threads,
        }
    }
}

/// One mode's sustained run.
#[derive(Clone, Debug)]
pub struct SustainedRow {
    /// The mode.
    pub mode: Mode,
    /// Connections per second in each window, k/s.
    pub rates: Vec<f64>,
    /// Failed connections over the run.
    pub failed: usize,
    /// Completed connections over the run.
    pub completed: usize,
    /// The first failure.
    pub first_error: Option<String>,
}

/// One mode's connections during a SYN flood.
#[derive(Clone, Debug)]
pub struct FillRow {
    /// The mode.
    pub mode: Mode,
    /// New connections per second during the flood, k/s.
    pub rate: f64,
    /// Completed and failed connections during the flood.
    pub completed: usize,
    /// Failed ones.
    pub failed: usize,
    /// Tracked entries right after the flood.
    pub entries: u64,
    /// The first failure.
    pub first_error: Option<String>,
}

/// One mode's masqueraded flows to one destination.
#[derive(Clone, Debug)]
pub struct SnatRow {
    /// The mode.
    pub mode: Mode,
    /// The port range it masquerades to.
    pub range: String,
    /// Flows answered before the first that was not (or the plan's most).
    pub flows: usize,
    /// Whether the plan's most was reached without a failure.
    pub capped: bool,
    /// Mean time of one flow (send, answer) over the last hundred, µs.
    pub last_us: f64,
    /// The same over the first hundred.
    pub first_us: f64,
}

/// Walking a table of `entries`.
#[derive(Clone, Debug)]
pub struct GcRow {
    /// Entries in the main table (two per flow).
    pub entries: usize,
    /// Reading all of them with `BPF_MAP_LOOKUP_BATCH`, ms.
    pub batch_ms: f64,
    /// Reading them key by key, ms.
    pub per_key_ms: f64,
    /// `datapath conntrack list --json`, ms (`None`: not run at this size).
    pub list_ms: Option<f64>,
    /// `datapath conntrack flush` (the kernel removes them), ms.
    pub flush_ms: f64,
}

/// Everything the section measured.
#[derive(Clone, Debug, Default)]
pub struct FlowcoreResults {
    /// Sustained connection load, per mode.
    pub sustained: Vec<SustainedRow>,
    /// Connections during a SYN flood, per mode.
    pub fill: Vec<FillRow>,
    /// Masquerade to one destination, per mode.
    pub snat: Vec<SnatRow>,
    /// Table walks, per size.
    pub gc: Vec<GcRow>,
}

/// The modes the section compares: this datapath's TC hook and
/// iptables (how Docker does it).
pub fn compared(mode: Mode) -> bool {
    matches!(mode, Mode::DatapathTc | Mode::Iptables)
}

/// Runs the section over `beds`; `before` runs before each measurement
/// (the runner's quiet wait and interruption check).
pub fn run(
    beds: &[Bed<'_>],
    plan: &Plan,
    mut before: impl FnMut() -> Result<()>,
    notes: &mut Vec<String>,
) -> Result<FlowcoreResults> {
    let mut out = FlowcoreResults::default();
    for bed in beds.iter().filter(|b| compared(b.mode())) {
        before()?;
        bed.flush_conntrack()?;
        let row = sustained(bed, plan)?;
        println!(
            "sustained   : {} {} windows, {:.1}..{:.1}k/s, {} failed",
            bed.mode(),
            row.rates.len(),
            row.rates.iter().copied().fold(f64::INFINITY, f64::min),
            row.rates.iter().copied().fold(0.0, f64::max),
            row.failed
        );
        out.sustained.push(row);
    }
    for bed in beds.iter().filter(|b| compared(b.mode())) {
        before()?;
        bed.flush_conntrack()?;
        match fill(bed, plan) {
            Ok(row) => {
                println!(
                    "fill        : {} {:.1}k/s during a SYN flood, {} failed, {} entries",
                    bed.mode(),
                    row.rate,
                    row.failed,
                    row.entries
                );
                out.fill.push(row);
            }
            Err(e) => notes.push(format!("{} fill failed: {e:#}", bed.mode())),
        }
    }
    for bed in beds.iter().filter(|b| compared(b.mode())) {
        before()?;
        bed.flush_conntrack()?;
        match snat(bed, plan) {
            Ok(row) => {
                println!(
                    "snat        : {} {} flows to one destination ({})",
                    bed.mode(),
                    row.flows,
                    row.range
                );
                out.snat.push(row);
            }
            Err(e) => notes.push(format!("{} snat failed: {e:#}", bed.mode())),
        }
    }
    before()?;
    match gc(plan) {
        Ok(rows) => out.gc = rows,
        Err(e) => notes.push(format!("gc walk failed: {e:#}")),
    }
    Ok(out)
}

/// New connections for `plan.sustained`, in windows.
fn sustained(bed: &Bed<'_>, plan: &Plan) -> Result<SustainedRow> {
    let conn = connrate::Plan {
        sources: bed.client_addrs().iter().copied().map(Some).collect(),
        dests: vec![bed.ingress(CONN_PORT)],
        threads: plan.threads,
        duration: plan.window,
        max: usize::MAX,
    };
    let mut row = SustainedRow {
        mode: bed.mode(),
        rates: Vec::new(),
        failed: 0,
        completed: 0,
        first_error: None,
    };
    let start = Instant::now();
    while start.elapsed() + plan.window / 2 < plan.sustained {
        let r = connrate::measure(&bed.node().client, &conn)?;
        row.rates.push(r.rate() / 1e3);
        row.failed += r.failed;
        row.completed += r.completed;
        row.first_error = row.first_error.or(r.first_error);
    }
    Ok(row)
}

/// New connections during a spoofed SYN flood.
fn fill(bed: &Bed<'_>, plan: &Plan) -> Result<FillRow> {
    let node = bed.node();
    let target = bed.ingress(CONN_PORT);
    let secs = plan.flood.as_secs().max(1) + 1;
    // Answers to the flood's random sources go through a gateway, as on a
    // real node: unrouted, each would take an ARP entry of the machine-wide
    // table, in every mode that answers them.
    let gateway = node.client_addr().to_string();
    node.node
        .exec_ok("ip", ["route", "replace", "default", "via", &gateway]);
    let mut flood = node
        .client
        .enter(Command::new("timeout").args([
            &secs.to_string(),
            "hping3",
            "-q",
            "-S",
            "-p",
            &target.port().to_string(),
            "--rand-source",
            "--flood",
            &target.ip().to_string(),
        ]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting hping3")?;
    // Let the flood fill the tables first.
    std::thread::sleep(Duration::from_millis(500));
    let conn = connrate::Plan {
        sources: bed.client_addrs().iter().copied().map(Some).collect(),
        dests: vec![target],
        threads: plan.threads,
        duration: plan.flood.saturating_sub(Duration::from_millis(500)),
        max: usize::MAX,
    };
    let r = connrate::measure(&node.client, &conn);
    let entries = entries(bed);
    let _ = flood.wait();
    node.node.exec_ok("ip", ["route", "del", "default"]);
    let r = r?;
    Ok(FillRow {
        mode: bed.mode(),
        rate: r.rate() / 1e3,
        completed: r.completed,
        failed: r.failed,
        entries: entries.unwrap_or(0),
        first_error: r.first_error,
    })
}

/// The tracked entries of a bed's node right now.
fn entries(bed: &Bed<'_>) -> Result<u64> {
    if let Some(api) = bed.api() {
        let st = api.call("GET", "/v1/status", None)?;
        return st["conntrack_entries"]
            .as_u64()
            .with_context(|| format!("no conntrack_entries in {st}"));
    }
    let out = bed.node().node.exec("conntrack", ["-C"]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("conntrack -C")
}

/// The UDP port the snat measurement's echo server listens on (client).
const SNAT_ECHO_PORT: u16 = 5353;

/// Masqueraded UDP flows from the container to one destination, one more
/// at a time (each from its own source port, its flow kept by conntrack
/// after the socket closes), until one is not answered.
fn snat(bed: &Bed<'_>, plan: &Plan) -> Result<SnatRow> {
    let node = bed.node();
    let echo = UdpEcho::start(&node.client, SNAT_ECHO_PORT)?;
    let dst = SocketAddrV4::new(node.client_addr(), SNAT_ECHO_PORT);
    let max = plan.snat_max;
    let (times, stop): (Vec<f64>, Option<std::io::Error>) = bed.container().exec_closure(|| {
        let mut times = Vec::new();
        for i in 0..max {
            let port = 1024 + i as u16;
            let t = Instant::now();
            let ok = (|| -> std::io::Result<()> {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                s.connect(dst)?;
                s.set_read_timeout(Some(Duration::from_millis(300)))?;
                s.send(b"q")?;
                let mut b = [0u8; 16];
                s.recv(&mut b)?;
                Ok(())
            })();
            if let Err(e) = ok {
                return (times, Some(e));
            }
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        (times, None)
    });
    drop(echo);
    if times.is_empty() {
        bail!(
            "not one flow was answered ({})",
            stop.map_or_else(|| "no error".to_owned(), |e| e.to_string())
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let n = times.len();
    Ok(SnatRow {
        mode: bed.mode(),
        range: if bed.mode().is_datapath() {
            "--snat-ports 61000-65535 (4,536)".to_owned()
        } else {
            "MASQUERADE, no --to-ports (the source port kept)".to_owned()
        },
        flows: n,
        capped: n == max,
        last_us: mean(&times[n.saturating_sub(100)..]),
        first_us: mean(&times[..n.min(100)]),
    })
}

/// A UDP echo thread in a namespace; stops on drop.
struct UdpEcho {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    fn start(ns: &Netns, port: u16) -> Result<Self> {
        let sock = ns.exec_closure(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Walks of the main table at each size, on a node of its own.
fn gc(plan: &Plan) -> Result<Vec<GcRow>> {
    let largest = plan.gc_sizes.iter().copied().max().unwrap_or(0);
    let node = Node::new();
    let ct_max = (largest as u32).next_power_of_two().max(1024);
    let agent = Agent::builder(&node)
        .args(["--ct-max", &ct_max.to_string()])
        .start();
    let pin = agent.bpffs_dir().join("maps/CT");
    let mut map: BpfHashMap<MapData, CtKey, CtTimedEntry> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(&pin)?))?;
    let mut rows = Vec::new();
    for &size in &plan.gc_sizes {
        fill_table(&mut map, size)?;
        let t = Instant::now();
        let all: Vec<(CtKey, CtTimedEntry)> =
            datapath::datapath::conntrack::read_all(map_data(&map))?;
        let batch_ms = t.elapsed().as_secs_f64() * 1e3;
        if all.len() != size {
            bail!("the batch walk read {} of {size} entries", all.len());
        }
        let t = Instant::now();
        let n = map.keys().filter(Result::is_ok).count();
        let per_key_ms = t.elapsed().as_secs_f64() * 1e3;
        if n != size {
            bail!("the key walk read {n} of {size} entries");
        }
        let list_ms = (size <= 100_000).then(|| {
            let t = Instant::now();
            let _ = agent.cli(["conntrack", "list", "--json"]);
            t.elapsed().as_secs_f64() * 1e3
        });
        let t = Instant::now();
        let flushed = agent.cli_ok(["conntrack", "flush"]);
        let flush_ms = t.elapsed().as_secs_f64() * 1e3;
        if flushed.trim() != format!("removed {size} entries") {
            bail!("flush of {size} entries: {flushed}");
        }
        println!(
            "gc          : {size} entries: batch {batch_ms:.1} ms, key by key {per_key_ms:.1} ms, \
             flush {flush_ms:.1} ms"
        );
        rows.push(GcRow {
            entries: size,
            batch_ms,
            per_key_ms,
            list_ms,
            flush_ms,
        });
    }
    Ok(rows)
}

fn map_data(map: &BpfHashMap<MapData, CtKey, CtTimedEntry>) -> &MapData {
    use aya::maps::IterableMap as _;
    map.map()
}

/// Puts `size` entries (`size / 2` established flows of container id 1,
/// each of a client of its own) into the main table `map` (an agent's
/// pinned `CT`), without timers: they stay until flushed.
pub fn fill_table(map: &mut BpfHashMap<MapData, CtKey, CtTimedEntry>, size: usize) -> Result<()> {
    let now = datapath::datapath::conntrack::now_ns();
    for i in 0..(size / 2) as u32 {
        let client = [198, 18, (i >> 16) as u8, (i >> 8) as u8];
        let sport = 1024 + (i & 0xff) as u16;
        let key = CtKey::v4(client, sport, [198, 18, 0, 2], 8080, proto::TCP);
        let orig = CtEntry {
            nat_addr: [198, 19, 0, 2],
            nat_port: 80,
            action: ct_action::DNAT,
            state: ct_state::TCP_ESTABLISHED,
            flags: CT_F_ORIGINAL,
            container_id: 1,
            created_ns: now,
            last_seen_ns: now,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            nat_addr: [198, 18, 0, 2],
            nat_port: 8080,
            action: ct_action::REV_DNAT,
            flags: 0,
            ..orig
        };
        for (k, e) in [(key, orig), (orig.peer_key(&key), reply)] {
            map.insert(
                k,
                CtTimedEntry {
                    entry: e,
                    ..CtTimedEntry::default()
                },
                0,
            )?;
        }
    }
    Ok(())
}
