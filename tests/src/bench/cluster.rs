//! The cluster section (`--only cluster`): pod to pod across two nodes on
//! one underlay switch, three ways side by side:
//!
//! * `route`: plain routing between the nodes (each routes the other's pod
//!   network via its underlay address, no encapsulation, no NAT): the
//!   limit of the path.
//! * `kernel-vxlan`: what flannel's VXLAN backend sets up: a kernel VXLAN
//!   device per node with a static FDB and neighbour entry per peer, a
//!   route per peer network, and iptables MASQUERADE of pod traffic
//!   leaving the cluster (so conntrack sees every packet).
//! * `datapath`: this datapath's cluster mode (etcd, an agent per node, the
//!   overlay driven from its programs).
//!
//! Measured from a pod on node 1 to a pod on node 2: bulk TCP, small-packet
//! UDP, request/response latency, new connections per second. For
//! `datapath` also the control plane: from `container add` on node 1 to
//! the first answer from a pod on node 3, and how long 100 simulated peers
//! registered in etcd take to reach an agent.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    agent::Agent,
    bench::{
        connrate::{self, ConnServer},
        iperf::{self, IperfServer},
        rr::{self, RrServer},
        stats::percentile,
    },
    cluster::{self, Etcd, Switch},
    netns::Netns,
    node::{Node, UPLINK},
    traffic::{Server, udp_request_within},
    wait,
};

/// iperf3's port in the server pod.
const IPERF_PORT: u16 = 5201;
/// The request/response server's port.
const RR_PORT: u16 = 7000;
/// The connection servers' first port; they listen on `CONN_PORTS` ports
/// from it.
const CONN_PORT: u16 = 7001;
/// How many ports the connection servers listen on. One pod address talks to
/// one pod address, so the client's TIME_WAIT entries would exhaust its
/// ephemeral ports towards a single server port within seconds and the figure
/// would measure the port search; rotating over this many destination ports
/// keeps every repetition of every mode far from that limit.
const CONN_PORTS: u16 = 32;
/// The echo port of the pods the control-plane figure adds.
const REACH_PORT: u16 = 7100;
/// The kernel VXLAN device's name (flannel's).
const KERNEL_VXLAN: &str = "flannel.1";
/// MTU of the pods' veths in the overlay modes.
const OVERLAY_MTU: &str = "1450";

/// How much the section measures.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Seconds of each iperf3 run.
    pub iperf_secs: u32,
    /// Length of each request/response and connection-rate run.
    pub window: Duration,
    /// Repetitions of each data-path figure.
    pub reps: usize,
    /// Containers added for the reachability figure.
    pub adds: usize,
    /// Simulated peers registered for the peers figure.
    pub peers: usize,
}

impl Plan {
    /// The full run.
    pub fn full() -> Self {
        Self {
            iperf_secs: 2,
            window: Duration::from_secs(2),
            reps: 3,
            adds: 20,
            peers: 100,
        }
    }

    /// The quick run.
    pub fn quick() -> Self {
        Self {
            iperf_secs: 1,
            window: Duration::from_millis(750),
            reps: 1,
            adds: 5,
            peers: 100,
        }
    }
}

/// One way of joining the nodes, with its figures (medians of the
/// repetitions).
#[derive(Clone, Debug, Default)]
pub struct ClusterRow {
    /// `route`, `kernel-vxlan` or `datapath`.
    pub mode: &'static str,
    /// Bulk TCP, Gbit/s.
    pub tcp_gbits: f64,
    /// Small-packet UDP received, packets/s.
    pub udp_pps: f64,
    /// Request/response latency, µs.
    pub rr_p50_us: f64,
    /// Request/response latency, µs.
    pub rr_p99_us: f64,
    /// New connections per second.
    pub conn_rate: f64,
}

