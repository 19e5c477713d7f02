//! The agent in a namespace node: it starts, attaches, serves its API,
//! translates real traffic, and leaves nothing behind when stopped.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use datapath_tests::{agent::Agent, leaks, netns::Netns, node::Node};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one TCP connection on `port` in `ns`: reads a line, answers
/// `reply`, and returns the peer address it saw. Waits until listening.
fn serve_once(ns: &Netns, port: u16, reply: &'static str) -> std::thread::JoinHandle<SocketAddr> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.spawn_thread(move || {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("signal ready");
        let deadline = Instant::now() + IO_TIMEOUT;
        let (mut conn, peer) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no connection within {IO_TIMEOUT:?}"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).expect("read request");
        assert!(n > 0, "empty request");
        conn.write_all(reply.as_bytes()).expect("write reply");
        peer
    });
    ready_rx.recv_timeout(IO_TIMEOUT).expect("server ready");
    handle
}

/// Connects from `ns` to `addr`, sends a line, returns the answer.
fn request(ns: &Netns, addr: SocketAddr) -> String {
    ns.exec_closure(|| {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.write_all(b"hello\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
}

#[test]
fn agent_attaches_to_the_uplink_and_leaves_nothing_behind() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let st = agent.cli_json(["status", "--json"]);
    assert_eq!(st["uplink"]["ifname"], "up0", "{st:#}");
    assert_eq!(
        st["uplink"]["node_ip"],
        node.node_addr().to_string(),
        "{st:#}"
    );
    assert_eq!(st["bpffs_dir"], agent.bpffs_dir().display().to_string());
    let pins = std::fs::read_dir(agent.bpffs_dir())
        .expect("bpffs dir exists")
        .count();
    assert!(
        pins > 0,
        "nothing pinned in {}",
        agent.bpffs_dir().display()
    );
    let bpffs = agent.bpffs_dir().to_owned();
    let socket = agent.socket().to_owned();
    let pid = agent.pid().expect("running");
    drop(agent);
    assert!(!bpffs.exists(), "{} survived", bpffs.display());
    assert!(!socket.exists(), "{} survived", socket.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "agent process {pid} survived"
    );
}

#[test]
fn published_port_reaches_a_server_in_the_container() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "--publish",
        "8080:80",
    ]);
    let server = serve_once(&ctr, 80, "hello from web");
    let answer = request(&node.client, SocketAddr::from((node.node_addr(), 8080)));
    assert_eq!(answer, "hello from web");
    let peer = server.join().expect("server thread");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(node.client_addr()),
        "the client's address is kept"
    );
    let flows = agent.cli_json(["conntrack", "list", "--json"]);
    let flows = flows.as_array().expect("a list of flows");
    assert!(
        flows
            .iter()
            .any(|f| f["kind"] == "dnat" && f["proto"] == "tcp"),
        "no DNAT flow listed: {flows:#?}"
    );
}

#[test]
fn container_egress_is_masqueraded_behind_the_node_address() {
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "app", "--netns", ctr.name()]);
    let server = serve_once(&node.client, 9000, "hello from outside");
    let answer = request(&ctr, SocketAddr::from((node.client_addr(), 9000)));
    assert_eq!(answer, "hello from outside");
    let peer = server.join().expect("server thread");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(node.node_addr()),
        "masqueraded source"
    );
}

#[test]
fn a_dropped_node_with_a_running_agent_leaves_no_resources() {
    let node = Node::new();
    let id = node.id().to_owned();
    let ctr = node.add_container_netns("c");
    {
        let agent = Agent::start(&node);
        agent.cli_ok(["container", "add", "c", "--netns", ctr.name()]);
        let live = leaks::leftovers_of(&id);
        assert!(
            live.iter().any(|p| p.starts_with("/sys/fs/bpf/"))
                && live.iter().any(|p| p.starts_with("/tmp/")),
            "the agent's directories carry the node's id: {live:?}"
        );
    }
    drop(ctr);
    drop(node);
    assert_eq!(leaks::leftovers_of(&id), Vec::<String>::new());
}

#[test]
fn an_agent_that_cannot_start_reports_its_log_and_cleans_up() {
    let node = Node::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Agent::builder(&node).pool("not-a-cidr").start();
    }));
    let msg = r.expect_err("the agent refuses a bad pool");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("exited"), "{msg}");
    assert!(
        msg.contains("not-a-cidr"),
        "the agent's own error is shown: {msg}"
    );
    assert_eq!(
        leaks::leftovers_of(node.id()).len(),
        2,
        "only the node's two namespaces"
    );
}
