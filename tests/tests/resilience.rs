//! Surviving restarts, crashes, floods and bad input, in namespace nodes
//! with the real agent:
//!
//! * restarts: established flows through a published port and through the
//!   masquerade survive `kill -9` of the agent and its restart, and the
//!   datapath forwards new connections while no agent runs;
//! * reconciliation on start: orphaned veths, containers and map entries
//!   are removed, a container whose veth vanished is recreated, a crash in
//!   the middle of `container add` leaves all of the container or nothing, a
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
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{fs::MetadataExt, net::UnixStream},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use datapath_common::{Endpoint, EndpointKey, ServiceKey, ServiceValue, names, proto};
use datapath_tests::{
    agent::{Agent, datapath_bin},
    frame::Frame,
    lock::TrafficLock,
    netns::Netns,
    node::{self, Node, UPLINK},
};

/// Socket timeouts: generous, so that only a real loss fails a test.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two exchanges of a request/response flow.
const RR_INTERVAL: Duration = Duration::from_millis(50);

// ---- traffic helpers -----------------------------------------------------------

/// Polls `cond` every 20 ms until it holds; panics with `what` after
/// `timeout`.
#[track_caller]
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP echo server in a namespace: answers every line with the same line,
/// on any number of connections, until dropped.
struct EchoServer {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `port` in `ns`; ready when this returns.
    fn start(ns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop2, peers2) = (stop.clone(), peers.clone());
        let handle = ns.spawn_thread(move || {
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            let mut workers = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        peers2.lock().expect("peers").push(peer);
                        let stop = stop2.clone();
                        workers.push(std::thread::spawn(move || echo(conn, &stop)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        ready_rx.recv_timeout(IO_TIMEOUT).expect("server ready");
        Self {
            stop,
            peers,
            handle: Some(handle),
        }
    }

    /// The peers of every connection accepted so far.
    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

/// Echoes lines on `conn` until EOF, an error, or `stop`.
fn echo(conn: TcpStream, stop: &AtomicBool) {
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if w.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A long-lived TCP connection exchanging a numbered line with an echo
/// server every [`RR_INTERVAL`], until stopped or the first failure.
struct RrFlow {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: JoinHandle<Result<u64, String>>,
}

impl RrFlow {
    /// Connects from `ns` to `addr` and starts exchanging.
    fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (stop2, done2) = (stop.clone(), done.clone());
        let handle = ns.spawn_thread(move || {
            let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            let mut r = BufReader::new(s);
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                writeln!(w, "exchange {n}").map_err(|e| format!("exchange {n}: send: {e}"))?;
                let mut answer = String::new();
                r.read_line(&mut answer)
                    .map_err(|e| format!("exchange {n}: receive: {e}"))?;
                if answer != format!("exchange {n}\n") {
                    return Err(format!("exchange {n}: answer {answer:?}"));
                }
                done2.store(n, Ordering::Relaxed);
                std::thread::sleep(RR_INTERVAL);
            }
            Ok(n)
        });
        Self { stop, done, handle }
    }

    /// Exchanges completed so far.
    fn exchanges(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more exchanges than now have completed.
    #[track_caller]
    fn wait_more(&self, what: &str, n: u64) {
        let target = self.exchanges() + n;
        let deadline = Instant::now() + IO_TIMEOUT * 2;
        while self.exchanges() < target {
            if self.handle.is_finished() {
                panic!(
                    "{what}: the flow ended after {} exchanges",
                    self.exchanges()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {target} exchanges",
                self.exchanges()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops exchanging; the number of exchanges, or the first failure.
    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .unwrap_or_else(|_| Err("the flow's thread panicked".into()))
    }
}

/// How long a connection expected to fail is given: long enough for a
/// SYN to be answered on a loaded machine, short enough not to drag on.
const FAIL_TIMEOUT: Duration = Duration::from_millis(1500);

/// One short connection from `ns` to `addr`: sends a line, returns the
/// echo.
fn exchange_once(ns: &Netns, addr: SocketAddr, line: &str) -> Result<String, String> {
    exchange_within(ns, addr, line, IO_TIMEOUT)
}

/// Whether a connection from `ns` to `addr` fails (refused, or no answer
/// within [`FAIL_TIMEOUT`]); the error if so.
fn exchange_fails(ns: &Netns, addr: SocketAddr) -> Result<String, String> {
    match exchange_within(ns, addr, "unexpected", FAIL_TIMEOUT) {
        Ok(answer) => Err(format!("{addr} answered {answer:?}")),
        Err(e) => Ok(e),
    }
}

fn exchange_within(
    ns: &Netns,
    addr: SocketAddr,
    line: &str,
    connect_timeout: Duration,
) -> Result<String, String> {
    let line = line.to_owned();
    ns.exec_closure(move || {
        let s = TcpStream::connect_timeout(&addr, connect_timeout)
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        writeln!(w, "{line}").map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        Ok(answer.trim_end().to_owned())
    })
}

/// Every frame arriving on an interface of a namespace, captured with an
/// `AF_PACKET` socket until [`Capture::finish`].
struct Capture {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns`; ready when this returns.
    fn start(ns: &Netns, ifname: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let ifname = ifname.to_owned();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = ns.spawn_thread(move || {
            let sock = PacketSocket::open(&ifname, true);
            ready_tx.send(()).expect("ready");
            let mut frames = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                if let Some(f) = sock.recv() {
                    frames.push(f);
                }
            }
            frames
        });
        ready_rx.recv_timeout(IO_TIMEOUT).expect("capture ready");
        Self { stop, handle }
    }

    /// Stops capturing; every frame seen.
    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("capture thread")
    }
}

/// An `AF_PACKET` raw socket bound to one interface of the calling thread's
/// namespace.
struct PacketSocket {
    fd: libc::c_int,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens it; `receive` binds it to every protocol (else it only sends).
    fn open(ifname: &str, receive: bool) -> Self {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .unwrap_or_else(|e| panic!("no interface {ifname}: {e}"));
        let ifindex = i32::try_from(ifindex).expect("ifindex fits i32");
        let proto = if receive {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let sock = Self { fd, ifindex };
        if receive {
            let addr = sock.addr(proto);
            // SAFETY: `addr` is a valid sockaddr_ll of the size given.
            let r = unsafe {
                libc::bind(
                    fd,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: `tv` is a valid timeval of the size given.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        }
        sock
    }

    fn addr(&self, proto: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr
    }

    /// Sends one whole Ethernet frame out of the interface.
    fn send(&self, frame: &[u8]) {
        let addr = self.addr(0);
        // SAFETY: `frame` and `addr` are valid for the sizes given.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// One frame, or `None` after the receive timeout.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// Sends `frames` out of `ifname` in `ns` with an `AF_PACKET` socket.
fn send_frames(ns: &Netns, ifname: &str, frames: &[Vec<u8>]) {
    ns.exec_closure(|| {
        let sock = PacketSocket::open(ifname, false);
        for f in frames {
            sock.send(f);
        }
    });
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The IPv4 source address of an untagged Ethernet frame, if it has one.
fn ipv4_source(frame: &[u8]) -> Option<Ipv4Addr> {
    (frame.len() >= 34 && frame[12..14] == [0x08, 0x00])
        .then(|| Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]))
}

// ---- agent and node helpers --------------------------------------------------------

/// One container as `container list --json` shows it.
#[derive(Clone, Debug)]
struct ContainerView {
    name: String,
    id: u32,
    addr: Ipv4Addr,
    host_ifname: String,
}

fn containers(agent: &Agent) -> Vec<ContainerView> {
    let list = agent.cli_json(["container", "list", "--json"]);
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|c| ContainerView {
            name: c["name"].as_str().expect("name").to_owned(),
            id: c["id"].as_u64().expect("id") as u32,
            addr: c["addr"].as_str().expect("addr").parse().expect("address"),
            host_ifname: c["host_ifname"].as_str().expect("veth").to_owned(),
        })
        .collect()
}

fn container(agent: &Agent, name: &str) -> ContainerView {
    containers(agent)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A counter of `datapath status --json`.
fn counter(agent: &Agent, name: &str) -> u64 {
    let st = agent.cli_json(["status", "--json"]);
    st["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {st:#}"))
}

/// The names of the links of `ns`.
fn links(ns: &Netns) -> BTreeSet<String> {
    let out = ns.exec_ok("ip", ["-j", "link", "show"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    v.as_array()
        .expect("a list of links")
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

/// The agent-made veths (`dp<hex>`) of the node.
fn dp_veths(node: &Node) -> BTreeSet<String> {
    links(&node.node)
        .into_iter()
        .filter(|n| {
            n.strip_prefix("dp")
                .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect()
}

/// The IPv4 addresses of `ifname` in `ns`.
fn addrs(ns: &Netns, ifname: &str) -> Vec<Ipv4Addr> {
    let out = ns.exec("ip", ["-j", "-4", "addr", "show", "dev", ifname]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect()
}

/// A pinned hash map of the agent's, read from its pin.
fn pinned<K: aya::Pod, V: aya::Pod>(agent: &Agent, name: &str) -> BpfHashMap<MapData, K, V> {
    let path = agent.bpffs_dir().join("maps").join(name);
    let data =
        MapData::from_pin(&path).unwrap_or_else(|e| panic!("open pin {}: {e}", path.display()));
    BpfHashMap::try_from(Map::HashMap(data)).unwrap_or_else(|e| panic!("map {name}: {e}"))
}

fn services(agent: &Agent) -> Vec<(ServiceKey, ServiceValue)> {
    pinned::<ServiceKey, ServiceValue>(agent, names::SERVICES)
        .iter()
        .map(|r| r.expect("read SERVICES"))
        .collect()
}

fn endpoints(agent: &Agent) -> Vec<(EndpointKey, Endpoint)> {
    pinned::<EndpointKey, Endpoint>(agent, names::ENDPOINTS)
        .iter()
        .map(|r| r.expect("read ENDPOINTS"))
        .collect()
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

/// Routes the container pool of `agent` through the node from the client,
/// as a router upstream of a node could.
fn route_pool_via_node(node: &Node, agent: &Agent) {
    node.client.exec_ok(
        "ip",
        [
            "route",
            "add",
            agent.pool(),
            "via",
            &node.node_addr().to_string(),
        ],
    );
}

// ---- restarts ----------------------------------------------------------------------

#[test]
fn established_flows_through_a_published_port_and_the_masquerade_survive_a_killed_agent() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let _inside = EchoServer::start(&ctr, 80);
    let _outside = EchoServer::start(&node.client, 9000);
    let inbound = RrFlow::start(&node.client, SocketAddr::from((node.node_addr(), 8080)));
    let outbound = RrFlow::start(&ctr, SocketAddr::from((node.client_addr(), 9000)));
    inbound.wait_more("inbound before the kill", 5);
    outbound.wait_more("outbound before the kill", 5);

    agent.kill();
    // While no agent runs, both flows keep exchanging: the pinned links
    // keep the programs attached and the pinned maps keep the flows.
    inbound.wait_more("inbound while the agent is down", 10);
    outbound.wait_more("outbound while the agent is down", 10);

    agent.restart();
    inbound.wait_more("inbound after the restart", 10);
    outbound.wait_more("outbound after the restart", 10);
    let flows = agent.cli_json(["conntrack", "list", "--json"]);
    let kinds: Vec<&str> = flows
        .as_array()
        .expect("a list of flows")
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"dnat") && kinds.contains(&"snat"),
        "the restarted agent sees the flows: {flows:#}"
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
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let inside = EchoServer::start(&ctr, 80);
    let _outside = EchoServer::start(&node.client, 9000);
    let published = SocketAddr::from((node.node_addr(), 8080));
    let outside = SocketAddr::from((node.client_addr(), 9000));
    assert_eq!(
        exchange_once(&node.client, published, "up"),
        Ok("up".into())
    );

    agent.kill();
    assert!(agent.pid().is_none(), "no agent runs");
    for i in 0..5 {
        let line = format!("down {i}");
        assert_eq!(
            exchange_once(&node.client, published, &line),
            Ok(line.clone()),
            "a new connection to the published port while the agent is down"
        );
        assert_eq!(
            exchange_once(&ctr, outside, &line),
            Ok(line.clone()),
            "a new masqueraded connection while the agent is down"
        );
    }
    assert!(
        inside
            .peers()
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(node.client_addr())),
        "translated, not routed: {:?}",
        inside.peers()
    );

    agent.restart();
    assert_eq!(
        exchange_once(&node.client, published, "again"),
        Ok("again".into())
    );
    assert_eq!(exchange_once(&ctr, outside, "again"), Ok("again".into()));
    let st = agent.cli_json(["status", "--json"]);
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
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let web = container(&agent, "web");
    agent.kill();
    node.node.exec_ok(
        "ip",
        [
            "link", "add", "dpabc", "type", "veth", "peer", "name", "orph0",
        ],
    );
    node.node.exec_ok(
        "ip",
        [
            "link", "add", "keep0", "type", "veth", "peer", "name", "keep1",
        ],
    );
    agent.restart();
    let after = links(&node.node);
    assert!(
        !after.contains("dpabc") && !after.contains("orph0"),
        "the orphan is gone: {after:?}"
    );
    assert!(
        after.contains("keep0") && after.contains("keep1"),
        "a veth the agent did not make is kept: {after:?}"
    );
    assert_eq!(
        dp_veths(&node),
        BTreeSet::from([web.host_ifname.clone()]),
        "the container's own veth is kept"
    );
    let _server = EchoServer::start(&ctr, 80);
    assert_eq!(
        exchange_once(
            &node.client,
            SocketAddr::from((node.node_addr(), 8080)),
            "kept"
        ),
        Ok("kept".into())
    );
}

/// Rewrites the agent's state file through `edit` on its JSON.
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
    let web_ns = node.add_container_netns("web");
    let db_ns = node.add_container_netns("db");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        web_ns.name(),
        "-p",
        "8080:80",
    ]);
    agent.cli_ok([
        "container",
        "add",
        "db",
        "--netns",
        db_ns.name(),
        "-p",
        "5432:5432",
    ]);
    let (web, db) = (container(&agent, "web"), container(&agent, "db"));
    agent.kill();
    edit_state(&agent, |v| {
        v["containers"]
            .as_object_mut()
            .expect("containers by name")
            .remove("web")
            .expect("web was saved");
    });
    agent.restart();

    let names: Vec<String> = containers(&agent).into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["db"]);
    assert_eq!(dp_veths(&node), BTreeSet::from([db.host_ifname.clone()]));
    assert!(
        !links(&web_ns).contains("eth0"),
        "the container end went with the veth"
    );
    let svc = services(&agent);
    assert!(
        svc.iter().all(|(_, v)| v.container_id == db.id) && svc.len() == 1,
        "only db's published port is left: {svc:?}"
    );
    let eps = endpoints(&agent);
    assert_eq!(
        eps.iter()
            .map(|(k, _)| Ipv4Addr::from(k.addr))
            .collect::<Vec<_>>(),
        [db.addr],
        "only db's endpoint is left"
    );
    let link_pins: Vec<String> = std::fs::read_dir(agent.bpffs_dir().join("links"))
        .expect("links dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !link_pins.iter().any(|p| p.ends_with(&web.host_ifname)),
        "web's link pin is gone: {link_pins:?}"
    );
    exchange_fails(&node.client, SocketAddr::from((node.node_addr(), 8080)))
        .expect("web's port is no longer published");
}

#[test]
fn an_orphaned_published_port_in_the_map_is_removed_on_the_next_start() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let web = container(&agent, "web");
    let _server = EchoServer::start(&ctr, 80);
    agent.kill();
    // A port published to web by no container the agent knows: as if an
    // agent had crashed between the map update and the state write.
    let key = ServiceKey {
        addr: [0; 4],
        port: 9090,
        proto: proto::TCP,
        _pad: 0,
    };
    let value = ServiceValue {
        backend_addr: web.addr.octets(),
        backend_port: 80,
        _pad: 0,
        ifindex: node::ifindex(&node.node, &web.host_ifname),
        container_id: 0xdead,
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
    let pin = agent.bpffs_dir().join("maps").join(names::SERVICES);
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
    let orphan = SocketAddr::from((node.node_addr(), 9090));
    assert_eq!(
        exchange_once(&node.client, orphan, "orphan"),
        Ok("orphan".into()),
        "the hand-made entry is live while no agent runs"
    );
    agent.restart();
    let svc = services(&agent);
    assert!(
        !svc.iter().any(|(k, _)| k.port == 9090),
        "the orphan entry is gone: {svc:?}"
    );
    assert!(
        svc.iter()
            .any(|(k, v)| k.port == 8080 && v.container_id == web.id),
        "web's own entry is kept: {svc:?}"
    );
    exchange_fails(&node.client, orphan).expect("the orphaned port is no longer published");
}

#[test]
fn a_container_whose_veth_was_deleted_is_recreated_on_the_next_start() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let web = container(&agent, "web");
    agent.kill();
    node.node
        .exec_ok("ip", ["link", "del", web.host_ifname.as_str()]);
    assert!(!links(&ctr).contains("eth0"));
    agent.restart();

    let again = container(&agent, "web");
    assert_eq!(
        (again.id, again.addr),
        (web.id, web.addr),
        "the same container"
    );
    assert!(dp_veths(&node).contains(&web.host_ifname));
    assert_eq!(addrs(&ctr, "eth0"), [web.addr], "its address is back");
    let _server = EchoServer::start(&ctr, 80);
    let published = SocketAddr::from((node.node_addr(), 8080));
    assert_eq!(
        exchange_once(&node.client, published, "back"),
        Ok("back".into())
    );
    let _outside = EchoServer::start(&node.client, 9000);
    assert_eq!(
        exchange_once(&ctr, SocketAddr::from((node.client_addr(), 9000)), "out"),
        Ok("out".into()),
        "its egress is masqueraded again"
    );
}

#[test]
fn a_container_whose_netns_is_gone_is_removed_on_the_next_start() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    agent.kill();
    drop(ctr);
    agent.restart();
    assert!(containers(&agent).is_empty());
    assert!(dp_veths(&node).is_empty());
    assert!(services(&agent).is_empty());
    assert!(endpoints(&agent).is_empty());
}

#[test]
fn a_corrupt_state_file_stops_the_agent_with_a_message_naming_it() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "web", "--netns", ctr.name()]);
    agent.kill();
    let path = agent.state_dir().join("state.json");
    let whole = std::fs::read(&path).expect("state file");
    for (what, bytes) in [
        ("truncated", whole[..whole.len() / 2].to_vec()),
        ("not JSON", b"\x00\x01garbage".to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&path, &bytes).expect("corrupt the state");
        let err = agent
            .try_restart()
            .expect_err("the agent refuses a corrupt state file");
        assert!(
            err.contains(&path.display().to_string()) && err.contains("corrupt"),
            "{what}: the message names the file: {err}"
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
    // Put back, the agent starts and has its container.
    std::fs::write(&path, &whole).expect("restore the state");
    agent.restart();
    assert_eq!(container(&agent, "web").name, "web");
}

#[test]
fn a_state_file_with_impossible_values_stops_the_agent_with_a_message_naming_it() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    agent.kill();
    let path = agent.state_dir().join("state.json");
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
        std::fs::write(&path, &whole).expect("restore the state");
        edit_state(&agent, edit);
        let edited = std::fs::read(&path).expect("state file");
        let err = agent
            .try_restart()
            .expect_err("the agent refuses impossible state");
        assert!(
            err.contains(&path.display().to_string()),
            "{what}: the message names the file: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(
            std::fs::read(&path).expect("still there"),
            edited,
            "{what}: left for the operator"
        );
    }
    std::fs::write(&path, &whole).expect("restore the state");
    agent.restart();
    assert_eq!(container(&agent, "web").name, "web");
}

#[test]
fn a_crash_during_container_add_leaves_the_whole_container_or_nothing() {
    let node = Node::new();
    let mut agent = Agent::start(&node);
    let mut namespaces = Vec::new();
    let mut outcomes = Vec::new();
    for (i, delay_ms) in [0u64, 2, 5, 10, 20, 40].into_iter().enumerate() {
        let ns = node.add_container_netns(&format!("c{i}"));
        let name = format!("c{i}");
        let port = (8100 + i).to_string();
        let socket = agent.socket().to_owned();
        std::thread::scope(|s| {
            let adding = s.spawn(|| {
                let mut cmd = Command::new(datapath_bin());
                cmd.arg("--api-socket")
                    .arg(&socket)
                    .args(["container", "add", &name, "--netns", ns.name(), "-p"])
                    .arg(format!("{port}:80"));
                node.node.run(&mut cmd)
            });
            std::thread::sleep(Duration::from_millis(delay_ms));
            agent.kill();
            let _ = adding.join();
        });
        agent.restart();

        let all = containers(&agent);
        let listed = all.iter().find(|c| c.name == name).cloned();
        let svc = services(&agent);
        let eps = endpoints(&agent);
        let ids: BTreeSet<u32> = all.iter().map(|c| c.id).collect();
        assert_eq!(
            dp_veths(&node),
            all.iter().map(|c| c.host_ifname.clone()).collect(),
            "{name}: the veths are those of the listed containers"
        );
        assert!(
            svc.iter().all(|(_, v)| ids.contains(&v.container_id))
                && eps.iter().all(|(_, v)| ids.contains(&v.container_id)),
            "{name}: map entries belong to listed containers"
        );
        match listed {
            Some(c) => {
                outcomes.push("whole");
                assert!(
                    svc.iter()
                        .any(|(k, v)| k.port == 8100 + i as u16 && v.container_id == c.id),
                    "{name}: listed, so its port is published"
                );
                assert!(eps.iter().any(|(k, _)| k.addr == c.addr.octets()));
                assert_eq!(addrs(&ns, "eth0"), [c.addr], "{name}: its interface");
            }
            None => {
                outcomes.push("nothing");
                assert!(
                    !links(&ns).contains("eth0"),
                    "{name}: not listed, so no interface is left in its namespace"
                );
                assert!(!svc.iter().any(|(k, _)| k.port == 8100 + i as u16));
            }
        }
        namespaces.push(ns);
    }
    eprintln!("outcomes by delay: {outcomes:?}");
}

#[test]
fn cleanup_removes_every_program_pin_veth_and_state_and_nothing_else() {
    let node = Node::new();
    let web_ns = node.add_container_netns("web");
    let app_ns = node.add_container_netns("app");
    let mut agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        web_ns.name(),
        "-p",
        "8080:80",
    ]);
    agent.cli_ok(["container", "add", "app", "--netns", app_ns.name()]);
    let st = agent.cli_json(["status", "--json"]);
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
    let state = agent.state_dir().join("state.json");
    assert!(state.exists());

    let out = agent.cleanup();
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !agent.bpffs_dir().exists(),
        "the pins are gone: {}",
        agent.bpffs_dir().display()
    );
    assert!(!state.exists(), "the state is gone");
    assert!(dp_veths(&node).is_empty(), "the veths are gone");
    assert!(!links(&web_ns).contains("eth0") && !links(&app_ns).contains("eth0"));
    // Nothing holds the programs any more: the kernel frees them.
    wait_for("every program freed", Duration::from_secs(5), || {
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
    assert_eq!(addrs(&node.node, UPLINK), [node.node_addr()]);
    assert!(Netns::exists(web_ns.name()) && Netns::exists(app_ns.name()));
    assert!(node.client.ping(node.node_addr()), "the node still answers");
    // A second cleanup finds nothing to do and succeeds.
    let again = agent.cleanup();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

// ---- where no one belongs -------------------------------------------------------------

/// Datagrams received, with their senders.
type Datagrams = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// Receives UDP datagrams on `port` in `ns` until finished.
struct UdpSink {
    stop: Arc<AtomicBool>,
    got: Datagrams,
    handle: JoinHandle<()>,
}

impl UdpSink {
    fn start(ns: &Netns, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let got: Datagrams = Arc::default();
        let (stop2, got2) = (stop.clone(), got.clone());
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = ns.spawn_thread(move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    got2.lock()
                        .expect("datagrams")
                        .push((from, buf[..n].to_vec()));
                }
            }
        });
        ready_rx.recv_timeout(IO_TIMEOUT).expect("sink ready");
        Self { stop, got, handle }
    }

    /// Waits until a datagram carrying exactly `payload` has arrived.
    #[track_caller]
    fn wait_for(&self, payload: &[u8]) {
        self.wait_for_n(payload, 1);
    }

    /// Waits until `n` datagrams carrying exactly `payload` have arrived.
    #[track_caller]
    fn wait_for_n(&self, payload: &[u8], n: usize) {
        let what = format!("{n} datagrams {:?}", String::from_utf8_lossy(payload));
        wait_for(&what, IO_TIMEOUT, || {
            self.got
                .lock()
                .expect("datagrams")
                .iter()
                .filter(|(_, p)| p == payload)
                .count()
                >= n
        });
    }

    /// Waits `settle`, stops, returns every datagram.
    fn finish(self, settle: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
        std::thread::sleep(settle);
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sink thread");
        std::mem::take(&mut *self.got.lock().expect("datagrams"))
    }
}

/// Sends `payload` from `from` (an address of `ns`) to `to`.
fn send_udp(ns: &Netns, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
    let payload = payload.to_vec();
    ns.exec_closure(move || {
        let s = UdpSocket::bind(from).unwrap_or_else(|e| panic!("bind {from}: {e}"));
        s.send_to(&payload, to)
            .unwrap_or_else(|e| panic!("send to {to}: {e}"));
    });
}

#[test]
fn a_container_cannot_send_from_an_address_not_its_own() {
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "app", "--netns", ctr.name()]);
    let app = container(&agent, "app");
    // Were the spoofed packets forwarded, the client could receive them and
    // answer: it routes the pool through the node.
    route_pool_via_node(&node, &agent);
    let pool_other = Ipv4Addr::from(u32::from(app.addr) + 100);
    let uplink_neighbour = Ipv4Addr::new(198, 18, 0, 77);
    for spoof in [pool_other, uplink_neighbour] {
        ctr.exec_ok("ip", ["addr", "add", &format!("{spoof}/32"), "dev", "eth0"]);
    }
    let before = counter(&agent, "drop_spoofed");
    let capture = Capture::start(&node.client, node::CLIENT_IF);
    let sink = UdpSink::start(&node.client, 9001);
    let to = SocketAddr::from((node.client_addr(), 9001));
    for _ in 0..5 {
        for spoof in [pool_other, uplink_neighbour] {
            send_udp(&ctr, SocketAddr::from((spoof, 0)), to, b"spoofed");
        }
        send_udp(&ctr, SocketAddr::from((app.addr, 0)), to, b"genuine");
    }
    // Each spoofed datagram went before a genuine one on the same path.
    sink.wait_for_n(b"genuine", 5);
    let got = sink.finish(Duration::from_millis(200));
    let frames = capture.finish();
    let genuine: Vec<_> = got.iter().filter(|(_, p)| p == b"genuine").collect();
    assert_eq!(genuine.len(), 5, "the container's own datagrams arrive");
    assert!(
        genuine
            .iter()
            .all(|(from, _)| from.ip() == std::net::IpAddr::V4(node.node_addr())),
        "masqueraded: {genuine:?}"
    );
    assert!(
        !frames.iter().any(|f| contains(f, b"spoofed")),
        "no spoofed datagram reaches the client's wire"
    );
    let spoofed_sources: Vec<Ipv4Addr> = frames
        .iter()
        .filter_map(|f| ipv4_source(f))
        .filter(|s| *s == pool_other || *s == uplink_neighbour)
        .collect();
    assert!(spoofed_sources.is_empty(), "{spoofed_sources:?}");
    let dropped = counter(&agent, "drop_spoofed") - before;
    assert!(dropped >= 10, "{dropped} spoofed packets counted");
}

#[test]
fn a_container_cannot_send_from_a_mac_not_its_own() {
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "app", "--netns", ctr.name()]);
    let app = container(&agent, "app");
    let own_mac = node::mac(&ctr, "eth0");
    let gateway_mac = node::mac(&node.node, &app.host_ifname);
    let other_mac = [0x02, 0x66, 0x66, 0x66, 0x66, 0x66];
    let frame = |mac: [u8; 6], marker: &[u8]| {
        Frame::udp(
            SocketAddr::from((app.addr, 5000)),
            SocketAddr::from((node.client_addr(), 9001)),
        )
        .macs(mac, gateway_mac)
        .payload(marker.to_vec())
        .build()
    };
    let before = counter(&agent, "drop_spoofed");
    let sink = UdpSink::start(&node.client, 9001);
    let capture = Capture::start(&node.client, node::CLIENT_IF);
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(frame(other_mac, b"wrong-mac"));
        frames.push(frame(own_mac, b"right-mac"));
    }
    send_frames(&ctr, "eth0", &frames);
    sink.wait_for_n(b"right-mac", 5);
    let got = sink.finish(Duration::from_millis(200));
    let wire = capture.finish();
    assert_eq!(
        got.iter().filter(|(_, p)| p == b"right-mac").count(),
        5,
        "frames from the container's own MAC go through"
    );
    assert!(
        !wire.iter().any(|f| contains(f, b"wrong-mac")),
        "no frame from another MAC reaches the client's wire"
    );
    let dropped = counter(&agent, "drop_spoofed") - before;
    assert!(dropped >= 5, "{dropped} spoofed frames counted");
}

#[test]
fn a_container_cannot_spoof_with_other_ip_protocols_or_fragments() {
    let node = Node::new();
    let ctr = node.add_container_netns("app");
    let agent = Agent::start(&node);
    agent.cli_ok(["container", "add", "app", "--netns", ctr.name()]);
    let app = container(&agent, "app");
    route_pool_via_node(&node, &agent);
    let own_mac = node::mac(&ctr, "eth0");
    let gateway_mac = node::mac(&node.node, &app.host_ifname);
    let spoof = Ipv4Addr::new(198, 18, 0, 77);
    let base = |marker: &[u8]| {
        Frame::udp(
            SocketAddr::from((spoof, 5000)),
            SocketAddr::from((node.client_addr(), 9001)),
        )
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
        SocketAddr::from((app.addr, 5000)),
        SocketAddr::from((node.client_addr(), 9001)),
    )
    .macs(own_mac, gateway_mac)
    .payload(&b"genuine"[..])
    .build();
    let before = counter(&agent, "drop_spoofed");
    let sink = UdpSink::start(&node.client, 9001);
    let capture = Capture::start(&node.client, node::CLIENT_IF);
    send_frames(&ctr, "eth0", &frames);
    send_frames(&ctr, "eth0", &[genuine]);
    sink.wait_for(b"genuine");
    sink.finish(Duration::from_millis(200));
    let wire = capture.finish();
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
    let dropped = counter(&agent, "drop_spoofed") - before;
    assert!(dropped >= frames.len() as u64, "{dropped} counted");
}

#[test]
fn uplink_traffic_straight_to_a_container_address_is_dropped_and_counted() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let web = container(&agent, "web");
    let server = EchoServer::start(&ctr, 80);
    route_pool_via_node(&node, &agent);
    let before = counter(&agent, "drop_direct_routing");
    exchange_fails(&node.client, SocketAddr::from((web.addr, 80)))
        .expect("the container is not reachable directly");
    assert!(!node.client.ping(web.addr), "ping reached the container");
    assert!(server.peers().is_empty(), "{:?}", server.peers());
    // At least the connection attempt's SYN; how many retransmissions and
    // pings went out within the bounds depends on the machine's load.
    let dropped = counter(&agent, "drop_direct_routing") - before;
    assert!(dropped >= 1, "{dropped} counted");
    // The published port still works.
    assert_eq!(
        exchange_once(
            &node.client,
            SocketAddr::from((node.node_addr(), 8080)),
            "published"
        ),
        Ok("published".into())
    );
}

#[test]
fn uplink_traffic_reaches_a_container_address_when_direct_routing_is_allowed() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::builder(&node)
        .args(["--allow-direct-routing"])
        .start();
    agent.cli_ok(["container", "add", "web", "--netns", ctr.name()]);
    let web = container(&agent, "web");
    let server = EchoServer::start(&ctr, 80);
    route_pool_via_node(&node, &agent);
    assert_eq!(
        exchange_once(&node.client, SocketAddr::from((web.addr, 80)), "direct"),
        Ok("direct".into()),
        "counters: {}",
        agent.cli_json(["status", "--json"])["counters"]
    );
    assert_eq!(
        server.peers()[0].ip(),
        std::net::IpAddr::V4(node.client_addr()),
        "routed, not translated"
    );
    assert!(node.client.ping(web.addr));
    assert_eq!(counter(&agent, "drop_direct_routing"), 0);
}

#[test]
fn a_syn_flood_leaves_an_established_flow_working_and_memory_bounded() {
    let _lock = TrafficLock::acquire();
    const CT_MAX: u64 = 4096;
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::builder(&node)
        .args([
            "--ct-max",
            &CT_MAX.to_string(),
            "--ct-timeout-tcp-syn",
            "3s",
        ])
        .start();
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let _server = EchoServer::start(&ctr, 80);
    let published = SocketAddr::from((node.node_addr(), 8080));
    let flow = RrFlow::start(&node.client, published);
    flow.wait_more("before the flood", 5);
    let pid = agent.pid().expect("running");
    let rss_before = rss_kib(pid);

    let flood = node.client.run(Command::new("timeout").args([
        "20",
        "hping3",
        "-q",
        "-S",
        "-p",
        "8080",
        "--rand-source",
        "-c",
        "20000",
        "--faster",
        &node.node_addr().to_string(),
    ]));
    assert!(
        flood.status.code() != Some(124),
        "hping3 did not finish: {}",
        String::from_utf8_lossy(&flood.stderr)
    );
    flow.wait_more("right after the flood", 10);

    let st = agent.cli_json(["status", "--json"]);
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
    exchange_once(&node.client, published, "new").expect("a new connection right after");
    flow.wait_more("after the flood", 5);
    flow.finish()
        .expect("the established flow survived the flood");
}

/// The states of the agent's tracked flows, counted.
fn flow_states(agent: &Agent) -> std::collections::BTreeMap<String, usize> {
    let flows = agent.cli_json(["conntrack", "list", "--json"]);
    let mut states = std::collections::BTreeMap::new();
    for f in flows.as_array().expect("a list of flows") {
        let state = f["state"].as_str().unwrap_or("?").to_owned();
        *states.entry(state).or_insert(0) += 1;
    }
    states
}

#[test]
fn the_half_open_flows_of_a_spoofed_syn_flood_expire_like_unanswered_ones() {
    // A spoofed SYN is answered by the container, but its source never
    // completes the handshake: its flow must expire on the short SYN
    // timeout, not live on as an established one and keep the table full.
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::builder(&node)
        .args(["--ct-timeout-tcp-syn", "2s"])
        .start();
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        ctr.name(),
        "-p",
        "8080:80",
    ]);
    let _server = EchoServer::start(&ctr, 80);
    let published = SocketAddr::from((node.node_addr(), 8080));
    let flow = RrFlow::start(&node.client, published);
    flow.wait_more("before the flood", 3);
    let flood = node.client.run(Command::new("timeout").args([
        "20",
        "hping3",
        "-q",
        "-S",
        "-p",
        "8080",
        "--rand-source",
        "-c",
        "2000",
        "--faster",
        &node.node_addr().to_string(),
    ]));
    assert!(flood.status.code() != Some(124), "hping3 did not finish");
    let after_flood = flow_states(&agent);
    assert!(
        after_flood.values().sum::<usize>() > 100,
        "the flood made flows: {after_flood:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let states = flow_states(&agent);
        // The request/response flow's own entry is all that may stay.
        if states.values().sum::<usize>() <= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "half-open flows outlive the SYN timeout: {states:?} (right after the flood: \
             {after_flood:?})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    flow.finish()
        .expect("the established flow survived the flood");
}

#[test]
fn fragmented_udp_to_a_published_port_arrives_whole() {
    let node = Node::new();
    let ctr = node.add_container_netns("dns");
    let agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "dns",
        "--netns",
        ctr.name(),
        "-p",
        "5353:53/udp",
    ]);
    let sink = UdpSink::start(&ctr, 53);
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let to = SocketAddr::from((node.node_addr(), 5353));
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
    sink.wait_for(b"small again");
    sink.wait_for(&big);
    let got = sink.finish(Duration::from_millis(200));
    assert_eq!(got.len(), 3, "each datagram arrives once, whole");
    assert!(counter(&agent, "fragment_translated") >= 1);
    assert_eq!(counter(&agent, "drop_fragment"), 0);
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
        containers(&agent).is_empty(),
        "no bad request created anything"
    );
    assert!(dp_veths(&node).is_empty());
}

#[test]
fn an_oversized_request_body_gets_413() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    let padding = " ".repeat(70 * 1024);
    let body = format!(r#"{{"name": "web",{padding} "netns": "{}"}}"#, ctr.name());
    let (status, answer) = http(&agent, "POST", "/v1/containers", body.as_bytes());
    assert_eq!(status, 413, "{answer}");
    error_message(&answer);
    assert!(containers(&agent).is_empty());
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
    let outputs: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    agent.cli([
                        "container",
                        "add",
                        "web",
                        "--netns",
                        ctr.name(),
                        "-p",
                        "8080:80",
                    ])
                })
            })
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
    let all = containers(&agent);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(
        dp_veths(&node),
        BTreeSet::from([all[0].host_ifname.clone()])
    );
    assert_eq!(addrs(&ctr, "eth0"), [all[0].addr]);
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
