//! Ingress of a container's host-side veth (TC): anti-spoofing, reverse DNAT
//! of replies, masquerade of new flows to the outside, and hairpin: a
//! container connecting to a port published on the node's addresses
//! reaches the container behind it (itself included) directly, both
//! directions translated here and delivered with `bpf_redirect_peer`.
//!
//! Where a new flow goes is the node's FIB's decision (`bpf_fib_lookup`):
//! destinations the node handles itself (its own addresses on any
//! interface, broadcast, multicast, unreachable ones) and destinations
//! routed through an interface other than the uplink are passed to the
//! node's stack untouched, as the kernel would route them; only what leaves
//! through the uplink is masqueraded, with the egress device's MTU recorded
//! in the flow. A packet too big for that MTU is passed to the node's stack
//! when it has DF set (the stack answers "fragmentation needed", so path MTU
//! discovery works), and dropped and counted without DF (the stack would
//! fragment it and send it with the container's pool address).

use aya_ebpf::programs::TcContext;
use datapath_common::{
    CONFIG_F_FIB, CONFIG_F_SNAT, Config, CtKey, Endpoint, EndpointKey, NodeAddrKey, Stat,
    ct_action,
    monitor::{event_kind, hook},
};

use crate::{
    conntrack::{self, NewFlow, V4},
    ctx::Packet,
    guard, icmp,
    maps::{self, ENDPOINTS, NODE_ADDRS},
    nat, overlay,
    parse::{self, ETH_LEN, Flow, FrameLen, IP_SRC_OFF, Kind, L4, frag},
    route::{Fib, Node},
};

