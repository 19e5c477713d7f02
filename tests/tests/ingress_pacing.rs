//! Ingress limits paced from the receiver (issue 18): iperf3 receivers in
//! a limited container's cgroup, real Linux senders (BBR and Reno) on the
//! client, published ports in between.
//!
//! Policing alone drops whole flights: thousands of retransmissions over a
//! few seconds. The receive windows the sock_ops program chooses keep the
//! senders inside the bucket, so the policer drops nothing; what little the
//! senders retransmit is the test bed reordering packets between its CPUs.
//! Rates are checked in a band of ±10% (the benchmark measures ±5%); every
//! test that measures takes the traffic lock.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use datapath_tests::{
    agent::Agent,
    cgroup::Cgroup,
    inspect,
    lock::TrafficLock,
    netns::Netns,
    node::Node,
    ratebench::{Congestion, Iperf3Client, Iperf3Options, Iperf3Report, Iperf3Server},
};
use serde_json::Value;

const MBIT: f64 = 1e6;
/// iperf3's port in the container.
const PORT: u16 = 5201;
/// The published port it is reached through.
const PUBLISHED: u16 = 18080;
/// Retransmissions a paced transfer of a few seconds stays below: a
/// reordering on the test bed costs one spurious retransmission of a
/// 64 KiB segment (45 of them) at most; policing alone costs thousands.
const FEW_RETRANSMITS: u64 = 100;

/// A node with an agent and a container `web` in its own cgroup, with
/// iperf3's port published.
struct Limited<'n> {
    node: &'n Node,
    agent: Agent<'n>,
    ctr: Netns,
    cg: Cgroup,
}

impl<'n> Limited<'n> {
    /// `container add web … ARGS`.
    fn new(node: &'n Node, args: &[&str]) -> Self {
        let ctr = node.add_container_netns("web");
        let agent = Agent::start(node);
        let cg = Cgroup::new();
        let cgroup = cg.path().to_string_lossy().into_owned();
        let publish = format!("{PUBLISHED}:{PORT}");
        let mut all = vec![
            "container",
            "add",
            "web",
            "--netns",
            ctr.name(),
            "--cgroup",
            &cgroup,
            "--publish",
            &publish,
        ];
        all.extend_from_slice(args);
        agent.cli_ok(all);
        Self {
            node,
            agent,
            ctr,
            cg,
        }
    }

    /// An iperf3 server in the container's cgroup, for one test.
    fn server(&self) -> Iperf3Server {
        Iperf3Server::start(&self.ctr, Some(&self.cg), Ipv4Addr::UNSPECIFIED, PORT)
            .unwrap_or_else(|e| panic!("iperf3 server in the container: {e}"))
    }

    /// Starts an iperf3 sender on the client towards the published port.
    fn send(&self, opts: &Iperf3Options) -> Iperf3Client {
        let target = SocketAddr::from((self.node.node_addr(), PUBLISHED));
        Iperf3Client::spawn(&self.node.client, None, target, opts)
            .unwrap_or_else(|e| panic!("iperf3 sender: {e}"))
    }

    /// `container update web ARGS`, which must succeed.
    fn update(&self, args: &[&str]) {
        let mut all = vec!["container", "update", "web"];
        all.extend_from_slice(args);
        self.agent.cli_ok(all);
    }

    /// The container's ingress counters.
    fn ingress_counters(&self) -> Value {
        self.agent
            .cli_json(["container", "list", "--json"])
            .as_array()
            .and_then(|all| all.iter().find(|c| c["name"] == "web").cloned())
            .expect("web is listed")["counters"]["ingress"]
            .clone()
    }

    /// The TCP sockets the agent's ingress bucket shares its windows
    /// among, if it has a bucket.
    fn tcp_flows(&self) -> Option<i64> {
        inspect::map_dump(&self.agent, "RATE_FLOWS")
            .iter()
            .find(|e| e["key"]["cgroup_id"] == self.cg.id())
            .and_then(|e| e["value"]["flows"].as_i64())
    }

    /// The agent's rate limiter link pins.
    fn rate_pins(&self) -> Vec<String> {
        let mut pins: Vec<String> = std::fs::read_dir(self.agent.bpffs_dir().join("links"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("rate_"))
                    .collect()
            })
            .unwrap_or_default();
        pins.sort();
        pins
    }
}

fn mbit(bps: f64) -> String {
    format!("{:.1} Mbit/s", bps / MBIT)
}

fn per_second(bps: &[f64]) -> Vec<String> {
    bps.iter().map(|b| mbit(*b)).collect()
}

/// Asserts what the receiver got is within `lo`..`hi` times `limit_bps`.
#[track_caller]
fn assert_rate(what: &str, bps: f64, limit_bps: f64, (lo, hi): (f64, f64), r: &Iperf3Report) {
    assert!(
        bps >= lo * limit_bps && bps <= hi * limit_bps,
        "{what}: {} is not within {lo}x-{hi}x of {}; received per second {:?}",
        mbit(bps),
        mbit(limit_bps),
        per_second(&r.received_intervals)
    );
}

/// The band a whole transfer lands in.
const BAND: (f64, f64) = (0.9, 1.1);
/// The band one second of a transfer lands in (a closed window stops a
/// sender for 200 ms at a time on this short path).
const SECOND_BAND: (f64, f64) = (0.5, 1.5);

