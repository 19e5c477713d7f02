//! The conntrack logic both sides share (datapath-common): the two entries
//! of a flow find each other (the datapath and the agent pair them this
//! way), keys reverse cleanly and compare like `==`, every state has a
//! timeout, a RST at the sender's next sequence number is always in the
//! window, and the pool test agrees with plain mask arithmetic.
#![no_main]

use arbitrary::Arbitrary;
use datapath_common::{
    Config, CtEntry, CtKey,
    ct::{self, Timeouts},
    ct_action, ct_state,
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
    state: u8,
    seq: u32,
    ack: u32,
    flight: u16,
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
    let key = CtKey::v4(i.saddr, i.sport, i.daddr, i.dport, i.proto);
    assert_eq!(key.reversed().reversed(), key);
    assert!(key.same(&key));
    assert_eq!(key.same(&key.reversed()), key == key.reversed());

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
    assert!(orig.pairs_with(&key, &reply_key) && reply.pairs_with(&reply_key, &key));
    if i.snat {
        assert_eq!((reply_key.daddr, reply_key.dport), (i.nat_addr, i.nat_port));
        assert_eq!((reply_key.saddr, reply_key.sport), (key.daddr, key.dport));
    } else {
        assert_eq!((reply_key.saddr, reply_key.sport), (i.nat_addr, i.nat_port));
        assert_eq!((reply_key.daddr, reply_key.dport), (key.saddr, key.sport));
    }

    // Every state of every protocol has a timeout, set or defaulted.
    let state = i.state % 8;
    assert!(Timeouts::UNSET.of(i.proto, state) > 0);
    assert!(!ct_state::name(state).is_empty());

    // A RST carrying the sender's next sequence number, or any number the
    // other side acknowledged within the bytes in flight, is in the
    // window; one half the sequence space away is not.
    let sender_end = i.seq;
    let receiver_ack = i.seq.wrapping_sub(u32::from(i.flight));
    assert!(ct::rst_in_window(sender_end, sender_end, receiver_ack));
    assert!(ct::rst_in_window(receiver_ack, sender_end, receiver_ack));
    assert!(!ct::rst_in_window(
        sender_end.wrapping_add(1 << 31),
        sender_end,
        receiver_ack
    ));
    let _ = ct::seq_after(i.seq, i.ack);

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
