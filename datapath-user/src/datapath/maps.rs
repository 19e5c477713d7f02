//! Typed operations on the maps the agent fills: the global configuration,
//! the node's addresses, containers (ENDPOINTS) and published ports
//! (SERVICES). Entries carry the id of the container that owns them, and
//! removals take that id, so that no container removes another's entry.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use aya::maps::{IterableMap as _, MapData, MapError, PerCpuValues, lpm_trie::Key as LpmKey};
use datapath_common::{
    CONFIG_F_MONITOR_DROPS, CONFIG_F_MONITOR_FLOWS, CONFIG_F_READY, Config, Endpoint, EndpointKey,
    FLUSH_F_CONTAINER, FLUSH_F_MASQUERADE, FLUSH_F_SERVICE, FlushRequest, NodeAddr, NodeAddrKey,
    Peer, STAT_COUNT, ServiceKey, ServiceValue,
    monitor::{self, ContainerStats},
    names, overlay,
};
use ipnet::Ipv4Net;

use super::{BpfError, Datapath};
use crate::metrics;

/// The configuration bits that belong to the monitor.
const MONITOR_FLAGS: u32 = CONFIG_F_MONITOR_DROPS | CONFIG_F_MONITOR_FLOWS;

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

    /// Sets the global configuration (the monitor's bits are the
    /// datapath's own: see [`Datapath::set_monitor`]).
    pub fn set_config(&mut self, mut config: Config) -> Result<(), BpfError> {
        config.flags = (config.flags & !MONITOR_FLAGS) | self.monitor_flags;
        metrics::timed(names::CONFIG, || self.config.set(0, config, 0))
            .map_err(map_err(names::CONFIG))
    }

    /// Turns the monitor's events on or off in the kernel:
    /// `flags` are `CONFIG_F_MONITOR_*` bits (0: off, the programs write
    /// nothing to the ring buffer).
    pub fn set_monitor(&mut self, flags: u32) -> Result<(), BpfError> {
        self.monitor_flags = flags & MONITOR_FLAGS;
        let config = self.config()?;
        if config.flags & CONFIG_F_READY == 0 {
            // Written with the configuration.
            return Ok(());
        }
        self.set_config(config)
    }

    /// The monitor's ring buffer, to its one reader.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.events.take()
    }

    /// Zeroes the per-container counters of container `id`'s slot (which
    /// an earlier container may have used).
    pub fn reset_container_counters(&mut self, id: u32) -> Result<(), BpfError> {
        let slot = monitor::slot(id);
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| BpfError::Read {
            name: names::CONTAINER_STATS,
            source,
        })?;
        let zeros =
            PerCpuValues::try_from(vec![ContainerStats::default(); cpus]).map_err(|source| {
                BpfError::Read {
                    name: names::CONTAINER_STATS,
                    source,
                }
            })?;
        metrics::timed(names::CONTAINER_STATS, || {
            self.container_stats.set(slot, zeros, 0)
        })
        .map_err(map_err(names::CONTAINER_STATS))?;
        metrics::timed(names::CONTAINER_DROPS, || {
            self.container_drops.set(slot, [0; STAT_COUNT as usize], 0)
        })
        .map_err(map_err(names::CONTAINER_DROPS))
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
            metrics::timed(names::NODE_ADDRS, || {
                self.node_addrs
                    .insert(NodeAddrKey { addr: a.octets() }, NodeAddr { ifindex }, 0)
            })
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

    /// Adds (or replaces) the endpoint of address `addr`, and the veth
    /// entry that names its container.
    pub fn insert_endpoint(&mut self, addr: Ipv4Addr, endpoint: Endpoint) -> Result<(), BpfError> {
        let key = endpoint_key(addr);
        if let Ok(old) = self.endpoints.get(&key, 0)
            && old.ifindex != endpoint.ifindex
        {
            self.remove_veth(old.ifindex, old.container_id);
        }
        metrics::timed(names::CONTAINER_VETHS, || {
            self.container_veths
                .insert(endpoint.ifindex, endpoint.container_id, 0)
        })
        .map_err(map_err(names::CONTAINER_VETHS))?;
        metrics::timed(names::ENDPOINTS, || self.endpoints.insert(key, endpoint, 0))
            .map_err(map_err(names::ENDPOINTS))
    }

    /// Removes the veth entry of `ifindex` if it names container `owner`.
    fn remove_veth(&mut self, ifindex: u32, owner: u32) {
        if self
            .container_veths
            .get(&ifindex, 0)
            .is_ok_and(|id| id == owner)
        {
            let _ = self.container_veths.remove(&ifindex);
        }
    }

    /// Removes the endpoint of address `addr` (and its veth entry) if
    /// container `owner` owns it.
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr, owner: u32) {
        let key = endpoint_key(addr);
        if let Ok(e) = self.endpoints.get(&key, 0)
            && e.container_id == owner
        {
            let _ = self.endpoints.remove(&key);
            self.remove_veth(e.ifindex, owner);
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
        let key = endpoint_key(addr);
        if let Ok(e) = self.endpoints.get(&key, 0) {
            self.remove_veth(e.ifindex, e.container_id);
        }
        let _ = self.endpoints.remove(&key);
    }

    /// Adds (or replaces) the published port `key`.
    pub fn insert_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), BpfError> {
        metrics::timed(names::SERVICES, || self.services.insert(key, value, 0))
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
