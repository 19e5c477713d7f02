//! The packet harness itself: frames come out as described, with valid
//! checksums, and the verifier catches every kind of wrong checksum.

use datapath_tests::{
    frame::{CLIENT_MAC, Frame, IcmpError, arp_request, tcp_flags},
    packet::{ParsedFrame, changed_offsets, field, verify_checksums},
};
use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};

fn all_kinds() -> Vec<(&'static str, Vec<u8>)> {
    let tcp = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").payload(&b"abc"[..]);
    let udp = Frame::udp("198.18.0.1:5353", "198.18.0.2:53").payload(&b"query"[..]);
    vec![
        ("tcp", tcp.build()),
        (
            "tcp odd payload",
            tcp.clone().payload(vec![7u8; 101]).build(),
        ),
        ("udp", udp.build()),
        ("udp zero checksum", udp.clone().udp_zero_checksum().build()),
        (
            "icmp echo request",
            Frame::icmp_echo_request("198.18.0.1", "198.18.0.2", 77, 1)
                .payload(&b"ping"[..])
                .build(),
        ),
        (
            "icmp echo reply",
            Frame::icmp_echo_reply("198.18.0.2", "198.18.0.1", 77, 1).build(),
        ),
        (
            "frag needed, minimal quote",
            Frame::icmp_error(
                "198.18.0.9",
                "198.18.0.1",
                IcmpError::FragNeeded { mtu: 1400 },
                &tcp,
            )
            .build(),
        ),
        (
            "frag needed, full quote",
            Frame::icmp_error_full(
                "198.18.0.9",
                "198.18.0.1",
                IcmpError::FragNeeded { mtu: 1400 },
                &udp,
            )
            .build(),
        ),
        (
            "time exceeded",
            Frame::icmp_error_full("198.18.0.9", "198.18.0.1", IcmpError::TimeExceeded, &tcp)
                .build(),
        ),
        ("vlan", tcp.clone().vlan(42).build()),
        (
            "ipv4 options",
            tcp.clone()
                .ipv4_options(&[1, 1, 1, 0, 0x94, 4, 0, 0])
                .build(),
        ),
        ("first fragment", udp.clone().fragment(true, 0).build()),
        ("later fragment", udp.clone().fragment(false, 3).build()),
        (
            "ipv6 tcp",
            Frame::tcp("[2001:db8::1]:40000", "[2001:db8::2]:80")
                .payload(&b"x"[..])
                .build(),
        ),
        (
            "ipv6 udp",
            Frame::udp("[2001:db8::1]:40000", "[2001:db8::2]:53").build(),
        ),
        (
            "icmpv6 echo",
            Frame::icmp_echo_request("2001:db8::1", "2001:db8::2", 9, 9).build(),
        ),
        (
            "arp",
            arp_request(CLIENT_MAC, [198, 18, 0, 1], [198, 18, 0, 2]),
        ),
    ]
}

#[test]
fn every_built_frame_has_valid_checksums_and_parses() {
    for (name, frame) in all_kinds() {
        verify_checksums(&frame).unwrap_or_else(|e| panic!("{name}: {e}"));
        ParsedFrame::parse(&frame).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn a_known_ipv4_header_checksum_verifies_and_a_changed_one_does_not() {
    // The classic example header (checksum 0xb861), UDP with no checksum.
    let mut frame = vec![0u8; 14];
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0, 53, 0, 53, 0, 0x5f, 0, 0]);
    frame.resize(14 + 0x73, 0);
    verify_checksums(&frame).expect("the example is valid");
    frame[14 + 11] = 0x62;
    let err = verify_checksums(&frame).expect_err("a changed checksum is caught");
    assert!(
        err.contains("IPv4 header checksum is 0xb862, expected 0xb861"),
        "{err}"
    );
}

#[test]
fn wrong_checksums_are_caught_at_every_layer() {
    let tcp = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080");
    let udp = Frame::udp("198.18.0.1:5353", "198.18.0.2:53").payload(&b"q"[..]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("ip", tcp.clone().ip_checksum(0x1234).build(), "IPv4 header"),
        ("tcp", tcp.clone().l4_checksum(0x1234).build(), "TCP"),
        ("udp", udp.clone().l4_checksum(0x1234).build(), "UDP"),
        (
            "icmp",
            Frame::icmp_echo_request("198.18.0.1", "198.18.0.2", 1, 1)
                .l4_checksum(1)
                .build(),
            "ICMP",
        ),
        (
            "quoted ip",
            Frame::icmp_error(
                "198.18.0.9",
                "198.18.0.1",
                IcmpError::TimeExceeded,
                &tcp.clone().ip_checksum(7),
            )
            .build(),
            "quoted IPv4 header",
        ),
        (
            "quoted udp",
            Frame::icmp_error_full(
                "198.18.0.9",
                "198.18.0.1",
                IcmpError::TimeExceeded,
                &udp.clone().l4_checksum(7),
            )
            .build(),
            "quoted UDP",
        ),
        (
            "ipv6 tcp",
            Frame::tcp("[2001:db8::1]:1", "[2001:db8::2]:2")
                .l4_checksum(5)
                .build(),
            "TCP",
        ),
    ];
    for (name, frame, expect) in cases {
        let err = verify_checksums(&frame).expect_err(name);
        assert!(err.starts_with(expect), "{name}: {err}");
    }
    // A changed address breaks the TCP checksum through the pseudo header.
    let mut frame = tcp.build();
    frame[14 + field::IPV4_DST + 3] ^= 1;
    let ip_csum = 14 + field::IPV4_CSUM;
    let fixed = {
        // Repair only the IP header checksum, leaving TCP's stale.
        let mut sum: u32 = 0;
        frame[ip_csum] = 0;
        frame[ip_csum + 1] = 0;
        for w in frame[14..34].chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    };
    frame[ip_csum..ip_csum + 2].copy_from_slice(&fixed.to_be_bytes());
    let err = verify_checksums(&frame).expect_err("stale pseudo header");
    assert!(err.starts_with("TCP checksum"), "{err}");
}