/// The section's results.
#[derive(Clone, Debug, Default)]
pub struct ClusterResults {
    /// One row per mode.
    pub rows: Vec<ClusterRow>,
    /// From `container add` on node 1 to the first answer from node 3, ms.
    pub reach_ms: Vec<f64>,
    /// Simulated peers registered.
    pub peers: usize,
    /// From the last simulated peer's registration to all of them in the
    /// agent's view, ms.
    pub peers_ms: Option<f64>,
}

impl ClusterResults {
    /// The row of `mode`.
    pub fn row(&self, mode: &str) -> Option<&ClusterRow> {
        self.rows.iter().find(|r| r.mode == mode)
    }
}

/// Runs the section; `before` runs before each measurement.
pub fn run(
    plan: &Plan,
    mut before: impl FnMut() -> Result<()>,
    notes: &mut Vec<String>,
) -> Result<ClusterResults> {
    let mut out = ClusterResults::default();
    for mode in ["route", "kernel-vxlan"] {
        let bed = match manual(mode == "kernel-vxlan") {
            Ok(bed) => bed,
            Err(e) => {
                notes.push(format!("cluster {mode}: setup failed: {e:#}"));
                continue;
            }
        };
        match measure(
            mode,
            &bed.pods[0],
            &bed.pods[1],
            bed.addrs[1],
            plan,
            &mut before,
        ) {
            Ok(row) => out.rows.push(row),
            Err(e) => notes.push(format!("cluster {mode}: {e:#}")),
        }
    }
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let nodes: Vec<Node> = (1..=3).map(|n| switch.node(n)).collect();
    let agents: Vec<Agent<'_>> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| cluster::agent(n, &etcd, &format!("node{}", i + 1), &[]))
        .collect();
    let all_seen = agents
        .iter()
        .all(|a| wait::within(Duration::from_secs(20), || node_count(a) == nodes.len()));
    if !all_seen {
        bail!("the datapath's agents did not see each other within 20 s");
    }
    let pods: Vec<Netns> = nodes.iter().map(|n| n.add_container_netns("pod")).collect();
    let infos: Vec<_> = agents
        .iter()
        .zip(&pods)
        .map(|(a, p)| a.add("pod", p, &[]))
        .collect();
    match measure(
        "datapath",
        &pods[0],
        &pods[1],
        infos[1].addr,
        plan,
        &mut before,
    ) {
        Ok(row) => out.rows.push(row),
        Err(e) => notes.push(format!("cluster datapath: {e:#}")),
    }
    before()?;
    for k in 0..plan.adds {
        match reach(&nodes[0], &agents[0], &pods[2], k) {
            Ok(ms) => out.reach_ms.push(ms),
            Err(e) => {
                notes.push(format!("cluster reachability: {e:#}"));
                break;
            }
        }
    }
    before()?;
    match peers(&etcd, &agents[0], plan.peers, nodes.len()) {
        Ok(ms) => {
            out.peers = plan.peers;
            out.peers_ms = Some(ms);
        }
        Err(e) => notes.push(format!("cluster peers: {e:#}")),
    }
    Ok(out)
}

/// How many nodes `agent` lists.
fn node_count(agent: &Agent<'_>) -> usize {
    agent
        .cli_json(["node", "list", "--json"])
        .as_array()
        .map_or(0, Vec::len)
}

/// Two nodes joined by plain routes or a kernel VXLAN, a pod on each.
struct Manual {
    // Dropped last: the namespaces the nodes are plugged into.
    pods: Vec<Netns>,
    addrs: Vec<Ipv4Addr>,
    _nodes: Vec<Node>,
    _switch: Switch,
}

