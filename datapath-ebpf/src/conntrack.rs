//! The flow core: connection tracking and its tables, run entirely in the
//! kernel. Written once, generic over the address family ([`Family`]):
//! each family has its own tables, with keys of its own size (an IPv4 key
//! is 16 bytes); IPv6 needs only its tables, its [`Family`] impl and its
//! entry points (`dp_ct6_*`) next to IPv4's.
//!
//! # Tables
//!
//! Every flow has two entries, one per direction, each self-contained
//! (what to rewrite, where to send): a packet is translated after one
//! lookup. The entries live in one of two tables, both always together:
//!
//! * [`CT`] (the main table; a preallocated hash of [`CtTimedEntry`]):
//!   *confirmed* flows only: TCP once both sides acknowledged each other,
//!   UDP and ICMP echo once they carried traffic both ways more than once
//!   (nf_conntrack's "assured"). An established packet costs one lookup
//!   here. Nothing is ever evicted from it: entries leave when their flow
//!   closes (moved to `CT_NEW`), expires (timer) or is flushed.
//! * [`CT_NEW`] (an LRU hash of [`CtEntry`]): everything else: handshakes,
//!   unreplied and single-exchange UDP, picked-up TCP, and closing TCP. A
//!   packet of such a flow costs two lookups (main, then this one). When it
//!   is full the kernel evicts its least recently used entries, so a SYN
//!   flood, a container spraying UDP at random ports, and the closed flows
//!   of a high connection rate only push out each other, never an
//!   established flow. This is nf_conntrack's early drop ("unreplied go
//!   first") by construction, and why the table never locks up under load:
//!   closed flows give way to new ones instead of holding slots for their
//!   closing timeout.
//!
//! # Why these mechanisms
//!
//! * *Plain LRU alone* cannot tell an unreplied entry from an established
//!   one, and its evictions are invisible, so it can neither protect
//!   established flows nor count per container. It is used where those
//!   do not matter: unconfirmed flows and fragments.
//! * *`bpf_timer`* expires the main table: the original entry of every
//!   confirmed flow carries a timer armed for its idle timeout; the
//!   callback ([`ct_expire`]) re-arms it for the remaining time if a
//!   packet came meanwhile (in either direction), else removes the flow.
//!   One timer run per timeout period per flow, nothing per packet, and
//!   every removal is the datapath's own, which keeps the per-container
//!   count ([`CT_CONTAINERS`]) exact. The agent never removes a confirmed
//!   entry itself: `datapath conntrack flush` runs [`flush`] in the kernel
//!   (the `ct_flush` program under `BPF_PROG_TEST_RUN`).
//! * *Lazy expiry* on lookup: an entry idle for its whole timeout (both
//!   directions) is removed by the packet that finds it and the packet
//!   starts a new flow. This is what expires `CT_NEW` entries (the LRU
//!   reclaims their memory), frees masquerade ports held by dead flows
//!   (the port search removes expired holders), and applies a new clock
//!   at once in tests. Timers do the rest.
//! * *Eviction on insert* (searching for a victim when full) was not
//!   chosen: a bounded search finds no victim in a table full of
//!   established flows, and the LRU map already does it for `CT_NEW`.
//!
//! Spike result (aya-ebpf 0.2.1, bpf-linker with LLVM 22, Linux 6.18):
//! `bpf_timer` in HASH and LRU_HASH values works when the value's BTF names
//! the field type `bpf_timer`; the callback is an `extern "C"` function
//! referenced by address, which LLVM emits as a `BPF_PSEUDO_FUNC` load and
//! aya relocates; a callback may delete its own element and re-arm its
//! timer. `bpf_loop` and `bpf_for_each_map_elem` callbacks work the same
//! way. The verifier refuses any load or store overlapping the timer, so
//! the timer sits after the entry and the programs copy the entry alone.
//! Atomics: the fetching forms (fetch-or, compare-exchange) need BPF v3
//! code generation, whose 32-bit register moves the verifier rejects on
//! packet pointers (and a fetch-add whose result is used compiled to a
//! plain add returning the addend); the non-fetching atomic add and OR
//! work with the default code generation and are all this module uses.
//! Functions that stay BPF subprograms (`#[inline(never)]`, callbacks)
//! take and return no Rust enums with data: their BTF (a union with
//! offset members) is refused by the kernel.
//!
//! # States and timeouts ([`ct_state`], [`datapath_common::ct::Timeouts`])
//!
//! TCP: `syn-sent` until both directions have carried an ACK (a spoofed
//! SYN flood's flows never get there: the SYN's sender never acknowledges
//! the answer), then `established` (confirmed), then `closing` after FIN
//! both ways or an accepted RST. Flags are ORed in atomically, so two CPUs
//! never lose each other's flags; a CPU that saw a flag unset before its OR
//! acts on it, and every such action (confirming, closing) tolerates being
//! taken twice (inserts use `BPF_NOEXIST`, counts follow the removal that
//! succeeded). A RST closes an established flow only if its
//! sequence number lies in the window ([`datapath_common::ct::rst_in_window`]:
//! between what the other side acknowledged and what the sender sent, with
//! slack for reordering); others are passed on to the endpoint, which
//! decides (RFC 5961), and counted. A SYN (without ACK) that finds a
//! closing flow ends it and starts a fresh one, so a 4-tuple reused
//! seconds after a close works through DNAT and masquerade.
//!
//! TCP segments without SYN that match no flow: loose pickup, as
//! nf_conntrack does by default. An ACK (without SYN, RST or FIN) creates a
//! short-lived `syn-sent` entry in `CT_NEW`, confirmed only once both
//! directions have been seen. This lets a connection idle beyond its
//! timeout resume when both ends still hold it, costs a flood no more than
//! a SYN flood costs (the LRU), and through masquerade turns a lost
//! mapping into a prompt RST instead of a silent stall. RST and FIN
//! without a flow never create one.
//!
//! UDP and ICMP echo: `unreplied`, `replied` (both 30 s, nf_conntrack's
//! `udp_timeout`), `stream` after two packets each way (120 s,
//! `udp_timeout_stream`; confirmed). A DNS exchange never leaves `CT_NEW`.
//!
//! # Races between CPUs
//!
//! A flow's original entry is inserted with `BPF_NOEXIST` before its reply
//! entry: the CPU that loses the race takes the winner's entry and goes on
//! with it; nothing is dropped or counted as full. Confirming and closing
//! insert into the other table first and remove from the old one after,
//! so a packet in between finds one or the other; only the CPU whose
//! removal of the original entry succeeds adjusts the container's count.
//! Counters use atomic adds.
//!
//! # Masquerade ports ([`dp_ct_snat_port`])
//!
//! The container's source port is kept when it lies in the masquerade
//! range and is free for the destination (MASQUERADE's behaviour).
//! Otherwise up to [`datapath_common::ct::SNAT_PROBES`] random ports of
//! the range are tried (a bounded loop): they miss with probability
//! `f^128` when a fraction `f` of the range is in use for the destination
//! (address, port, protocol): one in a million at 90 %, 0.14 % at 95 %.
//! Then [`datapath_common::ct::SNAT_SCAN`] consecutive ports from a random
//! one are scanned (a `bpf_loop`), so a range of up to 1,024 ports fails
//! only when it is full. A port held by an expired flow counts as free
//! (the search removes the holder). The default range 61000-65535 gives
//! 4,536 concurrent flows per destination. Exhaustion is counted per
//! container ([`CT_CONTAINERS`]).
//!
//! # Per-container share
//!
//! [`CT_CONTAINERS`] counts each container's entries in the main table
//! (two per confirmed flow), maintained only by the datapath's own
//! insertions and removals. A flow whose confirmation would take its
//! container past `Config::ct_container_max` (the agent's
//! `--ct-container-share` of the main table) stays in `CT_NEW`, where it
//! keeps working but competes with unconfirmed flows; this is counted
//! (`over_share`, `ct_over_share`). So one container opening connections
//! without end cannot fill the main table and lock out the others'
//! established flows.
//!
//! # Fragments ([`CT_FRAGS`])
//!
//! A first fragment is translated like any packet, and its ports are
//! remembered under (source, destination, IP id, protocol) for 30 s (an
//! LRU, like the kernel's reassembly queue timeout). Later fragments take
//! their ports from there and have their addresses translated by the same
//! flow.
//!
//! # Verifier shape
//!
//! The per-packet path (lookup, accounting, flag and sequence updates) is
//! inlined into the programs. Everything that happens once or twice per
//! flow (creation and the masquerade port search, confirmation, closing,
//! expiry) lives in global BPF functions (`dp_ct_*`): the verifier checks
//! each once, on its own, instead of once per call site and path, and their
//! stack frames are separate from the programs' (the programs and the
//! functions they call share 512 bytes). They take keys by pointer and
//! look their entries up again, since a global function can neither take
//! nor return a map value pointer.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_or, atomic_xadd},
};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    btf_maps::{HashMap, LruHashMap},
    helpers::generated::{
        bpf_for_each_map_elem, bpf_get_prandom_u32, bpf_loop, bpf_timer_init,
        bpf_timer_set_callback, bpf_timer_start,
    },
};
use datapath_common::{
    CT_F_ORIGINAL, CT_F_PICKUP, CT_F_SEEN, CtContainer, CtEntryOf, CtKey, CtKeyOf, CtTimedEntryOf,
    FLUSH_F_ARM, FLUSH_F_CONTAINER, FLUSH_F_MASQUERADE, FLUSH_F_SERVICE, FlushRequest, FragEntry,
    FragKeyOf, IpAddress, Stat, bpf_timer, capacity,
    ct::{self, Timeouts},
    ct_action, ct_state,
    monitor::event_kind,
    proto, tcp_flags,
};

