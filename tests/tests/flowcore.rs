//! The flow core in a namespace node (issue 12), one test per behaviour:
//! flows expire in the kernel with the agent killed; floods fill the tables
//! without locking anyone out; TCP 4-tuples are reused at once and stray
//! RSTs ignored; parallel creations of one flow both succeed; the
//! masquerade fills its range; the node's own connections keep their
//! replies; fragments cross both ways; egress follows the node's routes and
//! MTU; connection load at full rate never collapses; the tables are walked
//! and flushed whole; counting a table of a million entries costs a
//! bounded amount of work per pass (issue 22).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        Barrier, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use datapath_tests::{
    agent::Agent,
    capture,
    fixture::Deployment,
    frame::{Frame, tcp_flags},
    inspect,
    lock::TrafficLock,
    netns::Netns,
    node::{self, Node},
    traffic::{
        IO_TIMEOUT, Server, UdpPinger, line_exchange, line_on, tcp_connect_from, udp_request_within,
    },
    wait,
};
use serde_json::Value;

// ---- helpers ------------------------------------------------------------------

/// Sends `text` on a connection to a [`Server::line_echo`] and checks the
/// answer.
fn line(c: &mut TcpStream, text: &str) -> io::Result<()> {
    let answer = line_on(c, text)?;
    if answer.ends_with(&format!(": {text}")) {
        Ok(())
    } else {
        Err(io::Error::other(format!("{answer:?} for {text:?}")))
    }
}

/// One short connection to a line server at `addr` from the calling
/// thread's namespace: a line, then `bye` (the server closes first).
fn short_connection_here(addr: SocketAddr, text: &str) -> io::Result<()> {
    let mut c = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    line(&mut c, text)?;
    line(&mut c, "bye")
}

/// [`short_connection_here`] from `ns`.
fn short_connection(ns: &Netns, addr: SocketAddr, text: &str) -> io::Result<()> {
    ns.exec_closure(|| short_connection_here(addr, text))
}

/// An open connection from `ns` to a line server at `addr`, after one
/// exchange.
fn open_connection(ns: &Netns, addr: SocketAddr, text: &str) -> io::Result<TcpStream> {
    ns.exec_closure(|| {
        let mut c = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        line(&mut c, text)?;
        Ok(c)
    })
}

fn set_int(s: &impl AsRawFd, opt: libc::c_int, v: libc::c_int) {
    // SAFETY: a valid int option of the size given, on our socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            opt,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt {opt}: {}", io::Error::last_os_error());
}

/// A UDP echo's answer to `payload` (see [`Server::udp_echo`]).
fn echoed(server: &str, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut answer = format!("{server} port {port}: ").into_bytes();
    answer.extend_from_slice(payload);
    answer
}

/// Pins the calling thread to CPU `cpu`.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes in it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let r = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(r, 0, "sched_setaffinity: {}", io::Error::last_os_error());
    }
}

/// The entries of the agent's per-container conntrack records, by id.
fn ct_containers(agent: &Agent<'_>) -> Vec<Value> {
    inspect::map_dump(agent, "CT_CONTAINERS")
}

// ---- 1. the datapath is self-sufficient ------------------------------------------

#[test]
fn new_flows_keep_being_admitted_with_the_agent_killed_for_several_timeouts() {
    let node = Node::new();
    let Deployment { ctr, mut agent, .. } = Deployment::start_with(
        Agent::builder(&node).args([
            "--ct-max",
            "256",
            "--ct-timeout-udp",
            "1s",
            "--ct-timeout-tcp-close",
            "1s",
            "--snat-ports",
            "61000-61099",
        ]),
        "app",
        &["-p", "8080:80"],
    );
    let _dns = Server::udp_echo(&node.client, 5300, "dns");
    let _web = Server::line_echo(&ctr, 80, "web");
    let _lock = TrafficLock::acquire();
    agent.kill();

    // DNS-like queries (each from a new socket: a new flow) and short
    // connections to a published port, for at least six one-second
    // timeouts. The queries cycle through 100 source ports, so each of the
    // 300 comes back to a tuple whose flow the kernel must expire first
    // (20 rounds of at least 90 ms apart: more than the timeout), and the
    // connections' closed flows must make way.
    let dns = node.client_port(5300);
    let web = node.node_port(8080);
    let start = Instant::now();
    let (mut queries, mut conns) = (0u16, 0);
    while queries < 300 || start.elapsed() < Duration::from_secs(6) {
        for _ in 0..5 {
            udp_request_within(&ctr, 40_000 + queries % 100, dns, b"query", IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("query {queries} with the agent down: {e}"));
            queries += 1;
        }
        short_connection(&node.client, web, "hello")
            .unwrap_or_else(|e| panic!("connection {conns} with the agent down: {e}"));
        conns += 1;
        std::thread::sleep(Duration::from_millis(90));
    }
    eprintln!(
        "{queries} queries and {conns} connections in {:?} with the agent down",
        start.elapsed()
    );
    agent.restart();
    assert_eq!(agent.counter("drop_snat_ports_exhausted"), 0);
    assert_eq!(agent.counter("drop_ct_full"), 0);
    assert!(agent.counter("ct_expired") > 0, "the kernel expired flows");
}

