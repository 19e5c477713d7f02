//! What the API shows: the agent's status, its containers and the tracked
//! flows. The owner captures a [`Snapshot`] of its state after every
//! change; the live parts (counters, flows) are read through the
//! [`Reader`] when asked for.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use datapath_common::{ct::Timeouts, names};
use ipnet::Ipv4Net;

use super::{AgentError, Node, internal};
use crate::{
    api::{AttachmentInfo, ContainerInfo, Flow, MapInfo, Status, UplinkInfo},
    datapath::{Attachment, ContainerRef, Datapath, Reader, conntrack, reader::ConntrackFigures},
    model::Figures,
    store::{Container, Store},
};

/// The agent's state as the API's reads see it between two changes.
#[derive(Clone, Debug)]
pub struct Snapshot {
    bpffs_dir: PathBuf,
    state_dir: PathBuf,
    pool: Ipv4Net,
    gateway: Ipv4Addr,
    ct_max: u32,
    timeouts: Timeouts,
    uplink: Option<UplinkInfo>,
    attachments: Vec<AttachmentInfo>,
    containers: BTreeMap<String, Container>,
    snat_range: u64,
}

impl Snapshot {
    /// The owner's state now.
    pub(super) fn capture(node: &Node, dp: &Datapath, store: &Store) -> Self {
        let cfg = &node.cfg;
        Self {
            bpffs_dir: cfg.bpffs_dir.clone(),
            state_dir: cfg.state_dir.clone(),
            pool: cfg.pool,
            gateway: cfg.gateway(),
            ct_max: crate::datapath::ct_max(cfg.ct_max),
            timeouts: cfg.timeouts,
            uplink: node.uplink.as_ref().map(|u| u.info()),
            attachments: dp.attachments().iter().map(attachment_info).collect(),
            containers: store.containers().clone(),
            snat_range: u64::from(cfg.snat_ports.1.saturating_sub(cfg.snat_ports.0)) + 1,
        }
    }

    /// The name of container `id`, if it is one of ours.
    pub fn container_name(&self, id: u32) -> Option<String> {
        self.containers
            .values()
            .find(|c| c.id == id)
            .map(|c| c.name.clone())
    }

    /// The id of container `name`.
    pub fn container_id(&self, name: &str) -> Option<u32> {
        self.containers.get(name).map(|c| c.id)
    }

    /// Every figure of the datapath (`program_stats`: whether the kernel
    /// gathers program statistics now, which are then read too).
    pub fn figures(&self, reader: &Reader, program_stats: bool) -> Figures {
        let ct = reader
            .conntrack_figures(&self.timeouts)
            .unwrap_or_else(|e| {
                tracing::warn!("read conntrack for the figures: {e}");
                ConntrackFigures::default()
            });
        let programs: Vec<(u32, String, String)> = self
            .attachments
            .iter()
            .map(|a| (a.program_id, a.program.clone(), a.ifname.clone()))
            .collect();
        Figures {
            counters: reader.counters(),
            containers: self
                .containers
                .values()
                .map(|c| {
                    reader.container_figures(&ContainerRef {
                        name: &c.name,
                        id: c.id,
                        cgroup_id: c.cgroup_id,
                        limits: &c.limits,
                    })
                })
                .collect(),
            conntrack: ct.entries,
            conntrack_max: u64::from(self.ct_max),
            conntrack_new_max: u64::from(crate::datapath::ct_new_max(self.ct_max)),
            masquerade: ct.masquerade,
            masquerade_range: self.snat_range,
            programs: if program_stats {
                reader.program_figures(&programs)
            } else {
                Vec::new()
            },
            program_stats,
        }
    }

    /// `GET /v1/status`: what is loaded and attached, with the counters.
    pub fn status(&self, reader: &Reader, program_stats: bool) -> Status {
        let maps_dir = self.bpffs_dir.join("maps");
        let figures = self.figures(reader, program_stats);
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            bpffs_dir: self.bpffs_dir.clone(),
            state_dir: self.state_dir.clone(),
            pool: self.pool.to_string(),
            gateway: self.gateway,
            uplink: self.uplink.clone(),
            attachments: self.attachments.clone(),
            maps: names::ALL
                .iter()
                .map(|n| MapInfo {
                    name: (*n).to_owned(),
                    pin: maps_dir.join(n),
                })
                .collect(),
            counters: reader.counters(),
            containers: self.containers.len(),
            conntrack_entries: figures.conntrack.iter().map(|f| f.entries).sum::<u64>() as usize,
            conntrack_max: self.ct_max,
            figures,
        }
    }

    /// `GET /v1/containers`.
    pub fn containers(&self, reader: &Reader) -> Vec<ContainerInfo> {
        self.containers
            .values()
            .map(|c| container_info(c, self.gateway, reader))
            .collect()
    }

    /// `GET /v1/containers/{name}`.
    pub fn container(&self, name: &str, reader: &Reader) -> Result<ContainerInfo, AgentError> {
        self.containers
            .get(name)
            .map(|c| container_info(c, self.gateway, reader))
            .ok_or_else(|| AgentError::no_container(name))
    }

    /// `GET /v1/conntrack`: every tracked flow, with its container's name.
    pub fn flows(&self, reader: &Reader) -> Result<Vec<Flow>, AgentError> {
        let now = conntrack::now_ns();
        let flows = reader
            .flows(&self.timeouts, now)
            .map_err(internal("read conntrack"))?;
        let by_id: BTreeMap<u32, &str> = self
            .containers
            .values()
            .map(|c| (c.id, c.name.as_str()))
            .collect();
        Ok(flows
            .iter()
            .map(|f| {
                conntrack::flow_view(
                    f,
                    &self.timeouts,
                    now,
                    by_id.get(&f.orig.container_id).map(|n| (*n).to_owned()),
                )
            })
            .collect())
    }
}

/// A container as the API shows it, with its rate limiter's counters.
pub fn container_info(c: &Container, gateway: Ipv4Addr, reader: &Reader) -> ContainerInfo {
    ContainerInfo {
        name: c.name.clone(),
        id: c.id,
        addr: c.addr,
        gateway,
        netns: c.netns.clone(),
        ifname: c.ifname.clone(),
        host_ifname: c.host_ifname.clone(),
        publish: c.publish.iter().map(ToString::to_string).collect(),
        cgroup: c.cgroup.clone(),
        limits: c.limits,
        counters: reader.rate_counters(c.cgroup_id, &c.limits),
    }
}

fn attachment_info(a: &Attachment) -> AttachmentInfo {
    AttachmentInfo {
        program: a.program.to_owned(),
        program_id: a.program_id,
        ifname: a.ifname.clone(),
        hook: a.hook.to_owned(),
        pin: a.pin.clone(),
    }
}
