//! Frame builder (the PKTGEN step of a packet test).
//!
//! A [`Frame`] describes one Ethernet frame carrying IPv4 or IPv6 and a TCP,
//! UDP or ICMP message. Every checksum is valid by default (computed with
//! `etherparse`); knobs set each field a datapath test cares about, including
//! the unusual ones: IPv4 options, fragments, VLAN tags, a zero UDP checksum,
//! ICMP errors quoting an inner packet.
//!
//! ```no_run
//! use datapath_tests::frame::{Frame, tcp_flags};
//!
//! let syn = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080")
//!     .tcp_flags(tcp_flags::SYN)
//!     .ttl(64)
//!     .build();
//! ```

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type,
    IpFragOffset, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, SingleVlanHeader, TcpHeader,
    UdpHeader, VlanId, VlanPcp,
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
};

/// TCP flag bits as in the TCP header's flags byte.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
    /// ECE.
    pub const ECE: u8 = 0x40;
    /// CWR.
    pub const CWR: u8 = 0x80;
}

/// Default source MAC of built frames (a locally administered address).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xd7, 0x00, 0x00, 0x00, 0x01];
/// Default destination MAC of built frames (a locally administered address).
pub const NODE_MAC: [u8; 6] = [0x02, 0xd7, 0x00, 0x00, 0x00, 0x02];
/// Default TTL / hop limit of built frames.
pub const DEFAULT_TTL: u8 = 64;

/// The ICMPv4 errors [`Frame::icmp_error`] can build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Destination unreachable, fragmentation needed (type 3, code 4),
    /// carrying the next-hop MTU.
    FragNeeded {
        /// Next-hop MTU.
        mtu: u16,
    },
    /// Destination unreachable, host unreachable (type 3, code 1).
    HostUnreachable,
    /// Destination unreachable, port unreachable (type 3, code 3).
    PortUnreachable,
    /// Time exceeded in transit (type 11, code 0).
    TimeExceeded,
}

impl IcmpError {
    fn icmp_type(self) -> Icmpv4Type {
        match self {
            Self::FragNeeded { mtu } => {
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: mtu,
                })
            }
            Self::HostUnreachable => {
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host)
            }
            Self::PortUnreachable => {
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
            }
            Self::TimeExceeded => Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
        }
    }
}

/// The message after the IP header.
#[derive(Clone, Debug)]
enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    IcmpEcho {
        request: bool,
        id: u16,
        seq: u16,
    },
    IcmpError {
        kind: IcmpError,
        quoted: Vec<u8>,
    },
    /// No header: the payload follows the IP header under this protocol.
    Raw {
        proto: u8,
    },
}

impl Transport {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            Self::Tcp { .. } => 6,
            Self::Udp { .. } => 17,
            Self::IcmpEcho { .. } | Self::IcmpError { .. } if v6 => 58,
            Self::IcmpEcho { .. } | Self::IcmpError { .. } => 1,
            Self::Raw { proto } => *proto,
        }
    }
}

/// An Ethernet frame under construction. Every setter consumes and returns
/// the builder; [`Frame::build`] produces the bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<u16>,
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    tos: u8,
    ident: u16,
    dont_fragment: bool,
    more_fragments: bool,
    fragment_offset: u16,
    ipv4_options: Vec<u8>,
    transport: Transport,
    payload: Vec<u8>,
    udp_zero_checksum: bool,
    l4_checksum: Option<u16>,
    ip_checksum: Option<u16>,
}

/// Parses a socket address given as a string or a [`SocketAddr`].
fn sock(addr: impl IntoSocketAddr) -> SocketAddr {
    addr.into_socket_addr()
}

/// Anything that names a socket address: a [`SocketAddr`] or a string such
/// as `"198.18.0.1:40000"` (test code: a malformed string panics).
pub trait IntoSocketAddr {
    /// The address.
    fn into_socket_addr(self) -> SocketAddr;
}