#[test]
fn an_ingress_only_limit_attaches_the_window_program_and_an_unlimited_cgroup_gets_nothing() {
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "20mbit"]);
    let host_if = web
        .agent
        .cli_json(["container", "list", "--json"])
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == "web").cloned())
        .and_then(|c| c["host_ifname"].as_str().map(str::to_owned))
        .expect("web's host-side veth");
    assert_eq!(
        web.rate_pins(),
        [
            format!("rate_cgroup-ingress_{host_if}"),
            format!("rate_cgroup-sock-ops_{host_if}"),
        ],
        "an ingress limit needs the sock_ops program for its windows"
    );
    assert_eq!(web.tcp_flows(), Some(0), "no TCP socket yet");

    // A container without limits: no program, no bucket, no flow count.
    let free = node.add_container_netns("free");
    let free_cg = Cgroup::new();
    web.agent.cli_ok([
        "container",
        "add",
        "free",
        "--netns",
        free.name(),
        "--cgroup",
        free_cg.path().to_str().expect("utf-8"),
    ]);
    assert_eq!(web.rate_pins().len(), 2, "{:?}", web.rate_pins());
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(free_cg.path())
        .output()
        .expect("bpftool");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "programs on an unlimited cgroup:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(inspect::map_dump(&web.agent, "RATE_FLOWS").len(), 1);

    // Removing the limit takes the bucket and its flow count.
    web.update(&["--ingress-rate", "none"]);
    assert_eq!(web.tcp_flows(), None);
    assert_eq!(inspect::map_dump(&web.agent, "RATE_FLOWS").len(), 0);
}

#[test]
fn a_bbr_sender_into_a_limited_cgroup_is_paced_by_the_receiver_without_drops() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "20mbit"]);
    let _server = web.server();
    let r = web
        .send(&Iperf3Options {
            seconds: 3,
            omit: 1,
            congestion: Some(Congestion::Bbr),
            ..Default::default()
        })
        .wait()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_rate("one BBR sender", r.received_bps, 20.0 * MBIT, BAND, &r);
    let n = web.ingress_counters();
    assert_eq!(n["dropped_packets"], 0, "the policer dropped packets: {n}");
    assert!(
        n["passed_bytes"].as_u64().unwrap_or(0) > 5_000_000,
        "the bucket saw the transfer: {n}"
    );
    assert!(
        r.retransmits < FEW_RETRANSMITS,
        "the sender retransmitted {} segments; per second {:?}",
        r.retransmits,
        per_second(&r.received_intervals)
    );
}

#[test]
fn four_reno_senders_share_the_windows_of_a_limited_cgroup_without_drops() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "20mbit"]);
    let _server = web.server();
    let flow = web.send(&Iperf3Options {
        seconds: 3,
        omit: 1,
        streams: 4,
        congestion: Some(Congestion::Reno),
        ..Default::default()
    });
    // Four data connections and iperf3's control connection share the
    // windows once they are all established.
    let mut flows = None;
    for _ in 0..100 {
        flows = web.tcp_flows();
        if flows == Some(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(flows, Some(5), "TCP sockets counted in the ingress bucket");
    let r = flow.wait().unwrap_or_else(|e| panic!("{e}"));
    assert_rate("four Reno senders", r.received_bps, 20.0 * MBIT, BAND, &r);
    let n = web.ingress_counters();
    assert_eq!(n["dropped_packets"], 0, "the policer dropped packets: {n}");
    assert!(
        r.retransmits < FEW_RETRANSMITS,
        "the senders retransmitted {} segments",
        r.retransmits
    );
    // Closed connections are counted out.
    let mut flows = web.tcp_flows();
    for _ in 0..100 {
        if flows == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        flows = web.tcp_flows();
    }
    assert_eq!(flows, Some(0), "TCP sockets left in the count");
}

#[test]
fn an_ingress_update_and_removal_apply_to_a_running_flow() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "10mbit"]);
    let _server = web.server();
    let flow = web.send(&Iperf3Options {
        seconds: 6,
        congestion: Some(Congestion::Bbr),
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(2_000));
    web.update(&["--ingress-rate", "40mbit"]);
    std::thread::sleep(Duration::from_millis(2_000));
    let paced = web.ingress_counters();
    web.update(&["--ingress-rate", "none"]);
    let r = flow
        .wait()
        .unwrap_or_else(|e| panic!("the flow did not survive the updates: {e}"));
    assert_eq!(
        paced["dropped_packets"], 0,
        "the policer dropped packets before and after the update: {paced}"
    );
    let received = &r.received_intervals;
    assert!(received.len() >= 6, "{received:?}");
    // Updated at ~2 s: the fourth second runs at the new rate.
    assert_rate(
        "second 1 at 10mbit",
        received[0],
        10.0 * MBIT,
        SECOND_BAND,
        &r,
    );
    assert_rate(
        "second 4 at 40mbit",
        received[3],
        40.0 * MBIT,
        SECOND_BAND,
        &r,
    );
    // Removed at ~4 s: the sixth second is not held by any window.
    assert!(
        received[5] > 200.0 * MBIT,
        "second 6 without a limit ran at {}; per second {:?}",
        mbit(received[5]),
        per_second(received)
    );
}