use crate::{
    ctx::Packet,
    maps::{self, CT, CT_CONTAINERS, CT_FRAGS, CT_NEW, count},
    parse::{self, Flow, Quoted, frag},
};

/// `-EEXIST` from `bpf_map_update_elem` with `BPF_NOEXIST`.
const EEXIST: i32 = -17;
/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`, for timers.
const CLOCK_MONOTONIC: u64 = 1;
/// How long the ports of a fragmented datagram are kept (the kernel's
/// `ipfrag_time`).
const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// The main table of a family.
pub type MainTable<A> = HashMap<CtKeyOf<A>, CtTimedEntryOf<A>, { capacity::CT as usize }>;
/// The table of unconfirmed flows of a family.
pub type NewTable<A> = LruHashMap<CtKeyOf<A>, CtEntryOf<A>, { capacity::CT_NEW as usize }>;
/// The fragment table of a family.
pub type FragTable<A> = LruHashMap<FragKeyOf<A>, FragEntry, { capacity::CT_FRAGS as usize }>;

/// An address family: its tables and the entry points of its per-flow work
/// (global functions cannot be generic, so each family names its own).
pub trait Family: 'static {
    /// The address type.
    type A: IpAddress;
    /// The main table.
    fn ct() -> &'static MainTable<Self::A>;
    /// The table of unconfirmed flows.
    fn ct_new() -> &'static NewTable<Self::A>;
    /// The fragment table.
    fn frags() -> &'static FragTable<Self::A>;
    /// [`dp_ct_evict`].
    fn evict(key: &CtKeyOf<Self::A>, table: u32, reopen: u32) -> u32;
    /// [`dp_ct_close`].
    fn close(key: &CtKeyOf<Self::A>, table: u32, ev: u32, seq: u32) -> u32;
    /// [`dp_ct_confirm`].
    fn confirm(key: &CtKeyOf<Self::A>, ev: u32) -> u32;
    /// [`dp_ct_snat_port`].
    fn snat_port(key: &CtKeyOf<Self::A>, masq: &Self::A) -> u32;
    /// [`dp_ct_create`].
    fn create(key: &CtKeyOf<Self::A>, req: &NewFlow<Self::A>) -> u32;
    /// Tells the monitor of flow event `kind` (its event layout is IPv4's
    /// for now; other families tell it nothing).
    fn flow_event(kind: u8, key: &CtKeyOf<Self::A>, container_id: u32);
}

/// IPv4.
pub struct V4;

impl Family for V4 {
    type A = [u8; 4];

    #[inline(always)]
    fn ct() -> &'static MainTable<[u8; 4]> {
        &CT
    }

    #[inline(always)]
    fn ct_new() -> &'static NewTable<[u8; 4]> {
        &CT_NEW
    }

    #[inline(always)]
    fn frags() -> &'static FragTable<[u8; 4]> {
        &CT_FRAGS
    }

    #[inline(always)]
    fn evict(key: &CtKey, table: u32, reopen: u32) -> u32 {
        dp_ct_evict(key, table, reopen)
    }

    #[inline(always)]
    fn close(key: &CtKey, table: u32, ev: u32, seq: u32) -> u32 {
        dp_ct_close(key, table, ev, seq)
    }

    #[inline(always)]
    fn confirm(key: &CtKey, ev: u32) -> u32 {
        dp_ct_confirm(key, ev)
    }

    #[inline(always)]
    fn snat_port(key: &CtKey, masq: &[u8; 4]) -> u32 {
        dp_ct_snat_port(key, masq)
    }

    #[inline(always)]
    fn create(key: &CtKey, req: &NewFlow<[u8; 4]>) -> u32 {
        dp_ct_create(key, req)
    }

    #[inline(always)]
    fn flow_event(kind: u8, key: &CtKey, container_id: u32) {
        crate::maps::flow_event(kind, key, container_id);
    }
}

/// The clock of every conntrack decision (ns): the programs' clock, which
/// packet tests can freeze ([`crate::clock::now_ns`]).
#[inline(always)]
pub fn now() -> u64 {
    crate::clock::now_ns()
}

/// ORs TCP flags `tcp` and `CT_F_*` bits `ct` into entry `e` atomically:
/// one 64-bit `lock or` on the word they share ([`CtEntryOf::FLAGS_WORD`]),
/// a full barrier, so of two CPUs setting bits in two entries and then
/// reading each other's, at least one sees both. The previous value is not
/// fetched: fetching atomics need BPF v3 code generation, whose 32-bit
/// register moves the verifier takes as turning packet pointers into
/// numbers. Callers read the old value first; two CPUs may then both see
/// a bit unset and both act on it, so every action taken on a new flag
/// tolerates being taken twice.
///
/// # Safety
/// `e` points into a live map value.
#[inline(always)]
unsafe fn or<A: IpAddress>(e: *mut CtEntryOf<A>, tcp: u32, ct: u32) {
    // SAFETY: per the caller; the word is 8-byte aligned (asserted in
    // datapath-common). The result is unused, which makes this the
    // non-fetching atomic OR.
    unsafe {
        let word = e.cast::<u8>().add(CtEntryOf::<A>::FLAGS_WORD).cast::<u64>();
        atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(
            word,
            u64::from(tcp) | u64::from(ct) << 32,
        );
    }
}

/// Adds `n` to `*p` atomically.
///
/// # Safety
/// `p` points into a live map value.
#[inline(always)]
pub unsafe fn add(p: *mut u64, n: u64) {
    // SAFETY: per the caller; the result is unused (a plain atomic add).
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n);
    }
}

/// The table an entry is in.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Table {
    /// The main table: confirmed flows.
    Main,
    /// The table of unconfirmed flows.
    New,
}

impl Table {
    #[inline(always)]
    const fn from_u32(t: u32) -> Self {
        if t == Table::Main as u32 {
            Table::Main
        } else {
            Table::New
        }
    }
}

/// The entry a packet matched.
pub struct Hit<A: IpAddress> {
    /// The entry (in the main table: the `entry` part of its value).
    pub entry: *mut CtEntryOf<A>,
    /// Its table.
    pub table: Table,
}

impl<A: IpAddress> Clone for Hit<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A: IpAddress> Copy for Hit<A> {}

/// The entry for `key` in `table`.
#[inline(always)]
fn get<F: Family>(table: Table, key: &CtKeyOf<F::A>) -> Option<*mut CtEntryOf<F::A>> {
    match table {
        // `entry` is the first field of the main table's value.
        Table::Main => F::ct()
            .get_ptr_mut(key)
            .map(|p| p.cast::<CtEntryOf<F::A>>()),
        Table::New => F::ct_new().get_ptr_mut(key),
    }
}

/// Removes `key` from `table`; whether this call removed it.
#[inline(always)]
fn remove<F: Family>(table: Table, key: &CtKeyOf<F::A>) -> bool {
    match table {
        Table::Main => F::ct().remove(key).is_ok(),
        Table::New => F::ct_new().remove(key).is_ok(),
    }
}

/// The configured timeouts (the defaults when unconfigured).
#[inline(always)]
fn timeouts() -> Timeouts {
    maps::config().map_or(Timeouts::DEFAULT, |c| c.timeouts)
}

/// Whether TCP flags `flags` are a connection opener: SYN without ACK, RST
/// or FIN.
#[inline(always)]
pub const fn is_syn(flags: u8) -> bool {
    (flags as u32) & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN)
        == tcp_flags::SYN
}

/// Whether a TCP segment with `flags` may start a flow: a SYN, or (loose
/// pickup) a plain ACK; never RST, FIN or SYN-ACK.
#[inline(always)]
pub const fn may_create(proto: u8, flags: u8) -> bool {
    if proto != proto::TCP {
        return true;
    }
    let f = flags as u32;
    if f & (tcp_flags::RST | tcp_flags::FIN) != 0 {
        return false;
    }
    f & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
        || f & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::ACK
}

// ---- the per-packet path, inlined into the programs --------------------

/// Finds the flow of a packet with tuple `key` and TCP flags `flags`: the
/// main table first (one lookup for a confirmed flow), then the table of
/// unconfirmed flows. A flow idle for its whole timeout in both directions
/// is removed and not found; so is a closing TCP flow that a new SYN
/// reuses (the caller creates it afresh).
#[inline(always)]
pub fn lookup<F: Family>(
    key: &CtKeyOf<F::A>,
    flags: u8,
    timeouts: &Timeouts,
    now: u64,
) -> Option<Hit<F::A>> {
    let hit = match get::<F>(Table::Main, key) {
        Some(entry) => Hit {
            entry,
            table: Table::Main,
        },
        None => Hit {
            entry: get::<F>(Table::New, key)?,
            table: Table::New,
        },
    };
    // SAFETY: live map value (RCU).
    let (state, last) = unsafe { ((*hit.entry).state, (*hit.entry).last_seen_ns) };
    let reopen = key.proto == proto::TCP && state == ct_state::TCP_CLOSING && is_syn(flags);
    if (reopen || ct::idle_expired(now, last, timeouts.of_ns(key.proto, state)))
        && F::evict(key, hit.table as u32, reopen as u32) != 0
    {
        return None;
    }
    Some(hit)
}

/// The entry of a flow just created (or created by another CPU first).
#[inline(always)]
pub fn lookup_created<F: Family>(key: &CtKeyOf<F::A>) -> Option<Hit<F::A>> {
    match get::<F>(Table::Main, key) {
        Some(entry) => Some(Hit {
            entry,
            table: Table::Main,
        }),
        None => get::<F>(Table::New, key).map(|entry| Hit {
            entry,
            table: Table::New,
        }),
    }
}

/// The flow an IPv4 ICMP error is about and its entry for the error's
/// direction: the quoted packet went the other way, so its tuple reversed is
/// the key of the entry the error must be translated by.
#[inline(always)]
pub fn lookup_icmp_error<C: Packet>(ctx: &C, flow: &Flow) -> Option<(Quoted, CtEntryOf<[u8; 4]>)> {
    let quoted = parse::parse_quoted(ctx, flow)?;
    let key = quoted.key.reversed();
    let entry = get::<V4>(Table::Main, &key).or_else(|| get::<V4>(Table::New, &key))?;
    // SAFETY: points into a live conntrack value (RCU); the entry is copied
    // out once (it never includes the timer).
    Some((quoted, unsafe { *entry }))
}

/// Events of a flow that the per-packet path hands to [`dp_ct_close`] and
/// [`dp_ct_confirm`].
mod event {
    /// A RST.
    pub const RST: u32 = 1;
    /// The first FIN in one direction.
    pub const FIN: u32 = 2;
    /// The first ACK in one direction of a handshake.
    pub const ACK: u32 = 3;
    /// A UDP or ICMP flow's second packet in one direction.
    pub const DATAGRAM: u32 = 4;
}

/// Accounts one packet of `flow` to the entry it matched and follows the
/// flow's state: TCP flags and sequence space, replies and streams; hands
/// what may confirm or close the flow to [`dp_ct_confirm`] and
/// [`dp_ct_close`]. The entry may be gone from its table afterwards:
/// callers translate with what they read before.
#[inline(always)]
pub fn update<F: Family>(hit: Hit<F::A>, key: &CtKeyOf<F::A>, flow: &Flow, now: u64) {
    let e = hit.entry;
    // SAFETY: `e` points into a live map value (RCU). Other CPUs update the
    // same entry: counters use atomic adds, flags atomic ORs; the
    // timestamp and sequence fields are plain stores, where a lost update
    // costs at most one packet's worth of precision.
    let (first, state, original, packets) = unsafe {
        add(&raw mut (*e).packets, 1);
        add(&raw mut (*e).bytes, u64::from(flow.ip_len));
        if (*e).last_seen_ns != now {
            (*e).last_seen_ns = now;
        }
        let first = (*e).flags & CT_F_SEEN == 0;
        if first {
            or(e, 0, CT_F_SEEN);
        }
        (first, (*e).state, (*e).is_original(), (*e).packets)
    };
    if flow.frag == frag::LATER {
        return;
    }
    let table = hit.table as u32;
    if key.proto != proto::TCP {
        if hit.table == Table::New {
            if !original && state == ct_state::UNREPLIED {
                // SAFETY: as above; a plain store of the flow's state.
                unsafe { (*e).state = ct_state::REPLIED };
            }
            // Around the second packet of this direction: the other
            // direction's second packet looks again, so one of the two
            // sees both counts.
            if (2..4).contains(&packets) {
                F::confirm(key, event::DATAGRAM);
            }
        }
        return;
    }
    let pflags = u32::from(flow.tcp_flags)
        & (tcp_flags::FIN | tcp_flags::SYN | tcp_flags::RST | tcp_flags::ACK);
    // SAFETY: as above.
    let old = unsafe {
        let old = (*e).tcp_flags;
        if old & pflags != pflags {
            or(e, pflags, 0);
        }
        old
    };
    if pflags & tcp_flags::RST != 0 {
        // Before the sequence space moves: a stray RST must not widen it.
        F::close(key, table, event::RST, flow.seq);
        return;
    }
    let end = ct::seg_end(flow.seq, flow.payload_len, pflags);
    // SAFETY: as above.
    unsafe {
        if first || ct::seq_after(end, (*e).seq_end) {
            (*e).seq_end = end;
        }
        // The first ACK of this direction sets it whatever its value (0 is
        // no "before" in sequence space).
        if pflags & tcp_flags::ACK != 0
            && (first || old & tcp_flags::ACK == 0 || ct::seq_after(flow.ack, (*e).ack_max))
        {
            (*e).ack_max = flow.ack;
        }
    }
    if pflags & tcp_flags::FIN != 0 && old & tcp_flags::FIN == 0 {
        F::close(key, table, event::FIN, 0);
    } else if hit.table == Table::New
        && state == ct_state::TCP_SYN_SENT
        && pflags & tcp_flags::ACK != 0
        && old & tcp_flags::ACK == 0
    {
        F::confirm(key, event::ACK);
    }
}

/// Creates a flow (for a masqueraded one, after the port search); 0 when
/// it exists afterwards (find its entry with [`lookup_created`]), else the
/// [`Stat`] index of the drop. A plain number: the programs' verifier
/// rejects LLVM's handling of a `Result` carrying a pointer.
#[inline(always)]
pub fn create<F: Family>(key: &CtKeyOf<F::A>, req: &mut NewFlow<F::A>) -> u32 {
    let mut r = 0;
    // A second round when another CPU took the port found.
    for _ in 0..2 {
        if req.action == ct_action::SNAT {
            req.nat_port = F::snat_port(key, &req.nat_addr) as u16;
        }
        r = F::create(key, req);
        if r != Stat::DropCtCollision as u32 || req.action != ct_action::SNAT {
            break;
        }
    }
    r
}

// ---- per-flow work: global functions, each verified once ---------------

/// The argument of a global function: a possibly-null pointer to the
/// caller's memory, as the verifier sees it. Used in place, not copied:
/// the frames of the programs and their global functions share 512 bytes.
#[inline(always)]
fn arg<'a, T>(p: *const T) -> Option<&'a T> {
    // SAFETY: non-null; the verifier checked the caller's memory covers a
    // `T`, and it outlives the call.
    unsafe { p.as_ref() }
}

/// Removes the flow of IPv4 `key` from whichever table holds it; returns
/// 1 if it did. For a flow whose cached interface is gone: its next packet
/// starts it afresh from the endpoint and published port maps.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_ct_forget(key: *const CtKey) -> u32 {
    match arg(key) {
        Some(key) => u32::from(forget::<V4>(key)),
        None => 0,
    }
}

#[inline(always)]
fn forget<F: Family>(key: &CtKeyOf<F::A>) -> bool {
    if let Some(e) = get::<F>(Table::Main, key) {
        return remove_pair::<F>(Table::Main, key, e);
    }
    match get::<F>(Table::New, key) {
        Some(e) => remove_pair::<F>(Table::New, key, e),
        None => false,
    }
}

/// Removes the flow of IPv4 `key` (in table `table`) if it is to be
/// reopened (`reopen`: a SYN found it closing) or idle for its whole
/// timeout in both directions; returns 1 if it did.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_ct_evict(key: *const CtKey, table: u32, reopen: u32) -> u32 {
    match arg(key) {
        Some(key) => evict::<V4>(key, Table::from_u32(table), reopen != 0),
        None => 0,
    }
}

#[inline(always)]
fn evict<F: Family>(key: &CtKeyOf<F::A>, table: Table, reopen: bool) -> u32 {
    let Some(e) = get::<F>(table, key) else {
        return 1;
    };
    if reopen {
        remove_pair::<F>(table, key, e);
        count(Stat::CtReopened);
        return 1;
    }
    if !flow_expired::<F>(table, key, e, now()) {
        return 0;
    }
    // SAFETY: a live map value (RCU).
    let id = unsafe { (*e).container_id };
    remove_pair::<F>(table, key, e);
    count(Stat::CtExpired);
    F::flow_event(event_kind::FLOW_EXPIRED, key, id);
    1
}

/// A RST (sequence number `seq`, `ev` = [`event::RST`]) or a first FIN
/// (`ev` = [`event::FIN`]) of the IPv4 flow of `key` in `table`: closes the
/// flow if the RST is in the window, or the other direction has sent its
/// FIN.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_ct_close(key: *const CtKey, table: u32, ev: u32, seq: u32) -> u32 {
    match arg(key) {
        Some(key) => close_event::<V4>(key, Table::from_u32(table), ev, seq),
        None => 0,
    }
}

#[inline(always)]
fn close_event<F: Family>(key: &CtKeyOf<F::A>, table: Table, ev: u32, seq: u32) -> u32 {
    let Some(e) = get::<F>(table, key) else {
        return 0;
    };
    // SAFETY: live map values (RCU).
    unsafe {
        let peer_key = (*e).peer_key(key);
        let Some(p) = get::<F>(table, &peer_key) else {
            return 0;
        };
        if ev == event::RST {
            if table == Table::Main
                && (*e).state == ct_state::TCP_ESTABLISHED
                && (*p).tcp_flags & tcp_flags::ACK != 0
                && !ct::rst_in_window(seq, (*e).seq_end, (*p).ack_max)
            {
                count(Stat::CtRstIgnored);
                return 0;
            }
        } else if (*p).tcp_flags & tcp_flags::FIN == 0 {
            // The FIN bits are set with ORs that are full barriers, so of
            // two FINs crossing on two CPUs at least one sees the other's.
            return 0;
        }
        if table == Table::Main {
            close::<F>(key, e, &peer_key, p);
        } else {
            (*e).state = ct_state::TCP_CLOSING;
            (*p).state = ct_state::TCP_CLOSING;
        }
    }
    1
}

/// A first ACK of one direction of a TCP handshake (`ev` =
/// [`event::ACK`]) or the second packet of one direction of a UDP or ICMP
/// flow ([`event::DATAGRAM`]), of the IPv4 flow of `key` in the table of
/// unconfirmed flows: confirms the flow once the other direction has
/// acknowledged too, or carried two packets too.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_ct_confirm(key: *const CtKey, ev: u32) -> u32 {
    match arg(key) {
        Some(key) => confirm_event::<V4>(key, ev),
        None => 0,
    }
}

#[inline(always)]
fn confirm_event<F: Family>(key: &CtKeyOf<F::A>, ev: u32) -> u32 {
    let Some(e) = get::<F>(Table::New, key) else {
        return 0;
    };
    // SAFETY: live map values (RCU).
    unsafe {
        let peer_key = (*e).peer_key(key);
        let Some(p) = get::<F>(Table::New, &peer_key) else {
            return 0;
        };
        let state = if ev == event::ACK {
            if (*p).tcp_flags & tcp_flags::ACK == 0 {
                return 0;
            }
            ct_state::TCP_ESTABLISHED
        } else {
            if !ct::is_stream((*e).packets, (*p).packets) {
                return 0;
            }
            ct_state::STREAM
        };
        confirm::<F>(key, e, &peer_key, p, state);
    }
    1
}

/// Adds `delta` (two's complement) to the main-table entries of container
/// `id`, creating its record on first use.
#[inline(always)]
fn account_entries(id: u32, delta: u64) {
    let p = match CT_CONTAINERS.get_ptr_mut(id) {
        Some(p) => p,
        None if delta < 1 << 63 => {
            let _ = CT_CONTAINERS.insert(id, CtContainer::default(), BPF_NOEXIST.into());
            match CT_CONTAINERS.get_ptr_mut(id) {
                Some(p) => p,
                None => return,
            }
        }
        None => return,
    };
    // SAFETY: live map value (RCU).
    unsafe { add(&raw mut (*p).entries, delta) };
}

/// Counts a refused confirmation (`snat = false`) or an exhausted port
/// search against container `id`.
#[inline(always)]
fn account_refusal(id: u32, snat: bool) {
    let p = match CT_CONTAINERS.get_ptr_mut(id) {
        Some(p) => p,
        None => {
            let _ = CT_CONTAINERS.insert(id, CtContainer::default(), BPF_NOEXIST.into());
            match CT_CONTAINERS.get_ptr_mut(id) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: live map value (RCU).
    unsafe {
        if snat {
            add(&raw mut (*p).snat_exhausted, 1);
        } else {
            add(&raw mut (*p).over_share, 1);
        }
    }
}

/// Removes both entries of the flow whose entry `e` (in `table`) has key
/// `key`. Only the caller whose removal of the original entry succeeds
/// adjusts the container's count, so concurrent removals count once. A
/// peer tuple that already serves another flow (a new masqueraded flow took
/// the port of an expired one) is left alone.
#[inline(always)]
fn remove_pair<F: Family>(table: Table, key: &CtKeyOf<F::A>, e: *const CtEntryOf<F::A>) -> bool {
    // SAFETY: `e` points into a live map value (RCU); read before removal.
    let (peer, original, id) =
        unsafe { ((*e).peer_key(key), (*e).is_original(), (*e).container_id) };
    // SAFETY: live map value (RCU).
    let paired = get::<F>(table, &peer).is_some_and(|p| unsafe { (*p).pairs_with(&peer, key) });
    let (okey, rkey) = if original { (key, &peer) } else { (&peer, key) };
    let removed = if original || paired {
        remove::<F>(table, okey)
    } else {
        false
    };
    if !original || paired {
        remove::<F>(table, rkey);
    }
    if removed && table == Table::Main {
        account_entries(id, 2u64.wrapping_neg());
    }
    removed
}

/// Whether the flow of entry `e` (key `key`, in `table`) has been idle in
/// both directions for its whole timeout at `now`.
#[inline(always)]
fn flow_expired<F: Family>(
    table: Table,
    key: &CtKeyOf<F::A>,
    e: *const CtEntryOf<F::A>,
    now: u64,
) -> bool {
    // SAFETY: live map values (RCU); fields read one by one.
    unsafe {
        let timeout = timeouts().of_ns(key.proto, (*e).state);
        if !ct::idle_expired(now, (*e).last_seen_ns, timeout) {
            return false;
        }
        let peer = (*e).peer_key(key);
        match get::<F>(table, &peer) {
            // A peer that serves another flow (its tuple was reused) leaves
            // this entry half of a flow that is gone.
            Some(p) if (*p).pairs_with(&peer, key) => {
                ct::idle_expired(now, (*p).last_seen_ns, timeout)
            }
            _ => true,
        }
    }
}

/// Moves a closing flow from the main table to the table of unconfirmed
/// flows, where it gives way to new flows first and a new SYN can reuse
/// its tuple.
///
/// # Safety
/// `e` and `p` point into live main-table values.
#[inline(always)]
unsafe fn close<F: Family>(
    key: &CtKeyOf<F::A>,
    e: *mut CtEntryOf<F::A>,
    peer_key: &CtKeyOf<F::A>,
    p: *mut CtEntryOf<F::A>,
) {
    // SAFETY: per the caller. Inserted straight from the map values: the
    // helper reads the entry, which ends before the timer.
    unsafe {
        (*e).state = ct_state::TCP_CLOSING;
        (*p).state = ct_state::TCP_CLOSING;
        let _ = F::ct_new().insert(key, &*e, BPF_ANY.into());
        let _ = F::ct_new().insert(peer_key, &*p, BPF_ANY.into());
    }
    // SAFETY: per the caller.
    let id = unsafe { (*e).container_id };
    remove_pair::<F>(Table::Main, key, e);
    count(Stat::CtClosed);
    F::flow_event(event_kind::FLOW_CLOSED, key, id);
}

/// Moves a flow from the table of unconfirmed flows into the main table in
/// `state`, with its expiry timer armed, if its container's share allows.
/// It stays where it is (and keeps working) when the share is used up, the
/// main table is full or the timer cannot be armed.
///
/// # Safety
/// `e` and `p` point into live values of the table of unconfirmed flows.
#[inline(always)]
unsafe fn confirm<F: Family>(
    key: &CtKeyOf<F::A>,
    e: *mut CtEntryOf<F::A>,
    peer_key: &CtKeyOf<F::A>,
    p: *mut CtEntryOf<F::A>,
    state: u8,
) {
    let Some(cfg) = maps::config() else {
        return;
    };
    // SAFETY: per the caller; the main-table value is built on the stack
    // with a zeroed timer (the kernel owns it once inserted).
    unsafe {
        let id = (*e).container_id;
        (*e).state = state;
        (*p).state = state;
        if cfg.ct_container_max != 0
            && let Some(c) = CT_CONTAINERS.get_ptr(id)
            && (*c).entries + 2 > u64::from(cfg.ct_container_max)
        {
            account_refusal(id, false);
            count(Stat::CtOverShare);
            return;
        }
        let (okey, o, rkey, r) = if (*e).is_original() {
            (key, e, peer_key, p)
        } else {
            (peer_key, p, key, e)
        };
        let mut v = CtTimedEntryOf {
            entry: *o,
            timer: bpf_timer { opaque: [0; 2] },
        };
        match F::ct().insert(okey, &v, BPF_NOEXIST.into()) {
            Ok(()) => {}
            // Another CPU confirmed it.
            Err(EEXIST) => return,
            Err(_) => {
                count(Stat::CtMainFull);
                return;
            }
        }
        v.entry = *r;
        if F::ct().insert(rkey, &v, BPF_NOEXIST.into()).is_err() {
            let _ = F::ct().remove(okey);
            count(Stat::CtMainFull);
            return;
        }
        if !arm_timer::<F>(okey, cfg.timeouts.of_ns(okey.proto, state)) {
            let _ = F::ct().remove(okey);
            let _ = F::ct().remove(rkey);
            count(Stat::CtTimerFailed);
            return;
        }
        account_entries(id, 2);
        let _ = F::ct_new().remove(okey);
        let _ = F::ct_new().remove(rkey);
    }
    count(Stat::CtConfirmed);
}

/// Arms the expiry timer of the main-table entry `key` to fire in
/// `timeout_ns`.
#[inline(always)]
fn arm_timer<F: Family>(key: &CtKeyOf<F::A>, timeout_ns: u64) -> bool {
    let Some(v) = F::ct().get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: `v` is a live main-table value whose BTF declares the timer;
    // the callback has the signature the kernel calls it with.
    unsafe {
        let timer = (&raw mut (*v).timer).cast();
        let map = core::ptr::from_ref(F::ct()).cast_mut().cast();
        bpf_timer_init(timer, map, CLOCK_MONOTONIC) == 0
            && bpf_timer_set_callback(timer, ct_expire::<F> as *mut c_void) == 0
            && bpf_timer_start(timer, timeout_ns, 0) == 0
    }
}

/// Expiry timer of a confirmed flow's original entry: re-armed for the
/// rest of the timeout if either direction saw a packet meanwhile, else
/// the flow is removed.
#[inline(never)]
extern "C" fn ct_expire<F: Family>(
    _map: *mut c_void,
    key: *mut CtKeyOf<F::A>,
    v: *mut CtTimedEntryOf<F::A>,
) -> i32 {
    // SAFETY: the kernel passes the element's key and value.
    unsafe {
        let key = *key;
        let e = &raw mut (*v).entry;
        let now = now();
        let timeout = timeouts().of_ns(key.proto, (*e).state);
        let mut last = (*e).last_seen_ns;
        if let Some(p) = get::<F>(Table::Main, &(*e).peer_key(&key))
            && (*p).last_seen_ns > last
        {
            last = (*p).last_seen_ns;
        }
        let idle = now.saturating_sub(last);
        if idle < timeout {
            bpf_timer_start((&raw mut (*v).timer).cast(), timeout - idle, 0);
            return 0;
        }
        let id = (*e).container_id;
        remove_pair::<F>(Table::Main, &key, e);
        count(Stat::CtExpired);
        F::flow_event(event_kind::FLOW_EXPIRED, &key, id);
    }
    0
}

/// What a new flow is, besides its tuple: the request to
/// [`dp_ct_create`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NewFlow<A> {
    /// DNAT: the backend; SNAT: the masquerade address; ROUTED: unused.
    pub nat_addr: A,
    /// DNAT: the backend port; SNAT: the port the search found.
    pub nat_port: u16,
    /// [`ct_action`] of the original direction: DNAT, SNAT or ROUTED.
    pub action: u8,
    /// TCP flags of the first packet.
    pub tcp_flags: u8,
    /// Where packets of the original direction go.
    pub orig_ifindex: u32,
    /// Where packets of the reply direction go.
    pub reply_ifindex: u32,
    /// The container.
    pub container_id: u32,
    /// MTU of the original direction's path (0: not checked).
    pub orig_mtu: u16,
    /// MTU of the reply direction's path (0: not checked).
    pub reply_mtu: u16,
}

/// Creates the IPv4 flow `key` as `req` says: both its entries in the
/// table of unconfirmed flows. Returns 0 when the flow exists afterwards
/// (created here, or by another CPU first: the caller looks it up), else
/// the [`Stat`] of the drop.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_ct_create(key: *const CtKey, req: *const NewFlow<[u8; 4]>) -> u32 {
    match (arg(key), arg(req)) {
        (Some(key), Some(req)) => create_flow::<V4>(key, req),
        _ => Stat::DropHelperFailed as u32,
    }
}

#[inline(always)]
fn create_flow<F: Family>(key: &CtKeyOf<F::A>, req: &NewFlow<F::A>) -> u32 {
    let now = now();
    let snat = req.action == ct_action::SNAT;
    let routed = req.action == ct_action::ROUTED;
    if snat && req.nat_port == 0 {
        account_refusal(req.container_id, true);
        return Stat::DropSnatPortsExhausted as u32;
    }
    let pickup = key.proto == proto::TCP && !is_syn(req.tcp_flags);
    let mut e = CtEntryOf::<F::A> {
        nat_addr: if routed { key.daddr } else { req.nat_addr },
        nat_port: if routed { key.dport } else { req.nat_port },
        action: req.action,
        state: if key.proto == proto::TCP {
            ct_state::TCP_SYN_SENT
        } else {
            ct_state::UNREPLIED
        },
        ifindex: req.orig_ifindex,
        flags: CT_F_ORIGINAL | if pickup { CT_F_PICKUP } else { 0 },
        container_id: req.container_id,
        mtu: req.orig_mtu,
        created_ns: now,
        last_seen_ns: now,
        ..Default::default()
    };
    let reply_key = e.peer_key(key);
    if taken::<F>(&reply_key, key, now) {
        // Confirmed by another CPU between the caller's two lookups?
        if get::<F>(Table::Main, key).is_some() {
            count(Stat::CtRaceLost);
            return 0;
        }
        return Stat::DropCtCollision as u32;
    }
    match F::ct_new().insert(key, &e, BPF_NOEXIST.into()) {
        Ok(()) => {}
        Err(EEXIST) => {
            count(Stat::CtRaceLost);
            return 0;
        }
        Err(_) => return Stat::DropCtFull as u32,
    }
    // The reply direction's entry, in the same buffer: its translation
    // undoes the original's.
    e.action = ct_action::reply(req.action);
    if snat || routed {
        e.nat_addr = key.saddr;
        e.nat_port = key.sport;
    } else {
        e.nat_addr = key.daddr;
        e.nat_port = key.dport;
    }
    e.ifindex = req.reply_ifindex;
    e.flags = 0;
    e.mtu = req.reply_mtu;
    if F::ct_new().insert(&reply_key, &e, BPF_ANY.into()).is_err() {
        let _ = F::ct_new().remove(key);
        return Stat::DropCtFull as u32;
    }
    if pickup {
        count(Stat::CtPickedUp);
    }
    0
}

/// The masquerade port for a new IPv4 flow `key` leaving as `masq` (see
/// the module docs), or 0 if none is free. A port found free may still be
/// taken by another CPU before the flow's entries are in: then
/// [`dp_ct_create`] finds the tuple taken and the caller searches again.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn dp_ct_snat_port(key: *const CtKey, masq: *const [u8; 4]) -> u32 {
    match (arg(key), arg(masq)) {
        (Some(key), Some(masq)) => u32::from(snat_port::<V4>(key, masq)),
        _ => 0,
    }
}

#[inline(always)]
fn snat_port<F: Family>(key: &CtKeyOf<F::A>, masq: &F::A) -> u16 {
    let Some(cfg) = maps::config() else {
        return 0;
    };
    let now = now();
    let (min, max) = (cfg.snat_port_min, cfg.snat_port_max);
    let span = u32::from(max.wrapping_sub(min)) + 1;
    let mut search = PortSearch::<F::A> {
        reply_key: CtKeyOf::new(key.daddr, key.dport, *masq, key.sport, key.proto),
        owner: *key,
        now,
        min,
        _pad: 0,
        span,
        start: 0,
        found: 0,
        _pad2: 0,
    };
    // MASQUERADE keeps the source port when it can.
    if (min..=max).contains(&key.sport) && !tuple_taken::<F>(&search.reply_key, key, now) {
        return key.sport;
    }
    // Random probes first: independent of how the used ports cluster.
    for _ in 0..ct::SNAT_PROBES {
        // SAFETY: plain helper call.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = min.wrapping_add(r.checked_rem(span).unwrap_or(0) as u16);
        search.reply_key.dport = port;
        if port != 0 && !tuple_taken::<F>(&search.reply_key, key, now) {
            return port;
        }
    }
    // Then a scan of consecutive ports from a random one, so that a range
    // of up to SNAT_SCAN ports fails only when it is full.
    // SAFETY: plain helper call; the callback and its context match
    // bpf_loop's contract.
    unsafe {
        search.start = bpf_get_prandom_u32().checked_rem(span).unwrap_or(0);
        bpf_loop(
            ct::SNAT_SCAN.min(span),
            scan_port::<F> as *mut c_void,
            (&raw mut search).cast(),
            0,
        );
    }
    search.found as u16
}

/// State of the masquerade port scan (`bpf_loop`'s context).
#[repr(C)]
struct PortSearch<A> {
    /// The would-be reply key; its `dport` is the candidate port.
    reply_key: CtKeyOf<A>,
    /// The flow's original key.
    owner: CtKeyOf<A>,
    now: u64,
    min: u16,
    _pad: u16,
    span: u32,
    start: u32,
    /// The port found, 0 if none.
    found: u32,
    _pad2: u32,
}

/// Step `i` of the port scan: port `start + i` of the range.
#[inline(never)]
extern "C" fn scan_port<F: Family>(i: u32, search: *mut PortSearch<F::A>) -> i64 {
    // SAFETY: `search` is the caller's stack context.
    unsafe {
        let s = &mut *search;
        let off = (s.start + i).checked_rem(s.span).unwrap_or(0);
        let port = s.min.wrapping_add(off as u16);
        s.reply_key.dport = port;
        if port == 0 || taken::<F>(&s.reply_key, &s.owner, s.now) {
            return 0;
        }
        s.found = u32::from(port);
    }
    1
}

/// Whether tuple `key` (a would-be reply entry's key) is held by a live
/// flow other than the one whose original key is `owner`. A subprogram:
/// the port search calls it in a loop, which LLVM would otherwise unroll
/// into a stack frame per iteration.
#[inline(never)]
fn tuple_taken<F: Family>(key: &CtKeyOf<F::A>, owner: &CtKeyOf<F::A>, now: u64) -> bool {
    taken::<F>(key, owner, now)
}

/// [`tuple_taken`], inlined.
#[inline(always)]
fn taken<F: Family>(key: &CtKeyOf<F::A>, owner: &CtKeyOf<F::A>, now: u64) -> bool {
    if let Some(e) = get::<F>(Table::Main, key) {
        // SAFETY: live map value (RCU).
        return !unsafe { (*e).pairs_with(key, owner) };
    }
    let Some(e) = get::<F>(Table::New, key) else {
        return false;
    };
    // SAFETY: live map value (RCU).
    if unsafe { (*e).pairs_with(key, owner) } {
        return false;
    }
    // A flow idle for its whole timeout is gone: its tuple is free, and
    // the new flow's entry replaces the holder.
    !flow_expired::<F>(Table::New, key, e, now)
}

// ---- fragments ------------------------------------------------------------

/// The key of `flow`'s fragment-table entry.
#[inline(always)]
fn frag_key(flow: &Flow) -> FragKeyOf<[u8; 4]> {
    FragKeyOf {
        saddr: flow.key.saddr,
        daddr: flow.key.daddr,
        id: u32::from(flow.ip_id),
        proto: flow.key.proto,
        _pad: [0; 3],
    }
}

/// Remembers the ports of first fragment `flow` for its later fragments.
#[inline(always)]
pub fn frag_record(flow: &Flow, now: u64) {
    let value = FragEntry {
        sport: flow.key.sport,
        dport: flow.key.dport,
        _pad: 0,
        created_ns: now,
    };
    let _ = V4::frags().insert(frag_key(flow), value, BPF_ANY.into());
}

/// Fills the ports of later fragment `flow` from its first fragment;
/// false if that was not seen (or too long ago).
#[inline(always)]
pub fn frag_ports(flow: &mut Flow, now: u64) -> bool {
    let Some(f) = V4::frags().get_ptr(frag_key(flow)) else {
        return false;
    };
    // SAFETY: live map value (RCU).
    let f = unsafe { *f };
    if ct::idle_expired(now, f.created_ns, FRAG_TIMEOUT_NS) {
        return false;
    }
    flow.key.sport = f.sport;
    flow.key.dport = f.dport;
    true
}

// ---- flush ------------------------------------------------------------------

/// State of a flush (`bpf_for_each_map_elem`'s context).
#[repr(C)]
struct Flush {
    req: FlushRequest,
}

impl Flush {
    /// Whether an entry of container `container_id` is within the
    /// request's container (all of them without [`FLUSH_F_CONTAINER`]).
    #[inline(always)]
    fn container(&self, container_id: u32) -> bool {
        self.req.flags & FLUSH_F_CONTAINER == 0 || self.req.container_id == container_id
    }

    /// Whether the flow of original entry `e` (key `key`) is to go.
    ///
    /// # Safety
    /// `e` points into a live map value.
    #[inline(always)]
    unsafe fn flow<A: IpAddress>(&self, key: &CtKeyOf<A>, e: *const CtEntryOf<A>) -> bool {
        let r = &self.req;
        // SAFETY: per the caller.
        let (id, action, nat_addr) = unsafe { ((*e).container_id, (*e).action, (*e).nat_addr) };
        self.container(id)
            && (r.flags & FLUSH_F_SERVICE == 0
                || (action == ct_action::DNAT && key.dport == r.port && key.proto == r.proto))
            && (r.flags & FLUSH_F_MASQUERADE == 0
                || (action == ct_action::SNAT && nat_addr == A::from_prefix(&r.addr)))
    }
}

/// Counts a flow removed by a flush. In the scratch map, not in the
/// callbacks' context: the verifier walks a callback until its states
/// repeat, and a counter on the stack never repeats.
#[inline(always)]
fn flushed() {
    if let Some(sc) = maps::scratch() {
        // SAFETY: this CPU's scratch space.
        unsafe { add(&raw mut sc.flushed, 1) };
    }
}

/// Flush callback over a main table: removes each matching flow through
/// its original entry (so its container's count follows).
#[inline(never)]
extern "C" fn flush_main<F: Family>(
    _map: *mut c_void,
    key: *mut CtKeyOf<F::A>,
    v: *mut CtTimedEntryOf<F::A>,
    flush: *mut Flush,
) -> i64 {
    // SAFETY: the kernel passes the element and the caller's context.
    unsafe {
        let e = &raw mut (*v).entry;
        let key = *key;
        if (*flush).req.flags & FLUSH_F_ARM != 0 {
            if (*e).is_original() && arm_copied::<F>(&key, v) {
                flushed();
            }
            return 0;
        }
        if (*e).is_original() {
            if (*flush).flow(&key, e) && remove_pair::<F>(Table::Main, &key, e) {
                flushed();
            }
        } else if (*flush).container((*e).container_id)
            && get::<F>(Table::Main, &(*e).peer_key(&key)).is_none()
        {
            // A reply entry that lost its original.
            remove::<F>(Table::Main, &key);
        }
    }
    0
}

/// Arms the expiry timer of original entry `v` (key `key`) if it has
/// none: an entry the agent copied from a table of another size (the
/// kernel zeroes the timer of a value written from user space). The timer
/// fires when the flow's idle time reaches its state's timeout, as
/// [`arm_timer`]'s would have. An armed timer is left alone
/// (`bpf_timer_init` refuses it).
///
/// # Safety
/// `v` is the live main-table value of `key`.
#[inline(always)]
unsafe fn arm_copied<F: Family>(key: &CtKeyOf<F::A>, v: *mut CtTimedEntryOf<F::A>) -> bool {
    // SAFETY: per the caller; the callback has the signature the kernel
    // calls it with.
    unsafe {
        let e = &raw const (*v).entry;
        let timeout = timeouts().of_ns(key.proto, (*e).state);
        let idle = now().saturating_sub((*e).last_seen_ns);
        let timer = (&raw mut (*v).timer).cast();
        let map = core::ptr::from_ref(F::ct()).cast_mut().cast();
        bpf_timer_init(timer, map, CLOCK_MONOTONIC) == 0
            && bpf_timer_set_callback(timer, ct_expire::<F> as *mut c_void) == 0
            && bpf_timer_start(timer, timeout.saturating_sub(idle).max(1), 0) == 0
    }
}

/// Flush callback over a table of unconfirmed flows: like [`flush_main`].
#[inline(never)]
extern "C" fn flush_new<F: Family>(
    _map: *mut c_void,
    key: *mut CtKeyOf<F::A>,
    e: *mut CtEntryOf<F::A>,
    flush: *mut Flush,
) -> i64 {
    // SAFETY: the kernel passes the element and the caller's context.
    unsafe {
        let key = *key;
        if (*e).is_original() {
            if (*flush).flow(&key, e) && remove_pair::<F>(Table::New, &key, e) {
                flushed();
            }
        } else if (*flush).container((*e).container_id)
            && get::<F>(Table::New, &(*e).peer_key(&key)).is_none()
        {
            remove::<F>(Table::New, &key);
        }
    }
    0
}

/// Removes the flows `req` names from a family's tables; returns how many.
/// With [`FLUSH_F_ARM`], removes nothing and arms the timers of the
/// confirmed flows that have none (copied by the agent); returns how many.
#[inline(always)]
pub fn flush<F: Family>(req: FlushRequest) -> u64 {
    let Some(sc) = maps::scratch() else {
        return 0;
    };
    sc.flushed = 0;
    let mut f = Flush { req };
    let arm = req.flags & FLUSH_F_ARM != 0;
    // SAFETY: the callbacks and their context match the helper's contract.
    unsafe {
        bpf_for_each_map_elem(
            core::ptr::from_ref(F::ct()).cast_mut().cast(),
            flush_main::<F> as *mut c_void,
            (&raw mut f).cast(),
            0,
        );
        if arm {
            return maps::scratch().map_or(0, |sc| sc.flushed);
        }
        bpf_for_each_map_elem(
            core::ptr::from_ref(F::ct_new()).cast_mut().cast(),
            flush_new::<F> as *mut c_void,
            (&raw mut f).cast(),
            0,
        );
    }
    maps::scratch().map_or(0, |sc| sc.flushed)
}
