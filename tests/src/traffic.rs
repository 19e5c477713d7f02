//! Servers and clients for real traffic in namespace tests and the sandbox.
//!
//! [`Server`] runs a tiny HTTP server, a TCP or line echo server, or a UDP
//! echo server or sink on a thread in a namespace, records the peer of
//! every request it answered (and every datagram it got), and stops
//! (joining its thread) on drop. The clients ([`http_get`],
//! [`udp_request`], [`line_exchange`], …) run in a namespace and bound
//! every wait; none retries behind the caller's back. [`RrFlow`] keeps one
//! connection exchanging lines in the background.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use datapath_tests::{node::Node, traffic::{Server, http_get}};
//!
//! let node = Node::new();
//! let web = Server::http(&node.node, 8080, "web");
//! let body = http_get(&node.client, SocketAddr::from((node.node_addr(), 8080)), "/").unwrap();
//! assert!(body.starts_with("web"));
//! assert_eq!(*web.peers()[0].ip(), node.client_addr());
//! ```

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long a client waits for a connection, a reply or a read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a server checks whether it should stop.
const POLL: Duration = Duration::from_millis(10);
/// Largest HTTP request a server reads.
const MAX_REQUEST: usize = 8 * 1024;

/// A server thread in a namespace; stopped and joined on drop.
#[derive(Debug)]
pub struct Server {
    name: String,
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddrV4>>>,
    datagrams: Arc<Mutex<Vec<Datagram>>>,
    handle: Option<JoinHandle<()>>,
}

/// A datagram a UDP server received: its sender and payload.
pub type Datagram = (SocketAddrV4, Vec<u8>);

impl Server {
    /// An HTTP/1.0 server on `0.0.0.0:port` in `ns`. Every request gets
    /// `200 OK` with the body `"<name> port <port>: hello <peer>\n"`, where
    /// `<peer>` is the address the server saw. Returns once it listens.
    pub fn http(ns: &Netns, port: u16, name: &str) -> Self {
        Self::start(ns, port, name, Kind::Http)
    }

    /// A UDP echo server on `0.0.0.0:port` in `ns`: every datagram is
    /// answered with `"<name> port <port>: "` followed by the datagram.
    pub fn udp_echo(ns: &Netns, port: u16, name: &str) -> Self {
        Self::start(ns, port, name, Kind::UdpEcho)
    }

    /// A TCP echo server on `0.0.0.0:port` in `ns`: every connection gets
    /// back what it sends until it closes; connections are served at once,
    /// each on its own thread.
    pub fn tcp_echo(ns: &Netns, port: u16, name: &str) -> Self {
        Self::start(ns, port, name, Kind::TcpEcho)
    }

    /// A TCP line server on `0.0.0.0:port` in `ns`: every line `L` is
    /// answered with the line `"<name>: L"`, on any number of connections at
    /// once (see [`line_exchange`] and [`RrFlow`]). After answering the
    /// line `bye` it closes the connection itself, so that the server's
    /// end, not the client's, waits out TIME_WAIT (a client may reuse its
    /// port at once).
    pub fn line_echo(ns: &Netns, port: u16, name: &str) -> Self {
        Self::start(ns, port, name, Kind::LineEcho)
    }

    /// A UDP sink on `0.0.0.0:port` in `ns`: datagrams are recorded, never
    /// answered.
    pub fn udp_sink(ns: &Netns, port: u16, name: &str) -> Self {
        Self::start(ns, port, name, Kind::UdpSink)
    }

