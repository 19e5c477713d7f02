//! ICMP errors about translated flows, under BPF_PROG_TEST_RUN: the error
//! reaches the right side with its outer address and the quoted packet
//! translated back, with valid outer, ICMP and quoted IPv4 checksums.

use datapath_common::Stat;
use datapath_tests::{
    frame::{Frame, IcmpError, tcp_flags},
    packet::{ParsedFrame, verify_checksums},
    programs::{Programs, TC_ACT_OK, TC_ACT_REDIRECT, XDP_PASS, XDP_REDIRECT},
    testbed,
};

const NODE: [u8; 4] = testbed::NODE;
const CLIENT: [u8; 4] = testbed::CLIENT;
const ROUTER: [u8; 4] = [198, 18, 0, 254];
const CTR: [u8; 4] = testbed::CTR.addr;
const CTR_IFINDEX: u32 = testbed::CTR.ifindex;

fn datapath() -> Programs {
    testbed::datapath()
}

fn from_container(f: Frame) -> Vec<u8> {
    testbed::CTR.frame(f)
}

/// Sends `f` from the container through the masquerade; returns the
/// translated frame as it leaves on the uplink.
fn masquerade(p: &mut Programs, f: Frame) -> Vec<u8> {
    let r = p.container_tc(&from_container(f), CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    r.data
}

/// What an ICMP error quotes of `frame`: its IPv4 header and the first
/// eight bytes after it (RFC 792's minimum).
fn quote(frame: &[u8]) -> Vec<u8> {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[14..14 + ihl + 8].to_vec()
}

/// An ICMP error from `src` to `dst` about `frame`.
fn error_about(src: [u8; 4], dst: [u8; 4], kind: IcmpError, frame: &[u8]) -> Frame {
    Frame::icmp_error_quoting(src, dst, kind, &quote(frame))
}

/// Runs `frame` through the uplink under XDP or TC; asserts it was
/// redirected (to a container) with valid outer, ICMP and quoted
/// checksums, and that the error was counted as translated, once.
#[track_caller]
fn uplink_redirect(p: &mut Programs, xdp: bool, frame: &[u8]) -> ParsedFrame {
    let r = if xdp {
        p.uplink_xdp(frame)
    } else {
        p.uplink_tc(frame)
    };
    assert_eq!(
        r.verdict,
        if xdp { XDP_REDIRECT } else { TC_ACT_REDIRECT },
        "xdp={xdp}: the error goes to the container; stats: {:?}",
        p.stats()
    );
    verify_checksums(&r.data).expect("valid outer, ICMP and quoted checksums");
    assert_eq!(p.stat(Stat::IcmpErrorTranslated), 1, "xdp={xdp}");
    ParsedFrame::parse(&r.data).expect("parses")
}

#[test]
fn port_unreachable_for_a_masqueraded_udp_flow_reaches_the_container_translated() {
    for xdp in [false, true] {
        let mut p = datapath();
        let sent = masquerade(&mut p, Frame::udp("198.19.0.5:5555", "198.18.0.1:53"));
        let out_port = ParsedFrame::parse(&sent).expect("parses").ports().0;
        let err = error_about(CLIENT, NODE, IcmpError::PortUnreachable, &sent).build();
        let out = uplink_redirect(&mut p, xdp, &err);
        assert_eq!(out.ipv4().source, CLIENT);
        assert_eq!(
            out.ipv4().destination,
            CTR,
            "outer destination back to the container"
        );
        assert_eq!(out.ipv4().time_to_live, 63);
        let q = out.quoted();
        assert_eq!(q.ip.source, CTR, "quoted source back to the container");
        assert_eq!(q.ip.destination, CLIENT);
        assert_eq!(
            q.sport(),
            Some(5555),
            "quoted source port back (was {out_port})"
        );
        assert_eq!(q.dport(), Some(53));
    }
}

#[test]
fn port_unreachable_from_the_client_about_a_dnat_flow_reaches_the_container_translated() {
    for xdp in [false, true] {
        let mut p = datapath();
        let syn = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
        assert_eq!(p.uplink_tc(&syn).verdict, TC_ACT_REDIRECT);
        // The client reports the (translated back) SYN-ACK as unreachable.
        let synack = Frame::tcp("198.18.0.2:8080", "198.18.0.1:40000")
            .tcp_flags(tcp_flags::SYN | tcp_flags::ACK);
        let err = Frame::icmp_error(CLIENT, NODE, IcmpError::PortUnreachable, &synack).build();
        let out = uplink_redirect(&mut p, xdp, &err);
        assert_eq!(out.ipv4().source, CLIENT, "xdp={xdp}");
        assert_eq!(
            out.ipv4().destination,
            CTR,
            "xdp={xdp}: outer destination translated to the container"
        );
        assert_eq!(out.ipv4().time_to_live, 63, "xdp={xdp}");
        let q = out.quoted();
        assert_eq!(
            (q.ip.source, q.sport()),
            (CTR, Some(80)),
            "xdp={xdp}: the quoted SYN-ACK is the container's own, from its port 80"
        );
        assert_eq!((q.ip.destination, q.dport()), (CLIENT, Some(40000)));
    }
}

#[test]
fn frag_needed_for_a_masqueraded_tcp_flow_keeps_its_mtu_and_reaches_the_container() {
    let mut p = datapath();
    let sent = masquerade(
        &mut p,
        Frame::tcp("198.19.0.5:40000", "198.18.0.1:80")
            .dont_fragment(true)
            .payload([0u8; 1200]),
    );
    let err = error_about(ROUTER, NODE, IcmpError::FragNeeded { mtu: 1280 }, &sent).build();
    let r = p.uplink_tc(&err);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().destination, CTR);
    // ICMP type 3 code 4 with the MTU in bytes 6..8 of the ICMP header.
    let icmp = out.l4_off();
    assert_eq!(&r.data[icmp..icmp + 2], &[3, 4]);
    assert_eq!(
        u16::from_be_bytes([r.data[icmp + 6], r.data[icmp + 7]]),
        1280
    );
    let q = out.quoted();
    assert_eq!((q.ip.source, q.sport()), (CTR, Some(40000)));
    assert_eq!((q.ip.destination, q.dport()), (CLIENT, Some(80)));
}

