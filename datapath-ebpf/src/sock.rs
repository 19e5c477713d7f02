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
//! Every function is written over the address bytes and port, so the IPv6
//! programs (`connect6` …) need only their own context accessors.

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

/// `connect4` and `sendmsg4`: a destination that is a published port
/// becomes the container's address and port, and the socket remembers
/// what it dialed.
#[inline(always)]
pub fn translate4(ctx: &SockAddrContext) {
    let Some(cfg) = maps::config() else {
        return;
    };
    if !node_socket(ctx, cfg) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context's fields the kernel allows these hooks to read.
    let (ip, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let addr = ip.to_ne_bytes();
    let port = u16::from_be(port as u16);
    let Some(svc) = maps::service(addr, port, protocol as u8, true) else {
        return;
    };
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
    if SOCK_REV.insert(&key, &dialed, 0).is_err() {
        return;
    }
    // SAFETY: the fields these hooks may write.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(backend_addr);
        (*sa).user_port = u32::from(backend_port.to_be());
    }
    maps::count(Stat::SockTranslated);
}

/// `recvmsg4` and `getpeername4`: a container's address and port that a
/// translated socket reaches shows as the published address it dialed.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context's fields the kernel allows these hooks to read.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr: ip.to_ne_bytes(),
        port: u16::from_be(port as u16),
        _pad: 0,
    };
    // SAFETY: values are written whole; a copy is taken at once.
    let Some(dialed) = (unsafe { SOCK_REV.get(&key) }).copied() else {
        return;
    };
    // SAFETY: the fields these hooks may write.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(dialed.addr);
        (*sa).user_port = u32::from(dialed.port.to_be());
    }
}
