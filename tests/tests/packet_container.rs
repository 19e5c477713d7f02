//! `container_tc` (ingress of a container's host-side veth) under
//! BPF_PROG_TEST_RUN with an `__sk_buff` context naming the veth: reverse
//! DNAT of replies, masquerade of new flows, anti-spoofing; and the uplink
//! side of masqueraded flows' replies.

use datapath_common::{
    Stat, ct_action,
    programs::{
        CONTAINER_TC, SOCK_CONNECT4, SOCK_CONNECT6, SOCK_GETPEERNAME4, SOCK_GETPEERNAME6,
        SOCK_RECVMSG4, SOCK_RECVMSG6, SOCK_SENDMSG4, SOCK_SENDMSG6, UPLINK_TC, UPLINK_XDP,
    },
    proto,
};
use datapath_tests::{
    frame::{Frame, tcp_flags},
    packet::{ParsedFrame, assert_only_changed, field, verify_checksums},
    programs::{Programs, SkBuff, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_REDIRECT},
    testbed,
};

const NODE: [u8; 4] = testbed::NODE;
const CLIENT: [u8; 4] = testbed::CLIENT;
const CTR: [u8; 4] = testbed::CTR.addr;
const UPLINK: u32 = testbed::UPLINK_IFINDEX;
const CTR_IFINDEX: u32 = testbed::CTR.ifindex;
const CTR_MAC: [u8; 6] = testbed::CTR.mac;
const HOST_MAC: [u8; 6] = testbed::CTR.host_mac;

fn datapath() -> Programs {
    testbed::datapath()
}

/// A frame as the container sends it: from its MAC to the gateway's.
fn from_container(f: Frame) -> Vec<u8> {
    testbed::CTR.frame(f)
}

#[test]
fn reply_of_a_dnat_flow_gets_the_published_source_back() {
    let mut p = datapath();
    let syn = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
    assert_eq!(p.uplink_tc(&syn).verdict, TC_ACT_REDIRECT);
    let synack = from_container(
        Frame::tcp("198.19.0.5:80", "198.18.0.1:40000")
            .tcp_flags(tcp_flags::SYN | tcp_flags::ACK)
            .ack_number(1001),
    );
    let r = p.container_tc(&synack, CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().source, NODE);
    assert_eq!(out.ipv4().destination, CLIENT);
    assert_eq!(out.ports(), (8080, 40000));
    assert_eq!(out.ipv4().time_to_live, 63);
    let (ip, l4) = (out.ip_offset, out.l4_off());
    assert_only_changed(
        &synack,
        &r.data,
        &[
            ip + field::IPV4_TTL..ip + field::IPV4_TTL + 1,
            ip + field::IPV4_CSUM..ip + field::IPV4_CSUM + 2,
            ip + field::IPV4_SRC..ip + field::IPV4_SRC + 4,
            l4 + field::SPORT..l4 + field::SPORT + 2,
            l4 + field::TCP_CSUM..l4 + field::TCP_CSUM + 2,
        ],
    );
    let reply_key = testbed::ct_key("198.19.0.5:80", "198.18.0.1:40000", proto::TCP);
    let e = p.conntrack_get(&reply_key).expect("reply entry");
    assert_eq!(e.action, ct_action::REV_DNAT);
    assert_eq!(e.packets, 1);
    assert_eq!(p.stat(Stat::DnatPackets), 2);
}

