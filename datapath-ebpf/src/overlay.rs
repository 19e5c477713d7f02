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
//! * [`to_overlay`] (in `overlay_egress_tc`, the VXLAN device's egress):
//!   the node's own packets for another node's containers (the agent routes
//!   the cluster CIDR to the device, from the node's gateway address) get
//!   their tunnel key there.
//!
//! The node that forwards a packet into the overlay decrements its TTL
//! once: the cluster network is one routed hop.

use aya_ebpf::{
    bindings::bpf_tunnel_key,
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_skb_change_type, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use datapath_common::{Config, EndpointKey, Peer, Stat, monitor::hook};

use crate::{
    ctx::Packet,
    maps::{self, ENDPOINTS, PEERS},
    nat,
    parse::{ETH_LEN, FrameLen, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF},
};

/// `skb->pkt_type` of a packet for this host.
const PACKET_HOST: u32 = 0;

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
        // Left to the node's stack, which answers time exceeded: counted
        // as the container's, like any packet whose TTL expires here.
        // SAFETY: `skb` is the program's context.
        let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
        maps::dropped(Stat::DropTtlExceeded, ifindex, ctx.len());
        return ToPeer::Pass;
    }
    if nat::decrement_ttl(ctx).is_err() {
        return ToPeer::Drop(Stat::DropHelperFailed);
    }
    if set_tunnel_key(ctx, underlay, vni).is_err() {
        return ToPeer::Drop(Stat::DropHelperFailed);
    }
    maps::count(Stat::OverlayEncapsulated);
    ToPeer::Redirect {
        ifindex: cfg.overlay_ifindex,
    }
}

/// Gives the packet the tunnel key that sends it to the node at underlay
/// address `underlay` with VNI `vni`.
#[inline(always)]
fn set_tunnel_key(ctx: &TcContext, underlay: [u8; 4], vni: u32) -> Result<(), ()> {
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
    if rc == 0 { Ok(()) } else { Err(()) }
}

/// The tunnel key the packet carries (on ingress, the one it came with;
/// on egress, the one a program gave it), if any.
#[inline(always)]
fn tunnel_key(ctx: &TcContext) -> Option<bpf_tunnel_key> {
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
    (rc == 0).then_some(key)
}

/// What `overlay_egress_tc` must do with a packet leaving through the
/// overlay device.
pub enum Egress {
    /// Let the device encapsulate it.
    Pass,
    /// Drop it, counting `Stat` if there is one.
    Drop(Option<Stat>),
}

/// A packet leaving through the overlay device (its egress): one
/// `container_tc` redirected already carries its tunnel key and passes;
/// one the node's stack routed there (the node itself talking to a
/// container on another node, from the gateway address the agent's route
/// gives as source) gets the key of the node owning its destination.
#[inline(always)]
pub fn to_overlay(ctx: &mut TcContext) -> Egress {
    // The packet's run starts first, so that a drop is never counted as
    // the last packet's. (The per-CPU scratch always exists.)
    let Some(sc) = maps::scratch() else {
        return Egress::Pass;
    };
    maps::begin(sc, hook::OVERLAY_EGRESS_TC);
    if tunnel_key(ctx).is_some() {
        return Egress::Pass;
    }
    let Ok(ether_type) = ctx.read::<2>(ETH_LEN - 2) else {
        return Egress::Drop(None);
    };
    if u16::from_be_bytes(ether_type) != 0x0800 {
        // The device's own IPv6 neighbour and multicast chatter: it has
        // nowhere to go.
        return Egress::Drop(None);
    }
    let Ok(daddr) = ctx.read::<4>(IP_DST_OFF) else {
        return Egress::Drop(Some(Stat::DropMalformed));
    };
    let Some(p) = peer(daddr) else {
        return Egress::Drop(Some(Stat::DropNoPeer));
    };
    let (underlay, vni) = (p.underlay, p.vni);
    if set_tunnel_key(ctx, underlay, vni).is_err() {
        return Egress::Drop(Some(Stat::DropHelperFailed));
    }
    maps::count(Stat::OverlayEncapsulated);
    Egress::Pass
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
    // As in `to_overlay`: this packet's run, no container known yet.
    let Some(sc) = maps::scratch() else {
        return Delivery::Pass;
    };
    maps::begin(sc, hook::OVERLAY_TC);
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
    // What the monitor shows of a drop below.
    sc.flow.key.saddr = saddr;
    sc.flow.key.daddr = daddr;
    // The inner source must lie in the node CIDR of the node the packet
    // came from: no node can speak for another's containers.
    let Some(p) = peer(saddr) else {
        return Delivery::Drop(Stat::DropOverlaySpoofed);
    };
    let underlay = p.underlay;
    let Some(key) = tunnel_key(ctx) else {
        return Delivery::Drop(Stat::DropOverlaySpoofed);
    };
    // SAFETY: the helper wrote an IPv4 remote.
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 };
    if remote != u32::from_be_bytes(underlay) {
        return Delivery::Drop(Stat::DropOverlaySpoofed);
    }
    // SAFETY: endpoint values are replaced whole by the agent.
    let ep = if cfg.in_pool(daddr) {
        unsafe { ENDPOINTS.get(EndpointKey { addr: daddr }) }
    } else {
        None
    };
    let Some(ep) = ep else {
        // For the node itself (its gateway address, a reply to the node):
        // the inner destination MAC is the sender's gateway MAC, not this
        // device's, so the stack would take it for another host's.
        // SAFETY: plain helper call on the program's context.
        if unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) } != 0 {
            return Delivery::Drop(Stat::DropHelperFailed);
        }
        return Delivery::Pass;
    };
    let (mac, host_mac, ifindex, container) = (ep.mac, ep.host_mac, ep.ifindex, ep.container_id);
    sc.container = container;
    if ctx.store(0, &mac).is_err() || ctx.store(6, &host_mac).is_err() {
        return Delivery::Drop(Stat::DropHelperFailed);
    }
    maps::count(Stat::OverlayDelivered);
    // Its container's received traffic, from the entry already read.
    maps::account(container, true, ctx.frame_len() as u64, ctx.segments());
    Delivery::ToContainer { ifindex }
}