/// A new `--ct-max` on a restart: the pinned tables get the new size (a
/// pinned map otherwise keeps its own), a live connection survives the
/// move, and its copied entry still expires in the kernel.
#[test]
fn a_new_ct_max_resizes_the_tables_on_restart_keeping_live_flows_that_still_expire() {
    let node = Node::new();
    let args = |ct_max: &'static str| ["--ct-max", ct_max, "--ct-timeout-tcp", "3s"];
    let Deployment { ctr, mut agent, .. } = Deployment::start_with(
        Agent::builder(&node).args(args("1024")),
        "web",
        &["-p", "8080:80"],
    );
    let _web = Server::line_echo(&ctr, 80, "web");
    let mut live = open_connection(&node.client, node.node_port(8080), "before")
        .expect("a connection before the restart");
    assert_eq!(inspect::map_max_entries(&agent, "CT"), 1024);
    let entries = |agent: &Agent<'_>| -> u64 {
        ct_containers(agent)
            .iter()
            .filter_map(|c| c["value"]["entries"].as_u64())
            .sum()
    };
    assert_eq!(entries(&agent), 2, "one flow: two entries counted");

    agent.stop();
    agent.set_args(args("4096"));
    agent.restart();
    assert_eq!(inspect::map_max_entries(&agent, "CT"), 4096);
    assert_eq!(inspect::map_max_entries(&agent, "CT_NEW"), 1024);
    line(&mut live, "after").expect("the live connection after the resize");
    assert_eq!(
        agent.flows().len(),
        1,
        "the flow was moved: {:?}",
        agent.flows()
    );
    assert_eq!(entries(&agent), 2, "its entries are still counted");

    // Idle past its timeout, the moved flow goes like any other: the
    // kernel armed its timer.
    wait::until(
        "the moved flow left the table",
        Duration::from_secs(15),
        || inspect::map_dump(&agent, "CT").is_empty(),
    );
    assert!(agent.flows().is_empty());
    assert_eq!(entries(&agent), 0);
    assert!(agent.counter("ct_expired") >= 1);
    assert!(
        !inspect::map_pin(&agent, "resizing_CT").exists(),
        "the old table is gone"
    );
}

// ---- 2. fill resistance ---------------------------------------------------------------

