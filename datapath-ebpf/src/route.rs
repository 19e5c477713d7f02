//! What the node's own network stack knows: its routing table
//! (`bpf_fib_lookup`) and its sockets (`bpf_sk_lookup_*`), consulted when a
//! flow is created, never per packet.

//!
//! Both run in global BPF functions (one per context type: the verifier
//! checks each once, and the 64-byte FIB request lives in their frames, not
//! the programs').

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup, bpf_sock_tuple,
        xdp_md,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
    },
    programs::{TcContext, XdpContext},
};
use datapath_common::{CtKey, proto};

/// `AF_INET`.
const AF_INET: u8 = 2;
/// `TCP_LISTEN` in `struct bpf_sock::state`.
const TCP_LISTEN: u32 = 10;

/// What the FIB says about a destination.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fib {
    /// Forwarded out of [`Route::ifindex`].
    Forward,
    /// Forwarded, but this packet is too big for the egress device.
    TooBig,
    /// Not forwarded: local, broadcast, multicast, unreachable, … — the
    /// node's stack handles it.
    Stack,
    /// The lookup failed (no such input interface, …).
    Failed,
}

/// The outcome of a FIB lookup.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Route {
    /// Egress interface ([`Fib::Forward`], [`Fib::TooBig`]).
    pub ifindex: u32,
    /// MTU of the egress device (0 when unknown).
    pub mtu: u16,
    /// The verdict.
    pub fib: Fib,
    /// Explicit padding.
    pub _pad: u8,
}

/// The node's stack, as seen from a program's context.
pub trait Node {
    /// Looks up the route of an IPv4 packet `key` arriving on `ifindex`
    /// (for TC, checked against the size of the packet in the context). The
    /// neighbour is not resolved here: `bpf_redirect_neigh` does that.
    fn route(&self, key: &CtKey, ifindex: u32) -> Route;

    /// Whether a socket of the node owns the exact connection `key` (a
    /// packet from the outside to the node): then the packet is a reply to
    /// one of the node's own connections, even if its port is published,
    /// and must not be sent into a container. Listening TCP sockets and
    /// unconnected UDP sockets do not count: a published port takes
    /// precedence over them.
    fn node_connection(&self, key: &CtKey) -> bool;
}

const NO_ROUTE: Route = Route {
    ifindex: 0,
    mtu: 0,
    fib: Fib::Failed,
    _pad: 0,
};

impl Node for TcContext {
    #[inline(always)]
    fn route(&self, key: &CtKey, ifindex: u32) -> Route {
        let mut r = NO_ROUTE;
        dp_route_tc(self.skb.skb, key, ifindex, &mut r);
        r
    }

    #[inline(always)]
    fn node_connection(&self, key: &CtKey) -> bool {
        dp_node_connection_tc(self.skb.skb, key) != 0
    }
}

impl Node for XdpContext {
    #[inline(always)]
    fn route(&self, key: &CtKey, ifindex: u32) -> Route {
        let mut r = NO_ROUTE;
        dp_route_xdp(self.ctx, key, ifindex, &mut r);
        r
    }

    #[inline(always)]
    fn node_connection(&self, key: &CtKey) -> bool {
        dp_node_connection_xdp(self.ctx, key) != 0
    }
}

/// [`Node::route`] under TC.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_route_tc(
    ctx: *mut __sk_buff,
    key: *const CtKey,
    ifindex: u32,
    out: *mut Route,
) -> u32 {
    route(ctx.cast(), key, ifindex, out)
}

/// [`Node::route`] under XDP.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_route_xdp(
    ctx: *mut xdp_md,
    key: *const CtKey,
    ifindex: u32,
    out: *mut Route,
) -> u32 {
    route(ctx.cast(), key, ifindex, out)
}

/// [`Node::node_connection`] under TC.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_node_connection_tc(ctx: *mut __sk_buff, key: *const CtKey) -> u32 {
    node_connection(ctx.cast(), key)
}

/// [`Node::node_connection`] under XDP.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_node_connection_xdp(ctx: *mut xdp_md, key: *const CtKey) -> u32 {
    node_connection(ctx.cast(), key)
}

#[inline(always)]
fn route(ctx: *mut c_void, key: *const CtKey, ifindex: u32, out: *mut Route) -> u32 {
    if key.is_null() || out.is_null() {
        return 0;
    }
    // SAFETY: non-null; the verifier checked the caller's memory.
    let key = unsafe { *key };
    // SAFETY: a zeroed `bpf_fib_lookup` is valid input.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = key.proto;
    p.sport = key.sport.to_be();
    p.dport = key.dport.to_be();
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(key.saddr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(key.daddr);
    // SAFETY: `p` is a local of the size passed; `ctx` is the program's.
    let rc = unsafe {
        fib_lookup(
            ctx,
            &raw mut p,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    let fib = if rc < 0 {
        Fib::Failed
    } else {
        match rc as u32 {
            BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => Fib::Forward,
            BPF_FIB_LKUP_RET_FRAG_NEEDED => Fib::TooBig,
            _ => Fib::Stack,
        }
    };
    // SAFETY: `out` is non-null caller memory of this size; the kernel
    // filled `mtu_result` (a union with `tot_len`).
    unsafe {
        *out = Route {
            ifindex: p.ifindex,
            mtu: p.__bindgen_anon_1.mtu_result,
            fib,
            _pad: 0,
        };
    }
    1
}

#[inline(always)]
fn node_connection(ctx: *mut c_void, key: *const CtKey) -> u32 {
    if key.is_null() {
        return 0;
    }
    // SAFETY: non-null; the verifier checked the caller's memory.
    let key = unsafe { *key };
    // SAFETY: a zeroed tuple is valid input.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    t.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(key.saddr);
    t.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(key.daddr);
    t.__bindgen_anon_1.ipv4.sport = key.sport.to_be();
    t.__bindgen_anon_1.ipv4.dport = key.dport.to_be();
    let len = 12;
    // SAFETY: `t` is a local; the socket, if any, is released below.
    unsafe {
        let sk = match key.proto {
            proto::TCP => bpf_sk_lookup_tcp(ctx, &raw mut t, len, BPF_F_CURRENT_NETNS as u64, 0),
            proto::UDP => bpf_sk_lookup_udp(ctx, &raw mut t, len, BPF_F_CURRENT_NETNS as u64, 0),
            _ => return 0,
        };
        if sk.is_null() {
            return 0;
        }
        let owns = if key.proto == proto::TCP {
            (*sk).state != TCP_LISTEN
        } else {
            (*sk).dst_port != 0
        };
        bpf_sk_release(sk.cast());
        u32::from(owns)
    }
}
