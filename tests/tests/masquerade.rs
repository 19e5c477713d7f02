//! Masqueraded container egress in a namespace node (issue 4): TCP, UDP and
//! ping from containers reach the client from the node's address and a
//! port of the masquerade range; flows expire and free their ports; a full
//! table drops new flows, counted, and keeps established ones; ICMP errors
//! reach the container that caused them.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    agent::Agent,
    fixture::Deployment,
    netns::Netns,
    node::Node,
    traffic::{
        IO_TIMEOUT, Server, echo_exchange, http_exchange, http_get, tcp_connect_from, udp_request,
        udp_request_from, udp_request_within,
    },
    wait,
};
use serde_json::Value;

/// The default masquerade port range.
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;

/// The node's agent, started with `agent_args`, with container `app`.
fn app<'n>(node: &'n Node, agent_args: &[&str]) -> Deployment<'n> {
    Deployment::start_with(
        Agent::builder(node).args(agent_args.iter().copied()),
        "app",
        &[],
    )
}

/// The node's agent with containers `a` and `b`.
fn a_and_b(node: &Node) -> (Agent<'_>, Netns, Netns) {
    let Deployment { agent, ctr: a, .. } = Deployment::start(node, "a", &[]);
    let b = node.add_container_netns("b");
    agent.add("b", &b, &[]);
    (agent, a, b)
}

/// The masqueraded flow whose original source port is `sport` and
/// destination port `dport`, if listed.
fn snat_flow(flows: &[Value], proto: &str, sport: u16, dport: u16) -> Option<Value> {
    flows
        .iter()
        .find(|f| {
            f["kind"] == "snat"
                && f["proto"] == proto
                && f["orig_src"]["port"] == sport
                && f["orig_dst"]["port"] == dport
        })
        .cloned()
}

#[test]
fn container_tcp_to_the_client_comes_from_the_node_address_and_a_masquerade_port() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(&node, &[]);
    let outside = Server::http(&node.client, 8000, "outside");
    let body = http_get(&ctr, node.client_port(8000), "/").expect("GET from the container");
    let peers = outside.peers();
    assert_eq!(peers.len(), 1);
    let peer = peers[0];
    assert_eq!(*peer.ip(), node.node_addr(), "masqueraded source");
    assert!(SNAT_PORTS.contains(&peer.port()), "source port {peer}");
    assert_eq!(body, format!("outside port 8000: hello {peer}\n"));
    let f = agent.flows();
    let flow = f
        .iter()
        .find(|f| f["kind"] == "snat" && f["proto"] == "tcp")
        .unwrap_or_else(|| panic!("no TCP SNAT flow: {f:#?}"));
    assert_eq!(flow["nat_src"]["addr"], node.node_addr().to_string());
    assert_eq!(flow["nat_src"]["port"], peer.port());
    assert_eq!(flow["container"], "app");
}

#[test]
fn container_udp_to_the_client_is_masqueraded_and_answered() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(&node, &[]);
    let echo = Server::udp_echo(&node.client, 5300, "echo");
    let answer = udp_request_from(&ctr, 40000, node.client_port(5300), b"ping?")
        .unwrap_or_else(|e| panic!("UDP from the container: {e}\n{}", agent.log()));
    assert_eq!(answer, b"echo port 5300: ping?");
    let peer = echo.peers()[0];
    assert_eq!(*peer.ip(), node.node_addr());
    assert!(SNAT_PORTS.contains(&peer.port()), "source port {peer}");
    let flow = snat_flow(&agent.flows(), "udp", 40000, 5300).expect("UDP SNAT flow");
    assert_eq!(flow["nat_src"]["port"], peer.port());
    assert_eq!(flow["state"], "replied");
}

