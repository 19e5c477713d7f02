//! Published ports from everywhere (issue 15): the node's own processes
//! reach them on its loopback and its addresses through the socket
//! programs (run in the agent's socket cgroup, never the machine's root),
//! seeing the address they dialed; containers reach their own and each
//! other's through the node's address (hairpin); host-IP bindings keep to
//! their address; the node's loopback never leaks into a container's.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    process::{Command, Output},
    time::Duration,
};

use datapath_tests::{
    agent::Agent,
    netns::Netns,
    nginx::Nginx,
    node::Node,
    traffic::{Server, assert_refused, http_get, udp_request},
};

/// The socket probe (`tests/src/bin/sockprobe.rs`).
const PROBE: &str = env!("CARGO_BIN_EXE_sockprobe");

/// Runs `program args…` in `ns` as a process of the agent's socket cgroup.
fn run_in_cgroup(agent: &Agent<'_>, ns: &Netns, program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    agent.socket_cgroup().enter(&mut cmd);
    ns.run(&mut cmd)
}

/// Runs the probe in `ns` in the agent's socket cgroup: its `key value`
/// lines, or its error.
fn probe(agent: &Agent<'_>, ns: &Netns, args: &[&str]) -> Result<HashMap<String, String>, String> {
    let out = run_in_cgroup(agent, ns, PROBE, args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// [`probe`] that must succeed.
#[track_caller]
fn probe_ok(agent: &Agent<'_>, ns: &Netns, args: &[&str]) -> HashMap<String, String> {
    probe(agent, ns, args)
        .unwrap_or_else(|e| panic!("sockprobe {args:?} failed: {e}\n{}", agent.log()))
}

/// `curl` in the node namespace, in the agent's socket cgroup: the body.
#[track_caller]
fn curl(agent: &Agent<'_>, url: &str) -> String {
    let out = run_in_cgroup(
        agent,
        &agent.node().node,
        "curl",
        &["-sS", "--max-time", "5", url],
    );
    assert!(
        out.status.success(),
        "curl {url}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One UDP exchange from `ns` (in this process): the answer and its source.
fn udp_exchange(ns: &Netns, to: SocketAddr, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    ns.exec_closure(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.send_to(payload, to).expect("send");
        let mut buf = [0u8; 2048];
        let (n, from) = s
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no answer from {to}: {e}"));
        (buf[..n].to_vec(), from)
    })
}

#[test]
fn the_node_reaches_a_published_port_on_its_loopback_and_address_and_sees_the_dialed_peer() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    let web = Server::http(&ctr, 80, "web");
    agent.add("web", &ctr, &["--publish", "8080:80"]);
    let before = agent.counter("sock_translated");

    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
    for dialed in [local, node.node_port(8080)] {
        let body = curl(&agent, &format!("http://{dialed}/"));
        assert!(
            body.starts_with("web port 80: hello "),
            "{dialed}: {body:?}"
        );
        let seen = probe_ok(&agent, &node.node, &["tcp", &dialed.to_string()]);
        assert_eq!(
            seen["peer"],
            dialed.to_string(),
            "getpeername shows the dialed address"
        );
        assert!(seen["body"].starts_with("web port 80: hello "), "{seen:?}");
    }
    // A dual-stack socket dialing the IPv4-mapped loopback.
    let seen = probe_ok(&agent, &node.node, &["tcp", "[::ffff:127.0.0.1]:8080"]);
    assert_eq!(seen["peer"], "[::ffff:127.0.0.1]:8080");
    assert!(seen["body"].starts_with("web port 80: hello "), "{seen:?}");
    assert_eq!(
        agent.counter("sock_translated") - before,
        5,
        "each of the five connections was translated once, at connect"
    );
    // The connections went straight to the container: no packet was
    // translated, and the server saw the node's own address.
    assert_eq!(agent.counter("dnat_new"), 0);
    let peers = web.peers();
    assert_eq!(peers.len(), 5, "{peers:?}");
    assert!(
        peers.iter().all(|p| !p.ip().is_loopback()),
        "the container is reached from a node address, not 127.0.0.1: {peers:?}"
    );
}

#[test]
fn udp_from_the_node_to_a_published_port_on_loopback_is_answered_from_the_dialed_address() {
    let node = Node::new();
    let ctr = node.add_container_netns("dns");
    let agent = Agent::start(&node);
    let _dns = Server::udp_echo(&ctr, 53, "dns");
    agent.add("dns", &ctr, &["--publish", "5353:53/udp"]);
    for dialed in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, 5353)),
        node.node_port(5353),
    ] {
        let to = dialed.to_string();
        let seen = probe_ok(&agent, &node.node, &["udp", &to, "query"]);
        assert_eq!(seen["from"], to, "the answer reads as coming from {to}");
        assert_eq!(seen["reply"], "dns port 53: query");
        let seen = probe_ok(&agent, &node.node, &["udp-connected", &to, "again"]);
        assert_eq!(seen["peer"], to);
        assert_eq!(seen["from"], to);
        assert_eq!(seen["reply"], "dns port 53: again");
    }
    // A dual-stack socket.
    let seen = probe_ok(
        &agent,
        &node.node,
        &["udp", "[::ffff:127.0.0.1]:5353", "six"],
    );
    assert_eq!(seen["from"], "[::ffff:127.0.0.1]:5353");
    assert_eq!(seen["reply"], "dns port 53: six");
}

