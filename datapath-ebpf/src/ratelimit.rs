//! Per-cgroup token buckets: cgroup_skb in both directions, sock_ops pacing
//! of TCP senders and sock_ops receive windows of TCP receivers (see
//! `datapath_common::ratelimit` for the arithmetic, why pacing is what holds
//! BBR to the rate, and how the windows pace senders from the receiver).
//!
//! The programs are attached only to the cgroups of containers that have a
//! limit. A program attached to a cgroup also runs for every cgroup below
//! it, so the bucket to charge is not the packet's own cgroup but the one
//! the program was attached to: the agent writes that bucket's key into the
//! attachment's cgroup storage ([`RATE_CGROUPS`]) right after attaching.
//! Until it has (and under `BPF_PROG_TEST_RUN`, whose storage is fresh),
//! the cgroup_skb programs use the packet's own cgroup. Nested limited
//! cgroups each charge their own bucket: a packet must fit both.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_ESTABLISHED, SO_MAX_PACING_RATE, SOL_SOCKET,
    },
    helpers::generated::{
        bpf_reserve_hdr_opt, bpf_setsockopt, bpf_skb_cgroup_id, bpf_skb_ecn_set_ce, bpf_spin_lock,
        bpf_spin_unlock,
    },
    programs::{SkBuffContext, SockOpsContext},
};
use datapath_common::ratelimit::{
    LOOPBACK_IFINDEX, RateKey, RateLimit, RateStats, Verdict, WINDOW_UNCLAMPED, cgroup_verdict,
    direction,
};

use crate::{
    clock::now_ns,
    maps::{RATE_CGROUPS, RATE_FLOWS, RATE_LIMITS, RATE_STATS},
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
    let ingress = key.direction == direction::INGRESS;
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
        let v = if ingress {
            (*limit).charge_ingress(now, len)
        } else {
            (*limit).charge(now, len)
        };
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
/// limit the packet is dropped; once the bucket is into its reserve (what
/// the receive windows leave free) an ECN-capable packet gets Congestion
/// Experienced.
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

/// `SOL_TCP` for `bpf_setsockopt`.
const SOL_TCP: i32 = 6;
/// `TCP_WINDOW_CLAMP`: the largest receive window the socket advertises.
const TCP_WINDOW_CLAMP: i32 = 10;
/// `args[0]` of `BPF_SOCK_OPS_HDR_OPT_LEN_CB` when `tcp_current_mss` asks
/// (no segment is being built).
const BPF_WRITE_HDR_TCP_CURRENT_MSS: u32 = 1;
/// The callbacks a socket sharing an ingress limit asks for: every segment
/// it sends (`HDR_OPT_LEN` before its window is chosen, `WRITE_HDR_OPT`
/// after, if asked for), and its state changes (to count it out).
const WINDOW_CB_FLAGS: u32 = BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG;
/// Header option space asked for to get the `WRITE_HDR_OPT` callback: one
/// word, which the kernel fills with no-op options.
const WRITE_CB_OPTION_LEN: u32 = 4;

/// sock_ops on a limited cgroup's TCP sockets: paces senders by the egress
/// bucket ([`pace`]) and chooses receivers' windows by the ingress bucket
/// ([`window`]).
#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_HDR_OPT_LEN_CB {
        if ctx.arg(0) != BPF_WRITE_HDR_TCP_CURRENT_MSS {
            window(ctx);
        }
    } else if op == BPF_SOCK_OPS_WRITE_HDR_OPT_CB {
        window_sent(ctx);
    } else if op == BPF_SOCK_OPS_RTT_CB {
        pace(ctx);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    {
        if peer_on_loopback(ctx) {
            // Neither paced nor windowed; an accepted socket drops the
            // clamp its listener was given.
            set_int_option(ctx, SOL_TCP, TCP_WINDOW_CLAMP, WINDOW_UNCLAMPED);
        } else {
            pace(ctx);
            window_start(ctx);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB {
        window_end(ctx);
    } else if op == BPF_SOCK_OPS_TCP_LISTEN_CB
        || (op == BPF_SOCK_OPS_TCP_CONNECT_CB && !peer_on_loopback(ctx))
    {
        window_cap(ctx);
    }
    1
}

/// `AF_INET`.
const AF_INET: u32 = 2;
/// `AF_INET6`.
const AF_INET6: u32 = 10;

/// Whether the socket's peer is reached over the container's loopback: a
/// loopback address, or the socket's own address (the limiter does not
/// charge loopback traffic, so its TCP is not paced or windowed either).
#[inline(always)]
fn peer_on_loopback(ctx: &SockOpsContext) -> bool {
    let family = ctx.family();
    if family == AF_INET {
        let remote = ctx.remote_ip4();
        u32::from_be(remote) >> 24 == 127 || remote == ctx.local_ip4()
    } else if family == AF_INET6 {
        let r = ctx.remote_ip6();
        let l = ctx.local_ip6();
        let loopback = r[0] == 0 && r[1] == 0 && r[2] == 0 && r[3] == 1u32.to_be();
        let mapped_loopback =
            r[0] == 0 && r[1] == 0 && r[2] == 0xffffu32.to_be() && u32::from_be(r[3]) >> 24 == 127;
        let own = r[0] == l[0] && r[1] == l[1] && r[2] == l[2] && r[3] == l[3];
        loopback || mapped_loopback || own
    } else {
        false
    }
}

/// The cgroup this attachment limits, once the agent has keyed it.
#[inline(always)]
fn attachment_cgroup() -> Option<u64> {
    let stored = RATE_CGROUPS.get_ptr_mut();
    if stored.is_null() {
        return None;
    }
    // SAFETY: non-null storage of this attachment (see `bucket_key`).
    let cgroup_id = unsafe { (*stored).cgroup_id };
    (cgroup_id != 0).then_some(cgroup_id)
}

/// The bucket of `direction` of this attachment's cgroup.
#[inline(always)]
fn bucket(direction: u32) -> Option<(RateKey, *const RateLimit)> {
    let key = RateKey::new(attachment_cgroup()?, direction);
    RATE_LIMITS.get_ptr(key).map(|limit| (key, limit))
}

/// `bpf_setsockopt(level, name, value)` for an int option.
#[inline(always)]
fn set_int_option(ctx: &SockOpsContext, level: i32, name: i32, value: u32) {
    let mut value = value;
    // SAFETY: the option value is a local u32; the kernel copies it.
    unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            level,
            name,
            (&raw mut value).cast(),
            size_of::<u32>() as i32,
        );
    }
}