#[test]
fn a_syn_flood_and_a_udp_spray_lock_out_neither_new_nor_established_flows() {
    let node = Node::new();
    node.default_route_via_client();
    let web = Deployment::start_with(
        Agent::builder(&node).args(["--ct-max", "1024"]),
        "web",
        &["-p", "8080:80"],
    );
    let agent = &web.agent;
    let spray_ns = node.add_container_netns("spray");
    agent.add("spray", &spray_ns, &[]);
    let _web = Server::line_echo(&web.ctr, 80, "web");
    let _sink = Server::udp_sink(&node.client, 5301, "sink");
    let addr = node.node_port(8080);
    let mut established =
        open_connection(&node.client, addr, "before").expect("the established connection");

    // The flood runs under the traffic lock.
    let _lock = TrafficLock::acquire();
    // A spoofed SYN flood to the published port, and a container spraying
    // UDP at random ports of the outside, both far beyond the tables.
    let mut flood = node.client.spawn(
        Command::new("timeout")
            .args([
                "15",
                "hping3",
                "-q",
                "-S",
                "-p",
                "8080",
                "--rand-source",
                "-c",
                "30000",
                "--faster",
            ])
            .arg(node.node_addr().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let client_addr = node.client_addr();
    let spray = spray_ns.spawn_thread(move || -> io::Result<()> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        for i in 0..20_000u32 {
            let port = 20_000 + (i.wrapping_mul(2_654_435_761) % 40_000) as u16;
            let _ = s.send_to(b"spray", (client_addr, port));
        }
        Ok(())
    });
    // Meanwhile: fresh connections and the established one.
    let mut fresh = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        short_connection(&node.client, addr, "fresh").unwrap_or_else(|e| {
            panic!(
                "fresh connection {fresh} during the flood: {e}\n{:#}",
                agent.status()["counters"]
            )
        });
        fresh += 1;
        line(&mut established, "during")
            .unwrap_or_else(|e| panic!("the established connection stalled: {e}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = spray.join();
    let _ = flood.wait();
    line(&mut established, "after").expect("the established connection after the flood");
    let st = agent.status();
    let c = &st["counters"];
    eprintln!("{fresh} fresh connections during the flood: {c:#}");
    assert!(
        c["dnat_new"].as_u64() > Some(5000),
        "the flood arrived: {c:#}"
    );
    assert_eq!(c["drop_ct_full"].as_u64(), Some(0), "{c:#}");
}

// ---- 3. TCP states -------------------------------------------------------------------

#[test]
fn a_tcp_4tuple_reused_right_after_a_close_works_through_dnat_and_masquerade() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start_with(
        Agent::builder(&node).args(["--ct-timeout-tcp-close", "1s"]),
        "app",
        &["-p", "8080:80"],
    );
    let _inside = Server::line_echo(&ctr, 80, "inside");
    let _outside = Server::line_echo(&node.client, 7000, "outside");
    let web = SocketAddrV4::new(node.node_addr(), 8080);
    let out = SocketAddrV4::new(node.client_addr(), 7000);
    let _lock = TrafficLock::acquire();

    // Client → published port from port 41000, and container → outside
    // from port 45000: one connection each, closed by the server.
    for (ns, dst, port) in [(&node.client, web, 41000), (&ctr, out, 45000)] {
        ns.exec_closure(|| -> io::Result<()> {
            let mut c = tcp_connect_from(port, dst)?;
            line(&mut c, "first")?;
            line(&mut c, "bye")
        })
        .unwrap_or_else(|e| panic!("first connection from {port}: {e}"));
    }
    // The same 4-tuples again at once, kept busy well past the closing
    // timeout.
    let conns: Vec<TcpStream> = [(&node.client, web, 41000), (&ctr, out, 45000)]
        .into_iter()
        .map(|(ns, dst, port)| {
            ns.exec_closure(|| tcp_connect_from(port, dst))
                .unwrap_or_else(|e| panic!("second connection from {port}: {e}"))
        })
        .collect();
    for mut c in conns {
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(4) {
            line(&mut c, &format!("again {i}"))
                .unwrap_or_else(|e| panic!("the reused 4-tuple broke after {i} lines: {e}"));
            i += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(agent.counter("ct_reopened") >= 2);
}

#[test]
fn a_stray_rst_injected_into_a_live_flow_does_not_end_it() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start_with(
        Agent::builder(&node).args(["--ct-timeout-tcp-close", "1s"]),
        "app",
        &[],
    );
    let _outside = Server::line_echo(&node.client, 7000, "outside");
    let out = SocketAddrV4::new(node.client_addr(), 7000);
    let mut c = ctr
        .exec_closure(|| tcp_connect_from(45001, out))
        .expect("connect");
    line(&mut c, "hello").expect("echo");
    // The masquerade port the outside sees (the flow is established).
    let flows = agent.flows();
    let port = flows
        .iter()
        .find(|f| f["orig_src"]["port"] == 45001)
        .and_then(|f| f["nat_src"]["port"].as_u64())
        .unwrap_or_else(|| panic!("no flow from 45001: {flows:#?}")) as u16;
    // A RST from the outside's address and port, with a sequence number
    // far from the connection's window (a blind injection, a late segment
    // of an old connection).
    let rst = Frame::tcp((node.client_addr(), 7000), (node.node_addr(), port))
        .tcp_flags(tcp_flags::RST)
        .seq(0x8000_0000)
        .macs(node.client_mac(), node.uplink_mac())
        .build();
    capture::send_frames(&node.client, node::CLIENT_IF, &[rst]);
    line(&mut c, "right after").expect("the flow goes on");
    // Idle past the closing timeout: an established flow waits for its
    // own, hours long.
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        line(&mut c, &format!("still {i}")).unwrap_or_else(|e| {
            panic!(
                "the flow ended after a stray RST: {e}\n{:#}",
                agent.status()["counters"]
            )
        });
    }
    assert_eq!(agent.counter("ct_rst_ignored"), 1);
}

// ---- 4. no drop on creation races ---------------------------------------------------

#[test]
fn parallel_queries_from_one_socket_on_two_cpus_all_get_answers() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start(&node, "dns", &["-p", "5353:53/udp"]);
    let _dns = Server::udp_echo(&ctr, 53, "dns");
    let dst = node.node_port(5353);
    let _lock = TrafficLock::acquire();
    const ROUNDS: usize = 300;
    let answered = AtomicU64::new(0);
    node.client.exec_closure(|| {
        for round in 0..ROUNDS {
            // A and AAAA, sent at the same moment from two CPUs through
            // one socket: both create the same flow.
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            sock.connect(dst).expect("connect");
            sock.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                for (cpu, q) in [(0usize, "A"), (1, "AAAA")] {
                    let (sock, barrier) = (&sock, &barrier);
                    s.spawn(move || {
                        pin_to_cpu(cpu);
                        barrier.wait();
                        sock.send(format!("{q} {round}").as_bytes()).expect("send");
                    });
                }
            });
            let mut buf = [0u8; 64];
            for _ in 0..2 {
                if sock.recv(&mut buf).is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let c = &agent.status()["counters"];
    assert_eq!(
        answered.load(Ordering::Relaxed),
        2 * ROUNDS as u64,
        "every query answered: {c:#}"
    );
    assert_eq!(c["drop_ct_full"].as_u64(), Some(0));
    eprintln!("creation races lost (and survived): {}", c["ct_race_lost"]);
}

// ---- 5. the masquerade fills its range ---------------------------------------------

#[test]
fn a_dns_burst_to_one_destination_uses_most_of_the_port_range() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start_with(
        Agent::builder(&node).args(["--snat-ports", "61000-61999"]),
        "app",
        &[],
    );
    let echo = Server::udp_echo(&node.client, 5300, "dns");
    let dst = node.client_port(5300);
    let _lock = TrafficLock::acquire();
    // 950 queries, each from its own socket, all kept open (and their
    // flows alive): 95 % of the range for one destination.
    let open: Vec<UdpSocket> = ctr.exec_closure(|| {
        (0..950)
            .map(|i| {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
                s.connect(dst).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                s.send(b"q").expect("send");
                let mut buf = [0u8; 64];
                s.recv(&mut buf)
                    .unwrap_or_else(|e| panic!("query {i} of the burst unanswered: {e}"));
                s
            })
            .collect()
    });
    let mut ports: Vec<u16> = echo.peers().iter().map(SocketAddrV4::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 950, "one masquerade port per flow");
    assert!(ports.iter().all(|p| (61000..=61999).contains(p)));
    // 60 more: 50 ports are left, 10 flows find none, counted.
    let more = (0..60)
        .filter(|_| udp_request_within(&ctr, 0, dst, b"q", Duration::from_millis(500)).is_ok())
        .count();
    assert_eq!(more, 50, "the last free ports are found");
    assert_eq!(agent.counter("drop_snat_ports_exhausted"), 10);
    let records = ct_containers(&agent);
    assert!(
        records
            .iter()
            .any(|r| r["value"]["snat_exhausted"].as_u64() == Some(10)),
        "exhaustion counted for the container: {records:#?}"
    );
    drop(open);
}

// ---- 6. the node's own connections -------------------------------------------------

#[test]
fn replies_to_the_nodes_own_connections_are_not_sent_into_a_container_publishing_their_port() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start(&node, "app", &[]);
    let _udp = Server::udp_echo(&node.client, 5300, "echo");
    let _tcp = Server::line_echo(&node.client, 7000, "echo");
    let inside = Server::udp_sink(&ctr, 53, "inside");
    let _inside_tcp = Server::line_echo(&ctr, 80, "inside");
    let node_addr = node.node_addr();
    // The node's own UDP and TCP connections from ports 6000 and 6001...
    let udp = node
        .node
        .exec_closure(|| -> io::Result<UdpSocket> {
            let s = UdpSocket::bind((node_addr, 6000))?;
            s.connect(node.client_port(5300))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })
        .expect("node UDP socket");
    let mut tcp = node
        .node
        .exec_closure(|| tcp_connect_from(6001, SocketAddrV4::new(node.client_addr(), 7000)))
        .expect("node TCP connection");
    line(&mut tcp, "before").expect("echo");
    // ... whose ports are then published (connected sockets, not
    // listeners: nothing to refuse).
    agent.cli_ok(["container", "publish", "app", "6000:53/udp"]);
    agent.cli_ok(["container", "publish", "app", "6001:80"]);
    udp.send(b"ping").expect("send");
    let mut buf = [0u8; 64];
    let n = udp
        .recv(&mut buf)
        .expect("the node's UDP socket gets its answer");
    assert_eq!(&buf[..n], b"echo port 5300: ping");
    line(&mut tcp, "after").expect("the node's TCP connection goes on");
    assert!(inside.peers().is_empty(), "nothing reached the container");
    assert!(agent.counter("node_flow_passed") >= 2);
}

/// The node namespace's `net.ipv4.ip_local_reserved_ports`.
fn reserved_ports(node: &Node) -> String {
    node.node
        .exec_ok("sysctl", ["-n", "net.ipv4.ip_local_reserved_ports"])
        .trim()
        .to_owned()
}

#[test]
fn published_ports_and_the_masquerade_range_are_reserved_on_the_node_and_given_back() {
    let node = Node::new();
    // Someone else's reservation, which stays whatever the agent does.
    node.node
        .exec_ok("sysctl", ["-qw", "net.ipv4.ip_local_reserved_ports=7000"]);
    let Deployment { mut agent, .. } = Deployment::start_with(
        Agent::builder(&node).args(["--snat-ports", "61000-61099"]),
        "web",
        &["-p", "8080:80", "-p", "9000-9002:9000-9002/udp"],
    );
    assert_eq!(reserved_ports(&node), "7000,8080,9000-9002,61000-61099");

    // The node's own connections never take a reserved port: with only
    // 8080-8081 to choose from and 8080 published, a connection gets 8081,
    // and a second one none (unreserved, it would get 8080).
    let _server = Server::line_echo(&node.client, 7000, "client");
    node.node
        .exec_ok("sysctl", ["-qw", "net.ipv4.ip_local_port_range=8080 8081"]);
    let dst = node.client_port(7000);
    let (first, second) = node.node.exec_closure(|| {
        let first = TcpStream::connect_timeout(&dst, IO_TIMEOUT).expect("a free source port");
        (first, TcpStream::connect_timeout(&dst, IO_TIMEOUT))
    });
    assert_eq!(first.local_addr().expect("local address").port(), 8081);
    let err = second.expect_err("no second source port");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{err}");
    let conns = [first];
    drop(conns);

    // Given back as they stop being published, all of them at --cleanup.
    agent.cli_ok(["container", "unpublish", "web", "8080:80"]);
    assert_eq!(reserved_ports(&node), "7000,9000-9002,61000-61099");
    agent.cli_ok(["container", "del", "web"]);
    assert_eq!(reserved_ports(&node), "7000,61000-61099");
    // A stopped agent's datapath goes on: its reservations stay.
    assert!(agent.stop(), "the agent stops on SIGTERM");
    assert_eq!(reserved_ports(&node), "7000,61000-61099");
    agent.restart();
    assert_eq!(reserved_ports(&node), "7000,61000-61099");
    let out = agent.cleanup();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(reserved_ports(&node), "7000");
}

#[test]
fn a_port_a_process_of_the_node_listens_on_is_refused_unless_forced() {
    let node = Node::new();
    let Deployment { agent, .. } = Deployment::start(&node, "web", &[]);
    let _tcp = Server::line_echo(&node.node, 8080, "node");
    let _udp = Server::udp_sink(&node.node, 5353, "node");
    for (spec, port) in [
        ("8080:80", "8080/tcp"),
        ("8000-8090:8000-8090", "8080/tcp"),
        ("5353:53/udp", "5353/udp"),
    ] {
        let out = agent.cli(["container", "publish", "web", spec]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was published");
        assert!(
            err.contains(&format!("port {port} is already allocated")) && err.contains("--force"),
            "{err}"
        );
    }
    let other = node.add_container_netns("other");
    let err = agent.add_refused("other", other.name(), &["-p", "8080:80"]);
    assert!(err.contains("port 8080/tcp is already allocated"), "{err}");
    // The node's process keeps its port.
    assert_eq!(
        line_exchange(&node.client, node.node_port(8080), "hi").expect("the node answers"),
        "node: hi"
    );
    // Another protocol on the same number is free, and --force publishes
    // anyway.
    agent.cli_ok(["container", "publish", "web", "8080:80/udp"]);
    agent.cli_ok(["container", "publish", "web", "5353:53/udp", "--force"]);
    let published = agent.container("web").expect("listed").json["publish"].clone();
    assert_eq!(published, serde_json::json!(["8080:80/udp", "5353:53/udp"]));
}

// ---- 7. fragments ------------------------------------------------------------------------

#[test]
fn a_4000_byte_udp_datagram_crosses_dnat_and_masquerade_both_ways() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start(&node, "dns", &["-p", "5353:53/udp"]);
    let _inside = Server::udp_echo(&ctr, 53, "inside");
    let _outside = Server::udp_echo(&node.client, 5300, "outside");
    let big: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
    let answer = udp_request_within(&node.client, 0, node.node_port(5353), &big, IO_TIMEOUT)
        .expect("the answer to a 4,000-byte query through the published port");
    assert!(
        answer == echoed("inside", 53, &big),
        "arrived whole ({} bytes)",
        answer.len()
    );
    let answer = udp_request_within(&ctr, 0, node.client_port(5300), &big, IO_TIMEOUT)
        .expect("the answer to a 4,000-byte query through the masquerade");
    assert!(
        answer == echoed("outside", 5300, &big),
        "arrived whole ({} bytes)",
        answer.len()
    );
    assert!(agent.counter("fragment_translated") >= 4);
}

// ---- 8. egress follows the routing table -----------------------------------------------

/// A second link `up1` from the node to a namespace `far`: 198.18.200.1/24
/// on the node (and 198.18.201.1/32, a node address on another interface),
/// 198.18.200.2/24 in `far`, which routes the containers' pool back via
/// the node. The agent's uplink stays `up0`.
fn second_link(node: &Node) -> Netns {
    let far = node.add_container_netns("far");
    node.node.exec_ok(
        "ip",
        [
            "link",
            "add",
            "up1",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            far.name(),
        ],
    );
    node.node
        .exec_ok("ip", ["addr", "add", "198.18.200.1/24", "dev", "up1"]);
    node.node
        .exec_ok("ip", ["addr", "add", "198.18.201.1/32", "dev", "up1"]);
    node.node.exec_ok("ip", ["link", "set", "up1", "up"]);
    far.exec_ok("ip", ["addr", "add", "198.18.200.2/24", "dev", "eth0"]);
    far.exec_ok("ip", ["link", "set", "eth0", "up"]);
    far.exec_ok(
        "ip",
        ["route", "add", "198.19.0.0/16", "via", "198.18.200.1"],
    );
    far
}

#[test]
fn container_egress_follows_the_nodes_routes_and_is_masqueraded_only_on_the_uplink() {
    let node = Node::new();
    let far = second_link(&node);
    let Deployment { ctr, agent, info } = Deployment::start(&node, "app", &[]);
    let addr = info.addr;
    let far_echo = Server::udp_echo(&far, 5300, "far");
    // Bound to the address itself, so that its answers come from it.
    let local = node
        .node
        .exec_closure(|| UdpSocket::bind(SocketAddr::from(([198, 18, 201, 1], 5301))))
        .expect("bind on the node's address on up1");
    local.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let local_echo = std::thread::spawn(move || -> io::Result<SocketAddr> {
        let mut buf = [0u8; 64];
        let (n, peer) = local.recv_from(&mut buf)?;
        local.send_to(&buf[..n], peer)?;
        Ok(peer)
    });
    let outside = Server::udp_echo(&node.client, 5300, "outside");

    // Behind the second link: routed there, unmasqueraded (the agent
    // masquerades on the uplink only).
    let far_addr = SocketAddr::from(([198, 18, 200, 2], 5300));
    udp_request_within(&ctr, 0, far_addr, b"far", IO_TIMEOUT)
        .expect("an answer from behind the second link");
    assert_eq!(*far_echo.peers()[0].ip(), addr, "not masqueraded");
    // A node address on another interface: the node answers.
    let local_addr = SocketAddr::from(([198, 18, 201, 1], 5301));
    udp_request_within(&ctr, 0, local_addr, b"local", IO_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "no answer from the node's address on up1: {e}\n{:#}\n{}",
            agent.status()["counters"],
            node.node.exec_ok("ip", ["-4", "addr"])
        )
    });
    let peer = local_echo
        .join()
        .expect("the node's echo")
        .expect("the node's echo heard it");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(addr));
    // Through the uplink: masqueraded as before.
    udp_request_within(&ctr, 0, node.client_port(5300), b"out", IO_TIMEOUT)
        .expect("an answer from the outside");
    assert_eq!(*outside.peers()[0].ip(), node.node_addr());
}

