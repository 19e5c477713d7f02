//! Surviving restarts, crashes, floods and bad input, in namespace nodes
//! with the real agent:
//!
//! * restarts: established flows through a published port and through the
//!   masquerade survive `kill -9` of the agent and its restart, and the
//!   datapath forwards new connections while no agent runs;
//! * reconciliation on start: orphaned veths, containers and map entries
//!   are removed, a container whose veth vanished is recreated, a crash at
//!   any step of `container add` leaves all of the container or nothing, a
//!   corrupt state file stops the agent with a message naming it, and
//!   `datapath agent --cleanup` removes what the agent made and nothing else;
//! * where no one belongs: a container cannot spoof its source address or
//!   MAC, the uplink cannot reach container addresses directly unless the
//!   operator allows it, a SYN flood neither breaks an established flow nor
//!   grows memory, and fragmented UDP to a published port arrives whole or
//!   is dropped and counted;
//! * the API: a root-only socket, 4xx answers with a message for malformed
//!   and oversized requests, concurrent adds of one container serialized,
//!   and a CLI that prints the agent's error.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::{fs::MetadataExt, net::UnixStream},
    process::{Command, Output},
    time::Duration,
};

use datapath::{model::identity::VETH_GROUP, store::journal::FAULT_ENV};
use datapath_common::{Endpoint, EndpointKey, ServiceKey, ServiceValue, names, proto};
use datapath_tests::{
    agent::{Agent, datapath_bin},
    capture::{Capture, containing, ipv4_source, send_frames},
    events::{RtEvent, RtMonitor},
    fixture::Deployment,
    frame::Frame,
    inspect::{self, addrs_of, agent_veths, pinned_hash},
    lock::TrafficLock,
    netns::Netns,
    node::{self, Node, UPLINK},
    traffic::{
        IO_TIMEOUT, RrFlow, Server, assert_refused, assert_unanswered, line_exchange, udp_send,
    },
    wait,
};

// ---- helpers -------------------------------------------------------------------------

/// The names of the links of `ns`.
fn links(ns: &Netns) -> BTreeSet<String> {
    inspect::links(ns).into_iter().collect()
}

fn services(agent: &Agent) -> Vec<(ServiceKey, ServiceValue)> {
    pinned_hash(agent, names::SERVICES)
}

fn endpoints(agent: &Agent) -> Vec<(EndpointKey, Endpoint)> {
    pinned_hash(agent, names::ENDPOINTS)
}

/// The agent's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// `line` sent over a new connection from `ns` to `addr` must come back
/// from the line server `server`.
#[track_caller]
fn assert_answers(ns: &Netns, addr: SocketAddr, server: &str, line: &str) {
    match line_exchange(ns, addr, line) {
        Ok(answer) => assert_eq!(answer, format!("{server}: {line}"), "{addr}"),
        Err(e) => panic!("{line:?} to {addr}: {e}"),
    }
}

// ---- restarts ----------------------------------------------------------------------

/// A node's agent with container `web` publishing 8080:80, a line server
/// `web` on its port 80 and one `outside` on the client's port 9000.
fn web_and_outside(node: &Node) -> (Deployment<'_>, Server, Server) {
    let web = Deployment::start(node, "web", &["-p", "8080:80"]);
    let inside = Server::line_echo(&web.ctr, 80, "web");
    let outside = Server::line_echo(&node.client, 9000, "outside");
    (web, inside, outside)
}

#[test]
fn established_flows_through_a_published_port_and_the_masquerade_survive_a_killed_agent() {
    let node = Node::new();
    let (mut web, _inside, _outside) = web_and_outside(&node);
    let inbound = RrFlow::start(&node.client, node.node_port(8080), "web");
    let outbound = RrFlow::start(&web.ctr, node.client_port(9000), "outside");
    inbound.wait_more("inbound before the kill", 5);
    outbound.wait_more("outbound before the kill", 5);

    web.agent.kill();
    // While no agent runs, both flows keep exchanging: the pinned links
    // keep the programs attached and the pinned maps keep the flows.
    inbound.wait_more("inbound while the agent is down", 10);
    outbound.wait_more("outbound while the agent is down", 10);

    web.agent.restart();
    inbound.wait_more("inbound after the restart", 10);
    outbound.wait_more("outbound after the restart", 10);
    let flows = web.agent.flows();
    let kinds: Vec<&str> = flows.iter().filter_map(|f| f["kind"].as_str()).collect();
    assert!(
        kinds.contains(&"dnat") && kinds.contains(&"snat"),
        "the restarted agent sees the flows: {flows:#?}"
    );
    let n_in = inbound.finish().expect("the inbound flow never failed");
    let n_out = outbound
        .finish()
        .expect("the masqueraded flow never failed");
    assert!(n_in >= 25 && n_out >= 25, "{n_in} and {n_out} exchanges");
}

#[test]
fn new_connections_are_forwarded_while_the_agent_is_down_and_after_its_restart() {
    let node = Node::new();
    let (mut web, inside, _outside) = web_and_outside(&node);
    let (published, outside) = (node.node_port(8080), node.client_port(9000));
    assert_answers(&node.client, published, "web", "up");

    web.agent.kill();
    assert!(web.agent.pid().is_none(), "no agent runs");
    for i in 0..5 {
        let line = format!("down {i}");
        assert_answers(&node.client, published, "web", &line);
        assert_answers(&web.ctr, outside, "outside", &line);
    }
    assert!(
        inside.peers().iter().all(|p| *p.ip() == node.client_addr()),
        "translated, not routed: {:?}",
        inside.peers()
    );

    web.agent.restart();
    assert_answers(&node.client, published, "web", "again");
    assert_answers(&web.ctr, outside, "outside", "again");
    let st = web.agent.status();
    assert!(
        st["attachments"]
            .as_array()
            .expect("attachments")
            .iter()
            .any(|a| a["ifname"] == UPLINK),
        "the restarted agent adopted the uplink's link: {st:#}"
    );
}

