//! The flow core in a namespace node (issue 12), one test per behaviour:
//! flows expire in the kernel with the agent killed; floods fill the tables
//! without locking anyone out; TCP 4-tuples are reused at once and stray
//! RSTs ignored; parallel creations of one flow both succeed; the
//! masquerade fills its range; the node's own connections keep their
//! replies; fragments cross both ways; egress follows the node's routes and
//! MTU; connection load at full rate never collapses; the tables are walked
//! and flushed whole.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use datapath_tests::{
    agent::Agent,
    frame::{Frame, tcp_flags},
    inspect,
    lock::TrafficLock,
    netns::Netns,
    node::{self, Node},
    traffic::{IO_TIMEOUT, Server, echo_exchange, tcp_connect_from},
};
use serde_json::Value;

// ---- helpers ------------------------------------------------------------------

#[track_caller]
fn add(agent: &Agent<'_>, name: &str, ns: &Netns, publish: &[&str]) {
    let mut args = vec!["container", "add", name, "--netns", ns.name()];
    for p in publish {
        args.extend(["-p", p]);
    }
    agent.cli_ok(args);
}

fn status(agent: &Agent<'_>) -> Value {
    agent.cli_json(["status", "--json"])
}

fn counter(agent: &Agent<'_>, name: &str) -> u64 {
    let st = status(agent);
    st["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {st:#}"))
}

/// The container's address, from `container list`.
fn container_addr(agent: &Agent<'_>, name: &str) -> Ipv4Addr {
    let list = agent.cli_json(["container", "list", "--json"]);
    let c = list
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}: {list:#}"));
    c["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address for {name}: {c:#}"))
}

fn node_port(node: &Node, port: u16) -> SocketAddr {
    SocketAddr::from((node.node_addr(), port))
}

fn client_port(node: &Node, port: u16) -> SocketAddr {
    SocketAddr::from((node.client_addr(), port))
}

