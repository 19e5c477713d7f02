//! Seeing what the datapath does (issue 17): per-container counters that
//! move by exactly the packets sent, a metrics page any Prometheus parser
//! reads, series that go with their container, and the monitor's events
//! (present when asked for, absent from the kernel otherwise).

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::mpsc,
    time::Duration,
};

use datapath_tests::{
    capture,
    fixture::Deployment,
    node::Node,
    traffic::{Server, send_router_advertisement, udp_request, udp_request_within, udp_send},
    wait,
};

/// The page parsed, after checking that every family has HELP and TYPE.
fn parse(page: &str) -> prometheus_parse::Scrape {
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("the metrics page does not parse: {e}\n{page}"));
    assert!(!scrape.samples.is_empty(), "no samples:\n{page}");
    for s in &scrape.samples {
        let family = ["_total", "_bucket", "_sum", "_count", "_info", "_created"]
            .iter()
            .find_map(|suffix| s.metric.strip_suffix(suffix))
            .filter(|f| page.contains(&format!("# TYPE {f} ")))
            .unwrap_or(&s.metric);
        for kind in ["HELP", "TYPE"] {
            assert!(
                page.contains(&format!("# {kind} {family} ")),
                "family {family} (of {}) has no {kind}:\n{page}",
                s.metric
            );
        }
        assert!(family.starts_with("datapath_"), "{family} lacks the prefix");
    }
    scrape
}

/// The value of the sample of `metric` with exactly `labels` among its
/// labels, if there is one.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<u64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v as u64,
            _ => panic!("{metric} is not a plain value"),
        })
}

fn traffic(scrape: &prometheus_parse::Scrape, container: &str) -> [u64; 4] {
    let get = |metric: &str, dir: &str| {
        sample(
            scrape,
            metric,
            &[("container", container), ("direction", dir)],
        )
        .unwrap_or(0)
    };
    [
        get("datapath_container_packets_total", "rx"),
        get("datapath_container_bytes_total", "rx"),
        get("datapath_container_packets_total", "tx"),
        get("datapath_container_bytes_total", "tx"),
    ]
}

/// A first UDP exchange with the echo server behind node port `port`,
/// retried while the server starts; its answer.
fn first_exchange(node: &Node, port: u16, payload: &[u8]) -> Vec<u8> {
    wait::for_some(Duration::from_secs(30), || {
        udp_request_within(
            &node.client,
            0,
            node.node_port(port),
            payload,
            Duration::from_secs(2),
        )
        .ok()
    })
    .expect("the echo server answers")
}

#[test]
fn container_counters_move_by_exactly_the_packets_sent_and_the_page_parses() {
    const N: u64 = 12;
    let node = Node::new();
    let web = Deployment::start(&node, "web", &["-p", "8080:80/udp"]);
    let _echo = Server::udp_echo(&web.ctr, 80, "web");
    let payload = [b'x'; 32];
    // One exchange first: the flow exists, the echo server answers.
    let reply = first_exchange(&node, 8080, &payload);
    let before = traffic(&parse(&web.agent.metrics()), "web");
    for _ in 0..N {
        udp_request(&node.client, node.node_port(8080), &payload).expect("echo");
    }
    let page = web.agent.metrics();
    if std::env::var_os("SHOW_METRICS").is_some() {
        eprintln!("{page}\n{}", web.agent.cli_ok(["status"]));
    }
    let after = traffic(&parse(&page), "web");
    // A frame: Ethernet 14 + IPv4 20 + UDP 8 + payload.
    let frame = |len: usize| 42 + len as u64;
    assert_eq!(
        [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
            after[3] - before[3]
        ],
        [N, N * frame(payload.len()), N, N * frame(reply.len())],
        "rx packets, rx bytes, tx packets, tx bytes of web:\n{page}"
    );
    for family in [
        "datapath_drops_total",
        "datapath_conntrack_entries",
        "datapath_conntrack_fill_ratio",
        "datapath_map_update_duration_seconds",
        "datapath_api_requests_total",
        "datapath_build_info",
        "datapath_ratelimit_packets_total",
        "datapath_program_run_time_seconds",
    ] {
        assert!(page.contains(family), "no {family} on the page:\n{page}");
    }
    // The kernel's program statistics are on while metrics are scraped.
    let scrape = parse(&web.agent.metrics());
    assert_eq!(
        sample(&scrape, "datapath_program_stats_enabled", &[]),
        Some(1)
    );
    // `datapath status` shows the same figures in words.
    let status = web.agent.cli_ok(["status"]);
    assert!(
        status.contains(&format!("container web: received {} packets", after[0])),
        "{status}"
    );
}

