//! Reading frames back (the CHECK step of a packet test): a structured view
//! of a frame's headers, a from-scratch checksum verifier, and byte diffs.
//!
//! ```no_run
//! use datapath_tests::packet::{ParsedFrame, verify_checksums};
//!
//! # let out: Vec<u8> = Vec::new();
//! let p = ParsedFrame::parse(&out).expect("a frame");
//! assert_eq!(p.ipv4().destination, [198, 19, 0, 5]);
//! assert_eq!(p.tcp().destination_port, 80);
//! verify_checksums(&out).expect("valid checksums");
//! ```

use std::{net::IpAddr, ops::Range};

use etherparse::{
    Ethernet2Header, Icmpv4Header, Icmpv4Type, Ipv4Header, Ipv6Header, LinkExtHeader, LinkHeader,
    NetHeaders, PacketHeaders, SingleVlanHeader, TcpHeader, TransportHeader, UdpHeader,
};

/// Offsets of header fields, relative to the start of their header.
pub mod field {
    /// IPv4 TTL.
    pub const IPV4_TTL: usize = 8;
    /// IPv4 protocol.
    pub const IPV4_PROTO: usize = 9;
    /// IPv4 header checksum (2 bytes).
    pub const IPV4_CSUM: usize = 10;
    /// IPv4 source address (4 bytes).
    pub const IPV4_SRC: usize = 12;
    /// IPv4 destination address (4 bytes).
    pub const IPV4_DST: usize = 16;
    /// TCP/UDP source port (2 bytes).
    pub const SPORT: usize = 0;
    /// TCP/UDP destination port (2 bytes).
    pub const DPORT: usize = 2;
    /// TCP checksum (2 bytes).
    pub const TCP_CSUM: usize = 16;
    /// UDP checksum (2 bytes).
    pub const UDP_CSUM: usize = 6;
    /// ICMP checksum (2 bytes).
    pub const ICMP_CSUM: usize = 2;
    /// ICMP echo identifier (2 bytes).
    pub const ICMP_ECHO_ID: usize = 4;
    /// Ethernet destination MAC (6 bytes).
    pub const ETH_DST: usize = 0;
    /// Ethernet source MAC (6 bytes).
    pub const ETH_SRC: usize = 6;
}

/// The IP header of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpHeader {
    /// IPv4.
    V4(Ipv4Header),
    /// IPv6 (extension headers are skipped).
    V6(Ipv6Header),
}

/// The packet an ICMPv4 error quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    /// The quoted IPv4 header.
    pub ip: Ipv4Header,
    /// The quoted bytes after the IP header (at least the first 8 bytes of
    /// the L4 header in a well-formed error).
    pub l4: Vec<u8>,
}

impl Quoted {
    /// The quoted TCP/UDP source port (or ICMP echo identifier), if quoted.
    pub fn sport(&self) -> Option<u16> {
        self.word(if self.ip.protocol.0 == 1 { 4 } else { 0 })
    }

    /// The quoted TCP/UDP destination port, if quoted.
    pub fn dport(&self) -> Option<u16> {
        self.word(2)
    }

    fn word(&self, off: usize) -> Option<u16> {
        Some(u16::from_be_bytes([
            *self.l4.get(off)?,
            *self.l4.get(off + 1)?,
        ]))
    }
}

/// A frame's headers, owned, with the offsets of each layer.
#[derive(Clone, Debug)]
pub struct ParsedFrame {
    /// Ethernet header.
    pub eth: Ethernet2Header,
    /// 802.1Q tag, if any.
    pub vlan: Option<SingleVlanHeader>,
    /// IP header, if the frame carries IP.
    pub ip: Option<IpHeader>,
    /// Transport header, if parsed (absent for non-first fragments).
    pub l4: Option<TransportHeader>,
    /// Bytes after the transport header (after the IP header if there is
    /// none), up to the IP packet's end.
    pub payload: Vec<u8>,
    /// The packet an ICMPv4 error quotes.
    pub quoted: Option<Quoted>,
    /// Offset of the IP header in the frame.
    pub ip_offset: usize,
    /// Offset of the transport header in the frame, if there is an IP header.
    pub l4_offset: Option<usize>,
}

