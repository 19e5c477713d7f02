//! Published ports: the rules a published port must follow, its entries in
//! the SERVICES map, and publishing or unpublishing ports of a running
//! container.

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
    net::link::Netlink,
    store::{Container, Store},
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

/// Checks that container `name` may publish `publish`: no masquerade port,
/// not the overlay's port in cluster mode, only addresses of this node, no
/// overlap within the request or with another container's ports.
pub fn check(
    node: &Node,
    store: &Store,
    name: &str,
    publish: &[PortMapping],
) -> Result<(), AgentError> {
    let (lo, hi) = node.cfg.snat_ports;
    for (i, m) in publish.iter().enumerate() {
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
        if let (Some(ip), Some(up)) = (m.host_ip, &node.uplink)
            && !up.node_addrs.contains(&ip)
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
        if let Some(other) = publish[..i].iter().find(|o| o.overlaps(m)) {
            return Err(AgentError::BadRequest(format!(
                "{m} overlaps {other} in the same request"
            )));
        }
        for c in store.containers().values().filter(|c| c.name != name) {
            if let Some(other) = c.publish.iter().find(|o| o.overlaps(m)) {
                return Err(AgentError::Conflict(format!(
                    "cannot publish {m}: {other} is already published by container {:?}",
                    c.name
                )));
            }
        }
    }
    Ok(())
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
        super::status::container_info(c, self.node.cfg.gateway(), self.reader)
    }

    fn container(&self, name: &str) -> Result<Container, AgentError> {
        self.store
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::no_container(name))
    }

    /// Publishes one more port (or range) of an existing container, as one
    /// transaction. Publishing what it already publishes succeeds
    /// unchanged.
    pub async fn publish(&mut self, name: &str, spec: &str) -> Result<ContainerInfo, AgentError> {
        let m: PortMapping = spec
            .parse()
            .map_err(|e: SpecError| AgentError::BadRequest(e.to_string()))?;
        let c = self.container(name)?;
        if c.publish.contains(&m) {
            return Ok(self.info(&c));
        }
        if let Some(other) = c.publish.iter().find(|o| o.overlaps(&m)) {
            return Err(AgentError::Conflict(format!(
                "cannot publish {m}: container {name:?} already publishes {other}"
            )));
        }
        check(self.node, self.store, name, std::slice::from_ref(&m))?;
        let ifindex = self
            .dp
            .endpoint(c.addr)
            .map_err(internal("read the endpoint"))?
            .ok_or_else(|| {
                AgentError::Internal(format!("container {name:?} has no endpoint in the maps"))
            })?
            .ifindex;
        let mut tx = Transaction::new();
        match self.add_port(&mut tx, c, m, ifindex) {
            Ok(c) => {
                tx.commit();
                tracing::info!(container = %name, publish = %m, "port published");
                Ok(self.info(&c))
            }
            Err(e) => {
                tx.roll_back(self.dp, self.net, self.store).await;
                Err(e)
            }
        }
    }

    /// The steps of `publish`: the SERVICES entries, then the record, saved.
    fn add_port(
        &mut self,
        tx: &mut Transaction,
        mut c: Container,
        m: PortMapping,
        ifindex: u32,
    ) -> Result<Container, AgentError> {
        insert_services(self.dp, tx, &c, std::slice::from_ref(&m), ifindex)?;
        c.publish.push(m);
        let previous = self.store.put(c.clone());
        tx.did(Step::Record {
            name: c.name.clone(),
            previous: previous.map(Box::new),
        });
        self.store.save()?;
        Ok(c)
    }

    /// Stops publishing one port (or range) of a container. Established
    /// TCP connections keep their container; new connections are no
    /// longer translated. UDP has no connections: its flows through the
    /// port are removed (as kube-proxy does), so that a client that keeps
    /// sending reaches whatever the port is published to next instead of
    /// this container for as long as it sends. Unpublishing what is not
    /// published succeeds.
    pub async fn unpublish(&mut self, name: &str, spec: &str) -> Result<ContainerInfo, AgentError> {
        let m: PortMapping = spec
            .parse()
            .map_err(|e: SpecError| AgentError::BadRequest(e.to_string()))?;
        let mut c = self.container(name)?;
        let Some(pos) = c.publish.iter().position(|o| *o == m) else {
            return Ok(self.info(&c));
        };
        c.publish.remove(pos);
        // The record first: once it is saved, the port is no longer the
        // container's, whatever happens to its entries.
        let mut tx = Transaction::new();
        let previous = self.store.put(c.clone());
        tx.did(Step::Record {
            name: c.name.clone(),
            previous: previous.map(Box::new),
        });
        if let Err(e) = self.store.save() {
            tx.roll_back(self.dp, self.net, self.store).await;
            return Err(e.into());
        }
        tx.commit();
        for (hp, _) in m.ports() {
            self.dp.remove_service(&service_key(&m, hp), c.id);
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
        tracing::info!(container = %name, publish = %m, "port unpublished");
        Ok(self.info(&c))
    }
}