/// How far the figures of [`traffic`] moved between two scrapes.
fn moved(before: [u64; 4], after: [u64; 4]) -> [u64; 4] {
    [
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
        after[3] - before[3],
    ]
}

/// A first UDP exchange from `from` with the echo server at `to`, retried
/// while the server starts and the path settles: the answer's length.
fn first_answer_len(from: &datapath_tests::netns::Netns, to: SocketAddr, payload: &[u8]) -> usize {
    let first = wait::for_some(Duration::from_secs(30), || {
        udp_request_within(from, 0, to, payload, Duration::from_secs(2)).ok()
    })
    .expect("the echo server answers");
    first.len()
}

#[test]
fn hairpin_packets_count_as_received_by_the_container_they_reach() {
    const N: u64 = 9;
    let node = Node::new();
    let c1 = node.add_container_netns("c1");
    let c2 = node.add_container_netns("c2");
    let agent = datapath_tests::agent::Agent::start(&node);
    agent.add("c1", &c1, &[]);
    agent.add("c2", &c2, &["-p", "5354:53/udp"]);
    let _echo = Server::udp_echo(&c2, 53, "c2");
    let to = node.node_port(5354);
    let payload = [b'h'; 40];
    let reply = first_answer_len(&c1, to, &payload);
    let before = parse(&agent.metrics());
    for _ in 0..N {
        udp_request(&c1, to, &payload).expect("c1 → node:5354 (c2's)");
    }
    let after = parse(&agent.metrics());
    // Both ways through the container program (hairpin): each container
    // sends N and receives N, whole frames.
    let frame = |len: usize| 42 + len as u64;
    let (out, back) = (N * frame(payload.len()), N * frame(reply));
    assert_eq!(
        moved(traffic(&before, "c2"), traffic(&after, "c2")),
        [N, out, N, back],
        "rx packets, rx bytes, tx packets, tx bytes of c2 (the published port's)"
    );
    assert_eq!(
        moved(traffic(&before, "c1"), traffic(&after, "c1")),
        [N, back, N, out],
        "rx packets, rx bytes, tx packets, tx bytes of c1 (the client)"
    );
}

#[test]
fn overlay_packets_count_for_the_containers_on_both_nodes() {
    use datapath_tests::cluster::{self, Etcd, Switch};
    const N: u64 = 7;
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let (n1, n2) = (switch.node(1), switch.node(2));
    let a1 = cluster::agent(&n1, &etcd, "n1", &[]);
    let a2 = cluster::agent(&n2, &etcd, "n2", &[]);
    let (ca, cb) = (n1.add_container_netns("a"), n2.add_container_netns("b"));
    a1.add("a", &ca, &[]);
    let b = a2.add("b", &cb, &[]);
    let _echo = Server::udp_echo(&cb, 5300, "b");
    let to = SocketAddr::from((b.addr, 5300));
    let payload = [b'o'; 24];
    // The first exchange waits for the nodes to learn of each other.
    let reply = first_answer_len(&ca, to, &payload);
    let (before1, before2) = (parse(&a1.metrics()), parse(&a2.metrics()));
    for _ in 0..N {
        udp_request(&ca, to, &payload).expect("a → b across the overlay");
    }
    let (after1, after2) = (parse(&a1.metrics()), parse(&a2.metrics()));
    let frame = |len: usize| 42 + len as u64;
    let (out, back) = (N * frame(payload.len()), N * frame(reply));
    assert_eq!(
        moved(traffic(&before1, "a"), traffic(&after1, "a")),
        [N, back, N, out],
        "rx packets, rx bytes, tx packets, tx bytes of a (node 1)"
    );
    assert_eq!(
        moved(traffic(&before2, "b"), traffic(&after2, "b")),
        [N, out, N, back],
        "rx packets, rx bytes, tx packets, tx bytes of b (node 2)"
    );
}

