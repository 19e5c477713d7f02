//! The uplink programs (`uplink_tc`, `uplink_xdp`) under BPF_PROG_TEST_RUN:
//! DNAT of a published port, and leaving everything else alone.

use datapath_common::{CT_F_ORIGINAL, CT_F_SEEN, Stat, ct_action, proto, tcp_flags as ct_tcp};
use datapath_tests::{
    frame::{Frame, tcp_flags},
    packet::{ParsedFrame, assert_only_changed, field, verify_checksums},
    programs::{Programs, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_REDIRECT},
    testbed,
};

const NODE: [u8; 4] = testbed::NODE;
const CLIENT: [u8; 4] = testbed::CLIENT;
const BACKEND: [u8; 4] = testbed::CTR.addr;
const UPLINK_IFINDEX: u32 = testbed::UPLINK_IFINDEX;
const CTR_IFINDEX: u32 = testbed::CTR.ifindex;
const CTR_ID: u32 = testbed::CTR.id;
const CTR_MAC: [u8; 6] = testbed::CTR.mac;
const HOST_VETH_MAC: [u8; 6] = testbed::CTR.host_mac;

/// The test datapath: TCP port 8080 published on every node address to
/// 198.19.0.5:80 behind ifindex 7.
fn published() -> Programs {
    testbed::datapath()
}

fn syn() -> Frame {
    Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
        .tcp_flags(tcp_flags::SYN)
        .ttl(64)
        .payload(&b"hello"[..])
}

/// The checks common to both hooks: translated destination, TTL, checksums,
/// nothing else touched (MACs aside, which `mac_range` allows), conntrack
/// pair, counters.
fn assert_dnat(p: &mut Programs, input: &[u8], output: &[u8], macs_rewritten: bool) {
    verify_checksums(output).expect("valid checksums after DNAT");
    let before = ParsedFrame::parse(input).expect("input parses");
    let after = ParsedFrame::parse(output).expect("output parses");
    assert_eq!(after.ipv4().source, CLIENT);
    assert_eq!(after.ipv4().destination, BACKEND);
    assert_eq!(after.ports(), (40000, 80));
    assert_eq!(after.ipv4().time_to_live, before.ipv4().time_to_live - 1);
    assert_eq!(after.payload, b"hello");
    assert!(after.tcp().syn && !after.tcp().ack);

    let ip = after.ip_offset;
    let l4 = after.l4_off();
    let mut allowed = vec![
        ip + field::IPV4_TTL..ip + field::IPV4_TTL + 1,
        ip + field::IPV4_CSUM..ip + field::IPV4_CSUM + 2,
        ip + field::IPV4_DST..ip + field::IPV4_DST + 4,
        l4 + field::DPORT..l4 + field::DPORT + 2,
        l4 + field::TCP_CSUM..l4 + field::TCP_CSUM + 2,
    ];
    if macs_rewritten {
        allowed.push(0..12);
    }
    assert_only_changed(input, output, &allowed);

    let orig_key = testbed::ct_key("198.18.0.1:40000", "198.18.0.2:8080", proto::TCP);
    let reply_key = testbed::ct_key("198.19.0.5:80", "198.18.0.1:40000", proto::TCP);
    let ct = p.conntrack();
    assert_eq!(ct.len(), 2, "two conntrack entries: {ct:#?}");
    let orig = p.conntrack_get(&orig_key).expect("DNAT entry");
    assert_eq!(orig.action, ct_action::DNAT);
    assert_eq!((orig.nat_addr, orig.nat_port), (BACKEND, 80));
    assert_eq!(orig.ifindex, CTR_IFINDEX);
    assert_eq!(orig.container_id, CTR_ID);
    assert_eq!(orig.flags, CT_F_ORIGINAL | CT_F_SEEN);
    assert_eq!(orig.tcp_flags, ct_tcp::SYN);
    assert_eq!(orig.packets, 1);
    assert_eq!(orig.bytes, u64::from(before.ipv4().total_len));
    let reply = p.conntrack_get(&reply_key).expect("REV_DNAT entry");
    assert_eq!(reply.action, ct_action::REV_DNAT);
    assert_eq!((reply.nat_addr, reply.nat_port), (NODE, 8080));
    assert_eq!(reply.ifindex, UPLINK_IFINDEX);
    assert_eq!(reply.container_id, CTR_ID);
    assert_eq!(reply.packets, 0);
    assert_eq!(orig.peer_key(&orig_key), reply_key);

    assert_eq!(p.stat(Stat::DnatNew), 1);
    assert_eq!(p.stat(Stat::DnatPackets), 1);
}

