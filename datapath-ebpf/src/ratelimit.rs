//! Per-cgroup token buckets: cgroup_skb in both directions, and sock_ops
//! pacing of TCP senders (see `datapath_common::ratelimit` for the
//! arithmetic and why pacing is what holds BBR to the rate).
//!
//! The programs are attached only to the cgroups of containers that have a
//! limit. A program attached to a cgroup also runs for every cgroup below
//! it, so the bucket to charge is not the packet's own cgroup but the one
//! the program was attached to: the agent writes that bucket's key into the
//! attachment's cgroup storage ([`RATE_CGROUPS`]) right after attaching.
//! Until it has (and under `BPF_PROG_TEST_RUN`, whose storage is fresh),
//! the cgroup_skb programs use the packet's own cgroup. Nested limited
//! cgroups each charge their own bucket: a packet must fit both.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, SO_MAX_PACING_RATE, SOL_SOCKET,
    },
    helpers::generated::{
        bpf_setsockopt, bpf_skb_cgroup_id, bpf_skb_ecn_set_ce, bpf_spin_lock, bpf_spin_unlock,
    },
    programs::{SkBuffContext, SockOpsContext},
};
use datapath_common::ratelimit::{
    LOOPBACK_IFINDEX, RateKey, RateStats, Verdict, cgroup_verdict, direction,
};

use crate::{
    clock::now_ns,
    maps::{RATE_CGROUPS, RATE_LIMITS, RATE_STATS},
};

/// The bucket this program run charges.
#[inline(always)]
fn bucket_key(ctx: &SkBuffContext, dir: u32) -> RateKey {
    let stored = RATE_CGROUPS.get_ptr_mut();
    if !stored.is_null() {
        // SAFETY: non-null storage of this attachment, written whole by the
        // agent; a torn read is impossible for the only field that matters
        // (an aligned u64).
        let key = unsafe { *stored };
        if key.cgroup_id != 0 {
            return RateKey::new(key.cgroup_id, dir);
        }
    }
    // SAFETY: plain helper call on the program's context.
    RateKey::new(unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }, dir)
}

/// Whether the packet is on the loopback device: it stays inside the
/// container and is neither charged nor counted.
#[inline(always)]
fn on_loopback(ctx: &SkBuffContext) -> bool {
    // SAFETY: reads a field of the program's own context.
    unsafe { (*ctx.skb.skb).ifindex == LOOPBACK_IFINDEX }
}

/// Charges the packet to its bucket; returns the bucket's verdict, or `None`
/// when the cgroup has no limit in this direction.
#[inline(always)]
fn charge(ctx: &SkBuffContext, key: &RateKey) -> Option<Verdict> {
    let limit = RATE_LIMITS.get_ptr_mut(key)?;
    let len = ctx.len();
    // Read before taking the lock: no helper may run while it is held.
    let now = now_ns();
    // SAFETY: `limit` points into a live map value (RCU) whose BTF declares
    // the lock; every other access to the bucket fields happens under it
    // (the agent writes with BPF_F_LOCK). `charge` is inlined: no call
    // happens while the lock is held.
    let verdict = unsafe {
        let lock = (&raw mut (*limit).lock).cast();
        bpf_spin_lock(lock);
        let v = (*limit).charge(now, len);
        bpf_spin_unlock(lock);
        v
    };
    Some(verdict)
}

/// Adds the packet to the bucket's per-CPU counters.
#[inline(always)]
fn count(key: &RateKey, verdict: Verdict, len: u32) {
    if let Some(stats) = RATE_STATS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot; nothing else writes it while we run.
        unsafe { RateStats::count(&mut *stats, verdict, len) };
    }
}

/// cgroup_skb egress: packets sent by sockets of the cgroup. Over the limit
/// the packet is dropped with a congestion notification, which a TCP
/// sender takes as a local queue drop (it keeps the segment and reduces its
/// congestion window); in the marking band it passes with one.
#[inline(always)]
pub fn egress(ctx: &SkBuffContext) -> i32 {
    if on_loopback(ctx) {
        return cgroup_verdict::PASS;
    }
    let key = bucket_key(ctx, direction::EGRESS);
    let Some(verdict) = charge(ctx, &key) else {
        return cgroup_verdict::PASS;
    };
    count(&key, verdict, ctx.len());
    match verdict {
        Verdict::Pass => cgroup_verdict::PASS,
        Verdict::Mark => cgroup_verdict::PASS_CN,
        Verdict::Over => cgroup_verdict::DROP_CN,
    }
}

/// cgroup_skb ingress: packets delivered to sockets of the cgroup. Over the
/// limit the packet is dropped; in the marking band an ECN-capable packet
/// gets Congestion Experienced.
#[inline(always)]
pub fn ingress(ctx: &SkBuffContext) -> i32 {
    if on_loopback(ctx) {
        return cgroup_verdict::PASS;
    }
    let key = bucket_key(ctx, direction::INGRESS);
    let Some(mut verdict) = charge(ctx, &key) else {
        return cgroup_verdict::PASS;
    };
    // SAFETY: plain helper call; it only touches ECT packets' IP header.
    if verdict == Verdict::Mark && unsafe { bpf_skb_ecn_set_ce(ctx.skb.skb) } != 1 {
        verdict = Verdict::Pass;
    }
    count(&key, verdict, ctx.len());
    match verdict {
        Verdict::Over => cgroup_verdict::DROP,
        _ => cgroup_verdict::PASS,
    }
}

/// sock_ops on a cgroup with an egress limit: paces each TCP socket of the
/// cgroup at [`datapath_common::ratelimit::RateLimit::pacing_rate`], so that
/// TCP (BBR included, which ignores congestion notifications) sends at the
/// limit instead of running into it. Established sockets ask for a callback
/// on every RTT sample; the pacing rate follows the bucket from there. Once
/// the limit is gone, each socket gets its pacing back on its next callback
/// and stops asking.
#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_RTT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    {
        return 1;
    }
    let stored = RATE_CGROUPS.get_ptr_mut();
    if stored.is_null() {
        return 1;
    }
    // SAFETY: non-null storage of this attachment (see `bucket_key`).
    let key = unsafe { *stored };
    let limit = if key.cgroup_id == 0 {
        None
    } else {
        RATE_LIMITS.get_ptr(&RateKey::new(key.cgroup_id, direction::EGRESS))
    };
    let rate: u64 = match limit {
        // SAFETY: live map value (RCU). The fields are read without the
        // lock: an aligned u64 is never torn, and a rate read during the
        // agent's update is off for one callback only.
        Some(limit) => unsafe { (*limit).pacing_rate(now_ns()) },
        None => u64::MAX,
    };
    let flags = ctx.cb_flags();
    if limit.is_some() {
        if flags & BPF_SOCK_OPS_RTT_CB_FLAG == 0 {
            let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
        }
    } else if flags & BPF_SOCK_OPS_RTT_CB_FLAG != 0 {
        let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
    } else {
        // Never limited while this program ran for it: leave it alone.
        return 1;
    }
    // The option is an int for BPF: u32::MAX means unlimited, anything
    // above 34 Gbit/s is as good as unlimited.
    let mut rate = if rate >= u64::from(u32::MAX) {
        u32::MAX
    } else {
        rate as u32
    };
    // SAFETY: the option value is a local u32; the kernel copies it.
    unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            SOL_SOCKET as i32,
            SO_MAX_PACING_RATE as i32,
            (&raw mut rate).cast(),
            size_of::<u32>() as i32,
        );
    }
    1
}
