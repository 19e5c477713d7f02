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
    /// [`crate::CtKey`] → [`crate::CtEntry`]: confirmed flows (established
    /// TCP, UDP and ICMP streams), both directions; expired by timers.
    pub const CT: &str = "CT";
    /// [`crate::CtKey`] → [`crate::CtEntry`] (LRU): unconfirmed flows
    /// (handshakes, unreplied and single-exchange UDP, closing TCP).
    pub const CT_NEW: &str = "CT_NEW";
    /// [`crate::FragKey`] → [`crate::FragEntry`] (LRU): the ports of
    /// fragmented datagrams, for their later fragments.
    pub const CT_FRAGS: &str = "CT_FRAGS";
    /// Container id → [`crate::CtContainer`]: each container's share of
    /// [`CT`] and what it was refused.
    pub const CT_CONTAINERS: &str = "CT_CONTAINERS";
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
    /// Per-CPU [`crate::monitor::ContainerStats`] indexed by
    /// [`crate::monitor::slot`]: each container's packets and bytes.
    pub const CONTAINER_STATS: &str = "CONTAINER_STATS";
    /// [`crate::monitor::ContainerDrops`] indexed by
    /// [`crate::monitor::slot`]: each container's drops by reason.
    pub const CONTAINER_DROPS: &str = "CONTAINER_DROPS";
    /// Hash of a container's host-side veth (`u32` ifindex) → its id
    /// (`u32`): read only for a packet a container sent that is dropped
    /// before its address is known (an IPv6 router advertisement, a
    /// malformed header), to count the drop as the container's.
    pub const CONTAINER_VETHS: &str = "CONTAINER_VETHS";
    /// Ring buffer of [`crate::monitor::Event`]s: drops and flows, written
    /// only while the monitor is on ([`super::CONFIG_F_MONITOR_DROPS`],
    /// [`super::CONFIG_F_MONITOR_FLOWS`]).
    pub const EVENTS: &str = "EVENTS";
    /// Node CIDR (an LPM trie key of a `[u8; 4]` address) → [`super::Peer`]:
    /// the node CIDRs of the other nodes of the cluster and where their
    /// overlay endpoints are.
    pub const PEERS: &str = "PEERS";
    /// LPM trie of IPv4 prefixes (a `u32` prefix length, then four address
    /// bytes in wire order) → `u8` 1: destinations container traffic keeps
    /// its source address for (`--non-masquerade-cidr`): it goes to the
    /// node's stack untranslated.
    pub const NON_MASQUERADE: &str = "NON_MASQUERADE";
    /// [`crate::ratelimit::RateKey`] (ingress) →
    /// [`crate::ratelimit::RateFlows`]: the TCP sockets sharing an ingress
    /// limit's receive windows.
    pub const RATE_FLOWS: &str = "RATE_FLOWS";
    /// [`crate::clock::TestClock`] array (one entry): zero in production;
    /// packet tests freeze the programs' time with it. Not pinned.
    pub const CLOCK: &str = "CLOCK";
    /// [`super::SockRevKey`] → [`super::SockRevValue`] (LRU): for each node
    /// socket the socket programs sent to a container instead of a
    /// published port, the address it dialed (what `getpeername` and
    /// `recvmsg` show).
    pub const SOCK_REV: &str = "SOCK_REV";

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 20] = [
        CONFIG,
        SERVICES,
        ENDPOINTS,
        NODE_ADDRS,
        CT,
        CT_NEW,
        CT_FRAGS,
        CT_CONTAINERS,
        STATS,
        RATE_LIMITS,
        RATE_STATS,
        RATE_CGROUPS,
        CONTAINER_STATS,
        CONTAINER_DROPS,
        CONTAINER_VETHS,
        EVENTS,
        PEERS,
        NON_MASQUERADE,
        RATE_FLOWS,
        SOCK_REV,
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
    /// TC (tcx) ingress on the overlay (VXLAN) device: decapsulated
    /// packets delivered straight into their container.
    pub const OVERLAY_TC: &str = "overlay_tc";
    /// TC (tcx) egress on the overlay (VXLAN) device: the tunnel key of
    /// the node's own packets for containers on other nodes.
    pub const OVERLAY_EGRESS_TC: &str = "overlay_egress_tc";
    /// Run by the agent with `BPF_PROG_TEST_RUN` (never attached): removes
    /// the flows a [`crate::FlushRequest`] names, in the kernel, so that
    /// the per-container accounting stays exact.
    pub const CT_FLUSH: &str = "ct_flush";
    /// cgroup connect4 on the node's cgroup (`--socket-cgroup`): a node
    /// socket connecting to a published port connects to the container.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup sendmsg4: a node UDP datagram to a published port goes to
    /// the container.
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup recvmsg4: a datagram from the container reads as coming from
    /// the published address the socket sent to.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup getpeername4: a socket connected through a published port
    /// shows the published address as its peer.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// cgroup connect6: [`SOCK_CONNECT4`] for dual-stack sockets dialing an
    /// IPv4-mapped address.
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    /// cgroup sendmsg6: [`SOCK_SENDMSG4`] for dual-stack sockets.
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    /// cgroup recvmsg6: [`SOCK_RECVMSG4`] for dual-stack sockets.
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    /// cgroup getpeername6: [`SOCK_GETPEERNAME4`] for dual-stack sockets.
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
}

