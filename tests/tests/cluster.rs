//! Cluster mode: nodes on one underlay switch, etcd in a namespace of its
//! own, an agent per node claiming its node CIDR, containers on every
//! node reaching each other through the VXLAN overlay without NAT.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use datapath_tests::{
    agent::{Agent, AgentBuilder},
    cluster::{self, CLUSTER_CIDR, Etcd, Switch},
    lock::TrafficLock,
    netns::Netns,
    ratebench::{Iperf3Client, Iperf3Options, Iperf3Server},
    traffic::{RrFlow, Server, line_exchange, udp_request},
    wait,
};
use serde_json::Value;

/// The attempts to reach the store after which an agent without
/// `--cluster-wait` gives up at start.
const START_ATTEMPTS: usize = 5;

/// How long the tests wait for a change to reach the other nodes.
const PROPAGATION: Duration = Duration::from_secs(20);

/// `datapath node list --json` of `agent`.
fn nodes(agent: &Agent<'_>) -> Vec<Value> {
    match agent.cli_json(["node", "list", "--json"]) {
        Value::Array(list) => list,
        other => panic!("node list: {other:#}"),
    }
}

/// The names of the nodes `agent` lists.
fn node_names(agent: &Agent<'_>) -> Vec<String> {
    nodes(agent)
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until `agent` lists exactly `names`.
#[track_caller]
fn wait_nodes(agent: &Agent<'_>, names: &[&str]) {
    let mut last = Vec::new();
    let ok = wait::within(PROPAGATION, || {
        last = node_names(agent);
        last == names
    });
    assert!(ok, "expected nodes {names:?}, listed {last:?}");
}

/// The node CIDR `agent` claimed (its pool, as `status` shows it).
fn node_cidr(agent: &Agent<'_>) -> String {
    agent.status()["pool"]
        .as_str()
        .unwrap_or_else(|| panic!("no pool in status"))
        .to_owned()
}

/// Pings `addr` from `ns` until one answer comes (the peers reach each
/// agent shortly after it starts).
#[track_caller]
fn wait_ping(ns: &Netns, addr: Ipv4Addr) {
    let ok = wait::within(PROPAGATION, || ns.ping(addr));
    assert!(ok, "{addr} does not answer pings from {}", ns.name());
}

/// The gateway (first host address) of node CIDR `cidr`.
fn gateway_of(cidr: &str) -> Ipv4Addr {
    let network: Ipv4Addr = cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a node CIDR: {cidr}"));
    Ipv4Addr::from(u32::from(network) + 1)
}

#[test]
fn pods_on_different_nodes_reach_each_other_with_their_own_addresses() {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let (n1, n2, n3) = (switch.node(1), switch.node(2), switch.node(3));
    let a1 = cluster::agent(&n1, &etcd, "n1", &[]);
    let a2 = cluster::agent(&n2, &etcd, "n2", &[]);
    let a3 = cluster::agent(&n3, &etcd, "n3", &[]);
    for a in [&a1, &a2, &a3] {
        wait_nodes(a, &["n1", "n2", "n3"]);
    }
    let cidrs = [node_cidr(&a1), node_cidr(&a2), node_cidr(&a3)];
    assert!(
        cidrs[0] != cidrs[1] && cidrs[1] != cidrs[2] && cidrs[0] != cidrs[2],
        "distinct node CIDRs: {cidrs:?}"
    );
    let (ca, cb, cc) = (
        n1.add_container_netns("a"),
        n2.add_container_netns("b"),
        n3.add_container_netns("c"),
    );
    let a = a1.add("a", &ca, &[]);
    let b = a2.add("b", &cb, &[]);
    let c = a3.add("c", &cc, &[]);

    // ICMP both ways.
    wait_ping(&ca, b.addr);
    wait_ping(&cc, a.addr);

    // TCP a → b: b sees a's own address.
    let tcp = Server::line_echo(&cb, 7000, "b");
    let answer = line_exchange(&ca, SocketAddr::from((b.addr, 7000)), "hello")
        .unwrap_or_else(|e| panic!("TCP a → b: {e}"));
    assert_eq!(answer, "b: hello");
    let peers = tcp.wait_peers(1, Duration::from_secs(5));
    assert_eq!(peers[0].ip(), &a.addr, "b saw a's address: {peers:?}");

    // UDP c → b: b sees c's own address.
    let udp = Server::udp_echo(&cb, 5300, "b");
    let answer = udp_request(&cc, SocketAddr::from((b.addr, 5300)), b"ping")
        .unwrap_or_else(|e| panic!("UDP c → b: {e}"));
    assert_eq!(answer, b"b port 5300: ping");
    assert_eq!(udp.peers()[0].ip(), &c.addr, "b saw c's address");

    // The node itself reaches containers on the other nodes, from its
    // gateway address: an address of the cluster, which the receiving node
    // neither masquerades nor takes for a stranger's.
    let gateway1 = gateway_of(&cidrs[0]);
    wait_ping(&n1.node, b.addr);
    let answer = line_exchange(&n1.node, SocketAddr::from((b.addr, 7000)), "from node 1")
        .unwrap_or_else(|e| panic!("TCP node 1 → b: {e}"));
    assert_eq!(answer, "b: from node 1");
    let peers = tcp.wait_peers(2, Duration::from_secs(5));
    assert_eq!(
        peers[1].ip(),
        &gateway1,
        "b saw node 1's gateway: {peers:?}"
    );
    let answer = udp_request(&n3.node, SocketAddr::from((b.addr, 5300)), b"from node 3")
        .unwrap_or_else(|e| panic!("UDP node 3 → b: {e}"));
    assert_eq!(answer, b"b port 5300: from node 3");
    assert_eq!(
        udp.peers()[1].ip(),
        &gateway_of(&cidrs[2]),
        "b saw node 3's gateway"
    );

    // Nothing of it was masqueraded; the overlay carried it.
    for agent in [&a1, &a2, &a3] {
        assert_eq!(
            agent.counter("snat_new"),
            0,
            "no masquerade inside the cluster"
        );
        assert!(agent.counter("overlay_encapsulated") > 0);
        assert!(agent.counter("overlay_delivered") > 0);
    }

    // Egress to the outside (a host on the underlay) is still masqueraded.
    let outside = Server::udp_echo(&n2.client, 5400, "outside");
    udp_request(&ca, SocketAddr::from((n2.client_addr(), 5400)), b"out")
        .unwrap_or_else(|e| panic!("UDP a → outside: {e}"));
    assert_eq!(
        outside.peers()[0].ip(),
        &n1.node_addr(),
        "the outside sees node 1's address"
    );
    assert_eq!(a1.counter("snat_new"), 1, "one masqueraded flow so far");

    // Published ports work on every node as before: from the underlay, and
    // from a pod on another node (masqueraded by its node, then DNATed).
    a2.cli_ok(["container", "publish", "b", "8080:7000"]);
    let published = SocketAddr::from((n2.node_addr(), 8080));
    let answer = line_exchange(&n3.client, published, "from outside")
        .unwrap_or_else(|e| panic!("TCP to the published port: {e}"));
    assert_eq!(answer, "b: from outside");
    let answer = line_exchange(&ca, published, "from a")
        .unwrap_or_else(|e| panic!("TCP a → node 2's published port: {e}"));
    assert_eq!(answer, "b: from a");
    let peers = tcp.wait_peers(4, Duration::from_secs(5));
    assert_eq!(peers[2].ip(), &n3.client_addr(), "{peers:?}");
    assert_eq!(
        peers[3].ip(),
        &n1.node_addr(),
        "masqueraded by node 1: {peers:?}"
    );

    // The overlay's port cannot be published.
    let refused = a2.cli(["container", "publish", "b", "4789:53/udp"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("overlay"),
        "{err}"
    );

    // The containers' MTU leaves room for the overlay's 50 bytes.
    let link = ca.exec_ok("ip", ["-j", "link", "show", "dev", "eth0"]);
    let mtu = serde_json::from_str::<Value>(&link).expect("ip -j")[0]["mtu"].clone();
    assert_eq!(mtu, 1450, "container MTU: underlay 1500 - 50");
}

#[test]
fn two_agents_started_at_once_claim_distinct_cidrs_and_a_restart_gets_its_own_back() {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let (n1, n2) = (switch.node(1), switch.node(2));
    let mut agents = AgentBuilder::start_all(vec![
        cluster::builder(&n1, &etcd, "n1", &[]),
        cluster::builder(&n2, &etcd, "n2", &[]),
    ]);
    let (Some(a2), Some(mut a1)) = (agents.pop(), agents.pop()) else {
        panic!("two agents");
    };
    let (c1, c2) = (node_cidr(&a1), node_cidr(&a2));
    assert_ne!(c1, c2, "two agents racing got the same node CIDR");
    for c in [&c1, &c2] {
        assert!(c.starts_with("198.19.") && c.ends_with("/24"), "{c}");
    }
    a1.stop();
    a1.restart();
    assert_eq!(
        node_cidr(&a1),
        c1,
        "a restarted node gets its own CIDR back"
    );
    wait_nodes(&a1, &["n1", "n2"]);
    wait_nodes(&a2, &["n1", "n2"]);
}

#[test]
fn a_node_whose_agent_died_leaves_its_peers_after_the_lease_ttl() {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let (n1, n2) = (switch.node(1), switch.node(2));
    let ttl = ["--cluster-lease-ttl", "2s"];
    let a1 = cluster::agent(&n1, &etcd, "n1", &ttl);
    let mut a2 = cluster::agent(&n2, &etcd, "n2", &ttl);
    wait_nodes(&a1, &["n1", "n2"]);
    let ca = n1.add_container_netns("a");
    let cb = n2.add_container_netns("b");
    a1.add("a", &ca, &[]);
    let b = a2.add("b", &cb, &[]);
    wait_ping(&ca, b.addr);

    // Node 2 goes away for good: its agent killed, its namespaces removed.
    a2.kill();
    drop(a2);
    drop(cb);
    drop(n2);
    wait_nodes(&a1, &["n1"]);
    let before = a1.counter("drop_no_peer");
    assert!(!ca.ping(b.addr), "node 2's container still answers");
    assert!(
        a1.counter("drop_no_peer") > before,
        "packets to the gone node's CIDR are dropped, not masqueraded"
    );
    assert_eq!(a1.counter("snat_new"), 0);
}

#[test]
fn traffic_between_nodes_goes_on_while_etcd_is_down_and_agents_resync_when_it_is_back() {
    let switch = Switch::new();
    let mut etcd = Etcd::start(&switch);
    let (n1, n2, n3) = (switch.node(1), switch.node(2), switch.node(3));
    let a1 = cluster::agent(&n1, &etcd, "n1", &[]);
    let a2 = cluster::agent(&n2, &etcd, "n2", &[]);
    wait_nodes(&a1, &["n1", "n2"]);
    let ca = n1.add_container_netns("a");
    let cb = n2.add_container_netns("b");
    a1.add("a", &ca, &[]);
    let b = a2.add("b", &cb, &[]);
    let _server = Server::line_echo(&cb, 7000, "b");
    let flow = RrFlow::start(&ca, SocketAddr::from((b.addr, 7000)), "b");
    flow.wait_more("before etcd stops", 5);

    etcd.stop();
    let state_of = |agent: &Agent<'_>, name: &str| {
        nodes(agent)
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["state"].as_str().unwrap_or_default().to_owned())
    };
    wait::until("node 1 notices the store is gone", PROPAGATION, || {
        state_of(&a1, "n2").as_deref() == Some("last-known")
    });
    flow.wait_more("while etcd is down", 20);
    // An agent started now with --cluster-wait waits for the store: it
    // keeps trying past the attempts after which it would give up without.
    let mut a3 = cluster::builder(&n3, &etcd, "n3", &["--cluster-wait"]).spawn();
    wait::until(
        "node 3's agent tries the store again and again",
        PROPAGATION,
        || a3.log().matches("trying the cluster store again").count() > START_ATTEMPTS,
    );
    assert!(
        a3.wait_exit(Duration::from_millis(200)).is_none(),
        "node 3's agent gave up:\n{}",
        a3.log()
    );

    etcd.restart();
    wait::until("node 1 is back in sync", PROPAGATION * 2, || {
        state_of(&a1, "n2").as_deref() == Some("reachable")
    });
    // Node 3's agent joins, and the watch is live again: the others see it.
    a3.wait_api();
    wait_nodes(&a1, &["n1", "n2", "n3"]);
    wait_nodes(&a3, &["n1", "n2", "n3"]);
    flow.wait_more("after etcd is back", 5);
    let n = flow
        .finish()
        .unwrap_or_else(|e| panic!("the flow broke: {e}"));
    assert!(n >= 30, "{n} exchanges");
}

