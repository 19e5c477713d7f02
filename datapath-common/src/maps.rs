//! BPF map names, key and value layouts.
//!
//! Conventions:
//! * IPv4 addresses are `[u8; 4]` in wire order (so `bpftool map dump` prints
//!   `[198,18,0,2]`), ports are `u16` in host order (so it prints `8080`).
//! * Every type is `#[repr(C)]`, `Pod` and has no implicit padding: explicit
//!   `_pad` fields keep the bytes the kernel hashes fully defined. Sizes are
//!   asserted at compile time.

use bytemuck::{Pod, Zeroable};

/// Map names as they appear in the object file, in `bpftool map` and as pin
/// file names under the agent's bpffs directory.
pub mod names {
    /// [`super::Config`] array (one entry).
    pub const CONFIG: &str = "CONFIG";
    /// [`super::ServiceKey`] → [`super::ServiceValue`]: published ports.
    pub const SERVICES: &str = "SERVICES";
    /// [`super::EndpointKey`] → [`super::Endpoint`]: containers by address.
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// [`super::NodeAddrKey`] → [`super::NodeAddr`]: the node's own addresses.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// [`super::CtKey`] → [`super::CtEntry`]: connection tracking, both directions.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Per-CPU `u64` counters indexed by [`crate::Stat`].
    pub const STATS: &str = "STATS";
    /// [`crate::ratelimit::RateKey`] → [`crate::ratelimit::RateLimit`]: token
    /// buckets per (cgroup, direction).
    pub const RATE_LIMITS: &str = "RATE_LIMITS";
    /// [`crate::ratelimit::RateKey`] → per-CPU [`crate::ratelimit::RateStats`].
    pub const RATE_STATS: &str = "RATE_STATS";
    /// Cgroup storage: the [`crate::ratelimit::RateKey`] of each cgroup
    /// attachment of the rate limiter.
    pub const RATE_CGROUPS: &str = "RATE_CGROUPS";
    /// [`crate::ratelimit::RateKey`] (ingress) →
    /// [`crate::ratelimit::RateFlows`]: the TCP sockets sharing an ingress
    /// limit's receive windows.
    pub const RATE_FLOWS: &str = "RATE_FLOWS";
    /// [`crate::clock::TestClock`] array (one entry): zero in production;
    /// packet tests freeze the programs' time with it. Not pinned.
    pub const CLOCK: &str = "CLOCK";

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 10] = [
        CONFIG,
        SERVICES,
        ENDPOINTS,
        NODE_ADDRS,
        CONNTRACK,
        STATS,
        RATE_LIMITS,
        RATE_STATS,
        RATE_CGROUPS,
        RATE_FLOWS,
    ];
}

/// Program names (the Rust function names in the eBPF crate).
pub mod programs {
    /// TC (tcx) ingress on the uplink: DNAT of published ports, reverse SNAT.
    pub const UPLINK_TC: &str = "uplink_tc";
    /// XDP on the uplink: the same translation as [`UPLINK_TC`].
    pub const UPLINK_XDP: &str = "uplink_xdp";
    /// TC (tcx) ingress on a container's host-side veth: reverse DNAT, SNAT.
    pub const CONTAINER_TC: &str = "container_tc";
    /// cgroup_skb egress on a rate-limited container's cgroup.
    pub const RATE_EGRESS: &str = "rate_egress";
    /// cgroup_skb ingress on a rate-limited container's cgroup.
    pub const RATE_INGRESS: &str = "rate_ingress";
    /// sock_ops on a rate-limited container's cgroup: pacing of TCP senders
    /// (egress) and receive windows of TCP receivers (ingress).
    pub const RATE_SOCKOPS: &str = "rate_sockops";
}

/// Default capacities. The agent may size maps differently at load time.
pub mod capacity {
    /// Published (host IP, protocol, port) triples.
    pub const SERVICES: u32 = 65_536;
    /// Containers on one node.
    pub const ENDPOINTS: u32 = 4_096;
    /// Node addresses.
    pub const NODE_ADDRS: u32 = 64;
    /// Conntrack entries (two per flow).
    pub const CONNTRACK: u32 = 262_144;
    /// Rate-limited (cgroup, direction) pairs.
    pub const RATE_LIMITS: u32 = 8_192;
}

