//! Header parsing: Ethernet → IPv4 → TCP/UDP/ICMP into a [`Flow`].
//!
//! Rules for what is not a plain IPv4 packet (each is counted by the caller):
//! * not IPv4 (ARP, IPv6, VLAN-tagged, …): [`Kind::NotOurs`], passed;
//! * a header the kernel itself would drop (IHL < 5, total length shorter
//!   than the header or longer than the frame, TCP data offset < 5, L4 header
//!   cut short): [`Kind::Malformed`], dropped;
//! * IPv4 fragments: a first fragment is a [`Flow`] like any packet (its
//!   L4 header must be whole, else it is malformed; [`Flow::frag`] says more
//!   follow); a later fragment is a [`Flow`] of kind [`L4::Fragment`]
//!   without ports, which the caller takes from the fragment table.
//!
//! The result is a [`Kind`] and a plain struct the caller owns, fully
//! initialised on every path: an enum with payloads lets LLVM copy
//! uninitialised bytes through registers, which the verifier refuses, and
//! returning the struct by value would cost the program's small stack a
//! second copy.

use datapath_common::{CtKey, proto};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::ctx::Packet;

/// Ethernet header length (no VLAN tags: tagged frames are not ours).
pub const ETH_LEN: usize = EthHdr::LEN;
/// Offset of the IPv4 checksum.
pub const IP_CSUM_OFF: usize = ETH_LEN + 10;
/// Offset of the IPv4 TTL (and protocol: the 16-bit word the checksum covers).
pub const IP_TTL_OFF: usize = ETH_LEN + 8;
/// Offset of the IPv4 source address.
pub const IP_SRC_OFF: usize = ETH_LEN + 12;
/// Offset of the IPv4 destination address.
pub const IP_DST_OFF: usize = ETH_LEN + 16;

const ETH_P_IP: u16 = 0x0800;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const ICMP_HDR_LEN: usize = 8;

/// ICMP types the datapath understands.
pub mod icmp_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable (incl. fragmentation needed).
    pub const DEST_UNREACH: u8 = 3;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
}

/// What kind of L4 header a [`Flow`] has, which says where its ports and
/// checksum are.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum L4 {
    /// TCP: ports at +0/+2, checksum at +16 (pseudo header).
    Tcp,
    /// UDP: ports at +0/+2, checksum at +6 (pseudo header, zero = none).
    Udp,
    /// ICMP echo request or reply: the id at +4 stands for the port,
    /// checksum at +2 (no pseudo header).
    IcmpEcho,
    /// ICMP error carrying an embedded IPv4 header at +8.
    IcmpError,
    /// A later fragment: no L4 header, only the IP header is rewritten.
    Fragment,
}

/// Fragment position of a packet.
pub mod frag {
    /// Not a fragment.
    pub const NONE: u8 = 0;
    /// The first fragment (offset 0, more follow): it carries the ports.
    pub const FIRST: u8 = 1;
    /// A later fragment (offset above 0): no L4 header.
    pub const LATER: u8 = 2;
}

/// A parsed IPv4 packet.
#[derive(Clone, Copy)]
pub struct Flow {
    /// The tuple as seen on the wire (later fragments: ports zero).
    pub key: CtKey,
    /// IPv4 header length in 32-bit words (see [`Flow::l4_off`]).
    pub ihl: u8,
    /// The L4 header kind.
    pub l4: L4,
    /// [`frag`] position.
    pub frag: u8,
    /// IPv4 TTL.
    pub ttl: u8,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// IPv4 total length.
    pub ip_len: u16,
    /// IPv4 identification.
    pub ip_id: u16,
    /// Whether DF is set.
    pub dont_fragment: bool,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgement number.
    pub ack: u32,
    /// TCP payload length (GSO packets: the whole super-packet's).
    pub payload_len: u32,
    /// Length of the IPv4 and L4 headers (TCP: with options).
    pub hdr_len: u32,
}

