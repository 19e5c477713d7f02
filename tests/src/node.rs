//! A whole node built from network namespaces:
//!
//! ```text
//!  client netns                 node netns
//!  eth0 198.18.0.1/24 ──veth── up0 198.18.0.2/24     (+ one empty netns per container)
//! ```
//!
//! The veth pair is created directly inside the two namespaces (`ip -n`);
//! the root namespace is never touched. Container namespaces start empty:
//! the agent creates their veth pairs.
//!
//! ```no_run
//! use datapath_tests::node::Node;
//!
//! let node = Node::new();
//! assert!(node.client.ping(node.node_addr()));
//! let ctr = node.add_container_netns("web");
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
};

use crate::{names, netns::Netns};

/// The uplink's name in the node namespace.
pub const UPLINK: &str = "up0";
/// The client's interface name.
pub const CLIENT_IF: &str = "eth0";
/// The client's IPv6 address after [`Node::enable_ipv6`].
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The node's IPv6 address after [`Node::enable_ipv6`].
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// The bridge of a switch namespace ([`NodeBuilder::switch`]).
pub const SWITCH_BRIDGE: &str = "br0";

/// Options of a [`Node`].
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    client_addr: Ipv4Addr,
    node_addr: Ipv4Addr,
    prefix_len: u8,
    client_tx_offload: bool,
    switch: Option<PathBuf>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            client_addr: Ipv4Addr::new(198, 18, 0, 1),
            node_addr: Ipv4Addr::new(198, 18, 0, 2),
            prefix_len: 24,
            client_tx_offload: true,
            switch: None,
        }
    }
}

impl NodeBuilder {
    /// The client's address (default 198.18.0.1).
    pub fn client_addr(mut self, addr: Ipv4Addr) -> Self {
        self.client_addr = addr;
        self
    }

    /// The node's uplink address (default 198.18.0.2).
    pub fn node_addr(mut self, addr: Ipv4Addr) -> Self {
        self.node_addr = addr;
        self
    }

    /// The link's prefix length (default 24).
    pub fn prefix_len(mut self, len: u8) -> Self {
        self.prefix_len = len;
        self
    }

    /// Whether the client's eth0 keeps TX checksum offload (default yes).
    /// Native-XDP tests turn it off: a veth sender with offload hands over
    /// partial checksums that are wrong after an XDP redirect.
    pub fn client_tx_offload(mut self, on: bool) -> Self {
        self.client_tx_offload = on;
        self
    }

    /// Plugs the client and the node into a switch (a bridge
    /// [`SWITCH_BRIDGE`] in the namespace at `switch`) instead of joining
    /// them with one veth pair: nodes plugged into one switch share an
    /// underlay, and each client is a host on it.
    pub fn switch(mut self, switch: &Netns) -> Self {
        self.switch = Some(switch.path().to_owned());
        self
    }

    /// Builds the node.
    pub fn build(self) -> Node {
        for a in [self.client_addr, self.node_addr] {
            assert!(
                a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18,
                "test addresses come from 198.18.0.0/15: {a}"
            );
        }
        let id = names::unique_id();
        let client = Netns::new(&format!("{}{id}-cl", names::PREFIX));
        let node = Netns::new(&format!("{}{id}-nd", names::PREFIX));
        match &self.switch {
            None => client
                .add_veth(CLIENT_IF, UPLINK, &node)
                .unwrap_or_else(|e| panic!("{e}")),
            Some(path) => {
                let switch = Netns::attach(path);
                for (ns, ifname, port) in [(&client, CLIENT_IF, "c"), (&node, UPLINK, "n")] {
                    let port = format!("{id}{port}");
                    ns.add_veth(ifname, &port, &switch)
                        .unwrap_or_else(|e| panic!("{e}"));
                    switch.exec_ok("ip", ["link", "set", &port, "master", SWITCH_BRIDGE, "up"]);
                }
            }
        }
        let (c, n) = (
            format!("{}/{}", self.client_addr, self.prefix_len),
            format!("{}/{}", self.node_addr, self.prefix_len),
        );
        client.exec_ok("ip", ["addr", "add", &c, "dev", CLIENT_IF]);
        node.exec_ok("ip", ["addr", "add", &n, "dev", UPLINK]);
        client.exec_ok("ip", ["link", "set", CLIENT_IF, "up"]);
        node.exec_ok("ip", ["link", "set", UPLINK, "up"]);
        client.wait_link_up(CLIENT_IF);
        node.wait_link_up(UPLINK);
        if !self.client_tx_offload {
            client.exec_ok("ethtool", ["-K", CLIENT_IF, "tx", "off"]);
        }
        Node {
            id,
            client_addr: self.client_addr,
            node_addr: self.node_addr,
            prefix_len: self.prefix_len,
            client,
            node,
        }
    }
}

