//! The flow core under BPF_PROG_TEST_RUN (issue 12): where a flow's entries
//! live as it goes through its states (the table of unconfirmed flows for
//! handshakes, single exchanges and closed flows; the main table for
//! established and streaming ones), TCP's RST window and reopening, loose
//! pickup, expiry by a later packet and by the kernel's timer, each
//! container's share of the main table, the masquerade port search near a
//! full range, fragments translated through the fragment table, and the
//! kernel-side flush.

use std::time::{Duration, Instant};

use datapath_common::{
    CONFIG_F_CHECK_LINKS, CT_F_PICKUP, Config, CtEntry, CtKey, Endpoint, FLUSH_F_CONTAINER,
    FLUSH_F_SERVICE, FlushRequest, Stat, ct_action, ct_state, names, proto,
};
use datapath_tests::{
    frame::{Frame, tcp_flags as tf},
    packet::ParsedFrame,
    programs::{Programs, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Table, XDP_REDIRECT, now_ns},
};

const NODE: [u8; 4] = [198, 18, 0, 2];
const CLIENT: [u8; 4] = [198, 18, 0, 1];
const UPLINK: u32 = 1;

#[derive(Clone, Copy)]
struct Ctr {
    addr: [u8; 4],
    ifindex: u32,
    id: u32,
    mac: [u8; 6],
    host_mac: [u8; 6],
}

const A: Ctr = Ctr {
    addr: [198, 19, 0, 5],
    ifindex: 7,
    id: 3,
    mac: [0x02, 0xc0, 0, 0, 0, 5],
    host_mac: [0x02, 0xee, 0, 0, 0, 7],
};
const B: Ctr = Ctr {
    addr: [198, 19, 0, 6],
    ifindex: 8,
    id: 4,
    mac: [0x02, 0xc0, 0, 0, 0, 6],
    host_mac: [0x02, 0xee, 0, 0, 0, 8],
};