// ---- reconciliation -----------------------------------------------------------------

#[test]
fn an_orphaned_veth_is_removed_on_the_next_start_and_other_veths_are_kept() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    web.agent.kill();
    let group = VETH_GROUP.to_string();
    // An orphan: a veth of the agent's (in its group) of no container.
    node.node.exec_ok(
        "ip",
        [
            "link", "add", "dpabc", "group", &group, "type", "veth", "peer", "name", "orph0",
        ],
    );
    // Not the agent's, whatever their names: never removed.
    for (a, b) in [("keep0", "keep1"), ("dpdef", "keep2")] {
        node.node
            .exec_ok("ip", ["link", "add", a, "type", "veth", "peer", "name", b]);
    }
    web.agent.restart();
    let after = links(&node.node);
    assert!(
        !after.contains("dpabc") && !after.contains("orph0"),
        "the orphan is gone: {after:?}"
    );
    assert!(
        ["keep0", "keep1", "dpdef", "keep2"]
            .iter()
            .all(|l| after.contains(*l)),
        "veths the agent did not make are kept: {after:?}"
    );
    assert!(
        after.contains(&web.info.host_ifname),
        "the container's own veth is kept"
    );
    let _server = Server::line_echo(&web.ctr, 80, "web");
    assert_answers(&node.client, node.node_port(8080), "web", "kept");
}

/// Rewrites the agent's state file (the snapshot, which holds the whole
/// state once the agent has stopped cleanly) through `edit` on its JSON.
fn edit_state(agent: &Agent, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = agent.state_dir().join("state.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("state is JSON");
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).expect("JSON"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn a_container_missing_from_the_state_file_is_removed_on_the_next_start() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    let db_ns = node.add_container_netns("db");
    let db = web.agent.add("db", &db_ns, &["-p", "5432:5432"]);
    // Anything listening: a port that is still published would answer.
    let _server = Server::line_echo(&web.ctr, 80, "web");
    assert_answers(&node.client, node.node_port(8080), "web", "before");
    // Stopped cleanly, the agent leaves the whole state in the snapshot.
    web.agent.stop();
    edit_state(&web.agent, |v| {
        v["containers"]
            .as_object_mut()
            .expect("containers by name")
            .remove("web")
            .expect("web was saved");
    });
    web.agent.restart();

    let names: Vec<String> = web.agent.containers().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["db"]);
    assert_eq!(
        agent_veths(&node.node),
        BTreeSet::from([db.host_ifname.clone()])
    );
    assert!(
        !links(&web.ctr).contains("eth0"),
        "the container end went with the veth"
    );
    let svc = services(&web.agent);
    assert!(
        svc.iter().all(|(_, v)| v.container_id == db.id) && svc.len() == 1,
        "only db's published port is left: {svc:?}"
    );
    let eps = endpoints(&web.agent);
    assert_eq!(
        eps.iter()
            .map(|(k, _)| Ipv4Addr::from(k.addr))
            .collect::<Vec<_>>(),
        [db.addr],
        "only db's endpoint is left"
    );
    let link_pins: Vec<String> = std::fs::read_dir(web.agent.bpffs_dir().join("links"))
        .expect("links dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !link_pins.iter().any(|p| p.ends_with(&web.info.host_ifname)),
        "web's link pin is gone: {link_pins:?}"
    );
    assert_refused(
        &node.client,
        node.node_port(8080),
        "web's port is no longer published: the node itself refuses it",
    );
}

#[test]
fn an_orphaned_published_port_in_the_map_is_removed_on_the_next_start() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    let _server = Server::line_echo(&web.ctr, 80, "web");
    web.agent.kill();
    // A port published to web by no container the agent knows: as if an
    // agent had crashed between the map update and the state write.
    let key = ServiceKey {
        addr: [0; 4],
        port: 9090,
        proto: proto::TCP,
        _pad: 0,
    };
    let value = ServiceValue {
        backend_addr: web.info.addr.octets(),
        backend_port: 80,
        _pad: 0,
        ifindex: node::ifindex(&node.node, &web.info.host_ifname),
        container_id: 0xdead,
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
    let pin = inspect::map_pin(&web.agent, names::SERVICES);
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "update", "pinned"])
        .arg(&pin)
        .arg("key")
        .arg("hex")
        .args(hex(bytemuck::bytes_of(&key)))
        .arg("value")
        .arg("hex")
        .args(hex(bytemuck::bytes_of(&value)));
    let out = cmd.output().expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let orphan = node.node_port(9090);
    assert_answers(&node.client, orphan, "web", "orphan");
    web.agent.restart();
    let svc = services(&web.agent);
    assert!(
        !svc.iter().any(|(k, _)| k.port == 9090),
        "the orphan entry is gone: {svc:?}"
    );
    assert!(
        svc.iter()
            .any(|(k, v)| k.port == 8080 && v.container_id == web.info.id),
        "web's own entry is kept: {svc:?}"
    );
    assert_refused(
        &node.client,
        orphan,
        "the orphaned port is no longer published",
    );
}