/// IP protocol numbers used as [`ServiceKey::proto`] and [`CtKey::proto`].
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Global configuration, entry 0 of the [`names::CONFIG`] array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// The node's primary address: masquerade source, wildcard publish target.
    pub node_addr: [u8; 4],
    /// The container pool's network address.
    pub pool_addr: [u8; 4],
    /// The container pool's netmask.
    pub pool_mask: [u8; 4],
    /// The address of every host-side veth (the containers' gateway).
    pub gateway_addr: [u8; 4],
    /// The uplink's ifindex in the agent's network namespace.
    pub uplink_ifindex: u32,
    /// First port (host order) of the masquerade port range.
    pub snat_port_min: u16,
    /// Last port (host order) of the masquerade port range.
    pub snat_port_max: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Explicit tail padding.
    pub _pad: u32,
}

/// [`Config::flags`]: masquerade container egress to outside the pool.
pub const CONFIG_F_SNAT: u32 = 1 << 0;
/// [`Config::flags`]: let the uplink reach container addresses directly.
pub const CONFIG_F_ALLOW_DIRECT_ROUTING: u32 = 1 << 1;
/// [`Config::flags`]: the configuration has been written by an agent.
pub const CONFIG_F_READY: u32 = 1 << 31;

impl Config {
    /// Whether `addr` lies in the container pool.
    #[inline(always)]
    pub fn in_pool(&self, addr: [u8; 4]) -> bool {
        let a = u32::from_ne_bytes(addr);
        let m = u32::from_ne_bytes(self.pool_mask);
        a & m == u32::from_ne_bytes(self.pool_addr) & m
    }
}

/// Key of the published-ports map: the address and port a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    /// Host address the port is published on; `[0, 0, 0, 0]` means every
    /// address in [`names::NODE_ADDRS`].
    pub addr: [u8; 4],
    /// Host port, host order.
    pub port: u16,
    /// IP protocol ([`proto`]).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}

/// Value of the published-ports map: where the port leads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// Container address.
    pub backend_addr: [u8; 4],
    /// Container port, host order.
    pub backend_port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
    /// The container's host-side veth ifindex.
    pub ifindex: u32,
    /// The agent's number for the container (see [`Endpoint::container_id`]).
    pub container_id: u32,
}

/// Key of the endpoints map: a container's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct EndpointKey {
    /// The container's address.
    pub addr: [u8; 4],
}

/// A container on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// The host-side veth's ifindex.
    pub ifindex: u32,
    /// The agent's number for this container; conntrack entries carry it so
    /// that a container's flows can be found and flushed.
    pub container_id: u32,
    /// MAC address of the container's interface.
    pub mac: [u8; 6],
    /// MAC address of the host-side veth.
    pub host_mac: [u8; 6],
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
}

/// Key of the node addresses map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NodeAddrKey {
    /// One of the node's addresses.
    pub addr: [u8; 4],
}

/// Value of the node addresses map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NodeAddr {
    /// Interface the address is on.
    pub ifindex: u32,
}

/// A connection-tracking key: one direction of a flow as seen on the wire.
///
/// For ICMP echo the identifier stands in for the port: an echo request has
/// `sport = id, dport = 0`, an echo reply `sport = 0, dport = id`, so the
/// reply's key is the request's with addresses and ports swapped, like TCP's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    /// Source address.
    pub saddr: [u8; 4],
    /// Destination address.
    pub daddr: [u8; 4],
    /// Source port (ICMP echo: id of a request, 0 for a reply), host order.
    pub sport: u16,
    /// Destination port (ICMP echo: 0 for a request, id of a reply), host order.
    pub dport: u16,
    /// IP protocol ([`proto`]).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}

impl CtKey {
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

    /// Whether `action` rewrites the source (else the destination).
    #[inline(always)]
    pub const fn rewrites_source(action: u8) -> bool {
        matches!(action, REV_DNAT | SNAT)
    }

    /// A short name for listings.
    pub const fn name(action: u8) -> &'static str {
        match action {
            DNAT => "dnat",
            REV_DNAT => "rev-dnat",
            SNAT => "snat",
            REV_SNAT => "rev-snat",
            ROUTED => "routed",
            _ => "unknown",
        }
    }
}