impl ParsedFrame {
    /// Parses an Ethernet frame.
    pub fn parse(frame: &[u8]) -> Result<Self, String> {
        let h = PacketHeaders::from_ethernet_slice(frame).map_err(|e| format!("{e}"))?;
        let Some(LinkHeader::Ethernet2(eth)) = h.link.clone() else {
            return Err("no Ethernet header".into());
        };
        let mut vlan = None;
        for ext in &h.link_exts {
            match ext {
                LinkExtHeader::Vlan(v) if vlan.is_none() => vlan = Some(v.clone()),
                other => return Err(format!("unexpected link extension {other:?}")),
            }
        }
        let ip_offset = Ethernet2Header::LEN + vlan.as_ref().map_or(0, |_| SingleVlanHeader::LEN);
        let (ip, l4_offset) = match &h.net {
            Some(NetHeaders::Ipv4(ip, ext)) => (
                Some(IpHeader::V4(ip.clone())),
                Some(ip_offset + ip.header_len() + ext.header_len()),
            ),
            Some(NetHeaders::Ipv6(ip, ext)) => (
                Some(IpHeader::V6(ip.clone())),
                Some(ip_offset + Ipv6Header::LEN + ext.header_len()),
            ),
            Some(NetHeaders::Arp(_)) | None => (None, None),
        };
        let payload = h.payload.slice().to_vec();
        let quoted = match &h.transport {
            Some(TransportHeader::Icmpv4(icmp)) if is_icmp_error(icmp) => {
                let (qip, rest) = Ipv4Header::from_slice(&payload)
                    .map_err(|e| format!("ICMP error quotes no IPv4 header: {e}"))?;
                Some(Quoted {
                    ip: qip,
                    l4: rest.to_vec(),
                })
            }
            _ => None,
        };
        Ok(Self {
            eth,
            vlan,
            ip,
            l4: h.transport,
            payload,
            quoted,
            ip_offset,
            l4_offset,
        })
    }

    /// The IPv4 header; panics if the frame carries none.
    pub fn ipv4(&self) -> &Ipv4Header {
        match &self.ip {
            Some(IpHeader::V4(ip)) => ip,
            other => panic!("expected an IPv4 header, found {other:?}"),
        }
    }

    /// The IPv6 header; panics if the frame carries none.
    pub fn ipv6(&self) -> &Ipv6Header {
        match &self.ip {
            Some(IpHeader::V6(ip)) => ip,
            other => panic!("expected an IPv6 header, found {other:?}"),
        }
    }

    /// The TCP header; panics if the frame carries none.
    pub fn tcp(&self) -> &TcpHeader {
        match &self.l4 {
            Some(TransportHeader::Tcp(t)) => t,
            other => panic!("expected a TCP header, found {other:?}"),
        }
    }

    /// The UDP header; panics if the frame carries none.
    pub fn udp(&self) -> &UdpHeader {
        match &self.l4 {
            Some(TransportHeader::Udp(u)) => u,
            other => panic!("expected a UDP header, found {other:?}"),
        }
    }

    /// The ICMPv4 header; panics if the frame carries none.
    pub fn icmpv4(&self) -> &Icmpv4Header {
        match &self.l4 {
            Some(TransportHeader::Icmpv4(i)) => i,
            other => panic!("expected an ICMPv4 header, found {other:?}"),
        }
    }

    /// The quoted packet of an ICMPv4 error; panics if there is none.
    pub fn quoted(&self) -> &Quoted {
        self.quoted
            .as_ref()
            .unwrap_or_else(|| panic!("expected an ICMP error, found {:?}", self.l4))
    }

    /// Source address, if the frame carries IP.
    pub fn src_ip(&self) -> Option<IpAddr> {
        match &self.ip {
            Some(IpHeader::V4(ip)) => Some(ip.source.into()),
            Some(IpHeader::V6(ip)) => Some(ip.source.into()),
            None => None,
        }
    }

