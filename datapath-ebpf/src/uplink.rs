//! Uplink ingress, shared by the XDP and the TC program: DNAT of published
//! ports and reverse SNAT of masqueraded flows' replies.

use datapath_common::{
    CONFIG_F_ALLOW_DIRECT_ROUTING, CtEntry, EndpointKey, NodeAddrKey, ServiceKey, Stat, ct_action,
    proto,
};

use crate::{
    conntrack,
    ctx::Packet,
    guard, icmp,
    maps::{self, NODE_ADDRS, SERVICES},
    nat,
    parse::{self, FrameLen, L4, Parsed},
};

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

/// Looks up a published port: first for the exact address, then for the
/// wildcard, which only matches the node's own addresses.
#[inline(always)]
fn service(key: &datapath_common::CtKey) -> Option<&'static datapath_common::ServiceValue> {
    if key.proto != proto::TCP && key.proto != proto::UDP {
        return None;
    }
    let mut skey = ServiceKey {
        addr: key.daddr,
        port: key.dport,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: service values are only replaced whole by the agent; a torn
    // read is impossible for values this size under RCU.
    if let Some(v) = unsafe { SERVICES.get(&skey) } {
        return Some(v);
    }
    if unsafe { NODE_ADDRS.get(NodeAddrKey { addr: key.daddr }) }.is_none() {
        return None;
    }
    skey.addr = [0; 4];
    unsafe { SERVICES.get(&skey) }
}

/// Translates one uplink packet.
#[inline(always)]
pub fn process<C: Packet + FrameLen>(ctx: &mut C) -> Verdict {
    let Some(cfg) = maps::config() else {
        return Verdict::Pass;
    };
    if let Some(stat) = guard::uplink(ctx, cfg) {
        return Verdict::Drop(stat);
    }
    let flow = match parse::parse(ctx) {
        Parsed::NotOurs => return Verdict::Pass,
        Parsed::Malformed => return Verdict::Drop(Stat::DropMalformed),
        Parsed::Fragment(Some(key)) => {
            // A first fragment of a flow we translate: it cannot be
            // translated without the rest, so it is dropped, never half
            // translated. Later fragments carry no ports and are passed;
            // without their first fragment the kernel discards them.
            return if conntrack::lookup(&key).is_some() || service(&key).is_some() {
                Verdict::Drop(Stat::DropFragment)
            } else {
                Verdict::Pass
            };
        }
        Parsed::Fragment(None) => return Verdict::Pass,
        Parsed::Flow(flow) => flow,
    };
    // Forwarding decrements the TTL: a packet that would leave with zero is
    // dropped before it can create a flow.
    let expiring = flow.ttl <= 1;
    if flow.l4 == L4::IcmpError {
        return match icmp::translate(ctx, &flow, false, [ct_action::DNAT, ct_action::REV_SNAT]) {
            icmp::Outcome::NotOurs => Verdict::Pass,
            icmp::Outcome::Drop(stat) => Verdict::Drop(stat),
            icmp::Outcome::Forward(ct) => Verdict::ToContainer {
                ifindex: ct.ifindex,
                addr: ct.nat_addr,
            },
        };
    }

    let entry: *mut CtEntry = match conntrack::lookup(&flow.key) {
        Some(_) if expiring => return Verdict::Drop(Stat::DropTtlExceeded),
        Some(e) => e,
        None => match service(&flow.key) {
            Some(_) if expiring => return Verdict::Drop(Stat::DropTtlExceeded),
            Some(svc) => {
                match conntrack::create_dnat(
                    &flow.key,
                    svc.backend_addr,
                    svc.backend_port,
                    svc.ifindex,
                    cfg.uplink_ifindex,
                    svc.container_id,
                ) {
                    Ok(e) => {
                        maps::count(Stat::DnatNew);
                        e
                    }
                    Err(stat) => return Verdict::Drop(stat),
                }
            }
            None => {
                if !cfg.in_pool(flow.key.daddr) {
                    return Verdict::Pass;
                }
                // SAFETY: endpoint values are replaced whole by the agent.
                let Some(ep) = (unsafe {
                    maps::ENDPOINTS.get(EndpointKey {
                        addr: flow.key.daddr,
                    })
                }) else {
                    return Verdict::Pass;
                };
                if cfg.flags & CONFIG_F_ALLOW_DIRECT_ROUTING == 0 {
                    return Verdict::Drop(Stat::DropDirectRouting);
                }
                // Routed unchanged, but tracked: the container's replies
                // must be recognised, not masqueraded.
                return match conntrack::create_routed(
                    &flow.key,
                    ep.ifindex,
                    cfg.uplink_ifindex,
                    ep.container_id,
                ) {
                    Ok(e) => {
                        conntrack::touch(e, &flow);
                        Verdict::Pass
                    }
                    Err(stat) => Verdict::Drop(stat),
                };
            }
        },
    };
    // SAFETY: points into a live conntrack value (RCU); copied out once.
    let ct = unsafe { *entry };
    if ct.action == ct_action::ROUTED {
        conntrack::touch(entry, &flow);
        return Verdict::Pass;
    }
    // Replies arriving on the uplink are only ever REV_SNAT; an entry of
    // another kind matching here would be an outbound tuple seen inbound.
    if ct.action != ct_action::DNAT && ct.action != ct_action::REV_SNAT {
        return Verdict::Pass;
    }
    conntrack::touch(entry, &flow);
    if nat::rewrite(ctx, &flow, false, ct.nat_addr, ct.nat_port).is_err()
        || nat::decrement_ttl(ctx).is_err()
    {
        return Verdict::Drop(Stat::DropHelperFailed);
    }
    maps::count(if ct.action == ct_action::DNAT {
        Stat::DnatPackets
    } else {
        Stat::SnatPackets
    });
    Verdict::ToContainer {
        ifindex: ct.ifindex,
        addr: ct.nat_addr,
    }
}
