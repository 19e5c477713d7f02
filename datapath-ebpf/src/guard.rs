//! Checks made from the IP header alone, before any protocol parsing, so
//! that no protocol, fragment or header chain the parser does not know can
//! slip past them (rules in `datapath_common::policy`).
//!
//! * Uplink: martian and spoofed sources are dropped (the programs redirect
//!   past the kernel's own checks), and so is everything addressed to a
//!   container address unless direct routing is allowed. A source claiming
//!   one of the node's addresses costs a map lookup, so that check
//!   ([`uplink_node_source`]) is made where a packet could start something
//!   (a new flow, an ICMP error, anything the parser does not translate),
//!   not for packets of established flows: their tuple matched a flow whose
//!   creation was checked, and an established packet costs one lookup.
//! * Container: router advertisements, redirects and unsolicited neighbour
//!   advertisements of another address are dropped.

use datapath_common::{
    CONFIG_F_ALLOW_DIRECT_ROUTING, Config, NodeAddrKey, Stat,
    policy::{
        ICMP_REDIRECT, IPV6_FRAGMENT, IPV6_ICMP, IPV6_MAX_EXTENSIONS, NeighbourRule, is_link_local,
        martian_source, neighbour_advertisement_allowed,
    },
};

use crate::{
    ctx::Packet,
    maps::NODE_ADDRS,
    parse::{ETH_LEN, FrameLen},
};

/// EtherType of IPv4.
const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
const ETH_P_IPV6: u16 = 0x86dd;
/// Length of the IPv4 header without options.
const IPV4_HDR_LEN: usize = 20;
/// Length of an ICMP header.
const ICMP_HDR_LEN: usize = 8;
/// Length of the IPv6 header.
const IPV6_HDR_LEN: usize = 40;
/// Bytes of a neighbour advertisement up to the end of its target address.
const NA_LEN: usize = 24;

/// The frame's EtherType (untagged frames only: tagged ones go to a VLAN
/// device, never to these programs' redirects).
#[inline(always)]
fn ether_type<C: Packet>(ctx: &C) -> Option<u16> {
    ctx.read::<2>(ETH_LEN - 2).ok().map(u16::from_be_bytes)
}

/// Whether `addr` is one of the node's own addresses (uplink or gateway).
#[inline(always)]
fn node_address(cfg: &Config, addr: [u8; 4]) -> bool {
    // SAFETY: node address values are replaced whole by the agent.
    addr == cfg.gateway_addr || unsafe { NODE_ADDRS.get(NodeAddrKey { addr }) }.is_some()
}

/// The fixed part of the IPv4 header, if the header is one the parser
/// accepts (version 4, a length of at least 20 bytes, a total length that
/// covers it and lies inside the frame); a header it does not accept is
/// left to it, to be dropped as malformed.
#[inline(always)]
fn ipv4_header<C: Packet + FrameLen>(ctx: &C) -> Option<[u8; IPV4_HDR_LEN]> {
    ctx.pull(ETH_LEN + IPV4_HDR_LEN).ok()?;
    let h = ctx.read::<IPV4_HDR_LEN>(ETH_LEN).ok()?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let valid = h[0] >> 4 == 4
        && ihl >= IPV4_HDR_LEN
        && tot_len >= ihl
        && ETH_LEN + tot_len <= ctx.frame_len();
    valid.then_some(h)
}

/// The drop reason for an IPv4 packet arriving on the uplink, if it must
/// not go further: a martian source ([`martian_source`]), a source only
/// the containers or the node's gateway hold (the pool, the gateway
/// address), or a container address as destination without direct
/// routing. A packet too short for an IP header is left to the parser.
/// The node's other addresses as source are [`uplink_node_source`]'s.
#[inline(always)]
pub fn uplink<C: Packet + FrameLen>(ctx: &C, cfg: &Config) -> Option<Stat> {
    if ether_type(ctx)? != ETH_P_IP {
        return None;
    }
    let h = ipv4_header(ctx)?;
    let saddr = [h[12], h[13], h[14], h[15]];
    let daddr = [h[16], h[17], h[18], h[19]];
    if martian_source(saddr, daddr, is_link_local(cfg.node_addr)) {
        return Some(Stat::DropMartian);
    }
    if cfg.in_pool(saddr) || saddr == cfg.gateway_addr {
        return Some(Stat::DropUplinkSpoofed);
    }
    if cfg.flags & CONFIG_F_ALLOW_DIRECT_ROUTING == 0
        && cfg.in_pool(daddr)
        && !node_address(cfg, daddr)
    {
        return Some(Stat::DropDirectRouting);
    }
    None
}