/// The MTU of interface `ifname` in `ns`.
fn mtu_of(ns: &Netns, ifname: &str) -> u64 {
    let out = ns.exec_ok("ip", ["-j", "link", "show", "dev", ifname]);
    let links: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    links[0]["mtu"]
        .as_u64()
        .unwrap_or_else(|| panic!("no MTU for {ifname}: {out}"))
}

#[test]
fn container_veths_get_the_uplinks_mtu_or_the_one_given() {
    // An uplink with MTU 1400: both ends of a container's veth pair get it.
    let node = Node::new();
    node.node
        .exec_ok("ip", ["link", "set", node::UPLINK, "mtu", "1400"]);
    let web = Deployment::start(&node, "web", &[]);
    assert_eq!(mtu_of(&web.ctr, "eth0"), 1400);
    assert_eq!(mtu_of(&node.node, &web.info.host_ifname), 1400);
    // --mtu wins over the uplink's.
    let other = Node::new();
    let app = Deployment::start_with(Agent::builder(&other).args(["--mtu", "1300"]), "app", &[]);
    assert_eq!(mtu_of(&app.ctr, "eth0"), 1300);
    assert_eq!(mtu_of(&other.node, &app.info.host_ifname), 1300);
}

#[test]
fn a_datagram_too_big_for_an_mtu_1400_uplink_gets_fragmentation_needed_back() {
    let node = Node::new();
    for (ns, ifname) in [(&node.node, node::UPLINK), (&node.client, node::CLIENT_IF)] {
        ns.exec_ok("ip", ["link", "set", ifname, "mtu", "1400"]);
    }
    // Containers whose links keep MTU 1500 (as when the uplink's MTU
    // is lowered after they were added).
    let Deployment { ctr, agent, .. } =
        Deployment::start_with(Agent::builder(&node).args(["--mtu", "1500"]), "app", &[]);
    let _outside = Server::udp_echo(&node.client, 5300, "outside");
    let dst = node.client_port(5300);
    // 1,450 bytes with DF (path MTU discovery) from a container whose own
    // link has MTU 1500: too big for the uplink.
    let mtu = ctr.exec_closure(|| -> io::Result<i32> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        set_int(&s, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
        s.connect(dst)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let big = vec![1u8; 1450];
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            // The first send goes out; the ICMP error that comes back
            // lowers the route's MTU, and later sends fail with EMSGSIZE.
            match s.send(&big) {
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => break,
                _ => {}
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut mtu: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an int option into a local of the size given.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU,
                (&raw mut mtu).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(mtu)
    });
    assert_eq!(
        mtu.expect("IP_MTU"),
        1400,
        "the container learnt the path MTU: {:#}",
        agent.status()["counters"]
    );
    assert!(agent.counter("too_big") >= 1);
}

// ---- 9. no stale forwarding ------------------------------------------------------------

#[test]
fn a_live_udp_flow_reaches_its_container_again_once_its_veth_is_recreated() {
    let node = Node::new();
    let Deployment {
        ctr,
        mut agent,
        info,
    } = Deployment::start(&node, "dns", &["-p", "5353:53/udp"]);
    let _dns = Server::udp_echo(&ctr, 53, "dns");
    let answer = b"dns port 53: ping";
    // One socket: one flow, kept alive by a datagram every 20 ms.
    let pinger = UdpPinger::start(&node.client, node.node_port(5353), b"ping");
    assert!(pinger.wait_answer(answer, IO_TIMEOUT), "answers at first");

    // The veth vanishes with the agent down: the flow's packets are sent
    // to an interface that is gone, until no answer came for half a second.
    agent.kill();
    node.node.exec_ok("ip", ["link", "del", &info.host_ifname]);
    let deadline = Instant::now() + 2 * IO_TIMEOUT;
    while pinger.wait_answer(answer, Duration::from_millis(500)) {
        assert!(
            Instant::now() < deadline,
            "answers went on without the veth"
        );
    }

    // The restarted agent recreates the veth (another interface index):
    // the live flow must not keep sending to the old one.
    agent.restart();
    assert!(
        pinger.wait_answer(answer, IO_TIMEOUT),
        "no answer once the veth is back: {:#}",
        agent.status()["counters"]
    );
    assert!(pinger.finish() > 0);
    assert!(
        agent.counter("drop_redirect_failed") > 0,
        "the redirects to the vanished veth are counted"
    );
}

#[test]
fn a_live_udp_flow_follows_its_port_when_it_moves_to_another_container() {
    let node = Node::new();
    let a = Deployment::start(&node, "a", &["-p", "5353:53/udp"]);
    let b_ns = node.add_container_netns("b");
    a.agent.add("b", &b_ns, &[]);
    let _sa = Server::udp_echo(&a.ctr, 53, "a");
    let _sb = Server::udp_echo(&b_ns, 53, "b");
    let pinger = UdpPinger::start(&node.client, node.node_port(5353), b"ping");
    assert!(pinger.wait_answer(b"a port 53: ping", IO_TIMEOUT));
    // UDP has no connection to keep: once the port is b's, the client's
    // datagrams (one socket, one flow all along) reach b.
    a.agent
        .cli_ok(["container", "unpublish", "a", "5353:53/udp"]);
    a.agent.cli_ok(["container", "publish", "b", "5353:53/udp"]);
    assert!(
        pinger.wait_answer(b"b port 53: ping", IO_TIMEOUT),
        "the flow still goes to a: {:#?}",
        a.agent.flows()
    );
    assert!(pinger.finish() > 0);
}

// ---- 10. the node's address can change ---------------------------------------------------

#[test]
fn the_agent_follows_a_change_of_the_nodes_address_without_a_restart() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start(&node, "web", &["-p", "8080:80"]);
    let _web = Server::line_echo(&ctr, 80, "web");
    let outside = Server::udp_echo(&node.client, 5300, "outside");
    let answer = b"outside port 5300: ping";
    // A masqueraded flow that lives through the change (one socket).
    let pinger = UdpPinger::start(&ctr, node.client_port(5300), b"ping");
    assert!(pinger.wait_answer(answer, IO_TIMEOUT));

    // 198.18.0.2 gives way to 198.18.0.3 (promoted when the old one goes).
    let new = Ipv4Addr::new(198, 18, 0, 3);
    node.node.exec_ok(
        "sysctl",
        [
            "-qw",
            &format!("net.ipv4.conf.{}.promote_secondaries=1", node::UPLINK),
        ],
    );
    node.node
        .exec_ok("ip", ["addr", "add", "198.18.0.3/24", "dev", node::UPLINK]);
    node.node
        .exec_ok("ip", ["addr", "del", "198.18.0.2/24", "dev", node::UPLINK]);
    let followed = wait::within(IO_TIMEOUT, || {
        agent.status()["uplink"]["node_ip"] == new.to_string()
    });
    assert!(followed, "the agent kept {}", agent.status()["uplink"]);

    // The published port answers on the new address...
    assert_eq!(
        line_exchange(&node.client, SocketAddr::from((new, 8080)), "hi")
            .expect("the published port on the new address"),
        "web: hi"
    );
    // ... new flows from the container leave as it...
    udp_request_within(&ctr, 0, node.client_port(5300), b"new", IO_TIMEOUT)
        .expect("a new flow after the change");
    // ... and so does the flow that was there before.
    let deadline = Instant::now() + 2 * IO_TIMEOUT;
    while outside.peers().last().map(|p| *p.ip()) != Some(new) {
        assert!(Instant::now() < deadline, "{:?}", outside.peers().last());
        pinger.wait_answer(answer, Duration::from_millis(100));
    }
    assert!(
        pinger.wait_answer(answer, IO_TIMEOUT),
        "the live flow goes on as the new address"
    );
    let peers = outside.peers();
    let live = peers.iter().rev().take(10);
    assert!(
        live.clone().all(|p| *p.ip() == new),
        "{:?}",
        live.collect::<Vec<_>>()
    );
    assert!(pinger.finish() > 0);
}