#[test]
fn a_container_pings_the_client_through_the_masquerade() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(&node, &[]);
    assert!(
        ctr.ping(node.client_addr()),
        "no echo reply\n{}",
        agent.log()
    );
    let f = agent.flows();
    let icmp = f
        .iter()
        .find(|f| f["kind"] == "snat" && f["proto"] == "icmp")
        .unwrap_or_else(|| panic!("no ICMP flow: {f:#?}"));
    assert_eq!(icmp["nat_src"]["addr"], node.node_addr().to_string());
    assert!(icmp["reply_packets"].as_u64() >= Some(1), "{icmp:#}");
}

#[test]
fn two_containers_pinging_at_once_each_get_their_own_replies() {
    let node = Node::new();
    let (agent, a, b) = a_and_b(&node);
    let target = node.client_addr().to_string();
    let pings: Vec<_> = [&a, &b]
        .into_iter()
        .map(|ns| {
            // Five echoes each, interleaved; -w bounds the whole run.
            let mut cmd = Command::new("ping");
            cmd.args(["-n", "-c", "5", "-i", "0.2", "-w", "5", &target])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            ns.spawn(&mut cmd)
        })
        .collect();
    for (ns, child) in [&a, &b].into_iter().zip(pings) {
        let out = child.wait_with_output().expect("wait for ping");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("5 received"),
            "ping from {} failed:\n{text}{}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        // Replies meant for the other container would show as duplicates
        // or foreign sequence numbers.
        assert!(!text.contains("DUP!"), "{text}");
    }
    let f = agent.flows();
    let icmp: Vec<&Value> = f.iter().filter(|f| f["proto"] == "icmp").collect();
    assert_eq!(icmp.len(), 2, "one ICMP flow per container: {f:#?}");
    assert_ne!(
        icmp[0]["nat_src"]["port"], icmp[1]["nat_src"]["port"],
        "distinct masquerade ids"
    );
    let mut owners: Vec<&str> = icmp
        .iter()
        .filter_map(|f| f["container"].as_str())
        .collect();
    owners.sort_unstable();
    assert_eq!(owners, ["a", "b"]);
}

#[test]
fn two_containers_with_the_same_source_port_to_the_same_destination_both_work() {
    let node = Node::new();
    let (agent, a, b) = a_and_b(&node);
    let udp = Server::udp_echo(&node.client, 5300, "echo");
    let tcp = Server::tcp_echo(&node.client, 7000, "echo");
    let dst = node.client_port(5300);
    for (ns, msg) in [(&a, b"from a"), (&b, b"from b")] {
        let answer = udp_request_from(ns, 40000, dst, msg)
            .unwrap_or_else(|e| panic!("UDP from {}: {e}", ns.name()));
        assert_eq!(answer, [&b"echo port 5300: "[..], msg].concat());
    }
    let udp_peers = udp.peers();
    assert_eq!(udp_peers.len(), 2, "{udp_peers:?}");
    assert_ne!(
        udp_peers[0].port(),
        udp_peers[1].port(),
        "each flow has its own masquerade port"
    );

    // TCP: both connections open at once, from port 40001 in each container.
    let tcp_dst = SocketAddrV4::new(node.client_addr(), 7000);
    let mut conns: Vec<TcpStream> = [&a, &b]
        .into_iter()
        .map(|ns| {
            ns.exec_closure(|| tcp_connect_from(40001, tcp_dst))
                .unwrap_or_else(|e| panic!("TCP from {}:40001: {e}", ns.name()))
        })
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let msg = format!("connection {i}");
        let back = echo_exchange(c, msg.as_bytes()).expect("echo");
        assert_eq!(back, msg.as_bytes());
    }
    let tcp_peers = tcp.wait_peers(2, IO_TIMEOUT);
    assert_eq!(tcp_peers.len(), 2);
    assert_ne!(tcp_peers[0].port(), tcp_peers[1].port());
    let f = agent.flows();
    let same_port: Vec<&Value> = f
        .iter()
        .filter(|f| f["kind"] == "snat" && f["orig_src"]["port"] == 40001)
        .collect();
    assert_eq!(same_port.len(), 2, "{f:#?}");
}