/// Node 198.18.0.2, pool 198.19.0.0/24 with containers A and B; TCP 8080
/// and UDP 5353 published to A's 80 and 53. `edit` adjusts the
/// configuration, `sizes` the map capacities.
fn datapath_with(edit: impl FnOnce(&mut Config), sizes: &[(&'static str, u32)]) -> Programs {
    let mut p = Programs::try_load_with(sizes).unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = Programs::config(NODE, [198, 19, 0, 0], 24, UPLINK);
    edit(&mut cfg);
    p.set_config(cfg);
    p.insert_node_addr(NODE, UPLINK);
    for c in [A, B] {
        p.insert_endpoint(
            c.addr,
            Endpoint {
                ifindex: c.ifindex,
                container_id: c.id,
                mac: c.mac,
                host_mac: c.host_mac,
                flags: 0,
            },
        );
    }
    p.publish([0; 4], 8080, proto::TCP, A.addr, 80, A.ifindex, A.id);
    p.publish([0; 4], 5353, proto::UDP, A.addr, 53, A.ifindex, A.id);
    p
}

fn datapath() -> Programs {
    datapath_with(|_| {}, &[])
}

/// A TCP segment of the client's connection `cport → node:8080`.
fn client(cport: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    Frame::tcp((CLIENT, cport), (NODE, 8080))
        .tcp_flags(flags)
        .seq(seq)
        .ack_number(ack)
        .build()
}

/// A TCP segment of A's side of that connection (A:80 → client).
fn server(cport: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    Frame::tcp((A.addr, 80), (CLIENT, cport))
        .tcp_flags(flags)
        .seq(seq)
        .ack_number(ack)
        .macs(A.mac, A.host_mac)
        .build()
}

fn dnat_key(cport: u16) -> CtKey {
    CtKey::v4(CLIENT, cport, NODE, 8080, proto::TCP)
}

fn rev_dnat_key(cport: u16) -> CtKey {
    CtKey::v4(A.addr, 80, CLIENT, cport, proto::TCP)
}

#[track_caller]
fn uplink(p: &mut Programs, frame: &[u8]) -> u32 {
    p.uplink_tc(frame).verdict
}

#[track_caller]
fn from(p: &mut Programs, c: Ctr, frame: &[u8]) -> u32 {
    p.container_tc(frame, c.ifindex).verdict
}

/// SYN, SYN-ACK, ACK of connection `cport` (client ISN 1000, server 5000).
#[track_caller]
fn handshake(p: &mut Programs, cport: u16) {
    assert_eq!(uplink(p, &client(cport, tf::SYN, 1000, 0)), TC_ACT_REDIRECT);
    assert_eq!(
        from(p, A, &server(cport, tf::SYN | tf::ACK, 5000, 1001)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        uplink(p, &client(cport, tf::ACK, 1001, 5001)),
        TC_ACT_REDIRECT,
        "stats: {:?}",
        p.stats()
    );
}

#[track_caller]
fn table_and_state(p: &mut Programs, key: &CtKey) -> (Table, u8) {
    let (t, e) = p
        .conntrack_lookup(key)
        .unwrap_or_else(|| panic!("no entry for {key:?}: {:#?}", p.conntrack()));
    (t, e.state)
}

// ---- TCP -------------------------------------------------------------------

#[test]
fn a_completed_handshake_confirms_the_flow_into_the_main_table() {
    let mut p = datapath();
    assert_eq!(
        uplink(&mut p, &client(40000, tf::SYN, 1000, 0)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        from(&mut p, A, &server(40000, tf::SYN | tf::ACK, 5000, 1001)),
        TC_ACT_REDIRECT
    );
    // Answered, not yet acknowledged (a spoofed SYN's flow stops here).
    for key in [dnat_key(40000), rev_dnat_key(40000)] {
        assert_eq!(
            table_and_state(&mut p, &key),
            (Table::New, ct_state::TCP_SYN_SENT)
        );
    }
    assert_eq!(p.ct_container(A.id).entries, 0);

    assert_eq!(
        uplink(&mut p, &client(40000, tf::ACK, 1001, 5001)),
        TC_ACT_REDIRECT
    );
    for key in [dnat_key(40000), rev_dnat_key(40000)] {
        assert_eq!(
            table_and_state(&mut p, &key),
            (Table::Main, ct_state::TCP_ESTABLISHED)
        );
    }
    assert!(p.conntrack_table(Table::New).is_empty());
    assert_eq!(p.ct_container(A.id).entries, 2, "one flow, two entries");
    assert_eq!(p.stat(Stat::CtConfirmed), 1);
    // Established packets go on through the main table.
    let data = Frame::tcp((CLIENT, 40000), (NODE, 8080))
        .tcp_flags(tf::PSH | tf::ACK)
        .seq(1001)
        .ack_number(5001)
        .payload(vec![1; 100])
        .build();
    assert_eq!(uplink(&mut p, &data), TC_ACT_REDIRECT);
    assert_eq!(
        p.conntrack_get(&dnat_key(40000)).map(|e| e.packets),
        Some(3)
    );
}

#[test]
fn fin_both_ways_moves_the_flow_back_to_the_unconfirmed_table_closing() {
    let mut p = datapath();
    handshake(&mut p, 40001);
    assert_eq!(
        uplink(&mut p, &client(40001, tf::FIN | tf::ACK, 1001, 5001)),
        TC_ACT_REDIRECT
    );
    // Half closed: still established.
    assert_eq!(
        table_and_state(&mut p, &dnat_key(40001)),
        (Table::Main, ct_state::TCP_ESTABLISHED)
    );
    assert_eq!(
        from(&mut p, A, &server(40001, tf::FIN | tf::ACK, 5001, 1002)),
        TC_ACT_REDIRECT
    );
    for key in [dnat_key(40001), rev_dnat_key(40001)] {
        assert_eq!(
            table_and_state(&mut p, &key),
            (Table::New, ct_state::TCP_CLOSING)
        );
    }
    assert!(p.conntrack_table(Table::Main).is_empty());
    assert_eq!(p.ct_container(A.id).entries, 0, "the count follows");
    assert_eq!(p.stat(Stat::CtClosed), 1);
    // The last ACK still finds its flow.
    assert_eq!(
        uplink(&mut p, &client(40001, tf::ACK, 1002, 5002)),
        TC_ACT_REDIRECT
    );
}

#[test]
fn a_syn_reusing_a_closed_flows_tuple_starts_it_afresh_through_dnat() {
    let mut p = datapath();
    handshake(&mut p, 40002);
    uplink(&mut p, &client(40002, tf::FIN | tf::ACK, 1001, 5001));
    from(&mut p, A, &server(40002, tf::FIN | tf::ACK, 5001, 1002));
    uplink(&mut p, &client(40002, tf::ACK, 1002, 5002));

    // The same 4-tuple, seconds later: a new connection.
    let syn = client(40002, tf::SYN, 90_000, 0);
    let r = p.uplink_tc(&syn);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let out = ParsedFrame::parse(&r.data).expect("parses");
    assert_eq!(out.ipv4().destination, A.addr);
    assert_eq!(p.stat(Stat::CtReopened), 1);
    let e = p.conntrack_get(&dnat_key(40002)).expect("entry");
    assert_eq!(
        (e.state, e.tcp_flags, e.packets),
        (ct_state::TCP_SYN_SENT, u32::from(tf::SYN), 1),
        "fresh state: no FIN of the old connection left"
    );
    let rev = p.conntrack_get(&rev_dnat_key(40002)).expect("reply entry");
    assert_eq!((rev.tcp_flags, rev.packets), (0, 0));
    // And it becomes established like any connection.
    from(&mut p, A, &server(40002, tf::SYN | tf::ACK, 7000, 90_001));
    uplink(&mut p, &client(40002, tf::ACK, 90_001, 7001));
    assert_eq!(
        table_and_state(&mut p, &dnat_key(40002)),
        (Table::Main, ct_state::TCP_ESTABLISHED)
    );
}

#[test]
fn a_syn_reusing_a_closed_flows_tuple_starts_it_afresh_through_masquerade() {
    let mut p = datapath();
    let out = |flags: u8, seq: u32, ack: u32| {
        Frame::tcp((A.addr, 45000), (CLIENT, 80))
            .tcp_flags(flags)
            .seq(seq)
            .ack_number(ack)
            .macs(A.mac, A.host_mac)
            .build()
    };
    let r = p.container_tc(&out(tf::SYN, 100, 0), A.ifindex);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let port = ParsedFrame::parse(&r.data).expect("parses").ports().0;
    let back = |flags: u8, seq: u32, ack: u32| {
        Frame::tcp((CLIENT, 80), (NODE, port))
            .tcp_flags(flags)
            .seq(seq)
            .ack_number(ack)
            .build()
    };
    assert_eq!(
        uplink(&mut p, &back(tf::SYN | tf::ACK, 900, 101)),
        TC_ACT_REDIRECT
    );
    assert_eq!(from(&mut p, A, &out(tf::ACK, 101, 901)), TC_ACT_REDIRECT);
    let key = CtKey::v4(A.addr, 45000, CLIENT, 80, proto::TCP);
    assert_eq!(
        table_and_state(&mut p, &key),
        (Table::Main, ct_state::TCP_ESTABLISHED)
    );
    from(&mut p, A, &out(tf::FIN | tf::ACK, 101, 901));
    uplink(&mut p, &back(tf::FIN | tf::ACK, 901, 102));
    assert_eq!(
        table_and_state(&mut p, &key),
        (Table::New, ct_state::TCP_CLOSING)
    );

    let r = p.container_tc(&out(tf::SYN, 70_000, 0), A.ifindex);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        ParsedFrame::parse(&r.data).expect("parses").ipv4().source,
        NODE
    );
    assert_eq!(p.stat(Stat::CtReopened), 1);
    let e = p.conntrack_get(&key).expect("entry");
    assert_eq!(
        (e.action, e.state, e.tcp_flags),
        (ct_action::SNAT, ct_state::TCP_SYN_SENT, u32::from(tf::SYN))
    );
}

#[test]
fn a_rst_outside_the_window_does_not_end_an_established_flow() {
    // Initial sequence numbers in both halves of the sequence space: the
    // window must not depend on where they fall.
    for (cport, c_isn, s_isn) in [
        (40003u16, 1000u32, 5000u32),
        (40006, 0xf000_0000, 0x9000_0000),
        (40007, 0x7fff_ff00, 0xffff_ff00),
    ] {
        let mut p = datapath();
        let (c1, s1) = (c_isn.wrapping_add(1), s_isn.wrapping_add(1));
        uplink(&mut p, &client(cport, tf::SYN, c_isn, 0));
        from(&mut p, A, &server(cport, tf::SYN | tf::ACK, s_isn, c1));
        uplink(&mut p, &client(cport, tf::ACK, c1, s1));
        let data = Frame::tcp((CLIENT, cport), (NODE, 8080))
            .tcp_flags(tf::PSH | tf::ACK)
            .seq(c1)
            .ack_number(s1)
            .payload(vec![7; 100])
            .build();
        uplink(&mut p, &data);
        let c101 = c1.wrapping_add(100);
        from(&mut p, A, &server(cport, tf::ACK, s1, c101));

        // Blind RSTs, half the sequence space away, from either side:
        // passed on (the endpoint decides), the flow kept.
        let stray = client(cport, tf::RST, c101.wrapping_add(1 << 31), 0);
        assert_eq!(uplink(&mut p, &stray), TC_ACT_REDIRECT);
        let stray = server(cport, tf::RST, s1.wrapping_add(1 << 31), 0);
        assert_eq!(from(&mut p, A, &stray), TC_ACT_REDIRECT);
        assert_eq!(p.stat(Stat::CtRstIgnored), 2, "ISNs {c_isn:#x}/{s_isn:#x}");
        for key in [dnat_key(cport), rev_dnat_key(cport)] {
            assert_eq!(
                table_and_state(&mut p, &key),
                (Table::Main, ct_state::TCP_ESTABLISHED)
            );
        }
        assert_eq!(p.ct_container(A.id).entries, 2);

        // A RST at the sender's next sequence number ends it.
        let rst = client(cport, tf::RST | tf::ACK, c101, s1);
        assert_eq!(uplink(&mut p, &rst), TC_ACT_REDIRECT);
        assert_eq!(
            table_and_state(&mut p, &dnat_key(cport)),
            (Table::New, ct_state::TCP_CLOSING)
        );
        assert_eq!(p.ct_container(A.id).entries, 0);
    }
}

#[test]
fn an_ack_without_a_flow_is_picked_up_and_rst_or_fin_create_nothing() {
    let mut p = datapath();
    // A long-idle connection whose flow expired: its next segment.
    let ack = Frame::tcp((CLIENT, 40004), (NODE, 8080))
        .tcp_flags(tf::PSH | tf::ACK)
        .seq(123_456)
        .ack_number(654_321)
        .payload(vec![1; 10])
        .build();
    assert_eq!(uplink(&mut p, &ack), TC_ACT_REDIRECT);
    let e = p.conntrack_get(&dnat_key(40004)).expect("picked up");
    assert_eq!(e.flags & CT_F_PICKUP, CT_F_PICKUP);
    assert_eq!(
        table_and_state(&mut p, &dnat_key(40004)),
        (Table::New, ct_state::TCP_SYN_SENT)
    );
    assert_eq!(p.stat(Stat::CtPickedUp), 1);
    // Both ends still hold it: it becomes established.
    from(&mut p, A, &server(40004, tf::ACK, 654_321, 123_466));
    assert_eq!(
        table_and_state(&mut p, &dnat_key(40004)),
        (Table::Main, ct_state::TCP_ESTABLISHED)
    );

    // RST, FIN and SYN-ACK open nothing: to the node they are its own
    // business; from a container they would leave with the pool address.
    for flags in [
        tf::RST,
        tf::RST | tf::ACK,
        tf::FIN | tf::ACK,
        tf::SYN | tf::ACK,
    ] {
        assert_eq!(uplink(&mut p, &client(40005, flags, 1, 1)), TC_ACT_OK);
        assert!(p.conntrack_get(&dnat_key(40005)).is_none());
        let stray = Frame::tcp((A.addr, 45005), (CLIENT, 80))
            .tcp_flags(flags)
            .macs(A.mac, A.host_mac)
            .build();
        assert_eq!(from(&mut p, A, &stray), TC_ACT_SHOT);
    }
    assert_eq!(p.stat(Stat::DropNoFlow), 4);
}

// ---- UDP ---------------------------------------------------------------------

#[test]
fn a_dns_exchange_stays_unconfirmed_and_a_stream_is_confirmed() {
    let mut p = datapath();
    let query = Frame::udp((CLIENT, 4000), (NODE, 5353))
        .payload(&b"q"[..])
        .build();
    let answer = Frame::udp((A.addr, 53), (CLIENT, 4000))
        .payload(&b"a"[..])
        .macs(A.mac, A.host_mac)
        .build();
    let key = CtKey::v4(CLIENT, 4000, NODE, 5353, proto::UDP);
    let rkey = CtKey::v4(A.addr, 53, CLIENT, 4000, proto::UDP);
    assert_eq!(uplink(&mut p, &query), TC_ACT_REDIRECT);
    assert_eq!(
        table_and_state(&mut p, &key),
        (Table::New, ct_state::UNREPLIED)
    );
    assert_eq!(from(&mut p, A, &answer), TC_ACT_REDIRECT);
    assert_eq!(
        table_and_state(&mut p, &rkey),
        (Table::New, ct_state::REPLIED)
    );
    assert_eq!(
        p.ct_container(A.id).entries,
        0,
        "one exchange: not a stream"
    );

    assert_eq!(uplink(&mut p, &query), TC_ACT_REDIRECT);
    assert_eq!(from(&mut p, A, &answer), TC_ACT_REDIRECT);
    for k in [key, rkey] {
        assert_eq!(table_and_state(&mut p, &k), (Table::Main, ct_state::STREAM));
    }
    assert_eq!(p.ct_container(A.id).entries, 2);
}

// ---- expiry ------------------------------------------------------------------

#[test]
fn a_flow_idle_for_its_timeout_is_replaced_by_the_next_packet() {
    let mut p = datapath();
    let key = CtKey::v4(CLIENT, 4001, NODE, 5353, proto::UDP);
    // A dead flow of the same tuple, idle for 31 s (UDP: 30 s), that
    // translated to another port.
    let old = now_ns() - 31_000_000_000;
    let stale = CtEntry {
        nat_addr: A.addr,
        nat_port: 99,
        action: ct_action::DNAT,
        state: ct_state::UNREPLIED,
        ifindex: A.ifindex,
        flags: datapath_common::CT_F_ORIGINAL,
        container_id: A.id,
        created_ns: old,
        last_seen_ns: old,
        ..CtEntry::default()
    };
    p.insert_conntrack_new(key, stale);
    let query = Frame::udp((CLIENT, 4001), (NODE, 5353))
        .payload(&b"q"[..])
        .build();
    let r = p.uplink_tc(&query);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        ParsedFrame::parse(&r.data).expect("parses").ports(),
        (4001, 53),
        "translated by a fresh flow, not the dead one"
    );
    assert_eq!(p.stat(Stat::CtExpired), 1);
    assert!(p.conntrack_get(&key).expect("entry").last_seen_ns > old);
}

#[test]
fn a_confirmed_flow_idle_for_its_timeout_is_removed_by_its_timer() {
    let mut p = datapath_with(
        |c| {
            c.timeouts.udp_stream = 1;
        },
        &[],
    );
    let query = Frame::udp((CLIENT, 4002), (NODE, 5353))
        .payload(&b"q"[..])
        .build();
    let answer = Frame::udp((A.addr, 53), (CLIENT, 4002))
        .payload(&b"a"[..])
        .macs(A.mac, A.host_mac)
        .build();
    for _ in 0..2 {
        uplink(&mut p, &query);
        from(&mut p, A, &answer);
    }
    assert_eq!(p.conntrack_table(Table::Main).len(), 2);
    assert_eq!(p.ct_container(A.id).entries, 2);
    // No packet comes: the kernel's timer alone removes it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.conntrack_table(Table::Main).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the timer never expired the flow"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(p.conntrack_table(Table::New).is_empty());
    assert_eq!(p.ct_container(A.id).entries, 0, "the count follows");
    assert_eq!(p.stat(Stat::CtExpired), 1);
}

// ---- fill resistance -----------------------------------------------------------

#[test]
fn a_container_over_its_share_keeps_its_new_flows_unconfirmed_and_working() {
    let mut p = datapath_with(|c| c.ct_container_max = 2, &[]);
    handshake(&mut p, 40010);
    assert_eq!(p.ct_container(A.id).entries, 2);
    handshake(&mut p, 40011);
    assert_eq!(
        table_and_state(&mut p, &dnat_key(40011)).0,
        Table::New,
        "beyond its share: not confirmed"
    );
    assert_eq!(p.ct_container(A.id).entries, 2);
    assert_eq!(p.ct_container(A.id).over_share, 1);
    assert_eq!(p.stat(Stat::CtOverShare), 1);
    let data = Frame::tcp((CLIENT, 40011), (NODE, 8080))
        .tcp_flags(tf::ACK)
        .seq(1001)
        .ack_number(5001)
        .payload(vec![1; 10])
        .build();
    assert_eq!(uplink(&mut p, &data), TC_ACT_REDIRECT, "it still works");
}

#[test]
fn a_full_main_table_leaves_new_flows_unconfirmed_and_working() {
    let mut p = datapath_with(|_| {}, &[(names::CT, 2)]);
    handshake(&mut p, 40012);
    handshake(&mut p, 40013);
    assert_eq!(table_and_state(&mut p, &dnat_key(40013)).0, Table::New);
    assert_eq!(p.stat(Stat::CtMainFull), 1);
    assert_eq!(p.stat(Stat::DropCtFull), 0, "nothing dropped");
    let data = Frame::tcp((CLIENT, 40013), (NODE, 8080))
        .tcp_flags(tf::ACK)
        .seq(1001)
        .ack_number(5001)
        .build();
    assert_eq!(uplink(&mut p, &data), TC_ACT_REDIRECT);
}

// ---- masquerade ports ------------------------------------------------------------

fn query_from(c: Ctr, sport: u16) -> Vec<u8> {
    Frame::udp((c.addr, sport), (CLIENT, 53))
        .payload(&b"q"[..])
        .macs(c.mac, c.host_mac)
        .build()
}

/// Marks masquerade port `port` to CLIENT:53/udp as held by a live flow of
/// another container (its reply entry), last seen `ago` ns ago.
fn hold(p: &mut Programs, port: u16, ago: u64) {
    let t = now_ns() - ago;
    p.insert_conntrack_new(
        CtKey::v4(CLIENT, 53, NODE, port, proto::UDP),
        CtEntry {
            nat_addr: B.addr,
            nat_port: port.wrapping_sub(30000),
            action: ct_action::REV_SNAT,
            state: ct_state::UNREPLIED,
            ifindex: B.ifindex,
            container_id: B.id,
            created_ns: t,
            last_seen_ns: t,
            ..CtEntry::default()
        },
    );
}

#[test]
fn masquerade_keeps_the_containers_source_port_when_it_is_free() {
    let mut p = datapath();
    let r = p.container_tc(&query_from(A, 62000), A.ifindex);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        ParsedFrame::parse(&r.data).expect("parses").ports(),
        (62000, 53)
    );
    // Taken for that destination: another one.
    hold(&mut p, 62001, 0);
    let r = p.container_tc(&query_from(A, 62001), A.ifindex);
    let port = ParsedFrame::parse(&r.data).expect("parses").ports().0;
    assert_ne!(port, 62001);
    assert!((61000..=65535).contains(&port));
}

#[test]
fn masquerade_finds_the_last_free_ports_of_a_nearly_full_range_and_counts_exhaustion() {
    let mut p = datapath_with(
        |c| {
            c.snat_port_min = 61000;
            c.snat_port_max = 61999;
        },
        &[],
    );
    // 992 of 1,000 ports held by live flows to this destination.
    let free: Vec<u16> = (0..8).map(|i| 61000 + 123 * i).collect();
    for port in 61000..=61999 {
        if !free.contains(&port) {
            hold(&mut p, port, 0);
        }
    }
    let mut got = Vec::new();
    for sport in 0..8 {
        let r = p.container_tc(&query_from(A, 30000 + sport), A.ifindex);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
        got.push(ParsedFrame::parse(&r.data).expect("parses").ports().0);
    }
    got.sort_unstable();
    assert_eq!(got, free, "every free port found");
    // The range is full: the next flow is refused and counted.
    let r = p.container_tc(&query_from(A, 30100), A.ifindex);
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(p.stat(Stat::DropSnatPortsExhausted), 1);
    assert_eq!(p.ct_container(A.id).snat_exhausted, 1);
}

#[test]
fn the_port_of_a_dead_flow_is_free_again() {
    let mut p = datapath_with(
        |c| {
            c.snat_port_min = 61000;
            c.snat_port_max = 61001;
        },
        &[],
    );
    hold(&mut p, 61000, 0);
    hold(&mut p, 61001, 40_000_000_000);
    let r = p.container_tc(&query_from(A, 30000), A.ifindex);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
    assert_eq!(
        ParsedFrame::parse(&r.data).expect("parses").ports().0,
        61001
    );
}

// ---- fragments -------------------------------------------------------------------

/// Splits an (option-less) IPv4 frame's payload at `at` (a multiple of 8)
/// into two fragments.
fn split(frame: &[u8], at: usize) -> [Vec<u8>; 2] {
    assert_eq!(at % 8, 0);
    let (eth, ip, data) = (&frame[..14], &frame[14..34], &frame[34..]);
    let piece = |bytes: &[u8], offset: usize, more: bool| {
        let mut h = ip.to_vec();
        h[2..4].copy_from_slice(&((20 + bytes.len()) as u16).to_be_bytes());
        let frags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&frags.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = ip_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        [eth, &h, bytes].concat()
    };
    [piece(&data[..at], 0, true), piece(&data[at..], at, false)]
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Each fragment's IPv4 header is valid and has source `src`, destination
/// `dst` and TTL `ttl`; the payloads, put back together, are `l4`.
#[track_caller]
fn assert_reassembles(out: &[Vec<u8>], src: [u8; 4], dst: [u8; 4], ttl: u8, l4: &[u8]) {
    let mut data = Vec::new();
    for f in out {
        let h = &f[14..34];
        assert_eq!(ip_checksum(h), 0, "valid IPv4 checksum");
        assert_eq!((&h[12..16], &h[16..20], h[8]), (&src[..], &dst[..], ttl));
        data.extend_from_slice(&f[34..]);
    }
    assert_eq!(
        data, l4,
        "the datagram put back together is the translated one"
    );
}

#[test]
fn a_fragmented_datagram_to_a_published_port_is_translated_fragment_by_fragment() {
    let payload: Vec<u8> = (0..400u16).map(|i| i as u8).collect();
    let dgram = |dst: ([u8; 4], u16), ttl: u8| {
        Frame::udp((CLIENT, 4005), dst)
            .payload(payload.clone())
            .dont_fragment(false)
            .ident(0x5151)
            .ttl(ttl)
            .build()
    };
    let frags = split(&dgram((NODE, 5353), 64), 200);
    let expected = dgram((A.addr, 53), 63);
    let mut tc = datapath();
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| {
            let r = tc.uplink_tc(f);
            assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", tc.stats());
            r.data
        })
        .collect();
    assert_reassembles(&out, CLIENT, A.addr, 63, &expected[34..]);
    assert_eq!(tc.stat(Stat::FragmentTranslated), 1);

    let mut xdp = datapath();
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| {
            let r = xdp.uplink_xdp(f);
            assert_eq!(r.verdict, XDP_REDIRECT, "stats: {:?}", xdp.stats());
            r.data
        })
        .collect();
    assert_reassembles(&out, CLIENT, A.addr, 63, &expected[34..]);
}