#[test]
fn a_cross_node_iperf3_flow_survives_agent_restarts_on_both_nodes() {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let (n1, n2) = (switch.node(1), switch.node(2));
    let mut a1 = cluster::agent(&n1, &etcd, "n1", &[]);
    let mut a2 = cluster::agent(&n2, &etcd, "n2", &[]);
    wait_nodes(&a1, &["n1", "n2"]);
    let ca = n1.add_container_netns("a");
    let cb = n2.add_container_netns("b");
    a1.add("a", &ca, &[]);
    let b = a2.add("b", &cb, &[]);
    wait_ping(&ca, b.addr);
    let _lock = TrafficLock::acquire();
    let _server = Iperf3Server::start(&cb, None, b.addr, 5201).expect("iperf3 server");
    let opts = Iperf3Options {
        seconds: 8,
        interval: 0.5,
        ..Iperf3Options::default()
    };
    let client = Iperf3Client::spawn(&ca, None, SocketAddr::from((b.addr, 5201)), &opts)
        .expect("iperf3 client");
    let sent = a1.counter("overlay_encapsulated");
    wait::until("the flow runs", PROPAGATION, || {
        a1.counter("overlay_encapsulated") > sent + 100
    });
    for agent in [&mut a1, &mut a2] {
        assert!(agent.stop(), "the agent stopped on SIGTERM");
        agent.restart();
    }
    let report = client
        .wait()
        .unwrap_or_else(|e| panic!("the flow did not survive the restarts: {e}"));
    assert!(report.received_bps > 0.0);
    for agent in [&a1, &a2] {
        assert_eq!(agent.counter("drop_no_peer"), 0, "a peer went missing");
        assert_eq!(agent.counter("snat_new"), 0);
    }
}

