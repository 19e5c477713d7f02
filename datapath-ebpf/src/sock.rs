//! The node's own sockets to published ports, translated at the socket
//! layer (cgroup `connect4`, `sendmsg4`, `recvmsg4`, `getpeername4` on the
//! node's cgroup): a TCP connection or UDP datagram to a published port
//! on any node address or the node's loopback goes straight to the
//! container, once per connection instead of per packet, with no
//! translation on the wire; the application still sees the address it
//! dialed (`getpeername`), and UDP answers read as coming from it
//! (`recvmsg`).
//!
//! Only sockets of the node's network namespace ([`Config::node_netns_cookie`])
//! are translated: a container's processes live below the node's cgroup
//! too, but a port published on the node's loopback must never appear on
//! a container's own, and their connections to the node's addresses take
//! the hairpin path of [`crate::container`].
//!
//! The core ([`translate`], [`dialed`]) works on an address and a port; the
//! IPv6 hooks (`connect6` …) use it for dual-stack sockets dialing an
//! IPv4-mapped address, and native IPv6 needs only its own lookup there.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use datapath_common::{Config, SockRevKey, SockRevValue, Stat};

use crate::maps::{self, SOCK_REV};

/// Whether the socket belongs to the node's network namespace.
#[inline(always)]
fn node_socket(ctx: &SockAddrContext, cfg: &Config) -> bool {
    // SAFETY: plain helper call on the program's context.
    cfg.node_netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.node_netns_cookie
}

/// The second-to-last word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
/// as the context holds it (wire order).
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A destination `addr:port` (wire-order address, host-order port) that is
/// a published port becomes the container's: returns its address and port,
/// having remembered what the socket dialed.
#[inline(always)]
fn translate(
    ctx: &SockAddrContext,
    addr: [u8; 4],
    port: u16,
    protocol: u32,
) -> Option<([u8; 4], u16)> {
    let cfg = maps::config()?;
    if !node_socket(ctx, cfg) {
        return None;
    }
    let svc = maps::service(addr, port, protocol as u8, true)?;
    let (backend_addr, backend_port) = (svc.backend_addr, svc.backend_port);
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr: backend_addr,
        port: backend_port,
        _pad: 0,
    };
    let dialed = SockRevValue {
        addr,
        port,
        _pad: 0,
    };
    // A socket whose dialed address cannot be remembered is left alone:
    // it would see the container's address as its peer.
    SOCK_REV.insert(&key, &dialed, 0).ok()?;
    maps::count(Stat::SockTranslated);
    Some((backend_addr, backend_port))
}

/// The published address and port a socket dialed, if `addr:port` is the
/// container it was sent to instead.
#[inline(always)]
fn dialed(ctx: &SockAddrContext, addr: [u8; 4], port: u16) -> Option<([u8; 4], u16)> {
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: values are written whole; a copy is taken at once.
    let v = unsafe { SOCK_REV.get(&key) }.copied()?;
    Some((v.addr, v.port))
}

/// `connect4` and `sendmsg4`: a destination that is a published port
/// becomes the container's address and port.
#[inline(always)]
pub fn translate4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context's fields the kernel allows these hooks to read.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    if let Some((addr, port)) =
        translate(ctx, ip.to_ne_bytes(), u16::from_be(port as u16), protocol)
    {
        // SAFETY: the fields these hooks may write.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(addr);
            (*sa).user_port = u32::from(port.to_be());
        }
    }
}

/// `recvmsg4` and `getpeername4`: a container's address and port that a
/// translated socket reaches shows as the published address it dialed.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context's fields the kernel allows these hooks to read.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if let Some((addr, port)) = dialed(ctx, ip.to_ne_bytes(), u16::from_be(port as u16)) {
        // SAFETY: the fields these hooks may write.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(addr);
            (*sa).user_port = u32::from(port.to_be());
        }
    }
}

/// The IPv4 address of an IPv4-mapped IPv6 destination in the context.
#[inline(always)]
fn mapped4(sa: *mut aya_ebpf::bindings::bpf_sock_addr) -> Option<[u8; 4]> {
    // SAFETY: the context's fields the kernel allows these hooks to read.
    let w = unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    };
    (w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED).then(|| w[3].to_ne_bytes())
}

/// `connect6` and `sendmsg6`: the same for a dual-stack socket dialing an
/// IPv4-mapped address (`::ffff:127.0.0.1`).
#[inline(always)]
pub fn translate6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let Some(ip) = mapped4(sa) else {
        return;
    };
    // SAFETY: the context's fields the kernel allows these hooks to read.
    let (port, protocol) = unsafe { ((*sa).user_port, (*sa).protocol) };
    if let Some((addr, port)) = translate(ctx, ip, u16::from_be(port as u16), protocol) {
        // SAFETY: the fields these hooks may write.
        unsafe {
            (*sa).user_ip6[3] = u32::from_ne_bytes(addr);
            (*sa).user_port = u32::from(port.to_be());
        }
    }
}

/// `recvmsg6` and `getpeername6`: the same for a dual-stack socket.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let Some(ip) = mapped4(sa) else {
        return;
    };
    // SAFETY: the context's fields the kernel allows these hooks to read.
    let port = unsafe { (*sa).user_port };
    if let Some((addr, port)) = dialed(ctx, ip, u16::from_be(port as u16)) {
        // SAFETY: the fields these hooks may write.
        unsafe {
            (*sa).user_ip6[3] = u32::from_ne_bytes(addr);
            (*sa).user_port = u32::from(port.to_be());
        }
    }
}
