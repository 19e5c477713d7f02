//! Per-cgroup rate limiting: map layouts and the token bucket arithmetic.
//!
//! One [`RateLimit`] per (cgroup, direction) lives in the
//! [`crate::names::RATE_LIMITS`] hash map, keyed by [`RateKey`]. The cgroup_skb
//! programs charge every packet of the cgroup (and of the cgroups below it)
//! to it under the value's `bpf_spin_lock`; the agent rewrites the
//! configuration in place with `BPF_F_LOCK` ([`RateLimit::reconfigure`]), so a
//! new rate applies to the very next packet and no flow notices more.
//!
//! # The bucket
//!
//! The bucket keeps its state in time, not in bytes (the generic cell rate
//! algorithm): `tat_ns` is the moment the bucket would be full again if no
//! more packets came. A packet costs its transmission time at the
//! configured rate, `len * mult >> shift` ns, which needs no division and
//! cannot overflow in the kernel. The backlog `tat_ns - now` is how empty
//! the bucket is, in nanoseconds:
//!
//! ```text
//!  backlog 0 .......... mark_ns .......... burst_ns ..........
//!          |  pass      |  pass, marked    |  over the limit
//! ```
//!
//! A packet is admitted while the backlog is at most `burst_ns`, whatever its
//! size: a 64 KiB GSO packet bigger than the whole bucket still gets through
//! (the bucket goes into debt for it), so the long-run rate stays exact and
//! nothing starves. Over the limit, egress drops with a congestion
//! notification and ingress drops; marked packets get a congestion
//! notification (egress) or ECN CE (ingress, ECN-capable packets).
//!
//! # Pushing back on TCP
//!
//! Dropping or marking does not slow BBR down (it ignores congestion
//! notifications, and on a sub-millisecond path a local drop with nothing
//! left in flight stalls the socket until its probe timer fires). What
//! works is pacing: a sock_ops program caps the pacing rate of every TCP
//! socket of the cgroup at [`RateLimit::pacing_rate`]. That is a fair share
//! the bucket adjusts itself after each measurement window of at least
//! [`FAIR_WINDOW_BYTES`] ([`RateLimit::charge`]), the way the rate control
//! protocol computes a router's fair rate: up while the senders leave part
//! of the rate unused, down while they exceed it or the backlog stands
//! above its target (a quarter of the bucket), in steps symmetric in the
//! logarithm so that noisy windows cancel out. Each socket's pacing rate is
//! that share corrected in proportion to the backlog's distance from the
//! target, which damps the share's swings. One sender gets the whole rate;
//! `n` senders settle at `1/n` each with the backlog near its target,
//! below the marks and drops.
//!
//! # Pacing TCP receivers (ingress)
//!
//! Ingress has no queue to hold an excess in: a packet over the limit can
//! only be dropped, and a TCP sender that runs into the limit loses whole
//! flights. So the receiver paces the sender before anything is dropped:
//! the sock_ops program chooses the window each TCP socket of the cgroup
//! advertises, right before every segment it sends (and again as every
//! segment arrives), and clamps it to the socket's share of what the bucket
//! can still admit beyond a reserve of a quarter of the bucket, and to no
//! more than twice its share of the rate times its round-trip time (at
//! least 64 KiB) ([`RateLimit::window_grant`]). A window is counted from
//! the data received, so the right edge it offers advances exactly as fast
//! as the bucket refills: a sender can never have more in flight than the
//! bucket has room for, whatever the path's round-trip time. In a steady
//! flow the grant settles near the share of the rate times the RTT; the
//! RTT bound keeps a sender that finds a full bucket from sending it all
//! at once (on a path of microseconds, it has one 64 KiB segment in flight
//! at a time, which also keeps the segments in order).
//!
//! When the rate times the RTT is less than a segment (10 Mbit/s over a
//! path of a few hundred microseconds), the grant falls below one segment
//! and the sender stops until its persist timer fires (200 ms or its RTO,
//! whichever is longer), while the bucket refills: the average holds, with
//! no loss and no retransmission. For the window to fall below one segment
//! the window scale must be small: sockets created in a cgroup with an
//! ingress limit get a window clamp of the largest grant before their
//! handshake ([`RateLimit::window_cap`]), which also keeps their window
//! scale as small as that window allows.
//!
//! The share is the grant divided by the number of established TCP
//! sockets of the cgroup ([`RateFlows`], kept by the same program from
//! their state changes). The reserve is there for what the windows do not
//! cover: new and small flows (a request/response flow never waits behind a
//! bulk one), UDP, and sockets opened before the limit. Policing stays as
//! the backstop: ingress packets are ECN CE marked once the bucket dips into
//! the reserve ([`RateLimit::charge_ingress`]) and dropped over the limit.
//!
//! Counters ([`RateStats`]) live in a separate per-CPU map so that neither a
//! lock nor the agent's in-place updates can lose an increment.

use bytemuck::{Pod, Zeroable};

/// The kernel's `struct bpf_spin_lock`. The name matters: the kernel finds
/// the lock in a map value through BTF by this struct name and size.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct bpf_spin_lock {
    /// Owned by the kernel; userspace never writes it (`BPF_F_LOCK`).
    pub val: u32,
}

/// Traffic directions, numbered like the kernel's cgroup attach types
/// (`BPF_CGROUP_INET_INGRESS` = 0, `BPF_CGROUP_INET_EGRESS` = 1).
pub mod direction {
    /// Packets delivered to sockets of the cgroup.
    pub const INGRESS: u32 = 0;
    /// Packets sent by sockets of the cgroup.
    pub const EGRESS: u32 = 1;

    /// A short name for listings.
    pub const fn name(direction: u32) -> &'static str {
        match direction {
            INGRESS => "ingress",
            EGRESS => "egress",
            _ => "unknown",
        }
    }
}

/// The attach type of a sock_ops program (`BPF_CGROUP_SOCK_OPS`), for the
/// cgroup storage key of the pacing program's attachment.
pub const ATTACH_SOCK_OPS: u32 = 3;

/// The loopback device's index in every network namespace. Packets on it
/// never leave the container (a sidecar on 127.0.0.1, a process talking to
/// its own address): the limiter neither charges nor counts them.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Return codes of cgroup_skb programs. Egress programs may also ask for a
/// congestion notification: the sending TCP socket reduces its congestion
/// window as if an ECN mark had come back, UDP senders get `ENOBUFS`.
pub mod cgroup_verdict {
    /// Drop the packet.
    pub const DROP: i32 = 0;
    /// Let the packet through.
    pub const PASS: i32 = 1;
    /// Egress only: drop and notify congestion (`NET_XMIT_DROP`: TCP keeps
    /// the segment queued and sends it again later; no loss is recorded).
    pub const DROP_CN: i32 = 2;
    /// Egress only: let through and notify congestion (`NET_XMIT_CN`).
    pub const PASS_CN: i32 = 3;
}

