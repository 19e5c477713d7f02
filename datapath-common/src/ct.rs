//! Connection state and expiry, decided from the two entries of a flow.
//! The kernel only records what it saw (TCP flags per direction, last
//! packet time); the agent's garbage collector applies these rules.

use crate::{proto, tcp_flags};

/// A flow's state for expiry purposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// TCP: SYN seen, the handshake not complete (no reply yet, or a
    /// reply the SYN's sender has not acknowledged).
    SynSent,
    /// TCP: the peer has answered; the connection is up.
    Established,
    /// TCP: RST seen, or FIN seen in both directions.
    Closing,
    /// UDP: packets in one direction only.
    UdpUnreplied,
    /// UDP: packets in both directions.
    UdpReplied,
    /// ICMP echo.
    Icmp,
}

impl CtState {
    /// Classifies a flow from the TCP flags seen in each direction and
    /// whether the reply direction has carried any packet.
    pub fn of(proto: u8, orig_flags: u32, reply_flags: u32, replied: bool) -> Self {
        match proto {
            proto::TCP => {
                let all = orig_flags | reply_flags;
                if all & tcp_flags::RST != 0
                    || (orig_flags & tcp_flags::FIN != 0 && reply_flags & tcp_flags::FIN != 0)
                {
                    CtState::Closing
                } else if replied && orig_flags & tcp_flags::ACK != 0 {
                    // The handshake is complete only when the side that
                    // sent the SYN acknowledges the answer: the flows of a
                    // spoofed SYN flood are answered but never acknowledged.
                    CtState::Established
                } else {
                    CtState::SynSent
                }
            }
            proto::UDP if replied => CtState::UdpReplied,
            proto::UDP => CtState::UdpUnreplied,
            _ => CtState::Icmp,
        }
    }

    /// A short name for listings.
    pub fn name(self) -> &'static str {
        match self {
            CtState::SynSent => "syn-sent",
            CtState::Established => "established",
            CtState::Closing => "closing",
            CtState::UdpUnreplied => "unreplied",
            CtState::UdpReplied => "replied",
            CtState::Icmp => "active",
        }
    }
}

/// Idle timeouts in seconds, per state (defaults close to Cilium's and
/// nf_conntrack's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP before the reply: like nf_conntrack's `tcp_timeout_syn_sent` (Cilium: 60 s).
    pub tcp_syn: u64,
    /// Established TCP (Cilium: 6 h).
    pub tcp_established: u64,
    /// After FIN in both directions or RST (Cilium: 10 s).
    pub tcp_closing: u64,
    /// UDP seen one way only (nf_conntrack: 30 s).
    pub udp_unreplied: u64,
    /// UDP seen both ways (nf_conntrack: 120 s).
    pub udp_replied: u64,
    /// ICMP echo (nf_conntrack: 30 s).
    pub icmp: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn: 60,
            tcp_established: 21_600,
            tcp_closing: 10,
            udp_unreplied: 30,
            udp_replied: 120,
            icmp: 30,
        }
    }
}

impl Timeouts {
    /// The idle timeout of `state`, in seconds.
    pub fn of(&self, state: CtState) -> u64 {
        match state {
            CtState::SynSent => self.tcp_syn,
            CtState::Established => self.tcp_established,
            CtState::Closing => self.tcp_closing,
            CtState::UdpUnreplied => self.udp_unreplied,
            CtState::UdpReplied => self.udp_replied,
            CtState::Icmp => self.icmp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_flags::{ACK, FIN, RST, SYN};

    #[test]
    fn tcp_states_follow_the_handshake_and_close() {
        assert_eq!(CtState::of(proto::TCP, SYN, 0, false), CtState::SynSent);
        assert_eq!(
            CtState::of(proto::TCP, SYN | ACK, SYN | ACK, true),
            CtState::Established
        );
        assert_eq!(
            CtState::of(proto::TCP, SYN, SYN | ACK, true),
            CtState::SynSent,
            "answered but never acknowledged: a spoofed SYN"
        );
        assert_eq!(
            CtState::of(proto::TCP, SYN | ACK | FIN, SYN | ACK, true),
            CtState::Established
        );
        assert_eq!(
            CtState::of(proto::TCP, SYN | ACK | FIN, ACK | FIN, true),
            CtState::Closing
        );
        assert_eq!(
            CtState::of(proto::TCP, SYN, RST | ACK, true),
            CtState::Closing
        );
    }

    #[test]
    fn closed_tcp_expires_faster_than_established() {
        let t = Timeouts::default();
        assert!(t.of(CtState::Closing) < t.of(CtState::Established));
        assert!(t.of(CtState::UdpUnreplied) <= t.of(CtState::UdpReplied));
    }
}