    fn start(ns: &Netns, port: u16, name: &str, kind: Kind) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let datagrams = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let label = format!("{name} port {port}");
        let tag = name.to_owned();
        let handle = {
            let (stop, peers, datagrams) = (stop.clone(), peers.clone(), datagrams.clone());
            ns.spawn_thread(move || {
                let udp = |echo| serve_udp(port, echo, &stop, &peers, &datagrams, &ready_tx);
                let r = match kind {
                    Kind::Http => serve_http(port, &label, &stop, &peers, &ready_tx),
                    Kind::TcpEcho => serve_tcp(port, None, &stop, &peers, &ready_tx),
                    Kind::LineEcho => serve_tcp(port, Some(tag), &stop, &peers, &ready_tx),
                    Kind::UdpEcho => udp(Some(&label)),
                    Kind::UdpSink => udp(None),
                };
                // Setup errors reach the caller through the channel; this
                // one ended the server while it served.
                if let Err(e) = r {
                    eprintln!("warning: server {label} stopped: {e}");
                }
            })
        };
        match ready_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{name}: cannot serve port {port} in {}: {e}", ns.name()),
            Err(e) => panic!("{name}: server on port {port} not ready: {e}"),
        }
        Self {
            name: name.to_owned(),
            addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            stop,
            peers,
            datagrams,
            handle: Some(handle),
        }
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The peers of every request (HTTP: complete request; TCP echo:
    /// connection; UDP: datagram) received so far.
    pub fn peers(&self) -> Vec<SocketAddrV4> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Every datagram a UDP server received so far, in order.
    pub fn datagrams(&self) -> Vec<Datagram> {
        self.datagrams.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// How many datagrams carrying exactly `payload` arrived so far.
    pub fn count_payload(&self, payload: &[u8]) -> usize {
        self.datagrams()
            .iter()
            .filter(|(_, p)| p.as_slice() == payload)
            .count()
    }

    /// Waits (up to `timeout`) until `n` datagrams carrying exactly
    /// `payload` have arrived; returns how many had by then.
    pub fn wait_payload(&self, payload: &[u8], n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.count_payload(payload);
            if got >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits (up to `timeout`) until `n` requests have been seen; returns
    /// the peers seen by then.
    pub fn wait_peers(&self, n: usize, timeout: Duration) -> Vec<SocketAddrV4> {
        let deadline = Instant::now() + timeout;
        loop {
            let peers = self.peers();
            if peers.len() >= n || Instant::now() > deadline {
                return peers;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            eprintln!("warning: server {} panicked", self.name);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Http,
    TcpEcho,
    LineEcho,
    UdpEcho,
    UdpSink,
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => SocketAddrV4::new(
            a.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
            a.port(),
        ),
    }
}

fn record(peers: &Mutex<Vec<SocketAddrV4>>, peer: SocketAddrV4) {
    if let Ok(mut p) = peers.lock() {
        p.push(peer);
    }
}

/// Listens on `port` (reporting readiness, or why not, on `ready`) and
/// hands each connection to `serve` until `stop`.
fn accept_loop(
    port: u16,
    stop: &AtomicBool,
    ready: &mpsc::Sender<io::Result<()>>,
    mut serve: impl FnMut(TcpStream, SocketAddrV4),
) -> io::Result<()> {
    let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    listener.set_nonblocking(true)?;
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => serve(conn, v4(peer)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve_http(
    port: u16,
    label: &str,
    stop: &AtomicBool,
    peers: &Mutex<Vec<SocketAddrV4>>,
    ready: &mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    accept_loop(port, stop, ready, |conn, peer| {
        // A client that misbehaves only costs its own request.
        let _ = answer_http(conn, peer, label, peers);
    })
}

fn answer_http(
    mut conn: TcpStream,
    peer: SocketAddrV4,
    label: &str,
    peers: &Mutex<Vec<SocketAddrV4>>,
) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 || req.len() + n > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "incomplete request",
            ));
        }
        req.extend_from_slice(&buf[..n]);
    }
    // Recorded before answering: a client holding the answer finds its
    // request recorded.
    record(peers, peer);
    let body = format!("{label}: hello {peer}\n");
    let resp = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes())?;
    conn.flush()
}

fn serve_tcp(
    port: u16,
    lines_as: Option<String>,
    stop: &Arc<AtomicBool>,
    peers: &Mutex<Vec<SocketAddrV4>>,
    ready: &mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    let mut conns = Vec::new();
    let served = accept_loop(port, stop, ready, |conn, peer| {
        record(peers, peer);
        let stop = stop.clone();
        let tag = lines_as.clone();
        // The socket belongs to this namespace already: the thread needs
        // no setns.
        conns.push(std::thread::spawn(move || match tag {
            Some(tag) => answer_lines(conn, &tag, &stop),
            None => echo_conn(conn, &stop),
        }));
    });
    for c in conns {
        let _ = c.join();
    }
    served
}

