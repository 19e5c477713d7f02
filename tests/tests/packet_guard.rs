//! Packet tests of the checks made from the IP header alone: spoofed and
//! martian sources on the uplink, the direct-routing ban for every
//! protocol and fragment, neighbour discovery a container may not send,
//! an unconfigured datapath, and the XDP program's own drop reasons.

use std::net::{Ipv4Addr, Ipv6Addr};

use datapath_common::{
    CONFIG_F_ALLOW_DIRECT_ROUTING, CONFIG_F_READY, Stat,
    policy::{NA_FLAG_SOLICITED, eui64_link_local},
    proto,
};
use datapath_tests::{
    frame::{self, Frame, IcmpError},
    programs::{Programs, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS},
    testbed::{self, CTR, NODE},
};

/// `frame` through both uplink programs of fresh test datapaths: each
/// verdict and the count of `stat` it left.
fn uplink_both(p: fn() -> Programs, frame: &[u8], stat: Stat) -> [(u32, u64); 2] {
    let mut tc = p();
    let t = tc.uplink_tc(frame).verdict;
    let mut xdp = p();
    let x = xdp.uplink_xdp(frame).verdict;
    [(t, tc.stat(stat)), (x, xdp.stat(stat))]
}

#[track_caller]
fn assert_dropped_by_both(frame: &[u8], stat: Stat, what: &str) {
    let got = uplink_both(testbed::datapath, frame, stat);
    assert_eq!(got, [(TC_ACT_SHOT, 1), (XDP_DROP, 1)], "{what}");
}

// ---- spoofed and martian sources from the uplink ----------------------------------------------

#[test]
fn uplink_packets_from_martian_sources_are_dropped_and_counted() {
    for src in [
        "127.0.0.1",
        "0.1.2.3",
        "224.0.0.5",
        "240.0.0.1",
        "255.255.255.255",
        "169.254.7.7",
    ] {
        // To a published port: the flow the attacker wants.
        let f = Frame::udp(format!("{src}:4000").as_str(), "198.18.0.2:5353").build();
        assert_dropped_by_both(&f, Stat::DropMartian, src);
    }
}

#[test]
fn link_local_sources_pass_when_the_node_itself_is_link_local() {
    let link_local = || {
        let mut cfg = testbed::config();
        cfg.node_addr = [169, 254, 0, 2];
        let mut p = testbed::datapath_with(cfg);
        p.insert_node_addr([169, 254, 0, 2], testbed::UPLINK_IFINDEX);
        p
    };
    let f = Frame::udp("169.254.0.1:4000", "169.254.0.2:5353").build();
    let got = uplink_both(link_local, &f, Stat::DropMartian);
    assert_eq!(
        got,
        [
            (TC_ACT_REDIRECT, 0),
            (datapath_tests::programs::XDP_REDIRECT, 0)
        ]
    );
}

#[test]
fn uplink_packets_claiming_a_pool_node_or_gateway_source_are_dropped_and_counted() {
    let gateway = testbed::config().gateway_addr;
    for src in [CTR.addr, [198, 19, 0, 77], NODE, gateway] {
        let f = Frame::udp((Ipv4Addr::from(src), 4000), "198.18.0.2:5353").build();
        assert_dropped_by_both(&f, Stat::DropUplinkSpoofed, &format!("{src:?}"));
    }
    // A genuine client is translated.
    let f = Frame::udp("198.18.0.1:4000", "198.18.0.2:5353").build();
    let got = uplink_both(testbed::datapath, &f, Stat::DropUplinkSpoofed);
    assert_eq!(got[0], (TC_ACT_REDIRECT, 0));
}

/// One uplink frame through a fresh-or-given datapath's TC or XDP program:
/// its verdict and how far `stat` moved.
fn uplink_run(p: &mut Programs, xdp: bool, frame: &[u8], stat: Stat) -> (u32, u64) {
    let before = p.stat(stat);
    let verdict = if xdp {
        p.uplink_xdp(frame).verdict
    } else {
        p.uplink_tc(frame).verdict
    };
    (verdict, p.stat(stat) - before)
}

