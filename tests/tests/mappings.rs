//! Publishing and unpublishing ports of a running container, container to
//! container traffic, and flows that outlive a mapping change.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread::JoinHandle,
    time::Duration,
};

use datapath_tests::{agent::Agent, netns::Netns, node::Node};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// An echo server on `port` in `ns` that answers each line with `tag` and
/// the line, for up to `conns` connections; ready when this returns.
fn echo_server(ns: &Netns, port: u16, tag: &'static str, conns: usize) -> JoinHandle<()> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.spawn_thread(move || {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
        ready_tx.send(()).expect("ready");
        let mut workers = Vec::new();
        for conn in listener.incoming().take(conns) {
            let conn = conn.expect("accept");
            workers.push(std::thread::spawn(move || {
                conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                let mut w = conn.try_clone().expect("clone");
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(w, "{tag} {line}").is_err() {
                        break;
                    }
                }
            }));
        }
        for w in workers {
            let _ = w.join();
        }
    });
    ready_rx.recv_timeout(IO_TIMEOUT).expect("server ready");
    handle
}

/// One connection from `ns` to `addr`: sends `line`, returns the answer.
fn ask(ns: &Netns, addr: SocketAddr, line: &str) -> Result<String, String> {
    let line = line.to_owned();
    ns.exec_closure(move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        writeln!(w, "{line}").map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(|e| e.to_string())?;
        Ok(answer.trim_end().to_owned())
    })
}

#[test]
fn a_port_published_on_a_running_container_reaches_it_and_unpublishing_stops_new_connections() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "web", "--netns", ctr.name()]);
    let addr = SocketAddr::from((node.node_addr(), 8080));
    let _server = echo_server(&ctr, 80, "web", 2);
    assert!(
        ask(&node.client, addr, "before").is_err(),
        "nothing is published yet"
    );

    agent.cli_ok(["container", "publish", "web", "8080:80"]);
    assert_eq!(ask(&node.client, addr, "one"), Ok("web one".to_owned()));
    let info = agent.cli_json(["container", "list", "--json"]);
    assert_eq!(info[0]["publish"][0], "8080:80/tcp", "{info:#}");

    // Publishing the same again is a no-op; an overlapping range is refused.
    agent.cli_ok(["container", "publish", "web", "8080:80/tcp"]);
    let out = agent.cli(["container", "publish", "web", "8070-8090:70-90"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already publishes 8080:80/tcp"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    agent.cli_ok(["container", "unpublish", "web", "8080:80"]);
    assert!(ask(&node.client, addr, "after").is_err(), "still reachable");
    let info = agent.cli_json(["container", "list", "--json"]);
    assert_eq!(
        info[0]["publish"].as_array().map(Vec::len),
        Some(0),
        "{info:#}"
    );
}

#[test]
fn an_established_flow_keeps_its_container_when_the_mapping_moves_to_another() {
    let node = Node::new();
    let a = node.add_container_netns("a");
    let b = node.add_container_netns("b");
    let agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "a",
        "--netns",
        a.name(),
        "-p",
        "8080:80",
    ]);
    agent.cli_ok(["container", "add", "b", "--netns", b.name()]);
    let _sa = echo_server(&a, 80, "a", 1);
    let _sb = echo_server(&b, 80, "b", 1);
    let addr = SocketAddr::from((node.node_addr(), 8080));

    let (to_client, from_test) = mpsc::channel::<&'static str>();
    let (answers_tx, answers) = mpsc::channel::<String>();
    let client = node.client.spawn_thread(move || {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        for line in from_test {
            writeln!(w, "{line}").expect("write");
            let mut answer = String::new();
            r.read_line(&mut answer).expect("read");
            answers_tx.send(answer.trim_end().to_owned()).expect("send");
        }
    });
    to_client.send("first").expect("send");
    assert_eq!(answers.recv_timeout(IO_TIMEOUT).as_deref(), Ok("a first"));

    // The port moves to container b; the open connection stays with a.
    agent.cli_ok(["container", "unpublish", "a", "8080:80"]);
    agent.cli_ok(["container", "publish", "b", "8080:80"]);
    to_client.send("second").expect("send");
    assert_eq!(answers.recv_timeout(IO_TIMEOUT).as_deref(), Ok("a second"));
    drop(to_client);
    client.join().expect("client");

    // New connections go to b.
    assert_eq!(ask(&node.client, addr, "new"), Ok("b new".to_owned()));
}

#[test]
fn containers_reach_each_other_and_their_gateway() {
    let node = Node::new();
    let a = node.add_container_netns("a");
    let b = node.add_container_netns("b");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "a", "--netns", a.name()]);
    agent.cli_ok(["container", "add", "b", "--netns", b.name()]);
    let list = agent.cli_json(["container", "list", "--json"]);
    let addr_of = |name: &str| -> Ipv4Addr {
        list.as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == name))
            .and_then(|c| c["addr"].as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address for {name} in {list:#}"))
    };
    let gateway: Ipv4Addr = list[0]["gateway"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("gateway");
    let _server = echo_server(&b, 7000, "b", 1);
    assert_eq!(
        ask(&a, SocketAddr::from((addr_of("b"), 7000)), "hi"),
        Ok("b hi".to_owned()),
        "container a reaches container b by its address"
    );
    assert!(a.ping(gateway), "container a reaches its gateway {gateway}");
}