#[test]
fn a_port_published_on_the_node_loopback_is_reached_from_the_node_only() {
    let node = Node::new();
    let c1 = node.add_container_netns("local");
    let c2 = node.add_container_netns("other");
    let agent = Agent::start(&node);
    let web = Server::http(&c1, 80, "local");
    // The other container serves nothing on its own loopback's 8080.
    agent.add("local", &c1, &["--publish", "127.0.0.1:8080:80"]);
    agent.add("other", &c2, &[]);

    let seen = probe_ok(&agent, &node.node, &["tcp", "127.0.0.1:8080"]);
    assert_eq!(seen["peer"], "127.0.0.1:8080");
    assert!(
        seen["body"].starts_with("local port 80: hello "),
        "{seen:?}"
    );
    let served = web.peers().len();

    // Not on the node's address: from the node itself, or from the client.
    let err = probe(
        &agent,
        &node.node,
        &["tcp", &node.node_port(8080).to_string()],
    )
    .expect_err("a loopback mapping answered on the node address");
    assert!(err.contains("refused"), "{err}");
    assert_refused(
        &node.client,
        node.node_port(8080),
        "published on 127.0.0.1 only",
    );
    // Not on a container's own loopback, even for a process of the socket
    // cgroup: the programs translate the node namespace's sockets only.
    let err = probe(&agent, &c2, &["tcp", "127.0.0.1:8080"])
        .expect_err("the node's loopback mapping answered on a container's loopback");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(web.peers().len(), served, "{:?}", web.peers());
}

#[test]
fn containers_reach_their_own_and_each_others_published_ports_through_the_node_address() {
    let node = Node::new();
    let c1 = node.add_container_netns("c1");
    let c2 = node.add_container_netns("c2");
    let agent = Agent::start(&node);
    let w1 = Server::http(&c1, 80, "c1");
    let w2 = Server::http(&c2, 80, "c2");
    let _d1 = Server::udp_echo(&c1, 53, "d1");
    let _d2 = Server::udp_echo(&c2, 53, "d2");
    let i1 = agent.add(
        "c1",
        &c1,
        &["--publish", "8080:80", "--publish", "5353:53/udp"],
    );
    agent.add(
        "c2",
        &c2,
        &["--publish", "8081:80", "--publish", "5354:53/udp"],
    );
    let c1_addr = i1.addr;

    // Its own published port: answered, from the node address it dialed
    // (a packet from its own address would be a martian to it).
    let body = http_get(&c1, node.node_port(8080), "/").expect("c1 → node:8080 (its own)");
    assert!(body.starts_with("c1 port 80: hello "), "{body:?}");
    assert_eq!(
        w1.peers(),
        vec![SocketAddrV4::new(node.node_addr(), w1.peers()[0].port())]
    );
    // Another container's: answered, that container sees c1's address.
    let body = http_get(&c1, node.node_port(8081), "/").expect("c1 → node:8081 (c2's)");
    assert!(body.starts_with("c2 port 80: hello "), "{body:?}");
    assert_eq!(w2.peers().len(), 1);
    assert_eq!(*w2.peers()[0].ip(), c1_addr);

    // UDP both ways, the answers from the address dialed.
    for (port, label) in [(5353, "d1"), (5354, "d2")] {
        let to = node.node_port(port);
        let (answer, from) = udp_exchange(&c1, to, b"q");
        assert_eq!(answer, format!("{label} port 53: q").into_bytes());
        assert_eq!(from, to, "the answer comes from the address c1 sent to");
    }
    assert_eq!(agent.counter("hairpin_new"), 4);
    let flows = agent.flows();
    assert!(
        flows
            .iter()
            .any(|f| f["kind"] == "hairpin" && f["orig_dst"]["port"] == 8080),
        "{flows:#?}"
    );
}