/// Lets the kernel fragment what this socket sends (no path MTU
/// discovery, no DF).
fn allow_fragments(s: &UdpSocket) {
    set_int(s, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
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

/// One datagram from a new socket on `local` (0: any port) to `dst`; the
/// answer, if one comes within `wait`.
fn udp_once(local: u16, dst: SocketAddr, payload: &[u8], wait: Duration) -> io::Result<Vec<u8>> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, local))?;
    allow_fragments(&s);
    s.connect(dst)?;
    s.set_read_timeout(Some(wait))?;
    s.send(payload)?;
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// A UDP echo server of any datagram size on `port` in `ns` (the shared
/// servers read 2 KiB); stops on drop.
struct BigEcho {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl BigEcho {
    fn start(ns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sock = ns
            .exec_closure(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
            .unwrap_or_else(|e| panic!("bind the echo on {port}: {e}"));
        allow_fragments(&sock);
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for BigEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A TCP server on `port` in `ns` that echoes each line and closes the
/// connection itself after answering `bye` (so that the server, not the
/// client, ends up in TIME_WAIT); stops on drop.
struct LineServer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl LineServer {
    fn start(ns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns
            .exec_closure(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
            .unwrap_or_else(|e| panic!("listen on {port}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok((c, _)) = listener.accept() {
                    let s = s.clone();
                    conns.push(std::thread::spawn(move || serve_lines(c, &s)));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

fn serve_lines(mut c: TcpStream, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if c.write_all(&line).is_err() {
                return;
            }
            if line == b"bye\n" {
                return;
            }
        }
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends `line` and reads the echo.
fn line(c: &mut TcpStream, line: &str) -> io::Result<()> {
    let msg = format!("{line}\n");
    let back = echo_exchange(c, msg.as_bytes())?;
    if back == msg.as_bytes() {
        Ok(())
    } else {
        Err(io::Error::other(format!("echo {back:?} for {msg:?}")))
    }
}

/// Sends `frames` out of interface `ifname` of `ns` through a packet
/// socket, as a forged packet would arrive.
fn inject(ns: &Netns, ifname: &str, frames: &[Vec<u8>]) {
    let ifindex = node::ifindex(ns, ifname);
    ns.exec_closure(|| {
        // SAFETY: plain socket call.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        for f in frames {
            sll.sll_addr[..6].copy_from_slice(&f[..6]);
            // SAFETY: `f` and `sll` outlive the call; sizes are theirs.
            let n = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const sll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(
                n,
                f.len() as isize,
                "sendto: {}",
                io::Error::last_os_error()
            );
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
    });
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
    let ctr = node.add_container_netns("app");
    let mut agent = Agent::builder(&node)
        .args([
            "--ct-max",
            "256",
            "--ct-timeout-udp",
            "1s",
            "--ct-timeout-tcp-close",
            "1s",
            "--snat-ports",
            "61000-61099",
        ])
        .start();
    add(&agent, "app", &ctr, &["8080:80"]);
    let _dns = Server::udp_echo(&node.client, 5300, "dns");
    let _web = LineServer::start(&ctr, 80);
    agent.kill();

    // Six seconds of DNS-like queries (each from a new socket: a new flow
    // and a masquerade port of 100) and short connections to a published
    // port: 300 queries need the ports of the expired ones, and the
    // connections' closed flows must make way.
    let dns = client_port(&node, 5300);
    let web = node_port(&node, 8080);
    let deadline = Instant::now() + Duration::from_secs(6);
    let (mut queries, mut conns) = (0, 0);
    while Instant::now() < deadline {
        for _ in 0..5 {
            ctr.exec_closure(|| udp_once(0, dns, b"query", Duration::from_secs(2)))
                .unwrap_or_else(|e| panic!("query {queries} with the agent down: {e}"));
            queries += 1;
        }
        node.client
            .exec_closure(|| -> io::Result<()> {
                let mut c = TcpStream::connect_timeout(&web, IO_TIMEOUT)?;
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                line(&mut c, "hello")?;
                line(&mut c, "bye")
            })
            .unwrap_or_else(|e| panic!("connection {conns} with the agent down: {e}"));
        conns += 1;
        std::thread::sleep(Duration::from_millis(90));
    }
    eprintln!("{queries} queries and {conns} connections with the agent down");
    agent.restart();
    assert_eq!(counter(&agent, "drop_snat_ports_exhausted"), 0);
    assert_eq!(counter(&agent, "drop_ct_full"), 0);
    assert!(
        counter(&agent, "ct_expired") > 0,
        "the kernel expired flows"
    );
}

// ---- 2. fill resistance ---------------------------------------------------------------

#[test]
fn a_syn_flood_and_a_udp_spray_lock_out_neither_new_nor_established_flows() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web_ns = node.add_container_netns("web");
    let spray_ns = node.add_container_netns("spray");
    let agent = Agent::builder(&node).args(["--ct-max", "1024"]).start();
    add(&agent, "web", &web_ns, &["8080:80"]);
    add(&agent, "spray", &spray_ns, &[]);
    let _web = LineServer::start(&web_ns, 80);
    let _sink = Server::udp_sink(&node.client, 5301, "sink");
    let web = node_port(&node, 8080);
    let mut established = node
        .client
        .exec_closure(|| -> io::Result<TcpStream> {
            let mut c = TcpStream::connect_timeout(&web, IO_TIMEOUT)?;
            c.set_read_timeout(Some(IO_TIMEOUT))?;
            line(&mut c, "before")?;
            Ok(c)
        })
        .expect("the established connection");

    // A spoofed SYN flood to the published port, and a container spraying
    // UDP at random ports of the outside, both far beyond the tables.
    let flood = node.client.spawn(
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
        node.client
            .exec_closure(|| -> io::Result<()> {
                let mut c = TcpStream::connect_timeout(&web, IO_TIMEOUT)?;
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                line(&mut c, "fresh")?;
                line(&mut c, "bye")
            })
            .unwrap_or_else(|e| {
                panic!(
                    "fresh connection {fresh} during the flood: {e}\n{:#}",
                    status(&agent)["counters"]
                )
            });
        fresh += 1;
        line(&mut established, "during")
            .unwrap_or_else(|e| panic!("the established connection stalled: {e}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = spray.join();
    let mut flood = flood;
    let _ = flood.wait();
    line(&mut established, "after").expect("the established connection after the flood");
    let st = status(&agent);
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
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::builder(&node)
        .args(["--ct-timeout-tcp-close", "1s"])
        .start();
    add(&agent, "app", &ctr, &["8080:80"]);
    let _inside = LineServer::start(&ctr, 80);
    let _outside = LineServer::start(&node.client, 7000);
    let web = SocketAddrV4::new(node.node_addr(), 8080);
    let out = SocketAddrV4::new(node.client_addr(), 7000);

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
    // timeout (and a collection of the old flows).
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
        while start.elapsed() < Duration::from_secs(8) {
            line(&mut c, &format!("again {i}"))
                .unwrap_or_else(|e| panic!("the reused 4-tuple broke after {i} lines: {e}"));
            i += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(counter(&agent, "ct_reopened") >= 2);
}

#[test]
fn a_stray_rst_injected_into_a_live_flow_does_not_end_it() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::builder(&node)
        .args(["--ct-timeout-tcp-close", "1s"])
        .start();
    add(&agent, "app", &ctr, &[]);
    let _outside = LineServer::start(&node.client, 7000);
    let out = SocketAddrV4::new(node.client_addr(), 7000);
    let mut c = ctr
        .exec_closure(|| tcp_connect_from(45001, out))
        .expect("connect");
    line(&mut c, "hello").expect("echo");
    // The masquerade port the outside sees (the flow is established).
    let flows = agent.cli_json(["conntrack", "list", "--json"]);
    let port = flows
        .as_array()
        .and_then(|a| a.iter().find(|f| f["orig_src"]["port"] == 45001))
        .and_then(|f| f["nat_src"]["port"].as_u64())
        .unwrap_or_else(|| panic!("no flow from 45001: {flows:#}")) as u16;
    // A RST from the outside's address and port, with a sequence number
    // far from the connection's window (a blind injection, a late segment
    // of an old connection).
    let rst = Frame::tcp((node.client_addr(), 7000), (node.node_addr(), port))
        .tcp_flags(tcp_flags::RST)
        .seq(0x8000_0000)
        .macs(node.client_mac(), node.uplink_mac())
        .build();
    inject(&node.client, node::CLIENT_IF, &[rst]);
    line(&mut c, "right after").expect("the flow goes on");
    // Idle past the closing timeout (and a collection): an established flow
    // waits for its own, hours long.
    std::thread::sleep(Duration::from_secs(7));
    for i in 0..3 {
        line(&mut c, &format!("still {i}")).unwrap_or_else(|e| {
            panic!(
                "the flow ended after a stray RST: {e}\n{:#}",
                status(&agent)["counters"]
            )
        });
    }
    assert_eq!(counter(&agent, "ct_rst_ignored"), 1);
}

// ---- 4. no drop on creation races ---------------------------------------------------

#[test]
fn parallel_queries_from_one_socket_on_two_cpus_all_get_answers() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let ctr = node.add_container_netns("dns");
    let agent = Agent::start(&node);
    add(&agent, "dns", &ctr, &["5353:53/udp"]);
    let _dns = BigEcho::start(&ctr, 53);
    let dst = node_port(&node, 5353);
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
    let c = &status(&agent)["counters"];
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
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::builder(&node)
        .args(["--snat-ports", "61000-61999"])
        .start();
    add(&agent, "app", &ctr, &[]);
    let echo = Server::udp_echo(&node.client, 5300, "dns");
    let dst = client_port(&node, 5300);
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
    let more = ctr.exec_closure(|| {
        (0..60)
            .filter(|_| udp_once(0, dst, b"q", Duration::from_millis(500)).is_ok())
            .count()
    });
    assert_eq!(more, 50, "the last free ports are found");
    assert_eq!(counter(&agent, "drop_snat_ports_exhausted"), 10);
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
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    add(&agent, "app", &ctr, &[]);
    let _udp = Server::udp_echo(&node.client, 5300, "echo");
    let _tcp = LineServer::start(&node.client, 7000);
    let inside = Server::udp_sink(&ctr, 53, "inside");
    let _inside_tcp = LineServer::start(&ctr, 80);
    let node_addr = node.node_addr();
    // The node's own UDP and TCP connections from ports 6000 and 6001...
    let udp = node
        .node
        .exec_closure(|| -> io::Result<UdpSocket> {
            let s = UdpSocket::bind((node_addr, 6000))?;
            s.connect(client_port(&node, 5300))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })
        .expect("node UDP socket");
    let mut tcp = node
        .node
        .exec_closure(|| tcp_connect_from(6001, SocketAddrV4::new(node.client_addr(), 7000)))
        .expect("node TCP connection");
    line(&mut tcp, "before").expect("echo");
    // ... whose ports are then published.
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
    assert!(counter(&agent, "node_flow_passed") >= 2);
}

// ---- 7. fragments ------------------------------------------------------------------------

#[test]
fn a_4000_byte_udp_datagram_crosses_dnat_and_masquerade_both_ways() {
    let node = Node::new();
    let ctr = node.add_container_netns("dns");
    let agent = Agent::start(&node);
    add(&agent, "dns", &ctr, &["5353:53/udp"]);
    let _inside = BigEcho::start(&ctr, 53);
    let _outside = BigEcho::start(&node.client, 5300);
    let big: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
    let answer = node
        .client
        .exec_closure(|| udp_once(0, node_port(&node, 5353), &big, IO_TIMEOUT))
        .expect("the answer to a 4,000-byte query through the published port");
    assert!(answer == big, "arrived whole ({} bytes)", answer.len());
    let answer = ctr
        .exec_closure(|| udp_once(0, client_port(&node, 5300), &big, IO_TIMEOUT))
        .expect("the answer to a 4,000-byte query through the masquerade");
    assert!(answer == big, "arrived whole ({} bytes)", answer.len());
    assert!(counter(&agent, "fragment_translated") >= 4);
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
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    add(&agent, "app", &ctr, &[]);
    let addr = container_addr(&agent, "app");
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
    ctr.exec_closure(|| {
        udp_once(
            0,
            SocketAddr::from(([198, 18, 200, 2], 5300)),
            b"far",
            IO_TIMEOUT,
        )
    })
    .expect("an answer from behind the second link");
    assert_eq!(*far_echo.peers()[0].ip(), addr, "not masqueraded");
    // A node address on another interface: the node answers.
    ctr.exec_closure(|| {
        udp_once(
            0,
            SocketAddr::from(([198, 18, 201, 1], 5301)),
            b"local",
            IO_TIMEOUT,
        )
    })
    .unwrap_or_else(|e| {
        panic!(
            "no answer from the node's address on up1: {e}\n{:#}\n{}",
            status(&agent)["counters"],
            node.node.exec_ok("ip", ["-4", "addr"])
        )
    });
    let peer = local_echo
        .join()
        .expect("the node's echo")
        .expect("the node's echo heard it");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(addr));
    // Through the uplink: masqueraded as before.
    ctr.exec_closure(|| udp_once(0, client_port(&node, 5300), b"out", IO_TIMEOUT))
        .expect("an answer from the outside");
    assert_eq!(*outside.peers()[0].ip(), node.node_addr());
}

#[test]
fn a_datagram_too_big_for_an_mtu_1400_uplink_gets_fragmentation_needed_back() {
    let node = Node::new();
    for (ns, ifname) in [(&node.node, node::UPLINK), (&node.client, node::CLIENT_IF)] {
        ns.exec_ok("ip", ["link", "set", ifname, "mtu", "1400"]);
    }
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    add(&agent, "app", &ctr, &[]);
    let _outside = BigEcho::start(&node.client, 5300);
    let dst = client_port(&node, 5300);
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
        status(&agent)["counters"]
    );
    assert!(counter(&agent, "too_big") >= 1);
}

// ---- 11. sustained connection load -------------------------------------------------

#[test]
fn new_connections_at_full_rate_never_fail_with_a_small_table() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::builder(&node).args(["--ct-max", "1024"]).start();
    add(&agent, "web", &ctr, &["8080:80"]);
    let _web = LineServer::start(&ctr, 80);
    let web = node_port(&node, 8080);
    let done = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    // Four clients as fast as they go for 4 s: each connection leaves a
    // closed flow behind, thousands of them in a table of 1,024 entries.
    std::thread::scope(|s| {
        for t in 0..4 {
            let (done, failures, node) = (&done, &failures, &node);
            s.spawn(move || {
                node.client.exec_closure(|| {
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_secs(4) {
                        let r = (|| -> io::Result<()> {
                            let mut c = TcpStream::connect_timeout(&web, IO_TIMEOUT)?;
                            c.set_read_timeout(Some(IO_TIMEOUT))?;
                            line(&mut c, "bye")
                        })();
                        match r {
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
    eprintln!("{done} connections in 4 s");
    assert!(done > 1024, "more connections than the table has entries");
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {:?}\n{:#}",
        failures.len(),
        done + failures.len() as u64,
        &failures[..failures.len().min(5)],
        status(&agent)["counters"]
    );
    assert_eq!(counter(&agent, "drop_ct_full"), 0);
}

// ---- 12. walking the tables ----------------------------------------------------------------

#[test]
fn thousands_of_flows_are_listed_and_flushed_whole() {
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    add(&agent, "app", &ctr, &[]);
    let sink = Server::udp_sink(&node.client, 5301, "sink");
    const FLOWS: usize = 3000;
    // Sockets kept open: each a flow of its own.
    let open = ctr
        .exec_closure(|| -> io::Result<Vec<UdpSocket>> {
            let mut open = Vec::with_capacity(FLOWS);
            for i in 0..FLOWS {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                s.send_to(b"x", client_port(&node, 5301))?;
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
    assert_eq!(n, FLOWS, "every flow listed (read in batches)");
    let flushed = agent.cli_ok(["conntrack", "flush", "--container", "app"]);
    assert_eq!(flushed.trim(), format!("removed {} entries", 2 * FLOWS));
    let listed = agent.cli_json(["conntrack", "list", "--json"]);
    assert_eq!(listed, serde_json::json!([]));
    drop(open);
}