#[test]
fn a_container_whose_veth_was_deleted_is_recreated_on_the_next_start() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    web.agent.kill();
    node.node
        .exec_ok("ip", ["link", "del", web.info.host_ifname.as_str()]);
    assert!(!links(&web.ctr).contains("eth0"));
    web.agent.restart();

    let again = web.agent.container("web").expect("web is listed");
    assert_eq!(
        (again.id, again.addr),
        (web.info.id, web.info.addr),
        "the same container"
    );
    assert!(agent_veths(&node.node).contains(&web.info.host_ifname));
    assert_eq!(
        addrs_of(&web.ctr, "eth0"),
        [web.info.addr],
        "its address is back"
    );
    let _server = Server::line_echo(&web.ctr, 80, "web");
    assert_answers(&node.client, node.node_port(8080), "web", "back");
    let _outside = Server::line_echo(&node.client, 9000, "outside");
    assert_answers(&web.ctr, node.client_port(9000), "outside", "out");
}

#[test]
fn a_container_whose_netns_is_gone_is_removed_on_the_next_start() {
    let node = Node::new();
    let Deployment { mut agent, ctr, .. } = Deployment::start(&node, "web", &["-p", "8080:80"]);
    agent.kill();
    drop(ctr);
    agent.restart();
    assert!(agent.containers().is_empty());
    assert!(agent_veths(&node.node).is_empty());
    assert!(services(&agent).is_empty());
    assert!(endpoints(&agent).is_empty());
}

/// Writes `bytes` as the agent's state file and asserts that the agent
/// refuses to start on it (`what` it is) with an error, not a panic, whose
/// message names the file and says `says`, and that it leaves the file as
/// it was for the operator.
#[track_caller]
fn assert_state_refused(agent: &mut Agent, what: &str, bytes: &[u8], says: &str) {
    let path = agent.state_dir().join("state.json");
    std::fs::write(&path, bytes).expect("write the state");
    let err = agent
        .try_restart()
        .expect_err("the agent refuses a state file it cannot trust");
    assert!(
        err.contains(&path.display().to_string()) && err.contains(says),
        "{what}: the message names the file and says {says:?}: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "{what}: an error, not a panic: {err}"
    );
    assert_eq!(
        std::fs::read(&path).expect("still there"),
        bytes,
        "{what}: the file is left for the operator"
    );
}

#[test]
fn a_corrupt_state_file_stops_the_agent_with_a_message_naming_it() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &[]);
    web.agent.stop();
    let path = web.agent.state_dir().join("state.json");
    let whole = std::fs::read(&path).expect("state file");
    for (what, bytes) in [
        ("truncated", &whole[..whole.len() / 2]),
        ("not JSON", b"\x00\x01garbage"),
        ("empty", b""),
    ] {
        assert_state_refused(&mut web.agent, what, bytes, "corrupt");
    }
    // Put back, the agent starts and has its container.
    std::fs::write(&path, &whole).expect("restore the state");
    web.agent.restart();
    assert!(web.agent.container("web").is_some());
}

#[test]
fn a_state_file_with_impossible_values_stops_the_agent_with_a_message_naming_it() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    web.agent.stop();
    let path = web.agent.state_dir().join("state.json");
    let whole = std::fs::read(&path).expect("state file");
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 4] = [
        ("no ports", |v| {
            v["containers"]["web"]["publish"][0]["count"] = 0.into();
        }),
        ("a range beyond 65535", |v| {
            v["containers"]["web"]["publish"][0]["host_port"] = 65535.into();
            v["containers"]["web"]["publish"][0]["count"] = 2.into();
        }),
        ("an id handed out again", |v| {
            v["next_id"] = 1.into();
        }),
        ("a container under another name", |v| {
            v["containers"]["web"]["name"] = "db".into();
        }),
    ];
    for (what, edit) in edits {
        let mut v: serde_json::Value = serde_json::from_slice(&whole).expect("state is JSON");
        edit(&mut v);
        let edited = serde_json::to_vec_pretty(&v).expect("JSON");
        assert_state_refused(&mut web.agent, what, &edited, "");
    }
    std::fs::write(&path, &whole).expect("restore the state");
    web.agent.restart();
    assert!(web.agent.container("web").is_some());
}

/// Where a crash cuts `container add` off, each seen from outside the
/// moment it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CrashPoint {
    /// The host end of the veth pair appeared in the node namespace.
    VethMade,
    /// The container end appeared in the container's namespace as `eth0`.
    InterfaceMoved,
    /// The container's address was set.
    AddressSet,
    /// The container's default route was set.
    DefaultRoute,
    /// The published port is in the SERVICES map.
    PortPublished,
    /// The container's record is durable in the state's journal: the add
    /// is committed, only its answer is left. The agent is started with
    /// the test fault point `DATAPATH_TEST_FAULT=crash-after-journal` for
    /// this one, and aborts itself right there.
    Recorded,
}

