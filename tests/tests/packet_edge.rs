//! Uplink and container programs on the frames that are not plain: TTL at
//! the limit, fragments, options, VLAN tags, zero UDP checksums, ICMP,
//! padding, malformed headers, an unconfigured datapath.

use datapath_common::{Stat, ct_action, proto};
use datapath_tests::{
    frame::{Frame, tcp_flags},
    packet::{ParsedFrame, verify_checksums},
    programs::{
        Programs, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
    testbed,
};

const NODE: [u8; 4] = testbed::NODE;
const BACKEND: [u8; 4] = testbed::CTR.addr;

fn published() -> Programs {
    testbed::datapath()
}

/// Runs `frame` through both uplink hooks on fresh datapaths; asserts
/// that both redirected it to the container with its destination
/// translated and valid checksums; returns both outputs, parsed.
#[track_caller]
fn dnat_by_both(frame: &[u8]) -> [(Vec<u8>, ParsedFrame); 2] {
    let [(tcv, tco, _), (xv, xo, _)] = both(frame);
    assert_eq!((tcv, xv), (TC_ACT_REDIRECT, XDP_REDIRECT));
    [tco, xo].map(|out| {
        verify_checksums(&out).expect("valid checksums");
        let p = ParsedFrame::parse(&out).expect("parses");
        assert_eq!(p.ipv4().destination, BACKEND);
        (out, p)
    })
}

/// Runs `frame` through both uplink hooks on fresh datapaths; returns the
/// TC and XDP results and their datapaths.
fn both(frame: &[u8]) -> [(u32, Vec<u8>, Programs); 2] {
    let mut tc = published();
    let r = tc.uplink_tc(frame);
    let mut xdp = published();
    let x = xdp.uplink_xdp(frame);
    [(r.verdict, r.data, tc), (x.verdict, x.data, xdp)]
}

#[test]
fn udp_with_a_zero_checksum_keeps_it_zero_after_dnat() {
    let input = Frame::udp("198.18.0.1:4000", "198.18.0.2:5353")
        .payload(&b"query"[..])
        .udp_zero_checksum()
        .build();
    for (_, p) in dnat_by_both(&input) {
        assert_eq!(p.ports(), (4000, 53));
        assert_eq!(p.udp().checksum, 0, "a zero UDP checksum stays zero");
    }
}

#[test]
fn udp_with_a_checksum_is_dnatted_with_a_valid_checksum() {
    let input = Frame::udp("198.18.0.1:4000", "198.18.0.2:5353")
        .payload(vec![0xab; 33])
        .build();
    for (_, p) in dnat_by_both(&input) {
        assert_ne!(p.udp().checksum, 0);
    }
}

#[test]
fn ttl_of_one_is_dropped_and_counted() {
    let input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
        .ttl(1)
        .build();
    let [(tcv, _, mut tc), (xv, _, mut xdp)] = both(&input);
    assert_eq!((tcv, xv), (TC_ACT_SHOT, XDP_DROP));
    assert_eq!(tc.stat(Stat::DropTtlExceeded), 1);
    assert_eq!(xdp.stat(Stat::DropTtlExceeded), 1);
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    let input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
        .ipv4_options(&[1, 1, 1, 0, 0x94, 4, 0, 0])
        .payload(&b"hi"[..])
        .build();
    for (_, p) in dnat_by_both(&input) {
        assert_eq!(p.ipv4().options.as_slice(), &[1, 1, 1, 0, 0x94, 4, 0, 0]);
        assert_eq!(p.ports(), (40000, 80));
    }
}

#[test]
fn vlan_tagged_and_non_ip_frames_pass_unchanged() {
    let tagged = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
        .vlan(5)
        .build();
    let arp = datapath_tests::frame::arp_request([2, 0, 0, 0, 0, 1], [198, 18, 0, 1], NODE);
    let v6 = Frame::tcp("[2001:db8::1]:40000", "[2001:db8::2]:8080").build();
    for input in [tagged, arp, v6] {
        let [(tcv, tco, mut tc), (xv, xo, _)] = both(&input);
        assert_eq!((tcv, xv), (TC_ACT_OK, XDP_PASS));
        assert_eq!(tco, input);
        assert_eq!(xo, input);
        assert!(tc.conntrack().is_empty());
    }
}

#[test]
fn padded_minimum_size_frame_is_translated_and_padding_kept() {
    let mut input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
    assert_eq!(input.len(), 54);
    input.resize(60, 0);
    for (out, _) in dnat_by_both(&input) {
        assert_eq!(out.len(), 60);
    }
}

#[test]
fn ip_total_length_beyond_the_frame_is_dropped_as_malformed() {
    let mut input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
    input.truncate(input.len() - 4);
    let [(tcv, _, mut tc), (xv, _, _)] = both(&input);
    assert_eq!((tcv, xv), (TC_ACT_SHOT, XDP_DROP));
    assert_eq!(tc.stat(Stat::DropMalformed), 1);
}

#[test]
fn unconfigured_datapath_passes_everything() {
    let mut p = Programs::load();
    let input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
    let r = p.uplink_tc(&input);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.data, input);
    let mut cfg = Programs::config(NODE, [198, 19, 0, 0], 24, 1);
    cfg.flags &= !datapath_common::CONFIG_F_READY;
    p.set_config(cfg);
    p.insert_node_addr(NODE, 1);
    p.publish(
        [0; 4],
        8080,
        proto::TCP,
        BACKEND,
        80,
        testbed::CTR.ifindex,
        testbed::CTR.id,
    );
    let r = p.uplink_xdp(&input);
    assert_eq!(
        r.verdict, XDP_PASS,
        "a configuration without READY is ignored"
    );
    assert!(p.conntrack().is_empty());
}