fn echo_conn(mut conn: TcpStream, stop: &AtomicBool) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(POLL * 10))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => conn.write_all(&buf[..n])?,
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers every line `L` on `conn` with `"<tag>: L"` until EOF, `stop`
/// or the line `bye`.
fn answer_lines(conn: TcpStream, tag: &str, stop: &AtomicBool) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(POLL * 10))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if line.ends_with('\n') => {
                w.write_all(format!("{tag}: {line}").as_bytes())?;
                if line == "bye\n" {
                    return Ok(());
                }
                line.clear();
            }
            // Part of a line before the timeout: the rest follows.
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes `msg` on `s` and reads back exactly as many bytes (an echo).
pub fn echo_exchange(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

fn serve_udp(
    port: u16,
    echo: Option<&str>,
    stop: &AtomicBool,
    peers: &Mutex<Vec<SocketAddrV4>>,
    datagrams: &Mutex<Vec<Datagram>>,
    ready: &mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    let sock = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    sock.set_read_timeout(Some(POLL))?;
    let _ = ready.send(Ok(()));
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if is_timeout(&e) => continue,
            // An ICMP error about an earlier answer: not ours to handle.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        record(peers, v4(peer));
        if let Ok(mut d) = datagrams.lock() {
            d.push((v4(peer), buf[..n].to_vec()));
        }
        if let Some(label) = echo {
            let mut reply = format!("{label}: ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            // An answer that cannot leave (the route to the peer went away
            // with an interface) is lost, as on a network; the server goes
            // on serving.
            if let Err(e) = sock.send_to(&reply, peer) {
                eprintln!("server {label}: answer to {peer} not sent: {e}");
            }
        }
    }
    Ok(())
}

/// `GET path` over HTTP/1.0 from `ns` to `addr`; the body of a `200`
/// answer, else an error saying what came back.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> io::Result<String> {
    ns.exec_closure(|| {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        http_exchange(&mut s, addr, path)
    })
}

/// Sends `GET path` on a connected stream and reads the answer's body.
pub fn http_exchange(s: &mut TcpStream, addr: SocketAddr, path: &str) -> io::Result<String> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    // One write: `write!` would send every formatted piece on its own.
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP answer: {resp:?}"),
        )
    })?;
    if !head.starts_with("HTTP/1.0 200 ") && !head.starts_with("HTTP/1.1 200 ") {
        return Err(io::Error::other(format!("HTTP error: {head}")));
    }
    Ok(body.to_owned())
}

/// Tries to connect from `ns` to `addr` within `timeout`: `Ok` if it
/// connected, the error otherwise (refused, timed out, unreachable).
pub fn tcp_connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    ns.exec_closure(|| TcpStream::connect_timeout(&addr, timeout).map(drop))
}

/// Sends `payload` once from `ns` to `addr` over UDP (from an ephemeral
/// port) and returns the answer, waiting up to [`IO_TIMEOUT`]. It does not
/// send again: a datapath that loses a first packet fails the caller.
pub fn udp_request(ns: &Netns, addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    udp_request_from(ns, 0, addr, payload)
}

/// Like [`udp_request`], from local port `local_port` (0: ephemeral).
pub fn udp_request_from(
    ns: &Netns,
    local_port: u16,
    addr: SocketAddr,
    payload: &[u8],
) -> io::Result<Vec<u8>> {
    udp_request_within(ns, local_port, addr, payload, IO_TIMEOUT)
}

/// Like [`udp_request_from`], waiting `timeout` for the answer: for
/// requests the test expects to go unanswered (pair the silence with
/// evidence of why, such as a drop counter that moved).
pub fn udp_request_within(
    ns: &Netns,
    local_port: u16,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    ns.exec_closure(|| {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, local_port))?;
        sock.connect(addr)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send(payload)?;
        let mut buf = vec![0u8; 65536];
        let n = sock.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })
}

