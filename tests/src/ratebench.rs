//! Measuring rate limits with real TCP: iperf3 runners, and the benchmark
//! of the datapath's per-cgroup limiter against tc tbf (what the CNI
//! `bandwidth` plugin does) on the same kind of namespace node.
//!
//! * [`Iperf3Server`] / [`Iperf3Client`]: iperf3 in a namespace, optionally
//!   in a cgroup, bounded in time, with its JSON report parsed
//!   ([`Iperf3Report`]).
//! * [`measure`]: one case ([`RateCase`]) with one limiter ([`Limiter`]):
//!   builds its own node, limits, sends, tears down. [`compare`] runs both
//!   limiters on the same case.
//!
//! The caller holds [`crate::lock::TrafficLock`] while measuring.
//!
//! ```no_run
//! use datapath_tests::{lock::TrafficLock, ratebench::{Direction, RateCase, compare}};
//!
//! let _lock = TrafficLock::acquire();
//! let case = RateCase::new(100_000_000, Direction::Egress, 4);
//! let [ours, tbf] = compare(&case).expect("measured");
//! println!("{:.3} ({} retransmits) vs tbf {:.3} ({})",
//!     ours.ratio, ours.retransmits, tbf.ratio, tbf.retransmits);
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{agent::Agent, cgroup::Cgroup, netns::Netns, node::Node};

/// Errors of a measurement.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A tool failed or could not be started.
    #[error("{what}: {message}")]
    Tool {
        /// What was being done.
        what: String,
        /// What went wrong (the tool's output).
        message: String,
    },
    /// iperf3 ran but its report is not what was expected.
    #[error("iperf3 report: {0}")]
    Report(String),
}

fn tool(what: impl Into<String>, message: impl Into<String>) -> BenchError {
    BenchError::Tool {
        what: what.into(),
        message: message.into(),
    }
}

/// `iperf3 -s -1` in a namespace (and a cgroup, if given): serves one test,
/// killed on drop.
#[derive(Debug)]
pub struct Iperf3Server {
    child: Child,
}

