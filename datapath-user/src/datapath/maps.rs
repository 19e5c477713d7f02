//! Typed operations on the maps the agent fills: the global configuration,
//! the node's addresses, containers (ENDPOINTS) and published ports
//! (SERVICES). Entries carry the id of the container that owns them, and
//! removals take that id, so that no container removes another's entry.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use aya::maps::{IterableMap as _, MapError, lpm_trie::Key as LpmKey};
use datapath_common::{
    Config, Endpoint, EndpointKey, FLUSH_F_CONTAINER, FLUSH_F_MASQUERADE, FLUSH_F_SERVICE,
    FlushRequest, NodeAddr, NodeAddrKey, Peer, ServiceKey, ServiceValue, names, overlay,
};
use ipnet::Ipv4Net;

use super::{BpfError, Datapath};

/// Which tracked flows [`Datapath::flush_flows`] removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flows {
    /// Every flow.
    All,
    /// A container's flows.
    Container(u32),
    /// The flows that came in through one of a container's published
    /// ports.
    Published {
        /// The container.
        container_id: u32,
        /// The published port, host order.
        port: u16,
        /// Its protocol ([`datapath_common::proto`]).
        proto: u8,
    },
    /// The flows masqueraded as this address.
    Masqueraded(Ipv4Addr),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

