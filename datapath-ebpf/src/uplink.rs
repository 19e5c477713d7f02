//! Uplink ingress, shared by the XDP and the TC program: DNAT of published
//! ports and reverse SNAT of masqueraded flows' replies.

use datapath_common::{
    CONFIG_F_ALLOW_DIRECT_ROUTING, CONFIG_F_FIB, Config, CtKey, EndpointKey, Stat, ct_action,
    monitor::event_kind,
};

use crate::{
    conntrack::{self, NewFlow, V4},
    ctx::Packet,
    guard, icmp, maps, nat,
    parse::{self, Flow, FrameLen, Kind, L4, frag},
    route::{Fib, Node},
};

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
    /// Hand the packet to the kernel untouched.
    Pass,
    /// Drop it, counting `Stat`.
    Drop(Stat),
    /// Translated: deliver it to the container behind host-side veth
    /// `ifindex`, whose address is `addr`.
    ToContainer { ifindex: u32, addr: [u8; 4] },
}

/// How each uplink hook translates ICMP errors (see [`icmp::translate_tc`]).
pub trait TranslateIcmp {
    /// [`icmp::translate`] of an error arriving on the uplink.
    fn translate_icmp(&mut self, flow: &Flow, out: &mut icmp::Forward) -> u32;
}

impl TranslateIcmp for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn translate_icmp(&mut self, flow: &Flow, out: &mut icmp::Forward) -> u32 {
        icmp::translate_tc(self, flow, false, out)
    }
}

impl TranslateIcmp for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn translate_icmp(&mut self, flow: &Flow, out: &mut icmp::Forward) -> u32 {
        icmp::translate(self, flow, false, out)
    }
}