#[test]
fn a_fragmented_datagram_from_a_container_is_masqueraded_fragment_by_fragment() {
    let payload: Vec<u8> = (0..400u16).map(|i| (i * 7) as u8).collect();
    let dgram = |src: ([u8; 4], u16), ttl: u8| {
        Frame::udp(src, (CLIENT, 53))
            .payload(payload.clone())
            .dont_fragment(false)
            .ident(0x6161)
            .ttl(ttl)
            .macs(A.mac, A.host_mac)
            .build()
    };
    let mut p = datapath();
    let frags = split(&dgram((A.addr, 62005), 64), 200);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| {
            let r = p.container_tc(f, A.ifindex);
            assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
            r.data
        })
        .collect();
    let expected = dgram((NODE, 62005), 63);
    assert_reassembles(&out, NODE, CLIENT, 63, &expected[34..]);

    // The answer, fragmented too, finds its way back.
    let answer = |dst: ([u8; 4], u16), ttl: u8| {
        Frame::udp((CLIENT, 53), dst)
            .payload(payload.clone())
            .dont_fragment(false)
            .ident(0x7171)
            .ttl(ttl)
            .build()
    };
    let out: Vec<Vec<u8>> = split(&answer((NODE, 62005), 64), 200)
        .iter()
        .map(|f| {
            let r = p.uplink_tc(f);
            assert_eq!(r.verdict, TC_ACT_REDIRECT, "stats: {:?}", p.stats());
            r.data
        })
        .collect();
    let expected = answer((A.addr, 62005), 63);
    assert_reassembles(&out, CLIENT, A.addr, 63, &expected[34..]);
}

