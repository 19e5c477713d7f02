//! Cluster mode: nodes on one underlay switch, etcd in a namespace of its
//! own, an agent per node claiming its node CIDR, containers on every
//! node reaching each other through the VXLAN overlay without NAT.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use datapath_tests::{
    agent::Agent,
    cluster::{self, CLUSTER_CIDR, Etcd, Switch},
    netns::Netns,
    traffic::{Server, line_exchange, udp_request},
    wait,
};
use serde_json::Value;

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
    assert_eq!(a1.counter("snat_new"), 1);

    // The containers' MTU leaves room for the overlay's 50 bytes.
    let link = ca.exec_ok("ip", ["-j", "link", "show", "dev", "eth0"]);
    let mtu = serde_json::from_str::<Value>(&link).expect("ip -j")[0]["mtu"].clone();
    assert_eq!(mtu, 1450, "container MTU: underlay 1500 - 50");
    let _ = CLUSTER_CIDR;
}