#[test]
fn container_egress_is_masqueraded_and_the_reply_finds_its_way_back() {
    let mut p = datapath();
    let query =
        from_container(Frame::udp("198.19.0.5:5555", "198.18.0.1:53").payload(&b"question"[..]));
    let r = p.container_tc(&query, CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().source, NODE);
    assert_eq!(out.ipv4().destination, CLIENT);
    let (sport, dport) = out.ports();
    assert_eq!(dport, 53);
    assert!((61000..=65535).contains(&sport), "masquerade port {sport}");
    assert_eq!(p.stat(Stat::SnatNew), 1);

    let orig_key = testbed::ct_key("198.19.0.5:5555", "198.18.0.1:53", proto::UDP);
    let e = p.conntrack_get(&orig_key).expect("SNAT entry");
    assert_eq!(
        (e.action, e.nat_addr, e.nat_port),
        (ct_action::SNAT, NODE, sport)
    );
    assert_eq!(e.ifindex, UPLINK);
    let rev = p
        .conntrack_get(&e.peer_key(&orig_key))
        .expect("REV_SNAT entry");
    assert_eq!(
        (rev.action, rev.nat_addr, rev.nat_port),
        (ct_action::REV_SNAT, CTR, 5555)
    );
    assert_eq!(rev.ifindex, CTR_IFINDEX);

    // The answer arrives on the uplink, under either hook.
    let answer = Frame::udp(
        (std::net::Ipv4Addr::from(CLIENT), 53),
        (std::net::Ipv4Addr::from(NODE), sport),
    )
    .payload(&b"answer"[..])
    .build();
    let r = p.uplink_tc(&answer);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let x = p.uplink_xdp(&answer);
    assert_eq!(x.verdict, XDP_REDIRECT);
    for out in [&r.data, &x.data] {
        verify_checksums(out).expect("valid checksums");
        let o = ParsedFrame::parse(out).expect("parses");
        assert_eq!(o.ipv4().destination, CTR);
        assert_eq!(o.ports(), (53, 5555));
    }
    assert_eq!(
        ParsedFrame::parse(&x.data).expect("parses").eth.destination,
        CTR_MAC
    );
    assert_eq!(p.stat(Stat::SnatPackets), 3);
}

#[test]
fn container_ping_is_masqueraded_with_a_new_identifier() {
    let mut p = datapath();
    let echo = from_container(
        Frame::icmp_echo_request("198.19.0.5", "198.18.0.1", 77, 1).payload(&b"abcdefgh"[..]),
    );
    let r = p.container_tc(&echo, CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().source, NODE);
    let id = u16::from_be_bytes([
        r.data[out.l4_off() + field::ICMP_ECHO_ID],
        r.data[out.l4_off() + field::ICMP_ECHO_ID + 1],
    ]);
    assert!((61000..=65535).contains(&id), "masquerade id {id}");

    let reply = Frame::icmp_echo_reply("198.18.0.1", "198.18.0.2", id, 1)
        .payload(&b"abcdefgh"[..])
        .build();
    let back = p.uplink_tc(&reply);
    assert_eq!(back.verdict, TC_ACT_REDIRECT);
    verify_checksums(&back.data).expect("valid checksums");
    let o = ParsedFrame::parse(&back.data).expect("parses");
    assert_eq!(o.ipv4().destination, CTR);
    let back_id = u16::from_be_bytes([
        back.data[o.l4_off() + field::ICMP_ECHO_ID],
        back.data[o.l4_off() + field::ICMP_ECHO_ID + 1],
    ]);
    assert_eq!(back_id, 77);
}

#[test]
fn traffic_to_the_node_or_the_pool_is_not_masqueraded() {
    let mut p = datapath();
    for dst in ["198.18.0.2:22", "198.19.0.9:80", "198.19.0.1:53"] {
        let f = from_container(Frame::tcp("198.19.0.5:5555", dst));
        let r = p.container_tc(&f, CTR_IFINDEX);
        assert_eq!(r.verdict, TC_ACT_OK, "to {dst}");
        assert_eq!(r.data, f);
    }
    assert!(p.conntrack().is_empty());
}

#[test]
fn spoofed_source_address_mac_or_interface_is_dropped() {
    let mut p = datapath();
    let wrong_ip = from_container(Frame::udp("198.19.0.6:5555", "198.18.0.1:53"));
    let wrong_mac = Frame::udp("198.19.0.5:5555", "198.18.0.1:53")
        .macs([0x02, 0xba, 0, 0, 0, 1], HOST_MAC)
        .build();
    let right = from_container(Frame::udp("198.19.0.5:5555", "198.18.0.1:53"));
    assert_eq!(p.container_tc(&wrong_ip, CTR_IFINDEX).verdict, TC_ACT_SHOT);
    assert_eq!(p.container_tc(&wrong_mac, CTR_IFINDEX).verdict, TC_ACT_SHOT);
    // The right packet on another container's veth.
    assert_eq!(p.container_tc(&right, CTR_IFINDEX + 1).verdict, TC_ACT_SHOT);
    assert_eq!(p.stat(Stat::DropSpoofed), 3);
    assert!(p.conntrack().is_empty());
}

