//! The pool is checked before the agent takes it: it must not contain an
//! address of the node or overlap a route the node already has (a
//! container would shadow them), and a restart must not change it (or
//! move the masquerade ports over a published port) while containers from
//! the old one exist. The pool and the masquerade ports are recorded in the
//! state.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use anyhow::bail;
use ipnet::Ipv4Net;

use super::AgentConfig;
use crate::{
    model::identity::VETH_GROUP,
    net::{inspect::RouteView, link::Netlink},
    store::State,
};

/// The node's view the pool is checked against: every IPv4 address with
/// its link's name, every main-table route with its link's name, and
/// whether that link is one of the agent's veths (whose gateway addresses
/// and container routes are in the pool by design).
#[derive(Debug, Default)]
pub struct NodeView {
    /// (link name, is the agent's, address).
    pub addrs: Vec<(String, bool, Ipv4Addr)>,
    /// (link name, is the agent's, route).
    pub routes: Vec<(String, bool, RouteView)>,
}

impl NodeView {
    /// Reads the agent's netns; links in the agent's group or named in
    /// `known` (containers' veths an older agent made) are the agent's.
    pub async fn read(net: &Netlink, known: &HashSet<String>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let links = net.links().await.context("list links")?;
        let by_index: HashMap<u32, (String, bool)> = links
            .into_iter()
            .map(|l| {
                let ours = l.group == VETH_GROUP || known.contains(&l.name);
                (l.index, (l.name, ours))
            })
            .collect();
        let name = |index: Option<u32>| {
            index
                .and_then(|i| by_index.get(&i).cloned())
                .unwrap_or_else(|| ("?".to_owned(), false))
        };
        let addrs = net
            .all_ipv4_addrs()
            .await
            .context("list addresses")?
            .into_iter()
            .map(|(index, addr, _)| {
                let (link, ours) = name(Some(index));
                (link, ours, addr)
            })
            .collect();
        let routes = net
            .all_ipv4_routes()
            .await
            .context("list routes")?
            .into_iter()
            .map(|(route, oif)| {
                let (link, ours) = name(oif);
                (link, ours, route)
            })
            .collect();
        Ok(Self { addrs, routes })
    }
}

/// Refuses `cfg`'s pool and masquerade ports if they conflict with the
/// node or with what `state` recorded (see the module's documentation).
pub fn check(cfg: &AgentConfig, state: &State, node: &NodeView) -> anyhow::Result<()> {
    let pool = cfg.pool;
    if let Some(old) = state.pool()
        && old != pool
        && !state.containers().is_empty()
    {
        bail!(
            "the state in {} has {} container(s) with addresses from the pool {old}, not {pool}: \
             restart with --pool {old}, or delete those containers first",
            cfg.state_dir.display(),
            state.containers().len()
        );
    }
    let (lo, hi) = cfg.snat_ports;
    if let Some((c, m)) = state.containers().values().find_map(|c| {
        c.publish
            .iter()
            .find(|m| m.host_port <= hi && m.host_end() >= lo)
            .map(|m| (c, m))
    }) {
        bail!(
            "container {:?} publishes {m}, inside the masquerade ports {lo}-{hi}: \
             give --snat-ports a range without published ports",
            c.name
        );
    }
    for (link, ours, addr) in &node.addrs {
        if !ours && pool.contains(addr) {
            bail!(
                "the pool {pool} contains {addr}, an address of {link} on this node: \
                 choose a --pool that no node address is in"
            );
        }
    }
    for (link, ours, route) in &node.routes {
        if !ours && route.dst.prefix_len() > 0 && overlaps(pool, route.dst) {
            bail!(
                "the pool {pool} overlaps the route to {} via {link} on this node: \
                 choose a --pool that no route covers",
                route.dst
            );
        }
    }
    Ok(())
}

/// Whether two prefixes share an address.
fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use datapath_common::ct::Timeouts;

    use super::*;
    use crate::agent::XdpMode;

    fn cfg(pool: &str) -> AgentConfig {
        AgentConfig {
            uplink: None,
            node_ip: None,
            pool: pool.parse().expect("a pool"),
            pool6: None,
            xdp_mode: XdpMode::Off,
            bpffs_dir: PathBuf::from("/x"),
            state_dir: PathBuf::from("/y"),
            snat_ports: (61000, 65535),
            masquerade: true,
            ct_max: None,
            ct_container_share: 50,
            allow_direct_routing: false,
            mtu: None,
            non_masquerade: Vec::new(),
            timeouts: Timeouts::default(),
            log_level: 3,
            metrics: None,
            bpf_stats: false,
            socket_cgroup: crate::agent::SocketCgroup::None,
            cluster: None,
        }
    }

    fn route(dst: &str) -> RouteView {
        RouteView {
            dst: dst.parse().expect("a prefix"),
            gateway: None,
            scope: 0,
        }
    }

    #[test]
    fn a_pool_over_a_node_address_or_route_is_refused() {
        let node = NodeView {
            addrs: vec![
                ("up0".into(), false, Ipv4Addr::new(198, 18, 0, 2)),
                ("dp1".into(), true, Ipv4Addr::new(198, 19, 0, 1)),
            ],
            routes: vec![
                ("up0".into(), false, route("198.18.0.0/24")),
                ("up0".into(), false, route("0.0.0.0/0")),
                ("dp1".into(), true, route("198.19.0.2/32")),
            ],
        };
        let state = State::default();
        check(&cfg("198.19.0.0/24"), &state, &node).expect("the agent's own are fine");
        let e = check(&cfg("198.18.0.0/16"), &state, &node).expect_err("holds the node's address");
        assert!(e.to_string().contains("198.18.0.2"), "{e}");
        let e = check(&cfg("198.18.0.128/25"), &state, &node).expect_err("under a route");
        assert!(e.to_string().contains("198.18.0.0/24"), "{e}");
    }

    #[test]
    fn a_restart_with_another_pool_is_refused_while_containers_exist() {
        let mut state =
            State::with_ranges("198.19.0.0/24".parse().expect("a pool"), (61000, 65535));
        let node = NodeView::default();
        check(&cfg("198.19.1.0/24"), &state, &node).expect("no containers: a new pool is fine");
        state
            .adopt(crate::store::Container {
                id: 1,
                name: "web".into(),
                netns: "/var/run/netns/x".into(),
                netns_id: None,
                ifname: "eth0".into(),
                host_ifname: "dp1".into(),
                addr: Ipv4Addr::new(198, 19, 0, 2),
                publish: vec!["8080:80".parse().expect("a mapping")],
                mac: String::new(),
                cgroup: None,
                cgroup_id: 0,
                limits: crate::model::RateLimits::default(),
                mtu: None,
            })
            .expect("a container in the pool");
        let e = check(&cfg("198.19.1.0/24"), &state, &node).expect_err("another pool");
        assert!(e.to_string().contains("--pool 198.19.0.0/24"), "{e}");
        check(&cfg("198.19.0.0/24"), &state, &node).expect("the same pool");
        let mut snat = cfg("198.19.0.0/24");
        snat.snat_ports = (8000, 9000);
        let e = check(&snat, &state, &node).expect_err("masquerade over a published port");
        assert!(e.to_string().contains("8080"), "{e}");
    }
}