/// Whose source a frame from a container carries.
enum Source {
    /// Not IPv4: the node routes nothing else for containers.
    NotIpv4,
    /// An address or MAC that is not the container's behind this veth.
    Spoofed,
    /// The container's own.
    Own(&'static Endpoint),
}

/// Checks the source address and MAC of an IPv4 frame against the
/// container behind host-side veth `ifindex`.
#[inline(always)]
fn source_endpoint(ctx: &TcContext, ifindex: u32) -> Source {
    let Ok(ether_type) = ctx.read::<2>(ETH_LEN - 2) else {
        return Source::NotIpv4;
    };
    if u16::from_be_bytes(ether_type) != 0x0800 {
        return Source::NotIpv4;
    }
    let (Ok(saddr), Ok(src_mac)) = (ctx.read::<4>(IP_SRC_OFF), ctx.read::<6>(6)) else {
        return Source::Spoofed;
    };
    // SAFETY: endpoint values are replaced whole by the agent.
    match unsafe { ENDPOINTS.get(EndpointKey { addr: saddr }) } {
        Some(ep) if ep.ifindex == ifindex && ep.mac == src_mac => Source::Own(ep),
        _ => Source::Spoofed,
    }
}

/// [`new_flow`]: the flow was created.
const CREATED: u32 = 0;
/// [`new_flow`]: no flow; pass the packet.
const PASS: u32 = 1;
/// [`new_flow`]: no flow; drop the packet, counting `Stat::from_index(r - DROP)`.
const DROP: u32 = 2;

/// The verdict for a packet [`new_flow`] made no flow for.
#[inline(always)]
fn refused(r: u32) -> Verdict {
    if r == PASS {
        Verdict::Pass
    } else {
        Verdict::Drop(Stat::from_index(r - DROP))
    }
}

/// What the hook must do with the packet.
pub enum Verdict {
    /// Hand the packet to the kernel (container to container, to the node).
    Pass,
    /// Drop it, counting `Stat`.
    Drop(Stat),
    /// Translated: send it out of interface `ifindex` (the uplink),
    /// resolving the next hop's MAC.
    ToUplink { ifindex: u32 },
    /// For a container on another node: its tunnel key is set; send it to
    /// the overlay device `ifindex`.
    ToOverlay { ifindex: u32 },
    /// Translated (hairpin): deliver it to the container behind host-side
    /// veth `ifindex`.
    ToContainer { ifindex: u32 },
}

/// Translates one packet sent by a container.
#[inline(always)]
pub fn process(ctx: &mut TcContext) -> Verdict {
    // The packet's run starts first, so that a drop below is counted as
    // this packet's (its hook; its container, found by its veth), never
    // as the last one's. (The per-CPU scratch always exists.)
    let Some(sc) = maps::scratch() else {
        return Verdict::Drop(Stat::DropHelperFailed);
    };
    maps::begin(sc, hook::CONTAINER_TC);
    // Not configured yet: nothing can be checked, so nothing goes through.
    let Some(cfg) = maps::config() else {
        return Verdict::Drop(Stat::DropNotConfigured);
    };
    if let Some(stat) = guard::container(ctx) {
        return Verdict::Drop(stat);
    }
    let flow = &mut sc.flow;
    let req = &mut sc.req;
    let kind = parse::parse(ctx, flow);
    if kind == Kind::Malformed {
        return Verdict::Drop(Stat::DropMalformed);
    }
    // SAFETY: `skb` is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // A container may only send from its own address and MAC: every IPv4
    // packet, whatever its protocol, fragments included (the node would
    // route what is passed).
    let ep = match source_endpoint(ctx, ifindex) {
        Source::NotIpv4 => return Verdict::Pass,
        Source::Spoofed => return Verdict::Drop(Stat::DropSpoofed),
        Source::Own(ep) => ep,
    };
    sc.container = ep.container_id;
    maps::account(
        ep.container_id,
        false,
        ctx.frame_len() as u64,
        ctx.segments(),
    );
    // The rest of the cluster: every IPv4 packet, whatever its kind, goes
    // through the overlay untranslated.
    match overlay::from_container(ctx, cfg) {
        overlay::ToPeer::NotOverlay => {}
        overlay::ToPeer::Pass => return Verdict::Pass,
        overlay::ToPeer::Drop(stat) => return Verdict::Drop(stat),
        overlay::ToPeer::Redirect { ifindex } => return Verdict::ToOverlay { ifindex },
    }
    if kind != Kind::Flow {
        return Verdict::Pass;
    }
    let now = conntrack::now();
    if flow.frag == frag::LATER && !conntrack::frag_ports(flow, now) {
        // Its first fragment was not seen: without ports there is no flow
        // to translate it by, and it must not leave with the pool address.
        return if masqueraded(ctx, cfg, ifindex, &flow.key) {
            Verdict::Drop(Stat::DropFragment)
        } else {
            Verdict::Pass
        };
    }
    // Forwarding decrements the TTL: a packet that would leave with zero is
    // not forwarded (nor does it create a flow); see `ttl_expired`.
    let expiring = flow.ttl <= 1;
    if flow.l4 == L4::IcmpError {
        let mut fwd = icmp::Forward::default();
        return match icmp::translate_tc(ctx, flow, true, &mut fwd) {
            icmp::NOT_OURS => Verdict::Pass,
            icmp::FORWARD => Verdict::ToUplink {
                ifindex: fwd.ifindex,
            },
            v => Verdict::Drop(Stat::from_index(v - icmp::DROP)),
        };
    }
    let hit = match conntrack::lookup::<V4>(&flow.key, flow.tcp_flags, &cfg.timeouts, now) {
        Some(hit) => hit,
        None => {
            let r = new_flow(ctx, cfg, ep, ifindex, flow, req, expiring);
            if r != CREATED {
                return refused(r);
            }
            match conntrack::lookup_created::<V4>(&flow.key) {
                Some(hit) => hit,
                None => return Verdict::Drop(Stat::DropCtFull),
            }
        }
    };
    // SAFETY: points into a live conntrack value (RCU); the fields the
    // translation needs are read once.
    let (action, addr, port, out, mtu, owner) = unsafe {
        let e = hit.entry;
        (
            (*e).action,
            (*e).nat_addr,
            (*e).nat_port,
            (*e).ifindex,
            (*e).mtu,
            (*e).container_id,
        )
    };
    if action == ct_action::ROUTED {
        // A reply to a flow routed to the container unchanged.
        conntrack::update::<V4>(hit, &flow.key, flow, now);
        return Verdict::Pass;
    }
    // Hairpin flows (a container to a published port of the node) are
    // translated here in both directions; replies of DNAT flows and
    // masqueraded flows too.
    let hairpin = matches!(
        action,
        ct_action::DNAT | ct_action::HAIRPIN | ct_action::REV_HAIRPIN
    );
    if !hairpin && action != ct_action::REV_DNAT && action != ct_action::SNAT {
        return Verdict::Pass;
    }
    if expiring {
        return ttl_expired(ctx, ifindex);
    }
    if mtu != 0 && too_big(ctx, flow, mtu) {
        // The path may have changed since the flow was created.
        let r = ctx.route(&flow.key, ifindex);
        if cfg.flags & CONFIG_F_FIB == 0 || r.fib != Fib::Forward {
            return refused(too_big_code(flow));
        }
        // SAFETY: live map value (RCU); a plain store of a hint.
        unsafe { (*hit.entry).mtu = r.mtu };
    }
    conntrack::update::<V4>(hit, &flow.key, flow, now);
    if flow.frag == frag::FIRST {
        conntrack::frag_record(flow, now);
    }
    if rewrite(ctx, flow, action, addr, port).is_err() || nat::decrement_ttl(ctx).is_err() {
        return Verdict::Drop(Stat::DropHelperFailed);
    }
    if flow.frag == frag::LATER {
        maps::count(Stat::FragmentTranslated);
    }
    maps::count(if action == ct_action::SNAT {
        Stat::SnatPackets
    } else {
        Stat::DnatPackets
    });
    // A reply to a container (of a hairpin flow to another container's
    // published port) goes straight into that container.
    if hairpin || (action == ct_action::REV_DNAT && cfg.in_pool(flow.key.daddr)) {
        maps::account(
            receiver(action, owner, out),
            true,
            ctx.frame_len() as u64,
            ctx.segments(),
        );
        Verdict::ToContainer { ifindex: out }
    } else {
        Verdict::ToUplink { ifindex: out }
    }
}

/// The container a hairpin packet is delivered to, for its received
/// traffic. A hairpin flow's entries belong to the container behind the
/// published port (`owner`): the receiver of its packets to that port, and
/// of a hairpin to itself both ways. Only a reply to another container
/// (`REV_DNAT`) goes elsewhere: to the container behind host-side veth
/// `out`, looked up on this path only.
#[inline(always)]
fn receiver(action: u8, owner: u32, out: u32) -> u32 {
    if action != ct_action::REV_DNAT {
        return owner;
    }
    // SAFETY: plain values, replaced whole by the agent.
    unsafe { maps::CONTAINER_VETHS.get(out) }.map_or(0, |id| *id)
}

/// Rewrites a packet of a flow whose entry for this direction has `action`,
/// `addr` and `port`: the entry's side (see `ct_action::rewrites_source`)
/// and, for a hairpin to the container itself, the other address too.
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    flow: &Flow,
    action: u8,
    addr: [u8; 4],
    port: u16,
) -> Result<(), ()> {
    let source = ct_action::rewrites_source(action);
    nat::rewrite(ctx, flow, source, addr, port)?;
    match action {
        // The container sees the node address it dialed as the source.
        ct_action::HAIRPIN => nat::rewrite(ctx, flow, true, flow.key.daddr, flow.key.sport),
        // Its reply to that address goes back to itself.
        ct_action::REV_HAIRPIN => nat::rewrite(ctx, flow, false, flow.key.saddr, flow.key.dport),
        _ => Ok(()),
    }
}