#[test]
fn parsed_fields_are_the_ones_built() {
    let f = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
        .macs([2, 0, 0, 0, 0, 0xaa], [2, 0, 0, 0, 0, 0xbb])
        .vlan(100)
        .ttl(9)
        .tcp_flags(tcp_flags::SYN | tcp_flags::ACK)
        .seq(7)
        .ack_number(8)
        .ipv4_options(&[1, 1, 1, 1])
        .payload(&b"data"[..])
        .build();
    let p = ParsedFrame::parse(&f).expect("parses");
    assert_eq!(p.eth.source, [2, 0, 0, 0, 0, 0xaa]);
    assert_eq!(p.eth.destination, [2, 0, 0, 0, 0, 0xbb]);
    assert_eq!(p.vlan.as_ref().map(|v| v.vlan_id.value()), Some(100));
    assert_eq!(p.ip_offset, 18);
    assert_eq!(p.l4_off(), 18 + 24);
    assert_eq!(p.ipv4().time_to_live, 9);
    assert_eq!(p.ipv4().options.as_slice(), &[1, 1, 1, 1]);
    assert!(p.ipv4().dont_fragment);
    let tcp = p.tcp();
    assert!(tcp.syn && tcp.ack && !tcp.fin && !tcp.rst);
    assert_eq!((tcp.sequence_number, tcp.acknowledgment_number), (7, 8));
    assert_eq!(p.ports(), (40000, 8080));
    assert_eq!(p.payload, b"data");

    let frag = Frame::udp("198.18.0.1:1", "198.18.0.2:2")
        .fragment(true, 185)
        .payload(vec![0; 16])
        .build();
    let p = ParsedFrame::parse(&frag).expect("parses");
    assert!(p.ipv4().more_fragments && !p.ipv4().dont_fragment);
    assert_eq!(p.ipv4().fragment_offset.value(), 185);
    assert!(p.l4.is_none(), "a later fragment has no transport header");
    assert_eq!(p.payload.len(), 16);

    let zero = Frame::udp("198.18.0.1:1", "198.18.0.2:2")
        .udp_zero_checksum()
        .build();
    assert_eq!(ParsedFrame::parse(&zero).expect("parses").udp().checksum, 0);
}

#[test]
fn icmp_errors_quote_the_original_header_and_ports() {
    let original = Frame::tcp("198.19.0.5:80", "198.18.0.1:40000").ttl(1);
    let f = Frame::icmp_error(
        "198.18.0.1",
        "198.19.0.5",
        IcmpError::FragNeeded { mtu: 1280 },
        &original,
    )
    .build();
    let p = ParsedFrame::parse(&f).expect("parses");
    assert_eq!(
        p.icmpv4().icmp_type,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1280
        })
    );
    let q = p.quoted();
    assert_eq!(q.ip.source, [198, 19, 0, 5]);
    assert_eq!(q.ip.destination, [198, 18, 0, 1]);
    assert_eq!(q.ip.time_to_live, 1);
    assert_eq!((q.sport(), q.dport()), (Some(80), Some(40000)));
    assert_eq!(q.l4.len(), 8, "RFC 792 minimum quote");

    let echo = Frame::icmp_echo_request("198.19.0.5", "198.18.0.1", 4242, 1);
    let f = Frame::icmp_error("198.18.0.1", "198.19.0.5", IcmpError::TimeExceeded, &echo).build();
    let q = ParsedFrame::parse(&f).expect("parses").quoted().clone();
    assert_eq!(
        q.sport(),
        Some(4242),
        "an echo's identifier stands for its port"
    );
}

#[test]
fn changed_offsets_lists_exactly_the_differing_bytes() {
    let a = [1u8, 2, 3, 4];
    assert_eq!(changed_offsets(&a, &[1, 9, 3, 8]), vec![1, 3]);
    assert_eq!(changed_offsets(&a, &[1, 2]), vec![2, 3]);
    assert!(changed_offsets(&a, &a).is_empty());
}
