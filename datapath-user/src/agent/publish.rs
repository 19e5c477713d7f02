//! Published ports: the rules a published port must follow, its entries in
//! the SERVICES map, and publishing or unpublishing ports of a running
//! container.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use datapath_common::{ServiceKey, ServiceValue};

use super::{
    AgentError, Node, internal,
    transaction::{Step, Transaction},
};
use crate::{
    api::ContainerInfo,
    datapath::{Datapath, Flows, Reader},
    model::{
        PortMapping,
        ports::{Protocol, SpecError},
    },
    net::{link::Netlink, sockets},
    store::{Change, Container, State, Store},
};

/// The SERVICES key of host port `port` of mapping `m`.
pub fn service_key(m: &PortMapping, port: u16) -> ServiceKey {
    ServiceKey {
        addr: m.host_ip.map_or([0; 4], |ip| ip.octets()),
        port,
        proto: m.protocol.number(),
        _pad: 0,
    }
}

/// Checks that container `name` may publish `publish` (none of which it
/// publishes yet): no masquerade port, not the overlay's port in cluster mode, only
/// addresses of this node (its loopback included), no
/// overlap within the request or with ports already published (its own
/// or another container's), and (unless `force`) no port a process of the
/// node listens on. O(log n) per mapping in the ports published.
pub fn check(
    node: &Node,
    state: &State,
    name: &str,
    publish: &[PortMapping],
    force: bool,
) -> Result<(), AgentError> {
    let (lo, hi) = node.cfg.snat_ports;
    // The request's own mappings are checked against each other through a
    // copy of the index (O(1) to make) that takes them one by one.
    let mut ports = state.ports().clone();
    let requester: Arc<str> = Arc::from(REQUEST);
    for m in publish {
        if m.host_port <= hi && lo <= m.host_end() {
            return Err(AgentError::BadRequest(format!(
                "cannot publish {m}: host ports {lo}-{hi} are reserved for masquerading (--snat-ports)"
            )));
        }
        let overlay = datapath_common::overlay::PORT;
        if node.cfg.cluster.is_some()
            && m.protocol == Protocol::Udp
            && m.host_port <= overlay
            && overlay <= m.host_end()
        {
            return Err(AgentError::BadRequest(format!(
                "cannot publish {m}: UDP port {overlay} carries the cluster's overlay (VXLAN)"
            )));
        }
        // The node's loopback is published to the node's own processes
        // (the socket programs), never to packets.
        if let (Some(ip), Some(up)) = (m.host_ip, &node.uplink)
            && !up.node_addrs.contains(&ip)
            && !ip.is_loopback()
        {
            return Err(AgentError::BadRequest(format!(
                "cannot publish {m}: {ip} is not an address of this node ({})",
                up.node_addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        match ports.overlap(m) {
            None => {}
            Some((REQUEST, other)) => {
                return Err(AgentError::BadRequest(format!(
                    "{m} overlaps {other} in the same request"
                )));
            }
            Some((owner, other)) if owner == name => {
                return Err(AgentError::Conflict(format!(
                    "cannot publish {m}: container {name:?} already publishes {other}"
                )));
            }
            Some((owner, other)) => {
                return Err(AgentError::Conflict(format!(
                    "cannot publish {m}: {other} is already published by container {owner:?}"
                )));
            }
        }
        ports.insert(&requester, m).map_err(AgentError::Internal)?;
    }
    if !force {
        check_node_listeners(publish)?;
    }
    Ok(())
}

/// Refuses a mapping whose host port a process of the node receives on
/// (like Docker's "port is already allocated"): the published port would
/// take that process's traffic.
fn check_node_listeners(publish: &[PortMapping]) -> Result<(), AgentError> {
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let mappings: Vec<&PortMapping> =
            publish.iter().filter(|m| m.protocol == protocol).collect();
        if mappings.is_empty() {
            continue;
        }
        let receivers = match sockets::receivers(protocol.number()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot list the node's {protocol} sockets: {e}");
                continue;
            }
        };
        for m in mappings {
            let taken = receivers.iter().find(|r| {
                (m.host_port..=m.host_end()).contains(&r.port())
                    && sockets::receives_for(r, m.host_ip.map(IpAddr::V4))
            });
            if let Some(r) = taken {
                return Err(AgentError::Conflict(format!(
                    "cannot publish {m}: port {}/{protocol} is already allocated: a process of the node listens on {r} (publish it anyway with --force)",
                    r.port()
                )));
            }
        }
    }
    Ok(())
}

/// The owner the request's own mappings are filed under while they are
/// checked (not a valid container name).
const REQUEST: &str = "/this request/";

/// Parses port specifications (Docker's `-p` syntax).
pub fn parse_specs(specs: &[String]) -> Result<Vec<PortMapping>, AgentError> {
    specs
        .iter()
        .map(|s| s.parse::<PortMapping>())
        .collect::<Result<Vec<_>, SpecError>>()
        .map_err(|e| AgentError::BadRequest(e.to_string()))
}

/// Adds the SERVICES entries of `mappings` of container `c`, whose host end
/// has index `ifindex`, each written down in `tx`.
pub fn insert_services(
    dp: &mut Datapath,
    tx: &mut Transaction,
    c: &Container,
    mappings: &[PortMapping],
    ifindex: u32,
) -> Result<(), AgentError> {
    for m in mappings {
        for (hp, cp) in m.ports() {
            let key = service_key(m, hp);
            dp.insert_service(
                key,
                ServiceValue {
                    backend_addr: c.addr.octets(),
                    backend_port: cp,
                    _pad: 0,
                    ifindex,
                    container_id: c.id,
                },
            )
            .map_err(internal("publish a port"))?;
            tx.did(Step::Service { key, id: c.id });
        }
    }
    Ok(())
}

/// Publishing on running containers, over the parts of the agent it
/// changes.
pub struct Ports<'a> {
    /// The node's configuration and uplink.
    pub node: &'a Node,
    /// The datapath's maps.
    pub dp: &'a mut Datapath,
    /// The netlink connection (for undoing a transaction).
    pub net: &'a Netlink,
    /// The desired state.
    pub store: &'a mut Store,
    /// The read-only view (for the answers' counters).
    pub reader: &'a Reader,
}

impl Ports<'_> {
    fn info(&self, c: &Container) -> ContainerInfo {
        super::status::container_info(
            c,
            self.node.cfg.gateway(),
            self.node.cfg.dual(),
            self.reader,
        )
    }

    /// Whether container `name` publishes exactly `m` already.
    fn publishes(&self, name: &str, m: &PortMapping) -> bool {
        self.store
            .state()
            .ports()
            .overlap(m)
            .is_some_and(|(owner, o)| owner == name && o == m)
    }

    fn container(&self, name: &str) -> Result<Arc<Container>, AgentError> {
        self.store
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::no_container(name))
    }

    /// Publishes more ports (or ranges) of an existing container, all in
    /// one transaction and one durable write: all of them or none.
    /// Mappings it already publishes are left as they are (publishing
    /// only those succeeds unchanged). A port a process of the node
    /// listens on is refused unless `force`.
    pub async fn publish(
        &mut self,
        name: &str,
        specs: &[String],
        force: bool,
    ) -> Result<ContainerInfo, AgentError> {
        let wanted = parse_specs(specs)?;
        let c = self.container(name)?;
        let mut new = Vec::with_capacity(wanted.len());
        let mut seen = HashSet::with_capacity(wanted.len());
        for m in wanted {
            // Already published by this container, or repeated in the
            // request: nothing to do for it.
            let published = self.publishes(name, &m);
            if !published && seen.insert(m) {
                new.push(m);
            }
        }
        if new.is_empty() {
            return Ok(self.info(&c));
        }
        check(self.node, self.store.state(), name, &new, force)?;
        let ifindex = self
            .dp
            .endpoint(c.addr)
            .map_err(internal("read the endpoint"))?
            .ok_or_else(|| {
                AgentError::Internal(format!("container {name:?} has no endpoint in the maps"))
            })?
            .ifindex;
        let mut tx = Transaction::new();
        match self.add_ports(&mut tx, &c, &new, ifindex) {
            Ok(()) => {
                tx.commit();
                tracing::info!(container = %name, ports = new.len(), first = %new[0], "ports published");
                let c = self.container(name)?;
                Ok(self.info(&c))
            }
            Err(e) => {
                tx.roll_back(self.dp, self.net).await;
                Err(e)
            }
        }
    }

    /// The steps of `publish`: the SERVICES entries, then the record.
    fn add_ports(
        &mut self,
        tx: &mut Transaction,
        c: &Container,
        new: &[PortMapping],
        ifindex: u32,
    ) -> Result<(), AgentError> {
        insert_services(self.dp, tx, c, new, ifindex)?;
        self.store.commit(vec![Change::Publish {
            name: c.name.clone(),
            ports: new.to_vec(),
        }])?;
        Ok(())
    }

    /// Stops publishing ports (or ranges) of a container, in one durable
    /// write. Established TCP connections keep their container; new
    /// connections are no longer translated. UDP has no connections: its
    /// flows through the ports are removed (as kube-proxy does), so that a
    /// client that keeps sending reaches whatever the port is published to
    /// next instead of this container for as long as it sends.
    /// Unpublishing what is not published succeeds.
    pub async fn unpublish(
        &mut self,
        name: &str,
        specs: &[String],
    ) -> Result<ContainerInfo, AgentError> {
        let wanted = parse_specs(specs)?;
        let c = self.container(name)?;
        let mut gone: Vec<PortMapping> = Vec::with_capacity(wanted.len());
        let mut seen = HashSet::with_capacity(wanted.len());
        for m in wanted {
            let published = self.publishes(name, &m);
            if published && seen.insert(m) {
                gone.push(m);
            }
        }
        if gone.is_empty() {
            return Ok(self.info(&c));
        }
        // The record first: once it is durable, the ports are no longer
        // the container's, whatever happens to their entries (an agent
        // cut off here removes them when it starts again).
        self.store.commit(vec![Change::Unpublish {
            name: name.to_owned(),
            ports: gone.clone(),
        }])?;
        for m in &gone {
            for (hp, _) in m.ports() {
                self.dp.remove_service(&service_key(m, hp), c.id);
                if m.protocol == Protocol::Udp {
                    let flows = Flows::Published {
                        container_id: c.id,
                        port: hp,
                        proto: m.protocol.number(),
                    };
                    if let Err(e) = self.dp.flush_flows(flows) {
                        tracing::warn!(container = %name, port = hp, "flush the port's flows: {e}");
                    }
                }
            }
        }
        tracing::info!(container = %name, ports = gone.len(), first = %gone[0], "ports unpublished");
        let c = self.container(name)?;
        Ok(self.info(&c))
    }
}