/// Container `name`'s add cut off by SIGKILL at `point`; returns whether
/// the persisted state held the container when the agent died (the add
/// had committed) and the CLI's output.
fn add_and_crash_at(
    node: &Node,
    agent: &mut Agent,
    ns: &Netns,
    name: &str,
    port: u16,
    point: CrashPoint,
) -> (bool, Output) {
    let mut node_events = RtMonitor::open(&node.node);
    let mut ctr_events = RtMonitor::open(ns);
    let state_dir = agent.state_dir();
    if point == CrashPoint::Recorded {
        agent.stop();
        agent.set_env(FAULT_ENV, Some("crash-after-journal"));
        agent.restart();
    }
    let services_pin = inspect::map_pin(agent, names::SERVICES);
    let socket = agent.socket().to_owned();
    let limit = Duration::from_secs(10);
    let (seen, cli) = std::thread::scope(|s| {
        let adding = s.spawn(|| {
            let mut cmd = Command::new(datapath_bin());
            cmd.arg("--api-socket")
                .arg(&socket)
                .args(["container", "add", name, "--netns", ns.name(), "-p"])
                .arg(format!("{port}:80"));
            node.node.run(&mut cmd)
        });
        let seen = match point {
            CrashPoint::VethMade => node_events
                .wait(
                    limit,
                    |e| matches!(e, RtEvent::NewLink { ifname } if ifname.starts_with("dp")),
                )
                .is_some(),
            CrashPoint::InterfaceMoved => ctr_events
                .wait(
                    limit,
                    |e| matches!(e, RtEvent::NewLink { ifname } if ifname.as_str() == "eth0"),
                )
                .is_some(),
            CrashPoint::AddressSet => ctr_events
                .wait(
                    limit,
                    |e| matches!(e, RtEvent::NewAddr { ifindex } if *ifindex != 1),
                )
                .is_some(),
            CrashPoint::DefaultRoute => ctr_events
                .wait(limit, |e| {
                    matches!(
                        e,
                        RtEvent::NewRoute {
                            table: 254,
                            dst_len: 0
                        }
                    )
                })
                .is_some(),
            CrashPoint::PortPublished => {
                let data = aya::maps::MapData::from_pin(&services_pin).expect("SERVICES pin");
                let map: aya::maps::HashMap<_, ServiceKey, ServiceValue> =
                    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
                        .expect("SERVICES layout");
                let key = ServiceKey {
                    addr: [0; 4],
                    port,
                    proto: proto::TCP,
                    _pad: 0,
                };
                let deadline = std::time::Instant::now() + limit;
                loop {
                    if map.get(&key, 0).is_ok() {
                        break true;
                    }
                    if std::time::Instant::now() > deadline {
                        break false;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            CrashPoint::Recorded => agent.wait_exit(limit).is_some(),
        };
        agent.kill();
        (seen, adding.join().expect("the adding thread"))
    });
    agent.set_env(FAULT_ENV, None);
    assert!(seen, "{name}: the add never reached {point:?}");
    let committed = datapath::store::journal::load(&state_dir)
        .unwrap_or_else(|e| panic!("{name}: the state does not read back: {e}"))
        .get(name)
        .is_some();
    (committed, cli)
}

#[test]
fn a_crash_at_any_step_of_container_add_leaves_the_whole_container_or_nothing() {
    // Each crash point is waited for and the agent killed the moment it is
    // seen; the state file then tells whether the add had committed. Once
    // in a while the agent gets from one step to its commit before the
    // kill lands: that attempt is repeated (it would test nothing), a few
    // times at most.
    const ATTEMPTS: u32 = 5;
    let node = Node::new();
    let mut agent = Agent::start(&node);
    let mut namespaces = Vec::new();
    let points = [
        CrashPoint::VethMade,
        CrashPoint::InterfaceMoved,
        CrashPoint::AddressSet,
        CrashPoint::DefaultRoute,
        CrashPoint::PortPublished,
        CrashPoint::Recorded,
    ];
    let mut n = 0u16;
    for point in points {
        let mut landed = false;
        for attempt in 1..=ATTEMPTS {
            n += 1;
            let name = format!("c{n}");
            let port = 8100 + n;
            let ns = node.add_container_netns(&name);
            let (committed, cli) = add_and_crash_at(&node, &mut agent, &ns, &name, port, point);
            agent.restart();
            check_whole_or_nothing(&node, &agent, &ns, &name, port, committed);
            namespaces.push(ns);
            if point == CrashPoint::Recorded {
                assert!(committed, "{name}: the record was written without it");
                landed = true;
                break;
            }
            if committed {
                eprintln!("{point:?}, attempt {attempt}: the add committed before the kill");
                continue;
            }
            assert!(
                !cli.status.success(),
                "{name}: the add was cut off at {point:?}, yet the CLI got an answer:\n{}",
                String::from_utf8_lossy(&cli.stdout)
            );
            landed = true;
            break;
        }
        assert!(
            landed,
            "no crash landed at {point:?} in {ATTEMPTS} attempts"
        );
    }
}

/// After a crash during `name`'s add and a restart: the node holds all of
/// the container (if the add had `committed`) or nothing of it, and
/// nothing that belongs to no listed container.
#[track_caller]
fn check_whole_or_nothing(
    node: &Node,
    agent: &Agent,
    ns: &Netns,
    name: &str,
    port: u16,
    committed: bool,
) {
    let all = agent.containers();
    let listed = all.iter().find(|c| c.name == name);
    let svc = services(agent);
    let eps = endpoints(agent);
    let ids: BTreeSet<u32> = all.iter().map(|c| c.id).collect();
    assert_eq!(
        agent_veths(&node.node),
        all.iter().map(|c| c.host_ifname.clone()).collect(),
        "{name}: the veths are those of the listed containers"
    );
    assert!(
        svc.iter().all(|(_, v)| ids.contains(&v.container_id))
            && eps.iter().all(|(_, v)| ids.contains(&v.container_id)),
        "{name}: map entries belong to listed containers"
    );
    assert_eq!(
        listed.is_some(),
        committed,
        "{name}: listed after the restart exactly if the add had committed"
    );
    match listed {
        Some(c) => {
            assert!(
                svc.iter()
                    .any(|(k, v)| k.port == port && v.container_id == c.id),
                "{name}: listed, so its port is published"
            );
            assert!(eps.iter().any(|(k, _)| k.addr == c.addr.octets()));
            assert_eq!(addrs_of(ns, "eth0"), [c.addr], "{name}: its interface");
        }
        None => {
            assert!(
                !links(ns).contains("eth0"),
                "{name}: not listed, so no interface is left in its namespace"
            );
            assert!(!svc.iter().any(|(k, _)| k.port == port));
        }
    }
}

#[test]
fn cleanup_removes_every_program_pin_veth_and_state_and_nothing_else() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    let app_ns = node.add_container_netns("app");
    web.agent.add("app", &app_ns, &[]);
    let st = web.agent.status();
    let programs: BTreeSet<u64> = st["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .filter_map(|a| a["program_id"].as_u64())
        .collect();
    assert!(programs.len() >= 2, "uplink and container programs: {st:#}");
    node.node.exec_ok(
        "ip",
        [
            "link", "add", "keep0", "type", "veth", "peer", "name", "keep1",
        ],
    );
    let state = web.agent.state_dir().join("state.json");
    assert!(state.exists());

    let out = web.agent.cleanup();
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !web.agent.bpffs_dir().exists(),
        "the pins are gone: {}",
        web.agent.bpffs_dir().display()
    );
    assert!(!state.exists(), "the state is gone");
    assert!(agent_veths(&node.node).is_empty(), "the veths are gone");
    assert!(!links(&web.ctr).contains("eth0") && !links(&app_ns).contains("eth0"));
    // Nothing holds the programs any more: the kernel frees them.
    wait::until("every program freed", Duration::from_secs(5), || {
        programs.iter().all(|id| {
            !Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string()])
                .output()
                .expect("run bpftool")
                .status
                .success()
        })
    });
    // And nothing else went: the uplink, its address, a foreign veth, the
    // containers' namespaces.
    let after = links(&node.node);
    assert!(after.contains(UPLINK) && after.contains("keep0") && after.contains("keep1"));
    assert_eq!(addrs_of(&node.node, UPLINK), [node.node_addr()]);
    assert!(Netns::exists(web.ctr.name()) && Netns::exists(app_ns.name()));
    assert!(node.client.ping(node.node_addr()), "the node still answers");
    // A second cleanup finds nothing to do and succeeds.
    let again = web.agent.cleanup();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

// ---- where no one belongs -------------------------------------------------------------

/// Asserts what the client's wire showed of frames sent from a container:
/// every `genuine` one arrived (`n` of them; the positive control: the
/// capture ran and saw the path the spoofed frames would have taken) and
/// no `spoofed` one did.
#[track_caller]
fn assert_wire(wire: &[Vec<u8>], genuine: &[u8], n: usize, spoofed: &[&[u8]]) {
    assert_eq!(
        containing(wire, genuine).len(),
        n,
        "the capture saw the container's genuine frames"
    );
    for s in spoofed {
        let leaked = containing(wire, s);
        assert!(
            leaked.is_empty(),
            "{} frames carrying {:?} reached the client's wire, e.g. {:02x?}",
            leaked.len(),
            String::from_utf8_lossy(s),
            leaked.first()
        );
    }
}

#[test]
fn a_container_cannot_send_from_an_address_not_its_own() {
    let node = Node::new();
    let app = Deployment::start(&node, "app", &[]);
    // Were the spoofed packets forwarded, the client could receive them and
    // answer: it routes the pool through the node.
    node.route_from_client_via_node(app.agent.pool());
    let pool_other = Ipv4Addr::from(u32::from(app.info.addr) + 100);
    let uplink_neighbour = Ipv4Addr::new(198, 18, 0, 77);
    for spoof in [pool_other, uplink_neighbour] {
        app.ctr
            .exec_ok("ip", ["addr", "add", &format!("{spoof}/32"), "dev", "eth0"]);
    }
    let before = app.agent.counter("drop_spoofed");
    let capture = Capture::start(&node.client, node::CLIENT_IF);
    let sink = Server::udp_sink(&node.client, 9001, "sink");
    let to = node.client_port(9001);
    for _ in 0..5 {
        for spoof in [pool_other, uplink_neighbour] {
            udp_send(&app.ctr, SocketAddr::from((spoof, 0)), to, b"spoofed").expect("send");
        }
        udp_send(
            &app.ctr,
            SocketAddr::from((app.info.addr, 0)),
            to,
            b"genuine",
        )
        .expect("send");
    }
    // Each spoofed datagram went before a genuine one on the same path.
    assert_eq!(
        sink.wait_payload(b"genuine", 5, IO_TIMEOUT),
        5,
        "the container's own datagrams arrive"
    );
    let wire = capture.finish();
    let got = sink.datagrams();
    assert!(
        got.iter()
            .all(|(from, p)| p == b"genuine" && *from.ip() == node.node_addr()),
        "only genuine datagrams, masqueraded: {got:?}"
    );
    assert_wire(&wire, b"genuine", 5, &[b"spoofed"]);
    let spoofed_sources: Vec<Ipv4Addr> = wire
        .iter()
        .filter_map(|f| ipv4_source(f))
        .filter(|s| *s == pool_other || *s == uplink_neighbour)
        .collect();
    assert!(spoofed_sources.is_empty(), "{spoofed_sources:?}");
    let dropped = app.agent.counter("drop_spoofed") - before;
    assert!(dropped >= 10, "{dropped} spoofed packets counted");
}

/// The container's own MAC and its gateway's (the host end of its veth).
fn macs(node: &Node, d: &Deployment) -> ([u8; 6], [u8; 6]) {
    (
        node::mac(&d.ctr, "eth0"),
        node::mac(&node.node, &d.info.host_ifname),
    )
}

#[test]
fn a_container_cannot_send_from_a_mac_not_its_own() {
    let node = Node::new();
    let app = Deployment::start(&node, "app", &[]);
    let (own_mac, gateway_mac) = macs(&node, &app);
    let other_mac = [0x02, 0x66, 0x66, 0x66, 0x66, 0x66];
    let frame = |mac: [u8; 6], marker: &[u8]| {
        Frame::udp(
            SocketAddr::from((app.info.addr, 5000)),
            node.client_port(9001),
        )
        .macs(mac, gateway_mac)
        .payload(marker.to_vec())
        .build()
    };
    let before = app.agent.counter("drop_spoofed");
    let sink = Server::udp_sink(&node.client, 9001, "sink");
    let capture = Capture::start(&node.client, node::CLIENT_IF);
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(frame(other_mac, b"wrong-mac"));
        frames.push(frame(own_mac, b"right-mac"));
    }
    send_frames(&app.ctr, "eth0", &frames);
    assert_eq!(
        sink.wait_payload(b"right-mac", 5, IO_TIMEOUT),
        5,
        "frames from the container's own MAC go through"
    );
    let wire = capture.finish();
    assert_eq!(sink.count_payload(b"wrong-mac"), 0);
    assert_wire(&wire, b"right-mac", 5, &[b"wrong-mac"]);
    let dropped = app.agent.counter("drop_spoofed") - before;
    assert!(dropped >= 5, "{dropped} spoofed frames counted");
}

