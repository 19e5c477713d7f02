//! The control plane at scale (issue 21): 1,000 containers with 10,000
//! individually published ports, adopted again after the agent is killed;
//! many ports published in one request and one durable write; a request
//! over the size limit told which limit and how to split it; a crash
//! between the journal write and the map update; the conntrack listing
//! streamed. No timings are asserted here: they are in `cargo xtask bench`.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use datapath::store::journal::FAULT_ENV;
use datapath_common::{ServiceKey, ServiceValue, proto};
use datapath_tests::{
    agent::Agent,
    bench::api::Api,
    inspect::pinned_hash,
    lock::TrafficLock,
    names,
    netns::Netns,
    node::Node,
    traffic::{Server, line_exchange},
};
use serde_json::{Value, json};

/// The published ports in the agent's SERVICES map, by host port (TCP on
/// every address).
fn published(agent: &Agent<'_>) -> Vec<(u16, ServiceValue)> {
    let mut ports: Vec<(u16, ServiceValue)> =
        pinned_hash::<ServiceKey, ServiceValue>(agent, "SERVICES")
            .into_iter()
            .filter(|(k, _)| k.proto == proto::TCP && k.addr == [0; 4])
            .map(|(k, v)| (k.port, v))
            .collect();
    ports.sort_by_key(|(p, _)| *p);
    ports
}

/// The records in the agent's journal files: each is `[length][crc][payload]`.
fn journal_records(state_dir: &Path) -> usize {
    let mut n = 0;
    for path in datapath::store::journal::files(state_dir).expect("list the journal") {
        let bytes = std::fs::read(&path).expect("read the journal");
        let mut off = 0;
        while let Some(len) = bytes.get(off..off + 4) {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            off += 8 + len;
            n += 1;
        }
    }
    n
}

/// The ports container `name` publishes, as listed.
fn listed_ports(api: &Api, name: &str) -> Vec<String> {
    let c = api
        .call("GET", &format!("/v1/containers/{name}"), None)
        .unwrap_or_else(|e| panic!("GET {name}: {e:#}"));
    c["publish"]
        .as_array()
        .unwrap_or_else(|| panic!("no ports in {c}"))
        .iter()
        .map(|p| p.as_str().expect("a spec").to_owned())
        .collect()
}

#[test]
fn a_thousand_containers_with_ten_ports_each_are_adopted_after_the_agent_is_killed() {
    const CONTAINERS: usize = 1000;
    const PORTS: usize = 10;
    const FIRST: usize = 10_000;
    // Half a minute of both cores busy adding containers: rates measured
    // meanwhile by other tests would be off.
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let mut agent = Agent::builder(&node).pool("198.19.128.0/21").start();
    let api = Api::new(agent.socket());
    // Made in-process: `ip netns add` a thousand times would take longer
    // than the rest of the test.
    let namespaces: Vec<Netns> = (0..CONTAINERS)
        .map(|i| Netns::new_bare(&format!("{}{}-c{i}", names::PREFIX, node.id())))
        .collect();
    for (i, ns) in namespaces.iter().enumerate() {
        let ports: Vec<String> = (0..PORTS)
            .map(|j| format!("{}:{}", FIRST + i * PORTS + j, 80 + j))
            .collect();
        api.add_container(&format!("c{i}"), ns.name(), &ports)
            .unwrap_or_else(|e| panic!("adding c{i}: {e:#}\n{}", agent.log()));
    }
    let all = published(&agent);
    assert_eq!(all.len(), CONTAINERS * PORTS);

    // One more port of one container, and then not.
    let extra = format!("{}:8080", FIRST + CONTAINERS * PORTS);
    api.publish("c500", &extra).expect("publish one more");
    assert_eq!(published(&agent).len(), CONTAINERS * PORTS + 1);
    assert_eq!(listed_ports(&api, "c500").len(), PORTS + 1);
    api.unpublish("c500", &extra).expect("unpublish it");
    assert_eq!(published(&agent), all);

    agent.kill();
    agent.restart();

    let list = api.call("GET", "/v1/containers", None).expect("list");
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), CONTAINERS);
    assert!(
        list.iter()
            .all(|c| c["publish"].as_array().is_some_and(|p| p.len() == PORTS)),
        "every container kept its ten ports"
    );
    let status = api.call("GET", "/v1/status", None).expect("status");
    assert_eq!(status["containers"], CONTAINERS);
    assert_eq!(published(&agent), all, "the maps are as they were");
    let veths: BTreeSet<String> = datapath_tests::inspect::agent_veths(&node.node);
    assert_eq!(veths.len(), CONTAINERS);
    // The last container's ports still lead to it.
    let last = &namespaces[CONTAINERS - 1];
    let _server = Server::line_echo(last, 80, "last");
    let port = (FIRST + (CONTAINERS - 1) * PORTS) as u16;
    assert_eq!(
        line_exchange(&node.client, node.node_port(port), "hi").expect("an answer"),
        "last: hi"
    );
    // And the restarted agent takes changes.
    api.publish("c0", &extra)
        .expect("publish after the restart");
    assert_eq!(listed_ports(&api, "c0").len(), PORTS + 1);
    drop(_server);
    drop(agent);
    drop(namespaces);
}