// ---- 11. sustained connection load -------------------------------------------------

#[test]
fn new_connections_at_full_rate_never_fail_with_a_small_table() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start_with(
        Agent::builder(&node).args(["--ct-max", "1024"]),
        "web",
        &["-p", "8080:80"],
    );
    let _web = Server::line_echo(&ctr, 80, "web");
    let web = node.node_port(8080);
    let done = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let _lock = TrafficLock::acquire();
    // Four clients as fast as they go, 1,000 connections each: every
    // connection leaves a closed flow behind, four thousand of them in a
    // table of 1,024 entries (two per flow). Counted, not timed: a loaded
    // machine only makes it slower.
    const EACH: u64 = 1_000;
    let deadline = Instant::now() + Duration::from_secs(90);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (done, failures, node) = (&done, &failures, &node);
            s.spawn(move || {
                node.client.exec_closure(|| {
                    for _ in 0..EACH {
                        if Instant::now() > deadline {
                            break;
                        }
                        match short_connection_here(web, "hello") {
                            Ok(()) => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                if let Ok(mut f) = failures.lock() {
                                    f.push(format!("client {t}: {e}"));
                                }
                            }
                        }
                    }
                });
            });
        }
    });
    let done = done.load(Ordering::Relaxed);
    let failures = failures.into_inner().unwrap_or_default();
    assert_eq!(
        done + failures.len() as u64,
        4 * EACH,
        "every connection was tried within 90 s"
    );
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {:?}\n{:#}",
        failures.len(),
        done + failures.len() as u64,
        &failures[..failures.len().min(5)],
        agent.status()["counters"]
    );
    assert_eq!(agent.counter("drop_ct_full"), 0);
}