#[test]
fn time_exceeded_for_a_masqueraded_ping_carries_the_containers_echo_id() {
    let mut p = datapath();
    let sent = masquerade(&mut p, Frame::icmp_echo_request(CTR, CLIENT, 777, 1));
    let err = error_about(ROUTER, NODE, IcmpError::TimeExceeded, &sent).build();
    let r = p.uplink_tc(&err);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().destination, CTR);
    let q = out.quoted();
    assert_eq!(q.ip.source, CTR);
    assert_eq!(
        q.sport(),
        Some(777),
        "quoted echo id back to the container's"
    );
}

#[test]
fn port_unreachable_from_a_container_for_a_published_udp_port_reaches_the_client_translated() {
    let mut p = datapath();
    let query = Frame::udp("198.18.0.1:40000", "198.18.0.2:5353");
    let r = p.uplink_tc(&query.build());
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    // The container has no listener: its kernel answers port unreachable.
    let err = from_container(error_about(
        CTR,
        CLIENT,
        IcmpError::PortUnreachable,
        &r.data,
    ));
    let r = p.container_tc(&err, CTR_IFINDEX);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    verify_checksums(&r.data).expect("valid checksums");
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(
        out.ipv4().source,
        NODE,
        "outer source is the published address"
    );
    assert_eq!(out.ipv4().destination, CLIENT);
    let q = out.quoted();
    assert_eq!((q.ip.source, q.sport()), (CLIENT, Some(40000)));
    assert_eq!(
        (q.ip.destination, q.dport()),
        (NODE, Some(5353)),
        "the client sees its own datagram to the published port quoted"
    );
}

#[test]
fn errors_about_unknown_flows_pass_untouched() {
    let mut p = datapath();
    let never_sent = Frame::udp("198.18.0.2:61234", "198.18.0.1:53");
    let err = Frame::icmp_error(CLIENT, NODE, IcmpError::PortUnreachable, &never_sent).build();
    let r = p.uplink_tc(&err);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.data, err);
    let r = p.uplink_xdp(&err);
    assert_eq!(r.verdict, XDP_PASS);
    assert_eq!(r.data, err);
    assert_eq!(p.stat(Stat::IcmpErrorTranslated), 0);
}