#[test]
fn five_thousand_ports_are_published_in_one_request_and_one_durable_write() {
    const PORTS: u16 = 5000;
    let node = Node::new();
    let ns = node.add_container_netns("big");
    let other_ns = node.add_container_netns("other");
    let agent = Agent::start(&node);
    let api = Api::new(agent.socket());
    api.add_container("big", ns.name(), &[]).expect("add");
    api.add_container("other", other_ns.name(), &["40100:80".into()])
        .expect("add");
    let specs: Vec<String> = (0..PORTS)
        .map(|i| format!("{}:{}", 30_000 + i, 80))
        .collect();
    let records = journal_records(&agent.state_dir());

    let info = api
        .call(
            "POST",
            "/v1/containers/big/ports",
            Some(&json!({ "publish": specs })),
        )
        .expect("publish 5,000 ports at once");
    assert_eq!(
        info["publish"].as_array().map(Vec::len),
        Some(PORTS as usize)
    );
    assert_eq!(
        journal_records(&agent.state_dir()),
        records + 1,
        "one record"
    );
    let ports = published(&agent);
    let big = info["id"].as_u64().expect("an id") as u32;
    assert_eq!(
        ports.iter().filter(|(_, v)| v.container_id == big).count(),
        PORTS as usize
    );

    // All or none: one port of another container in the list, and none
    // of the others is published.
    let mut clash: Vec<String> = (0..100).map(|i| format!("{}:80", 20_000 + i)).collect();
    clash.push("40100:80".into());
    let err = api
        .call(
            "POST",
            "/v1/containers/big/ports",
            Some(&json!({ "publish": clash })),
        )
        .expect_err("a port of another container");
    assert!(format!("{err:#}").contains("other"), "{err:#}");
    assert_eq!(published(&agent), ports);

    // The CLI: repeated --publish, and a JSON list from a file, in one
    // request each.
    let file = agent.state_dir().join("../unpublish.json");
    std::fs::write(&file, serde_json::to_vec(&specs[2..]).expect("JSON")).expect("write");
    let records = journal_records(&agent.state_dir());
    let out = agent.cli_ok([
        "container",
        "unpublish",
        "big",
        "--publish",
        &specs[0],
        "-p",
        &specs[1],
        "--publish-file",
        &file.to_string_lossy(),
    ]);
    assert!(out.contains("big publishes"), "{out}");
    assert_eq!(
        journal_records(&agent.state_dir()),
        records + 1,
        "one record"
    );
    assert!(listed_ports(&api, "big").is_empty());
    assert_eq!(published(&agent).len(), 1, "only other's port is left");
    let _ = std::fs::remove_file(&file);
}

