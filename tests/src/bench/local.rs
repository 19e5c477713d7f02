//! The node's own connections to a published port on its loopback (issue
//! 15): new connections per second and request/response latency from a
//! process of the node to `127.0.0.1:PORT`, four ways in the same run,
//! taking turns:
//!
//! * `datapath`: this datapath's socket programs (the process in the
//!   agent's socket cgroup), which connect it straight to the container;
//! * `socat`: a userspace relay listening on the loopback (what Docker's
//!   `docker-proxy` does);
//! * `iptables`: a DNAT rule in nat OUTPUT with `route_localnet` and a
//!   MASQUERADE of the loopback source (Docker without the proxy);
//! * `direct`: a connection to the container's own address, the limit.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    agent::Agent,
    bench::{
        connrate::{self, ConnServer},
        rr::{self, RrServer},
        stats::{Summary, percentile},
    },
    netns::Netns,
    node::Node,
    sys, wait,
};

/// How much to measure.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// Whether to measure it at all.
    pub enabled: bool,
    /// Rounds (each way measured once per round, in turn).
    pub reps: usize,
    /// Length of each measurement.
    pub window: Duration,
    /// Client threads of the connection-rate measurement.
    pub threads: usize,
}

/// The ways compared, in report order.
pub const WAYS: [&str; 4] = ["datapath", "socat", "iptables", "direct"];

/// One way's samples.
#[derive(Clone, Debug, Default)]
pub struct LocalRow {
    /// Which way ([`WAYS`]).
    pub way: &'static str,
    /// New connections per second, one sample per round.
    pub conn_rate: Vec<f64>,
    /// p99 connect time per round, µs.
    pub connect_p99_us: Vec<f64>,
    /// Median round trip per round, µs.
    pub rr_p50_us: Vec<f64>,
    /// p99 round trip per round, µs.
    pub rr_p99_us: Vec<f64>,
}

/// Ports in the container: connections, request/response.
const CONN_PORT: u16 = 80;
const RR_PORT: u16 = 81;
/// Published ports (datapath), relay ports (socat), DNAT ports
/// (iptables), by [`CONN_PORT`] and [`RR_PORT`].
const PUBLISHED: (u16, u16) = (8080, 8081);
const RELAYED: (u16, u16) = (9080, 9081);
const DNATED: (u16, u16) = (9180, 9181);

/// A relay process; killed on drop.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Moves this whole process into cgroup directory `dir`.
fn move_to(dir: &std::path::Path) -> Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving the bench into {}", dir.display()))
}