/// The first packet of a flow from a container to a port published on the
/// node (hairpin): to another container, DNAT (that container sees this
/// one's address); to this container itself, DNAT and the node address it
/// dialed as the source ([`ct_action::HAIRPIN`]).
#[inline(always)]
fn hairpin(
    ctx: &TcContext,
    flow: &Flow,
    req: &mut NewFlow<[u8; 4]>,
    svc: &datapath_common::ServiceValue,
    ifindex: u32,
    expiring: bool,
) -> u32 {
    if flow.frag == frag::LATER {
        // Its flow ended since its first fragment passed.
        return PASS;
    }
    if expiring {
        maps::dropped(Stat::DropTtlExceeded, ifindex, ctx.len());
        return PASS;
    }
    // A segment that cannot open a connection goes to the node, which
    // answers for the port it does not serve.
    if !conntrack::may_create(flow.key.proto, flow.tcp_flags) {
        return PASS;
    }
    *req = NewFlow {
        nat_addr: svc.backend_addr,
        nat_port: svc.backend_port,
        action: if svc.backend_addr == flow.key.saddr {
            ct_action::HAIRPIN
        } else {
            ct_action::DNAT
        },
        tcp_flags: flow.tcp_flags,
        orig_ifindex: svc.ifindex,
        reply_ifindex: ifindex,
        container_id: svc.container_id,
        orig_mtu: 0,
        reply_mtu: 0,
    };
    match conntrack::create::<V4>(&flow.key, req) {
        CREATED => {
            maps::count(Stat::HairpinNew);
            maps::flow_event(event_kind::FLOW_NEW, &flow.key, svc.container_id);
            CREATED
        }
        r => DROP + r,
    }
}

