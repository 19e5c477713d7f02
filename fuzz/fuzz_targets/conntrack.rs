//! The conntrack logic both sides share (datapath-common): the two entries
//! of a flow find each other (the agent's collector pairs them this way),
//! keys reverse cleanly, flow states follow the TCP flags, every state has
//! a timeout, and the pool test agrees with plain mask arithmetic.
#![no_main]

use arbitrary::Arbitrary;
use datapath_common::{
    Config, CtEntry, CtKey,
    ct::{CtState, Timeouts},
    ct_action, proto, tcp_flags,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    nat_addr: [u8; 4],
    nat_port: u16,
    snat: bool,
    orig_flags: u32,
    reply_flags: u32,
    replied: bool,
    pool_addr: [u8; 4],
    prefix: u8,
}

fn entry(action: u8, nat_addr: [u8; 4], nat_port: u16) -> CtEntry {
    CtEntry {
        action,
        nat_addr,
        nat_port,
        ..CtEntry::default()
    }
}

fuzz_target!(|i: Input| {
    let key = CtKey {
        saddr: i.saddr,
        daddr: i.daddr,
        sport: i.sport,
        dport: i.dport,
        proto: i.proto,
        _pad: [0; 3],
    };
    assert_eq!(key.reversed().reversed(), key);

    // A flow's original entry leads to its reply entry's key, and the
    // reply entry leads back: DNAT (destination rewritten to the
    // container) and SNAT (source rewritten to the node).
    let (orig, reply) = if i.snat {
        (
            entry(ct_action::SNAT, i.nat_addr, i.nat_port),
            entry(ct_action::REV_SNAT, key.saddr, key.sport),
        )
    } else {
        (
            entry(ct_action::DNAT, i.nat_addr, i.nat_port),
            entry(ct_action::REV_DNAT, key.daddr, key.dport),
        )
    };
    let reply_key = orig.peer_key(&key);
    assert_eq!(reply.peer_key(&reply_key), key, "{orig:?} / {reply:?}");
    if i.snat {
        assert_eq!((reply_key.daddr, reply_key.dport), (i.nat_addr, i.nat_port));
        assert_eq!((reply_key.saddr, reply_key.sport), (key.daddr, key.dport));
    } else {
        assert_eq!((reply_key.saddr, reply_key.sport), (i.nat_addr, i.nat_port));
        assert_eq!((reply_key.daddr, reply_key.dport), (key.saddr, key.sport));
    }

    let state = CtState::of(i.proto, i.orig_flags, i.reply_flags, i.replied);
    let all = i.orig_flags | i.reply_flags;
    match i.proto {
        proto::TCP if all & tcp_flags::RST != 0 => assert_eq!(state, CtState::Closing),
        proto::TCP if !i.replied => assert!(matches!(state, CtState::SynSent | CtState::Closing)),
        proto::TCP => {}
        _ => assert_eq!(
            state,
            CtState::of(i.proto, 0, 0, i.replied),
            "flags only matter to TCP"
        ),
    }
    assert!(Timeouts::default().of(state) > 0);
    assert!(!state.name().is_empty());

    let prefix = u32::from(i.prefix % 33);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    let cfg = Config {
        pool_addr: i.pool_addr,
        pool_mask: mask.to_be_bytes(),
        ..Config::default()
    };
    let inside = u32::from_be_bytes(i.saddr) & mask == u32::from_be_bytes(i.pool_addr) & mask;
    assert_eq!(cfg.in_pool(i.saddr), inside);
});