/// This process's cgroup2 directory.
fn own_cgroup() -> Result<PathBuf> {
    let root = sys::cgroup2_root().context("no cgroup2 hierarchy")?;
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup2 line in /proc/self/cgroup")?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// Measures every way (see the module's documentation); progress to
/// stdout.
pub fn run(cfg: &LocalConfig) -> Result<Vec<LocalRow>> {
    let node = Node::new();
    let ctr = node.add_container_netns("local");
    let agent = Agent::builder(&node).pool("198.19.160.0/24").start();
    let _conn = ConnServer::start(&ctr, CONN_PORT, 2)?;
    let _rr = RrServer::start(&ctr, RR_PORT)?;
    let info = agent.add(
        "local",
        &ctr,
        &[
            "--publish",
            &format!("{}:{CONN_PORT}", PUBLISHED.0),
            "--publish",
            &format!("{}:{RR_PORT}", PUBLISHED.1),
        ],
    );
    let backend = info.addr;
    let ns = &node.node;
    // Connections closed by the client wait in TIME_WAIT on the node:
    // let every way reuse them (the default allows it on loopback only).
    ns.exec_ok("sysctl", ["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    // The relay.
    let mut relays = Vec::new();
    for (listen, port) in [(RELAYED.0, CONN_PORT), (RELAYED.1, RR_PORT)] {
        let mut cmd = Command::new("socat");
        cmd.arg(format!("TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr"))
            .arg(format!("TCP:{backend}:{port},nodelay"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        relays.push(Relay(ns.spawn(&mut cmd)));
        let at = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, listen));
        if !wait::within(Duration::from_secs(5), || {
            crate::traffic::tcp_connect(ns, at, Duration::from_secs(1)).is_ok()
        }) {
            bail!("socat does not listen on {at}");
        }
    }
    // iptables OUTPUT DNAT of the loopback, in the node's namespace only.
    ns.exec_ok("sysctl", ["-qw", "net.ipv4.conf.all.route_localnet=1"]);
    for (port, to) in [(DNATED.0, CONN_PORT), (DNATED.1, RR_PORT)] {
        ns.exec_ok(
            "iptables",
            [
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                "127.0.0.1/32",
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{backend}:{to}"),
            ],
        );
    }
    ns.exec_ok(
        "iptables",
        [
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "127.0.0.1/32",
            "-d",
            &format!("{backend}/32"),
            "-j",
            "MASQUERADE",
        ],
    );

    let home = own_cgroup()?;
    let lo = |port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let targets = [
        (lo(PUBLISHED.0), lo(PUBLISHED.1)),
        (lo(RELAYED.0), lo(RELAYED.1)),
        (lo(DNATED.0), lo(DNATED.1)),
        (
            SocketAddrV4::new(backend, CONN_PORT),
            SocketAddrV4::new(backend, RR_PORT),
        ),
    ];
    let mut rows: Vec<LocalRow> = WAYS
        .iter()
        .map(|w| LocalRow {
            way: w,
            ..LocalRow::default()
        })
        .collect();
    for round in 0..cfg.reps {
        for (row, (conn_to, rr_to)) in rows.iter_mut().zip(targets) {
            let ours = row.way == "datapath";
            if ours {
                move_to(agent.socket_cgroup().path())?;
            }
            let measured = measure(ns, cfg, conn_to, rr_to);
            if ours {
                move_to(&home)?;
            }
            let (conn, rr) = measured.with_context(|| format!("{} (round {round})", row.way))?;
            row.conn_rate.push(conn.rate());
            row.connect_p99_us.push(percentile(&conn.connect_us, 99.0));
            row.rr_p50_us.push(percentile(&rr.latencies_us, 50.0));
            row.rr_p99_us.push(percentile(&rr.latencies_us, 99.0));
            println!(
                "local       : {:<9} {:>8.0} conn/s, connect p99 {:>6.0} µs, RR p50 {:>5.1} µs p99 {:>5.1} µs",
                row.way,
                conn.rate(),
                percentile(&conn.connect_us, 99.0),
                percentile(&rr.latencies_us, 50.0),
                percentile(&rr.latencies_us, 99.0),
            );
        }
    }
    drop(relays);
    drop(agent);
    Ok(rows)
}

/// One connection-rate and one request/response measurement from `ns`.
fn measure(
    ns: &Netns,
    cfg: &LocalConfig,
    conn_to: SocketAddrV4,
    rr_to: SocketAddrV4,
) -> Result<(connrate::ConnResult, rr::RrResult)> {
    let conn = connrate::run(
        ns,
        &connrate::Plan {
            sources: vec![None],
            dests: vec![conn_to],
            threads: cfg.threads,
            duration: cfg.window,
            max: usize::MAX,
        },
    )?;
    let rr = rr::run(ns, rr_to, cfg.window, usize::MAX)?;
    Ok((conn, rr))
}

/// The median of `v`, if any.
fn median(v: &[f64]) -> Option<f64> {
    Summary::of(v).map(|s| s.median)
}

/// The section as Markdown: a table of medians and the targets.
pub fn markdown(rows: &[LocalRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "## The node to 127.0.0.1:published port\n\n\
         A process of the node connecting to a published port on the loopback: this \
         datapath's socket programs (connect straight to the container), a userspace relay \
         (socat, as docker-proxy), iptables nat OUTPUT DNAT with route_localnet, and a direct \
         connection to the container's address; taking turns in one run. Medians of the \
         rounds.\n\n\
         | way | new connections/s | connect p99 (µs) | RR p50 (µs) | RR p99 (µs) |\n\
         |---|---|---|---|---|\n",
    );
    let cell = |v: Option<f64>| v.map_or("—".to_owned(), |x| format!("{x:.1}"));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.way,
            cell(median(&r.conn_rate)),
            cell(median(&r.connect_p99_us)),
            cell(median(&r.rr_p50_us)),
            cell(median(&r.rr_p99_us)),
        );
    }
    out.push('\n');
    for line in targets(rows) {
        let _ = writeln!(out, "- {line}");
    }
    out.push('\n');
    out
}

/// The targets, one line each: ≥ 2× the relay's connection rate,
/// within 10 % of a direct connection.
pub fn targets(rows: &[LocalRow]) -> Vec<String> {
    let get = |way: &str, f: fn(&LocalRow) -> &Vec<f64>| {
        rows.iter()
            .find(|r| r.way == way)
            .and_then(|r| median(f(r)))
    };
    let mut lines = Vec::new();
    let ours = get("datapath", |r| &r.conn_rate);
    if let (Some(o), Some(s)) = (ours, get("socat", |r| &r.conn_rate)) {
        let ratio = o / s;
        let word = if ratio >= 2.0 { "met" } else { "MISSED" };
        lines.push(format!(
            "New connections/s ≥ 2× the userspace relay's: {word}: {ratio:.2}×"
        ));
    }
    if let (Some(o), Some(d)) = (ours, get("direct", |r| &r.conn_rate)) {
        let ratio = o / d;
        let word = if ratio >= 0.9 { "met" } else { "MISSED" };
        lines.push(format!(
            "New connections/s within 10 % of a direct connection: {word}: {ratio:.2}×"
        ));
    }
    if let (Some(o), Some(d)) = (
        get("datapath", |r| &r.rr_p50_us),
        get("direct", |r| &r.rr_p50_us),
    ) {
        let ratio = o / d;
        let word = if ratio <= 1.1 { "met" } else { "MISSED" };
        lines.push(format!(
            "RR latency (p50) within 10 % of a direct connection: {word}: {ratio:.2}×"
        ));
    }
    lines
}

/// The section as JSON.
pub fn json(rows: &[LocalRow]) -> Value {
    json!({
        "rows": rows.iter().map(|r| json!({
            "way": r.way,
            "conn_rate": r.conn_rate,
            "connect_p99_us": r.connect_p99_us,
            "rr_p50_us": r.rr_p50_us,
            "rr_p99_us": r.rr_p99_us,
        })).collect::<Vec<_>>(),
        "targets": targets(rows),
    })
}