#[test]
fn a_container_cannot_spoof_with_other_ip_protocols_or_fragments() {
    let node = Node::new();
    let app = Deployment::start(&node, "app", &[]);
    node.route_from_client_via_node(app.agent.pool());
    let (own_mac, gateway_mac) = macs(&node, &app);
    let spoof = Ipv4Addr::new(198, 18, 0, 77);
    let base = |marker: &[u8]| {
        Frame::udp(SocketAddr::from((spoof, 5000)), node.client_port(9001))
            .macs(own_mac, gateway_mac)
            .payload(marker.to_vec())
    };
    let frames = vec![
        // An IP protocol the datapath does not translate.
        Frame::raw_ip(spoof, node.client_addr(), 253)
            .macs(own_mac, gateway_mac)
            .payload(&b"spoof-proto-253"[..])
            .build(),
        // GRE.
        Frame::raw_ip(spoof, node.client_addr(), 47)
            .macs(own_mac, gateway_mac)
            .payload(&b"spoof-proto-gre"[..])
            .build(),
        // A first and a later fragment of UDP.
        base(b"spoof-first-fragment-pad").fragment(true, 0).build(),
        base(b"spoof-later-fragment").fragment(false, 8).build(),
    ];
    // After them, a genuine datagram on the same path, as the control.
    let genuine = Frame::udp(
        SocketAddr::from((app.info.addr, 5000)),
        node.client_port(9001),
    )
    .macs(own_mac, gateway_mac)
    .payload(&b"genuine"[..])
    .build();
    let before = app.agent.counter("drop_spoofed");
    let sink = Server::udp_sink(&node.client, 9001, "sink");
    let capture = Capture::start(&node.client, node::CLIENT_IF);
    send_frames(&app.ctr, "eth0", &frames);
    send_frames(&app.ctr, "eth0", &[genuine]);
    assert_eq!(sink.wait_payload(b"genuine", 1, IO_TIMEOUT), 1);
    let wire = capture.finish();
    assert_wire(&wire, b"genuine", 1, &[b"spoof-"]);
    let leaked: Vec<&Vec<u8>> = wire
        .iter()
        .filter(|f| ipv4_source(f) == Some(spoof))
        .collect();
    assert!(
        leaked.is_empty(),
        "{} spoofed packets reached the client's wire, e.g. {:02x?}",
        leaked.len(),
        leaked.first()
    );
    let dropped = app.agent.counter("drop_spoofed") - before;
    assert!(dropped >= frames.len() as u64, "{dropped} counted");
}