/// Adds `delta` to the count of TCP sockets sharing ingress bucket `key`.
#[inline(always)]
fn count_flow(key: &RateKey, delta: i64) {
    if let Some(flows) = RATE_FLOWS.get_ptr_mut(key) {
        // SAFETY: a live map value (RCU); other CPUs update it too, hence
        // the atomic add (lowered to the BPF atomic add instruction).
        unsafe {
            atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(&raw mut (*flows).flows, delta);
        }
    }
}

/// A listening or connecting socket of a cgroup with an ingress limit gets
/// the largest window it can ever be granted as its clamp before the
/// handshake, which bounds the window scale it announces (see
/// `RateLimit::window_cap`).
#[inline(always)]
fn window_cap(ctx: &SockOpsContext) {
    if let Some((_, limit)) = bucket(direction::INGRESS) {
        // SAFETY: live map value (RCU); configuration fields only, which
        // the agent writes whole.
        let cap = unsafe { (*limit).window_cap() };
        set_int_option(ctx, SOL_TCP, TCP_WINDOW_CLAMP, cap);
    }
}

/// A newly established socket of a cgroup with an ingress limit is counted
/// among the bucket's flows and asks for the callbacks that choose its
/// windows.
#[inline(always)]
fn window_start(ctx: &SockOpsContext) {
    let Some((key, _)) = bucket(direction::INGRESS) else {
        return;
    };
    let flags = ctx.cb_flags();
    let _ = ctx.set_cb_flags((flags | WINDOW_CB_FLAGS) as i32);
    // Counted only if it will be counted out (the state callback is set).
    if ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG != 0 {
        count_flow(&key, 1);
    }
}