impl IntoSocketAddr for SocketAddr {
    fn into_socket_addr(self) -> SocketAddr {
        self
    }
}

impl IntoSocketAddr for &str {
    fn into_socket_addr(self) -> SocketAddr {
        self.parse()
            .unwrap_or_else(|e| panic!("not a socket address: {self:?}: {e}"))
    }
}

impl IntoSocketAddr for (std::net::Ipv4Addr, u16) {
    fn into_socket_addr(self) -> SocketAddr {
        SocketAddr::from(self)
    }
}

impl IntoSocketAddr for ([u8; 4], u16) {
    fn into_socket_addr(self) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(self.0), self.1))
    }
}

/// Anything that names an IP address: an [`IpAddr`], an [`std::net::Ipv4Addr`]
/// or a string (test code: a malformed string panics).
pub trait IntoIpAddr {
    /// The address.
    fn into_ip_addr(self) -> IpAddr;
}

impl IntoIpAddr for IpAddr {
    fn into_ip_addr(self) -> IpAddr {
        self
    }
}

impl IntoIpAddr for std::net::Ipv4Addr {
    fn into_ip_addr(self) -> IpAddr {
        IpAddr::V4(self)
    }
}

impl IntoIpAddr for std::net::Ipv6Addr {
    fn into_ip_addr(self) -> IpAddr {
        IpAddr::V6(self)
    }
}

impl IntoIpAddr for [u8; 4] {
    fn into_ip_addr(self) -> IpAddr {
        IpAddr::from(self)
    }
}

impl IntoIpAddr for &str {
    fn into_ip_addr(self) -> IpAddr {
        self.parse()
            .unwrap_or_else(|e| panic!("not an IP address: {self:?}: {e}"))
    }
}