// ---- 12. walking the tables ----------------------------------------------------------------

#[test]
fn thousands_of_flows_are_listed_and_flushed_whole() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = Deployment::start(&node, "app", &[]);
    let sink = Server::udp_sink(&node.client, 5301, "sink");
    let _lock = TrafficLock::acquire();
    const FLOWS: usize = 3000;
    // Sockets kept open: each a flow of its own.
    let open = ctr
        .exec_closure(|| -> io::Result<Vec<UdpSocket>> {
            let mut open = Vec::with_capacity(FLOWS);
            for i in 0..FLOWS {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                s.send_to(b"x", node.client_port(5301))?;
                open.push(s);
                if i % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Ok(open)
        })
        .expect("send");
    assert_eq!(sink.wait_peers(FLOWS, IO_TIMEOUT).len(), FLOWS);
    let listed = agent.cli_json(["conntrack", "list", "--json"]);
    let n = listed.as_array().map_or(0, Vec::len);
    assert_eq!(
        n,
        FLOWS,
        "every flow listed (read in batches): {:#}",
        agent.status()
    );
    let flushed = agent.cli_ok(["conntrack", "flush", "--container", "app"]);
    assert_eq!(flushed.trim(), format!("removed {} entries", 2 * FLOWS));
    let listed = agent.cli_json(["conntrack", "list", "--json"]);
    assert_eq!(listed, serde_json::json!([]));
    drop(open);
}