/// A counted socket leaving the established state is counted out.
#[inline(always)]
fn window_end(ctx: &SockOpsContext) {
    if ctx.arg(0) != BPF_TCP_ESTABLISHED {
        return;
    }
    if let Some(cgroup) = attachment_cgroup() {
        count_flow(&RateKey::new(cgroup, direction::INGRESS), -1);
    }
    let flags = ctx.cb_flags();
    let _ = ctx.set_cb_flags((flags & !WINDOW_CB_FLAGS) as i32);
}

/// Right before a segment's window is chosen: clamps the window to the
/// socket's share of what the ingress bucket can still admit. A clamp
/// also lowers the ceiling the kernel grows the window under as data
/// arrives; when the grant is below one segment (the sender will wait for
/// its persist timer), the segment asks for [`window_sent`] to lift that
/// ceiling again once the window is chosen, so that the probe that ends
/// the wait opens the window at once. Once the limit is gone, the clamp is
/// lifted and the socket stops asking.
#[inline(always)]
fn window(ctx: &SockOpsContext) {
    let Some((key, limit)) = bucket(direction::INGRESS) else {
        window_release(ctx);
        return;
    };
    let flows = match RATE_FLOWS.get_ptr(key) {
        // SAFETY: live map value (RCU); an aligned i64, never torn.
        Some(f) => unsafe { (*f).share_count() },
        None => 1,
    };
    let now = now_ns();
    // SAFETY: reading a field of the program's context (the kernel keeps
    // the smoothed RTT in eighths of a microsecond).
    let rtt_us = unsafe { (*ctx.ops).srtt_us } >> 3;
    // SAFETY: live map value (RCU). Read without the lock (no helper may
    // run under it, and setsockopt must): aligned u64 fields are never
    // torn, and a value read during a charge is off by one packet.
    let grant = unsafe { (*limit).window_grant(now, flows, rtt_us) };
    set_int_option(ctx, SOL_TCP, TCP_WINDOW_CLAMP, grant);
    // SAFETY: reading a field of the program's context.
    let mss = unsafe { (*ctx.ops).mss_cache };
    if grant < mss {
        // SAFETY: plain helper call on the program's context.
        unsafe { bpf_reserve_hdr_opt(ctx.ops, WRITE_CB_OPTION_LEN, 0) };
    }
}

/// After a closing window was chosen: the clamp goes back up to the
/// largest grant (see [`window`]).
#[inline(always)]
fn window_sent(ctx: &SockOpsContext) {
    match bucket(direction::INGRESS) {
        // SAFETY: live map value (RCU); configuration fields only.
        Some((_, limit)) => {
            let cap = unsafe { (*limit).window_cap() };
            set_int_option(ctx, SOL_TCP, TCP_WINDOW_CLAMP, cap);
        }
        None => window_release(ctx),
    }
}

/// The limit is gone: lifts the clamp and stops asking for callbacks (the
/// socket stays counted out of nothing: its bucket's count went with it).
#[inline(always)]
fn window_release(ctx: &SockOpsContext) {
    let flags = ctx.cb_flags();
    let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    set_int_option(ctx, SOL_TCP, TCP_WINDOW_CLAMP, WINDOW_UNCLAMPED);
}

/// Paces a TCP sender of a cgroup with an egress limit at
/// [`RateLimit::pacing_rate`], so that TCP (BBR included, which ignores
/// congestion notifications) sends at the limit instead of running into it.
/// Established sockets ask for a callback on every RTT sample; the pacing
/// rate follows the bucket from there. Once the limit is gone, each socket
/// gets its pacing back on its next callback and stops asking.
#[inline(always)]
fn pace(ctx: &SockOpsContext) {
    let limit = bucket(direction::EGRESS);
    let rate: u64 = match limit {
        // SAFETY: live map value (RCU). The fields are read without the
        // lock: an aligned u64 is never torn, and a rate read during the
        // agent's update is off for one callback only.
        Some((_, limit)) => unsafe { (*limit).pacing_rate(now_ns()) },
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
        return;
    }
    // The option is an int for BPF: u32::MAX means unlimited, anything
    // above 34 Gbit/s is as good as unlimited.
    let rate = if rate >= u64::from(u32::MAX) {
        u32::MAX
    } else {
        rate as u32
    };
    set_int_option(ctx, SOL_SOCKET as i32, SO_MAX_PACING_RATE as i32, rate);
}