#[test]
fn a_deleted_containers_series_vanish_and_metrics_serve_over_tcp() {
    let node = Node::new();
    node.node.exec_ok("ip", ["link", "set", "lo", "up"]);
    let addr: SocketAddr = "127.0.0.1:9417".parse().expect("address");
    let agent = datapath_tests::agent::Agent::builder(&node)
        .args(["--metrics", &addr.to_string()])
        .start();
    let ctr = node.add_container_netns("gone");
    agent.add("gone", &ctr, &["-p", "8081:81/udp"]);
    let _echo = Server::udp_echo(&ctr, 81, "gone");
    let before = parse(&agent.metrics());
    first_exchange(&node, 8081, b"hello");
    let scrape = |agent: &datapath_tests::agent::Agent<'_>| {
        datapath_tests::traffic::http_get(&node.node, addr, "/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics over TCP: {e}\n{}", agent.log()))
    };
    let page = scrape(&agent);
    assert!(
        traffic(&parse(&page), "gone")[0] > traffic(&before, "gone")[0],
        "packets delivered:\n{page}"
    );
    agent.cli_ok(["container", "del", "gone"]);
    let page = scrape(&agent);
    parse(&page);
    assert!(
        !page.contains("container=\"gone\""),
        "series of the deleted container remain:\n{page}"
    );
}

#[test]
fn a_containers_drops_are_counted_by_reason_per_container() {
    const N: u64 = 7;
    let node = Node::new();
    let app = Deployment::start(&node, "ttl", &[]);
    let reason = [("container", "ttl"), ("reason", "ttl_exceeded")];
    let before = sample(
        &parse(&app.agent.metrics()),
        "datapath_container_drops_total",
        &reason,
    )
    .unwrap_or(0);
    // Datagrams whose TTL would reach zero on the node: not forwarded, and
    // counted against the container that sent them.
    let to = node.client_port(9003);
    app.ctr.exec_closure(|| {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.set_ttl(1).expect("ttl");
        for _ in 0..N {
            s.send_to(b"short-lived", to).expect("send");
        }
    });
    let page = app.agent.metrics();
    let after = sample(&parse(&page), "datapath_container_drops_total", &reason).unwrap_or(0);
    assert_eq!(after - before, N, "{page}");
}