/// Runs `datapath agent` once in `node` with `args` (it is expected to
/// exit), with paths of its own that are removed afterwards.
fn agent_once(node: &datapath_tests::node::Node, args: &[&str]) -> std::process::Output {
    let name = datapath_tests::names::unique_name();
    let tmp = std::path::PathBuf::from("/tmp").join(&name);
    let bpffs = std::path::PathBuf::from("/sys/fs/bpf").join(&name);
    let mut cmd = std::process::Command::new(datapath_tests::agent::datapath_bin());
    cmd.args([
        "agent",
        "--uplink",
        datapath_tests::node::UPLINK,
        "--bpffs-dir",
    ])
    .arg(&bpffs)
    .arg("--state-dir")
    .arg(tmp.join("state"))
    .arg("--api-socket")
    .arg(tmp.join("api.sock"))
    .args(args);
    let out = node.node.run(&mut cmd);
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&bpffs);
    out
}

#[test]
fn an_unreachable_store_or_a_cluster_cidr_on_the_underlay_is_a_clear_error() {
    let switch = Switch::new();
    let n1 = switch.node(1);
    // Nothing listens there (the node's client on the underlay).
    let store = format!("http://{}:2379", n1.client_addr());
    let out = agent_once(
        &n1,
        &[
            "--cluster-store",
            &store,
            "--node-name",
            "n1",
            "--cluster-cidr",
            CLUSTER_CIDR,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot reach the cluster store"), "{err}");

    // A pool of its own is not for a cluster node.
    let out = agent_once(&n1, &["--cluster-store", &store, "--pool", "198.19.0.0/24"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--pool is not for cluster mode"), "{err}");

    let out = agent_once(
        &n1,
        &[
            "--cluster-store",
            &store,
            "--node-name",
            "n1",
            "--cluster-cidr",
            "198.18.0.0/16",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("overlaps the underlay"), "{err}");
}

#[test]
fn a_node_record_of_an_unknown_schema_is_skipped_and_logged() {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let future = r#"{"schema":2,"name":"future","addresses":["198.18.0.99"]}"#;
    etcd.put("/datapath/v1/nodes/future", future);
    let n1 = switch.node(1);
    let a1 = cluster::agent(&n1, &etcd, "n1", &[]);
    wait_nodes(&a1, &["n1"]);
    // Written while the agent watches, too.
    etcd.put(
        "/datapath/v1/nodes/later",
        &future.replace("future", "later"),
    );
    wait::until("the record is logged", PROPAGATION, || {
        a1.log().contains("later") && a1.log().contains("unknown schema 2")
    });
    assert!(a1.log().contains("future"), "{}", a1.log());
    assert_eq!(node_names(&a1), ["n1"]);
}

#[test]
fn a_peer_whose_underlay_address_changes_is_followed() {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let (n1, n2) = (switch.node(1), switch.node(2));
    let a1 = cluster::agent(&n1, &etcd, "n1", &[]);
    let a2 = cluster::agent(&n2, &etcd, "n2", &[]);
    wait_nodes(&a1, &["n1", "n2"]);
    let ca = n1.add_container_netns("a");
    let cb = n2.add_container_netns("b");
    a1.add("a", &ca, &[]);
    let b = a2.add("b", &cb, &[]);
    wait_ping(&ca, b.addr);

    // Node 2 moves to another underlay address (the old one removed
    // first: removing a primary address removes its secondaries).
    let moved = Ipv4Addr::new(198, 18, 0, 42);
    let uplink = datapath_tests::node::UPLINK;
    let old = format!("{}/24", n2.node_addr());
    n2.node.exec_ok("ip", ["addr", "del", &old, "dev", uplink]);
    let new = format!("{moved}/24");
    n2.node.exec_ok("ip", ["addr", "add", &new, "dev", uplink]);
    let underlay_of_n2 = || {
        nodes(&a1)
            .iter()
            .find(|n| n["name"] == "n2")
            .and_then(|n| n["underlay"].as_str().map(str::to_owned))
    };
    wait::until("node 1 follows node 2's move", PROPAGATION, || {
        underlay_of_n2().as_deref() == Some("198.18.0.42")
    });
    wait_ping(&ca, b.addr);
}
