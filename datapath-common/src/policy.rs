//! Who may send what: the address rules the programs apply before any
//! protocol parsing, kept here so that the kernel side, the agent and the
//! tests share one definition.
//!
//! * Uplink sources: a packet arriving on the uplink that the programs
//!   redirect never meets the kernel's reverse-path and martian checks, so
//!   the programs make them ([`martian_source`]).
//! * Container neighbour discovery: a container is a host, not a router. It
//!   may not advertise itself as a router, send redirects, or advertise a
//!   neighbour address that is not its own ([`NeighbourRule`]).

/// ICMP (IPv4) type of a redirect.
pub const ICMP_REDIRECT: u8 = 5;
/// ICMPv6 type of a router solicitation (a host's, allowed).
pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 type of a router advertisement.
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
/// ICMPv6 type of a neighbour solicitation.
pub const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
/// ICMPv6 type of a neighbour advertisement.
pub const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// ICMPv6 type of a redirect.
pub const ICMPV6_REDIRECT: u8 = 137;
/// The solicited flag (S) in the first byte of a neighbour advertisement's
/// flags word.
pub const NA_FLAG_SOLICITED: u8 = 0x40;
/// IPv6 next-header values of the extension headers the programs walk past
/// to find the upper-layer protocol: hop-by-hop, routing, destination
/// options. (Fragment headers are handled apart: see [`IPV6_FRAGMENT`].)
pub const IPV6_EXTENSIONS: [u8; 3] = [0, 43, 60];
/// IPv6 next-header value of a fragment header.
pub const IPV6_FRAGMENT: u8 = 44;
/// IPv6 next-header value of ICMPv6.
pub const IPV6_ICMP: u8 = 58;
/// The most IPv6 extension headers the programs walk past. A packet from a
/// container whose upper-layer header lies further is dropped as malformed
/// (an attacker hiding an advertisement behind a long chain).
pub const IPV6_MAX_EXTENSIONS: usize = 6;

/// Whether `saddr` may not appear as the source of a packet arriving from
/// outside (the rules of the kernel's martian check, RFC 1122, RFC 5735):
/// loopback (127/8), "this network" (0/8, except a 0.0.0.0 source to the
/// limited broadcast address, as a DHCP client sends), multicast (224/4),
/// class E and the limited broadcast (240/4), and link-local (169.254/16)
/// unless `link_local_ok` (the node itself is addressed link-locally).
#[inline(always)]
pub fn martian_source(saddr: [u8; 4], daddr: [u8; 4], link_local_ok: bool) -> bool {
    match saddr[0] {
        0 => !(saddr == [0; 4] && daddr == [255; 4]),
        127 => true,
        224..=255 => true,
        169 => saddr[1] == 254 && !link_local_ok,
        _ => false,
    }
}

/// Whether `addr` is an IPv4 link-local address (169.254/16).
#[inline(always)]
pub fn is_link_local(addr: [u8; 4]) -> bool {
    addr[0] == 169 && addr[1] == 254
}

/// The IPv6 link-local address a kernel gives an interface with MAC `mac`
/// (modified EUI-64, RFC 4291 appendix A): fe80::/64 and the MAC with
/// ff:fe in its middle and the universal/local bit flipped.
#[inline(always)]
pub fn eui64_link_local(mac: [u8; 6]) -> [u8; 16] {
    [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

/// What happens to an ICMPv6 message a container sends, by its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighbourRule {
    /// Any other message: passed.
    Pass,
    /// A router advertisement: dropped.
    RouterAdvertisement,
    /// A redirect: dropped.
    Redirect,
    /// A neighbour advertisement: dropped unless solicited or for the
    /// container's own address ([`neighbour_advertisement_allowed`]).
    NeighbourAdvertisement,
}

impl NeighbourRule {
    /// The rule for ICMPv6 type `icmp_type`.
    #[inline(always)]
    pub fn of(icmp_type: u8) -> Self {
        match icmp_type {
            ICMPV6_ROUTER_ADVERTISEMENT => Self::RouterAdvertisement,
            ICMPV6_REDIRECT => Self::Redirect,
            ICMPV6_NEIGHBOUR_ADVERTISEMENT => Self::NeighbourAdvertisement,
            _ => Self::Pass,
        }
    }
}

/// Whether a container may send a neighbour advertisement with the first
/// `flags` byte for `target`, from a frame with source MAC `mac`: an
/// answer to a solicitation, or an unsolicited one for the link-local
/// address of its own MAC. An unsolicited advertisement of any other
/// address would take it over in the node's neighbour table.
#[inline(always)]
pub fn neighbour_advertisement_allowed(flags: u8, target: [u8; 16], mac: [u8; 6]) -> bool {
    if flags & NA_FLAG_SOLICITED != 0 {
        return true;
    }
    // Compared as two words: the verifier follows that better than a
    // comparison of arrays.
    let own = eui64_link_local(mac);
    let word = |a: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    word(&target, 0) == word(&own, 0) && word(&target, 8) == word(&own, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn martian_sources_follow_the_kernels_rules() {
        let to = [198, 18, 0, 2];
        for martian in [
            [127, 0, 0, 1],
            [0, 1, 2, 3],
            [0, 0, 0, 0],
            [224, 0, 0, 1],
            [239, 255, 255, 250],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
            [169, 254, 1, 1],
        ] {
            assert!(martian_source(martian, to, false), "{martian:?}");
        }
        for fine in [
            [198, 18, 0, 1],
            [8, 8, 8, 8],
            [169, 253, 0, 1],
            [223, 255, 0, 1],
        ] {
            assert!(!martian_source(fine, to, false), "{fine:?}");
        }
        assert!(!martian_source([169, 254, 1, 1], to, true));
        assert!(!martian_source([0; 4], [255; 4], false), "DHCP discover");
    }

    #[test]
    fn the_link_local_address_is_the_modified_eui64_of_the_mac() {
        let ll = eui64_link_local([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]);
        assert_eq!(
            std::net::Ipv6Addr::from(ll).to_string(),
            "fe80::42:acff:fe11:2"
        );
    }

    #[test]
    fn only_solicited_or_own_neighbour_advertisements_are_allowed() {
        let mac = [0x02, 0, 0, 0, 0, 5];
        let own = eui64_link_local(mac);
        let other = eui64_link_local([0x02, 0, 0, 0, 0, 6]);
        assert!(neighbour_advertisement_allowed(0, own, mac));
        assert!(neighbour_advertisement_allowed(
            NA_FLAG_SOLICITED,
            other,
            mac
        ));
        assert!(!neighbour_advertisement_allowed(0x20, other, mac));
        assert_eq!(NeighbourRule::of(134), NeighbourRule::RouterAdvertisement);
        assert_eq!(NeighbourRule::of(137), NeighbourRule::Redirect);
        assert_eq!(
            NeighbourRule::of(136),
            NeighbourRule::NeighbourAdvertisement
        );
        assert_eq!(NeighbourRule::of(135), NeighbourRule::Pass);
        assert_eq!(NeighbourRule::of(133), NeighbourRule::Pass);
    }
}