#[test]
fn a_node_address_as_uplink_source_is_dropped_on_every_path_but_an_established_flows() {
    // Only a packet matching an established flow skips the node address
    // check: every other path could start something with it.
    let node = Ipv4Addr::from(NODE);
    for xdp in [false, true] {
        let (drop, redirect) = if xdp {
            (XDP_DROP, datapath_tests::programs::XDP_REDIRECT)
        } else {
            (TC_ACT_SHOT, TC_ACT_REDIRECT)
        };
        let mut p = testbed::datapath();
        // A flow through the published port, for the ICMP error to be about.
        let syn = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
        assert_eq!(
            uplink_run(&mut p, xdp, &syn, Stat::DropUplinkSpoofed),
            (redirect, 0),
            "xdp={xdp}: a genuine client opens the flow"
        );
        let synack = Frame::tcp("198.18.0.2:8080", "198.18.0.1:40000")
            .tcp_flags(frame::tcp_flags::SYN | frame::tcp_flags::ACK);
        let frames = [
            (
                "an ICMP error about the flow",
                Frame::icmp_error(NODE, NODE, IcmpError::PortUnreachable, &synack).build(),
            ),
            (
                "a SYN to the published port",
                Frame::tcp((node, 40001), "198.18.0.2:8080").build(),
            ),
            (
                "a protocol the parser does not translate",
                Frame::raw_ip(node, node, 132).payload(vec![0; 32]).build(),
            ),
            (
                "a later fragment",
                Frame::udp((node, 4000), "198.18.0.2:5353")
                    .payload(vec![1; 64])
                    .fragment(false, 8)
                    .build(),
            ),
            (
                "a TCP header cut short",
                Frame::raw_ip(node, node, proto::TCP)
                    .payload(vec![0; 8])
                    .build(),
            ),
        ];
        for (what, f) in frames {
            assert_eq!(
                uplink_run(&mut p, xdp, &f, Stat::DropUplinkSpoofed),
                (drop, 1),
                "xdp={xdp}: {what}"
            );
        }
    }
}

// ---- the direct-routing ban ----------------------------------------------------------------------

/// Packets to the container's address of every kind the parser does not
/// translate, or translates only in part.
fn direct_packets() -> Vec<(&'static str, Vec<u8>)> {
    let (client, ctr) = ("198.18.0.1", CTR.ip());
    vec![
        (
            "first fragment",
            Frame::udp("198.18.0.1:4000", (ctr, 80))
                .payload(vec![1; 64])
                .fragment(true, 0)
                .build(),
        ),
        (
            "later fragment",
            Frame::udp("198.18.0.1:4000", (ctr, 80))
                .payload(vec![1; 64])
                .fragment(false, 8)
                .build(),
        ),
        (
            "SCTP",
            Frame::raw_ip(client, ctr, 132).payload(vec![0; 32]).build(),
        ),
        (
            "GRE",
            Frame::raw_ip(client, ctr, 47).payload(vec![0; 8]).build(),
        ),
        (
            "ESP",
            Frame::raw_ip(client, ctr, 50).payload(vec![0; 16]).build(),
        ),
        (
            "ICMP timestamp",
            Frame::raw_ip(client, ctr, proto::ICMP)
                .payload(vec![
                    13, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ])
                .build(),
        ),
        ("TCP", Frame::tcp("198.18.0.1:40000", (ctr, 80)).build()),
    ]
}

#[test]
fn nothing_reaches_a_container_address_from_the_uplink_whatever_the_protocol() {
    for (what, f) in direct_packets() {
        assert_dropped_by_both(&f, Stat::DropDirectRouting, what);
    }
    // An address of the pool no container holds yet is no different.
    let f = Frame::tcp("198.18.0.1:40000", "198.19.0.200:80").build();
    assert_dropped_by_both(&f, Stat::DropDirectRouting, "unassigned pool address");
}

#[test]
fn direct_routing_when_allowed_leaves_every_protocol_to_the_node() {
    let allowed = || {
        let mut cfg = testbed::config();
        cfg.flags |= CONFIG_F_ALLOW_DIRECT_ROUTING;
        testbed::datapath_with(cfg)
    };
    for (what, f) in direct_packets() {
        let got = uplink_both(allowed, &f, Stat::DropDirectRouting);
        assert_eq!(got, [(TC_ACT_OK, 0), (XDP_PASS, 0)], "{what}");
    }
}

// ---- neighbour discovery from containers ---------------------------------------------------------

/// The container's link-local address.
fn ctr_link_local() -> Ipv6Addr {
    eui64_link_local(CTR.mac).into()
}

/// An ICMPv6 message of `icmp_type` with `body` after the type, code and
/// checksum, from the container's link-local address, behind the
/// extension headers `ext` (each `(next header of the one before, bytes)`).
fn icmpv6(icmp_type: u8, body: &[u8], ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut payload = Vec::new();
    let first = ext.first().map_or(58, |(n, _)| *n);
    for (_, bytes) in ext {
        payload.extend_from_slice(bytes);
    }
    payload.extend_from_slice(&[icmp_type, 0, 0, 0]);
    payload.extend_from_slice(body);
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    CTR.frame(Frame::raw_ip(ctr_link_local(), dst, first).payload(payload))
}

