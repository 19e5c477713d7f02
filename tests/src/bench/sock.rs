//! Socket helpers shared by the request/response and connection-rate
//! measurements: listeners with a deep backlog and a timed accept, and
//! connections from a chosen source address.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::sys::{
    socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, connect, listen, setsockopt,
        socket, sockopt,
    },
    time::TimeVal,
};

use crate::netns::Netns;

/// How long a blocked accept or read waits before looking at its stop flag.
pub const POLL: Duration = Duration::from_millis(100);
/// How long a connection attempt or a read of one answer may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

fn timeval(d: Duration) -> TimeVal {
    TimeVal::new(
        d.as_secs() as nix::libc::time_t,
        d.subsec_micros() as nix::libc::suseconds_t,
    )
}

/// A TCP listener on `0.0.0.0:port` created in `ns` (sockets keep the
/// namespace they were made in, whatever thread uses them), with a backlog
/// of 4096 and accept timing out after [`POLL`].
pub fn listen_in(ns: &Netns, port: u16) -> Result<TcpListener> {
    ns.exec_closure(|| -> Result<TcpListener> {
        let fd = tcp_socket()?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeval(POLL))?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        )?;
        listen(&fd, Backlog::new(4096)?)?;
        Ok(TcpListener::from(fd))
    })
    .with_context(|| format!("listening on port {port} in {}", ns.name()))
}

/// A new IPv4 TCP socket (close-on-exec).
fn tcp_socket() -> nix::Result<std::os::fd::OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Connects to `dst` from `src` (any address if `None`, else that address
/// with a port chosen at connect time); returns the stream and how long
/// the handshake took. Must run on a thread in the client's namespace.
pub fn connect_from(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> Result<(TcpStream, Duration)> {
    let fd = tcp_socket()?;
    if let Some(src) = src {
        // Defer the port choice to connect(), which picks one unique for
        // the whole 4-tuple instead of one free for every destination.
        setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    }
    // SO_SNDTIMEO bounds a blocking connect().
    setsockopt(&fd, sockopt::SendTimeout, &timeval(IO_TIMEOUT))?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeval(IO_TIMEOUT))?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    let start = Instant::now();
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    Ok((TcpStream::from(fd), start.elapsed()))
}

/// Whether an accept or read error only means "nothing yet".
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
