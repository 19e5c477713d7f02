//! Layouts of the flow core: the conntrack tables, the fragment table and
//! the per-container conntrack accounting (see `datapath-ebpf/src/conntrack.rs`
//! for how they are used).
//!
//! Every layout is generic over the address type ([`IpAddress`]: `[u8; 4]`
//! for IPv4, `[u8; 16]` for IPv6) and the flow core's code is written once
//! over it; each family gets its own tables (as Cilium's do). Per-family
//! tables keep an IPv4 key at 16 bytes instead of 40: cheaper to hash, and
//! small enough that the programs' 512-byte stack holds the few keys a
//! packet needs. The IPv4 types have the short names ([`CtKey`],
//! [`CtEntry`], …); the IPv6 ones end in `6` and are not used by a table
//! yet.

use core::fmt::Debug;

use bytemuck::{Pod, Zeroable};

/// An address family's address: its bytes in wire order.
pub trait IpAddress: Copy + Clone + Debug + Default + PartialEq + Eq + Pod + 'static {
    /// Padding after an address in [`CtEntryOf`], so that what follows is
    /// 8-byte aligned in both families.
    type Pad: Copy + Clone + Debug + Default + PartialEq + Eq + Pod + 'static;

    /// The address of this family held in the first bytes of `bytes`
    /// (how family-neutral requests carry one).
    fn from_prefix(bytes: &[u8; 16]) -> Self;
}

impl IpAddress for [u8; 4] {
    type Pad = [u8; 4];

    #[inline(always)]
    fn from_prefix(b: &[u8; 16]) -> Self {
        [b[0], b[1], b[2], b[3]]
    }
}

impl IpAddress for [u8; 16] {
    type Pad = [u8; 0];

    #[inline(always)]
    fn from_prefix(b: &[u8; 16]) -> Self {
        *b
    }
}

/// A connection-tracking key: one direction of a flow as seen on the wire.
///
/// For ICMP echo the identifier stands in for the port: an echo request has
/// `sport = id, dport = 0`, an echo reply `sport = 0, dport = id`, so the
/// reply's key is the request's with addresses and ports swapped, like TCP's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKeyOf<A> {
    /// Source address.
    pub saddr: A,
    /// Destination address.
    pub daddr: A,
    /// Source port (ICMP echo: id of a request, 0 for a reply), host order.
    pub sport: u16,
    /// Destination port (ICMP echo: 0 for a request, id of a reply), host order.
    pub dport: u16,
    /// IP protocol ([`crate::proto`]).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}

/// An IPv4 conntrack key.
pub type CtKey = CtKeyOf<[u8; 4]>;
/// An IPv6 conntrack key.
pub type CtKey6 = CtKeyOf<[u8; 16]>;

impl<A: IpAddress> CtKeyOf<A> {
    /// A key.
    #[inline(always)]
    pub const fn new(saddr: A, sport: u16, daddr: A, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }

    /// Whether `self == other`, computed without branches (the datapath's
    /// verifier would otherwise fork its state once per compared field).
    #[inline(always)]
    pub fn same(&self, other: &Self) -> bool {
        let ports = |k: &Self| u32::from(k.sport) << 16 | u32::from(k.dport);
        let diff = addr_diff(&self.saddr, &other.saddr)
            | addr_diff(&self.daddr, &other.daddr)
            | (ports(self) ^ ports(other))
            | u32::from(self.proto ^ other.proto);
        diff == 0
    }