#[test]
fn a_closed_tcp_flow_leaves_conntrack_within_seconds_an_open_one_stays() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(&node, &["--ct-timeout-tcp-close", "2s"]);
    let _web = Server::http(&node.client, 8000, "outside");
    let _echo = Server::tcp_echo(&node.client, 7000, "echo");
    // An idle established connection, which must survive the collection.
    let mut idle = ctr
        .exec_closure(|| tcp_connect_from(40100, SocketAddrV4::new(node.client_addr(), 7000)))
        .expect("connect the idle flow");
    assert_eq!(echo_exchange(&mut idle, b"hi").expect("echo"), b"hi");

    let addr = node.client_port(8000);
    let mut conn = ctr
        .exec_closure(|| tcp_connect_from(40200, SocketAddrV4::new(node.client_addr(), 8000)))
        .expect("connect");
    let open = snat_flow(&agent.flows(), "tcp", 40200, 8000).expect("flow while open");
    assert_eq!(open["state"], "established", "{open:#}");
    // One request; the server closes, the client reads to the end and
    // closes too: FIN both ways.
    http_exchange(&mut conn, addr, "/").expect("GET");
    drop(conn);
    let gone = wait::within(Duration::from_secs(10), || {
        snat_flow(&agent.flows(), "tcp", 40200, 8000).is_none()
    });
    assert!(
        gone,
        "the closed flow is still listed after 10 s: {:#?}",
        agent.flows()
    );
    let stays = snat_flow(&agent.flows(), "tcp", 40100, 7000).expect("the idle flow stays");
    assert_eq!(stays["state"], "established");
    assert_eq!(
        echo_exchange(&mut idle, b"still there").expect("echo"),
        b"still there"
    );
}

#[test]
fn udp_flows_expire_after_the_short_timeout_unless_they_stream_both_ways() {
    // nf_conntrack's UDP timeouts, scaled down: one way, or one exchange,
    // expires after --ct-timeout-udp; traffic both ways more than once
    // makes a stream, which lives for --ct-timeout-udp-stream.
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(
        &node,
        &["--ct-timeout-udp", "2s", "--ct-timeout-udp-stream", "30s"],
    );
    let _echo = Server::udp_echo(&node.client, 5300, "echo");
    let sink = Server::udp_sink(&node.client, 5301, "sink");
    // One exchange (a DNS query).
    udp_request_from(&ctr, 41000, node.client_port(5300), b"q").expect("replied flow");
    // A stream: two exchanges on one socket.
    ctr.exec_closure(|| -> io::Result<()> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 41002))?;
        s.connect(node.client_port(5300))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            s.send(b"q")?;
            s.recv(&mut buf)?;
        }
        Ok(())
    })
    .expect("the stream's two exchanges");
    // One way only.
    ctr.exec_closure(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 41001))?;
        s.send_to(b"nobody answers", node.client_port(5301))
    })
    .expect("send the unreplied datagram");
    assert_eq!(sink.wait_peers(1, IO_TIMEOUT).len(), 1);
    let f = agent.flows();
    let state = |sport, dport| {
        snat_flow(&f, "udp", sport, dport)
            .unwrap_or_else(|| panic!("flow {sport}->{dport} listed: {f:#?}"))["state"]
            .clone()
    };
    assert_eq!(state(41000, 5300), "replied");
    assert_eq!(state(41001, 5301), "unreplied");
    assert_eq!(state(41002, 5300), "stream");

    let gone = wait::within(Duration::from_secs(8), || {
        let f = agent.flows();
        snat_flow(&f, "udp", 41000, 5300).is_none() && snat_flow(&f, "udp", 41001, 5301).is_none()
    });
    assert!(gone, "single exchanges outlive 2 s: {:#?}", agent.flows());
    let f = agent.flows();
    let stream = snat_flow(&f, "udp", 41002, 5300).expect("the stream stays");
    assert!(
        stream["expires_in_s"].as_u64() > Some(20),
        "the stream has the long timeout: {stream:#}"
    );
}