/// Sends `payload` from `from` (an address of `ns`, port 0 for any) to
/// `to`, unconnected, expecting no answer.
pub fn udp_send(ns: &Netns, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
    ns.exec_closure(|| {
        let s = UdpSocket::bind(from)?;
        s.send_to(payload, to).map(drop)
    })
}

/// Sends `line` on an open connection to a [`Server::line_echo`] and reads
/// the answering line (without its newline).
pub fn line_on(s: &mut TcpStream, line: &str) -> io::Result<String> {
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the newline may be read ahead and lost.
    while answer.last() != Some(&b'\n') {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(&answer)),
            ));
        }
        answer.push(byte[0]);
    }
    answer.pop();
    String::from_utf8(answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One short TCP connection from `ns` to `addr`: sends `line`, returns the
/// answering line (without its newline), as a [`Server::line_echo`]
/// answers: `"<name>: <line>"`.
pub fn line_exchange(ns: &Netns, addr: SocketAddr, line: &str) -> io::Result<String> {
    ns.exec_closure(|| {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut w = s.try_clone()?;
        w.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer)?;
        if !answer.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{addr} closed after {answer:?}"),
            ));
        }
        Ok(answer.trim_end().to_owned())
    })
}

/// Asserts that a connection from `ns` to `addr` is refused: something
/// (the node's own stack, a container without a listener) answered the
/// SYN with a reset. Silence does not count: a test that expects packets
/// to be dropped uses [`assert_unanswered`] and checks the drop counter.
#[track_caller]
pub fn assert_refused(ns: &Netns, addr: SocketAddr, what: &str) {
    match tcp_connect(ns, addr, IO_TIMEOUT) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Ok(()) => panic!("{what}: {addr} accepted the connection"),
        Err(e) => panic!("{what}: a connection to {addr} was not refused but failed with: {e}"),
    }
}

/// Asserts that a connection from `ns` to `addr` gets no answer at all
/// within `timeout` (its SYNs are dropped): neither accepted nor refused.
#[track_caller]
pub fn assert_unanswered(ns: &Netns, addr: SocketAddr, timeout: Duration, what: &str) {
    match tcp_connect(ns, addr, timeout) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        Ok(()) => panic!("{what}: {addr} accepted the connection"),
        Err(e) => panic!("{what}: a connection to {addr} failed with {e}, not silence"),
    }
}