/// The largest rate accepted: 1 Tbit/s.
pub const MAX_RATE_BPS: u64 = 1_000_000_000_000;
/// The smallest rate accepted: 8 bit/s (one byte per second).
pub const MIN_RATE_BPS: u64 = 8;
/// The largest bucket accepted: 1 GiB (tc's `1gb`).
pub const MAX_BURST_BYTES: u64 = 1 << 30;
/// The smallest bucket accepted: one full-size Ethernet frame.
pub const MIN_BURST_BYTES: u64 = 1_514;

/// A fair share measurement window covers at least this many bytes (four
/// GSO packets)...
pub const FAIR_WINDOW_BYTES: u64 = 256 * 1024;
/// ...and lasts at least this long...
pub const FAIR_WINDOW_MIN_NS: u64 = 1_000_000;
/// ...unless it has lasted this long.
pub const FAIR_WINDOW_MAX_NS: u64 = 100_000_000;
/// Fixed-point one of the fair share's arithmetic.
const FAIR_ONE: u64 = 1024;
/// The fair share moves by 1/this of the measured error per window.
const FAIR_GAIN: u64 = 4;
/// The fair share never goes below the rate divided by this.
pub const FAIR_FLOOR_DIV: u64 = 64;

/// The smallest window clamp the kernel takes (half of its smallest
/// receive buffer): a window this small holds no full-size segment, and the
/// sender waits for its persist timer.
pub const WINDOW_MIN: u32 = 1_152;
/// The window clamp given back to a socket whose limit is gone: as good as
/// none (the receive buffer and the window scale bound the window).
pub const WINDOW_UNCLAMPED: u32 = 1 << 30;
/// The smallest window clamp given at a handshake: 64 KiB, the largest
/// window without scaling.
pub const WINDOW_CAP_MIN: u32 = 65_535;
/// The smallest window the round-trip time limits a grant to: 64 KiB, one
/// GSO segment. On a path of microseconds a sender then has one segment in
/// flight at a time, sent as the ACK of the last one opens the window.
pub const WINDOW_RTT_MIN: u64 = 65_536;
/// The share of the bucket kept out of the windows: a quarter.
pub const RESERVE_DIV: u64 = 4;

/// Nanoseconds per second times 8 bits per byte: a byte at `r` bit/s takes
/// `NS_BITS / r` ns.
const NS_BITS: u128 = 8_000_000_000;

/// Key of [`crate::names::RATE_LIMITS`] and [`crate::names::RATE_STATS`], and
/// value of [`crate::names::RATE_CGROUPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RateKey {
    /// The limited cgroup's id: the inode number of its cgroup2 directory.
    pub cgroup_id: u64,
    /// [`direction`].
    pub direction: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}

impl RateKey {
    /// The key of `direction` of cgroup `cgroup_id`.
    #[inline(always)]
    pub const fn new(cgroup_id: u64, direction: u32) -> Self {
        Self {
            cgroup_id,
            direction,
            _pad: 0,
        }
    }
}

/// Why a rate or burst is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamsError {
    /// The rate is below [`MIN_RATE_BPS`] (zero included).
    RateTooLow,
    /// The rate is above [`MAX_RATE_BPS`].
    RateTooHigh,
    /// The burst is below [`MIN_BURST_BYTES`].
    BurstTooSmall,
    /// The burst is above [`MAX_BURST_BYTES`].
    BurstTooLarge,
}

/// The configuration of one bucket, computed from a rate and a burst size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateParams {
    /// Rate in bits per second.
    pub rate_bps: u64,
    /// Bucket size in bytes.
    pub burst_bytes: u64,
    /// Cost multiplier: a packet of `len` bytes costs `len * mult >> shift` ns.
    pub mult: u64,
    /// Cost shift.
    pub shift: u32,
    /// The bucket size in nanoseconds of transmission at the rate.
    pub burst_ns: u64,
    /// Backlog above which passing packets carry a congestion notification:
    /// half the bucket.
    pub mark_ns: u64,
}

impl RateParams {
    /// Parameters for `rate_bps` bits per second with a bucket of
    /// `burst_bytes`.
    pub fn new(rate_bps: u64, burst_bytes: u64) -> Result<Self, ParamsError> {
        if rate_bps < MIN_RATE_BPS {
            return Err(ParamsError::RateTooLow);
        }
        if rate_bps > MAX_RATE_BPS {
            return Err(ParamsError::RateTooHigh);
        }
        if burst_bytes < MIN_BURST_BYTES {
            return Err(ParamsError::BurstTooSmall);
        }
        if burst_bytes > MAX_BURST_BYTES {
            return Err(ParamsError::BurstTooLarge);
        }
        // The largest shift whose multiplier still fits 32 bits, so that
        // `len * mult` cannot overflow 64 bits for any u32 length.
        let rate = u128::from(rate_bps);
        let mut shift = 0u32;
        while shift < 63 && (NS_BITS << (shift + 1)) / rate <= u128::from(u32::MAX) {
            shift += 1;
        }
        let mult = ((NS_BITS << shift) + rate / 2) / rate;
        let mult = u64::try_from(mult.min(u128::from(u32::MAX))).unwrap_or(u64::from(u32::MAX));
        let burst_ns = u64::try_from(u128::from(burst_bytes) * NS_BITS / rate).unwrap_or(u64::MAX);
        Ok(Self {
            rate_bps,
            burst_bytes,
            mult,
            shift,
            burst_ns,
            mark_ns: burst_ns / 2,
        })
    }

    /// The transmission time of `len` bytes at the rate, in nanoseconds.
    #[inline(always)]
    pub fn cost_ns(&self, len: u32) -> u64 {
        cost_ns(self.mult, self.shift, len)
    }
}

/// `len * mult >> shift`: the cost of `len` bytes. `mult` fits 32 bits, so the
/// product cannot overflow.
#[inline(always)]
pub const fn cost_ns(mult: u64, shift: u32, len: u32) -> u64 {
    ((len as u64).wrapping_mul(mult)) >> (shift & 63)
}