/// Builds the `route` or (`vxlan`) the `kernel-vxlan` bed.
fn manual(vxlan: bool) -> Result<Manual> {
    let switch = Switch::new();
    let nodes: Vec<Node> = (1..=2).map(|n| switch.node(n)).collect();
    let mut pods = Vec::new();
    let mut addrs = Vec::new();
    let mut vxlan_macs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let ns = &node.node;
        let gw = format!("198.19.{i}.1");
        let addr = Ipv4Addr::new(198, 19, u8::try_from(i).unwrap_or(0), 2);
        let pod = node.add_container_netns("pod");
        ns.exec_ok("sysctl", ["-qw", "net.ipv4.ip_forward=1"]);
        ns.add_veth("vpod", "eth0", &pod)
            .map_err(anyhow::Error::msg)?;
        ns.exec_ok("ip", ["addr", "add", &format!("{gw}/24"), "dev", "vpod"]);
        pod.exec_ok("ip", ["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        if vxlan {
            ns.exec_ok("ip", ["link", "set", "vpod", "mtu", OVERLAY_MTU]);
            pod.exec_ok("ip", ["link", "set", "eth0", "mtu", OVERLAY_MTU]);
        }
        ns.exec_ok("ip", ["link", "set", "vpod", "up"]);
        pod.exec_ok("ip", ["link", "set", "eth0", "up"]);
        pod.exec_ok("ip", ["route", "add", "default", "via", &gw]);
        if vxlan {
            let local = node.node_addr().to_string();
            ns.exec_ok(
                "ip",
                [
                    "link",
                    "add",
                    KERNEL_VXLAN,
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "dstport",
                    "4789",
                    "local",
                    &local,
                    "dev",
                    UPLINK,
                    "nolearning",
                ],
            );
            ns.exec_ok(
                "ip",
                ["link", "set", KERNEL_VXLAN, "mtu", OVERLAY_MTU, "up"],
            );
            ns.exec_ok(
                "ip",
                [
                    "addr",
                    "add",
                    &format!("198.19.{i}.0/32"),
                    "dev",
                    KERNEL_VXLAN,
                ],
            );
            ns.exec_ok(
                "iptables",
                [
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    "198.19.0.0/16",
                    "!",
                    "-d",
                    "198.19.0.0/16",
                    "-j",
                    "MASQUERADE",
                ],
            );
            vxlan_macs.push(crate::node::mac(ns, KERNEL_VXLAN));
        }
        pod.wait_link_up("eth0");
        pods.push(pod);
        addrs.push(addr);
    }
    for (i, node) in nodes.iter().enumerate() {
        let ns = &node.node;
        for (j, peer) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let cidr = format!("198.19.{j}.0/24");
            if vxlan {
                let mac = vxlan_macs[j]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
                let gw = format!("198.19.{j}.0");
                ns.exec_ok(
                    "ip",
                    [
                        "route",
                        "add",
                        &cidr,
                        "via",
                        &gw,
                        "dev",
                        KERNEL_VXLAN,
                        "onlink",
                    ],
                );
                ns.exec_ok(
                    "ip",
                    [
                        "neigh",
                        "replace",
                        &gw,
                        "lladdr",
                        &mac,
                        "dev",
                        KERNEL_VXLAN,
                        "nud",
                        "permanent",
                    ],
                );
                ns.exec_ok(
                    "bridge",
                    [
                        "fdb",
                        "append",
                        &mac,
                        "dev",
                        KERNEL_VXLAN,
                        "dst",
                        &peer.node_addr().to_string(),
                    ],
                );
            } else {
                ns.exec_ok(
                    "ip",
                    ["route", "add", &cidr, "via", &peer.node_addr().to_string()],
                );
            }
        }
    }
    if !pods[0].ping(addrs[1]) {
        bail!("pod 1 cannot reach pod 2");
    }
    Ok(Manual {
        pods,
        addrs,
        _nodes: nodes,
        _switch: switch,
    })
}