#[test]
fn a_later_fragment_whose_first_was_not_seen_never_leaves_a_container() {
    let mut p = datapath();
    let payload = vec![5u8; 400];
    let [_, later] = split(
        &Frame::udp((A.addr, 62006), (CLIENT, 53))
            .payload(payload)
            .dont_fragment(false)
            .macs(A.mac, A.host_mac)
            .build(),
        200,
    );
    assert_eq!(p.container_tc(&later, A.ifindex).verdict, TC_ACT_SHOT);
    assert_eq!(p.stat(Stat::DropFragment), 1);
}

// ---- flush -------------------------------------------------------------------------

#[test]
fn a_flush_of_one_container_removes_its_flows_and_its_count_in_the_kernel() {
    let mut p = datapath();
    p.publish([0; 4], 9090, proto::TCP, B.addr, 90, B.ifindex, B.id);
    handshake(&mut p, 40020);
    // B: one confirmed flow, one unconfirmed.
    let b = |cport: u16, flags: u8, seq: u32, ack: u32| {
        Frame::tcp((CLIENT, cport), (NODE, 9090))
            .tcp_flags(flags)
            .seq(seq)
            .ack_number(ack)
            .build()
    };
    let b_back = |cport: u16| {
        Frame::tcp((B.addr, 90), (CLIENT, cport))
            .tcp_flags(tf::SYN | tf::ACK)
            .seq(5000)
            .ack_number(1001)
            .macs(B.mac, B.host_mac)
            .build()
    };
    uplink(&mut p, &b(40021, tf::SYN, 1000, 0));
    from(&mut p, B, &b_back(40021));
    uplink(&mut p, &b(40021, tf::ACK, 1001, 5001));
    uplink(&mut p, &b(40022, tf::SYN, 1000, 0));
    assert_eq!(p.ct_container(B.id).entries, 2);
    assert_eq!(p.conntrack().len(), 6);

    let removed = p.flush(FlushRequest {
        container_id: B.id,
        flags: FLUSH_F_CONTAINER,
        ..FlushRequest::default()
    });
    assert_eq!(removed, 2, "two flows of B");
    assert_eq!(p.ct_container(B.id).entries, 0);
    assert_eq!(p.ct_container(A.id).entries, 2, "A's untouched");
    let left = p.conntrack();
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|(_, e)| e.container_id == A.id));

    assert_eq!(p.flush(FlushRequest::default()), 1);
    assert!(p.conntrack().is_empty());
    assert_eq!(p.ct_container(A.id).entries, 0);
}