/// The bytes sent at `rate_bps` in `ns` nanoseconds, for spans no longer
/// than a bucket (at most [`MAX_BURST_BYTES`] at the rate), without 128-bit
/// arithmetic (the BPF target has none): whole milliseconds and the rest
/// are converted apart. Within those bounds neither product comes near
/// 2^64 (`ms * rate_bps` is at most 8000 times the bucket, `rest *
/// rate_bps` below 10^18).
#[inline(always)]
pub const fn ns_to_bytes(ns: u64, rate_bps: u64) -> u64 {
    let ms = ns / 1_000_000;
    let rest = ns % 1_000_000;
    ms.wrapping_mul(rate_bps) / 8_000 + rest.wrapping_mul(rate_bps) / 8_000_000_000
}

/// `a / b`, 0 when `b` is 0: no panic path for the BPF verifier to reject.
#[inline(always)]
const fn div(a: u64, b: u64) -> u64 {
    match a.checked_div(b) {
        Some(q) => q,
        None => 0,
    }
}

/// The smaller of two values (`Ord::min` is not `const` and may not inline).
#[inline(always)]
const fn min(a: u64, b: u64) -> u64 {
    if a < b { a } else { b }
}

/// The default bucket of a direction's limit when none is given.
///
/// * Egress: 4 ms of traffic, at least 1 MiB. Pacing steers by the
///   backlog, so the bucket must hold a few GSO packets (up to 64 KiB each)
///   per concurrent TCP sender: about 128 KiB per sender keeps them within
///   a few percent of the rate, so the default serves 8. Bursts above the
///   rate only reach senders that are not paced (UDP).
/// * Ingress: 500 ms of traffic, at least 1 MiB. The receive windows keep
///   a quarter of the bucket in reserve and share the rest; on a path too
///   short for a window to pace the sender, a closed window stops it for
///   its persist timer (200 ms or more) while the bucket refills, so the
///   shared part must outlast that timer for the average to hold.
pub fn default_burst(dir: u32, rate_bps: u64) -> u64 {
    let per_second = rate_bps / 8;
    let window = if dir == direction::INGRESS {
        per_second / 2
    } else {
        per_second / 250
    };
    window.clamp(1 << 20, MAX_BURST_BYTES)
}

/// What the bucket says about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit.
    Pass,
    /// Within the limit, but the bucket is more than half empty: pass and
    /// signal congestion.
    Mark,
    /// Over the limit: not charged.
    Over,
}

/// Value of [`crate::names::RATE_LIMITS`]: one direction's bucket.
///
/// The configuration fields are the agent's; the state fields are written
/// by the programs only (the agent carries them over in
/// [`RateLimit::reconfigure`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateLimit {
    /// Serializes [`RateLimit::charge`] across CPUs.
    pub lock: bpf_spin_lock,
    /// Cost shift ([`RateParams::shift`]).
    pub shift: u32,
    /// Cost multiplier ([`RateParams::mult`]).
    pub mult: u64,
    /// Bucket size in ns.
    pub burst_ns: u64,
    /// Marking threshold in ns.
    pub mark_ns: u64,
    /// The configured rate in bits per second.
    pub rate_bps: u64,
    /// The configured burst in bytes.
    pub burst_bytes: u64,
    /// State: theoretical arrival time (`bpf_ktime_get_ns` clock), when the
    /// bucket is full again.
    pub tat_ns: u64,
    /// State: the fair share of each TCP sender, bytes per second (0: not
    /// computed yet, the whole rate).
    pub fair_rate: u64,
    /// State: start of the current measurement window.
    pub win_start_ns: u64,
    /// State: bytes admitted in the current measurement window.
    pub win_bytes: u64,
}

impl RateLimit {
    /// A full bucket with `params`.
    pub fn new(params: &RateParams) -> Self {
        let mut limit = Self::default();
        limit.set_params(params);
        limit
    }

    /// The parameters this bucket was configured with.
    pub fn params(&self) -> Option<RateParams> {
        RateParams::new(self.rate_bps, self.burst_bytes).ok()
    }

    fn set_params(&mut self, p: &RateParams) {
        self.shift = p.shift;
        self.mult = p.mult;
        self.burst_ns = p.burst_ns;
        self.mark_ns = p.mark_ns;
        self.rate_bps = p.rate_bps;
        self.burst_bytes = p.burst_bytes;
    }

    /// The rate in bytes per second (at least 1).
    #[inline(always)]
    fn rate_bytes(&self) -> u64 {
        if self.rate_bps >= 8 {
            self.rate_bps / 8
        } else {
            1
        }
    }

    /// How empty the bucket is at `now_ns`, in ns of transmission.
    #[inline(always)]
    pub fn backlog_ns(&self, now_ns: u64) -> u64 {
        self.tat_ns.saturating_sub(now_ns)
    }

    /// Charges a packet of `len` bytes arriving at `now_ns`. Runs in the
    /// kernel under the bucket's lock: inline, no calls, no panics.
    #[inline(always)]
    pub fn charge(&mut self, now_ns: u64, len: u32) -> Verdict {
        self.charge_marking(now_ns, len, self.mark_ns)
    }

    /// [`RateLimit::charge`] for ingress: packets are marked only once the
    /// bucket has dipped into its reserve (the receive windows keep it out
    /// of there; whatever gets in overran them).
    #[inline(always)]
    pub fn charge_ingress(&mut self, now_ns: u64, len: u32) -> Verdict {
        let mark_ns = self.burst_ns - self.reserve_ns();
        self.charge_marking(now_ns, len, mark_ns)
    }

    /// [`RateLimit::charge`] marking above a backlog of `mark_ns`.
    #[inline(always)]
    fn charge_marking(&mut self, now_ns: u64, len: u32, mark_ns: u64) -> Verdict {
        let backlog = self.backlog_ns(now_ns);
        if backlog > self.burst_ns {
            return Verdict::Over;
        }
        let start = if self.tat_ns > now_ns {
            self.tat_ns
        } else {
            now_ns
        };
        self.tat_ns = start.saturating_add(cost_ns(self.mult, self.shift, len));
        self.win_bytes = self.win_bytes.saturating_add(len as u64);
        let elapsed = now_ns.saturating_sub(self.win_start_ns);
        if elapsed >= FAIR_WINDOW_MAX_NS
            || (elapsed >= FAIR_WINDOW_MIN_NS && self.win_bytes >= FAIR_WINDOW_BYTES)
        {
            self.update_fair_rate(elapsed, backlog);
            self.win_start_ns = now_ns;
            self.win_bytes = 0;
        }
        if backlog > mark_ns {
            Verdict::Mark
        } else {
            Verdict::Pass
        }
    }

