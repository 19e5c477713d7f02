//! The node's own ports: the sockets of its processes that receive on a
//! port, listed with sock_diag over netlink (a port a process of the node
//! listens on is not published, Docker's "port is already allocated",
//! unless forced), and the ports its stack never picks as a connection's
//! source port (`net.ipv4.ip_local_reserved_ports`). Both are those of the
//! calling thread's network namespace.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::model::ports::PortSet;

/// The sysctl of the ports the stack never picks as a local port itself.
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The ports reserved in `net.ipv4.ip_local_reserved_ports`.
pub fn reserved_ports() -> io::Result<PortSet> {
    std::fs::read_to_string(RESERVED_PORTS)?
        .trim()
        .parse()
        .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Makes `net.ipv4.ip_local_reserved_ports` exactly `ports`.
pub fn set_reserved_ports(ports: &PortSet) -> io::Result<()> {
    std::fs::write(RESERVED_PORTS, format!("{ports}\n"))
}

/// The local addresses of the sockets of the current network namespace that
/// receive new traffic on a port of IP protocol `proto` (TCP or UDP), both
/// families: TCP listeners, and UDP sockets bound but not connected. A
/// connected socket (a connection the node opened) is not among them.
pub fn receivers(proto: u8) -> io::Result<Vec<SocketAddr>> {
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(&socket, family, proto, &mut out)?;
    }
    Ok(out)
}

/// Asks for the sockets of `family` and `proto` and adds the receivers to
/// `out`.
fn dump(socket: &Socket, family: u8, proto: u8, out: &mut Vec<SocketAddr>) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: proto,
            extensions: ExtensionFlags::empty(),
            states: if proto == IPPROTO_TCP {
                StateFlags::LISTEN
            } else {
                StateFlags::all()
            },
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut answer = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut answer[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[offset..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    // UDP: a connected socket has its peer's port.
                    if id.destination_port == 0 {
                        out.push(SocketAddr::new(id.source_address, id.source_port));
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.code.map_or_else(io::Error::last_os_error, |c| {
                        io::Error::from_raw_os_error(c.get().saturating_abs())
                    }));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Whether a receiver bound to `local` takes traffic sent to node address
/// `addr` (`None`: any of them, the node's loopback included, which a
/// port published on every address covers for the node's own processes):
/// it is bound to that address or to a wildcard.
pub fn receives_for(local: &SocketAddr, addr: Option<IpAddr>) -> bool {
    let ip = match local.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    ip.is_unspecified() || addr.is_none_or(|a| a == ip)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, UdpSocket};

    use super::*;

    #[test]
    fn listeners_and_unconnected_udp_sockets_are_receivers_connected_ones_are_not() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
        let bound = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let connected = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        connected
            .connect(bound.local_addr().expect("addr"))
            .expect("connect");
        let tcp = receivers(IPPROTO_TCP).expect("TCP sockets");
        assert!(
            tcp.contains(&listener.local_addr().expect("addr")),
            "{tcp:?}"
        );
        let udp = receivers(netlink_packet_sock_diag::constants::IPPROTO_UDP).expect("UDP");
        assert!(udp.contains(&bound.local_addr().expect("addr")), "{udp:?}");
        assert!(
            !udp.contains(&connected.local_addr().expect("addr")),
            "{udp:?}"
        );
    }

    #[test]
    fn wildcard_and_matching_listeners_receive_for_a_node_address() {
        let node = Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)));
        let at = |s: &str| s.parse::<SocketAddr>().expect("address");
        assert!(receives_for(&at("0.0.0.0:80"), node));
        assert!(receives_for(&at("[::]:80"), node));
        assert!(receives_for(&at("198.18.0.2:80"), node));
        assert!(receives_for(&at("[::ffff:198.18.0.2]:80"), node));
        assert!(!receives_for(&at("198.18.0.3:80"), node));
        assert!(receives_for(&at("198.18.0.3:80"), None));
        assert!(!receives_for(&at("127.0.0.1:80"), node));
        // A port published on every address takes the node's own
        // connections to its loopback too.
        assert!(receives_for(&at("127.0.0.1:80"), None));
        let loopback = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(receives_for(&at("127.0.0.1:80"), loopback));
        assert!(receives_for(&at("0.0.0.0:80"), loopback));
        assert!(!receives_for(&at("198.18.0.2:80"), loopback));
    }
}