impl Iperf3Server {
    /// Starts the server on `bind:port` in `ns` and waits (up to 5 s) until
    /// it listens.
    pub fn start(
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        bind: Ipv4Addr,
        port: u16,
    ) -> Result<Self, BenchError> {
        let mut cmd = Command::new("iperf3");
        cmd.args([
            "-s",
            "-1",
            "-J",
            "-B",
            &bind.to_string(),
            "-p",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(cg) = cgroup {
            cg.enter(&mut cmd);
        }
        let child = ns.enter(&mut cmd).spawn().map_err(|e| {
            tool(
                format!("start iperf3 -s in {}", ns.name()),
                format!("{e} (is iperf3 installed?)"),
            )
        })?;
        let server = Self { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        let filter = format!("sport = :{port}");
        loop {
            let out = ns.exec("ss", ["-Hltn", filter.as_str()]);
            if out.status.success() && !out.stdout.is_empty() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(tool(
                    format!("iperf3 -s on {bind}:{port} in {}", ns.name()),
                    "not listening after 5 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP congestion control for iperf3's `-C` (the two a network
/// namespace allows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// BBR (the machine's default here).
    #[default]
    Bbr,
    /// Reno.
    Reno,
}

impl Congestion {
    /// Both.
    pub const ALL: [Congestion; 2] = [Congestion::Bbr, Congestion::Reno];

    /// The kernel's name.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::Reno => "reno",
        }
    }
}

/// How an iperf3 client runs.
#[derive(Clone, Debug)]
pub struct Iperf3Options {
    /// Measured seconds (`-t`).
    pub seconds: u32,
    /// Seconds at the start left out of the totals (`-O`).
    pub omit: u32,
    /// Parallel streams (`-P`).
    pub streams: u32,
    /// Report interval in seconds (`-i`).
    pub interval: f64,
    /// The sender's congestion control (`-C`), if not the system's.
    pub congestion: Option<Congestion>,
}

impl Default for Iperf3Options {
    fn default() -> Self {
        Self {
            seconds: 3,
            omit: 0,
            streams: 1,
            interval: 1.0,
            congestion: None,
        }
    }
}

/// What an iperf3 client reported.
#[derive(Clone, Debug)]
pub struct Iperf3Report {
    /// Goodput measured by the receiver, bits per second (omitted seconds
    /// left out).
    pub received_bps: f64,
    /// Goodput measured by the sender, bits per second.
    pub sent_bps: f64,
    /// TCP retransmissions of the sender (all streams).
    pub retransmits: u64,
    /// The sender's rate in each reported interval after the omitted ones,
    /// bits per second.
    pub intervals: Vec<f64>,
    /// The receiver's rate in each of its intervals after the omitted
    /// ones, bits per second (from the server's report).
    pub received_intervals: Vec<f64>,
    /// The whole report.
    pub json: Value,
}

impl Iperf3Report {
    /// Parses `iperf3 -J` output.
    pub fn parse(text: &[u8]) -> Result<Self, BenchError> {
        let json: Value = serde_json::from_slice(text)
            .map_err(|e| BenchError::Report(format!("not JSON ({e})")))?;
        if let Some(err) = json.get("error").and_then(Value::as_str) {
            return Err(BenchError::Report(format!("iperf3 failed: {err}")));
        }
        let end = &json["end"];
        let num = |v: &Value, what: &str| {
            v.as_f64()
                .ok_or_else(|| BenchError::Report(format!("no {what} in {end}")))
        };
        let received_bps = num(&end["sum_received"]["bits_per_second"], "sum_received")?;
        let sent_bps = num(&end["sum_sent"]["bits_per_second"], "sum_sent")?;
        let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
        let intervals_of = |v: &Value| -> Vec<f64> {
            v["intervals"]
                .as_array()
                .map(|all| {
                    all.iter()
                        .filter(|i| !i["sum"]["omitted"].as_bool().unwrap_or(false))
                        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
                        .collect()
                })
                .unwrap_or_default()
        };
        let intervals = intervals_of(&json);
        let received_intervals = intervals_of(&json["server_output_json"]);
        Ok(Self {
            received_bps,
            sent_bps,
            retransmits,
            intervals,
            received_intervals,
            json,
        })
    }
}

/// A running `iperf3 -c … -J`, killed if it outlives its time.
#[derive(Debug)]
pub struct Iperf3Client {
    child: Option<Child>,
    deadline: Instant,
    what: String,
}

impl Iperf3Client {
    /// Starts a client in `ns` (and `cgroup`) sending to `server`.
    pub fn spawn(
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        server: SocketAddr,
        opts: &Iperf3Options,
    ) -> Result<Self, BenchError> {
        let mut cmd = Command::new("iperf3");
        cmd.args([
            "-c",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
            "-t",
            &opts.seconds.to_string(),
            "-O",
            &opts.omit.to_string(),
            "-P",
            &opts.streams.to_string(),
            "-i",
            &opts.interval.to_string(),
            "--get-server-output",
            "-J",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(cc) = opts.congestion {
            cmd.args(["-C", cc.name()]);
        }
        if let Some(cg) = cgroup {
            cg.enter(&mut cmd);
        }
        let what = format!("iperf3 -c {server} in {}", ns.name());
        let child = ns
            .enter(&mut cmd)
            .spawn()
            .map_err(|e| tool(what.clone(), e.to_string()))?;
        Ok(Self {
            child: Some(child),
            deadline: Instant::now()
                + Duration::from_secs(u64::from(opts.seconds + opts.omit) + 15),
            what,
        })
    }

    /// Waits for the report (killing the client past its deadline).
    pub fn wait(mut self) -> Result<Iperf3Report, BenchError> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| tool(self.what.clone(), "already waited for"))?;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() > self.deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(tool(self.what.clone(), "did not finish in time: killed"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(tool(self.what.clone(), e.to_string())),
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| tool(self.what.clone(), e.to_string()))?;
        Iperf3Report::parse(&out.stdout).map_err(|e| {
            tool(
                self.what.clone(),
                format!("{e}\nstderr: {}", String::from_utf8_lossy(&out.stderr)),
            )
        })
    }
}

impl Drop for Iperf3Client {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// [`Iperf3Client::spawn`] and [`Iperf3Client::wait`].
pub fn iperf3(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    server: SocketAddr,
    opts: &Iperf3Options,
) -> Result<Iperf3Report, BenchError> {
    Iperf3Client::spawn(ns, cgroup, server, opts)?.wait()
}

/// Egress goodput as a fraction of the limit, for the default bucket (or
/// one of 1 MB and more). Measured here with one TCP stream over 3 s after
/// 1 s of warm-up ([`Iperf3Options::measured`]), 4 runs each, load
/// average 2-5: 0.927-1.003 at 10, 20, 40 and 100 Mbit/s, 10-40 Mbit/s
/// within 2%, 4 Mbit/s with a 1 MB bucket 0.994-1.003. Small buckets do
/// worse: 0.76-0.88 at 4 Mbit/s with 50 KB.
pub const EGRESS_BAND: (f64, f64) = (0.9, 1.1);

/// Ingress goodput as a fraction of the limit, for the default bucket (or
/// one of 1 MB and more), measured over 3 s after 2 s of warm-up
/// ([`Iperf3Options::measured_ingress`]). The receivers' windows pace the
/// senders (issue 18): measured here 0.97-0.98 at 10, 20 and 50 Mbit/s,
/// 3 runs each at a load average of 9-12. The band is as wide as when
/// ingress was only policed (0.925-1.060 then, up to 1.197 after 1 s of
/// warm-up), which the update tests, measuring right after a change, still
/// need. Buckets that hold less than a sender's persist timer (200 ms) of
/// traffic do worse: a window that closes stops the sender for that long
/// (0.42 at 80 Mbit/s with a 1.25 MB bucket).
pub const INGRESS_BAND: (f64, f64) = (0.85, 1.15);

impl Iperf3Options {
    /// What rate tests measure: one stream, 3 s after 1 s of warm-up (slow
    /// start and the initial full bucket left out).
    pub fn measured() -> Self {
        Self {
            seconds: 3,
            omit: 1,
            ..Self::default()
        }
    }
}

/// `bps` in Mbit/s, for messages.
pub fn mbit(bps: f64) -> String {
    format!("{:.1} Mbit/s", bps / 1e6)
}

impl Iperf3Options {
    /// What ingress rate tests measure: one stream, 3 s after 2 s of
    /// warm-up (see [`INGRESS_BAND`]).
    pub fn measured_ingress() -> Self {
        Self {
            omit: 2,
            ..Self::measured()
        }
    }
}

/// Asserts that `bps` lies within `band` (fractions) of `limit_bps`;
/// `details` goes into the message.
#[track_caller]
pub fn assert_rate(what: &str, bps: f64, limit_bps: f64, band: (f64, f64), details: &str) {
    let ratio = bps / limit_bps;
    assert!(
        (band.0..=band.1).contains(&ratio),
        "{what}: {} is {ratio:.3} of the {} limit, not within {}-{}; {details}",
        mbit(bps),
        mbit(limit_bps),
        band.0,
        band.1,
    );
}

/// [`assert_rate`] for the rate the receiver of `report` measured.
#[track_caller]
pub fn assert_report(what: &str, report: &Iperf3Report, limit_bps: f64, band: (f64, f64)) {
    let seconds = |v: &[f64]| v.iter().map(|b| mbit(*b)).collect::<Vec<_>>();
    let details = format!(
        "per second sent {:?}, received {:?}",
        seconds(&report.intervals),
        seconds(&report.received_intervals)
    );
    assert_rate(what, report.received_bps, limit_bps, band, &details);
}

/// One established TCP connection of a receiver, as `ss -ti` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpReceived {
    /// The peer's address and port.
    pub peer: String,
    /// Payload bytes received on it so far.
    pub bytes: u64,
}

/// The established TCP connections in `ns` whose local port is `port`,
/// with the bytes each has received (from `ss -tin`).
pub fn tcp_received(ns: &Netns, port: u16) -> Vec<TcpReceived> {
    let filter = format!("sport = :{port}");
    let out = ns.exec_ok("ss", ["-Htin", "state", "established", filter.as_str()]);
    let mut conns = Vec::new();
    let mut peer = None;
    for line in out.lines() {
        if !line.starts_with(char::is_whitespace) {
            // `Recv-Q Send-Q Local Peer`: a new connection.
            peer = line.split_whitespace().nth(3).map(str::to_owned);
            continue;
        }
        let bytes = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bytes_received:"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if let Some(peer) = peer.take() {
            conns.push(TcpReceived { peer, bytes });
        }
    }
    conns
}

/// The goodput of the busiest connection to port `port` in `ns` (an
/// iperf3 data connection, next to its nearly idle control connection),
/// measured over `window` by its receiver.
#[derive(Clone, Debug)]
pub struct Goodput {
    /// The connection's peer.
    pub peer: String,
    /// Bits per second over the window.
    pub bps: f64,
}

/// Measures [`Goodput`] over `window` of the busiest connection to `port`
/// in `ns`; `None` if there is no connection or it went away meanwhile.
pub fn receiver_goodput(ns: &Netns, port: u16, window: Duration) -> Option<Goodput> {
    // Each sample is dated at the middle of the `ss` run that took it: on
    // a loaded machine one run can take a good part of a second, and
    // dating a sample by its end only would shorten or stretch the window.
    let sample = || {
        let before = Instant::now();
        let conns = tcp_received(ns, port);
        (conns, before + before.elapsed() / 2)
    };
    let (conns, t0) = sample();
    let first = conns.into_iter().max_by_key(|c| c.bytes)?;
    std::thread::sleep(window);
    let (conns, t1) = sample();
    let last = conns.into_iter().find(|c| c.peer == first.peer)?;
    let secs = t1.duration_since(t0).as_secs_f64();
    Some(Goodput {
        bps: (last.bytes.saturating_sub(first.bytes)) as f64 * 8.0 / secs,
        peer: first.peer,
    })
}

/// iperf3 from container namespace `ctr` (in `cgroup`) to a server in the
/// client of `node`: the container's egress.
pub fn send_from(
    node: &Node,
    ctr: &Netns,
    cgroup: Option<&Cgroup>,
    opts: &Iperf3Options,
) -> Result<Iperf3Report, BenchError> {
    let _server = Iperf3Server::start(&node.client, None, node.client_addr(), PORT)?;
    iperf3(
        ctr,
        cgroup,
        SocketAddr::from((node.client_addr(), PORT)),
        opts,
    )
}

/// iperf3 from the client of `node` to `target`, served in container
/// namespace `ctr` (in `cgroup`) on `bind`, port 5201: the container's
/// ingress.
pub fn receive_in(
    node: &Node,
    ctr: &Netns,
    cgroup: Option<&Cgroup>,
    (bind, target): (Ipv4Addr, SocketAddr),
    opts: &Iperf3Options,
) -> Result<Iperf3Report, BenchError> {
    let _server = Iperf3Server::start(ctr, cgroup, bind, PORT)?;
    iperf3(&node.client, None, target, opts)
}

/// Which way the limited traffic flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the container (it sends).
    Egress,
    /// To the container (it receives, through a published port).
    Ingress,
}

/// What limits the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// The datapath agent's per-cgroup limiter.
    Datapath,
    /// tc tbf set up the way the CNI `bandwidth` plugin does it: on the
    /// host-side veth for ingress, on an ifb fed by the host-side veth's
    /// ingress (u32 + mirred) for egress; the latency is 25 ms.
    Tbf,
}

/// One benchmark case.
#[derive(Clone, Debug)]
pub struct RateCase {
    /// The configured rate, bits per second.
    pub rate_bps: u64,
    /// The bucket size in bytes (both limiters get the same).
    pub burst_bytes: u64,
    /// Which way.
    pub direction: Direction,
    /// TCP streams.
    pub streams: u32,
    /// The senders' congestion control.
    pub congestion: Congestion,
    /// Measured seconds.
    pub seconds: u32,
    /// Seconds of warm-up left out of the result.
    pub omit: u32,
}

impl RateCase {
    /// A case with the datapath's default burst for the direction, 5
    /// measured seconds after 1 of warm-up.
    pub fn new(rate_bps: u64, direction: Direction, streams: u32) -> Self {
        let dir = match direction {
            Direction::Egress => datapath_common::ratelimit::direction::EGRESS,
            Direction::Ingress => datapath_common::ratelimit::direction::INGRESS,
        };
        Self {
            rate_bps,
            burst_bytes: datapath_common::ratelimit::default_burst(dir, rate_bps),
            direction,
            streams,
            congestion: Congestion::Bbr,
            seconds: 5,
            omit: 1,
        }
    }

    /// The same case with senders using `congestion`.
    pub fn with_congestion(mut self, congestion: Congestion) -> Self {
        self.congestion = congestion;
        self
    }
}

/// The result of one case with one limiter.
#[derive(Clone, Debug)]
pub struct RateMeasurement {
    /// The limiter.
    pub limiter: Limiter,
    /// The case.
    pub case: RateCase,
    /// Goodput the receiver measured, bits per second.
    pub achieved_bps: f64,
    /// `achieved_bps / rate_bps`.
    pub ratio: f64,
    /// TCP retransmissions of the sender.
    pub retransmits: u64,
    /// The segments the receiver reported as received twice (D-SACK) over
    /// the whole transfer, warm-up included: retransmissions of segments
    /// that were not lost, only late (the sender's namespace's
    /// `TCPDSACKRecvSegs`; `None` if unreadable).
    pub spurious: Option<u64>,
    /// The sender's rate per second, bits per second.
    pub per_second_bps: Vec<f64>,
}

/// The `TcpExt` counter `name` of namespace `ns` (`/proc/net/netstat`).
pub fn tcp_ext_counter(ns: &Netns, name: &str) -> Option<u64> {
    let out = ns.exec("cat", ["/proc/net/netstat"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// The container's address in the tbf topology (its own pool).
const TBF_CTR: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 2);
/// The host side of the tbf topology's container link.
const TBF_GW: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 1);
/// iperf3's port.
const PORT: u16 = 5201;
/// The echo server's port of the request/response measurement.
const RR_PORT: u16 = 5202;
/// The pause between two request/response transactions under load: 500
/// per second at most, light next to the bulk transfer (their bytes are a
/// few percent of 10 Mbit/s).
const RR_GAP: Duration = Duration::from_millis(2);
/// The published port of the datapath topology for [`PORT`]; the next one
/// is [`RR_PORT`]'s.
const PUBLISHED: u16 = 18080;

/// The port the datapath topology publishes container port `port` on.
const fn published(port: u16) -> u16 {
    PUBLISHED + (port - PORT)
}

/// Where the client reaches container port `port` with `limiter`: a
/// published port of the node, or the routed container itself.
fn container_addr(node: &Node, limiter: Limiter, port: u16) -> SocketAddr {
    match limiter {
        Limiter::Datapath => SocketAddr::from((node.node_addr(), published(port))),
        Limiter::Tbf => SocketAddr::from((TBF_CTR, port)),
    }
}

/// Connects container `ctr` (in cgroup `cg`) to `node` and limits it as
/// `case` says with `limiter`, making container ports `ports` reachable
/// from the client. Returns the agent (datapath) for the caller to keep.
fn set_up<'n>(
    node: &'n Node,
    ctr: &Netns,
    cg: &Cgroup,
    case: &RateCase,
    limiter: Limiter,
    ports: &[u16],
) -> Result<Option<Agent<'n>>, BenchError> {
    match limiter {
        Limiter::Datapath => {
            let agent = Agent::start(node);
            let rate = case.rate_bps.to_string();
            let burst = format!("{}b", case.burst_bytes);
            let (rate_flag, burst_flag) = match case.direction {
                Direction::Egress => ("--egress-rate", "--egress-burst"),
                Direction::Ingress => ("--ingress-rate", "--ingress-burst"),
            };
            let cgroup = cg.path().to_string_lossy().into_owned();
            let publish: Vec<String> = ports
                .iter()
                .map(|p| format!("{}:{p}", published(*p)))
                .collect();
            let mut args = vec!["container", "add", "rb", "--netns", ctr.name()];
            for p in &publish {
                args.extend(["--publish", p.as_str()]);
            }
            args.extend(["--cgroup", &cgroup, rate_flag, &rate, burst_flag, &burst]);
            let out = agent.cli(&args);
            if !out.status.success() {
                return Err(tool(
                    "datapath container add",
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ));
            }
            Ok(Some(agent))
        }
        Limiter::Tbf => {
            routed_container(node, ctr)?;
            cni_bandwidth(node, case)?;
            Ok(None)
        }
    }
}

/// iperf3's options for `case`.
fn iperf3_options(case: &RateCase) -> Iperf3Options {
    Iperf3Options {
        seconds: case.seconds,
        omit: case.omit,
        streams: case.streams,
        interval: 1.0,
        congestion: Some(case.congestion),
    }
}

/// Measures `case` with `limiter` on a fresh node: a client, a node and a
/// container (in a cgroup of its own) sending to or receiving from the
/// client. Takes about `seconds + omit + 2` seconds.
pub fn measure(case: &RateCase, limiter: Limiter) -> Result<RateMeasurement, BenchError> {
    let node = Node::new();
    let ctr = node.add_container_netns("rb");
    let cg = Cgroup::new();
    let _agent = set_up(&node, &ctr, &cg, case, limiter, &[PORT])?;
    let opts = iperf3_options(case);
    let sender = match case.direction {
        Direction::Egress => &ctr,
        Direction::Ingress => &node.client,
    };
    let report = match case.direction {
        Direction::Egress => {
            let _server = Iperf3Server::start(&node.client, None, node.client_addr(), PORT)?;
            iperf3(
                &ctr,
                Some(&cg),
                SocketAddr::from((node.client_addr(), PORT)),
                &opts,
            )?
        }
        Direction::Ingress => {
            let _server = Iperf3Server::start(&ctr, Some(&cg), Ipv4Addr::UNSPECIFIED, PORT)?;
            iperf3(
                &node.client,
                None,
                container_addr(&node, limiter, PORT),
                &opts,
            )?
        }
    };
    Ok(RateMeasurement {
        limiter,
        case: case.clone(),
        achieved_bps: report.received_bps,
        ratio: report.received_bps / case.rate_bps as f64,
        retransmits: report.retransmits,
        // A fresh namespace: its counters are this transfer's.
        spurious: tcp_ext_counter(sender, "TCPDSACKRecvSegs"),
        per_second_bps: report.intervals,
    })
}

/// Request/response latency into a limited container while a bulk
/// transfer fills its ingress limit.
#[derive(Clone, Debug)]
pub struct RrUnderLoad {
    /// The limiter.
    pub limiter: Limiter,
    /// The bulk transfer's case (ingress).
    pub case: RateCase,
    /// Round-trip times of the one-byte transactions, microseconds.
    pub latencies_us: Vec<f64>,
    /// The bulk transfer's achieved / configured rate.
    pub bulk_ratio: f64,
    /// The bulk senders' retransmissions.
    pub bulk_retransmits: u64,
}

/// A `socat` echo server on `port` in `ns` (and `cgroup`), killed on drop.
struct EchoServer {
    child: Child,
}

impl EchoServer {
    /// Starts it and waits (up to 5 s) until it listens.
    fn start(ns: &Netns, cgroup: &Cgroup, port: u16) -> Result<Self, BenchError> {
        let mut cmd = Command::new("socat");
        // A pipe read back into the connection: an echo.
        cmd.arg(format!("TCP4-LISTEN:{port},reuseaddr,nodelay"))
            .arg("PIPE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cgroup.enter(&mut cmd);
        let child = ns.enter(&mut cmd).spawn().map_err(|e| {
            tool(
                format!("start socat in {}", ns.name()),
                format!("{e} (is socat installed?)"),
            )
        })?;
        let server = Self { child };
        wait_listening(ns, port, "socat")?;
        Ok(server)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to 5 s) until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &Netns, port: u16, what: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!("sport = :{port}");
    loop {
        let out = ns.exec("ss", ["-Hltn", filter.as_str()]);
        if out.status.success() && !out.stdout.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(tool(
                format!("{what} on port {port} in {}", ns.name()),
                "not listening after 5 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Measures one-byte request/response transactions (one every
/// [`RR_GAP`]) from the client into the container while `case` (an
/// ingress case) runs a bulk transfer through the same limit: the requests
/// share the bucket (or tbf's queue) with the bulk traffic. The
/// transactions start a second after the warm-up and run until a second
/// before the transfer ends.
pub fn measure_rr_under_load(case: &RateCase, limiter: Limiter) -> Result<RrUnderLoad, BenchError> {
    let node = Node::new();
    let ctr = node.add_container_netns("rb");
    let cg = Cgroup::new();
    let _agent = set_up(&node, &ctr, &cg, case, limiter, &[PORT, RR_PORT])?;
    let _server = Iperf3Server::start(&ctr, Some(&cg), Ipv4Addr::UNSPECIFIED, PORT)?;
    let _echo = EchoServer::start(&ctr, &cg, RR_PORT)?;
    let bulk = Iperf3Client::spawn(
        &node.client,
        None,
        container_addr(&node, limiter, PORT),
        &iperf3_options(case),
    )?;
    std::thread::sleep(Duration::from_secs(u64::from(case.omit) + 1));
    let SocketAddr::V4(target) = container_addr(&node, limiter, RR_PORT) else {
        return Err(tool("request/response", "an IPv4 target"));
    };
    let seconds = u64::from(case.seconds.saturating_sub(2).max(1));
    let rr =
        crate::bench::rr::run_paced(&node.client, target, Duration::from_secs(seconds), RR_GAP)
            .map_err(|e| tool(format!("request/response with {target}"), format!("{e:#}")))?;
    let report = bulk.wait()?;
    Ok(RrUnderLoad {
        limiter,
        case: case.clone(),
        latencies_us: rr.latencies_us,
        bulk_ratio: report.received_bps / case.rate_bps as f64,
        bulk_retransmits: report.retransmits,
    })
}

/// Measures `case` with the datapath, then with tbf.
pub fn compare(case: &RateCase) -> Result<[RateMeasurement; 2], BenchError> {
    Ok([
        measure(case, Limiter::Datapath)?,
        measure(case, Limiter::Tbf)?,
    ])
}

/// Runs `program args` in `ns`, failing with its stderr.
fn run(ns: &Netns, program: &str, args: &[&str]) -> Result<(), BenchError> {
    let out = ns.exec(program, args);
    if out.status.success() {
        Ok(())
    } else {
        Err(tool(
            format!("{program} {} in {}", args.join(" "), ns.name()),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// The host-side veth of the tbf topology (in the node's namespace).
const TBF_HOST_IF: &str = "rbhost";
/// The ifb of the tbf topology's egress shaping.
const TBF_IFB: &str = "rbifb";

/// Connects `ctr` to the node with a plain routed veth pair (no agent): the
/// container is `TBF_CTR`, the node forwards, the client routes the pool
/// through the node.
fn routed_container(node: &Node, ctr: &Netns) -> Result<(), BenchError> {
    node.node
        .add_veth(TBF_HOST_IF, "eth0", ctr)
        .map_err(|e| tool("a routed container", e))?;
    let gw = format!("{TBF_GW}/24");
    let addr = format!("{TBF_CTR}/24");
    run(&node.node, "ip", &["addr", "add", &gw, "dev", TBF_HOST_IF])?;
    run(&node.node, "ip", &["link", "set", TBF_HOST_IF, "up"])?;
    run(ctr, "ip", &["addr", "add", &addr, "dev", "eth0"])?;
    run(ctr, "ip", &["link", "set", "eth0", "up"])?;
    run(
        ctr,
        "ip",
        &["route", "add", "default", "via", &TBF_GW.to_string()],
    )?;
    run(&node.node, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    let node_addr = node.node_addr().to_string();
    run(
        &node.client,
        "ip",
        &["route", "add", "198.19.250.0/24", "via", &node_addr],
    )
}

/// tc as the CNI `bandwidth` plugin sets it up: `tbf rate R burst B latency
/// 25ms` on the host-side veth (ingress), or on an ifb that a u32 filter
/// with `mirred egress redirect` feeds from the host-side veth's ingress
/// qdisc (egress).
fn cni_bandwidth(node: &Node, case: &RateCase) -> Result<(), BenchError> {
    let rate = format!("{}bit", case.rate_bps);
    let burst = format!("{}b", case.burst_bytes);
    let tbf = |dev: &str| {
        run(
            &node.node,
            "tc",
            &[
                "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", &rate, "burst",
                &burst, "latency", "25ms",
            ],
        )
    };
    match case.direction {
        Direction::Ingress => tbf(TBF_HOST_IF),
        Direction::Egress => {
            run(&node.node, "ip", &["link", "add", TBF_IFB, "type", "ifb"])?;
            run(&node.node, "ip", &["link", "set", TBF_IFB, "up"])?;
            run(
                &node.node,
                "tc",
                &[
                    "qdisc",
                    "add",
                    "dev",
                    TBF_HOST_IF,
                    "handle",
                    "ffff:",
                    "ingress",
                ],
            )?;
            run(
                &node.node,
                "tc",
                &[
                    "filter",
                    "add",
                    "dev",
                    TBF_HOST_IF,
                    "parent",
                    "ffff:",
                    "protocol",
                    "all",
                    "prio",
                    "1",
                    "u32",
                    "match",
                    "u32",
                    "0",
                    "0",
                    "flowid",
                    "1:1",
                    "action",
                    "mirred",
                    "egress",
                    "redirect",
                    "dev",
                    TBF_IFB,
                ],
            )?;
            tbf(TBF_IFB)
        }
    }
}