#[test]
fn one_port_on_two_node_addresses_or_two_protocols_reaches_different_containers() {
    let node = Node::new();
    let second = Ipv4Addr::new(198, 18, 0, 3);
    node.node
        .exec_ok("ip", ["addr", "add", "198.18.0.3/24", "dev", "up0"]);
    let c1 = node.add_container_netns("a");
    let c2 = node.add_container_netns("b");
    let agent = Agent::start(&node);
    let _w1 = Server::http(&c1, 80, "a");
    let _w2 = Server::http(&c2, 80, "b");
    let _d2 = Server::udp_echo(&c2, 53, "b-dns");
    agent.add(
        "a",
        &c1,
        &[
            "--publish",
            "198.18.0.2:8080:80",
            "--publish",
            "9000:80/tcp",
        ],
    );
    agent.add(
        "b",
        &c2,
        &[
            "--publish",
            "198.18.0.3:8080:80",
            "--publish",
            "9000:53/udp",
        ],
    );
    let on = |addr: Ipv4Addr, port| SocketAddr::from((addr, port));
    let a = http_get(&node.client, on(node.node_addr(), 8080), "/").expect("GET .2:8080");
    let b = http_get(&node.client, on(second, 8080), "/").expect("GET .3:8080");
    assert!(a.starts_with("a port 80:"), "{a:?}");
    assert!(b.starts_with("b port 80:"), "{b:?}");
    let t = http_get(&node.client, node.node_port(9000), "/").expect("GET :9000/tcp");
    assert!(t.starts_with("a port 80:"), "{t:?}");
    let u = udp_request(&node.client, node.node_port(9000), b"q").expect("UDP :9000");
    assert_eq!(u, b"b-dns port 53: q");
    // From the node itself, each address reaches its own container too.
    for (addr, label) in [(node.node_addr(), "a"), (second, "b")] {
        let seen = probe_ok(&agent, &node.node, &["tcp", &on(addr, 8080).to_string()]);
        assert!(
            seen["body"].starts_with(&format!("{label} port 80:")),
            "{seen:?}"
        );
    }
}

#[test]
fn nginx_on_the_node_proxies_to_a_published_port_on_its_loopback() {
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    let web = Server::http(&ctr, 80, "app");
    agent.add("app", &ctr, &["--publish", "8080:80"]);
    let _router = Nginx::start(
        &node.node,
        Some(agent.socket_cgroup()),
        9080,
        SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
    );
    for _ in 0..3 {
        let body = http_get(&node.client, node.node_port(9080), "/")
            .unwrap_or_else(|e| panic!("GET through nginx: {e}\n{}", agent.log()));
        assert!(body.starts_with("app port 80: hello "), "{body:?}");
    }
    assert_eq!(web.peers().len(), 3);
    assert!(agent.counter("sock_translated") >= 1);
}

#[test]
fn nginx_in_a_container_proxies_to_another_through_the_node_published_port() {
    let node = Node::new();
    let front = node.add_container_netns("front");
    let back = node.add_container_netns("back");
    let agent = Agent::start(&node);
    let web = Server::http(&back, 80, "back");
    let f = agent.add("front", &front, &["--publish", "8080:80"]);
    agent.add("back", &back, &["--publish", "8081:80"]);
    let _router = Nginx::start(&front, None, 80, node.node_port(8081));
    for _ in 0..3 {
        let body = http_get(&node.client, node.node_port(8080), "/")
            .unwrap_or_else(|e| panic!("GET through the front's nginx: {e}\n{}", agent.log()));
        assert!(body.starts_with("back port 80: hello "), "{body:?}");
    }
    let peers = web.peers();
    assert_eq!(peers.len(), 3);
    assert!(peers.iter().all(|p| *p.ip() == f.addr), "{peers:?}");
}
