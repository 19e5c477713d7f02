//! Connection-tracking rules shared by the kernel and the agent: idle
//! timeouts per state, sequence arithmetic and the RST window, when a UDP
//! flow becomes a stream, and the masquerade port search.
//!
//! The kernel applies all of them itself (see `datapath-ebpf/src/conntrack.rs`);
//! the agent uses them only to describe flows.

use bytemuck::{Pod, Zeroable};

use crate::{ct_state, proto};

/// Idle timeouts in seconds, per state; part of [`crate::Config`]. A zero
/// means the default ([`Timeouts::DEFAULT`]), so that a datapath whose
/// configuration predates a field still expires flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Timeouts {
    /// TCP before the handshake completed (Cilium: 60 s).
    pub tcp_syn: u32,
    /// Established TCP (Cilium: 6 h).
    pub tcp_established: u32,
    /// After FIN in both directions or an accepted RST (Cilium: 10 s).
    pub tcp_closing: u32,
    /// UDP seen one way, or answered only once (nf_conntrack's
    /// `udp_timeout`: 30 s).
    pub udp: u32,
    /// UDP seen both ways more than once (nf_conntrack's
    /// `udp_timeout_stream`: 120 s).
    pub udp_stream: u32,
    /// ICMP echo (nf_conntrack: 30 s).
    pub icmp: u32,
}

impl Timeouts {
    /// The defaults.
    pub const DEFAULT: Self = Self {
        tcp_syn: 60,
        tcp_established: 21_600,
        tcp_closing: 10,
        udp: 30,
        udp_stream: 120,
        icmp: 30,
    };

    /// All zero: every timeout is the default.
    pub const UNSET: Self = Self {
        tcp_syn: 0,
        tcp_established: 0,
        tcp_closing: 0,
        udp: 0,
        udp_stream: 0,
        icmp: 0,
    };

    /// The idle timeout in seconds of a flow of protocol `proto` in
    /// [`ct_state`] `state`.
    #[inline(always)]
    pub fn of(&self, proto: u8, state: u8) -> u32 {
        let (set, default) = match (proto, state) {
            (proto::TCP, ct_state::TCP_ESTABLISHED) => {
                (self.tcp_established, Self::DEFAULT.tcp_established)
            }
            (proto::TCP, ct_state::TCP_CLOSING) => (self.tcp_closing, Self::DEFAULT.tcp_closing),
            (proto::TCP, _) => (self.tcp_syn, Self::DEFAULT.tcp_syn),
            (proto::UDP, ct_state::STREAM) => (self.udp_stream, Self::DEFAULT.udp_stream),
            (proto::UDP, _) => (self.udp, Self::DEFAULT.udp),
            _ => (self.icmp, Self::DEFAULT.icmp),
        };
        if set == 0 { default } else { set }
    }

