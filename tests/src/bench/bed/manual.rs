//! Container networks made by hand with `ip`, for the modes that have no
//! agent: the same shape the agent builds (see `datapath::net::link`), so
//! that only the translation differs between modes.
//!
//! ```text
//!  container netns                    node netns
//!  eth0 <addr>/32 ──────veth────────  <host_if> <gateway>/32
//!  route <gateway> dev eth0           route <addr>/32 dev <host_if>
//!  default via <gateway>              ip_forward = 1
//! ```

use std::net::Ipv4Addr;

use crate::{netns::Netns, node::Node};

/// One hand-made container network.
#[derive(Clone, Debug)]
pub struct ManualLink {
    /// The host end's name in the node namespace.
    pub host_if: String,
    /// The container's address.
    pub addr: Ipv4Addr,
    /// The gateway (the host end's address, the container's default route).
    pub gateway: Ipv4Addr,
}

/// Turns on IPv4 forwarding in the node namespace.
pub fn enable_forwarding(node: &Node) {
    node.node
        .exec_ok("sysctl", ["-qw", "net.ipv4.ip_forward=1"]);
}

/// Creates `link`'s veth pair between the node and `ctr` (created directly
/// in the two namespaces) with its addresses and routes.
pub fn attach(node: &Node, ctr: &Netns, link: &ManualLink) {
    let n = &node.node;
    let host = link.host_if.as_str();
    let (addr, gw) = (link.addr.to_string(), link.gateway.to_string());
    n.add_veth(host, "eth0", ctr)
        .unwrap_or_else(|e| panic!("{e}"));
    n.exec_ok("ip", ["addr", "add", &format!("{gw}/32"), "dev", host]);
    n.exec_ok("ip", ["link", "set", host, "up"]);
    ctr.exec_ok("ip", ["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
    ctr.exec_ok("ip", ["link", "set", "eth0", "up"]);
    ctr.exec_ok("ip", ["route", "add", &gw, "dev", "eth0", "scope", "link"]);
    ctr.exec_ok("ip", ["route", "add", "default", "via", &gw, "dev", "eth0"]);
    n.exec_ok("ip", ["route", "add", &format!("{addr}/32"), "dev", host]);
}
