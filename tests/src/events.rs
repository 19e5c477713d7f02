//! Seeing the agent's work the moment it happens, to act at an exact
//! point of it (a test that kills the agent in the middle of an add):
//! [`RtMonitor`] reports a namespace's rtnetlink notifications (links,
//! IPv4 addresses and routes appearing), [`DirMonitor`] files renamed into
//! a directory.
//!
//! ```no_run
//! use std::time::Duration;
//! use datapath_tests::{events::{RtEvent, RtMonitor}, netns::Netns};
//!
//! let ns = Netns::new_unique();
//! let mut monitor = RtMonitor::open(&ns);
//! ns.exec_ok("ip", ["link", "add", "dummy0", "type", "dummy"]);
//! let seen = monitor.wait(Duration::from_secs(1), |e| {
//!     matches!(e, RtEvent::NewLink { ifname } if ifname.as_str() == "dummy0")
//! });
//! assert!(seen.is_some());
//! ```

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// An rtnetlink notification, as far as tests tell them apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RtEvent {
    /// A link appeared or changed (`RTM_NEWLINK`).
    NewLink {
        /// Its name.
        ifname: String,
    },
    /// An IPv4 address was added (`RTM_NEWADDR`).
    NewAddr {
        /// The interface it is on.
        ifindex: u32,
    },
    /// An IPv4 route was added (`RTM_NEWROUTE`).
    NewRoute {
        /// Its table (254: main, 255: local).
        table: u8,
        /// Its destination's prefix length (0: a default route).
        dst_len: u8,
    },
    /// Another message type.
    Other(u16),
}

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_IFNAME: u16 = 3;
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
/// `struct nlmsghdr`, `struct ifinfomsg`, `struct ifaddrmsg` sizes.
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// A subscription to the link, IPv4 address and IPv4 route notifications of
/// one namespace.
#[derive(Debug)]
pub struct RtMonitor {
    fd: OwnedFd,
    pending: Vec<RtEvent>,
}

impl RtMonitor {
    /// Subscribes in `ns`; everything from when this returns is reported.
    pub fn open(ns: &Netns) -> Self {
        ns.exec_closure(Self::open_here)
            .unwrap_or_else(|e| panic!("rtnetlink socket in {}: {e}", ns.name()))
    }

    /// Subscribes in the calling thread's namespace (a netlink socket stays
    /// in the namespace it was made in).
    fn open_here() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            pending: Vec::new(),
        })
    }

    /// Returns the first notification satisfying `pred` (earlier ones are
    /// consumed), or `None` once `timeout` passed.
    pub fn wait(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&RtEvent) -> bool,
    ) -> Option<RtEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.pending.iter().position(&mut pred) {
                let e = self.pending.remove(i);
                self.pending.drain(..i);
                return Some(e);
            }
            self.pending.clear();
            let left = deadline.checked_duration_since(Instant::now())?;
            if !poll_in(&self.fd, left) {
                return None;
            }
            if let Some(batch) = crate::sys::recv(&self.fd, libc::MSG_DONTWAIT) {
                self.pending.extend(parse(&batch));
            }
        }
    }
}

/// Whether `fd` became readable within `timeout`.
fn poll_in(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&raw mut pfd, 1, ms) > 0 }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The notifications in one netlink datagram.
fn parse(mut b: &[u8]) -> Vec<RtEvent> {
    let mut out = Vec::new();
    while let (Some(len), Some(ty)) = (u32_at(b, 0), u16_at(b, 4)) {
        let len = len as usize;
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        let body = &b[NLMSG_HDR..len];
        out.push(match ty {
            RTM_NEWLINK => RtEvent::NewLink {
                ifname: link_name(body).unwrap_or_default(),
            },
            RTM_NEWADDR => RtEvent::NewAddr {
                ifindex: u32_at(body, 4).unwrap_or(0),
            },
            RTM_NEWROUTE => RtEvent::NewRoute {
                table: body.get(4).copied().unwrap_or(0),
                dst_len: body.get(1).copied().unwrap_or(0),
            },
            other => RtEvent::Other(other),
        });
        // Messages are aligned to 4 bytes.
        let next = (len + 3) & !3;
        b = b.get(next..).unwrap_or_default();
    }
    out
}

/// `IFLA_IFNAME` of an `RTM_NEWLINK` body.
fn link_name(body: &[u8]) -> Option<String> {
    let mut attrs = body.get(IFINFOMSG..)?;
    while let (Some(len), Some(ty)) = (u16_at(attrs, 0), u16_at(attrs, 2)) {
        let len = usize::from(len);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == IFLA_IFNAME {
            let name = &attrs[4..len];
            let name = name.split(|&c| c == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(name).into_owned());
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or_default();
    }
    None
}

/// Files renamed (or moved) into a directory, reported by inotify.
#[derive(Debug)]
pub struct DirMonitor {
    fd: OwnedFd,
}

impl DirMonitor {
    /// Watches `dir`; every rename into it from when this returns on is
    /// reported.
    pub fn open(dir: &Path) -> Self {
        let path = CString::new(dir.as_os_str().as_bytes()).expect("no NUL byte in a path");
        // SAFETY: plain inotify_init1(2); the descriptor is owned at once.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        assert!(fd >= 0, "inotify: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `path` is a valid C string.
        let wd =
            unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MOVED_TO) };
        assert!(
            wd >= 0,
            "inotify watch on {}: {}",
            dir.display(),
            io::Error::last_os_error()
        );
        Self { fd }
    }

    /// Waits up to `timeout` for a file named `name` to be renamed into the
    /// directory; whether it was.
    pub fn wait_renamed(&self, name: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            if !poll_in(&self.fd, left) {
                return false;
            }
            let mut buf = [0u8; 4096];
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else {
                continue;
            };
            // struct inotify_event: wd, mask, cookie, len, then the name.
            let mut b = &buf[..n];
            while let Some(len) = u32_at(b, 12) {
                let end = 16 + len as usize;
                let Some(raw) = b.get(16..end) else { break };
                let file = raw.split(|&c| c == 0).next().unwrap_or_default();
                if file == name.as_bytes() {
                    return true;
                }
                b = &b[end..];
            }
        }
    }
}
