//! The datapath's eBPF programs. Entry points are thin: they run the shared
//! logic of [`uplink`] or [`container`] and turn its verdict into the hook's
//! return code, counting every drop.
#![no_std]
#![no_main]
// Atomic adds and ORs on map values (conntrack counters and flags): see
// conntrack::update.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod clock;
mod conntrack;
mod container;
mod ctx;
mod guard;
mod icmp;
mod maps;
mod nat;
mod overlay;
mod parse;
mod ratelimit;
mod route;
mod sock;
mod uplink;

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action},
    helpers::generated::{bpf_check_mtu, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use datapath_common::{CONFIG_F_CHECK_LINKS, EndpointKey, FlushRequest, Stat, monitor::hook};

use crate::{ctx::Packet, maps::count};

/// Uplink ingress under TC: translated packets go straight into the
/// container's network namespace with `bpf_redirect_peer`, skipping the
/// node's IP stack and keeping GSO super-packets whole.
#[classifier]
pub fn uplink_tc(mut ctx: TcContext) -> i32 {
    match uplink::process(&mut ctx, hook::UPLINK_TC) {
        uplink::Verdict::Pass => {
            count(Stat::Passed);
            TC_ACT_OK
        }
        uplink::Verdict::Drop(stat) => {
            log_drop(&ctx, stat);
            tc_dropped(&ctx, stat);
            TC_ACT_SHOT
        }
        uplink::Verdict::ToContainer { ifindex, .. } => {
            if interface_gone(&ctx, ifindex) {
                return stale_interface(&ctx);
            }
            // SAFETY: plain helper call.
            redirected(&ctx, unsafe { bpf_redirect_peer(ifindex, 0) as i32 })
        }
    }
}

/// Uplink ingress under XDP: translated frames get the container's MACs and
/// are redirected into its veth pair.
#[xdp]
pub fn uplink_xdp(mut ctx: XdpContext) -> u32 {
    match uplink::process(&mut ctx, hook::UPLINK_XDP) {
        uplink::Verdict::Pass => {
            count(Stat::Passed);
            xdp_action::XDP_PASS
        }
        uplink::Verdict::Drop(stat) => {
            log_drop(&ctx, stat);
            xdp_dropped(&ctx, stat);
            xdp_action::XDP_DROP
        }
        uplink::Verdict::ToContainer { addr, .. } => {
            // The endpoint gives the MACs and, re-validating the flow's
            // cached interface, the container's current veth. (XDP
            // redirects fail after the program returns, uncounted: the
            // interface must be right here.)
            // SAFETY: endpoint values are replaced whole by the agent.
            let Some(ep) = (unsafe { maps::ENDPOINTS.get(EndpointKey { addr }) }) else {
                xdp_dropped(&ctx, Stat::DropNoEndpoint);
                return xdp_action::XDP_DROP;
            };
            let (mac, host_mac, ifindex) = (ep.mac, ep.host_mac, ep.ifindex);
            if interface_gone(&ctx, ifindex) {
                forget_flow();
                xdp_dropped(&ctx, Stat::DropRedirectFailed);
                return xdp_action::XDP_DROP;
            }
            if ctx.store(0, &mac).is_err() || ctx.store(6, &host_mac).is_err() {
                xdp_dropped(&ctx, Stat::DropMacStore);
                return xdp_action::XDP_DROP;
            }
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
    }
}

/// Ingress of a container's host-side veth.
#[classifier]
pub fn container_tc(mut ctx: TcContext) -> i32 {
    match container::process(&mut ctx) {
        container::Verdict::Pass => TC_ACT_OK,
        container::Verdict::Drop(stat) => {
            log_drop(&ctx, stat);
            tc_dropped(&ctx, stat);
            TC_ACT_SHOT
        }
        container::Verdict::ToUplink { ifindex } => {
            if interface_gone(&ctx, ifindex) {
                return stale_interface(&ctx);
            }
            // SAFETY: a null neighbour means "look the next hop up in the FIB".
            redirected(&ctx, unsafe {
                bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
            })
        }
        container::Verdict::ToContainer { ifindex } => {
            if interface_gone(&ctx, ifindex) {
                return stale_interface(&ctx);
            }
            // SAFETY: plain helper call.
            redirected(&ctx, unsafe { bpf_redirect_peer(ifindex, 0) as i32 })
        }
        container::Verdict::ToOverlay { ifindex } => {
            // SAFETY: plain helper call; the overlay device encapsulates.
            redirected(&ctx, unsafe { bpf_redirect(ifindex, 0) as i32 })
        }
    }
}

/// Ingress of the overlay (VXLAN) device: decapsulated packets from the
/// other nodes go straight into their container's network namespace.
#[classifier]
pub fn overlay_tc(mut ctx: TcContext) -> i32 {
    match overlay::from_overlay(&mut ctx) {
        overlay::Delivery::Pass => TC_ACT_OK,
        overlay::Delivery::Drop(stat) => {
            tc_dropped(&ctx, stat);
            TC_ACT_SHOT
        }
        overlay::Delivery::ToContainer { ifindex } => {
            // SAFETY: plain helper call.
            redirected(&ctx, unsafe { bpf_redirect_peer(ifindex, 0) as i32 })
        }
    }
}

/// Egress of the overlay (VXLAN) device: the node's own packets for
/// containers on other nodes get their tunnel key.
#[classifier]
pub fn overlay_egress_tc(mut ctx: TcContext) -> i32 {
    match overlay::to_overlay(&mut ctx) {
        overlay::Egress::Pass => TC_ACT_OK,
        overlay::Egress::Drop(stat) => {
            if let Some(stat) = stat {
                // On egress: the device the packet leaves by.
                // SAFETY: `skb` is the program's context.
                let ifindex = unsafe { (*ctx.skb.skb).ifindex };
                maps::dropped(stat, ifindex, ctx.len());
            }
            TC_ACT_SHOT
        }
    }
}

/// cgroup connect4 on the node's cgroup: a node socket connecting to a
/// published port connects to the container (see [`sock`]).
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate4(&ctx);
    1
}

/// cgroup sendmsg4: a node UDP datagram to a published port is sent to
/// the container.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate4(&ctx);
    1
}