#[test]
fn the_port_of_an_expired_flow_serves_the_next_one() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(
        &node,
        &["--snat-ports", "61000-61000", "--ct-timeout-udp", "5s"],
    );
    let echo = Server::udp_echo(&node.client, 5300, "echo");
    let dst = node.client_port(5300);
    udp_request_from(&ctr, 42000, dst, b"first").expect("first flow");
    assert_eq!(echo.peers()[0].port(), 61000);
    // Same destination, another source port: no port left, the datagram
    // is dropped and counted.
    let err = udp_request_within(&ctr, 42001, dst, b"second", Duration::from_secs(1))
        .expect_err("no port is free");
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    assert_eq!(agent.counter("drop_snat_ports_exhausted"), 1);
    assert_eq!(echo.peers().len(), 1, "the second flow never left the node");
    // Once the first flow has expired its port serves the next one (the
    // kernel finds the holder dead; nothing collects it).
    let gone = wait::within(Duration::from_secs(10), || {
        snat_flow(&agent.flows(), "udp", 42000, 5300).is_none()
    });
    assert!(gone, "the first flow did not expire");
    let answer =
        udp_request_from(&ctr, 42001, dst, b"third").expect("the expired flow's port is free");
    assert_eq!(answer, b"echo port 5300: third");
    let peers = echo.peers();
    assert_eq!(peers.last().map(SocketAddrV4::port), Some(61000));
    let f = snat_flow(&agent.flows(), "udp", 42001, 5300).expect("new flow");
    assert_eq!(f["nat_src"]["port"], 61000);
}

#[test]
fn a_flood_of_new_flows_beyond_the_tables_pushes_out_only_unconfirmed_ones() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(&node, &["--ct-max", "64"]);
    let st = agent.cli_json(["status", "--json"]);
    assert_eq!(st["conntrack_max"], 64, "{st:#}");
    let _echo = Server::tcp_echo(&node.client, 7000, "echo");
    let sink = Server::udp_sink(&node.client, 5301, "sink");
    let mut established = ctr
        .exec_closure(|| tcp_connect_from(40300, SocketAddrV4::new(node.client_addr(), 7000)))
        .expect("connect before the flood");
    assert_eq!(
        echo_exchange(&mut established, b"before").expect("echo"),
        b"before"
    );

    // 1,500 new flows (distinct source ports), one datagram each: three
    // times what the table of unconfirmed flows holds (a quarter of
    // --ct-max, at least 1,024 entries, two per flow). Paced, so that the
    // sink's socket keeps up.
    const FLOOD: usize = 1500;
    let dst = node.client_port(5301);
    ctr.exec_closure(|| -> io::Result<()> {
        for i in 0..FLOOD {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.send_to(b"flood", dst)?;
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })
    .expect("send the flood");
    let received = sink.wait_peers(FLOOD, Duration::from_secs(5)).len();
    assert_eq!(
        received,
        FLOOD,
        "every new flow got through: {:#}",
        agent.cli_json(["status", "--json"])["counters"]
    );
    assert_eq!(agent.counter("drop_ct_full"), 0, "nothing refused");
    let st = agent.cli_json(["status", "--json"]);
    assert!(
        st["conntrack_entries"].as_u64() <= Some(64 + 1024),
        "the tables are bounded: {st:#}"
    );
    // The established flow lives in the main table, which the flood never
    // reached.
    for i in 0..3 {
        let msg = format!("after flood {i}");
        let back = echo_exchange(&mut established, msg.as_bytes())
            .unwrap_or_else(|e| panic!("the established flow stalled: {e}"));
        assert_eq!(back, msg.as_bytes());
    }
}

#[test]
fn udp_to_a_closed_client_port_gets_connection_refused_through_the_masquerade() {
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(&node, &[]);
    // Nothing listens on the client's port 5999: it answers with an ICMP
    // port unreachable to the node's masquerade port.
    let err =
        udp_request(&ctr, node.client_port(5999), b"anyone?").expect_err("nothing answers on 5999");
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "the container's connected socket gets ECONNREFUSED: {err}\ncounters: {:#}",
        agent.cli_json(["status", "--json"])["counters"]
    );
    assert!(agent.counter("icmp_error_translated") >= 1);
}