/// Translates one uplink packet.
#[inline(always)]
pub fn process<C: Packet + FrameLen + Node + TranslateIcmp>(ctx: &mut C, hook: u8) -> Verdict {
    // The packet's run starts first, so that a drop below is counted as
    // this packet's, never as the last one's. (The per-CPU scratch always
    // exists.)
    let Some(sc) = maps::scratch() else {
        return Verdict::Pass;
    };
    maps::begin(sc, hook);
    let Some(cfg) = maps::config() else {
        return Verdict::Pass;
    };
    if let Some(stat) = guard::uplink(ctx, cfg) {
        return Verdict::Drop(stat);
    }
    let flow = &mut sc.flow;
    let req = &mut sc.req;
    let kind = parse::parse(ctx, flow);
    match kind {
        Kind::NotOurs => return Verdict::Pass,
        Kind::Malformed => return Verdict::Drop(Stat::DropMalformed),
        Kind::Flow => {}
    }
    let now = conntrack::now();
    // A later fragment of a datagram whose first fragment was not
    // translated here is the node's own (or came first): the node's stack
    // reassembles it or times it out.
    if flow.frag == frag::LATER && !conntrack::frag_ports(flow, now) {
        return Verdict::Pass;
    }
    // Forwarding decrements the TTL: a packet that would leave with zero is
    // dropped before it can create a flow.
    let expiring = flow.ttl <= 1;
    if flow.l4 == L4::IcmpError {
        let mut fwd = icmp::Forward::default();
        return match ctx.translate_icmp(flow, &mut fwd) {
            icmp::NOT_OURS => Verdict::Pass,
            icmp::FORWARD => Verdict::ToContainer {
                ifindex: fwd.ifindex,
                addr: fwd.addr,
            },
            v => Verdict::Drop(Stat::from_index(v - icmp::DROP)),
        };
    }
    let hit = match conntrack::lookup::<V4>(&flow.key, flow.tcp_flags, &cfg.timeouts, now) {
        Some(hit) => hit,
        None => {
            let r = new_flow(ctx, cfg, flow, req, expiring);
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
    let (action, addr, port, ifindex, container) = unsafe {
        let e = hit.entry;
        (
            (*e).action,
            (*e).nat_addr,
            (*e).nat_port,
            (*e).ifindex,
            (*e).container_id,
        )
    };
    sc.container = container;
    if action == ct_action::ROUTED {
        conntrack::update::<V4>(hit, &flow.key, flow, now);
        maps::account(container, true, ctx.frame_len() as u64, 1);
        return Verdict::Pass;
    }
    // Replies arriving on the uplink are only ever REV_SNAT; an entry of
    // another kind matching here would be an outbound tuple seen inbound.
    if action != ct_action::DNAT && action != ct_action::REV_SNAT {
        return Verdict::Pass;
    }
    if expiring {
        return Verdict::Drop(Stat::DropTtlExceeded);
    }
    conntrack::update::<V4>(hit, &flow.key, flow, now);
    if flow.frag == frag::FIRST {
        conntrack::frag_record(flow, now);
    }
    if nat::rewrite(ctx, flow, false, addr, port).is_err() || nat::decrement_ttl(ctx).is_err() {
        return Verdict::Drop(Stat::DropHelperFailed);
    }
    if flow.frag == frag::LATER {
        maps::count(Stat::FragmentTranslated);
    }
    maps::count(if action == ct_action::DNAT {
        Stat::DnatPackets
    } else {
        Stat::SnatPackets
    });
    maps::account(container, true, ctx.frame_len() as u64, ctx.segments());
    Verdict::ToContainer { ifindex, addr }
}

/// The first packet of a flow from the uplink: to a published port (DNAT),
/// or straight to a container address (routed, if allowed).
#[inline(always)]
fn new_flow<C: Packet + Node>(
    ctx: &C,
    cfg: &Config,
    flow: &Flow,
    req: &mut NewFlow<[u8; 4]>,
    expiring: bool,
) -> u32 {
    if flow.frag == frag::LATER {
        // Its flow ended since its first fragment passed.
        return PASS;
    }
    let may_create = conntrack::may_create(flow.key.proto, flow.tcp_flags);
    *req = NewFlow {
        nat_addr: [0; 4],
        nat_port: 0,
        action: ct_action::DNAT,
        tcp_flags: flow.tcp_flags,
        orig_ifindex: 0,
        reply_ifindex: cfg.uplink_ifindex,
        container_id: 0,
        orig_mtu: 0,
        reply_mtu: 0,
    };
    if let Some(svc) = maps::service(flow.key.daddr, flow.key.dport, flow.key.proto, false) {
        if expiring {
            return DROP + Stat::DropTtlExceeded as u32;
        }
        // A segment that cannot open a connection (RST, FIN, SYN-ACK) goes
        // to the node, which answers for the port it does not serve.
        if !may_create {
            return PASS;
        }
        if ctx.node_connection(&flow.key) {
            maps::count(Stat::NodeFlowPassed);
            return PASS;
        }
        req.nat_addr = svc.backend_addr;
        req.nat_port = svc.backend_port;
        req.orig_ifindex = svc.ifindex;
        req.container_id = svc.container_id;
        if cfg.flags & CONFIG_F_FIB != 0 {
            // Replies follow the node's routes back to the client.
            let back = CtKey {
                saddr: req.nat_addr,
                daddr: flow.key.saddr,
                sport: svc.backend_port,
                dport: flow.key.sport,
                proto: flow.key.proto,
                _pad: [0; 3],
            };
            let r = ctx.route(&back, svc.ifindex);
            if matches!(r.fib, Fib::Forward | Fib::TooBig) {
                req.reply_ifindex = r.ifindex;
                req.reply_mtu = r.mtu;
            }
        }
        let r = conntrack::create::<V4>(&flow.key, req);
        if r == CREATED {
            maps::count(Stat::DnatNew);
            maps::flow_event(event_kind::FLOW_NEW, &flow.key, req.container_id);
            return CREATED;
        }
        return DROP + r;
    }
    let daddr = flow.key.daddr;
    if !cfg.in_pool(daddr) {
        return PASS;
    }
    // SAFETY: endpoint values are replaced whole by the agent.
    let Some(ep) = (unsafe { maps::ENDPOINTS.get(EndpointKey { addr: daddr }) }) else {
        return PASS;
    };
    if cfg.flags & CONFIG_F_ALLOW_DIRECT_ROUTING == 0 {
        return DROP + Stat::DropDirectRouting as u32;
    }
    if !may_create {
        return PASS;
    }
    // Routed unchanged, but tracked: the container's replies must be
    // recognised, not masqueraded.
    req.action = ct_action::ROUTED;
    req.orig_ifindex = ep.ifindex;
    req.container_id = ep.container_id;
    match conntrack::create::<V4>(&flow.key, req) {
        CREATED => CREATED,
        r => DROP + r,
    }
}