    /// Destination address, if the frame carries IP.
    pub fn dst_ip(&self) -> Option<IpAddr> {
        match &self.ip {
            Some(IpHeader::V4(ip)) => Some(ip.destination.into()),
            Some(IpHeader::V6(ip)) => Some(ip.destination.into()),
            None => None,
        }
    }

    /// `(source, destination)` ports of TCP or UDP; panics otherwise.
    pub fn ports(&self) -> (u16, u16) {
        match &self.l4 {
            Some(TransportHeader::Tcp(t)) => (t.source_port, t.destination_port),
            Some(TransportHeader::Udp(u)) => (u.source_port, u.destination_port),
            other => panic!("expected TCP or UDP, found {other:?}"),
        }
    }

    /// The transport header's offset; panics if the frame carries no IP.
    pub fn l4_off(&self) -> usize {
        self.l4_offset.expect("the frame carries no IP packet")
    }
}

fn is_icmp_error(icmp: &Icmpv4Header) -> bool {
    matches!(
        icmp.icmp_type,
        Icmpv4Type::DestinationUnreachable(_)
            | Icmpv4Type::TimeExceeded(_)
            | Icmpv4Type::ParameterProblem(_)
            | Icmpv4Type::Redirect(_)
    )
}

/// The one's-complement sum of `data` as big-endian 16-bit words (an odd
/// last byte padded with zero), added to `sum`, folded to 16 bits.
fn ones_sum(mut sum: u64, data: &[u8]) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u64::from(*b) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum `data` should carry in the 2 bytes at `csum_off`, given
/// the pseudo-header sum `pseudo`: recomputed with that field zeroed.
fn expected_csum(pseudo: u64, data: &[u8], csum_off: usize) -> u16 {
    let mut copy = data.to_vec();
    copy[csum_off] = 0;
    copy[csum_off + 1] = 0;
    !ones_sum(pseudo, &copy)
}

fn word(data: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([data[off], data[off + 1]])
}

/// Checks the checksum at `csum_off` of `data`, whose full sum (including
/// the pseudo header) must be 0xffff.
fn check(what: &str, pseudo: u64, data: &[u8], csum_off: usize) -> Result<(), String> {
    if data.len() < csum_off + 2 {
        return Err(format!(
            "{what}: {} bytes, too short for its checksum",
            data.len()
        ));
    }
    if ones_sum(pseudo, data) == 0xffff {
        return Ok(());
    }
    Err(format!(
        "{what} checksum is {:#06x}, expected {:#06x}",
        word(data, csum_off),
        expected_csum(pseudo, data, csum_off)
    ))
}

/// The pseudo-header sum of an IPv4 packet for an L4 message of `len`.
fn pseudo_v4(ip: &[u8], proto: u8, len: usize) -> u64 {
    u64::from(ones_sum(0, &ip[12..20])) + u64::from(proto) + len as u64
}

/// The pseudo-header sum of an IPv6 packet for an L4 message of `len`.
fn pseudo_v6(ip: &[u8], next: u8, len: usize) -> u64 {
    u64::from(ones_sum(0, &ip[8..40])) + u64::from(next) + len as u64
}