/// A namespace `far` behind the client, over a link of MTU 1280: the client
/// routes between the node (198.18.0.0/24) and `far` (198.18.1.2/24).
fn far_behind_a_small_mtu_hop(node: &Node) -> Netns {
    let far = node.add_container_netns("far");
    node.client
        .add_veth("tofar", "eth0", &far)
        .unwrap_or_else(|e| panic!("{e}"));
    node.client
        .exec_ok("ip", ["link", "set", "tofar", "mtu", "1280"]);
    node.client
        .exec_ok("ip", ["addr", "add", "198.18.1.1/24", "dev", "tofar"]);
    node.client.exec_ok("ip", ["link", "set", "tofar", "up"]);
    node.client
        .exec_ok("sysctl", ["-qw", "net.ipv4.ip_forward=1"]);
    far.exec_ok("ip", ["link", "set", "eth0", "mtu", "1280"]);
    far.exec_ok("ip", ["addr", "add", "198.18.1.2/24", "dev", "eth0"]);
    far.exec_ok("ip", ["link", "set", "eth0", "up"]);
    far.exec_ok("ip", ["route", "add", "default", "via", "198.18.1.1"]);
    node.node.exec_ok(
        "ip",
        [
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            &node.client_addr().to_string(),
        ],
    );
    far
}