#[test]
fn a_packet_dropped_before_its_address_is_read_counts_as_its_containers() {
    const N: u64 = 5;
    let node = Node::new();
    let app = Deployment::start(&node, "bad", &[]);
    let reason = [("container", "bad"), ("reason", "malformed")];
    let before = sample(
        &parse(&app.agent.metrics()),
        "datapath_container_drops_total",
        &reason,
    )
    .unwrap_or(0);
    // IPv4 with a header length of 16 bytes: malformed, dropped before the
    // program reads the source address; the veth it came in by says whose
    // it is.
    let mut frame = vec![0xff; 6];
    frame.extend([0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    frame.extend([0x44, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]);
    frame.extend(Ipv4Addr::new(198, 19, 0, 2).octets());
    frame.extend(Ipv4Addr::new(198, 18, 0, 1).octets());
    frame.resize(60, 0);
    capture::send_frames(&app.ctr, "eth0", &vec![frame; N as usize]);
    let page = app.agent.metrics();
    let after = sample(&parse(&page), "datapath_container_drops_total", &reason).unwrap_or(0);
    assert_eq!(after - before, N, "{page}");
}

/// Reads `child`'s stdout lines on a thread.
fn lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn monitor_shows_a_spoofed_packet_dropped_with_its_reason_and_addresses() {
    let node = Node::new();
    let app = Deployment::start(&node, "app", &[]);
    let spoof = Ipv4Addr::new(198, 18, 0, 77);
    app.ctr
        .exec_ok("ip", ["addr", "add", &format!("{spoof}/32"), "dev", "eth0"]);
    let mut monitor = app.agent.monitor(&["--drops", "--json"]);
    let rx = lines(&mut monitor);
    let to = node.client_port(9001);
    // The monitor subscribes shortly after it starts: send until it shows
    // one (bounded).
    let event = wait::for_some(Duration::from_secs(30), || {
        udp_send(&app.ctr, SocketAddr::from((spoof, 5555)), to, b"spoofed").expect("send");
        let line = rx.recv_timeout(Duration::from_millis(200)).ok()?;
        Some(serde_json::from_str::<serde_json::Value>(&line).expect("JSON line"))
    });
    let _ = monitor.kill();
    let _ = monitor.wait();
    let ev = event.unwrap_or_else(|| panic!("no event; agent log:\n{}", app.agent.log()));
    assert_eq!(ev["kind"], "drop", "{ev}");
    assert_eq!(ev["reason"], "spoofed", "{ev}");
    assert_eq!(ev["hook"], "container-tc", "{ev}");
    // Whatever its source address, the veth says whose it is.
    assert_eq!(ev["container"], "app", "{ev}");
    assert_eq!(ev["protocol"], "udp", "{ev}");
    assert_eq!(ev["src"], spoof.to_string(), "{ev}");
    assert_eq!(ev["sport"], 5555, "{ev}");
    assert_eq!(ev["dst"], to.ip().to_string(), "{ev}");
    assert_eq!(ev["dport"], to.port(), "{ev}");
}

#[test]
fn a_containers_router_advertisement_is_its_drop_and_the_monitor_names_it() {
    let node = Node::new();
    let app = Deployment::start(&node, "ra", &[]);
    let reason = [("container", "ra"), ("reason", "router_advertisement")];
    let before = sample(
        &parse(&app.agent.metrics()),
        "datapath_container_drops_total",
        &reason,
    )
    .unwrap_or(0);
    let mut monitor = app
        .agent
        .monitor(&["--drops", "--json", "--container", "ra"]);
    let rx = lines(&mut monitor);
    // The monitor subscribes shortly after it starts: send until it shows
    // one (bounded).
    let mut sent = 0;
    let event = wait::for_some(Duration::from_secs(30), || {
        app.ctr
            .exec_closure(|| send_router_advertisement("eth0"))
            .expect("send a router advertisement");
        sent += 1;
        let line = rx.recv_timeout(Duration::from_millis(200)).ok()?;
        Some(serde_json::from_str::<serde_json::Value>(&line).expect("JSON line"))
    });
    let _ = monitor.kill();
    let _ = monitor.wait();
    let ev = event.unwrap_or_else(|| panic!("no event; agent log:\n{}", app.agent.log()));
    assert_eq!(ev["kind"], "drop", "{ev}");
    assert_eq!(ev["reason"], "router_advertisement", "{ev}");
    assert_eq!(ev["hook"], "container-tc", "{ev}");
    assert_eq!(ev["container"], "ra", "{ev}");
    // Every advertisement sent is counted as the container's drop (the
    // last ones may still be on their way through the veth).
    let count = || {
        sample(
            &parse(&app.agent.metrics()),
            "datapath_container_drops_total",
            &reason,
        )
        .unwrap_or(0)
            - before
    };
    wait::within(Duration::from_secs(10), || count() >= sent);
    assert_eq!(count(), sent, "{}", app.agent.metrics());
}

/// The producer position of the pinned ring buffer `path` (bytes written
/// since it was created).
fn ring_producer_pos(path: &std::path::Path) -> u64 {
    let map = aya::maps::MapData::from_pin(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    // The producer page follows the consumer page; it is read-only.
    // SAFETY: a fresh read-only shared mapping of the map's fd, unmapped
    // below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ,
            libc::MAP_SHARED,
            map.fd().as_fd().as_raw_fd(),
            page as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap the ring buffer");
        let pos = std::ptr::read_volatile(p.cast::<u64>());
        libc::munmap(p, page);
        pos
    }
}

#[test]
fn with_the_monitor_off_the_kernel_writes_no_events() {
    let node = Node::new();
    let app = Deployment::start(&node, "quiet", &["-p", "8082:82/udp"]);
    let _echo = Server::udp_echo(&app.ctr, 82, "quiet");
    let spoof = Ipv4Addr::new(198, 18, 0, 78);
    app.ctr
        .exec_ok("ip", ["addr", "add", &format!("{spoof}/32"), "dev", "eth0"]);
    let ring = app.agent.bpffs_dir().join("maps").join("EVENTS");
    let before = ring_producer_pos(&ring);
    let dropped = app.agent.counter("drop_spoofed");
    for i in 0..5u16 {
        udp_send(
            &app.ctr,
            SocketAddr::from((spoof, 6000 + i)),
            node.client_port(9002),
            b"spoofed",
        )
        .expect("send");
        // New flows too.
        first_exchange(&node, 8082, b"new flow");
    }
    wait::until("the drops are counted", Duration::from_secs(10), || {
        app.agent.counter("drop_spoofed") >= dropped + 5
    });
    assert_eq!(
        ring_producer_pos(&ring),
        before,
        "the kernel wrote events with no monitor running"
    );
    // The same traffic with a monitor running moves the ring buffer: the
    // position read above is the one the kernel writes.
    let mut monitor = app.agent.monitor(&["--json"]);
    let rx = lines(&mut monitor);
    let seen = wait::for_some(Duration::from_secs(30), || {
        udp_send(
            &app.ctr,
            SocketAddr::from((spoof, 7000)),
            node.client_port(9002),
            b"spoofed",
        )
        .expect("send");
        rx.recv_timeout(Duration::from_millis(200)).ok()
    });
    let _ = monitor.kill();
    let _ = monitor.wait();
    assert!(seen.is_some(), "the monitor showed nothing");
    assert!(
        ring_producer_pos(&ring) > before,
        "the ring buffer's producer position did not move with a monitor running"
    );
}