impl Frame {
    fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "source {src} and destination {dst} must be of one family"
        );
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            vlan: None,
            src,
            dst,
            ttl: DEFAULT_TTL,
            tos: 0,
            ident: 0x1234,
            dont_fragment: true,
            more_fragments: false,
            fragment_offset: 0,
            ipv4_options: Vec::new(),
            transport,
            payload: Vec::new(),
            udp_zero_checksum: false,
            l4_checksum: None,
            ip_checksum: None,
        }
    }

    /// A TCP segment from `src` to `dst`, flags SYN, sequence number 1000,
    /// window 64240, no payload.
    pub fn tcp(src: impl IntoSocketAddr, dst: impl IntoSocketAddr) -> Self {
        let (src, dst) = (sock(src), sock(dst));
        Self::new(
            src.ip(),
            dst.ip(),
            Transport::Tcp {
                sport: src.port(),
                dport: dst.port(),
                flags: tcp_flags::SYN,
                seq: 1000,
                ack: 0,
                window: 64240,
            },
        )
    }

    /// A UDP datagram from `src` to `dst`, no payload.
    pub fn udp(src: impl IntoSocketAddr, dst: impl IntoSocketAddr) -> Self {
        let (src, dst) = (sock(src), sock(dst));
        Self::new(
            src.ip(),
            dst.ip(),
            Transport::Udp {
                sport: src.port(),
                dport: dst.port(),
            },
        )
    }

    /// An ICMP (ICMPv6 for IPv6 addresses) echo request.
    pub fn icmp_echo_request(
        src: impl IntoIpAddr,
        dst: impl IntoIpAddr,
        id: u16,
        seq: u16,
    ) -> Self {
        Self::new(
            src.into_ip_addr(),
            dst.into_ip_addr(),
            Transport::IcmpEcho {
                request: true,
                id,
                seq,
            },
        )
    }

    /// An ICMP (ICMPv6 for IPv6 addresses) echo reply.
    pub fn icmp_echo_reply(src: impl IntoIpAddr, dst: impl IntoIpAddr, id: u16, seq: u16) -> Self {
        Self::new(
            src.into_ip_addr(),
            dst.into_ip_addr(),
            Transport::IcmpEcho {
                request: false,
                id,
                seq,
            },
        )
    }

    /// An ICMPv4 error from `src` to `dst` about `original`, quoting its IP
    /// header and the first 8 bytes after it (the minimum of RFC 792).
    pub fn icmp_error(
        src: impl IntoIpAddr,
        dst: impl IntoIpAddr,
        kind: IcmpError,
        original: &Frame,
    ) -> Self {
        let packet = original.ip_packet();
        let quote = original.ip_header_len() + 8;
        Self::icmp_error_quoting(src, dst, kind, &packet[..quote.min(packet.len())])
    }

    /// An ICMPv4 error from `src` to `dst` quoting all of `original`'s IP
    /// packet (as Linux does for small packets), so that the quoted L4
    /// checksum can be verified too.
    pub fn icmp_error_full(
        src: impl IntoIpAddr,
        dst: impl IntoIpAddr,
        kind: IcmpError,
        original: &Frame,
    ) -> Self {
        Self::icmp_error_quoting(src, dst, kind, &original.ip_packet())
    }

    /// An ICMPv4 error from `src` to `dst` quoting exactly `quoted`.
    pub fn icmp_error_quoting(
        src: impl IntoIpAddr,
        dst: impl IntoIpAddr,
        kind: IcmpError,
        quoted: &[u8],
    ) -> Self {
        let frame = Self::new(
            src.into_ip_addr(),
            dst.into_ip_addr(),
            Transport::IcmpError {
                kind,
                quoted: quoted.to_vec(),
            },
        );
        assert!(frame.src.is_ipv4(), "ICMP errors are built for IPv4 only");
        frame
    }

    /// An IP packet of protocol `proto` with no transport header built: the
    /// payload follows the IP header as given.
    pub fn raw_ip(src: impl IntoIpAddr, dst: impl IntoIpAddr, proto: u8) -> Self {
        Self::new(
            src.into_ip_addr(),
            dst.into_ip_addr(),
            Transport::Raw { proto },
        )
    }

    /// Sets both MAC addresses.
    pub fn macs(self, src: [u8; 6], dst: [u8; 6]) -> Self {
        Self {
            src_mac: src,
            dst_mac: dst,
            ..self
        }
    }

    /// Sets the source MAC address.
    pub fn src_mac(self, mac: [u8; 6]) -> Self {
        Self {
            src_mac: mac,
            ..self
        }
    }

    /// Sets the destination MAC address.
    pub fn dst_mac(self, mac: [u8; 6]) -> Self {
        Self {
            dst_mac: mac,
            ..self
        }
    }

    /// Adds an 802.1Q tag with VLAN id `id` (0..4095).
    pub fn vlan(self, id: u16) -> Self {
        Self {
            vlan: Some(id),
            ..self
        }
    }

    /// Sets the source address (the family must stay the same).
    pub fn src_ip(self, addr: impl IntoIpAddr) -> Self {
        let src = addr.into_ip_addr();
        assert_eq!(src.is_ipv4(), self.dst.is_ipv4(), "address family mismatch");
        Self { src, ..self }
    }

    /// Sets the destination address (the family must stay the same).
    pub fn dst_ip(self, addr: impl IntoIpAddr) -> Self {
        let dst = addr.into_ip_addr();
        assert_eq!(dst.is_ipv4(), self.src.is_ipv4(), "address family mismatch");
        Self { dst, ..self }
    }

    /// Sets the TCP/UDP source port, or the ICMP echo identifier.
    pub fn sport(mut self, port: u16) -> Self {
        match &mut self.transport {
            Transport::Tcp { sport, .. } | Transport::Udp { sport, .. } => *sport = port,
            Transport::IcmpEcho { id, .. } => *id = port,
            t => panic!("no source port in {t:?}"),
        }
        self
    }

    /// Sets the TCP/UDP destination port, or the ICMP echo identifier.
    pub fn dport(mut self, port: u16) -> Self {
        match &mut self.transport {
            Transport::Tcp { dport, .. } | Transport::Udp { dport, .. } => *dport = port,
            Transport::IcmpEcho { id, .. } => *id = port,
            t => panic!("no destination port in {t:?}"),
        }
        self
    }

    /// Sets the IPv4 TTL or IPv6 hop limit.
    pub fn ttl(self, ttl: u8) -> Self {
        Self { ttl, ..self }
    }

    /// Sets the IPv4 type of service byte (DSCP and ECN).
    pub fn tos(self, tos: u8) -> Self {
        Self { tos, ..self }
    }

    /// Sets the IPv4 identification.
    pub fn ident(self, ident: u16) -> Self {
        Self { ident, ..self }
    }

    /// Sets the IPv4 don't-fragment flag (set by default).
    pub fn dont_fragment(self, dont_fragment: bool) -> Self {
        Self {
            dont_fragment,
            ..self
        }
    }

    /// Makes the packet an IPv4 fragment: the more-fragments flag and the
    /// offset in 8-byte units. A fragment with a non-zero offset carries no
    /// transport header: only the payload follows the IP header. Clears the
    /// don't-fragment flag.
    pub fn fragment(self, more_fragments: bool, offset: u16) -> Self {
        assert!(
            offset < 0x2000,
            "fragment offset {offset} does not fit 13 bits"
        );
        Self {
            more_fragments,
            fragment_offset: offset,
            dont_fragment: false,
            ..self
        }
    }

    /// Sets the IPv4 options (a multiple of 4 bytes, at most 40).
    pub fn ipv4_options(self, options: &[u8]) -> Self {
        assert!(
            options.len().is_multiple_of(4) && options.len() <= 40,
            "IPv4 options must be a multiple of 4 bytes, at most 40: {}",
            options.len()
        );
        Self {
            ipv4_options: options.to_vec(),
            ..self
        }
    }

    /// Sets the TCP flags byte ([`tcp_flags`]).
    pub fn tcp_flags(mut self, value: u8) -> Self {
        match &mut self.transport {
            Transport::Tcp { flags, .. } => *flags = value,
            t => panic!("TCP flags on {t:?}"),
        }
        self
    }

    /// Sets the TCP sequence number.
    pub fn seq(mut self, value: u32) -> Self {
        match &mut self.transport {
            Transport::Tcp { seq, .. } => *seq = value,
            t => panic!("TCP sequence number on {t:?}"),
        }
        self
    }

    /// Sets the TCP acknowledgment number (the ACK flag is set separately).
    pub fn ack_number(mut self, value: u32) -> Self {
        match &mut self.transport {
            Transport::Tcp { ack, .. } => *ack = value,
            t => panic!("TCP acknowledgment number on {t:?}"),
        }
        self
    }

    /// Sets the TCP window.
    pub fn window(mut self, value: u16) -> Self {
        match &mut self.transport {
            Transport::Tcp { window, .. } => *window = value,
            t => panic!("TCP window on {t:?}"),
        }
        self
    }

    /// Sets the payload after the transport header.
    pub fn payload(self, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: payload.into(),
            ..self
        }
    }

    /// Sends the UDP datagram without a checksum (zero, allowed over IPv4).
    pub fn udp_zero_checksum(self) -> Self {
        assert!(
            matches!(self.transport, Transport::Udp { .. }),
            "zero checksum on a non-UDP frame"
        );
        Self {
            udp_zero_checksum: true,
            ..self
        }
    }

    /// Writes `csum` as the L4 checksum instead of the computed one (to
    /// build a frame with a wrong checksum).
    pub fn l4_checksum(self, csum: u16) -> Self {
        Self {
            l4_checksum: Some(csum),
            ..self
        }
    }

    /// Writes `csum` as the IPv4 header checksum instead of the computed one.
    pub fn ip_checksum(self, csum: u16) -> Self {
        Self {
            ip_checksum: Some(csum),
            ..self
        }
    }

    /// The IP header's length: 20 plus options for IPv4, 40 for IPv6.
    pub fn ip_header_len(&self) -> usize {
        if self.src.is_ipv4() {
            Ipv4Header::MIN_LEN + self.ipv4_options.len()
        } else {
            Ipv6Header::LEN
        }
    }

    /// The length of the link-layer header(s): 14, or 18 with a VLAN tag.
    pub fn l2_len(&self) -> usize {
        Ethernet2Header::LEN + self.vlan.map_or(0, |_| SingleVlanHeader::LEN)
    }

    /// The L4 bytes: transport header with its checksum, then the payload.
    fn l4_bytes(&self) -> Vec<u8> {
        let v6 = !self.src.is_ipv4();
        if self.fragment_offset != 0 {
            // A later fragment: the transport header was in the first one.
            return self.payload.clone();
        }
        let (src4, dst4, src6, dst6) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets(), d.octets(), [0; 16], [0; 16]),
            (IpAddr::V6(s), IpAddr::V6(d)) => ([0; 4], [0; 4], s.octets(), d.octets()),
            _ => unreachable!("families are checked when the frame is made"),
        };
        let payload = &self.payload;
        let mut out = Vec::with_capacity(64 + payload.len());
        match &self.transport {
            Transport::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
                window,
            } => {
                let mut tcp = TcpHeader::new(*sport, *dport, *seq, *window);
                tcp.acknowledgment_number = *ack;
                tcp.fin = flags & tcp_flags::FIN != 0;
                tcp.syn = flags & tcp_flags::SYN != 0;
                tcp.rst = flags & tcp_flags::RST != 0;
                tcp.psh = flags & tcp_flags::PSH != 0;
                tcp.ack = flags & tcp_flags::ACK != 0;
                tcp.urg = flags & tcp_flags::URG != 0;
                tcp.ece = flags & tcp_flags::ECE != 0;
                tcp.cwr = flags & tcp_flags::CWR != 0;
                let csum = if v6 {
                    tcp.calc_checksum_ipv6_raw(src6, dst6, payload)
                } else {
                    tcp.calc_checksum_ipv4_raw(src4, dst4, payload)
                };
                tcp.checksum = self
                    .l4_checksum
                    .unwrap_or_else(|| csum.expect("TCP payload too large"));
                out.extend_from_slice(&tcp.to_bytes());
            }
            Transport::Udp { sport, dport } => {
                let len =
                    u16::try_from(UdpHeader::LEN + payload.len()).expect("UDP payload too large");
                let mut udp = UdpHeader {
                    source_port: *sport,
                    destination_port: *dport,
                    length: len,
                    checksum: 0,
                };
                let csum = if v6 {
                    udp.calc_checksum_ipv6_raw(src6, dst6, payload)
                } else {
                    udp.calc_checksum_ipv4_raw(src4, dst4, payload)
                };
                udp.checksum = match (self.l4_checksum, self.udp_zero_checksum) {
                    (Some(c), _) => c,
                    (None, true) => 0,
                    (None, false) => csum.expect("UDP payload too large"),
                };
                out.extend_from_slice(&udp.to_bytes());
            }
            Transport::IcmpEcho { request, id, seq } => {
                let echo = IcmpEchoHeader { id: *id, seq: *seq };
                let header = if v6 {
                    let t = if *request {
                        Icmpv6Type::EchoRequest(echo)
                    } else {
                        Icmpv6Type::EchoReply(echo)
                    };
                    let mut h = Icmpv6Header::with_checksum(t, src6, dst6, payload)
                        .expect("ICMPv6 payload too large");
                    if let Some(c) = self.l4_checksum {
                        h.checksum = c;
                    }
                    h.to_bytes().to_vec()
                } else {
                    let t = if *request {
                        Icmpv4Type::EchoRequest(echo)
                    } else {
                        Icmpv4Type::EchoReply(echo)
                    };
                    let mut h = Icmpv4Header::with_checksum(t, payload);
                    if let Some(c) = self.l4_checksum {
                        h.checksum = c;
                    }
                    h.to_bytes().to_vec()
                };
                out.extend_from_slice(&header);
            }
            Transport::IcmpError { kind, quoted } => {
                // The quoted packet comes first, then any extra payload.
                let mut body = quoted.clone();
                body.extend_from_slice(payload);
                let mut h = Icmpv4Header::with_checksum(kind.icmp_type(), &body);
                if let Some(c) = self.l4_checksum {
                    h.checksum = c;
                }
                out.extend_from_slice(&h.to_bytes());
                out.extend_from_slice(&body);
                return out;
            }
            Transport::Raw { .. } => {}
        }
        out.extend_from_slice(payload);
        out
    }

    /// The IP packet: IP header and everything after it.
    pub fn ip_packet(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let proto = IpNumber(self.transport.proto(!self.src.is_ipv4()));
        let mut out = Vec::with_capacity(60 + l4.len());
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip = Ipv4Header::new(
                    u16::try_from(l4.len()).expect("IPv4 payload too large"),
                    self.ttl,
                    proto,
                    src.octets(),
                    dst.octets(),
                )
                .expect("IPv4 payload too large");
                ip.dscp = etherparse::IpDscp::try_new(self.tos >> 2).expect("6-bit DSCP");
                ip.ecn = etherparse::IpEcn::try_new(self.tos & 3).expect("2-bit ECN");
                ip.identification = self.ident;
                ip.dont_fragment = self.dont_fragment;
                ip.more_fragments = self.more_fragments;
                ip.fragment_offset =
                    IpFragOffset::try_new(self.fragment_offset).expect("checked in fragment()");
                ip.options = etherparse::Ipv4Options::try_from(&self.ipv4_options[..])
                    .expect("checked in ipv4_options()");
                // Options lengthen the header: recompute the total length.
                ip.set_payload_len(l4.len())
                    .expect("IPv4 payload too large");
                ip.header_checksum = self
                    .ip_checksum
                    .unwrap_or_else(|| ip.calc_header_checksum());
                out.extend_from_slice(&ip.to_bytes());
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ip = Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: u16::try_from(l4.len()).expect("IPv6 payload too large"),
                    next_header: proto,
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                out.extend_from_slice(&ip.to_bytes());
            }
            _ => unreachable!("families are checked when the frame is made"),
        }
        out.extend_from_slice(&l4);
        out
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let ip_type = if self.src.is_ipv4() {
            EtherType::IPV4
        } else {
            EtherType::IPV6
        };
        let mut out = Vec::with_capacity(128 + self.payload.len());
        let outer_type = if self.vlan.is_some() {
            EtherType::VLAN_TAGGED_FRAME
        } else {
            ip_type
        };
        out.extend_from_slice(
            &Ethernet2Header {
                source: self.src_mac,
                destination: self.dst_mac,
                ether_type: outer_type,
            }
            .to_bytes(),
        );
        if let Some(id) = self.vlan {
            out.extend_from_slice(
                &SingleVlanHeader {
                    pcp: VlanPcp::ZERO,
                    drop_eligible_indicator: false,
                    vlan_id: VlanId::try_new(id).expect("VLAN id must be below 4096"),
                    ether_type: ip_type,
                }
                .to_bytes(),
            );
        }
        out.extend_from_slice(&self.ip_packet());
        out
    }
}

/// An ARP request frame (broadcast) from `sender_mac`/`sender_ip` asking
/// for `target_ip`: a frame the datapath must leave alone.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut out = Ethernet2Header {
        source: sender_mac,
        destination: [0xff; 6],
        ether_type: EtherType::ARP,
    }
    .to_bytes()
    .to_vec();
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, op 1 (request).
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    out.extend_from_slice(&sender_mac);
    out.extend_from_slice(&sender_ip);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target_ip);
    out
}
