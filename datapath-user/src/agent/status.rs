//! What the API shows: the agent's status, its containers and the tracked
//! flows. The owner captures a [`Snapshot`] of its state after every
//! change; the live parts (counters, flows) are read through the
//! [`Reader`] when asked for.

use std::{net::Ipv4Addr, path::PathBuf};

use datapath_common::{ct::Timeouts, names};
use ipnet::Ipv4Net;

use super::{AgentError, Node};
use crate::{
    api::{AttachmentInfo, ContainerInfo, Flow, MapInfo, Status, UplinkInfo},
    datapath::{Attachment, Datapath, Reader, conntrack},
    store::{Container, State, Store},
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
    attachments: imbl::OrdMap<PathBuf, Attachment>,
    /// The desired state (a copy costs O(1)).
    state: State,
}

impl Snapshot {
    /// The node's address, if it has an uplink.
    pub fn node_ip(&self) -> Option<Ipv4Addr> {
        self.uplink.as_ref().map(|u| u.node_ip)
    }

    /// The container pool.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

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
            attachments: dp.attachments().clone(),
            state: store.state().clone(),
        }
    }

    /// The cgroups of the containers with rate limits (existing or not).
    pub fn limited_cgroups(&self) -> Vec<PathBuf> {
        self.state
            .limited_cgroups()
            .map(std::path::Path::to_path_buf)
            .collect()
    }

    /// `GET /v1/status`: what is loaded and attached, with the counters.
    pub fn status(&self, reader: &Reader) -> Status {
        let maps_dir = self.bpffs_dir.join("maps");
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            bpffs_dir: self.bpffs_dir.clone(),
            state_dir: self.state_dir.clone(),
            pool: self.pool.to_string(),
            gateway: self.gateway,
            uplink: self.uplink.clone(),
            attachments: self.attachments.values().map(attachment_info).collect(),
            maps: names::ALL
                .iter()
                .map(|n| MapInfo {
                    name: (*n).to_owned(),
                    pin: maps_dir.join(n),
                })
                .collect(),
            counters: reader.counters(),
            containers: self.state.containers().len(),
            conntrack_entries: reader.conntrack_entries(&self.timeouts),
            conntrack_max: self.ct_max,
        }
    }

    /// `GET /v1/containers`.
    pub fn containers(&self, reader: &Reader) -> Vec<ContainerInfo> {
        self.state
            .containers()
            .values()
            .map(|c| container_info(c, self.gateway, reader))
            .collect()
    }

    /// `GET /v1/containers/{name}`.
    pub fn container(&self, name: &str, reader: &Reader) -> Result<ContainerInfo, AgentError> {
        self.state
            .get(name)
            .map(|c| container_info(c, self.gateway, reader))
            .ok_or_else(|| AgentError::no_container(name))
    }

    /// The id of container `name`.
    pub fn container_id(&self, name: &str) -> Option<u32> {
        self.state.get(name).map(|c| c.id)
    }

    /// `GET /v1/conntrack`: walks the tracked flows (of container id
    /// `container`, or all; at most `limit`) and sends them, with their
    /// containers' names, to `out` in batches as they are read. Stops when
    /// the receiver goes away.
    pub fn stream_flows(
        &self,
        reader: &Reader,
        container: Option<u32>,
        limit: Option<usize>,
        out: &FlowSender,
    ) {
        let now = conntrack::now_ns();
        let limit = limit.unwrap_or(usize::MAX);
        let mut sent = 0;
        let mut batch = Vec::with_capacity(FLOW_BATCH);
        let mut open = true;
        let walked = reader.walk_flows(&self.timeouts, now, |f| {
            if sent >= limit {
                return false;
            }
            if container.is_some_and(|id| f.orig.container_id != id) {
                return true;
            }
            let name = self.state.name_of(f.orig.container_id).map(str::to_owned);
            batch.push(conntrack::flow_view(&f, &self.timeouts, now, name));
            sent += 1;
            if batch.len() == FLOW_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(FLOW_BATCH));
                open = out.blocking_send(Ok(full)).is_ok();
            }
            open && sent < limit
        });
        let last = match walked {
            Ok(()) => Ok(batch),
            Err(e) => Err(format!("read conntrack: {e}")),
        };
        if open {
            let _ = out.blocking_send(last);
        }
    }
}

/// Flows of a listing go this way, in batches.
pub type FlowSender = tokio::sync::mpsc::Sender<Result<Vec<Flow>, String>>;

/// Flows per batch of a listing.
const FLOW_BATCH: usize = 256;

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
        pending: c.limits_pending(),
        mtu: c.mtu,
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