    /// [`Timeouts::of`] in nanoseconds.
    #[inline(always)]
    pub fn of_ns(&self, proto: u8, state: u8) -> u64 {
        u64::from(self.of(proto, state)) * 1_000_000_000
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Whether a flow last seen at `last_seen_ns` has been idle for its whole
/// timeout of `timeout_ns` at `now_ns`.
#[inline(always)]
pub fn idle_expired(now_ns: u64, last_seen_ns: u64, timeout_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) >= timeout_ns
}

/// Sequence number comparison modulo 2^32 (RFC 1982): `a` comes after `b`.
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The sequence number just past a segment: `seq` plus its payload, SYN
/// and FIN each counting one.
#[inline(always)]
pub const fn seg_end(seq: u32, payload_len: u32, flags: u32) -> u32 {
    let mut n = payload_len;
    if flags & crate::tcp_flags::SYN != 0 {
        n += 1;
    }
    if flags & crate::tcp_flags::FIN != 0 {
        n += 1;
    }
    seq.wrapping_add(n)
}

/// How far outside the bytes in flight an accepted RST may lie, in
/// sequence space: room for segments and acknowledgements reordered
/// across CPUs or queues.
pub const RST_SLACK: u32 = 1 << 20;

/// Whether a RST with sequence number `seq` belongs to an established
/// connection whose RST sender has sent up to `sender_end` and whose other
/// side has acknowledged up to `receiver_ack` (nf_conntrack's RST window
/// check, simplified): a real RST carries the sender's next sequence
/// number, or an acknowledgement number the other side sent, both of which
/// lie in `[receiver_ack, sender_end]`. Anything further than
/// [`RST_SLACK`] from that span is a stray (a late segment of an old
/// connection) or a blind injection, and must not end the flow.
#[inline(always)]
pub const fn rst_in_window(seq: u32, sender_end: u32, receiver_ack: u32) -> bool {
    let low = receiver_ack.wrapping_sub(RST_SLACK);
    let span = sender_end.wrapping_add(RST_SLACK).wrapping_sub(low);
    seq.wrapping_sub(low) <= span
}

/// Whether a UDP (or ICMP echo) flow with `orig` packets one way and
/// `reply` packets the other has seen traffic both ways more than once:
/// a stream, which gets the longer timeout and the main table.
#[inline(always)]
pub const fn is_stream(orig: u64, reply: u64) -> bool {
    orig >= 2 && reply >= 2
}

/// How many random ports a new masqueraded flow tries (after first trying
/// to keep the container's own port). Each probe is independent and
/// uniform, so with a fraction `f` of the range in use for the flow's
/// destination they all miss with probability `f^128`: one in a million
/// at 90 %, 0.14 % at 95 %, 7.5 % at 98 %, 28 % at 99 %
/// ([`random_probes_miss`]).
pub const SNAT_PROBES: u32 = 128;

/// How many consecutive ports (from a random start) a new masqueraded
/// flow scans when its random probes missed: it fails only if all of them
/// are taken, so a range of up to this many ports fails only when full.
pub const SNAT_SCAN: u32 = 1024;

/// The probability that the random probes of a new masqueraded flow all
/// find their port taken when a fraction `used` of the range is.
pub fn random_probes_miss(used: f64) -> f64 {
    let mut p = 1.0;
    for _ in 0..SNAT_PROBES {
        p *= used;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_timeouts_are_the_defaults() {
        let t = Timeouts::UNSET;
        assert_eq!(t.of(proto::TCP, ct_state::TCP_ESTABLISHED), 21_600);
        assert_eq!(t.of(proto::UDP, ct_state::UNREPLIED), 30);
        assert_eq!(t.of(proto::UDP, ct_state::REPLIED), 30);
        assert_eq!(t.of(proto::UDP, ct_state::STREAM), 120);
        assert_eq!(t.of(proto::ICMP, ct_state::STREAM), 30);
        let set = Timeouts {
            tcp_closing: 3,
            ..Timeouts::UNSET
        };
        assert_eq!(set.of(proto::TCP, ct_state::TCP_CLOSING), 3);
        assert_eq!(set.of(proto::TCP, ct_state::TCP_SYN_SENT), 60);
    }

    #[test]
    fn sequence_numbers_compare_across_the_wrap() {
        assert!(seq_after(5, 1));
        assert!(seq_after(2, u32::MAX - 3));
        assert!(!seq_after(u32::MAX - 3, 2));
        assert_eq!(seg_end(u32::MAX, 0, crate::tcp_flags::SYN), 0);
        assert_eq!(seg_end(100, 10, crate::tcp_flags::FIN), 111);
    }

    #[test]
    fn a_rst_in_flight_is_accepted_and_a_stray_one_is_not() {
        // The other side acknowledged 1000; the sender has sent up to 5000.
        assert!(rst_in_window(5000, 5000, 1000));
        assert!(rst_in_window(1000, 5000, 1000));
        assert!(rst_in_window(3000, 5000, 1000));
        assert!(rst_in_window(5000 + RST_SLACK, 5000, 1000));
        assert!(!rst_in_window(5001 + RST_SLACK, 5000, 1000));
        assert!(!rst_in_window(5000 + (1 << 31), 5000, 1000));
        // Across the wrap.
        assert!(rst_in_window(3, 10, u32::MAX - 10));
        assert!(!rst_in_window(u32::MAX / 2, 10, u32::MAX - 10));
    }

    #[test]
    fn udp_is_a_stream_after_two_packets_each_way() {
        assert!(!is_stream(1, 1));
        assert!(!is_stream(5, 1));
        assert!(is_stream(2, 2));
    }

    #[test]
    fn random_probes_miss_only_near_full_use() {
        assert!(random_probes_miss(0.9) < 1e-5);
        assert!(random_probes_miss(0.95) < 0.002);
        assert!(random_probes_miss(0.99) > 0.2);
    }
}
