//! ICMP errors about tracked flows, the same under every hook.

use datapath_common::{Stat, ct_action};

use crate::{conntrack, ctx::Packet, maps, nat, parse::Flow};

/// [`translate`]: the error is not about a flow this hook translates.
pub const NOT_OURS: u32 = 0;
/// [`translate`]: translated; forward it as [`Forward`] says.
pub const FORWARD: u32 = 1;
/// [`translate`]: drop it, counting `Stat::from_index(verdict - DROP)`.
pub const DROP: u32 = 2;

/// Where a translated error goes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Forward {
    /// The interface its flow's entry sends to.
    pub ifindex: u32,
    /// The address the entry translates to.
    pub addr: [u8; 4],
}

/// Translates ICMP error `flow` if it is about a tracked flow whose entry
/// for the error's direction has the hook's actions (`source`: errors from
/// containers, translated by REV_DNAT and SNAT entries, which rewrite the
/// source; else errors from the uplink side, by DNAT and REV_SNAT). Returns
/// [`NOT_OURS`], [`FORWARD`] (with `out` filled) or [`DROP`] plus a
/// [`Stat`] index.
///
/// Inlined into the XDP program; TC programs call [`translate_tc`].
#[inline(always)]
pub fn translate<C: Packet>(ctx: &mut C, flow: &Flow, source: bool, out: &mut Forward) -> u32 {
    let Some((quoted, ct)) = conntrack::lookup_icmp_error(ctx, flow) else {
        return NOT_OURS;
    };
    let ours = if source {
        ct.action == ct_action::REV_DNAT || ct.action == ct_action::SNAT
    } else {
        ct.action == ct_action::DNAT || ct.action == ct_action::REV_SNAT
    };
    if !ours {
        return NOT_OURS;
    }
    if flow.ttl <= 1 {
        return DROP + Stat::DropTtlExceeded as u32;
    }
    let addr = ct.nat_addr;
    if nat::rewrite_icmp_error(ctx, flow, &quoted, source, addr, ct.nat_port).is_err()
        || nat::decrement_ttl(ctx).is_err()
    {
        return DROP + Stat::DropHelperFailed as u32;
    }
    maps::count(Stat::IcmpErrorTranslated);
    *out = Forward {
        ifindex: ct.ifindex,
        addr,
    };
    FORWARD
}

/// [`translate`] as a subprogram of its own for the TC programs: the
/// quoted packet's tuple and the entry it reads stay out of the program's
/// stack frame. (Under XDP, LLVM turns a subprogram's packet bounds checks
/// into arithmetic the verifier cannot follow; the XDP program inlines it.)
#[inline(never)]
pub fn translate_tc(
    ctx: &mut aya_ebpf::programs::TcContext,
    flow: &Flow,
    source: bool,
    out: &mut Forward,
) -> u32 {
    translate(ctx, flow, source, out)
}
