//! Connection tracking: lookups, per-packet accounting, and creation of the
//! two entries of a new flow.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use datapath_common::{CT_F_ORIGINAL, CT_F_SEEN, Config, CtEntry, CtKey, Stat, ct_action};

use crate::{
    ctx::Packet,
    maps::CONNTRACK,
    parse::{self, Flow, Quoted},
};

/// `-EEXIST` from `bpf_map_update_elem` with `BPF_NOEXIST`.
const EEXIST: i32 = -17;

/// How many ports a new masqueraded flow tries before giving up.
const SNAT_TRIES: u32 = 16;

/// The entry for `key`, if the flow is tracked.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CONNTRACK.get_ptr_mut(key)
}

/// The flow an ICMP error is about and its entry for the error's
/// direction: the quoted packet went the other way, so its tuple reversed is
/// the key of the entry the error must be translated by.
#[inline(always)]
pub fn lookup_icmp_error<C: Packet>(ctx: &C, flow: &Flow) -> Option<(Quoted, CtEntry)> {
    let quoted = parse::parse_quoted(ctx, flow)?;
    let entry = lookup(&quoted.key.reversed())?;
    // SAFETY: points into a live conntrack value (RCU); copied out once.
    Some((quoted, unsafe { *entry }))
}

/// Accounts one packet of `flow` to `entry`.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, flow: &Flow) {
    // SAFETY: `entry` points into a hash map value that stays allocated while
    // this program runs (RCU). Other CPUs may update the same entry:
    // counters use atomic adds; the flags and timestamp are plain stores
    // where a lost update only delays expiry by one packet.
    unsafe {
        // The BPF target has no `AtomicU64::fetch_add`; the intrinsic
        // lowers to the BPF atomic add instruction (result unused: XADD).
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*entry).bytes,
            u64::from(flow.ip_len),
        );
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        let flags = u32::from(flow.tcp_flags);
        if (*entry).tcp_flags & flags != flags {
            (*entry).tcp_flags |= flags;
        }
        if (*entry).flags & CT_F_SEEN == 0 {
            (*entry).flags |= CT_F_SEEN;
        }
    }
}

/// A new entry for the first packet of a flow.
#[inline(always)]
fn entry(action: u8, addr: [u8; 4], port: u16, ifindex: u32, container_id: u32) -> CtEntry {
    let now = unsafe { bpf_ktime_get_ns() };
    CtEntry {
        nat_addr: addr,
        nat_port: port,
        action,
        _pad: 0,
        ifindex,
        container_id,
        tcp_flags: 0,
        flags: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
    }
}

/// Inserts both entries of a new flow: `orig` under `key` and its reply
/// under `orig.peer_key(key)`. Either both are inserted or neither.
/// On a lost race with another CPU creating the same flow, the winner's
/// entry is returned.
#[inline(always)]
fn insert_pair(key: &CtKey, orig: &CtEntry, reply: &CtEntry) -> Result<*mut CtEntry, Stat> {
    let reply_key = orig.peer_key(key);
    match CONNTRACK.insert(&reply_key, reply, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(EEXIST) => return Err(Stat::DropSnatPortsExhausted),
        Err(_) => return Err(Stat::DropCtFull),
    }
    match CONNTRACK.insert(key, orig, u64::from(BPF_NOEXIST)) {
        Ok(()) => lookup(key).ok_or(Stat::DropCtFull),
        Err(e) => {
            let _ = CONNTRACK.remove(&reply_key);
            if e == EEXIST {
                lookup(key).ok_or(Stat::DropCtFull)
            } else {
                Err(Stat::DropCtFull)
            }
        }
    }
}

/// Creates the conntrack pair of a new flow to a published port:
/// `client → host:port` becomes `client → backend`.
#[inline(always)]
pub fn create_dnat(
    key: &CtKey,
    backend_addr: [u8; 4],
    backend_port: u16,
    container_ifindex: u32,
    uplink_ifindex: u32,
    container_id: u32,
) -> Result<*mut CtEntry, Stat> {
    let mut orig = entry(
        ct_action::DNAT,
        backend_addr,
        backend_port,
        container_ifindex,
        container_id,
    );
    orig.flags = CT_F_ORIGINAL;
    let reply = entry(
        ct_action::REV_DNAT,
        key.daddr,
        key.dport,
        uplink_ifindex,
        container_id,
    );
    match insert_pair(key, &orig, &reply) {
        // The reply key (backend:port → client:port) is taken by another
        // flow: only possible if the container itself uses that tuple.
        Err(Stat::DropSnatPortsExhausted) => Err(Stat::DropCtFull),
        r => r,
    }
}

/// Creates the conntrack pair of a flow routed unchanged from the uplink to
/// container address `key.daddr`, so that the container's replies are
/// recognised (and passed, not masqueraded).
#[inline(always)]
pub fn create_routed(
    key: &CtKey,
    container_ifindex: u32,
    uplink_ifindex: u32,
    container_id: u32,
) -> Result<*mut CtEntry, Stat> {
    let mut orig = entry(
        ct_action::ROUTED,
        key.daddr,
        key.dport,
        container_ifindex,
        container_id,
    );
    orig.flags = CT_F_ORIGINAL;
    let reply = entry(
        ct_action::ROUTED,
        key.saddr,
        key.sport,
        uplink_ifindex,
        container_id,
    );
    match insert_pair(key, &orig, &reply) {
        Err(Stat::DropSnatPortsExhausted) => Err(Stat::DropCtFull),
        r => r,
    }
}

/// Creates the conntrack pair of a new masqueraded flow from a container:
/// `ctr:port → dst` becomes `node:allocated → dst`, with the allocated port
/// (ICMP: echo id) picked at random from the configured range and retried on
/// collision.
#[inline(always)]
pub fn create_snat(
    key: &CtKey,
    cfg: &Config,
    container_ifindex: u32,
    container_id: u32,
) -> Result<*mut CtEntry, Stat> {
    let span = u32::from(cfg.snat_port_max.wrapping_sub(cfg.snat_port_min)) + 1;
    let start = unsafe { bpf_get_prandom_u32() } % span;
    let reply = entry(
        ct_action::REV_SNAT,
        key.saddr,
        key.sport,
        container_ifindex,
        container_id,
    );
    for i in 0..SNAT_TRIES {
        let port = cfg.snat_port_min + ((start + i * 7919) % span) as u16;
        let mut orig = entry(
            ct_action::SNAT,
            cfg.node_addr,
            port,
            cfg.uplink_ifindex,
            container_id,
        );
        orig.flags = CT_F_ORIGINAL;
        match insert_pair(key, &orig, &reply) {
            Err(Stat::DropSnatPortsExhausted) => continue,
            r => return r,
        }
    }
    Err(Stat::DropSnatPortsExhausted)
}