/// A TCP connection from local port `local_port` of the calling thread's
/// namespace to `dst` (`std` cannot bind before connecting). The connect
/// gives up after [`IO_TIMEOUT`].
pub fn tcp_connect_from(local_port: u16, dst: SocketAddrV4) -> io::Result<TcpStream> {
    fn check(r: libc::c_int) -> io::Result<()> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }
    // SAFETY: plain system call; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let timeout = libc::timeval {
        tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, local_port));
    let remote = sockaddr(dst);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: every pointer is to a live local of the size passed with it.
    unsafe {
        check(libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        // Linux bounds a blocking connect by the send timeout.
        check(libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        check(libc::bind(sock.as_raw_fd(), (&raw const local).cast(), len))?;
        check(libc::connect(
            sock.as_raw_fd(),
            (&raw const remote).cast(),
            len,
        ))?;
    }
    Ok(TcpStream::from(sock))
}

/// Pause between two exchanges of an [`RrFlow`].
const RR_INTERVAL: Duration = Duration::from_millis(50);

/// A long-lived TCP connection exchanging a numbered line with a
/// [`Server::line_echo`] every 50 ms, in the background, until stopped or
/// its first failure.
///
/// ```no_run
/// use std::net::SocketAddr;
/// use datapath_tests::{node::Node, traffic::{RrFlow, Server}};
///
/// let node = Node::new();
/// let _echo = Server::line_echo(&node.node, 7000, "echo");
/// let flow = RrFlow::start(&node.client, SocketAddr::from((node.node_addr(), 7000)), "echo");
/// flow.wait_more("before anything happens", 5);
/// assert!(flow.finish().expect("no exchange failed") >= 5);
/// ```
#[derive(Debug)]
pub struct RrFlow {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: JoinHandle<Result<u64, String>>,
}

impl RrFlow {
    /// Connects from `ns` to `addr`, served by the line server `server`,
    /// and starts exchanging.
    pub fn start(ns: &Netns, addr: SocketAddr, server: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (stop2, done2) = (stop.clone(), done.clone());
        let server = server.to_owned();
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
                w.write_all(format!("exchange {n}\n").as_bytes())
                    .map_err(|e| format!("exchange {n}: send: {e}"))?;
                let mut answer = String::new();
                r.read_line(&mut answer)
                    .map_err(|e| format!("exchange {n}: receive: {e}"))?;
                if answer != format!("{server}: exchange {n}\n") {
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
    pub fn exchanges(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more exchanges than now have completed; panics
    /// (naming `what`) if the flow ends or stalls for 10 s.
    #[track_caller]
    pub fn wait_more(&self, what: &str, n: u64) {
        let target = self.exchanges() + n;
        let deadline = Instant::now() + IO_TIMEOUT * 2;
        while self.exchanges() < target {
            assert!(
                !self.handle.is_finished(),
                "{what}: the flow ended after {} exchanges",
                self.exchanges()
            );
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {target} exchanges",
                self.exchanges()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Stops exchanging; the number of exchanges, or the first failure.
    pub fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .unwrap_or_else(|_| Err("the flow's thread panicked".into()))
    }
}

/// One UDP socket in a namespace sending the same datagram to one address
/// every 20 ms, unconnected (ICMP errors while nothing serves the address
/// do not stop it), collecting the answers: a client that keeps sending on
/// one 5-tuple while the server behind the address is replaced.
#[derive(Debug)]
pub struct UdpPinger {
    stop: Arc<AtomicBool>,
    answers: mpsc::Receiver<Vec<u8>>,
    handle: JoinHandle<u64>,
}

impl UdpPinger {
    /// Starts sending `payload` from `ns` to `addr`; gives up by itself
    /// after 60 s.
    pub fn start(ns: &Netns, addr: SocketAddr, payload: &[u8]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, answers) = mpsc::channel();
        let (flag, payload) = (stop.clone(), payload.to_vec());
        let handle = ns.spawn_thread(move || {
            let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                return 0;
            };
            let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 2048];
            let mut sent = 0;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if socket.send_to(&payload, addr).is_ok() {
                    sent += 1;
                }
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    let _ = tx.send(buf[..n].to_vec());
                }
            }
            sent
        });
        Self {
            stop,
            answers,
            handle,
        }
    }

    /// Waits up to `timeout` for an answer starting with `prefix` (answers
    /// before it are consumed); whether one came.
    pub fn wait_answer(&self, prefix: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.answers.recv_timeout(left) {
                Ok(a) if a.starts_with(prefix) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    /// Stops sending; how many datagrams were sent.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// Sends a router advertisement (router lifetime 1800 s) to all nodes from
/// the calling thread's namespace, out of `ifname`; retries while the
/// link-local address is tentative.
pub fn send_router_advertisement(ifname: &str) -> Result<(), String> {
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {ifname}"));
    }
    // SAFETY: plain socket calls on values built here.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let hops: libc::c_int = 255;
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `hops` outlives the call; its size is given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MULTICAST_HOPS,
            std::ptr::from_ref(&hops).cast(),
            size,
        );
    }
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    to.sin6_addr.s6_addr = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    to.sin6_scope_id = index;
    // Type 134, code 0, checksum (the kernel's), hop limit 64, flags 0,
    // router lifetime 1800 s, reachable and retransmit times 0.
    let ra: [u8; 16] = [134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    let deadline = Instant::now() + Duration::from_secs(10);
    let result = loop {
        // SAFETY: `ra` and `to` outlive the call; their sizes are given.
        let sent = unsafe {
            libc::sendto(
                fd,
                ra.as_ptr().cast(),
                ra.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if sent >= 0 {
            break Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) || Instant::now() > deadline {
            break Err(e.to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    result
}