#[test]
fn a_flush_of_one_published_port_removes_only_the_flows_through_it() {
    let mut p = datapath();
    // Through 5353/udp and 8080/tcp of A, and A's own egress.
    let query = |cport: u16| {
        Frame::udp((CLIENT, cport), (NODE, 5353))
            .payload(&b"q"[..])
            .build()
    };
    assert_eq!(uplink(&mut p, &query(4100)), TC_ACT_REDIRECT);
    assert_eq!(uplink(&mut p, &query(4101)), TC_ACT_REDIRECT);
    assert_eq!(
        uplink(&mut p, &client(40030, tf::SYN, 1000, 0)),
        TC_ACT_REDIRECT
    );
    assert_eq!(from(&mut p, A, &query_from(A, 4102)), TC_ACT_REDIRECT);
    assert_eq!(p.conntrack().len(), 8);

    let port = |port: u16, proto: u8| FlushRequest {
        container_id: A.id,
        flags: FLUSH_F_CONTAINER | FLUSH_F_SERVICE,
        port,
        proto,
        ..FlushRequest::default()
    };
    assert_eq!(p.flush(port(5353, proto::TCP)), 0, "another protocol");
    assert_eq!(
        p.flush(port(5353, proto::UDP)),
        2,
        "the two flows of 5353/udp"
    );
    let left = p.conntrack();
    assert_eq!(left.len(), 4, "{left:#?}");
    assert!(
        p.conntrack_get(&dnat_key(40030)).is_some(),
        "8080/tcp's stays"
    );
    assert!(
        left.iter()
            .any(|(_, e)| e.action == ct_action::SNAT && e.is_original()),
        "A's egress stays"
    );
}