    /// The key of the opposite direction of the same (untranslated) packets.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The OR of the XORs of the bytes of `a` and `b`: zero if they are equal.
#[inline(always)]
fn addr_diff<A: Pod>(a: &A, b: &A) -> u32 {
    let (a, b) = (bytemuck::bytes_of(a), bytemuck::bytes_of(b));
    let mut diff = 0;
    let mut i = 0;
    while i < a.len() {
        diff |= u32::from(a[i] ^ b[i]);
        i += 1;
    }
    diff
}

impl CtKey {
    /// An IPv4 key (the name the tests and the agent use).
    #[inline(always)]
    pub const fn v4(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16, proto: u8) -> Self {
        Self::new(saddr, sport, daddr, dport, proto)
    }
}

/// The kernel's `struct bpf_timer`. The name matters: the kernel finds the
/// timer in a map value through BTF by this struct name and size.
#[allow(non_camel_case_types)]
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct bpf_timer {
    /// Owned by the kernel: zero in userspace copies.
    pub opaque: [u64; 2],
}

/// What a conntrack entry does to the packets matching its key.
pub mod ct_action {
    /// Client → published port: rewrite the destination to the container.
    pub const DNAT: u8 = 1;
    /// Container → client reply of a DNAT flow: rewrite the source back to
    /// the published address and port.
    pub const REV_DNAT: u8 = 2;
    /// Container → outside: rewrite the source to the node address and an
    /// allocated port (masquerade).
    pub const SNAT: u8 = 3;
    /// Outside → node reply of a masqueraded flow: rewrite the destination
    /// back to the container.
    pub const REV_SNAT: u8 = 4;
    /// Uplink → container address, routed unchanged (the operator allowed
    /// direct routing), and its replies: nothing is rewritten, but the
    /// container's replies must not be masqueraded.
    pub const ROUTED: u8 = 5;
    /// Container → node address at a port the container itself publishes
    /// (hairpin to itself): rewrite the destination to the container and
    /// the source to the node address it dialed (a packet from its own
    /// address would be dropped as a martian by the container's stack).
    pub const HAIRPIN: u8 = 6;
    /// The container's reply of a [`HAIRPIN`] flow: rewrite the source
    /// back to the published address and port, and the destination (the
    /// node address) back to the container's own.
    pub const REV_HAIRPIN: u8 = 7;

    /// Whether `action` rewrites the source (else the destination) with
    /// the entry's address and port.
    #[inline(always)]
    pub const fn rewrites_source(action: u8) -> bool {
        matches!(action, REV_DNAT | SNAT | REV_HAIRPIN)
    }

    /// The action of the reply direction of a flow whose original
    /// direction has `action`.
    #[inline(always)]
    pub const fn reply(action: u8) -> u8 {
        match action {
            DNAT => REV_DNAT,
            SNAT => REV_SNAT,
            HAIRPIN => REV_HAIRPIN,
            a => a,
        }
    }

    /// A short name for listings.
    pub const fn name(action: u8) -> &'static str {
        match action {
            DNAT => "dnat",
            REV_DNAT => "rev-dnat",
            SNAT => "snat",
            REV_SNAT => "rev-snat",
            ROUTED => "routed",
            HAIRPIN => "hairpin",
            REV_HAIRPIN => "rev-hairpin",
            _ => "unknown",
        }
    }
}

/// A flow's state, kept in both of its entries ([`CtEntryOf::state`]). It
/// decides the idle timeout and the table the flow lives in: the
/// confirmed states ([`ct_state::TCP_ESTABLISHED`], [`ct_state::STREAM`])
/// in the main table, every other one in the table of unconfirmed flows.
pub mod ct_state {
    /// TCP before the handshake completed (or a connection picked up in
    /// the middle whose two directions have not both been seen).
    pub const TCP_SYN_SENT: u8 = 1;
    /// TCP: both directions have acknowledged the other.
    pub const TCP_ESTABLISHED: u8 = 2;
    /// TCP after FIN both ways or an accepted RST.
    pub const TCP_CLOSING: u8 = 3;
    /// UDP or ICMP echo seen one way only.
    pub const UNREPLIED: u8 = 4;
    /// UDP or ICMP echo answered, but not (yet) more than once each way.
    pub const REPLIED: u8 = 5;
    /// UDP or ICMP echo with at least two packets each way (nf_conntrack's
    /// "assured" UDP stream).
    pub const STREAM: u8 = 6;