/// Default capacities. The agent may size maps differently at load time.
pub mod capacity {
    /// Published (host IP, protocol, port) triples.
    pub const SERVICES: u32 = 65_536;
    /// Containers on one node.
    pub const ENDPOINTS: u32 = 4_096;
    /// Node addresses.
    pub const NODE_ADDRS: u32 = 64;
    /// Entries of the main conntrack table (two per flow).
    pub const CT: u32 = 262_144;
    /// Entries of the table of unconfirmed flows (two per flow).
    pub const CT_NEW: u32 = 65_536;
    /// Fragmented datagrams in flight.
    pub const CT_FRAGS: u32 = 8_192;
    /// Containers with flows in the main table.
    pub const CT_CONTAINERS: u32 = 8_192;
    /// Rate-limited (cgroup, direction) pairs.
    pub const RATE_LIMITS: u32 = 8_192;
    /// Other nodes of a cluster.
    pub const PEERS: u32 = 4_096;
    /// Non-masquerade destination prefixes.
    pub const NON_MASQUERADE: u32 = 64;
    /// Node sockets translated by the socket programs whose dialed address
    /// is remembered (LRU: the oldest are forgotten first).
    pub const SOCK_REV: u32 = 65_536;
}

/// The overlay between the nodes of a cluster: VXLAN (RFC 7348).
pub mod overlay {
    /// The UDP port VXLAN packets are sent to (IANA's).
    pub const PORT: u16 = 4789;
    /// The VXLAN network identifier of the container network.
    pub const VNI: u32 = 1;
    /// Bytes the encapsulation adds to an inner packet: outer IPv4 (20),
    /// UDP (8), VXLAN (8) and inner Ethernet (14) headers.
    pub const OVERHEAD: u32 = 50;
}

/// IP protocol numbers used as [`ServiceKey::proto`] and [`crate::CtKey::proto`].
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
    /// The most entries of [`names::CT`] one container's flows may hold
    /// (0: no limit). Flows beyond it stay in [`names::CT_NEW`].
    pub ct_container_max: u32,
    /// Conntrack idle timeouts.
    pub timeouts: crate::ct::Timeouts,
    /// The network namespace cookie of the node (the agent's namespace):
    /// the socket programs translate only sockets of this namespace, so a
    /// port published on the node's loopback never appears on a container's
    /// own. 0: not known (every namespace's sockets are translated).
    pub node_netns_cookie: u64,
    /// The cluster's container network address (with [`CONFIG_F_CLUSTER`]):
    /// destinations in it are never masqueraded.
    pub cluster_addr: [u8; 4],
    /// The cluster's container network netmask.
    pub cluster_mask: [u8; 4],
    /// The overlay (VXLAN) device's ifindex (with [`CONFIG_F_CLUSTER`]).
    pub overlay_ifindex: u32,
    /// Explicit padding, always zero.
    pub _pad_cluster: [u8; 4],
}

/// [`Config::flags`]: masquerade container egress to outside the pool.
pub const CONFIG_F_SNAT: u32 = 1 << 0;
/// [`Config::flags`]: let the uplink reach container addresses directly.
pub const CONFIG_F_ALLOW_DIRECT_ROUTING: u32 = 1 << 1;
/// [`Config::flags`]: route container egress by the node's FIB
/// (`bpf_fib_lookup`): masquerade only what leaves through the uplink,
/// leave local, broadcast and otherwise routed destinations to the node's
/// stack, check the egress MTU. Without it (packet tests), everything
/// leaving the pool is masqueraded out of the uplink.
pub const CONFIG_F_FIB: u32 = 1 << 2;
/// [`Config::flags`]: before redirecting a packet to the interface its flow
/// cached, check that the interface still exists (a flow outliving its
/// container's veth is removed and counted, not redirected into nothing).
/// Without it (packet tests, whose interface indexes are made up), the
/// cached interface is trusted.
pub const CONFIG_F_CHECK_LINKS: u32 = 1 << 3;
/// [`Config::flags`]: the node is part of a cluster: packets from a
/// container to the cluster network outside this node's pool go to the node
/// owning the destination through the overlay ([`names::PEERS`]), never
/// masqueraded.
pub const CONFIG_F_CLUSTER: u32 = 1 << 4;
/// [`Config::flags`]: the monitor is on for drops: every dropped packet is
/// written to the [`names::EVENTS`] ring buffer (within
/// [`crate::monitor::MONITOR_BURST`]). Off, the programs write nothing there.
pub const CONFIG_F_MONITOR_DROPS: u32 = 1 << 5;
/// [`Config::flags`]: the monitor is on for flows: new, closed and expired
/// flows are written to the [`names::EVENTS`] ring buffer.
pub const CONFIG_F_MONITOR_FLOWS: u32 = 1 << 6;
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

    /// Whether `addr` lies in the cluster's container network (never, if
    /// the node is not part of a cluster).
    #[inline(always)]
    pub fn in_cluster(&self, addr: [u8; 4]) -> bool {
        let a = u32::from_ne_bytes(addr);
        let m = u32::from_ne_bytes(self.cluster_mask);
        self.flags & CONFIG_F_CLUSTER != 0 && a & m == u32::from_ne_bytes(self.cluster_addr) & m
    }
}

