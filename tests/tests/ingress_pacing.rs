//! Ingress limits paced from the receiver (issue 18): iperf3 receivers in
//! a limited container's cgroup, real Linux senders (BBR and Reno) on the
//! client, a published port in between.
//!
//! Policing alone drops whole flights: thousands of retransmissions over a
//! few seconds. The receive windows the sock_ops program chooses keep the
//! senders inside the bucket, so the policer drops nothing; what little the
//! senders retransmit is the test bed reordering packets between its CPUs.
//! Rates must lie within [`PACED_BAND`]; every test that measures takes the
//! traffic lock once set up (and is in the `traffic` group of
//! .config/nextest.toml).

use std::{net::Ipv4Addr, process::Command, time::Duration};

use datapath_tests::{
    agent::Agent,
    cgroup::Cgroup,
    fixture::Deployment,
    inspect,
    lock::TrafficLock,
    node::Node,
    ratebench::{
        Congestion, Goodput, Iperf3Client, Iperf3Options, Iperf3Report, Iperf3Server, assert_rate,
        assert_report, mbit, receive_in, receiver_goodput, tcp_received,
    },
    wait,
};
use serde_json::Value;

const MBIT: f64 = 1e6;
/// iperf3's port in the container.
const PORT: u16 = 5201;
/// The published port it is reached through.
const PUBLISHED: u16 = 18080;

/// Retransmissions a paced transfer of a few seconds stays below: a
/// reordering on the test bed costs one spurious retransmission of a
/// 64 KiB segment (45 of them) at most; policing alone costs thousands
/// (2,000-6,000 for one BBR sender at 20 Mbit/s over 4 s).
const FEW_RETRANSMITS: u64 = 100;

/// The band paced ingress lands in, as a fraction of the limit, over 3 s
/// after 2 s of warm-up ([`Iperf3Options::measured_ingress`]): measured
/// here 0.97-0.98 at 20 Mbit/s with one BBR or four Reno senders, and at 10
/// and 50 Mbit/s with one BBR sender, 3 runs each at a load average of 9-12
/// (after only 1 s of warm-up, 1.04-1.05: the rest of the initial bucket).
/// The benchmark's rate section measures ±5% over 5 s.
const PACED_BAND: (f64, f64) = (0.9, 1.1);

/// How many times faster than its limited rate a flow must run once its
/// limit is gone: even on a loaded machine an unlimited flow through a
/// namespace node does gigabits.
const UNLIMITED_FACTOR: f64 = 5.0;

/// A container `web` with iperf3's port published, in a cgroup of its own
/// (which outlives the agent: it is dropped last), limited by `args`.
struct Limited<'n> {
    web: Deployment<'n>,
    cg: Cgroup,
}

impl<'n> Limited<'n> {
    fn new(node: &'n Node, args: &[&str]) -> Self {
        let cg = Cgroup::new();
        let cgroup = cg.path().to_string_lossy().into_owned();
        let publish = format!("{PUBLISHED}:{PORT}");
        let mut all = vec!["--cgroup", cgroup.as_str(), "--publish", publish.as_str()];
        all.extend_from_slice(args);
        Self {
            web: Deployment::start(node, "web", &all),
            cg,
        }
    }

    fn node(&self) -> &'n Node {
        self.web.node()
    }

    fn agent(&self) -> &Agent<'n> {
        &self.web.agent
    }

    /// iperf3 from the client to a server in the container's cgroup.
    fn receive(&self, opts: &Iperf3Options) -> Iperf3Report {
        let target = (Ipv4Addr::UNSPECIFIED, self.node().node_port(PUBLISHED));
        receive_in(self.node(), &self.web.ctr, Some(&self.cg), target, opts)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// An iperf3 server in the container's cgroup, for one test.
    fn server(&self) -> Iperf3Server {
        Iperf3Server::start(&self.web.ctr, Some(&self.cg), Ipv4Addr::UNSPECIFIED, PORT)
            .unwrap_or_else(|e| panic!("iperf3 server in the container: {e}"))
    }

    /// Starts an iperf3 sender on the client towards the published port.
    fn send(&self, opts: &Iperf3Options) -> Iperf3Client {
        Iperf3Client::spawn(
            &self.node().client,
            None,
            self.node().node_port(PUBLISHED),
            opts,
        )
        .unwrap_or_else(|e| panic!("iperf3 sender: {e}"))
    }

    /// `container update web ARGS`, which must succeed.
    fn update(&self, args: &[&str]) {
        let mut all = vec!["container", "update", "web"];
        all.extend_from_slice(args);
        self.agent().cli_ok(&all);
    }

    /// The container's ingress counters.
    fn ingress_counters(&self) -> Value {
        self.agent().container("web").expect("web is listed").json["counters"]["ingress"].clone()
    }

    /// The TCP sockets the agent's ingress bucket shares its windows
    /// among, if it has a bucket.
    fn tcp_flows(&self) -> Option<i64> {
        inspect::map_dump(self.agent(), "RATE_FLOWS")
            .iter()
            .find(|e| e["key"]["cgroup_id"] == self.cg.id())
            .and_then(|e| e["value"]["flows"].as_i64())
    }
}