impl Datapath {
    /// The global configuration (zero before the first
    /// [`Datapath::set_config`]).
    pub fn config(&self) -> Result<Config, BpfError> {
        self.config.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    /// Sets the global configuration.
    pub fn set_config(&mut self, config: Config) -> Result<(), BpfError> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// Makes the node's addresses exactly `addrs`, all on interface
    /// `ifindex`.
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr], ifindex: u32) -> Result<(), BpfError> {
        let stale: Vec<NodeAddrKey> = self.node_addrs.keys().filter_map(Result::ok).collect();
        for k in stale {
            if !addrs.contains(&Ipv4Addr::from(k.addr)) {
                let _ = self.node_addrs.remove(&k);
            }
        }
        for a in addrs {
            self.node_addrs
                .insert(NodeAddrKey { addr: a.octets() }, NodeAddr { ifindex }, 0)
                .map_err(map_err(names::NODE_ADDRS))?;
        }
        Ok(())
    }

    /// Makes the peers map exactly `peers` (node CIDR → underlay address):
    /// entries are replaced in place, stale ones removed after, so that a
    /// peer present before and after is never missing in between.
    pub fn set_peers(&mut self, peers: &[(Ipv4Net, Ipv4Addr)]) -> Result<(), BpfError> {
        for (cidr, underlay) in peers {
            let key = LpmKey::new(u32::from(cidr.prefix_len()), cidr.network().octets());
            let value = Peer {
                underlay: underlay.octets(),
                vni: overlay::VNI,
            };
            self.peers
                .insert(&key, value, 0)
                .map_err(map_err(names::PEERS))?;
        }
        let stale: Vec<LpmKey<[u8; 4]>> = self
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !peers.iter().any(|(c, _)| {
                    u32::from(c.prefix_len()) == k.prefix_len() && c.network().octets() == k.data()
                })
            })
            .collect();
        for k in stale {
            let _ = self.peers.remove(&k);
        }
        Ok(())
    }

    /// The peers map's entries.
    pub fn peers(&self) -> Vec<(Ipv4Net, Ipv4Addr)> {
        self.peers
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                let net =
                    Ipv4Net::new(Ipv4Addr::from(k.data()), u8::try_from(k.prefix_len()).ok()?)
                        .ok()?;
                Some((net, Ipv4Addr::from(v.underlay)))
            })
            .collect()
    }

    /// The container endpoint of address `addr`, if there is one.
    pub fn endpoint(&self, addr: Ipv4Addr) -> Result<Option<Endpoint>, BpfError> {
        match self.endpoints.get(&endpoint_key(addr), 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::ENDPOINTS)(e)),
        }
    }

    /// Adds (or replaces) the endpoint of address `addr`.
    pub fn insert_endpoint(&mut self, addr: Ipv4Addr, endpoint: Endpoint) -> Result<(), BpfError> {
        self.endpoints
            .insert(endpoint_key(addr), endpoint, 0)
            .map_err(map_err(names::ENDPOINTS))
    }

    /// Removes the endpoint of address `addr` if container `owner` owns it.
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr, owner: u32) {
        let key = endpoint_key(addr);
        if self
            .endpoints
            .get(&key, 0)
            .is_ok_and(|e| e.container_id == owner)
        {
            let _ = self.endpoints.remove(&key);
        }
    }

    /// Every endpoint, read in one pass over the map.
    pub fn endpoints(&self) -> Result<HashMap<Ipv4Addr, Endpoint>, BpfError> {
        self.endpoints
            .iter()
            .map(|e| e.map(|(k, v)| (Ipv4Addr::from(k.addr), v)))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::ENDPOINTS))
    }

    /// Removes the endpoint of address `addr`, whoever owns it.
    pub fn remove_endpoint_any(&mut self, addr: Ipv4Addr) {
        let _ = self.endpoints.remove(&endpoint_key(addr));
    }

    /// Adds (or replaces) the published port `key`.
    pub fn insert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), BpfError> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(names::SERVICES))
    }

    /// Every published port, read in one pass over the map.
    pub fn services(&self) -> Result<HashMap<ServiceKey, ServiceValue>, BpfError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::SERVICES))
    }

    /// Removes published port `key`, whoever owns it.
    pub fn remove_service_any(&mut self, key: &ServiceKey) {
        let _ = self.services.remove(key);
    }

    /// Removes published port `key` if container `owner` owns it (never a
    /// port another container publishes).
    pub fn remove_service(&mut self, key: &ServiceKey, owner: u32) {
        if self
            .services
            .get(key, 0)
            .is_ok_and(|v| v.container_id == owner)
        {
            let _ = self.services.remove(key);
        }
    }

    /// Removes the tracked flows `which` names in the kernel, which keeps
    /// the per-container counts exact and cannot race a packet; returns the
    /// number of entries removed (two per flow).
    pub fn flush_flows(&mut self, which: Flows) -> Result<usize, BpfError> {
        let req = match which {
            Flows::All => FlushRequest::default(),
            Flows::Container(container_id) => FlushRequest {
                container_id,
                flags: FLUSH_F_CONTAINER,
                ..FlushRequest::default()
            },
            Flows::Published {
                container_id,
                port,
                proto,
            } => FlushRequest {
                container_id,
                flags: FLUSH_F_CONTAINER | FLUSH_F_SERVICE,
                port,
                proto,
                ..FlushRequest::default()
            },
            Flows::Masqueraded(addr) => {
                let mut req = FlushRequest {
                    flags: FLUSH_F_MASQUERADE,
                    ..FlushRequest::default()
                };
                req.addr[..4].copy_from_slice(&addr.octets());
                req
            }
        };
        let flows = self.run_flush(req)?;
        if let Flows::Container(id) = which {
            // The container's count is zero now; its record goes with it.
            let _ = self.ct_containers.remove(&id);
        }
        Ok(usize::try_from(flows)
            .unwrap_or(usize::MAX)
            .saturating_mul(2))
    }

    /// The ids of the containers that own tracked flows.
    pub fn flow_container_ids(&self) -> Result<BTreeSet<u32>, BpfError> {
        super::conntrack::container_ids(self.ct.map(), self.ct_new.map()).map_err(|source| {
            BpfError::Read {
                name: names::CT,
                source,
            }
        })
    }
}

fn endpoint_key(addr: Ipv4Addr) -> EndpointKey {
    EndpointKey {
        addr: addr.octets(),
    }
}