/// Another node of the cluster: where packets to its node CIDR go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Peer {
    /// The node's underlay address: the outer destination of the overlay.
    pub underlay: [u8; 4],
    /// The VXLAN network identifier to send with.
    pub vni: u32,
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

/// Whether `addr` is an IPv4 loopback address (127.0.0.0/8): published
/// ports on it (`-p 127.0.0.1:8080:80`) are reached only from the node's
/// own sockets, never by a packet.
#[inline(always)]
pub const fn is_loopback(addr: [u8; 4]) -> bool {
    addr[0] == 127
}

/// Key of [`names::SOCK_REV`]: a socket (its cookie) and the container
/// address and port it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// The container address.
    pub addr: [u8; 4],
    /// The container port, host order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}

/// Value of [`names::SOCK_REV`]: the published address and port the socket
/// dialed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRevValue {
    /// The dialed address.
    pub addr: [u8; 4],
    /// The dialed port, host order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
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

/// What the [`programs::CT_FLUSH`] program removes. It is run with
/// `BPF_PROG_TEST_RUN` on [`FlushRequest::frame`]: the request follows an
/// (all-zero) Ethernet header, which a TC test run requires.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlushRequest {
    /// The container whose flows go (with [`FLUSH_F_CONTAINER`]).
    pub container_id: u32,
    /// `FLUSH_F_*` bits; none: every flow.
    pub flags: u32,
    /// The published port whose flows go (with [`FLUSH_F_SERVICE`]), host
    /// order.
    pub port: u16,
    /// Its protocol ([`crate::proto`]).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// The masquerade address whose flows go (with
    /// [`FLUSH_F_MASQUERADE`]); an IPv4 address in the first four bytes.
    pub addr: [u8; 16],
}

/// [`FlushRequest::flags`]: only the flows of [`FlushRequest::container_id`].
pub const FLUSH_F_CONTAINER: u32 = 1 << 0;
/// [`FlushRequest::flags`]: only the flows that came in through published
/// port [`FlushRequest::port`]/[`FlushRequest::proto`] (DNAT).
pub const FLUSH_F_SERVICE: u32 = 1 << 1;
/// [`FlushRequest::flags`]: only the flows masqueraded as
/// [`FlushRequest::addr`] (the node's address changed).
pub const FLUSH_F_MASQUERADE: u32 = 1 << 2;
/// [`FlushRequest::flags`]: remove nothing; arm the expiry timer of every
/// confirmed flow whose timer is not armed (flows copied into a table of
/// another size by the agent, which cannot arm timers). The program
/// returns how many it armed.
pub const FLUSH_F_ARM: u32 = 1 << 3;

impl FlushRequest {
    /// Offset of the request in the frame.
    pub const OFFSET: usize = 14;

    /// The frame to run the flush program on.
    pub fn frame(&self) -> [u8; Self::OFFSET + size_of::<Self>()] {
        let mut f = [0u8; Self::OFFSET + size_of::<Self>()];
        f[Self::OFFSET..].copy_from_slice(bytemuck::bytes_of(self));
        f
    }
}

const _: () = {
    assert!(size_of::<Config>() == 80);
    assert!(size_of::<Peer>() == 8);
    assert!(size_of::<SockRevKey>() == 16);
    assert!(size_of::<SockRevValue>() == 8);
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 16);
    assert!(size_of::<EndpointKey>() == 4);
    assert!(size_of::<Endpoint>() == 24);
    assert!(size_of::<NodeAddrKey>() == 4);
    assert!(size_of::<NodeAddr>() == 4);
    assert!(size_of::<FlushRequest>() == 28);
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
    unsafe impl aya::Pod for Peer {}
}

#[cfg(test)]
mod tests {
    use super::*;

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
