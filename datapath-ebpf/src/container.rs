//! Ingress of a container's host-side veth (TC): anti-spoofing, reverse DNAT
//! of replies, masquerade of new flows to the outside.

use aya_ebpf::programs::TcContext;
use datapath_common::{
    CONFIG_F_SNAT, CtEntry, Endpoint, EndpointKey, NodeAddrKey, Stat, ct_action,
};

use crate::{
    conntrack,
    ctx::Packet,
    guard, icmp,
    maps::{self, ENDPOINTS, NODE_ADDRS},
    nat,
    parse::{self, ETH_LEN, IP_SRC_OFF, L4, Parsed},
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

/// What the hook must do with the packet.
pub enum Verdict {
    /// Hand the packet to the kernel (container to container, to the node).
    Pass,
    /// Drop it, counting `Stat`.
    Drop(Stat),
    /// Translated: send it out of interface `ifindex` (the uplink),
    /// resolving the next hop's MAC.
    ToUplink { ifindex: u32 },
}

/// Translates one packet sent by a container.
#[inline(always)]
pub fn process(ctx: &mut TcContext) -> Verdict {
    // Not configured yet: nothing can be checked, so nothing goes through.
    let Some(cfg) = maps::config() else {
        return Verdict::Drop(Stat::DropNotConfigured);
    };
    if let Some(stat) = guard::container(ctx) {
        return Verdict::Drop(stat);
    }
    let parsed = parse::parse(ctx);
    if let Parsed::Malformed = parsed {
        return Verdict::Drop(Stat::DropMalformed);
    }
    // SAFETY: `skb` is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // A container may only send from its own address and MAC: every IPv4
    // packet, whatever its protocol, fragments included (the node would
    // route what is passed).
    let ep = match source_endpoint(ctx, ifindex) {
        Source::NotIpv4 => None,
        Source::Spoofed => return Verdict::Drop(Stat::DropSpoofed),
        Source::Own(ep) => Some(ep),
    };
    let flow = match parsed {
        Parsed::NotOurs | Parsed::Malformed => return Verdict::Pass,
        Parsed::Fragment(Some(key)) => {
            return if conntrack::lookup(&key).is_some() {
                Verdict::Drop(Stat::DropFragment)
            } else {
                Verdict::Pass
            };
        }
        Parsed::Fragment(None) => return Verdict::Pass,
        Parsed::Flow(flow) => flow,
    };
    let Some(ep) = ep else {
        return Verdict::Pass;
    };
    // Forwarding decrements the TTL: a packet that would leave with zero is
    // not forwarded (nor does it create a flow); see `ttl_expired`.
    let expiring = flow.ttl <= 1;
    if flow.l4 == L4::IcmpError {
        return match icmp::translate(ctx, &flow, true, [ct_action::REV_DNAT, ct_action::SNAT]) {
            icmp::Outcome::NotOurs => Verdict::Pass,
            icmp::Outcome::Drop(stat) => Verdict::Drop(stat),
            icmp::Outcome::Forward(ct) => Verdict::ToUplink {
                ifindex: ct.ifindex,
            },
        };
    }

    let entry: *mut CtEntry = match conntrack::lookup(&flow.key) {
        Some(_) if expiring => return ttl_expired(),
        Some(e) => e,
        None => {
            let dst = flow.key.daddr;
            if cfg.flags & CONFIG_F_SNAT == 0
                || cfg.in_pool(dst)
                || dst == cfg.gateway_addr
                || unsafe { NODE_ADDRS.get(NodeAddrKey { addr: dst }) }.is_some()
            {
                return Verdict::Pass;
            }
            if expiring {
                return ttl_expired();
            }
            match conntrack::create_snat(&flow.key, cfg, ifindex, ep.container_id) {
                Ok(e) => {
                    maps::count(Stat::SnatNew);
                    e
                }
                Err(stat) => return Verdict::Drop(stat),
            }
        }
    };
    // SAFETY: points into a live conntrack value (RCU); copied out once.
    let ct = unsafe { *entry };
    if ct.action == ct_action::ROUTED {
        // A reply to a flow routed to the container unchanged.
        conntrack::touch(entry, &flow);
        return Verdict::Pass;
    }
    if ct.action != ct_action::REV_DNAT && ct.action != ct_action::SNAT {
        return Verdict::Pass;
    }
    conntrack::touch(entry, &flow);
    if nat::rewrite(ctx, &flow, true, ct.nat_addr, ct.nat_port).is_err()
        || nat::decrement_ttl(ctx).is_err()
    {
        return Verdict::Drop(Stat::DropHelperFailed);
    }
    maps::count(if ct.action == ct_action::REV_DNAT {
        Stat::DnatPackets
    } else {
        Stat::SnatPackets
    });
    Verdict::ToUplink {
        ifindex: ct.ifindex,
    }
}

/// A packet whose TTL expires here goes to the node's stack, which answers
/// time exceeded from the gateway address and drops it, as a router does
/// (traceroute's first hop). Counted, since the datapath does not forward it.
#[inline(always)]
fn ttl_expired() -> Verdict {
    maps::count(Stat::DropTtlExceeded);
    Verdict::Pass
}