/// A client and a node joined by a veth pair; both namespaces are deleted
/// on drop.
#[derive(Debug)]
pub struct Node {
    id: String,
    client_addr: Ipv4Addr,
    node_addr: Ipv4Addr,
    prefix_len: u8,
    /// The client's namespace (interface [`CLIENT_IF`]).
    pub client: Netns,
    /// The node's namespace (uplink [`UPLINK`]), where the agent runs.
    pub node: Netns,
}

impl Node {
    /// A node with the default addresses (client 198.18.0.1, node
    /// 198.18.0.2, /24).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Options for a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// The id in every name of this node's resources (`dpt-<id>-…`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The client's address.
    pub fn client_addr(&self) -> Ipv4Addr {
        self.client_addr
    }

    /// The node's uplink address.
    pub fn node_addr(&self) -> Ipv4Addr {
        self.node_addr
    }

    /// The link's prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// `node address:port`: a published port as the client reaches it.
    pub fn node_port(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.node_addr, port))
    }

    /// `client address:port`: a server in the client namespace as
    /// containers reach it.
    pub fn client_port(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.client_addr, port))
    }

    /// Routes `cidr` (a container pool) from the client through the node,
    /// as a router upstream of a node could.
    pub fn route_from_client_via_node(&self, cidr: &str) {
        self.client.exec_ok(
            "ip",
            ["route", "add", cidr, "via", &self.node_addr.to_string()],
        );
    }

    /// Gives the node a default route through the client, the way a node
    /// has one through its uplink's gateway. Tests that flood from random
    /// source addresses need it: without a route, answers to those
    /// addresses are sent on the uplink as if on the link, one ARP entry
    /// each, and the kernel's ARP table is shared by every namespace of the
    /// machine (`gc_thresh3`, 1,024 entries): a full one breaks the address
    /// resolution of tests running beside the flood.
    pub fn default_route_via_client(&self) {
        self.node.exec_ok(
            "ip",
            [
                "route",
                "add",
                "default",
                "via",
                &self.client_addr.to_string(),
            ],
        );
    }

    /// Gives the link IPv6 addresses too: the client [`CLIENT_ADDR6`], the
    /// node [`NODE_ADDR6`] (a /64 of 2001:db8::/32, usable at once: no
    /// duplicate address detection). Call it before starting the agent,
    /// which reads the uplink's addresses at start.
    pub fn enable_ipv6(&self) {
        for (ns, ifname, addr) in [
            (&self.client, CLIENT_IF, CLIENT_ADDR6),
            (&self.node, UPLINK, NODE_ADDR6),
        ] {
            let a = format!("{addr}/64");
            ns.exec_ok("ip", ["-6", "addr", "add", &a, "dev", ifname, "nodad"]);
        }
    }

    /// Routes IPv6 `cidr` (a container pool) from the client through the
    /// node.
    pub fn route6_from_client_via_node(&self, cidr: &str) {
        self.client.exec_ok(
            "ip",
            ["-6", "route", "add", cidr, "via", &NODE_ADDR6.to_string()],
        );
    }

    /// An empty namespace `dpt-<id>-<name>` for a container; the caller
    /// owns it (drop it before the node, or let it go out of scope).
    pub fn add_container_netns(&self, name: &str) -> Netns {
        Netns::new(&format!("{}{}-{name}", names::PREFIX, self.id))
    }

    /// The uplink's ifindex in the node namespace.
    pub fn uplink_ifindex(&self) -> u32 {
        ifindex(&self.node, UPLINK)
    }

    /// The uplink's MAC address.
    pub fn uplink_mac(&self) -> [u8; 6] {
        mac(&self.node, UPLINK)
    }

    /// The client interface's MAC address.
    pub fn client_mac(&self) -> [u8; 6] {
        mac(&self.client, CLIENT_IF)
    }
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

/// The ifindex of interface `ifname` in `ns`; panics if there is none.
pub fn ifindex(ns: &Netns, ifname: &str) -> u32 {
    ns.exec_closure(|| nix::net::if_::if_nametoindex(ifname))
        .unwrap_or_else(|e| panic!("no interface {ifname} in {}: {e}", ns.name()))
}

/// The MAC address of interface `ifname` in `ns`; panics if there is none.
pub fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns.run(Command::new("ip").args(["-j", "link", "show", "dev", ifname]));
    assert!(
        out.status.success(),
        "no interface {ifname} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`ip -j link show` output: {e}"));
    let text = v[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for {ifname} in {v}"));
    parse_mac(text).unwrap_or_else(|| panic!("not a MAC address: {text}"))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}