    /// Whether flows in `state` live in the main table.
    #[inline(always)]
    pub const fn confirmed(state: u8) -> bool {
        matches!(state, TCP_ESTABLISHED | STREAM)
    }

    /// A short name for listings.
    pub const fn name(state: u8) -> &'static str {
        match state {
            TCP_SYN_SENT => "syn-sent",
            TCP_ESTABLISHED => "established",
            TCP_CLOSING => "closing",
            UNREPLIED => "unreplied",
            REPLIED => "replied",
            STREAM => "stream",
            _ => "unknown",
        }
    }
}

/// [`CtEntryOf::flags`]: this entry was created for the flow's first packet
/// (the original direction); its peer is the reply direction.
pub const CT_F_ORIGINAL: u32 = 1 << 0;
/// [`CtEntryOf::flags`]: a packet has matched this entry after creation.
pub const CT_F_SEEN: u32 = 1 << 1;
/// [`CtEntryOf::flags`]: the TCP flow was picked up from a segment without
/// SYN (its start was not seen).
pub const CT_F_PICKUP: u32 = 1 << 2;

/// TCP flag bits as in the TCP header's 13th byte.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u32 = 0x01;
    /// SYN.
    pub const SYN: u32 = 0x02;
    /// RST.
    pub const RST: u32 = 0x04;
    /// ACK.
    pub const ACK: u32 = 0x10;
}

/// One direction of a tracked flow and the translation to apply to it.
///
/// Every flow has two entries, created together: the original direction's
/// and the reply direction's. Each is self-contained, so a packet needs a
/// single lookup to be translated and forwarded. The peer's key is
/// [`CtEntryOf::peer_key`]. Both entries of a flow are always in the same
/// table: [`crate::names::CT_NEW`] holds them as they are,
/// [`crate::names::CT`] in a [`CtTimedEntryOf`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryOf<A: IpAddress> {
    /// The address that replaces the source (or destination, see
    /// [`ct_action::rewrites_source`]).
    pub nat_addr: A,
    /// Explicit padding (IPv4), always zero.
    pub _addr_pad: A::Pad,
    /// The port (ICMP: echo id) that replaces the source or destination port.
    pub nat_port: u16,
    /// [`ct_action`].
    pub action: u8,
    /// [`ct_state`] of the flow.
    pub state: u8,
    /// Where translated packets are sent: a host-side veth (towards a
    /// container) or an uplink.
    pub ifindex: u32,
    /// OR of the TCP flags seen in this direction ([`tcp_flags`]). With
    /// `flags`, an aligned 64-bit word that the datapath ORs bits into
    /// atomically ([`CtEntryOf::FLAGS_WORD`]).
    pub tcp_flags: u32,
    /// `CT_F_*` bits (the upper half of the atomic word).
    pub flags: u32,
    /// The container the flow belongs to.
    pub container_id: u32,
    /// TCP: the highest sequence number sent in this direction plus its
    /// length (nf_conntrack's `td_end`).
    pub seq_end: u32,
    /// TCP: the highest acknowledgement number sent in this direction.
    pub ack_max: u32,
    /// MTU of the path packets of this direction leave through (from the
    /// FIB when the flow was created); 0 when not checked.
    pub mtu: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
    /// Clock (ns) at creation.
    pub created_ns: u64,
    /// Clock (ns) of the last packet in this direction.
    pub last_seen_ns: u64,
    /// Packets seen in this direction.
    pub packets: u64,
    /// Bytes (IP total length) seen in this direction.
    pub bytes: u64,
}

/// An IPv4 conntrack entry.
pub type CtEntry = CtEntryOf<[u8; 4]>;
/// An IPv6 conntrack entry.
pub type CtEntry6 = CtEntryOf<[u8; 16]>;