#[test]
fn the_context_reaches_the_program() {
    // Without an ingress ifindex the legitimate packet looks spoofed: the
    // context given to the test run is what the program reads.
    let mut p = datapath();
    let f = from_container(Frame::udp("198.19.0.5:5555", "198.18.0.1:53"));
    let zeroed = p.run_tc(CONTAINER_TC, &f, Some(&SkBuff::default()));
    assert_eq!(zeroed.verdict, TC_ACT_SHOT);
    let named = p.container_tc(&f, CTR_IFINDEX);
    assert_eq!(named.verdict, TC_ACT_REDIRECT);
}

#[test]
fn every_program_passes_the_verifier() {
    let mut p = Programs::load();
    let names = p.load_all().unwrap_or_else(|e| panic!("{e}"));
    for expected in [
        UPLINK_TC,
        UPLINK_XDP,
        CONTAINER_TC,
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        SOCK_CONNECT6,
        SOCK_SENDMSG6,
        SOCK_RECVMSG6,
        SOCK_GETPEERNAME6,
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[test]
fn a_container_to_its_own_published_port_is_hairpinned_from_the_node_address_both_ways() {
    let mut p = datapath();
    let syn = from_container(
        Frame::tcp("198.19.0.5:40000", "198.18.0.2:8080")
            .tcp_flags(tcp_flags::SYN)
            .ttl(64),
    );
    let r = p.container_tc(&syn, CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    // To itself, from the node address it dialed (its own address would
    // be a martian source to its stack).
    assert_eq!(out.ipv4().source, NODE);
    assert_eq!(out.ipv4().destination, CTR);
    assert_eq!(out.ports(), (40000, 80));
    let orig_key = testbed::ct_key("198.19.0.5:40000", "198.18.0.2:8080", proto::TCP);
    let reply_key = testbed::ct_key("198.19.0.5:80", "198.18.0.2:40000", proto::TCP);
    let orig = p.conntrack_get(&orig_key).expect("hairpin entry");
    assert_eq!(orig.action, ct_action::HAIRPIN);
    assert_eq!(orig.ifindex, CTR_IFINDEX);
    let reply = p.conntrack_get(&reply_key).expect("reverse hairpin entry");
    assert_eq!(reply.action, ct_action::REV_HAIRPIN);
    assert_eq!(reply.ifindex, CTR_IFINDEX);
    assert_eq!(p.stat(Stat::HairpinNew), 1);

    let synack = from_container(
        Frame::tcp("198.19.0.5:80", "198.18.0.2:40000")
            .tcp_flags(tcp_flags::SYN | tcp_flags::ACK)
            .ack_number(1),
    );
    let r = p.container_tc(&synack, CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().source, NODE);
    assert_eq!(out.ipv4().destination, CTR);
    assert_eq!(out.ports(), (8080, 40000));
}

#[test]
fn a_container_to_another_containers_published_port_is_dnated_and_the_reply_returns_to_it() {
    let mut p = datapath();
    testbed::add_container(&mut p, &testbed::CTR_B);
    let query = testbed::CTR_B.frame(Frame::udp("198.19.0.6:5555", "198.18.0.2:5353"));
    let r = p.container_tc(&query, testbed::CTR_B.ifindex);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().source, testbed::CTR_B.addr, "the source is kept");
    assert_eq!(out.ipv4().destination, CTR);
    assert_eq!(out.ports(), (5555, 53));

    let answer = from_container(Frame::udp("198.19.0.5:53", "198.19.0.6:5555"));
    let r = p.container_tc(&answer, CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(
        out.ipv4().source,
        NODE,
        "the answer comes from the address dialed"
    );
    assert_eq!(out.ipv4().destination, testbed::CTR_B.addr);
    assert_eq!(out.ports(), (5353, 5555));
    let reply_key = testbed::ct_key("198.19.0.5:53", "198.19.0.6:5555", proto::UDP);
    let e = p.conntrack_get(&reply_key).expect("reply entry");
    assert_eq!(
        e.ifindex,
        testbed::CTR_B.ifindex,
        "back to the asking container"
    );
    assert_eq!(p.stat(Stat::HairpinNew), 1);
}