    /// The fair share of each TCP sender, bytes per second.
    #[inline(always)]
    pub fn fair_share(&self) -> u64 {
        if self.fair_rate == 0 {
            self.rate_bytes()
        } else {
            self.fair_rate
        }
    }

    /// The backlog the fair share steers to: a quarter of the bucket.
    #[inline(always)]
    fn target_ns(&self) -> u64 {
        self.mark_ns / 2
    }

    /// The pacing rate of each TCP sender of the cgroup at `now_ns`, bytes
    /// per second: the fair share, up to half of it more while the backlog
    /// is below its target and up to half of it less above, never more
    /// than the rate.
    #[inline(always)]
    pub fn pacing_rate(&self, now_ns: u64) -> u64 {
        let f = self.fair_share();
        let target = self.target_ns();
        let backlog = self.backlog_ns(now_ns);
        let paced = if backlog < target {
            f + div(f * div((target - backlog) * FAIR_ONE, target), 2 * FAIR_ONE)
        } else {
            let over = min(backlog - target, target);
            f - div(f * div(over * FAIR_ONE, target), 2 * FAIR_ONE)
        };
        min(paced, self.rate_bytes())
    }

    /// Closes a measurement window of `elapsed` ns (at least
    /// [`FAIR_WINDOW_MIN_NS`]) in which `win_bytes` were admitted, the last
    /// of them at `backlog`, and moves the fair share towards the one at
    /// which the senders fill the rate exactly with the backlog at its
    /// target.
    #[inline(always)]
    fn update_fair_rate(&mut self, elapsed: u64, backlog: u64) {
        let c = self.rate_bytes();
        // Measured rate, bytes per second (bounded so nothing overflows).
        let bytes = min(self.win_bytes, 1 << 33);
        let y = min(div(bytes * 1_000_000_000, elapsed), 4 * c);
        // Relative error, FAIR_ONE = 100 %, as a ratio of rates so that twice
        // and half the rate weigh the same.
        let up = if y == 0 {
            FAIR_ONE
        } else if y < c {
            div((c - y) * FAIR_ONE, FAIR_GAIN * y)
        } else {
            0
        };
        let down = if y > c {
            div((y - c) * FAIR_ONE, FAIR_GAIN * c)
        } else {
            0
        };
        // A standing backlog above target: drain it over a few windows.
        let target = self.target_ns();
        let excess = if backlog > target {
            min(backlog - target, 4 * elapsed)
        } else {
            0
        };
        let down = down + div(excess * FAIR_ONE, FAIR_GAIN * elapsed);
        let f = self.fair_share();
        let f = if up >= down {
            f * (FAIR_ONE + min(up - down, FAIR_ONE)) / FAIR_ONE
        } else {
            div(f * FAIR_ONE, FAIR_ONE + min(down - up, FAIR_ONE))
        };
        let floor = c / FAIR_FLOOR_DIV;
        self.fair_rate = if f > c {
            c
        } else if f < floor {
            if floor == 0 { 1 } else { floor }
        } else {
            f
        };
    }

    /// The part of the bucket kept out of receive windows, in ns.
    #[inline(always)]
    pub fn reserve_ns(&self) -> u64 {
        self.burst_ns / RESERVE_DIV
    }

    /// The bytes the bucket can still admit at `now_ns` before it is over
    /// the limit (0 when it is over or in debt).
    #[inline(always)]
    pub fn free_bytes(&self, now_ns: u64) -> u64 {
        let backlog = self.backlog_ns(now_ns);
        if backlog >= self.burst_ns {
            return 0;
        }
        ns_to_bytes(self.burst_ns - backlog, self.rate_bps)
    }

    /// The receive window clamp of each of `flows` TCP sockets of the
    /// cgroup at `now_ns`, for a socket whose smoothed round-trip time is
    /// `rtt_us` (0: unknown): an equal share of what the bucket can admit
    /// beyond its reserve, but no more than twice the share of the rate
    /// times the round-trip time (at least [`WINDOW_RTT_MIN`]), at least
    /// [`WINDOW_MIN`], at most [`RateLimit::window_cap`]. Runs in the
    /// kernel: no panics.
    #[inline(always)]
    pub fn window_grant(&self, now_ns: u64, flows: u64, rtt_us: u32) -> u32 {
        let flows = if flows == 0 { 1 } else { flows };
        let free = self.free_bytes(now_ns);
        let reserve = self.burst_bytes / RESERVE_DIV;
        let mut share = if free > reserve {
            div(free - reserve, flows)
        } else {
            0
        };
        if rtt_us != 0 {
            let rtt_ns = (rtt_us as u64).wrapping_mul(1_000);
            let in_flight = div(2 * ns_to_bytes(rtt_ns, self.rate_bps), flows);
            share = min(
                share,
                if in_flight < WINDOW_RTT_MIN {
                    WINDOW_RTT_MIN
                } else {
                    in_flight
                },
            );
        }
        let cap = self.window_cap();
        if share < WINDOW_MIN as u64 {
            WINDOW_MIN
        } else if share > cap as u64 {
            cap
        } else {
            share as u32
        }
    }

    /// The largest window any socket can be granted: the bucket without
    /// its reserve, at least [`WINDOW_CAP_MIN`]. Given as the window clamp
    /// of new sockets before their handshake, it also bounds their window
    /// scale, so that a grant of [`WINDOW_MIN`] is advertised as less than
    /// one segment.
    #[inline(always)]
    pub fn window_cap(&self) -> u32 {
        let cap = self.burst_bytes - self.burst_bytes / RESERVE_DIV;
        if cap < WINDOW_CAP_MIN as u64 {
            WINDOW_CAP_MIN
        } else if cap > WINDOW_UNCLAMPED as u64 {
            WINDOW_UNCLAMPED
        } else {
            cap as u32
        }
    }

    /// The bytes the bucket holds at `now_ns` (negative: in debt).
    pub fn tokens(&self, now_ns: u64) -> i64 {
        let free_ns = i128::from(self.burst_ns) - i128::from(self.backlog_ns(now_ns));
        let bytes = free_ns * i128::from(self.rate_bps) / NS_BITS as i128;
        i64::try_from(bytes).unwrap_or(if bytes < 0 { i64::MIN } else { i64::MAX })
    }