#[test]
fn frag_needed_from_a_smaller_mtu_hop_reaches_the_container() {
    let node = Node::new();
    let far = far_behind_a_small_mtu_hop(&node);
    let Deployment { ctr, agent, .. } = app(&node, &[]);
    let sink = Server::udp_sink(&far, 5400, "far");
    let dst = SocketAddr::from((Ipv4Addr::new(198, 18, 1, 2), 5400));
    // Small datagrams pass the hop.
    udp_probe(&ctr, dst, 100).expect("a small datagram is sent");
    assert_eq!(
        sink.wait_peers(1, IO_TIMEOUT).len(),
        1,
        "the far end is reachable through the masquerade"
    );
    // A 1400-byte datagram with DF cannot cross the 1280 hop: the client
    // answers "fragmentation needed, MTU 1280" to the node's masquerade
    // port, which must reach the container's socket: its next big send
    // fails with EMSGSIZE and the path MTU it knows is 1280.
    let (err, mtu) = ctr
        .exec_closure(|| -> io::Result<(Option<io::Error>, u32)> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(dst)?;
            set_pmtudisc_do(&s)?;
            let big = vec![0x5a; 1400];
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut err = None;
            while Instant::now() < deadline {
                match s.send(&big) {
                    Ok(_) => std::thread::sleep(Duration::from_millis(200)),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            Ok((err, ip_mtu(&s)?))
        })
        .expect("probe the path MTU");
    assert_eq!(
        err.as_ref().and_then(io::Error::raw_os_error),
        Some(libc::EMSGSIZE),
        "the container learns the hop's MTU (got {err:?}, path MTU {mtu}); the node's view: {}\ncounters: {:#}",
        node.node
            .exec_ok("ip", ["route", "get", "198.18.1.2"])
            .trim(),
        agent.cli_json(["status", "--json"])["counters"]
    );
    assert_eq!(mtu, 1280);
    assert!(agent.counter("icmp_error_translated") >= 1);
}

/// What an ICMP error told a socket (`IP_RECVERR`): the ICMP type and code
/// and the address of the router that sent it.
#[derive(Debug, PartialEq, Eq)]
struct IcmpReport {
    icmp_type: u8,
    icmp_code: u8,
    offender: Ipv4Addr,
}

/// Sends one UDP datagram with TTL `ttl` from `ns` to `dst` (what
/// traceroute does) and returns the ICMP error the socket got within two
/// seconds, if any.
fn ttl_probe(ns: &Netns, dst: SocketAddr, ttl: u8) -> io::Result<Option<IcmpReport>> {
    use std::os::fd::AsRawFd;
    ns.exec_closure(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(dst)?;
        s.set_ttl(u32::from(ttl))?;
        let fd = s.as_raw_fd();
        let one: libc::c_int = 1;
        // SAFETY: a live socket and an int option of the size given.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        s.send(b"probe")?;
        let mut pfd = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one live pollfd. POLLERR is reported whatever `events`.
        let n = unsafe { libc::poll(&raw mut pfd, 1, 2000) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 || pfd.revents & libc::POLLERR == 0 {
            return Ok(None);
        }
        read_error_queue(fd)
    })
}

/// Reads one `IP_RECVERR` report from `fd`'s error queue.
fn read_error_queue(fd: libc::c_int) -> io::Result<Option<IcmpReport>> {
    let mut data = [0u8; 64];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below are to
    // live locals of the lengths given.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: `msg` describes live buffers.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_ERRQUEUE) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the CMSG_* walk stays within `control`, as filled by the
    // kernel (msg_controllen was updated by recvmsg).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_RECVERR {
                let ee = libc::CMSG_DATA(c).cast::<libc::sock_extended_err>();
                let e = std::ptr::read_unaligned(ee);
                if e.ee_origin != libc::SO_EE_ORIGIN_ICMP {
                    return Ok(None);
                }
                let sa =
                    std::ptr::read_unaligned(libc::SO_EE_OFFENDER(ee).cast::<libc::sockaddr_in>());
                return Ok(Some(IcmpReport {
                    icmp_type: e.ee_type,
                    icmp_code: e.ee_code,
                    offender: Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                }));
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok(None)
}

#[test]
fn time_exceeded_from_a_router_beyond_the_node_reaches_the_container() {
    // traceroute's second hop: the client routes to `far`; a datagram that
    // leaves the node with TTL 1 expires there, and the client's time
    // exceeded (to the node's masquerade port) must reach the container.
    let node = Node::new();
    let _far = far_behind_a_small_mtu_hop(&node);
    let Deployment { ctr, agent, .. } = app(&node, &[]);
    let dst = SocketAddr::from((Ipv4Addr::new(198, 18, 1, 2), 33434));
    let report = ttl_probe(&ctr, dst, 2).expect("probe");
    assert_eq!(
        report,
        Some(IcmpReport {
            icmp_type: 11,
            icmp_code: 0,
            offender: node.client_addr(),
        }),
        "counters: {:#}",
        agent.cli_json(["status", "--json"])["counters"]
    );
    assert!(agent.counter("icmp_error_translated") >= 1);
}

#[test]
fn time_exceeded_from_the_gateway_reaches_the_container() {
    // traceroute's first hop: a router answers a datagram whose TTL
    // expires on it with time exceeded from its own address; the node is
    // the containers' router and its address to them is the gateway.
    let node = Node::new();
    let Deployment { ctr, agent, .. } = app(&node, &[]);
    let gateway: Ipv4Addr = agent.cli_json(["status", "--json"])["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .expect("a gateway address");
    let report = ttl_probe(&ctr, node.client_port(33434), 1).expect("probe");
    assert_eq!(
        report,
        Some(IcmpReport {
            icmp_type: 11,
            icmp_code: 0,
            offender: gateway,
        }),
        "counters: {:#}",
        agent.cli_json(["status", "--json"])["counters"]
    );
}

/// Sends one datagram of `len` bytes from an ephemeral port of `ns`.
fn udp_probe(ns: &Netns, dst: SocketAddr, len: usize) -> io::Result<usize> {
    ns.exec_closure(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.send_to(&vec![0x11; len], dst)
    })
}

/// `IP_MTU_DISCOVER = IP_PMTUDISC_DO`: set DF, never fragment locally.
fn set_pmtudisc_do(s: &UdpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: a live socket and an int option of the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `IP_MTU` of a connected socket: the path MTU the kernel knows.
fn ip_mtu(s: &UdpSocket) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a live socket; `v` and `len` outlive the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(v).map_err(io::Error::other)
}
