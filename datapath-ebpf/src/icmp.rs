//! ICMP errors about tracked flows, the same under every hook.

use datapath_common::{CtEntry, Stat};

use crate::{conntrack, ctx::Packet, maps, nat, parse::Flow};

/// What to do with an ICMP error.
pub enum Outcome {
    /// Not about a flow this hook translates: hand it to the kernel.
    NotOurs,
    /// Drop it, counting `Stat`.
    Drop(Stat),
    /// Translated: forward it as the flow's entry says.
    Forward(CtEntry),
}

/// Translates ICMP error `flow` if it is about a tracked flow whose entry
/// for the error's direction has one of `actions`; `source` says whether
/// that entry rewrites the source (errors from containers) or the
/// destination (errors from the uplink side).
#[inline(always)]
pub fn translate<C: Packet>(ctx: &mut C, flow: &Flow, source: bool, actions: [u8; 2]) -> Outcome {
    let Some((quoted, ct)) = conntrack::lookup_icmp_error(ctx, flow) else {
        return Outcome::NotOurs;
    };
    if !actions.contains(&ct.action) {
        return Outcome::NotOurs;
    }
    if flow.ttl <= 1 {
        return Outcome::Drop(Stat::DropTtlExceeded);
    }
    if nat::rewrite_icmp_error(ctx, flow, &quoted, source, ct.nat_addr, ct.nat_port).is_err()
        || nat::decrement_ttl(ctx).is_err()
    {
        return Outcome::Drop(Stat::DropHelperFailed);
    }
    maps::count(Stat::IcmpErrorTranslated);
    Outcome::Forward(ct)
}
