//! IPv6 dual stack (issue 14) in a namespace node: `--pool6` gives each
//! container an IPv6 address at its IPv4 address's offset and a default
//! route via the host end's link-local fe80::1; neighbour discovery works
//! both ways; the agent enables IPv6 forwarding in its own namespace only;
//! a node without `--pool6` stays IPv4-only.

use std::net::{Ipv4Addr, Ipv6Addr};

use datapath_tests::{
    agent::Agent,
    node::{CLIENT_ADDR6, NODE_ADDR6, Node},
};

/// The containers' IPv6 pool of these tests.
const POOL6: &str = "fd00:db8:88::/64";

/// The IPv6 address `--pool6 POOL6` derives from IPv4 address `addr` in
/// the /24 pool `pool`.
fn derived(addr: Ipv4Addr) -> Ipv6Addr {
    let base: Ipv6Addr = "fd00:db8:88::".parse().expect("an address");
    Ipv6Addr::from(u128::from(base) | u128::from(addr.octets()[3]))
}

/// `ip -j ARGS` in `ns`, parsed.
fn ip_json(ns: &datapath_tests::netns::Netns, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let out = ns.exec_ok("ip", all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {out}"))
}

#[test]
fn a_dual_stack_container_gets_its_ipv6_address_and_a_link_local_default_route() {
    let node = Node::new();
    node.enable_ipv6();
    let agent = Agent::builder(&node).args(["--pool6", POOL6]).start();
    let ctr = node.add_container_netns("c6");
    let info = agent.add("c6", &ctr, &[]);
    let addr6 = derived(info.addr);
    assert_eq!(info.addr6, Some(addr6), "{:#}", info.json);
    assert_eq!(info.json["gateway6"], "fe80::1", "{:#}", info.json);
    assert_eq!(agent.status()["pool6"], POOL6);

    // Inside: the address as a /128, the default route via fe80::1.
    let addrs = ip_json(
        &ctr,
        &["-6", "addr", "show", "dev", "eth0", "scope", "global"],
    );
    let global: Vec<String> = addrs[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect();
    assert_eq!(global, vec![format!("{addr6}/128")], "{addrs:#}");
    let routes = ip_json(&ctr, &["-6", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "fe80::1", "{routes:#}");
    assert_eq!(routes[0]["dev"], "eth0", "{routes:#}");

    // The node's side: the host end holds fe80::1, the container's /128
    // is routed to it, and forwarding is on in the node namespace only.
    let host = ip_json(
        &node.node,
        &["-6", "addr", "show", "dev", &info.host_ifname],
    );
    assert!(
        host[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["local"] == "fe80::1" && a["prefixlen"] == 64),
        "{host:#}"
    );
    let route = ip_json(
        &node.node,
        &["-6", "route", "show", &format!("{addr6}/128")],
    );
    assert_eq!(route[0]["dev"], info.host_ifname.as_str(), "{route:#}");
    let forwarding = node
        .node
        .exec_ok("sysctl", ["-n", "net.ipv6.conf.all.forwarding"]);
    assert_eq!(forwarding.trim(), "1");
    let client_forwarding = node
        .client
        .exec_ok("sysctl", ["-n", "net.ipv6.conf.all.forwarding"]);
    assert_eq!(client_forwarding.trim(), "0", "only the agent's namespace");

    // Neighbour discovery both ways: the container resolves fe80::1 to
    // reach the node, the node resolves the container to answer.
    assert!(ctr.ping(NODE_ADDR6), "container → node over IPv6");
    assert!(node.node.ping(addr6), "node → container over IPv6");
    let neigh = ip_json(&ctr, &["-6", "neigh", "show", "fe80::1", "dev", "eth0"]);
    assert!(neigh[0]["lladdr"].is_string(), "{neigh:#}");

    // Routed through the node, both directions.
    node.route6_from_client_via_node(POOL6);
    assert!(node.client.ping(addr6), "client → container over IPv6");
    assert!(ctr.ping(CLIENT_ADDR6), "container → client over IPv6");
}

#[test]
fn a_node_without_pool6_stays_ipv4_only() {
    let node = Node::new();
    node.enable_ipv6();
    let agent = Agent::start(&node);
    let ctr = node.add_container_netns("c4");
    let info = agent.add("c4", &ctr, &[]);
    assert_eq!(info.addr6, None, "{:#}", info.json);
    assert!(info.json.get("gateway6").is_none(), "{:#}", info.json);
    assert!(agent.status().get("pool6").is_none());
    let addrs = ip_json(
        &ctr,
        &["-6", "addr", "show", "dev", "eth0", "scope", "global"],
    );
    assert!(
        !addrs[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["local"].is_string()),
        "{addrs:#}"
    );
    let routes = ip_json(&ctr, &["-6", "route", "show", "default"]);
    assert!(routes.as_array().is_none_or(Vec::is_empty), "{routes:#}");
    assert!(ctr.ping(node.node_addr()), "IPv4 as before");
}

#[test]
fn an_ipv6_pool_smaller_than_the_ipv4_pool_is_refused_at_start() {
    let node = Node::new();
    let mut agent = Agent::builder(&node)
        .args(["--pool6", "fd00:db8:88::/121"])
        .spawn();
    let status = agent
        .wait_exit(std::time::Duration::from_secs(30))
        .expect("the agent exits");
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("--pool6 fd00:db8:88::/121"), "{log}");
}