    /// Applies new parameters at `now_ns` (the `bpf_ktime_get_ns` clock,
    /// `CLOCK_MONOTONIC`), keeping the bucket's fill in bytes (what was owed
    /// at the old rate is owed at the new one, capped by the new bucket) and
    /// scaling each sender's fair share with the rate.
    pub fn reconfigure(&mut self, params: &RateParams, now_ns: u64) {
        let old_rate = u128::from(self.rate_bps);
        let owed_bytes = if old_rate == 0 {
            0
        } else {
            u128::from(self.backlog_ns(now_ns)) * old_rate / NS_BITS
        };
        let owed_ns = owed_bytes * NS_BITS / u128::from(params.rate_bps);
        let owed_ns = u64::try_from(owed_ns)
            .unwrap_or(u64::MAX)
            .min(params.burst_ns);
        self.tat_ns = if owed_ns == 0 { 0 } else { now_ns + owed_ns };
        self.fair_rate = if self.fair_rate == 0 || old_rate == 0 {
            0
        } else {
            let scaled = u128::from(self.fair_rate) * u128::from(params.rate_bps) / old_rate;
            u64::try_from(scaled).unwrap_or(u64::MAX).max(1)
        };
        self.win_start_ns = now_ns;
        self.win_bytes = 0;
        self.set_params(params);
    }
}

/// Value of the per-CPU [`crate::names::RATE_STATS`] map: one direction's
/// counters. Marked packets are also counted as passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateStats {
    /// Bytes let through.
    pub passed_bytes: u64,
    /// Packets let through (a GSO packet counts once).
    pub passed_packets: u64,
    /// Bytes let through with a congestion notification.
    pub marked_bytes: u64,
    /// Packets let through with a congestion notification.
    pub marked_packets: u64,
    /// Bytes dropped over the limit.
    pub dropped_bytes: u64,
    /// Packets dropped over the limit.
    pub dropped_packets: u64,
}

impl RateStats {
    /// Counts one packet of `len` bytes with `verdict`.
    #[inline(always)]
    pub fn count(&mut self, verdict: Verdict, len: u32) {
        let len = len as u64;
        match verdict {
            Verdict::Pass => {
                self.passed_bytes += len;
                self.passed_packets += 1;
            }
            Verdict::Mark => {
                self.passed_bytes += len;
                self.passed_packets += 1;
                self.marked_bytes += len;
                self.marked_packets += 1;
            }
            Verdict::Over => {
                self.dropped_bytes += len;
                self.dropped_packets += 1;
            }
        }
    }

    /// The sum of two sets of counters (e.g. of two CPUs).
    pub fn sum(&self, other: &Self) -> Self {
        Self {
            passed_bytes: self.passed_bytes.wrapping_add(other.passed_bytes),
            passed_packets: self.passed_packets.wrapping_add(other.passed_packets),
            marked_bytes: self.marked_bytes.wrapping_add(other.marked_bytes),
            marked_packets: self.marked_packets.wrapping_add(other.marked_packets),
            dropped_bytes: self.dropped_bytes.wrapping_add(other.dropped_bytes),
            dropped_packets: self.dropped_packets.wrapping_add(other.dropped_packets),
        }
    }
}

/// Value of [`crate::names::RATE_FLOWS`]: the TCP sockets of a cgroup with
/// an ingress limit that share its receive windows, kept by the sock_ops
/// program (one more when a socket is established, one less when it leaves
/// that state). Signed: a socket counted before its limit was removed and
/// given again may leave after the count restarted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateFlows {
    /// Established TCP sockets.
    pub flows: i64,
}

impl RateFlows {
    /// The number of sockets to share among (at least one).
    #[inline(always)]
    pub const fn share_count(&self) -> u64 {
        if self.flows < 1 { 1 } else { self.flows as u64 }
    }
}