// ---- issue 22: the agent's periodic work is bounded ------------------------------

/// The most entries one pass of the agent's count may touch
/// (`COUNT_PASS_BUDGET`).
const COUNT_PASS_BUDGET: u64 = 65_536;

#[test]
fn counting_a_million_conntrack_entries_touches_a_bounded_number_per_pass() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use datapath_common::{CtKey, CtTimedEntry};
    const ENTRIES: usize = 1 << 20;
    let node = Node::new();
    let agent = Agent::builder(&node)
        .args(["--ct-max", &ENTRIES.to_string()])
        .start();
    let pin = agent.bpffs_dir().join("maps/CT");
    let data = MapData::from_pin(&pin).expect("open the pinned CT");
    let mut map: BpfHashMap<MapData, CtKey, CtTimedEntry> =
        BpfHashMap::try_from(Map::HashMap(data)).expect("CT is a hash map");
    datapath_tests::bench::flowcore::fill_table(&mut map, ENTRIES).expect("fill CT");
    let work = |st: &Value| st["agent"]["conntrack_count"].clone();
    // Asked for continuously, the count goes on pass after pass (a second
    // apart) until its walk of the tables is done.
    let mut st = agent.status();
    wait::until(
        "a count of the whole table",
        Duration::from_secs(300),
        || {
            st = agent.status();
            work(&st)["walks"].as_u64() >= Some(1)
                && st["conntrack_entries"].as_u64() == Some(ENTRIES as u64)
        },
    );
    let w = work(&st);
    eprintln!("count of {ENTRIES} entries: {w:#}, agent {:#}", st["agent"]);
    let passes = w["passes"].as_u64().expect("passes");
    let most = w["max_pass_entries"].as_u64().expect("max_pass_entries");
    let syscalls = w["max_pass_syscalls"].as_u64().expect("max_pass_syscalls");
    // 1M entries read and 512k replies looked up cannot fit fewer passes.
    let least = (ENTRIES as u64 * 3 / 2).div_ceil(COUNT_PASS_BUDGET);
    assert!(
        passes >= least,
        "{passes} passes for {ENTRIES} entries: {w:#}"
    );
    assert!(
        most <= COUNT_PASS_BUDGET && most > 0,
        "one pass touched {most} entries: {w:#}"
    );
    // One batch read per 1,024 entries at most… and one lookup per flow.
    assert!(
        syscalls <= COUNT_PASS_BUDGET,
        "one pass made {syscalls} syscalls: {w:#}"
    );
    assert_eq!(w["pass_budget"].as_u64(), Some(COUNT_PASS_BUDGET));
    let cpu = st["agent"]["cpu_user_s"].as_f64().expect("cpu_user_s")
        + st["agent"]["cpu_system_s"].as_f64().expect("cpu_system_s");
    assert!(
        cpu > 0.0,
        "the agent's CPU time is reported: {:#}",
        st["agent"]
    );
    assert_eq!(
        agent.cli_ok(["conntrack", "flush"]).trim(),
        format!("removed {ENTRIES} entries")
    );
}