/// The first packet of a flow from a container: masqueraded if it leaves
/// through the uplink, else left to the node's stack.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    cfg: &Config,
    ep: &Endpoint,
    ifindex: u32,
    flow: &Flow,
    req: &mut NewFlow<[u8; 4]>,
    expiring: bool,
) -> u32 {
    if let Some(svc) = maps::service(flow.key.daddr, flow.key.dport, flow.key.proto, false) {
        return hairpin(ctx, flow, req, svc, ifindex, expiring);
    }
    if cfg.flags & CONFIG_F_SNAT == 0 {
        return PASS;
    }
    let dst = flow.key.daddr;
    if cfg.in_pool(dst) || dst == cfg.gateway_addr || maps::non_masquerade(dst) {
        return PASS;
    }
    *req = NewFlow {
        nat_addr: cfg.node_addr,
        nat_port: 0,
        action: ct_action::SNAT,
        tcp_flags: flow.tcp_flags,
        orig_ifindex: cfg.uplink_ifindex,
        reply_ifindex: ifindex,
        container_id: ep.container_id,
        orig_mtu: 0,
        reply_mtu: 0,
    };
    if cfg.flags & CONFIG_F_FIB != 0 {
        let r = ctx.route(&flow.key, ifindex);
        match r.fib {
            Fib::Forward | Fib::TooBig if r.ifindex == cfg.uplink_ifindex => {}
            _ => return PASS,
        }
        if r.fib == Fib::TooBig {
            return too_big_code(flow);
        }
        req.orig_mtu = r.mtu;
    } else if unsafe { NODE_ADDRS.get(NodeAddrKey { addr: dst }) }.is_some() {
        return PASS;
    }
    if expiring {
        maps::dropped(Stat::DropTtlExceeded, ifindex, ctx.len());
        return PASS;
    }
    // A later fragment whose flow ended since its first fragment, or a TCP
    // segment that cannot open a connection (RST, FIN, SYN-ACK): nothing to
    // translate it by, and it must not leave with the pool address.
    if flow.frag == frag::LATER || !conntrack::may_create(flow.key.proto, flow.tcp_flags) {
        return DROP + Stat::DropNoFlow as u32;
    }
    match conntrack::create::<V4>(&flow.key, req) {
        CREATED => {
            maps::count(Stat::SnatNew);
            maps::flow_event(event_kind::FLOW_NEW, &flow.key, ep.container_id);
            CREATED
        }
        r => DROP + r,
    }
}

/// Whether a packet with tuple `key` from a container would leave through
/// the uplink, masqueraded.
#[inline(always)]
fn masqueraded(ctx: &TcContext, cfg: &Config, ifindex: u32, key: &CtKey) -> bool {
    let dst = key.daddr;
    if cfg.flags & CONFIG_F_SNAT == 0
        || cfg.in_pool(dst)
        || dst == cfg.gateway_addr
        || maps::non_masquerade(dst)
    {
        return false;
    }
    if cfg.flags & CONFIG_F_FIB == 0 {
        return unsafe { NODE_ADDRS.get(NodeAddrKey { addr: dst }) }.is_none();
    }
    let r = ctx.route(key, ifindex);
    matches!(r.fib, Fib::Forward | Fib::TooBig) && r.ifindex == cfg.uplink_ifindex
}

/// Whether `flow`'s packet (a GSO packet: each of its segments) exceeds `mtu`.
#[inline(always)]
fn too_big(ctx: &TcContext, flow: &Flow, mtu: u16) -> bool {
    // SAFETY: `skb` is the program's context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let len = if gso_size != 0 {
        gso_size + flow.hdr_len
    } else {
        u32::from(flow.ip_len)
    };
    len > u32::from(mtu)
}

/// A packet too big for its path: with DF, the node's stack answers
/// "fragmentation needed" (and drops it); without, it would fragment it
/// and send it with the pool address, so it is dropped here.
#[inline(always)]
fn too_big_code(flow: &Flow) -> u32 {
    if flow.dont_fragment {
        maps::count(Stat::TooBig);
        PASS
    } else {
        DROP + Stat::DropNoFlow as u32
    }
}

/// A packet whose TTL expires here goes to the node's stack, which answers
/// time exceeded from the gateway address and drops it, as a router does
/// (traceroute's first hop). Counted, since the datapath does not forward it.
#[inline(always)]
fn ttl_expired(ctx: &TcContext, ifindex: u32) -> Verdict {
    maps::dropped(Stat::DropTtlExceeded, ifindex, ctx.len());
    Verdict::Pass
}
