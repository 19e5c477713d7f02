//! The overlay between the nodes of a cluster: VXLAN through one
//! collect-metadata device per node, driven from the programs.
//!
//! * [`from_container`] (in `container_tc`): a packet from a container to
//!   the cluster network outside this node's pool gets the owning node's
//!   underlay address as its tunnel key (`bpf_skb_set_tunnel_key`) and is
//!   redirected to the VXLAN device, which encapsulates it. No flow is
//!   created and nothing is translated: each side sees the other's real
//!   address. A destination no node owns is dropped, never masqueraded.
//! * [`from_overlay`] (in `overlay_tc`, the VXLAN device's ingress): a
//!   decapsulated packet whose inner source belongs to the node that sent it
//!   goes straight into its container (`bpf_redirect_peer`); anything else
//!   for the node itself goes to the node's stack.
//!
//! The node that forwards a packet into the overlay decrements its TTL
//! once: the cluster network is one routed hop.

use aya_ebpf::{
    bindings::bpf_tunnel_key,
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use datapath_common::{Config, EndpointKey, Peer, Stat};

use crate::{
    ctx::Packet,
    maps::{self, ENDPOINTS, PEERS},
    nat,
    parse::{ETH_LEN, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF},
};

/// The outer TTL of encapsulated packets.
const OUTER_TTL: u8 = 64;

/// What `container_tc` must do with a packet for another node.
pub enum ToPeer {
    /// Not for another node: the rest of the program decides.
    NotOverlay,
    /// Hand it to the node's stack (its TTL expires here: the stack answers
    /// time exceeded).
    Pass,
    /// Drop it, counting `Stat`.
    Drop(Stat),
    /// Tunnel key set: redirect it to the overlay device `ifindex`.
    Redirect { ifindex: u32 },
}

/// The node owning `addr`, if any.
#[inline(always)]
fn peer(addr: [u8; 4]) -> Option<&'static Peer> {
    PEERS.get(&Key::new(32, addr))
}

/// Sends a container's IPv4 packet for another node's container into the
/// overlay (see the module documentation).
#[inline(always)]
pub fn from_container(ctx: &mut TcContext, cfg: &Config) -> ToPeer {
    let Ok(daddr) = ctx.read::<4>(IP_DST_OFF) else {
        return ToPeer::NotOverlay;
    };
    if !cfg.in_cluster(daddr) || cfg.in_pool(daddr) {
        return ToPeer::NotOverlay;
    }
    let Some(p) = peer(daddr) else {
        return ToPeer::Drop(Stat::DropNoPeer);
    };
    let (underlay, vni) = (p.underlay, p.vni);
    let Ok([ttl]) = ctx.read::<1>(IP_TTL_OFF) else {
        return ToPeer::Drop(Stat::DropMalformed);
    };
    if ttl <= 1 {
        maps::count(Stat::DropTtlExceeded);
        return ToPeer::Pass;
    }
    if nat::decrement_ttl(ctx).is_err() {
        return ToPeer::Drop(Stat::DropHelperFailed);
    }
    // SAFETY: a zeroed key is valid input.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // The helper takes the address in host order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(underlay);
    key.tunnel_ttl = OUTER_TTL;
    // SAFETY: `key` is a local of the size passed.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if rc != 0 {
        return ToPeer::Drop(Stat::DropHelperFailed);
    }
    maps::count(Stat::OverlayEncapsulated);
    ToPeer::Redirect {
        ifindex: cfg.overlay_ifindex,
    }
}

/// What `overlay_tc` must do with a decapsulated packet.
pub enum Delivery {
    /// Hand it to the node's stack.
    Pass,
    /// Drop it, counting `Stat`.
    Drop(Stat),
    /// MACs rewritten: redirect it into the container behind host-side
    /// veth `ifindex`.
    ToContainer { ifindex: u32 },
}

/// Delivers a decapsulated packet (see the module documentation).
#[inline(always)]
pub fn from_overlay(ctx: &mut TcContext) -> Delivery {
    let Some(cfg) = maps::config() else {
        return Delivery::Drop(Stat::DropNotConfigured);
    };
    let Ok(ether_type) = ctx.read::<2>(ETH_LEN - 2) else {
        return Delivery::Pass;
    };
    if u16::from_be_bytes(ether_type) != 0x0800 {
        return Delivery::Pass;
    }
    let (Ok(saddr), Ok(daddr)) = (ctx.read::<4>(IP_SRC_OFF), ctx.read::<4>(IP_DST_OFF)) else {
        return Delivery::Drop(Stat::DropMalformed);
    };
    // The inner source must lie in the node CIDR of the node the packet
    // came from: no node can speak for another's containers.
    let Some(p) = peer(saddr) else {
        return Delivery::Drop(Stat::DropOverlaySpoofed);
    };
    let underlay = p.underlay;
    // SAFETY: a zeroed key is valid output space.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `key` is a local of the size passed.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    // SAFETY: the helper wrote an IPv4 remote (or nothing: zero).
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 };
    if rc != 0 || remote != u32::from_be_bytes(underlay) {
        return Delivery::Drop(Stat::DropOverlaySpoofed);
    }
    if !cfg.in_pool(daddr) {
        return Delivery::Pass;
    }
    // SAFETY: endpoint values are replaced whole by the agent.
    let Some(ep) = (unsafe { ENDPOINTS.get(EndpointKey { addr: daddr }) }) else {
        return Delivery::Pass;
    };
    let (mac, host_mac, ifindex) = (ep.mac, ep.host_mac, ep.ifindex);
    if ctx.store(0, &mac).is_err() || ctx.store(6, &host_mac).is_err() {
        return Delivery::Drop(Stat::DropHelperFailed);
    }
    maps::count(Stat::OverlayDelivered);
    Delivery::ToContainer { ifindex }
}
