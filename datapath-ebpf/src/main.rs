//! The datapath's eBPF programs. Entry points are thin: they run the shared
//! logic of [`uplink`] or [`container`] and turn its verdict into the hook's
//! return code, counting every drop.
#![no_std]
#![no_main]
// Atomic adds on map values (conntrack counters): see conntrack::touch.
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
mod parse;
mod ratelimit;
mod uplink;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use datapath_common::{EndpointKey, Stat};

use crate::{ctx::Packet, maps::count};

/// Uplink ingress under TC: translated packets go straight into the
/// container's network namespace with `bpf_redirect_peer`, skipping the
/// node's IP stack and keeping GSO super-packets whole.
#[classifier]
pub fn uplink_tc(mut ctx: TcContext) -> i32 {
    match uplink::process(&mut ctx) {
        uplink::Verdict::Pass => {
            count(Stat::Passed);
            TC_ACT_OK
        }
        uplink::Verdict::Drop(stat) => {
            log_drop(&ctx, stat);
            count(stat);
            TC_ACT_SHOT
        }
        uplink::Verdict::ToContainer { ifindex, .. } => {
            // SAFETY: plain helper call.
            unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
        }
    }
}

/// Uplink ingress under XDP: translated frames get the container's MACs and
/// are redirected into its veth pair.
#[xdp]
pub fn uplink_xdp(mut ctx: XdpContext) -> u32 {
    match uplink::process(&mut ctx) {
        uplink::Verdict::Pass => {
            count(Stat::Passed);
            xdp_action::XDP_PASS
        }
        uplink::Verdict::Drop(stat) => {
            log_drop(&ctx, stat);
            count(stat);
            xdp_action::XDP_DROP
        }
        uplink::Verdict::ToContainer { ifindex, addr } => {
            // SAFETY: endpoint values are replaced whole by the agent.
            let Some(ep) = (unsafe { maps::ENDPOINTS.get(EndpointKey { addr }) }) else {
                count(Stat::DropNoEndpoint);
                return xdp_action::XDP_DROP;
            };
            let (mac, host_mac) = (ep.mac, ep.host_mac);
            if ctx.store(0, &mac).is_err() || ctx.store(6, &host_mac).is_err() {
                count(Stat::DropMacStore);
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
            count(stat);
            TC_ACT_SHOT
        }
        container::Verdict::ToUplink { ifindex } => {
            // SAFETY: a null neighbour means "look the next hop up in the FIB".
            unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
        }
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