#[test]
fn a_flow_expires_by_the_programs_clock() {
    const T0: u64 = 1_000 * 1_000_000_000;
    const S: u64 = 1_000_000_000;
    let mut p = datapath();
    let query = Frame::udp((CLIENT, 4200), (NODE, 5353))
        .payload(&b"q"[..])
        .build();
    let key = CtKey::v4(CLIENT, 4200, NODE, 5353, proto::UDP);
    p.freeze_clock(T0);
    assert_eq!(uplink(&mut p, &query), TC_ACT_REDIRECT);
    assert_eq!(p.conntrack_get(&key).expect("flow").created_ns, T0);
    // 29 s later (UDP: 30 s idle), the same flow.
    p.freeze_clock(T0 + 29 * S);
    assert_eq!(uplink(&mut p, &query), TC_ACT_REDIRECT);
    let e = p.conntrack_get(&key).expect("flow");
    assert_eq!((e.created_ns, e.last_seen_ns), (T0, T0 + 29 * S));
    assert_eq!(p.stat(Stat::CtExpired), 0);
    // 31 s after that: expired, replaced by a fresh flow.
    p.freeze_clock(T0 + 60 * S);
    assert_eq!(uplink(&mut p, &query), TC_ACT_REDIRECT);
    assert_eq!(p.conntrack_get(&key).expect("flow").created_ns, T0 + 60 * S);
    assert_eq!(p.stat(Stat::CtExpired), 1);
}