/// A neighbour advertisement body: flags, reserved, target.
fn na_body(flags: u8, target: Ipv6Addr) -> Vec<u8> {
    let mut b = vec![flags, 0, 0, 0];
    b.extend_from_slice(&target.octets());
    b
}

/// An 8-byte extension header with next header `next`.
fn ext8(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

#[track_caller]
fn container_verdict(frame: &[u8], stat: Stat) -> (u32, u64) {
    let mut p = testbed::datapath();
    let r = p.container_tc(frame, CTR.ifindex);
    (r.verdict, p.stat(stat))
}

#[test]
fn router_advertisements_and_redirects_from_a_container_are_dropped_even_behind_extension_headers()
{
    let ra_body = vec![64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    let hop_by_hop = vec![
        (0, ext8(60)),
        (60, ext8(44)),
        (44, vec![58, 0, 0, 0, 0, 0, 0, 1]),
    ];
    for (what, frame, stat) in [
        (
            "RA",
            icmpv6(134, &ra_body, &[]),
            Stat::DropRouterAdvertisement,
        ),
        (
            "RA behind hop-by-hop, destination options and a first fragment header",
            icmpv6(134, &ra_body, &hop_by_hop),
            Stat::DropRouterAdvertisement,
        ),
        (
            "ICMPv6 redirect",
            icmpv6(137, &[0; 36], &[]),
            Stat::DropRedirect,
        ),
        (
            "ICMP redirect",
            CTR.frame(
                Frame::raw_ip(CTR.ip(), testbed::config().gateway_addr, proto::ICMP)
                    .payload(vec![5, 1, 0, 0, 198, 19, 0, 9, 0, 0, 0, 0]),
            ),
            Stat::DropRedirect,
        ),
    ] {
        assert_eq!(container_verdict(&frame, stat), (TC_ACT_SHOT, 1), "{what}");
    }
    // A chain longer than the programs walk is refused, not passed.
    let long: Vec<(u8, Vec<u8>)> = (0..8).map(|_| (60, ext8(60))).collect();
    let mut long = long;
    long.push((60, ext8(58)));
    assert_eq!(
        container_verdict(&icmpv6(134, &ra_body, &long), Stat::DropMalformed),
        (TC_ACT_SHOT, 1)
    );
}

#[test]
fn a_container_may_advertise_only_its_own_address_unless_asked() {
    let other = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let cases = [
        (
            "unsolicited, another address",
            na_body(0x20, other),
            TC_ACT_SHOT,
            1,
        ),
        (
            "unsolicited, its own",
            na_body(0x20, ctr_link_local()),
            TC_ACT_OK,
            0,
        ),
        (
            "solicited, another address",
            na_body(NA_FLAG_SOLICITED, other),
            TC_ACT_OK,
            0,
        ),
    ];
    for (what, body, verdict, n) in cases {
        let got = container_verdict(&icmpv6(136, &body, &[]), Stat::DropNeighbourAdvertisement);
        assert_eq!(got, (verdict, n), "{what}");
    }
    // Solicitations and echo requests are a host's business.
    for t in [133, 135, 128] {
        let got = container_verdict(&icmpv6(t, &[0; 20], &[]), Stat::DropRouterAdvertisement);
        assert_eq!(got, (TC_ACT_OK, 0), "type {t}");
    }
}

// ---- counters that mean what they say ------------------------------------------------------------

#[test]
fn an_unconfigured_datapath_drops_container_traffic_and_counts_it() {
    let mut p = Programs::load();
    let f = CTR.frame(Frame::udp((CTR.ip(), 4000), "198.18.0.1:53"));
    let r = p.container_tc(&f, CTR.ifindex);
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(p.stat(Stat::DropNotConfigured), 1);
    // A configuration not marked ready is no configuration.
    let mut cfg = testbed::config();
    cfg.flags &= !CONFIG_F_READY;
    p.set_config(cfg);
    assert_eq!(p.container_tc(&f, CTR.ifindex).verdict, TC_ACT_SHOT);
    assert_eq!(p.stat(Stat::DropNotConfigured), 2);
}

#[test]
fn xdp_without_the_containers_endpoint_drops_with_its_own_reason() {
    let mut p = testbed::datapath();
    // The published port still leads to the container, whose endpoint
    // is gone (removed between the lookups, say).
    assert!(p.remove_endpoint(CTR.addr));
    let f = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
    assert_eq!(p.uplink_xdp(&f).verdict, XDP_DROP);
    assert_eq!(p.stat(Stat::DropNoEndpoint), 1);
    assert_eq!(p.stat(Stat::DropHelperFailed), 0);
    assert_eq!(p.stat(Stat::DropMalformed), 0);
}