impl<A: IpAddress> CtEntryOf<A> {
    /// Offset of the 64-bit word made of `tcp_flags` (low half, on a
    /// little-endian machine) and `flags` (high half), which the datapath
    /// updates with a 64-bit atomic OR (BPF has no 32-bit one without ALU32
    /// code generation).
    pub const FLAGS_WORD: usize = core::mem::offset_of!(Self, tcp_flags);

    /// The key of the other direction of the flow, given this entry's key.
    ///
    /// The packets of the other direction carry the translated tuple,
    /// reversed: for a DNAT entry `client → node:hp` translated to
    /// `client → ctr:cp`, the reply is `ctr:cp → client`.
    #[inline(always)]
    pub fn peer_key(&self, key: &CtKeyOf<A>) -> CtKeyOf<A> {
        let mut t = *key;
        // A hairpin rewrites the other address too: the original's source
        // becomes the node address it dialed, the reply's destination the
        // container's own address (its source).
        if self.action == ct_action::HAIRPIN {
            t.saddr = key.daddr;
        } else if self.action == ct_action::REV_HAIRPIN {
            t.daddr = key.saddr;
        }
        if ct_action::rewrites_source(self.action) {
            t.saddr = self.nat_addr;
            t.sport = self.nat_port;
        } else {
            t.daddr = self.nat_addr;
            t.dport = self.nat_port;
        }
        t.reversed()
    }

    /// Whether this entry, stored under `key`, pairs with the one stored
    /// under `other`: its peer key is `other`.
    #[inline(always)]
    pub fn pairs_with(&self, key: &CtKeyOf<A>, other: &CtKeyOf<A>) -> bool {
        self.peer_key(key).same(other)
    }

    /// Whether this is the original direction's entry.
    #[inline(always)]
    pub const fn is_original(&self) -> bool {
        self.flags & CT_F_ORIGINAL != 0
    }
}

/// Value of the main conntrack table: an entry and its expiry timer, armed
/// in the original direction's entry only. The timer comes last and apart
/// because the verifier refuses any load or store that touches it: the
/// programs copy `entry` whole, never the timer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtTimedEntryOf<A: IpAddress> {
    /// The entry.
    pub entry: CtEntryOf<A>,
    /// Expiry timer (kernel-owned: zero in userspace copies).
    pub timer: bpf_timer,
}

/// An IPv4 main-table value.
pub type CtTimedEntry = CtTimedEntryOf<[u8; 4]>;
/// An IPv6 main-table value.
pub type CtTimedEntry6 = CtTimedEntryOf<[u8; 16]>;

/// Key of the fragment table: the fields that identify one IP datagram's
/// fragments (RFC 791: source, destination, protocol, identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKeyOf<A> {
    /// Source address.
    pub saddr: A,
    /// Destination address.
    pub daddr: A,
    /// IP identification (IPv4: 16 bits, IPv6: the fragment header's 32).
    pub id: u32,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}

/// An IPv4 fragment-table key.
pub type FragKey = FragKeyOf<[u8; 4]>;
/// An IPv6 fragment-table key.
pub type FragKey6 = FragKeyOf<[u8; 16]>;

/// Value of the fragment table: the ports of the datagram, read from its
/// first fragment, so that later fragments find their flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragEntry {
    /// Source port (ICMP echo: see [`CtKeyOf`]), host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// Clock (ns) when the first fragment passed.
    pub created_ns: u64,
}

/// Value of the per-container conntrack map, keyed by container id: what
/// the container holds of the main table and what it was refused. Every
/// field is updated with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtContainer {
    /// Entries of the container's flows in the main table (two per flow).
    /// Only the datapath inserts and deletes them, so this is exact.
    pub entries: u64,
    /// Flows that stayed in the table of unconfirmed flows because the
    /// container's share of the main table was used up.
    pub over_share: u64,
    /// New masqueraded flows dropped: no free port for their destination.
    pub snat_exhausted: u64,
}

