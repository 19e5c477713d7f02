//! The agent in a namespace node: it starts, attaches, serves its API,
//! translates real traffic, and leaves nothing behind when stopped.

use datapath_tests::{
    agent::Agent,
    fixture::Deployment,
    leaks,
    node::Node,
    traffic::{Server, http_get},
};

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
    let web = Deployment::start(&node, "web", &["--publish", "8080:80"]);
    let server = Server::http(&web.ctr, 80, "web");
    let body = http_get(&node.client, node.node_port(8080), "/").expect("GET node:8080");
    let peers = server.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(
        *peers[0].ip(),
        node.client_addr(),
        "the client's address is kept"
    );
    assert_eq!(body, format!("web port 80: hello {}\n", peers[0]));
    let flows = web.agent.flows();
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
    let app = Deployment::start(&node, "app", &[]);
    let server = Server::http(&node.client, 9000, "outside");
    let body = http_get(&app.ctr, node.client_port(9000), "/").expect("GET client:9000");
    let peers = server.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(*peers[0].ip(), node.node_addr(), "masqueraded source");
    assert_eq!(body, format!("outside port 9000: hello {}\n", peers[0]));
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
