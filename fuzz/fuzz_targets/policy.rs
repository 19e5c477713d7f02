//! The address rules the programs apply from the IP header alone
//! (`datapath_common::policy`), against references written with the
//! standard library's address classes: martian sources, the link-local
//! address of a MAC, and which neighbour advertisements a container may
//! send.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use datapath_common::policy::{
    ICMPV6_NEIGHBOUR_ADVERTISEMENT, ICMPV6_REDIRECT, ICMPV6_ROUTER_ADVERTISEMENT,
    NA_FLAG_SOLICITED, NeighbourRule, eui64_link_local, is_link_local, martian_source,
    neighbour_advertisement_allowed,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    saddr: [u8; 4],
    daddr: [u8; 4],
    link_local_ok: bool,
    flags: u8,
    target: [u8; 16],
    mac: [u8; 6],
    own_target: bool,
    icmp_type: u8,
}

/// The kernel's martian-source rules, by the standard library's classes.
fn martian_reference(s: Ipv4Addr, d: Ipv4Addr, link_local_ok: bool) -> bool {
    let this_network = s.octets()[0] == 0;
    let dhcp = s.is_unspecified() && d.is_broadcast();
    (this_network && !dhcp)
        || s.is_loopback()
        || s.is_multicast()
        || s.octets()[0] >= 240
        || (s.is_link_local() && !link_local_ok)
}

fuzz_target!(|input: Input| {
    let (s, d) = (Ipv4Addr::from(input.saddr), Ipv4Addr::from(input.daddr));
    assert_eq!(
        martian_source(input.saddr, input.daddr, input.link_local_ok),
        martian_reference(s, d, input.link_local_ok),
        "{s} -> {d}"
    );
    assert_eq!(is_link_local(input.saddr), s.is_link_local());

    let ll = Ipv6Addr::from(eui64_link_local(input.mac));
    assert!(ll.is_unicast_link_local(), "{ll}");
    let o = ll.octets();
    assert_eq!(&o[13..], &input.mac[3..], "{ll}");
    assert_eq!(o[8] ^ 0x02, input.mac[0]);
    assert_eq!((o[11], o[12]), (0xff, 0xfe));

    let target = if input.own_target {
        eui64_link_local(input.mac)
    } else {
        input.target
    };
    let allowed = neighbour_advertisement_allowed(input.flags, target, input.mac);
    let solicited = input.flags & NA_FLAG_SOLICITED != 0;
    assert_eq!(allowed, solicited || Ipv6Addr::from(target) == ll);

    let rule = NeighbourRule::of(input.icmp_type);
    let expected = match input.icmp_type {
        ICMPV6_ROUTER_ADVERTISEMENT => NeighbourRule::RouterAdvertisement,
        ICMPV6_REDIRECT => NeighbourRule::Redirect,
        ICMPV6_NEIGHBOUR_ADVERTISEMENT => NeighbourRule::NeighbourAdvertisement,
        _ => NeighbourRule::Pass,
    };
    assert_eq!(rule, expected);
});