/// The agent's rate limiter link pins.
fn rate_pins(agent: &Agent<'_>) -> Vec<String> {
    let mut pins: Vec<String> = std::fs::read_dir(agent.bpffs_dir().join("links"))
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

/// Asserts that the policer dropped nothing and that the senders of `r`
/// retransmitted fewer than [`FEW_RETRANSMITS`] segments.
#[track_caller]
fn assert_paced(what: &str, web: &Limited<'_>, r: &Iperf3Report) {
    let n = web.ingress_counters();
    assert!(
        n["passed_bytes"].as_u64().unwrap_or(0) > 5_000_000,
        "{what}: the bucket did not see the transfer: {n}"
    );
    assert_eq!(
        n["dropped_packets"], 0,
        "{what}: the policer dropped packets: {n}"
    );
    assert!(
        r.retransmits < FEW_RETRANSMITS,
        "{what}: the sender retransmitted {} segments; received per second {:?}",
        r.retransmits,
        r.received_intervals
            .iter()
            .map(|b| mbit(*b))
            .collect::<Vec<_>>()
    );
}

#[test]
fn an_ingress_only_limit_attaches_the_window_program_and_an_unlimited_cgroup_gets_nothing() {
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "20mbit"]);
    let host_if = &web.web.info.host_ifname;
    assert_eq!(
        rate_pins(web.agent()),
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
    web.agent().add(
        "free",
        &free,
        &["--cgroup", free_cg.path().to_str().expect("utf-8")],
    );
    assert_eq!(
        rate_pins(web.agent()).len(),
        2,
        "{:?}",
        rate_pins(web.agent())
    );
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(free_cg.path())
        .output()
        .expect("bpftool");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "programs on an unlimited cgroup:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(inspect::map_dump(web.agent(), "RATE_FLOWS").len(), 1);

    // Removing the limit takes the bucket and its flow count.
    web.update(&["--ingress-rate", "none"]);
    assert_eq!(web.tcp_flows(), None);
    assert_eq!(inspect::map_dump(web.agent(), "RATE_FLOWS").len(), 0);
}

#[test]
fn a_bbr_sender_into_a_limited_cgroup_is_paced_by_the_receiver_without_drops() {
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "20mbit"]);
    // Set up before, measured under, the traffic lock.
    let _lock = TrafficLock::acquire();
    let r = web.receive(&Iperf3Options {
        congestion: Some(Congestion::Bbr),
        ..Iperf3Options::measured_ingress()
    });
    assert_report("one BBR sender", &r, 20.0 * MBIT, PACED_BAND);
    assert_paced("one BBR sender", &web, &r);
}

#[test]
fn four_reno_senders_share_the_windows_of_a_limited_cgroup_without_drops() {
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "20mbit"]);
    let _server = web.server();
    // Set up before, measured under, the traffic lock.
    let _lock = TrafficLock::acquire();
    let flow = web.send(&Iperf3Options {
        streams: 4,
        congestion: Some(Congestion::Reno),
        ..Iperf3Options::measured_ingress()
    });
    // Four data connections and iperf3's control connection share the
    // windows once they are all established.
    let counted = wait::for_some(Duration::from_secs(5), || {
        web.tcp_flows().filter(|n| *n == 5)
    });
    assert_eq!(
        counted,
        Some(5),
        "TCP sockets counted in the ingress bucket: {:?}",
        web.tcp_flows()
    );
    let r = flow.wait().unwrap_or_else(|e| panic!("{e}"));
    assert_report("four Reno senders", &r, 20.0 * MBIT, PACED_BAND);
    assert_paced("four Reno senders", &web, &r);
    // Closed connections are counted out.
    wait::until(
        "the closed connections are counted out",
        Duration::from_secs(5),
        || web.tcp_flows() == Some(0),
    );
}

/// How long a change is given to take hold before the new rate is
/// measured.
const TAKE_HOLD: Duration = Duration::from_secs(1);
/// Each phase's measurement window.
const WINDOW: Duration = Duration::from_secs(2);

/// The goodput of the one long flow to [`PORT`] in `web`'s container over
/// [`WINDOW`], measured [`TAKE_HOLD`] after now; it must be the connection
/// `peer` (the same flow throughout) once one was measured.
#[track_caller]
fn phase(web: &Limited<'_>, peer: Option<&str>) -> Goodput {
    std::thread::sleep(TAKE_HOLD);
    let g = receiver_goodput(&web.web.ctr, PORT, WINDOW).expect("the flow is established");
    if let Some(peer) = peer {
        assert_eq!(g.peer, peer, "the same flow throughout");
    }
    g
}

#[test]
fn an_ingress_update_and_removal_apply_to_the_windows_of_a_running_flow() {
    let node = Node::new();
    let web = Limited::new(&node, &["--ingress-rate", "10mbit"]);
    let _server = web.server();
    // Set up before, measured under, the traffic lock.
    let _lock = TrafficLock::acquire();
    let flow = web.send(&Iperf3Options {
        seconds: 60,
        congestion: Some(Congestion::Bbr),
        ..Default::default()
    });
    wait::until("the flow started", Duration::from_secs(10), || {
        tcp_received(&web.web.ctr, PORT).iter().any(|c| c.bytes > 0)
    });
    let at10 = phase(&web, None);
    web.update(&["--ingress-rate", "40mbit"]);
    let at40 = phase(&web, Some(&at10.peer));
    let paced = web.ingress_counters();
    // Without the limit, the window clamp of the running flow is lifted.
    web.update(&["--ingress-rate", "none"]);
    let free = phase(&web, Some(&at10.peer));
    drop(flow);
    assert_rate("at 10mbit", at10.bps, 10.0 * MBIT, PACED_BAND, "");
    assert_rate("updated to 40mbit", at40.bps, 40.0 * MBIT, PACED_BAND, "");
    assert_eq!(
        paced["dropped_packets"], 0,
        "the policer dropped packets before or after the update: {paced}"
    );
    assert!(
        free.bps > UNLIMITED_FACTOR * at40.bps,
        "without its limit the flow ran at {}, at 40mbit at {}",
        mbit(free.bps),
        mbit(at40.bps)
    );
}