/// Whether an IPv4 packet arriving on the uplink, with a header [`uplink`]
/// checked, claims one of the node's own addresses as its source
/// ([`Stat::DropUplinkSpoofed`]). Asked on every path but the one of a
/// packet matching an established flow (see the module documentation).
#[inline(always)]
pub fn uplink_node_source<C: Packet + FrameLen>(ctx: &C) -> bool {
    if ether_type(ctx) != Some(ETH_P_IP) {
        return false;
    }
    let Some(h) = ipv4_header(ctx) else {
        return false;
    };
    let saddr = [h[12], h[13], h[14], h[15]];
    // SAFETY: node address values are replaced whole by the agent.
    unsafe { NODE_ADDRS.get(NodeAddrKey { addr: saddr }) }.is_some()
}

/// The drop reason for a frame a container sends, if it must not go
/// further: an ICMP redirect, or an ICMPv6 router advertisement, redirect
/// or neighbour advertisement it may not send.
#[inline(always)]
pub fn container<C: Packet + FrameLen>(ctx: &C) -> Option<Stat> {
    // The whole Ethernet header, copied before any pull moves the data.
    let eth = ctx.read::<ETH_LEN>(0).ok()?;
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => container_v4(ctx),
        ETH_P_IPV6 => {
            let mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
            container_v6(ctx, mac)
        }
        _ => None,
    }
}

/// An ICMP redirect (first fragment or whole, its ICMP header inside the
/// packet) from a container.
#[inline(always)]
fn container_v4<C: Packet + FrameLen>(ctx: &C) -> Option<Stat> {
    let h = ipv4_header(ctx)?;
    let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[9] != 1 || frag_offset != 0 || tot_len < ihl + ICMP_HDR_LEN {
        return None;
    }
    // Two bytes read where one would do: a one-byte read at a variable
    // offset compiles to a bounds check the verifier learns no range from.
    ctx.pull(ETH_LEN + ihl + 2).ok()?;
    let [icmp_type, _] = ctx.read::<2>(ETH_LEN + ihl).ok()?;
    (icmp_type == ICMP_REDIRECT).then_some(Stat::DropRedirect)
}

/// Neighbour discovery a container may not send: walks past up to
/// [`IPV6_MAX_EXTENSIONS`] extension headers (hop-by-hop, routing,
/// destination options, the fragment header of a first fragment) to the
/// upper-layer header; a longer chain is dropped as malformed. A later
/// fragment carries no upper-layer header and is passed (without its
/// first fragment it is never reassembled).
#[inline(always)]
fn container_v6<C: Packet>(ctx: &C, mac: [u8; 6]) -> Option<Stat> {
    ctx.pull(ETH_LEN + IPV6_HDR_LEN).ok()?;
    let [mut next, _] = ctx.read::<2>(ETH_LEN + 6).ok()?;
    let mut off = ETH_LEN + IPV6_HDR_LEN;
    for _ in 0..IPV6_MAX_EXTENSIONS {
        match next {
            IPV6_ICMP => return icmpv6(ctx, off, mac),
            IPV6_FRAGMENT => {
                ctx.pull(off + 8).ok()?;
                let h = ctx.read::<4>(off).ok()?;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = h[0];
                off += 8;
            }
            0 | 43 | 60 => {
                ctx.pull(off + 8).ok()?;
                let h = ctx.read::<2>(off).ok()?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            _ => return None,
        }
    }
    match next {
        IPV6_ICMP => icmpv6(ctx, off, mac),
        0 | 43 | 60 | IPV6_FRAGMENT => Some(Stat::DropMalformed),
        _ => None,
    }
}

/// The rule for the ICMPv6 message at `off` of a frame from `mac`.
#[inline(always)]
fn icmpv6<C: Packet>(ctx: &C, off: usize, mac: [u8; 6]) -> Option<Stat> {
    ctx.pull(off + 2).ok()?;
    let [icmp_type, _] = ctx.read::<2>(off).ok()?;
    match NeighbourRule::of(icmp_type) {
        NeighbourRule::Pass => None,
        NeighbourRule::RouterAdvertisement => Some(Stat::DropRouterAdvertisement),
        NeighbourRule::Redirect => Some(Stat::DropRedirect),
        NeighbourRule::NeighbourAdvertisement => {
            // Too short to name a target: the kernel would discard it too.
            if ctx.pull(off + NA_LEN).is_err() {
                return Some(Stat::DropMalformed);
            }
            // Read one after the other, each checked before the next: the
            // compiler must not compare values of reads that failed.
            let Ok([flags, ..]) = ctx.read::<4>(off + 4) else {
                return Some(Stat::DropMalformed);
            };
            let Ok(target) = ctx.read::<16>(off + 8) else {
                return Some(Stat::DropMalformed);
            };
            (!neighbour_advertisement_allowed(flags, target, mac))
                .then_some(Stat::DropNeighbourAdvertisement)
        }
    }
}