/// Verifies every checksum of an IP packet (`ip` starts at the IP header
/// and may be longer than the packet). `depth` > 0 for a quoted packet.
fn verify_ip(ip: &[u8], depth: u32) -> Result<(), String> {
    let what = if depth == 0 { "" } else { "quoted " };
    let Some(&first) = ip.first() else {
        return Err(format!("{what}IP packet is empty"));
    };
    match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || ip.len() < ihl {
                return Err(format!(
                    "{what}IPv4 header length {ihl} invalid for {} bytes",
                    ip.len()
                ));
            }
            check(&format!("{what}IPv4 header"), 0, &ip[..ihl], 10)?;
            let total = usize::from(word(ip, 2));
            if total < ihl {
                return Err(format!(
                    "{what}IPv4 total length {total} below header length {ihl}"
                ));
            }
            if total > ip.len() {
                if depth > 0 {
                    // A truncated quote: only its IP header can be checked.
                    return Ok(());
                }
                return Err(format!(
                    "IPv4 total length {total} beyond the {} bytes present",
                    ip.len()
                ));
            }
            let frag = word(ip, 6);
            if frag & 0x3fff != 0 {
                // A fragment's L4 checksum covers the reassembled datagram.
                return Ok(());
            }
            let l4 = &ip[ihl..total];
            let proto = ip[9];
            match proto {
                6 => check(
                    &format!("{what}TCP"),
                    pseudo_v4(ip, proto, l4.len()),
                    l4,
                    16,
                ),
                17 => {
                    if l4.len() >= 8 && word(l4, 6) == 0 {
                        return Ok(()); // No checksum (IPv4 only).
                    }
                    check(&format!("{what}UDP"), pseudo_v4(ip, proto, l4.len()), l4, 6)
                }
                1 => {
                    check(&format!("{what}ICMP"), 0, l4, 2)?;
                    // Errors quote a packet: check its headers too.
                    if matches!(l4[0], 3 | 4 | 5 | 11 | 12) && l4.len() > 8 && depth == 0 {
                        verify_ip(&l4[8..], depth + 1)?;
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        6 => {
            if ip.len() < 40 {
                return Err(format!("{what}IPv6 header cut short: {} bytes", ip.len()));
            }
            let len = usize::from(word(ip, 4));
            if 40 + len > ip.len() {
                if depth > 0 {
                    return Ok(());
                }
                return Err(format!(
                    "IPv6 payload length {len} beyond the {} bytes present",
                    ip.len() - 40
                ));
            }
            let l4 = &ip[40..40 + len];
            let next = ip[6];
            match next {
                6 => check(&format!("{what}TCP"), pseudo_v6(ip, next, len), l4, 16),
                17 => check(&format!("{what}UDP"), pseudo_v6(ip, next, len), l4, 6),
                58 => check(&format!("{what}ICMPv6"), pseudo_v6(ip, next, len), l4, 2),
                _ => Ok(()),
            }
        }
        v => Err(format!("{what}IP version {v}")),
    }
}

/// Recomputes every checksum of an Ethernet frame from scratch and compares:
/// the IPv4 header checksum; the TCP and UDP checksums with their IPv4 or
/// IPv6 pseudo header (a zero UDP checksum over IPv4 means none); the ICMP
/// checksum, including the quoted packet of an error, whose IPv4 header
/// checksum is checked too, and its L4 checksum when the whole packet is
/// quoted. Fragments' L4 checksums cannot be checked alone and are skipped.
/// Frames carrying neither IPv4 nor IPv6 have nothing to check.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 14 {
        return Err(format!(
            "frame of {} bytes has no Ethernet header",
            frame.len()
        ));
    }
    let mut off = 12;
    let mut ether_type = word(frame, off);
    while matches!(ether_type, 0x8100 | 0x88a8) {
        off += 4;
        if frame.len() < off + 2 {
            return Err("VLAN tag cut short".into());
        }
        ether_type = word(frame, off);
    }
    let ip = &frame[off + 2..];
    match ether_type {
        0x0800 | 0x86dd => verify_ip(ip, 0),
        _ => Ok(()),
    }
}

/// Offsets at which `before` and `after` differ; a length difference adds
/// the offsets present in only one of them.
pub fn changed_offsets(before: &[u8], after: &[u8]) -> Vec<usize> {
    let common = before.len().min(after.len());
    let mut out: Vec<usize> = (0..common).filter(|&i| before[i] != after[i]).collect();
    out.extend(common..before.len().max(after.len()));
    out
}

/// Asserts that `after` has `before`'s length and differs from it only
/// within `allowed` (byte ranges of the frame).
#[track_caller]
pub fn assert_only_changed(before: &[u8], after: &[u8], allowed: &[Range<usize>]) {
    assert_eq!(before.len(), after.len(), "frame length changed");
    let stray: Vec<usize> = changed_offsets(before, after)
        .into_iter()
        .filter(|i| !allowed.iter().any(|r| r.contains(i)))
        .collect();
    assert!(
        stray.is_empty(),
        "bytes changed outside {allowed:?} at offsets {stray:?}\nbefore: {}\nafter:  {}",
        hex(before),
        hex(after)
    );
}

/// Lower-case hex of `bytes`, a space every 2 bytes.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % 2 == 0 {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}