#[test]
fn uplink_traffic_straight_to_a_container_address_is_dropped_and_counted() {
    let node = Node::new();
    let web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    let server = Server::line_echo(&web.ctr, 80, "web");
    node.route_from_client_via_node(web.agent.pool());
    let before = web.agent.counter("drop_direct_routing");
    assert_unanswered(
        &node.client,
        SocketAddr::from((web.info.addr, 80)),
        Duration::from_millis(1500),
        "the container is not reachable directly",
    );
    assert!(
        !node.client.ping(web.info.addr),
        "ping reached the container"
    );
    assert!(server.peers().is_empty(), "{:?}", server.peers());
    // At least the connection attempt's SYN and the ping; how many
    // retransmissions went out within the bounds depends on the load.
    let dropped = web.agent.counter("drop_direct_routing") - before;
    assert!(dropped >= 2, "{dropped} counted");
    // The published port still works.
    assert_answers(&node.client, node.node_port(8080), "web", "published");
}

#[test]
fn uplink_traffic_reaches_a_container_address_when_direct_routing_is_allowed() {
    let node = Node::new();
    let web = Deployment::start_with(
        Agent::builder(&node).args(["--allow-direct-routing"]),
        "web",
        &[],
    );
    let server = Server::line_echo(&web.ctr, 80, "web");
    node.route_from_client_via_node(web.agent.pool());
    assert_answers(
        &node.client,
        SocketAddr::from((web.info.addr, 80)),
        "web",
        "direct",
    );
    assert_eq!(
        *server.peers()[0].ip(),
        node.client_addr(),
        "routed, not translated"
    );
    assert!(node.client.ping(web.info.addr));
    assert_eq!(web.agent.counter("drop_direct_routing"), 0);
}