impl Flow {
    /// Offset of the L4 header. Computed from the header length masked to
    /// its four bits, so that the verifier knows its bounds even when the
    /// flow is read back from a map (the scratch space).
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        ETH_LEN + usize::from(self.ihl & 0x0f) * 4
    }
}

/// What a packet is.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Not IPv4, or an IPv4 protocol the datapath does not translate.
    NotOurs,
    /// A header the kernel would drop too.
    Malformed,
    /// A translatable packet (or fragment), described in the [`Flow`].
    Flow,
}

/// Length of the whole frame, including any non-linear part.
pub trait FrameLen {
    /// Bytes in the frame.
    fn frame_len(&self) -> usize;
    /// Packets on the wire the frame stands for (a GSO packet's segments).
    fn segments(&self) -> u64;
}

impl FrameLen for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn segments(&self) -> u64 {
        // SAFETY: `skb` is the program's context.
        u64::from(unsafe { (*self.skb.skb).gso_segs }.max(1))
    }
}

impl FrameLen for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        Packet::data_end(self) - Packet::data(self)
    }

    #[inline(always)]
    fn segments(&self) -> u64 {
        1
    }
}

/// The L4 kind of IP protocol `proto` and the length of its header, for
/// the protocols the datapath translates.
#[inline(always)]
fn l4_of(proto: u8) -> Option<(L4, usize)> {
    match proto {
        proto::TCP => Some((L4::Tcp, TCP_HDR_LEN)),
        proto::UDP => Some((L4::Udp, UDP_HDR_LEN)),
        proto::ICMP => Some((L4::IcmpEcho, ICMP_HDR_LEN)),
        _ => None,
    }
}

/// Fills `key`'s ports from the first eight bytes `hdr` of an L4 header of
/// kind `l4` (for ICMP echo, the id stands for the port; see [`CtKey`]).
/// Returns the precise kind (ICMP: echo or error), or `None` for an ICMP
/// type the datapath does not handle.
#[inline(always)]
fn fill_ports(l4: L4, hdr: &[u8; 8], key: &mut CtKey) -> Option<L4> {
    if l4 != L4::IcmpEcho {
        key.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
        key.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        return Some(l4);
    }
    let id = u16::from_be_bytes([hdr[4], hdr[5]]);
    match hdr[0] {
        icmp_type::ECHO_REQUEST => key.sport = id,
        icmp_type::ECHO_REPLY => key.dport = id,
        icmp_type::DEST_UNREACH | icmp_type::TIME_EXCEEDED => return Some(L4::IcmpError),
        _ => return None,
    }
    Some(L4::IcmpEcho)
}