/// cgroup recvmsg4: a datagram from a container a node socket sent to
/// through a published port reads as coming from the published address.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx);
    1
}

/// cgroup getpeername4: a node socket connected through a published port
/// shows the published address as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx);
    1
}

/// cgroup connect6: a dual-stack node socket connecting to an IPv4-mapped
/// published address connects to the container.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx);
    1
}

/// cgroup sendmsg6: the same for UDP datagrams.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx);
    1
}

/// cgroup recvmsg6: answers read as coming from the dialed address.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx);
    1
}

/// cgroup getpeername6: the dialed address is the peer.
#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx);
    1
}

/// `-ENODEV`.
const ENODEV: i64 = -19;

/// Whether interface `ifindex` is gone. A redirect to it would be dropped
/// after the program returned, uncounted: so the interface a flow cached is
/// re-validated before every redirect (`bpf_check_mtu` finds the device
/// by index, or answers `-ENODEV`), unless the configuration says not to
/// ([`CONFIG_F_CHECK_LINKS`]).
#[inline(always)]
fn interface_gone<C: EbpfContext>(ctx: &C, ifindex: u32) -> bool {
    if maps::config().is_none_or(|c| c.flags & CONFIG_F_CHECK_LINKS == 0) {
        return false;
    }
    let mut mtu = 0u32;
    // SAFETY: plain helper call; `mtu` is a live local.
    unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu, 0, 0) == ENODEV }
}

/// Drops a packet whose flow sends it to an interface that is gone,
/// counted, and removes the flow: its next packet starts it afresh from
/// the endpoint and published port maps (the agent rewrites those when it
/// recreates a veth).
#[inline(always)]
fn stale_interface(ctx: &TcContext) -> i32 {
    forget_flow();
    tc_dropped(ctx, Stat::DropRedirectFailed);
    TC_ACT_SHOT
}

/// Removes the flow of the packet being processed (see [`stale_interface`]).
#[inline(always)]
fn forget_flow() {
    if let Some(sc) = maps::scratch() {
        conntrack::dp_ct_forget(&sc.flow.key);
    }
}

/// Counts a packet a TC program drops (see [`maps::dropped`]).
#[inline(always)]
fn tc_dropped(ctx: &TcContext, stat: Stat) {
    // SAFETY: `skb` is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    maps::dropped(stat, ifindex, ctx.len());
}

/// Counts a packet the XDP program drops (see [`maps::dropped`]).
#[inline(always)]
fn xdp_dropped(ctx: &XdpContext, stat: Stat) {
    // SAFETY: `ctx` is the program's context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    maps::dropped(stat, ifindex, (ctx.data_end() - ctx.data()) as u32);
}

/// Counts a redirect the helper refused (it then returns the drop verdict):
/// the interface is gone or not a veth.
#[inline(always)]
fn redirected(ctx: &TcContext, verdict: i32) -> i32 {
    if verdict != TC_ACT_REDIRECT {
        tc_dropped(ctx, Stat::DropRedirectFailed);
    }
    verdict
}

/// Removes the flows the [`FlushRequest`] after the (zero) Ethernet header
/// names, in the kernel (see `conntrack::flush`); returns how many. Never
/// attached: the agent runs it with `BPF_PROG_TEST_RUN`.
#[classifier]
pub fn ct_flush(ctx: TcContext) -> i32 {
    match ctx.load::<FlushRequest>(FlushRequest::OFFSET) {
        Ok(req) => conntrack::flush::<conntrack::V4>(req).min(i32::MAX as u64) as i32,
        Err(_) => -1,
    }
}

/// Logs drops caused by exhausted resources (debug level: the agent turns
/// kernel-side debug logging on only when asked, so floods cost nothing).
#[inline(always)]
fn log_drop<C: aya_ebpf::EbpfContext>(ctx: &C, stat: Stat) {
    match stat {
        Stat::DropCtFull => debug!(ctx, "conntrack table full: new flow dropped"),
        Stat::DropSnatPortsExhausted => debug!(ctx, "no free masquerade port: new flow dropped"),
        _ => {}
    }
}

/// cgroup_skb egress of a rate-limited container's cgroup.
#[aya_ebpf::macros::cgroup_skb(egress)]
pub fn rate_egress(ctx: aya_ebpf::programs::SkBuffContext) -> i32 {
    ratelimit::egress(&ctx)
}

/// cgroup_skb ingress of a rate-limited container's cgroup.
#[aya_ebpf::macros::cgroup_skb(ingress)]
pub fn rate_ingress(ctx: aya_ebpf::programs::SkBuffContext) -> i32 {
    ratelimit::ingress(&ctx)
}

/// sock_ops of a rate-limited container's cgroup: pacing of TCP senders,
/// receive windows of TCP receivers.
#[aya_ebpf::macros::sock_ops]
pub fn rate_sockops(ctx: aya_ebpf::programs::SockOpsContext) -> u32 {
    ratelimit::sock_ops(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
