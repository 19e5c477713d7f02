//! Header parsing: Ethernet → IPv4 → TCP/UDP/ICMP into a [`Flow`].
//!
//! Rules for what is not a plain IPv4 packet (each is counted by the caller):
//! * not IPv4 (ARP, IPv6, VLAN-tagged, …): [`Parsed::NotOurs`], passed;
//! * a header the kernel itself would drop (IHL < 5, total length shorter
//!   than the header or longer than the frame, TCP data offset < 5, L4 header
//!   cut short): [`Parsed::Malformed`], dropped;
//! * IPv4 fragments: [`Parsed::Fragment`] with the ports of a first fragment,
//!   so that the caller can refuse to half-translate a flow of ours.

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
}

/// A parsed IPv4 packet.
#[derive(Clone, Copy)]
pub struct Flow {
    /// The tuple as seen on the wire.
    pub key: CtKey,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// The L4 header kind.
    pub l4: L4,
    /// IPv4 total length.
    pub ip_len: u16,
    /// IPv4 TTL.
    pub ttl: u8,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
}

/// The outcome of parsing.
pub enum Parsed {
    /// Not IPv4, or an IPv4 protocol the datapath does not translate.
    NotOurs,
    /// A header the kernel would drop too.
    Malformed,
    /// An IPv4 fragment; `Some(key)` for a first fragment whose ports could
    /// be read, `None` for later fragments.
    Fragment(Option<CtKey>),
    /// A translatable packet.
    Flow(Flow),
}

/// Length of the whole frame, including any non-linear part.
pub trait FrameLen {
    /// Bytes in the frame.
    fn frame_len(&self) -> usize;
}

impl FrameLen for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

impl FrameLen for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
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

/// Parses the packet in `ctx`.
#[inline(always)]
pub fn parse<C: Packet + FrameLen>(ctx: &C) -> Parsed {
    let Ok(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return Parsed::NotOurs;
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Parsed::NotOurs;
    }
    if ctx.pull(ETH_LEN + Ipv4Hdr::LEN).is_err() {
        return Parsed::Malformed;
    }
    let Ok(ip) = ctx.ptr_at::<Ipv4Hdr>(ETH_LEN) else {
        return Parsed::Malformed;
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
        return Parsed::Malformed;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let more_fragments = frags & 0x2000 != 0;
    let frag_offset = frags & 0x1fff;
    let l4_off = ETH_LEN + ihl;
    let l4_len = usize::from(tot_len) - ihl;

    let Some((l4, hdr_len)) = l4_of(ip.proto) else {
        return Parsed::NotOurs;
    };
    let mut key = CtKey {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport: 0,
        dport: 0,
        proto: ip.proto,
        _pad: [0; 3],
    };
    if frag_offset != 0 {
        return Parsed::Fragment(None);
    }
    let l4_hdr = if l4_len < hdr_len || ctx.pull(l4_off + hdr_len).is_err() {
        None
    } else {
        ctx.read::<8>(l4_off).ok()
    };
    let Some(l4_hdr) = l4_hdr else {
        // A first fragment may be too short to carry the ports.
        return if more_fragments {
            Parsed::Fragment(None)
        } else {
            Parsed::Malformed
        };
    };
    let mut tcp_flags = 0;
    if l4 == L4::Tcp {
        let Ok([doff, flags]) = ctx.read::<2>(l4_off + 12) else {
            return Parsed::Malformed;
        };
        if usize::from(doff >> 4) * 4 < TCP_HDR_LEN {
            return Parsed::Malformed;
        }
        tcp_flags = flags;
    }
    let Some(l4_kind) = fill_ports(l4, &l4_hdr, &mut key) else {
        return Parsed::NotOurs;
    };
    if more_fragments {
        return Parsed::Fragment(Some(key));
    }
    Parsed::Flow(Flow {
        key,
        l4_off,
        l4: l4_kind,
        ip_len: tot_len,
        ttl: ip.ttl,
        tcp_flags,
    })
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
    let ip_off = flow.l4_off + ICMP_HDR_LEN;
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
    let mut key = CtKey {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport: 0,
        dport: 0,
        proto: ip.proto,
        _pad: [0; 3],
    };
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