#[test]
fn uplink_packet_straight_to_a_container_address_is_dropped() {
    let input = Frame::tcp("198.18.0.1:40000", "198.19.0.5:80").build();
    let [(tcv, _, mut tc), (xv, _, _)] = both(&input);
    assert_eq!((tcv, xv), (TC_ACT_SHOT, XDP_DROP));
    assert_eq!(tc.stat(Stat::DropDirectRouting), 1);
}

#[test]
fn icmp_echo_to_the_node_passes() {
    let input = Frame::icmp_echo_request("198.18.0.1", "198.18.0.2", 7, 1).build();
    let [(tcv, tco, _), (xv, _, _)] = both(&input);
    assert_eq!((tcv, xv), (TC_ACT_OK, XDP_PASS));
    assert_eq!(tco, input);
}

#[test]
fn tcp_rst_and_fin_flags_are_recorded_in_conntrack() {
    use datapath_common::tcp_flags as f;
    let key = testbed::ct_key("198.18.0.1:40000", "198.18.0.2:8080", proto::TCP);
    let segment = |flags: u8| {
        Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
            .tcp_flags(flags)
            .build()
    };
    // A flow closed with FIN, and one torn down with RST: each flag is
    // recorded on top of what the flow had.
    for (last, flag) in [
        (tcp_flags::FIN | tcp_flags::ACK, f::FIN),
        (tcp_flags::RST, f::RST),
    ] {
        let mut p = published();
        p.uplink_tc(&segment(tcp_flags::SYN));
        assert_eq!(p.conntrack_get(&key).expect("entry").tcp_flags, f::SYN);
        assert_eq!(p.uplink_tc(&segment(last)).verdict, TC_ACT_REDIRECT);
        let e = p.conntrack_get(&key).expect("entry");
        assert_eq!(e.action, ct_action::DNAT);
        let expected = f::SYN | flag | if flag == f::FIN { f::ACK } else { 0 };
        assert_eq!(
            e.tcp_flags, expected,
            "after {last:#04x}: {:#04x}",
            e.tcp_flags
        );
        assert_eq!(e.packets, 2);
    }
}
