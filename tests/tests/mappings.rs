//! Publishing and unpublishing ports of a running container, container to
//! container traffic, and flows that outlive a mapping change.

use datapath_tests::{
    fixture::Deployment,
    node::Node,
    traffic::{RrFlow, Server, assert_refused, line_exchange},
};

#[test]
fn a_port_published_on_a_running_container_reaches_it_and_unpublishing_stops_new_connections() {
    let node = Node::new();
    let web = Deployment::start(&node, "web", &[]);
    let addr = node.node_port(8080);
    let _server = Server::line_echo(&web.ctr, 80, "web");
    assert_refused(&node.client, addr, "nothing is published yet");

    web.agent.cli_ok(["container", "publish", "web", "8080:80"]);
    assert_eq!(
        line_exchange(&node.client, addr, "one").ok().as_deref(),
        Some("web: one")
    );
    let info = web.agent.container("web").expect("listed");
    assert_eq!(info.json["publish"][0], "8080:80/tcp", "{info:#?}");

    // Publishing the same again is a no-op; an overlapping range is refused.
    web.agent
        .cli_ok(["container", "publish", "web", "8080:80/tcp"]);
    let out = web
        .agent
        .cli(["container", "publish", "web", "8070-8090:70-90"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already publishes 8080:80/tcp"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    web.agent
        .cli_ok(["container", "unpublish", "web", "8080:80"]);
    assert_refused(&node.client, addr, "unpublished, while the server runs");
    let info = web.agent.container("web").expect("listed");
    assert_eq!(
        info.json["publish"].as_array().map(Vec::len),
        Some(0),
        "{info:#?}"
    );
}

#[test]
fn an_established_flow_keeps_its_container_when_the_mapping_moves_to_another() {
    let node = Node::new();
    let a = Deployment::start(&node, "a", &["-p", "8080:80"]);
    let b_ns = node.add_container_netns("b");
    a.agent.add("b", &b_ns, &[]);
    let _sa = Server::line_echo(&a.ctr, 80, "a");
    let _sb = Server::line_echo(&b_ns, 80, "b");
    let addr = node.node_port(8080);

    // One connection keeps exchanging with a (every answer is checked to
    // come from a) while the port moves to container b.
    let flow = RrFlow::start(&node.client, addr, "a");
    flow.wait_more("before the move", 3);
    a.agent.cli_ok(["container", "unpublish", "a", "8080:80"]);
    a.agent.cli_ok(["container", "publish", "b", "8080:80"]);
    flow.wait_more("after the move", 3);
    flow.finish().expect("the open connection stayed with a");

    // New connections go to b.
    assert_eq!(
        line_exchange(&node.client, addr, "new").ok().as_deref(),
        Some("b: new")
    );
}

#[test]
fn containers_reach_each_other_and_their_gateway() {
    let node = Node::new();
    let Deployment {
        agent,
        ctr: a,
        info,
    } = Deployment::start(&node, "a", &[]);
    let b = node.add_container_netns("b");
    let info_b = agent.add("b", &b, &[]);
    let gateway: std::net::Ipv4Addr = info.json["gateway"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("gateway");
    let _server = Server::line_echo(&b, 7000, "b");
    assert_eq!(
        line_exchange(&a, std::net::SocketAddr::from((info_b.addr, 7000)), "hi")
            .ok()
            .as_deref(),
        Some("b: hi"),
        "container a reaches container b by its address"
    );
    assert!(a.ping(gateway), "container a reaches its gateway {gateway}");
}