/// `hping3` SYN flood of `count` packets at the node's `port`, bounded to
/// 20 s: each from another source port of an address on the client's link
/// that nobody holds (so no one ever answers the container's SYN-ACKs).
/// Not from random addresses: the node would resolve a neighbour entry for
/// each, and the kernel's neighbour table is shared by every namespace, so
/// a full one would stall the other tests' traffic.
fn syn_flood(node: &Node, port: u16, count: u32) {
    let spoofed = Ipv4Addr::from(u32::from(node.client_addr()) + 200);
    let flood = node.client.run(Command::new("timeout").args([
        "20",
        "hping3",
        "-q",
        "-S",
        "-p",
        &port.to_string(),
        "-a",
        &spoofed.to_string(),
        "-c",
        &count.to_string(),
        "--faster",
        &node.node_addr().to_string(),
    ]));
    assert!(
        flood.status.code() != Some(124),
        "hping3 did not finish: {}",
        String::from_utf8_lossy(&flood.stderr)
    );
}

#[test]
fn a_syn_flood_leaves_an_established_flow_working_and_memory_bounded() {
    const CT_MAX: u64 = 4096;
    let node = Node::new();
    node.default_route_via_client();
    let web = Deployment::start_with(
        Agent::builder(&node).args([
            "--ct-max",
            &CT_MAX.to_string(),
            "--ct-timeout-tcp-syn",
            "3s",
        ]),
        "web",
        &["-p", "8080:80"],
    );
    let _server = Server::line_echo(&web.ctr, 80, "web");
    let published = node.node_port(8080);
    let flow = RrFlow::start(&node.client, published, "web");
    flow.wait_more("before the flood", 5);
    let pid = web.agent.pid().expect("running");
    let rss_before = rss_kib(pid);

    // The flood runs under the traffic lock.
    let _lock = TrafficLock::acquire();
    syn_flood(&node, 8080, 20_000);
    flow.wait_more("right after the flood", 10);

    let st = web.agent.status();
    let c = &st["counters"];
    let new = c["dnat_new"].as_u64().expect("dnat_new");
    let full = c["drop_ct_full"].as_u64().expect("drop_ct_full");
    assert_eq!(full, 0, "no flow is refused as table full: {c:#}");
    assert!(new >= 10_000, "the flood arrived ({new} new flows): {c:#}");
    let entries = st["conntrack_entries"].as_u64().expect("entries");
    let bound = CT_MAX + CT_MAX.max(4096);
    assert!(entries <= bound, "{entries} entries > {bound}");
    assert_eq!(st["conntrack_max"].as_u64(), Some(CT_MAX));
    let rss_after = rss_kib(pid);
    eprintln!(
        "flood: {new} new flows, {entries} entries, agent RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "agent memory grew from {rss_before} to {rss_after} KiB"
    );

    // The flood only pushed out other unconfirmed flows: a new connection
    // gets in at once, and the established one never stopped.
    line_exchange(&node.client, published, "new").expect("a new connection right after");
    flow.wait_more("after the flood", 5);
    flow.finish()
        .expect("the established flow survived the flood");
}

/// How many of the agent's tracked flows there are.
fn flow_count(agent: &Agent) -> usize {
    agent.flows().len()
}

#[test]
fn the_half_open_flows_of_a_spoofed_syn_flood_expire_like_unanswered_ones() {
    // A spoofed SYN is answered by the container, but its source never
    // completes the handshake: its flow must expire on the short SYN
    // timeout, not live on as an established one and keep the table full.
    let node = Node::new();
    let web = Deployment::start_with(
        Agent::builder(&node).args(["--ct-timeout-tcp-syn", "2s"]),
        "web",
        &["-p", "8080:80"],
    );
    let _server = Server::line_echo(&web.ctr, 80, "web");
    let flow = RrFlow::start(&node.client, node.node_port(8080), "web");
    flow.wait_more("before the flood", 3);
    // The flood runs under the traffic lock.
    let _lock = TrafficLock::acquire();
    syn_flood(&node, 8080, 2000);
    let after_flood = flow_count(&web.agent);
    assert!(after_flood > 100, "the flood made {after_flood} flows");
    // The request/response flow's own entry is all that may stay.
    let expired = wait::within(Duration::from_secs(15), || flow_count(&web.agent) <= 1);
    assert!(
        expired,
        "half-open flows outlive the SYN timeout: {} of {after_flood} left",
        flow_count(&web.agent)
    );
    flow.finish()
        .expect("the established flow survived the flood");
}

#[test]
fn fragmented_udp_to_a_published_port_arrives_whole() {
    let node = Node::new();
    let dns = Deployment::start(&node, "dns", &["-p", "5353:53/udp"]);
    let sink = Server::udp_sink(&dns.ctr, 53, "dns");
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let to = node.node_port(5353);
    let big2 = big.clone();
    node.client.exec_closure(move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        // Let the kernel fragment (no path MTU discovery).
        let v: libc::c_int = libc::IP_PMTUDISC_DONT;
        // SAFETY: a valid int option of the size given, on our socket.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&raw const v).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        s.send_to(b"small", to).expect("send small");
        s.send_to(&big2, to).expect("send big");
        s.send_to(b"small again", to).expect("send small");
    });
    // The datagram after the big one arriving means the big one's
    // fragments have been through the uplink too.
    assert_eq!(sink.wait_payload(b"small again", 1, IO_TIMEOUT), 1);
    assert_eq!(
        sink.wait_payload(&big, 1, IO_TIMEOUT),
        1,
        "the big one arrives whole"
    );
    let got = sink.datagrams();
    assert_eq!(got.len(), 3, "each datagram arrives once, whole");
    assert!(dns.agent.counter("fragment_translated") >= 1);
    assert_eq!(dns.agent.counter("drop_fragment"), 0);
}

// ---- the API ------------------------------------------------------------------------