/// The data-path figures from `client` to the pod `server` at `addr`.
fn measure(
    mode: &'static str,
    client: &Netns,
    server: &Netns,
    addr: Ipv4Addr,
    plan: &Plan,
    before: &mut impl FnMut() -> Result<()>,
) -> Result<ClusterRow> {
    let _iperf = IperfServer::start(server, IPERF_PORT)?;
    let _rr = RrServer::start(server, RR_PORT)?;
    let _conn = (CONN_PORT..CONN_PORT + CONN_PORTS)
        .map(|port| ConnServer::start(server, port, 1))
        .collect::<Result<Vec<_>>>()?;
    let (mut tcp, mut udp, mut p50, mut p99, mut conn) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..plan.reps {
        before()?;
        let r = iperf::run(
            client,
            SocketAddrV4::new(addr, IPERF_PORT),
            iperf::Test::Tcp {
                streams: 1,
                reverse: false,
            },
            plan.iperf_secs,
        )?;
        tcp.push(r.gbits());
        before()?;
        let r = iperf::run(
            client,
            SocketAddrV4::new(addr, IPERF_PORT),
            iperf::Test::Udp { payload: 64 },
            plan.iperf_secs,
        )?;
        udp.push(r.received() as f64 / r.secs.max(f64::EPSILON));
        before()?;
        let r = rr::run(
            client,
            SocketAddrV4::new(addr, RR_PORT),
            plan.window,
            500_000,
        )?;
        p50.push(percentile(&r.latencies_us, 50.0));
        p99.push(percentile(&r.latencies_us, 99.0));
        before()?;
        let r = connrate::measure(
            client,
            &connrate::Plan {
                sources: vec![None],
                dests: (CONN_PORT..CONN_PORT + CONN_PORTS)
                    .map(|port| SocketAddrV4::new(addr, port))
                    .collect(),
                threads: 2,
                duration: plan.window,
                max: 500_000,
            },
        )?;
        conn.push(r.rate());
    }
    let median = |v: &[f64]| percentile(v, 50.0);
    let row = ClusterRow {
        mode,
        tcp_gbits: median(&tcp),
        udp_pps: median(&udp),
        rr_p50_us: median(&p50),
        rr_p99_us: median(&p99),
        conn_rate: median(&conn),
    };
    println!(
        "cluster     : {mode:<12} tcp {:.1} Gbit/s, udp {:.0}k pps, rr p50/p99 {:.0}/{:.0} µs, {:.1}k conn/s",
        row.tcp_gbits,
        row.udp_pps / 1000.0,
        row.rr_p50_us,
        row.rr_p99_us,
        row.conn_rate / 1000.0
    );
    Ok(row)
}

/// Adds pod `k` on node 1 (its echo server already listening) and times
/// until a pod on node 3 gets its first answer; deletes it again.
fn reach(node: &Node, agent: &Agent<'_>, from: &Netns, k: usize) -> Result<f64> {
    let ns = node.add_container_netns(&format!("r{k}"));
    let _echo = Server::udp_echo(&ns, REACH_PORT, "reach");
    let name = format!("reach{k}");
    let start = Instant::now();
    let info = agent.add(&name, &ns, &[]);
    let dst = SocketAddr::from((info.addr, REACH_PORT));
    let answered = wait::within(Duration::from_secs(5), || {
        udp_request_within(from, 0, dst, b"r", Duration::from_millis(5)).is_ok()
    });
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    agent.cli_ok(["container", "del", &name]);
    if !answered {
        bail!("{dst} did not answer node 3 within 5 s");
    }
    Ok(ms)
}

/// Registers `n` simulated peers in etcd and times from the last one to
/// `agent` listing all of them (`known` nodes before).
fn peers(etcd: &Etcd, agent: &Agent<'_>, n: usize, known: usize) -> Result<f64> {
    for k in 0..n {
        let record = format!(
            r#"{{"schema":1,"name":"sim{k}","underlay":"198.18.1.{}","cidr":"198.19.{}.0/24","overlay":{{"kind":"vxlan","port":4789,"vni":1}}}}"#,
            k % 250 + 1,
            100 + k % 150
        );
        etcd.put(&format!("/datapath/v1/nodes/sim{k}"), &record);
    }
    let start = Instant::now();
    let all = wait::within(Duration::from_secs(20), || {
        node_count(agent) >= known + n.min(150)
    });
    if !all {
        bail!("the agent did not list {n} simulated peers within 20 s");
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}