/// `Pod` for the instances of the generic layouts. bytemuck cannot derive
/// it for generic types; the sizes asserted below prove there is no
/// padding, and every field is plain data.
macro_rules! pod {
    ($($t:ty = $size:expr),* $(,)?) => {
        $(
            // SAFETY: `#[repr(C)]`, only integer and byte-array fields, no
            // padding (the size is the sum of the fields', asserted).
            unsafe impl Zeroable for $t {}
            // SAFETY: as above.
            unsafe impl Pod for $t {}
            const _: () = assert!(size_of::<$t>() == $size);
        )*
        #[cfg(feature = "user")]
        mod user {
            //! aya needs its own marker trait for map keys and values.
            use super::*;
            $(
                // SAFETY: `bytemuck::Pod` (above).
                unsafe impl aya::Pod for $t {}
            )*
            // SAFETY: `bytemuck::Pod`: `#[repr(C)]`, no padding.
            unsafe impl aya::Pod for FragEntry {}
            // SAFETY: as above.
            unsafe impl aya::Pod for CtContainer {}
        }
    };
}

pod! {
    CtKey = 16,
    CtKey6 = 40,
    CtEntry = 72,
    CtEntry6 = 80,
    CtTimedEntry = 88,
    CtTimedEntry6 = 96,
    FragKey = 16,
    FragKey6 = 40,
}

const _: () = {
    assert!(size_of::<bpf_timer>() == 16);
    assert!(CtEntry::FLAGS_WORD.is_multiple_of(8));
    assert!(CtEntry6::FLAGS_WORD.is_multiple_of(8));
    assert!(core::mem::offset_of!(CtEntry, flags) == CtEntry::FLAGS_WORD + 4);
    assert!(core::mem::offset_of!(CtEntry6, flags) == CtEntry6::FLAGS_WORD + 4);
    assert!(core::mem::offset_of!(CtEntry, created_ns).is_multiple_of(8));
    assert!(core::mem::offset_of!(CtEntry6, created_ns).is_multiple_of(8));
    assert!(size_of::<FragEntry>() == 16);
    assert!(size_of::<CtContainer>() == 24);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn dnat_peer_key_is_the_reply_from_the_container() {
        let key = CtKey::v4([198, 18, 0, 1], 40000, [198, 18, 0, 2], 8080, proto::TCP);
        let entry = CtEntry {
            nat_addr: [198, 19, 0, 5],
            nat_port: 80,
            action: ct_action::DNAT,
            ..Default::default()
        };
        let peer = entry.peer_key(&key);
        assert_eq!(
            peer,
            CtKey::v4([198, 19, 0, 5], 80, [198, 18, 0, 1], 40000, proto::TCP)
        );
        assert!(entry.pairs_with(&key, &peer));
    }

    #[test]
    fn snat_peer_key_is_the_reply_to_the_node() {
        let key = CtKey::v4([198, 19, 0, 5], 5555, [198, 18, 0, 1], 53, proto::UDP);
        let entry = CtEntry {
            nat_addr: [198, 18, 0, 2],
            nat_port: 61000,
            action: ct_action::SNAT,
            ..Default::default()
        };
        assert_eq!(
            entry.peer_key(&key),
            CtKey::v4([198, 18, 0, 1], 53, [198, 18, 0, 2], 61000, proto::UDP)
        );
    }

    #[test]
    fn the_same_code_serves_ipv6() {
        let c: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let n: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let b: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let key = CtKey6::new(c, 40000, n, 8080, proto::TCP);
        let entry = CtEntry6 {
            nat_addr: b,
            nat_port: 80,
            action: ct_action::DNAT,
            ..Default::default()
        };
        assert_eq!(
            entry.peer_key(&key),
            CtKey6::new(b, 80, c, 40000, proto::TCP)
        );
    }
}