/// Sends `body` with `method` to `path` of the agent's API; returns the
/// status and the answer's body. The agent may answer before it has read
/// the whole body.
fn raw_request(agent: &Agent<'_>, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(agent.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: datapath\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send the head");
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn a_request_over_the_size_limit_says_which_limit_and_how_to_split_it() {
    let node = Node::new();
    let ns = node.add_container_netns("web");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "web", "--netns", ns.name()]);
    // 300,000 ports with a host address: more than any route takes.
    let specs: Vec<String> = (0..300_000u32)
        .map(|i| format!("198.18.0.2:{}:{}/udp", 1 + i % 60_000, 1 + i % 60_000))
        .collect();
    let body = serde_json::to_vec(&json!({ "publish": specs })).expect("JSON");
    assert!(body.len() > 8 << 20);

    let (status, answer) = raw_request(&agent, "POST", "/v1/containers/web/ports", &body);
    assert_eq!(status, 413, "{answer}");
    let message: Value = serde_json::from_str(&answer).expect("a JSON error");
    let message = message["error"].as_str().expect("an error message");
    assert!(message.contains("8 MiB"), "names the limit: {message}");
    assert!(
        message.contains("split") && message.contains("--publish-file"),
        "says how to split: {message}"
    );

    // Through the CLI, the user sees the same.
    let file = agent.state_dir().join("../too-many.json");
    std::fs::write(&file, serde_json::to_vec(&specs).expect("JSON")).expect("write");
    let out = agent.cli([
        "container",
        "publish",
        "web",
        "--publish-file",
        &file.to_string_lossy(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("8 MiB") && err.contains("split"), "{err}");
    let _ = std::fs::remove_file(&file);
    assert!(listed_ports(&Api::new(agent.socket()), "web").is_empty());
}

#[test]
fn a_crash_between_the_journal_write_and_the_map_update_leaves_a_consistent_state() {
    let node = Node::new();
    let web_ns = node.add_container_netns("web");
    let db_ns = node.add_container_netns("db");
    let mut agent = Agent::start(&node);
    let api = Api::new(agent.socket());
    let web = api
        .add_container(
            "web",
            web_ns.name(),
            &["8080:80".into(), "9090:90".into(), "9091:91".into()],
        )
        .expect("add web");
    let db = api
        .add_container("db", db_ns.name(), &["5432:5432".into()])
        .expect("add db");
    let (web_id, db_id) = (web["id"].as_u64(), db["id"].as_u64());
    let db_veth = db["host_ifname"].as_str().expect("a veth").to_owned();

    // Unpublishing writes the record, then removes the map entries: the
    // agent dies in between.
    agent.stop();
    agent.set_env(FAULT_ENV, Some("crash-after-journal"));
    agent.restart();
    let out = agent.cli(["container", "unpublish", "web", "9090:90", "9091:91"]);
    assert!(!out.status.success(), "the agent died before answering");
    assert!(
        agent.wait_exit(Duration::from_secs(10)).is_some(),
        "the agent aborted at the fault point"
    );
    let ports: Vec<u16> = published(&agent).iter().map(|(p, _)| *p).collect();
    assert_eq!(
        ports,
        [5432, 8080, 9090, 9091],
        "the crash came before the map update"
    );
    agent.set_env(FAULT_ENV, None);
    agent.restart();
    assert_eq!(listed_ports(&api, "web"), ["8080:80/tcp"]);
    let after: Vec<(u16, Option<u64>)> = published(&agent)
        .iter()
        .map(|(p, v)| (*p, Some(u64::from(v.container_id))))
        .collect();
    assert_eq!(after, [(5432, db_id), (8080, web_id)]);

    // Deleting writes the record, then tears down: the same.
    agent.stop();
    agent.set_env(FAULT_ENV, Some("crash-after-journal"));
    agent.restart();
    let _ = agent.cli(["container", "del", "db"]);
    assert!(agent.wait_exit(Duration::from_secs(10)).is_some());
    assert!(
        datapath_tests::inspect::agent_veths(&node.node).contains(&db_veth),
        "the crash came before the teardown"
    );
    agent.set_env(FAULT_ENV, None);
    agent.restart();
    let names: Vec<String> = agent.containers().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["web"]);
    assert!(!datapath_tests::inspect::agent_veths(&node.node).contains(&db_veth));
    let ports: Vec<u16> = published(&agent).iter().map(|(p, _)| *p).collect();
    assert_eq!(ports, [8080]);
}

#[test]
fn the_conntrack_listing_is_streamed_and_can_be_limited() {
    let node = Node::new();
    let ns = node.add_container_netns("web");
    let agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ns.name(),
        "-p",
        "8080:80",
    ]);
    let _server = Server::line_echo(&ns, 80, "web");
    for i in 0..3 {
        let line = format!("hello {i}");
        assert_eq!(
            line_exchange(&node.client, node.node_port(8080), &line).expect("an answer"),
            format!("web: {line}")
        );
    }
    assert_eq!(agent.flows().len(), 3);
    // Counted in the background, the status's number catches up with the
    // tables' (two entries per flow, confirmed or not; the closed flows
    // stay live for the closing timeout, 10 s).
    datapath_tests::wait::until("status counts the entries", Duration::from_secs(8), || {
        let in_table = datapath_tests::inspect::map_dump(&agent, "CT").len()
            + datapath_tests::inspect::map_dump(&agent, "CT_NEW").len();
        in_table >= 6 && agent.status()["conntrack_entries"].as_u64() == Some(in_table as u64)
    });
    let limited = agent.cli_json(["conntrack", "list", "--json", "--limit", "2"]);
    assert_eq!(limited.as_array().map(Vec::len), Some(2));
    let theirs = agent.cli_json(["conntrack", "list", "--json", "--container", "web"]);
    assert_eq!(theirs.as_array().map(Vec::len), Some(3));
    // Streamed as it is read: no length known up front.
    let mut s = UnixStream::connect(agent.socket()).expect("connect");
    s.write_all(b"GET /v1/conntrack HTTP/1.1\r\nHost: datapath\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let out = agent.cli(["conntrack", "list", "--container", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody"));
}
