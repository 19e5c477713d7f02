//! Frames on the wire: an `AF_PACKET` socket bound to one interface, to
//! send hand-made frames out of it ([`send_frames`]) or to record every
//! frame it sees ([`Capture`]).
//!
//! ```no_run
//! use datapath_tests::{capture::{Capture, contains}, node::{CLIENT_IF, Node}};
//!
//! let node = Node::new();
//! let capture = Capture::start(&node.client, CLIENT_IF);
//! assert!(node.client.ping(node.node_addr()));
//! let frames = capture.finish();
//! assert!(frames.iter().any(|f| contains(f, &node.node_addr().octets())));
//! ```

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{netns::Netns, traffic::IO_TIMEOUT};

/// How long a receive waits before the capture checks whether to stop.
const RECV_POLL: Duration = Duration::from_millis(50);

/// An `AF_PACKET` raw socket bound to one interface of the calling
/// thread's namespace.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens one on `ifname` for sending only.
    pub fn sender(ifname: &str) -> io::Result<Self> {
        Self::open(ifname, false)
    }

    /// Opens one on `ifname` that receives every frame (any protocol, both
    /// directions), each receive waiting at most [`RECV_POLL`].
    pub fn receiver(ifname: &str) -> io::Result<Self> {
        Self::open(ifname, true)
    }

    fn open(ifname: &str, receive: bool) -> io::Result<Self> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)?;
        let ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
        let proto = if receive {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain socket(2) call; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let sock = Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            ifindex,
        };
        if receive {
            let addr = sock.addr(proto);
            // SAFETY: `addr` is a valid sockaddr_ll of the size given.
            let r = unsafe {
                libc::bind(
                    sock.fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: RECV_POLL.as_micros() as libc::suseconds_t,
            };
            // SAFETY: `tv` is a valid timeval of the size given.
            let r = unsafe {
                libc::setsockopt(
                    sock.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(sock)
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
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let addr = self.addr(0);
        // SAFETY: `frame` and `addr` are valid for the sizes given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        match usize::try_from(n) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "sent {n} of the frame's {} bytes",
                frame.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    /// One frame, or `None` once the receive timeout passed.
    pub fn recv(&self) -> Option<Vec<u8>> {
        self.recv_flags(0)
    }

    /// A frame already queued on the socket, without waiting.
    pub fn recv_queued(&self) -> Option<Vec<u8>> {
        self.recv_flags(libc::MSG_DONTWAIT)
    }

    fn recv_flags(&self, flags: libc::c_int) -> Option<Vec<u8>> {
        crate::sys::recv(&self.fd, flags)
    }
}

/// Sends `frames` out of `ifname` in `ns`, in order; panics if one cannot
/// be sent.
pub fn send_frames(ns: &Netns, ifname: &str, frames: &[Vec<u8>]) {
    ns.exec_closure(|| {
        let sock = PacketSocket::sender(ifname)
            .unwrap_or_else(|e| panic!("AF_PACKET socket on {ifname}: {e}"));
        for f in frames {
            sock.send(f)
                .unwrap_or_else(|e| panic!("sending a frame out of {ifname}: {e}"));
        }
    });
}

/// Every frame seen on an interface of a namespace, in either direction,
/// until [`Capture::finish`].
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns`; every frame from when this
    /// returns on is recorded.
    pub fn start(ns: &Netns, ifname: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let name = ifname.to_owned();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = ns.spawn_thread(move || {
            let sock = match PacketSocket::receiver(&name) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Vec::new();
                }
            };
            let _ = ready_tx.send(Ok(()));
            // Until stopped and drained: what arrived before the stop is
            // recorded even if the thread had not read it yet.
            let mut frames = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                frames.extend(sock.recv());
            }
            while let Some(f) = sock.recv_queued() {
                frames.push(f);
            }
            frames
        });
        match ready_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("capturing on {ifname} in {}: {e}", ns.name()),
            Err(e) => panic!("capture on {ifname} in {} not ready: {e}", ns.name()),
        }
        Self { stop, handle }
    }

    /// Stops capturing; every frame seen until now.
    pub fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the capture thread panicked")
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The frames of `frames` that contain `needle`.
pub fn containing<'f>(frames: &'f [Vec<u8>], needle: &[u8]) -> Vec<&'f Vec<u8>> {
    frames.iter().filter(|f| contains(f, needle)).collect()
}

/// The IPv4 source address of an untagged Ethernet frame, if it has one.
pub fn ipv4_source(frame: &[u8]) -> Option<Ipv4Addr> {
    (frame.len() >= 34 && frame[12..14] == [0x08, 0x00])
        .then(|| Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]))
}