/// Parses the packet in `ctx` into `flow` (meaningful for [`Kind::Flow`]).
#[inline(always)]
pub fn parse<C: Packet + FrameLen>(ctx: &C, flow: &mut Flow) -> Kind {
    let Ok(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return Kind::NotOurs;
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Kind::NotOurs;
    }
    if ctx.pull(ETH_LEN + Ipv4Hdr::LEN).is_err() {
        return Kind::Malformed;
    }
    let Ok(ip) = ctx.ptr_at::<Ipv4Hdr>(ETH_LEN) else {
        return Kind::Malformed;
    };
    // SAFETY: bounds checked by ptr_at; Ipv4Hdr has alignment 1.
    let ip = unsafe { *ip };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len);
    if ip.vihl >> 4 != 4
        || ihl < Ipv4Hdr::LEN
        || usize::from(tot_len) < ihl
        || ETH_LEN + usize::from(tot_len) > ctx.frame_len()
    {
        return Kind::Malformed;
    }
    let Some((l4, hdr_len)) = l4_of(ip.proto) else {
        return Kind::NotOurs;
    };
    let frags = u16::from_be_bytes(ip.frags);
    let more_fragments = frags & 0x2000 != 0;
    let frag_offset = frags & 0x1fff;
    let l4_off = ETH_LEN + ihl;
    let l4_len = usize::from(tot_len) - ihl;
    *flow = Flow {
        key: CtKey::v4(ip.src_addr, 0, ip.dst_addr, 0, ip.proto),
        ihl: ip.vihl & 0x0f,
        l4: L4::Fragment,
        frag: frag::LATER,
        ttl: ip.ttl,
        tcp_flags: 0,
        ip_len: tot_len,
        ip_id: u16::from_be_bytes(ip.id),
        dont_fragment: frags & 0x4000 != 0,
        seq: 0,
        ack: 0,
        payload_len: 0,
        hdr_len: ihl as u32,
    };
    if frag_offset != 0 {
        return Kind::Flow;
    }
    if l4_len < hdr_len || ctx.pull(l4_off + hdr_len).is_err() {
        // A first fragment must carry the whole L4 header too (tiny first
        // fragments are an attack, RFC 1858): without its ports it could
        // not be translated, nor its later fragments.
        return Kind::Malformed;
    }
    let Ok(l4_hdr) = ctx.read::<8>(l4_off) else {
        return Kind::Malformed;
    };
    if l4 == L4::Tcp {
        let Ok(tcp) = ctx.read::<{ TCP_HDR_LEN - 4 }>(l4_off + 4) else {
            return Kind::Malformed;
        };
        let doff = usize::from(tcp[8] >> 4) * 4;
        if doff < TCP_HDR_LEN {
            return Kind::Malformed;
        }
        flow.tcp_flags = tcp[9];
        flow.seq = u32::from_be_bytes([tcp[0], tcp[1], tcp[2], tcp[3]]);
        flow.ack = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        flow.payload_len = l4_len.saturating_sub(doff) as u32;
        flow.hdr_len = (ihl + doff) as u32;
    } else {
        flow.hdr_len = (ihl + hdr_len) as u32;
    }
    let Some(l4_kind) = fill_ports(l4, &l4_hdr, &mut flow.key) else {
        return Kind::NotOurs;
    };
    flow.l4 = l4_kind;
    flow.frag = if more_fragments {
        frag::FIRST
    } else {
        frag::NONE
    };
    Kind::Flow
}

/// The packet quoted by an ICMP error (an IPv4 header and at least the
/// first eight bytes of its payload).
#[derive(Clone, Copy)]
pub struct Quoted {
    /// The quoted packet's tuple as it was sent.
    pub key: CtKey,
    /// Offset of the quoted IPv4 header.
    pub ip_off: usize,
    /// Offset of the quoted L4 header.
    pub l4_off: usize,
    /// The quoted L4 header kind (ports: TCP/UDP; id: ICMP echo).
    pub l4: L4,
}

/// Parses the packet quoted by ICMP error `flow`; `None` if it is cut
/// short or not a TCP, UDP or ICMP echo packet we could have sent.
#[inline(always)]
pub fn parse_quoted<C: Packet>(ctx: &C, flow: &Flow) -> Option<Quoted> {
    let ip_off = flow.l4_off() + ICMP_HDR_LEN;
    ctx.pull(ip_off + Ipv4Hdr::LEN).ok()?;
    let ip = ctx.ptr_at::<Ipv4Hdr>(ip_off).ok()?;
    // SAFETY: bounds checked by ptr_at; Ipv4Hdr has alignment 1.
    let ip = unsafe { *ip };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    let l4_off = ip_off + ihl;
    ctx.pull(l4_off + 8).ok()?;
    let l4_hdr = ctx.read::<8>(l4_off).ok()?;
    let mut key = CtKey::v4(ip.src_addr, 0, ip.dst_addr, 0, ip.proto);
    let (l4, _) = l4_of(ip.proto)?;
    let l4 = fill_ports(l4, &l4_hdr, &mut key)?;
    if l4 == L4::IcmpError {
        return None;
    }
    Some(Quoted {
        key,
        ip_off,
        l4_off,
        l4,
    })
}