/// [`CtEntry::flags`]: this entry was created for the flow's first packet
/// (the original direction); its peer is the reply direction.
pub const CT_F_ORIGINAL: u32 = 1 << 0;
/// [`CtEntry::flags`]: a packet has matched this entry after creation.
pub const CT_F_SEEN: u32 = 1 << 1;

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
/// [`CtEntry::peer_key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// The address that replaces the source (or destination, see
    /// [`ct_action::rewrites_source`]).
    pub nat_addr: [u8; 4],
    /// The port (ICMP: echo id) that replaces the source or destination port.
    pub nat_port: u16,
    /// [`ct_action`].
    pub action: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Where translated packets are sent: a host-side veth (towards a
    /// container) or the uplink.
    pub ifindex: u32,
    /// The container the flow belongs to.
    pub container_id: u32,
    /// OR of the TCP flags seen in this direction ([`tcp_flags`]).
    pub tcp_flags: u32,
    /// `CT_F_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_ns` at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    /// Packets seen in this direction.
    pub packets: u64,
    /// Bytes (IP total length) seen in this direction.
    pub bytes: u64,
}

impl CtEntry {
    /// The key of the other direction of the flow, given this entry's key.
    ///
    /// The packets of the other direction carry the translated tuple,
    /// reversed: for a DNAT entry `client → node:hp` translated to
    /// `client → ctr:cp`, the reply is `ctr:cp → client`.
    #[inline(always)]
    pub fn peer_key(&self, key: &CtKey) -> CtKey {
        let mut t = *key;
        if ct_action::rewrites_source(self.action) {
            t.saddr = self.nat_addr;
            t.sport = self.nat_port;
        } else {
            t.daddr = self.nat_addr;
            t.dport = self.nat_port;
        }
        t.reversed()
    }
}

const _: () = {
    assert!(size_of::<Config>() == 32);
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 16);
    assert!(size_of::<EndpointKey>() == 4);
    assert!(size_of::<Endpoint>() == 24);
    assert!(size_of::<NodeAddrKey>() == 4);
    assert!(size_of::<NodeAddr>() == 4);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtEntry>() == 56);
};

#[cfg(feature = "user")]
mod user {
    //! aya needs its own marker trait for map keys and values.
    use super::*;

    // SAFETY: all of these are `bytemuck::Pod`: `#[repr(C)]`, no padding,
    // every bit pattern valid.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for NodeAddrKey {}
    unsafe impl aya::Pod for NodeAddr {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnat_peer_key_is_the_reply_from_the_container() {
        let key = CtKey {
            saddr: [198, 18, 0, 1],
            daddr: [198, 18, 0, 2],
            sport: 40000,
            dport: 8080,
            proto: proto::TCP,
            _pad: [0; 3],
        };
        let entry = CtEntry {
            nat_addr: [198, 19, 0, 5],
            nat_port: 80,
            action: ct_action::DNAT,
            ..Default::default()
        };
        let peer = entry.peer_key(&key);
        assert_eq!(peer.saddr, [198, 19, 0, 5]);
        assert_eq!(peer.sport, 80);
        assert_eq!(peer.daddr, [198, 18, 0, 1]);
        assert_eq!(peer.dport, 40000);
    }

    #[test]
    fn snat_peer_key_is_the_reply_to_the_node() {
        let key = CtKey {
            saddr: [198, 19, 0, 5],
            daddr: [198, 18, 0, 1],
            sport: 5555,
            dport: 53,
            proto: proto::UDP,
            _pad: [0; 3],
        };
        let entry = CtEntry {
            nat_addr: [198, 18, 0, 2],
            nat_port: 61000,
            action: ct_action::SNAT,
            ..Default::default()
        };
        let peer = entry.peer_key(&key);
        assert_eq!(
            (peer.saddr, peer.sport, peer.daddr, peer.dport),
            ([198, 18, 0, 1], 53, [198, 18, 0, 2], 61000)
        );
    }

    #[test]
    fn pool_membership_uses_the_mask() {
        let cfg = Config {
            pool_addr: [198, 19, 0, 0],
            pool_mask: [255, 255, 255, 0],
            ..Default::default()
        };
        assert!(cfg.in_pool([198, 19, 0, 77]));
        assert!(!cfg.in_pool([198, 19, 1, 77]));
    }
}