/// One HTTP/1.1 request over the agent's socket; the status and the body.
fn http(agent: &Agent, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(agent.socket()).expect("connect to the API socket");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: datapath\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send the head");
    // The agent may answer (and stop reading) before the body is sent.
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

/// Asserts that `body` is `{"error": "<non-empty message>"}`; returns it.
#[track_caller]
fn error_message(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"));
    assert!(!msg.is_empty());
    msg.to_owned()
}

#[test]
fn the_api_socket_is_root_only() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let meta = std::fs::metadata(agent.socket()).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode());
    assert_eq!(meta.uid(), 0, "owned by root");
}

#[test]
fn malformed_request_bodies_get_a_4xx_with_a_json_error() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    let netns = ctr.name();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("cut short", br#"{"name": "web", "netns": "#.to_vec()),
        ("not JSON", b"\xff\xfe garbage".to_vec()),
        ("empty", Vec::new()),
        ("wrong type", br#"{"name": 7, "netns": "x"}"#.to_vec()),
        ("missing field", br#"{"name": "web"}"#.to_vec()),
        (
            "unknown field",
            format!(r#"{{"name": "web", "netns": "{netns}", "evil": true}}"#).into_bytes(),
        ),
        (
            "bad port spec",
            format!(r#"{{"name": "web", "netns": "{netns}", "publish": ["99999:80"]}}"#)
                .into_bytes(),
        ),
        (
            "bad name",
            format!(r#"{{"name": "../etc", "netns": "{netns}"}}"#).into_bytes(),
        ),
        (
            "no such netns",
            br#"{"name": "web", "netns": "/nonexistent/netns"}"#.to_vec(),
        ),
    ];
    for (what, body) in cases {
        let (status, answer) = http(&agent, "POST", "/v1/containers", &body);
        assert!(
            (400..500).contains(&status),
            "{what}: status {status}: {answer}"
        );
        let msg = error_message(&answer);
        eprintln!("{what}: {status} {msg}");
    }
    let (status, answer) = http(&agent, "GET", "/v1/nonexistent", b"");
    assert_eq!(status, 404, "{answer}");
    error_message(&answer);
    assert!(
        agent.containers().is_empty(),
        "no bad request created anything"
    );
    assert!(agent_veths(&node.node).is_empty());
}

#[test]
fn an_oversized_request_body_gets_413() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    // Adding a container takes port lists: its limit is 8 MiB.
    let padding = " ".repeat(9 << 20);
    let body = format!(r#"{{"name": "web",{padding} "netns": "{}"}}"#, ctr.name());
    let (status, answer) = http(&agent, "POST", "/v1/containers", body.as_bytes());
    assert_eq!(status, 413, "{answer}");
    assert!(error_message(&answer).contains("8 MiB"), "{answer}");
    // Other routes take 64 KiB.
    let padding = " ".repeat(70 * 1024);
    let body = format!(r#"{{{padding}"egress_rate": "10mbit"}}"#);
    let (status, answer) = http(&agent, "PATCH", "/v1/containers/web", body.as_bytes());
    assert_eq!(status, 413, "{answer}");
    assert!(error_message(&answer).contains("64 KiB"), "{answer}");
    assert!(agent.containers().is_empty());
    // The same request without the padding is fine.
    let body = format!(r#"{{"name": "web", "netns": "{}"}}"#, ctr.name());
    let (status, answer) = http(&agent, "POST", "/v1/containers", body.as_bytes());
    assert_eq!(status, 201, "{answer}");
}

#[test]
fn concurrent_adds_of_one_container_create_it_once() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    let add_web = format!("container add web --netns {} -p 8080:80", ctr.name());
    let outputs: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| s.spawn(|| agent.cli(add_web.split(' '))))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let ok: Vec<String> = outputs
        .iter()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    for o in outputs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("exists") || err.contains("conflict"),
            "a refused add says why: {err}"
        );
    }
    assert!(!ok.is_empty(), "at least one add succeeds");
    assert!(
        ok.iter().all(|o| *o == ok[0]),
        "every successful add returns the same container: {ok:?}"
    );
    let all = agent.containers();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(
        agent_veths(&node.node),
        BTreeSet::from([all[0].host_ifname.clone()])
    );
    assert_eq!(addrs_of(&ctr, "eth0"), [all[0].addr]);
    assert_eq!(services(&agent).len(), 1);
}

#[test]
fn the_cli_prints_the_agents_error_and_exits_non_zero() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "web", "--netns", ctr.name()]);
    let cases: [(&[&str], &str); 4] = [
        (
            &["container", "add", "bad/name", "--netns", ctr.name()],
            "invalid container name",
        ),
        (
            &[
                "container",
                "add",
                "web2",
                "--netns",
                ctr.name(),
                "-p",
                "0:80",
            ],
            "ports are 1-65535",
        ),
        (
            &[
                "container",
                "add",
                "web",
                "--netns",
                ctr.name(),
                "-p",
                "80:80",
            ],
            "exists",
        ),
        (&["conntrack", "flush", "--container", "nope"], "nope"),
    ];
    for (args, expected) in cases {
        let out = agent.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        for noise in ["panicked", "backtrace", "Agent {", "status:"] {
            assert!(!err.contains(noise), "{args:?}: {noise} in {err}");
        }
        assert!(err.lines().count() <= 2, "{args:?}: a short message: {err}");
    }
    // Without an agent: says where it looked and what to do.
    let mut cmd = Command::new(datapath_bin());
    cmd.args(["--api-socket", "/nonexistent/api.sock", "status"]);
    let out = node.node.run(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/api.sock") && err.contains("datapath agent"),
        "{err}"
    );
}