#[test]
fn tc_dnats_a_syn_to_a_published_port_and_redirects_to_the_container() {
    let mut p = published();
    let input = syn().build();
    let run = p.uplink_tc(&input);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    assert_dnat(&mut p, &input, &run.data, false);
    // The frame's MACs are untouched under TC: the peer veth takes it as is.
    assert_eq!(&run.data[..12], &input[..12]);
}

#[test]
fn xdp_dnats_a_syn_rewrites_macs_and_redirects_to_the_host_veth() {
    let mut p = published();
    let input = syn().build();
    let run = p.uplink_xdp(&input);
    assert_eq!(run.verdict, XDP_REDIRECT, "stats: {:?}", p.stats());
    assert_dnat(&mut p, &input, &run.data, true);
    let after = ParsedFrame::parse(&run.data).expect("output parses");
    assert_eq!(after.eth.destination, CTR_MAC);
    assert_eq!(after.eth.source, HOST_VETH_MAC);
}

#[test]
fn tc_passes_a_packet_to_an_unpublished_port_unchanged() {
    let mut p = published();
    let input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:9090").build();
    let run = p.uplink_tc(&input);
    assert_eq!(run.verdict, TC_ACT_OK);
    assert_eq!(run.data, input);
    assert!(p.conntrack().is_empty());
    assert_eq!(p.stat(Stat::Passed), 1);
    assert_eq!(p.stat(Stat::DnatNew), 0);
}

#[test]
fn xdp_passes_a_packet_to_an_unpublished_port_unchanged() {
    let mut p = published();
    let input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:9090").build();
    let run = p.uplink_xdp(&input);
    assert_eq!(run.verdict, XDP_PASS);
    assert_eq!(run.data, input);
    assert!(p.conntrack().is_empty());
    assert_eq!(p.stat(Stat::Passed), 1);
}

#[test]
fn second_packet_of_a_flow_uses_the_conntrack_entry() {
    let mut p = published();
    let first = p.uplink_tc(&syn().build());
    assert_eq!(first.verdict, TC_ACT_REDIRECT);
    let ack = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
        .tcp_flags(tcp_flags::ACK)
        .seq(1001)
        .ack_number(5000)
        .build();
    let run = p.uplink_tc(&ack);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    verify_checksums(&run.data).expect("valid checksums");
    let after = ParsedFrame::parse(&run.data).expect("output parses");
    assert_eq!(after.ipv4().destination, BACKEND);
    assert_eq!(after.ports(), (40000, 80));
    assert_eq!(p.conntrack().len(), 2);
    assert_eq!(p.stat(Stat::DnatNew), 1);
    assert_eq!(p.stat(Stat::DnatPackets), 2);
}

#[test]
fn a_packet_to_the_node_loopback_is_never_translated_even_where_a_port_is_published_there() {
    let mut p = published();
    p.publish(
        [127, 0, 0, 1],
        9090,
        proto::TCP,
        BACKEND,
        80,
        CTR_IFINDEX,
        CTR_ID,
    );
    // 8080 is published on every address, 9090 on the loopback only: a
    // crafted packet to either on 127.0.0.1 is the node stack's to drop.
    for dst in ["127.0.0.1:8080", "127.0.0.1:9090"] {
        let input = Frame::tcp("198.18.0.1:40000", dst)
            .tcp_flags(tcp_flags::SYN)
            .build();
        let run = p.uplink_tc(&input);
        assert_eq!(run.verdict, TC_ACT_OK, "to {dst}");
        assert_eq!(run.data, input, "to {dst}");
    }
    assert!(p.conntrack().is_empty());
    assert_eq!(p.stat(Stat::DnatNew), 0);
}