#[test]
fn a_flow_whose_interface_is_gone_is_dropped_counted_and_forgotten() {
    // An interface index no namespace has yet, and the loopback's (1 in
    // every namespace).
    const GONE: u32 = 0x7fff_0000;
    const LO: u32 = 1;
    let mut p = datapath_with(|c| c.flags |= CONFIG_F_CHECK_LINKS, &[]);
    let place = |p: &mut Programs, ifindex: u32| {
        p.insert_endpoint(
            A.addr,
            Endpoint {
                ifindex,
                container_id: A.id,
                mac: A.mac,
                host_mac: A.host_mac,
                flags: 0,
            },
        );
        p.publish([0; 4], 5353, proto::UDP, A.addr, 53, ifindex, A.id);
    };
    let query = Frame::udp((CLIENT, 4300), (NODE, 5353))
        .payload(&b"q"[..])
        .build();
    let key = CtKey::v4(CLIENT, 4300, NODE, 5353, proto::UDP);
    // A flow through the container's veth...
    place(&mut p, LO);
    assert_eq!(uplink(&mut p, &query), TC_ACT_REDIRECT);
    assert_eq!(p.conntrack_get(&key).expect("flow").ifindex, LO);
    // ... which vanished: its next packet is dropped and counted, and the
    // flow forgotten.
    let mut e = p.conntrack_get(&key).expect("flow");
    e.ifindex = GONE;
    p.insert_conntrack_new(key, e);
    assert_eq!(uplink(&mut p, &query), TC_ACT_SHOT);
    assert_eq!(p.stat(Stat::DropRedirectFailed), 1);
    assert!(p.conntrack().is_empty(), "{:#?}", p.conntrack());
    // While the maps still name the vanished veth, each packet is dropped
    // the same way; once they name the new one, the next packet starts the
    // flow afresh through it.
    place(&mut p, GONE);
    assert_eq!(uplink(&mut p, &query), TC_ACT_SHOT);
    assert_eq!(p.stat(Stat::DropRedirectFailed), 2);
    assert!(p.conntrack().is_empty(), "{:#?}", p.conntrack());
    place(&mut p, LO);
    assert_eq!(uplink(&mut p, &query), TC_ACT_REDIRECT);
    assert_eq!(p.conntrack_get(&key).expect("flow").ifindex, LO);
    assert_eq!(p.stat(Stat::DropRedirectFailed), 2);
}