const _: () = {
    assert!(size_of::<bpf_spin_lock>() == 4);
    assert!(size_of::<RateKey>() == 16);
    assert!(size_of::<RateLimit>() == 80);
    assert!(size_of::<RateStats>() == 48);
    assert!(size_of::<RateFlows>() == 8);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: `bytemuck::Pod` types: `#[repr(C)]`, no padding, any bit
    // pattern valid.
    unsafe impl aya::Pod for RateKey {}
    unsafe impl aya::Pod for RateLimit {}
    unsafe impl aya::Pod for RateStats {}
    unsafe impl aya::Pod for RateFlows {}
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn limit(rate_bps: u64, burst: u64) -> RateLimit {
        RateLimit::new(&RateParams::new(rate_bps, burst).expect("valid"))
    }

    /// Offers `len`-byte packets every `gap_ns` from `start` for `secs`
    /// seconds; returns the admitted bytes.
    fn offer(l: &mut RateLimit, start: u64, len: u32, gap_ns: u64, secs: u64) -> u64 {
        let mut admitted = 0;
        let mut t = start;
        while t < start + secs * SEC {
            if l.charge(t, len) != Verdict::Over {
                admitted += u64::from(len);
            }
            t += gap_ns;
        }
        admitted
    }

    #[test]
    fn cost_is_the_transmission_time_at_the_rate() {
        let p = RateParams::new(10_000_000, 64 * 1024).expect("valid");
        // 1250 bytes at 10 Mbit/s: 1 ms.
        assert_eq!(p.cost_ns(1250), MS);
        let p = RateParams::new(MAX_RATE_BPS, MAX_BURST_BYTES).expect("valid");
        // 65536 bytes at 1 Tbit/s: 524.288 ns.
        assert_eq!(p.cost_ns(65536), 524);
        let p = RateParams::new(MIN_RATE_BPS, MIN_BURST_BYTES).expect("valid");
        assert_eq!(p.cost_ns(3), 3 * SEC);
        assert_eq!(p.burst_ns, MIN_BURST_BYTES * SEC);
    }

    #[test]
    fn zero_tiny_and_absurd_parameters_are_refused() {
        assert_eq!(RateParams::new(0, 65536), Err(ParamsError::RateTooLow));
        assert_eq!(RateParams::new(7, 65536), Err(ParamsError::RateTooLow));
        assert_eq!(
            RateParams::new(MAX_RATE_BPS + 1, 65536),
            Err(ParamsError::RateTooHigh)
        );
        assert_eq!(
            RateParams::new(1_000_000, 100),
            Err(ParamsError::BurstTooSmall)
        );
        assert_eq!(
            RateParams::new(1_000_000, MAX_BURST_BYTES + 1),
            Err(ParamsError::BurstTooLarge)
        );
    }

    #[test]
    fn a_full_bucket_passes_its_burst_at_once_then_refuses() {
        let mut l = limit(8_000_000, 10_000);
        let t = 5 * SEC;
        // 1000-byte packets at the same instant: the backlog after n of them
        // is n ms, the bucket holds 10 ms.
        let verdicts: Vec<Verdict> = (0..12).map(|_| l.charge(t, 1000)).collect();
        assert!(
            verdicts[..5].iter().all(|v| *v == Verdict::Pass),
            "{verdicts:?}"
        );
        assert!(
            verdicts[6..11].iter().all(|v| *v == Verdict::Mark),
            "{verdicts:?}"
        );
        assert_eq!(verdicts[11], Verdict::Over, "{verdicts:?}");
        // 1 ms later one more packet's worth has come back.
        assert_ne!(l.charge(t + MS, 1000), Verdict::Over);
        assert_eq!(l.charge(t + MS, 1000), Verdict::Over);
    }

    #[test]
    fn a_packet_larger_than_the_bucket_passes_and_puts_it_in_debt() {
        let mut l = limit(8_000_000, 2_000);
        let t = SEC;
        assert_eq!(l.charge(t, 65_536), Verdict::Pass);
        assert!(l.tokens(t) < 0);
        assert_eq!(l.charge(t, 100), Verdict::Over);
        // After the debt is paid (65.5 ms), packets pass again.
        assert_eq!(l.charge(t + 66 * MS, 100), Verdict::Pass);
    }

    #[test]
    fn refused_packets_are_not_charged() {
        let mut l = limit(8_000_000, 2_000);
        assert_eq!(l.charge(SEC, 3_000), Verdict::Pass);
        let tat = l.tat_ns;
        assert_eq!(l.charge(SEC, 1_000), Verdict::Over);
        assert_eq!(l.tat_ns, tat);
    }

    #[test]
    fn an_idle_bucket_refills_only_up_to_its_size() {
        let mut l = limit(8_000_000, 10_000);
        assert_eq!(l.tokens(SEC), 10_000);
        l.charge(SEC, 4_000);
        assert_eq!(l.tokens(SEC), 6_000);
        assert_eq!(l.tokens(SEC + 2 * MS), 8_000);
        assert_eq!(l.tokens(100 * SEC), 10_000);
    }

    #[test]
    fn a_flood_is_held_to_the_rate() {
        // 1500-byte packets offered at 10x the 10 Mbit/s rate for 3 s.
        let mut l = limit(10_000_000, 1 << 20);
        let admitted = offer(&mut l, SEC, 1500, 120_000, 3);
        let expected = 3 * 10_000_000 / 8 + (1 << 20);
        let err = admitted.abs_diff(expected) as f64 / expected as f64;
        assert!(err < 0.01, "admitted {admitted}, expected {expected}");
    }

    #[test]
    fn reconfiguring_keeps_the_debt_in_bytes_and_scales_the_share() {
        let mut l = limit(8_000_000, 100_000);
        let now = 10 * SEC;
        l.charge(now, 50_000);
        l.fair_rate = 400_000;
        assert_eq!(l.backlog_ns(now), 50 * MS);
        let p = RateParams::new(80_000_000, 100_000).expect("valid");
        l.reconfigure(&p, now);
        // 50 kB owed at 80 Mbit/s: 5 ms.
        assert_eq!(l.backlog_ns(now), 5 * MS);
        assert_eq!(l.fair_rate, 4_000_000);
        assert_eq!(l.rate_bps, 80_000_000);
        assert_eq!(l.params(), Some(p));
        // A smaller bucket caps what is owed.
        let small = RateParams::new(8_000, 2_000).expect("valid");
        l.reconfigure(&small, now);
        assert_eq!(l.backlog_ns(now), small.burst_ns);
    }

    #[test]
    fn default_buckets_follow_the_rate_within_bounds() {
        assert_eq!(default_burst(direction::EGRESS, 10_000_000), 1 << 20);
        assert_eq!(default_burst(direction::EGRESS, 10_000_000_000), 5_000_000);
        assert_eq!(default_burst(direction::INGRESS, 10_000_000), 1 << 20);
        assert_eq!(default_burst(direction::INGRESS, 1_000_000_000), 62_500_000);
        assert_eq!(
            default_burst(direction::INGRESS, MAX_RATE_BPS),
            MAX_BURST_BYTES
        );
    }

    #[test]
    fn one_paced_sender_gets_the_whole_rate() {
        let l = limit(100_000_000, 1 << 20);
        assert_eq!(l.pacing_rate(SEC), 100_000_000 / 8);
    }

    /// Simulates `n` senders each paced at the bucket's pacing rate (read
    /// after each of their packets, as the sock_ops program does on ACKs)
    /// with `len`-byte packets for `secs` s; returns the admitted rate in
    /// bytes per second over the last second and the packets over the limit.
    fn paced(rate_bps: u64, burst: u64, n: usize, len: u32, secs: u64) -> (u64, u64) {
        let mut l = limit(rate_bps, burst);
        let start = SEC;
        let mut next: Vec<u64> = (0..n as u64).map(|i| start + i * 1000).collect();
        let (mut last_second, mut over) = (0u64, 0u64);
        loop {
            let (i, t) = next
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|&(_, t)| t)
                .expect("senders");
            if t >= start + secs * SEC {
                break;
            }
            match l.charge(t, len) {
                Verdict::Over => over += 1,
                _ if t >= start + (secs - 1) * SEC => last_second += u64::from(len),
                _ => {}
            }
            let rate = l.pacing_rate(t).max(1);
            next[i] = t + u64::from(len) * SEC / rate;
        }
        (last_second, over)
    }

    #[test]
    fn paced_senders_share_the_rate_and_fill_it() {
        for (rate, n) in [
            (10_000_000, 1),
            (10_000_000, 4),
            (100_000_000, 8),
            (1_000_000_000, 4),
        ] {
            let (got, over) = paced(rate, default_burst(direction::EGRESS, rate), n, 65_536, 5);
            let want = rate / 8;
            let err = got.abs_diff(want) as f64 / want as f64;
            assert!(
                err < 0.05,
                "{n} senders at {rate} bit/s: {got} B/s, want {want}"
            );
            assert_eq!(over, 0, "{n} senders at {rate} bit/s ran over the limit");
        }
    }

    #[test]
    fn an_idle_fair_share_grows_back_to_the_rate() {
        let mut l = limit(100_000_000, 1 << 20);
        l.fair_rate = l.rate_bytes() / FAIR_FLOOR_DIV;
        // Sparse traffic: each window closes after 100 ms with little in it.
        let mut t = SEC;
        for _ in 0..20 {
            l.charge(t, 1000);
            t += FAIR_WINDOW_MAX_NS;
        }
        assert_eq!(l.fair_share(), l.rate_bytes());
    }

    #[test]
    fn nanoseconds_convert_to_bytes_at_the_rate() {
        assert_eq!(ns_to_bytes(SEC, 8_000_000), 1_000_000);
        assert_eq!(ns_to_bytes(1_500 * MS + 999, 80_000_000), 15_000_009);
        assert_eq!(ns_to_bytes(0, MAX_RATE_BPS), 0);
        // The largest bucket at the slowest and the fastest rate.
        let p = RateParams::new(MIN_RATE_BPS, MAX_BURST_BYTES).expect("valid");
        assert_eq!(ns_to_bytes(p.burst_ns, MIN_RATE_BPS), MAX_BURST_BYTES);
        // At 1 Tbit/s a nanosecond is 125 bytes: the bucket's size in ns
        // is rounded down to one.
        let p = RateParams::new(MAX_RATE_BPS, MAX_BURST_BYTES).expect("valid");
        let back = ns_to_bytes(p.burst_ns, MAX_RATE_BPS);
        assert!(
            back <= MAX_BURST_BYTES && MAX_BURST_BYTES - back < 125,
            "{back}"
        );
    }

    #[test]
    fn windows_share_what_the_bucket_admits_beyond_its_reserve() {
        // 80 Mbit/s, 1 MB bucket: 250 kB of reserve, 750 kB to share.
        let mut l = limit(80_000_000, 1_000_000);
        assert_eq!(l.free_bytes(SEC), 1_000_000);
        assert_eq!(l.window_grant(SEC, 1, 0), 750_000);
        assert_eq!(l.window_grant(SEC, 3, 0), 250_000);
        assert_eq!(l.window_grant(SEC, 0, 0), 750_000, "no flows counted: one");
        assert_eq!(l.window_cap(), 750_000);
        // 600 kB admitted: 150 kB left to share.
        l.charge(SEC, 600_000);
        assert_eq!(l.free_bytes(SEC), 400_000);
        assert_eq!(l.window_grant(SEC, 1, 0), 150_000);
        // Into the reserve: the window closes below one segment.
        l.charge(SEC, 200_000);
        assert_eq!(l.window_grant(SEC, 1, 0), WINDOW_MIN);
        // 10 ms later 100 kB came back.
        assert_eq!(l.window_grant(SEC + 10 * MS, 1, 0), 50_000);
        // No more than twice the share of the rate times the RTT: 10 ms at
        // 80 Mbit/s is 100 kB; 1 ms would be 10 kB, less than 64 KiB.
        let l = limit(80_000_000, 1_000_000);
        assert_eq!(l.window_grant(SEC, 1, 10_000), 200_000);
        assert_eq!(l.window_grant(SEC, 2, 10_000), 100_000);
        assert_eq!(l.window_grant(SEC, 1, 1_000), 65_536);
        assert_eq!(l.window_grant(SEC, 1, 0), 750_000, "RTT unknown");
        // A tiny bucket still gets a window the size of an unscaled one.
        assert_eq!(limit(8_000, MIN_BURST_BYTES).window_cap(), WINDOW_CAP_MIN);
    }

    #[test]
    fn ingress_marks_only_in_the_reserve() {
        // 8 Mbit/s (a 1000-byte packet costs 1 ms) with a 40 ms bucket:
        // the reserve starts at a backlog of 30 ms.
        let mut l = limit(8_000_000, 40_000);
        let verdicts: Vec<Verdict> = (0..42).map(|_| l.charge_ingress(SEC, 1000)).collect();
        assert!(
            verdicts[..31].iter().all(|v| *v == Verdict::Pass),
            "{verdicts:?}"
        );
        assert!(
            verdicts[31..41].iter().all(|v| *v == Verdict::Mark),
            "{verdicts:?}"
        );
        assert_eq!(verdicts[41], Verdict::Over);
    }

    #[test]
    fn flow_counts_below_one_share_among_one() {
        assert_eq!(RateFlows { flows: 4 }.share_count(), 4);
        assert_eq!(RateFlows { flows: 0 }.share_count(), 1);
        assert_eq!(RateFlows { flows: -2 }.share_count(), 1);
    }

    /// TCP receivers whose windows [`RateLimit::window_grant`] chooses, fed
    /// by `n` greedy senders over a path of `rtt_ns`: a sender sends what
    /// its window allows in 64 KiB segments, one segment per `rtt_ns / 16`
    /// (the path's speed), each charged on arrival half a round trip later
    /// and acknowledged with a new window; a window smaller than a segment
    /// of `mss` bytes makes the sender wait 200 ms (its persist timer)
    /// before it sends what fits. Returns the bytes admitted in the last
    /// `secs - 1` seconds and the packets over the limit.
    fn windowed(rate_bps: u64, n: usize, rtt_ns: u64, secs: u64) -> (u64, u64) {
        const MSS: u64 = 1448;
        const PERSIST_NS: u64 = 200 * MS;
        let mut l = limit(rate_bps, default_burst(direction::INGRESS, rate_bps));
        // Per sender: bytes sent, bytes received, right edge of the window.
        let mut sent = vec![0u64; n];
        let mut received = vec![0u64; n];
        let mut edge = vec![u64::from(WINDOW_CAP_MIN); n];
        // Events: (time, sender, Some(segment length) = arrival, None = may send).
        let mut events: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize, Option<u64>)>> =
            (0..n)
                .map(|i| std::cmp::Reverse((SEC + i as u64, i, None)))
                .collect();
        let (start, end) = (2 * SEC, (secs + 1) * SEC);
        let (mut admitted, mut over) = (0u64, 0u64);
        while let Some(std::cmp::Reverse((t, i, arrival))) = events.pop() {
            if t >= end {
                break;
            }
            match arrival {
                Some(len) => {
                    match l.charge_ingress(t, len as u32) {
                        Verdict::Over => over += 1,
                        _ if t >= start => admitted += len,
                        _ => {}
                    }
                    received[i] += len;
                    let grant = u64::from(l.window_grant(t, n as u64, (rtt_ns / 1_000) as u32));
                    edge[i] = edge[i].max(received[i] + grant);
                    if sent[i] == received[i] {
                        events.push(std::cmp::Reverse((t + rtt_ns / 2, i, None)));
                    }
                }
                None => {
                    let window = edge[i] - sent[i];
                    if window >= MSS {
                        let len = window.min(65_536);
                        sent[i] += len;
                        events.push(std::cmp::Reverse((t + rtt_ns / 2, i, Some(len))));
                        events.push(std::cmp::Reverse((t + rtt_ns / 16, i, None)));
                    } else if sent[i] == received[i] && window > 0 {
                        // Persist probe: what fits, after the timer.
                        sent[i] += window;
                        events.push(std::cmp::Reverse((t + PERSIST_NS, i, Some(window))));
                    } else if sent[i] == received[i] {
                        events.push(std::cmp::Reverse((t + PERSIST_NS, i, None)));
                    }
                }
            }
        }
        (admitted, over)
    }

    #[test]
    fn windowed_senders_fill_the_rate_and_never_run_over_it() {
        for (rate, n, rtt) in [
            // Below a segment per round trip: the windows close and open.
            (10_000_000, 1, 50_000),
            (100_000_000, 4, 50_000),
            // A window per round trip paces.
            (1_000_000_000, 1, 50_000),
            (1_000_000_000, 4, 50_000),
            (100_000_000, 1, 20 * MS),
        ] {
            let secs = 5;
            let (got, over) = windowed(rate, n, rtt, secs);
            let want = rate / 8 * (secs - 1);
            let err = got.abs_diff(want) as f64 / want as f64;
            assert!(
                err < 0.05,
                "{n} senders at {rate} bit/s, RTT {rtt} ns: {got} bytes, want {want}"
            );
            assert_eq!(over, 0, "{n} senders at {rate} bit/s ran over the limit");
        }
    }

    #[test]
    fn counters_count_marked_packets_as_passed() {
        let mut s = RateStats::default();
        s.count(Verdict::Pass, 100);
        s.count(Verdict::Mark, 200);
        s.count(Verdict::Over, 400);
        assert_eq!(
            s,
            RateStats {
                passed_bytes: 300,
                passed_packets: 2,
                marked_bytes: 200,
                marked_packets: 1,
                dropped_bytes: 400,
                dropped_packets: 1,
            }
        );
        assert_eq!(s.sum(&s).dropped_bytes, 800);
    }

    #[test]
    fn direction_numbers_are_the_cgroup_attach_types() {
        assert_eq!(direction::INGRESS, 0);
        assert_eq!(direction::EGRESS, 1);
        assert_eq!(direction::name(direction::EGRESS), "egress");
    }

    proptest! {
        #[test]
        fn cost_matches_exact_arithmetic(
            rate in MIN_RATE_BPS..=MAX_RATE_BPS,
            len in 1u32..=(1 << 20),
        ) {
            let p = RateParams::new(rate, MIN_BURST_BYTES).expect("valid");
            let exact = u128::from(len) * NS_BITS / u128::from(rate);
            let got = u128::from(p.cost_ns(len));
            // Relative error below 2^-30, plus the rounding of one ns.
            prop_assert!(got.abs_diff(exact) <= exact / (1 << 30) + 1, "{got} vs {exact}");
        }

        #[test]
        fn admitted_bytes_never_exceed_rate_times_time_plus_burst_and_a_packet(
            rate in 8_000u64..=10_000_000_000,
            burst in MIN_BURST_BYTES..=(4 << 20),
            packets in proptest::collection::vec((1u32..=65_536, 0u64..=5 * MS), 1..300),
        ) {
            let mut l = limit(rate, burst);
            let start = 7 * SEC;
            let mut t = start;
            let mut admitted = 0u128;
            let mut largest = 0u128;
            for (len, gap) in packets {
                t += gap;
                if l.charge(t, len) != Verdict::Over {
                    admitted += u128::from(len);
                    largest = largest.max(u128::from(len));
                }
            }
            let allowed = u128::from(t - start) * u128::from(rate) / NS_BITS
                + u128::from(burst)
                + largest
                + 1;
            prop_assert!(admitted <= allowed, "admitted {admitted} > {allowed}");
        }

        #[test]
        fn a_full_bucket_admits_at_least_its_burst(
            rate in 8_000u64..=10_000_000_000,
            burst in MIN_BURST_BYTES..=(4 << 20),
            len in 64u32..=1500,
        ) {
            let mut l = limit(rate, burst);
            let mut admitted = 0u64;
            while l.charge(SEC, len) != Verdict::Over {
                admitted += u64::from(len);
            }
            prop_assert!(admitted >= burst, "{admitted} < {burst}");
        }

        #[test]
        fn the_pacing_rate_stays_within_the_floor_and_the_rate(
            rate in MIN_RATE_BPS..=MAX_RATE_BPS,
            burst in MIN_BURST_BYTES..=MAX_BURST_BYTES,
            events in proptest::collection::vec((1u32..=65_536, 0u64..=50 * MS), 1..100),
        ) {
            let mut l = limit(rate, burst);
            let mut t = SEC;
            for (len, gap) in events {
                t += gap;
                l.charge(t, len);
                let p = l.pacing_rate(t);
                let c = (rate / 8).max(1);
                prop_assert!(p <= c, "{p} > {c}");
                prop_assert!(p >= c / FAIR_FLOOR_DIV / 2, "{p} below the floor");
                prop_assert!(l.fair_share() <= c && l.fair_share() >= (c / FAIR_FLOOR_DIV).max(1));
            }
        }

        #[test]
        fn windows_together_never_grant_more_than_the_bucket_admits(
            rate in MIN_RATE_BPS..=MAX_RATE_BPS,
            burst in MIN_BURST_BYTES..=MAX_BURST_BYTES,
            flows in 0u64..1000,
            rtt_us in 0u32..=1_000_000,
            events in proptest::collection::vec((1u32..=65_536, 0u64..=50 * MS), 0..50),
        ) {
            let mut l = limit(rate, burst);
            let mut t = SEC;
            for (len, gap) in events {
                t += gap;
                l.charge(t, len);
            }
            let grant = u64::from(l.window_grant(t, flows, rtt_us));
            prop_assert!(grant >= u64::from(WINDOW_MIN));
            prop_assert!(grant <= u64::from(l.window_cap()));
            if grant > u64::from(WINDOW_MIN) {
                let shared = l.free_bytes(t) - burst / RESERVE_DIV;
                prop_assert!(grant * flows.max(1) <= shared, "{grant} x {flows} > {shared}");
            }
        }

        #[test]
        fn reconfiguring_never_leaves_more_debt_than_the_new_bucket(
            old in MIN_RATE_BPS..=MAX_RATE_BPS,
            new in MIN_RATE_BPS..=MAX_RATE_BPS,
            burst in MIN_BURST_BYTES..=MAX_BURST_BYTES,
            len in 1u32..=65_536,
        ) {
            let mut l = limit(old, burst);
            l.charge(SEC, len);
            l.charge(SEC, len);
            let p = RateParams::new(new, burst).expect("valid");
            l.reconfigure(&p, SEC);
            prop_assert!(l.backlog_ns(SEC) <= p.burst_ns);
            prop_assert_eq!(l.params(), Some(p));
        }
    }
}
