//! What the API shows: the agent's status, its containers and the tracked
//! flows. The owner captures a [`Snapshot`] of its state after every
//! change; the live parts (counters, flows) are read through the
//! [`Reader`] when asked for.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use datapath_common::{ct::Timeouts, names};
use ipnet::Ipv4Net;

use super::{AgentError, Node};
use crate::{
    api::{AgentWork, AttachmentInfo, ContainerInfo, CountWork, Flow, MapInfo, Status, UplinkInfo},
    datapath::{
        Attachment, COUNT_PASS_BUDGET, ContainerRef, Datapath, Reader, conntrack,
        pins::{self, MapLayout},
    },
    model::{DualPool, Figures, GATEWAY6},
    store::{Container, State, Store},
};

/// The agent's state as the API's reads see it between two changes.
#[derive(Clone, Debug)]
pub struct Snapshot {
    bpffs_dir: PathBuf,
    state_dir: PathBuf,
    pool: Ipv4Net,
    dual: Option<DualPool>,
    gateway: Ipv4Addr,
    ct_max: u32,
    timeouts: Timeouts,
    uplink: Option<UplinkInfo>,
    attachments: imbl::OrdMap<PathBuf, Attachment>,
    /// The desired state (a copy costs O(1)).
    state: State,
    snat_range: u64,
    /// Containers kept though they could not be restored, with why.
    degraded: BTreeMap<String, String>,
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
    pub(super) fn capture(
        node: &Node,
        dp: &Datapath,
        store: &Store,
        degraded: &BTreeMap<String, String>,
    ) -> Self {
        let cfg = &node.cfg;
        Self {
            bpffs_dir: cfg.bpffs_dir.clone(),
            state_dir: cfg.state_dir.clone(),
            pool: cfg.pool,
            dual: cfg.dual(),
            gateway: cfg.gateway(),
            ct_max: crate::datapath::ct_max(cfg.ct_max),
            timeouts: cfg.timeouts,
            uplink: node.uplink.as_ref().map(|u| u.info()),
            attachments: dp.attachments().clone(),
            state: store.state().clone(),
            degraded: degraded.clone(),
            snat_range: u64::from(cfg.snat_ports.1.saturating_sub(cfg.snat_ports.0)) + 1,
        }
    }

    /// The name of container `id`, if it is one of ours.
    pub fn container_name(&self, id: u32) -> Option<String> {
        self.state.name_of(id).map(str::to_owned)
    }

    /// Every figure of the datapath (`program_stats`: whether the kernel
    /// gathers program statistics now, which are then read too).
    pub fn figures(&self, reader: &Reader, program_stats: bool) -> Figures {
        let ct = reader.conntrack_figures(&self.timeouts);
        let work = agent_work(reader);
        let us = |s: f64| (s * 1e6) as u64;
        let programs: Vec<(u32, String, String)> = self
            .attachments
            .values()
            .map(|a| (a.program_id, a.program.to_owned(), a.ifname.clone()))
            .collect();
        Figures {
            counters: reader.counters(),
            containers: self
                .state
                .containers()
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
            conntrack: ct.entries.clone(),
            conntrack_max: u64::from(self.ct_max),
            conntrack_new_max: u64::from(crate::datapath::ct_new_max(self.ct_max)),
            masquerade: ct.masquerade.clone(),
            masquerade_range: self.snat_range,
            programs: if program_stats {
                reader.program_figures(&programs)
            } else {
                Vec::new()
            },
            program_stats,
            agent_cpu_user_us: us(work.cpu_user_s),
            agent_cpu_system_us: us(work.cpu_system_s),
            conntrack_count_passes: work.conntrack_count.passes,
            conntrack_count_max_pass_entries: work.conntrack_count.max_pass_entries,
        }
    }

    /// Container `c` as listed: [`container_info`] with why it is
    /// degraded, if it is.
    fn listed(&self, c: &Container, reader: &Reader) -> ContainerInfo {
        ContainerInfo {
            degraded: self.degraded.get(&c.name).cloned(),
            ..container_info(c, self.gateway, self.dual, reader)
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
    pub fn status(&self, reader: &Reader, program_stats: bool) -> Status {
        let maps_dir = self.bpffs_dir.join("maps");
        let figures = self.figures(reader, program_stats);
        // The sizes the kernel reports, not what the agent asked for.
        let maps: Vec<MapInfo> = pins::layouts(&maps_dir, &names::ALL)
            .into_iter()
            .map(|(name, layout)| {
                let l = layout.unwrap_or(MapLayout {
                    map_type: 0,
                    key_size: 0,
                    value_size: 0,
                    max_entries: 0,
                    flags: 0,
                });
                MapInfo {
                    name: name.to_owned(),
                    pin: maps_dir.join(name),
                    map_type: l.map_type,
                    key_size: l.key_size,
                    value_size: l.value_size,
                    max_entries: l.max_entries,
                    flags: l.flags,
                }
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            bpffs_dir: self.bpffs_dir.clone(),
            state_dir: self.state_dir.clone(),
            pool: self.pool.to_string(),
            pool6: self.dual.map(|d| d.pool6.to_string()),
            gateway: self.gateway,
            uplink: self.uplink.clone(),
            attachments: self.attachments.values().map(attachment_info).collect(),
            maps: maps.clone(),
            counters: reader.counters(),
            containers: self.state.containers().len(),
            conntrack_entries: reader.conntrack_entries(&self.timeouts),
            conntrack_max: maps
                .iter()
                .find(|m| m.name == names::CT && m.max_entries > 0)
                .map_or(self.ct_max, |m| m.max_entries),
            figures,
            agent: agent_work(reader),
        }
    }

    /// `GET /v1/containers`.
    pub fn containers(&self, reader: &Reader) -> Vec<ContainerInfo> {
        self.state
            .containers()
            .values()
            .map(|c| self.listed(c, reader))
            .collect()
    }

    /// `GET /v1/containers/{name}`.
    pub fn container(&self, name: &str, reader: &Reader) -> Result<ContainerInfo, AgentError> {
        self.state
            .get(name)
            .map(|c| self.listed(c, reader))
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
pub fn container_info(
    c: &Container,
    gateway: Ipv4Addr,
    dual: Option<DualPool>,
    reader: &Reader,
) -> ContainerInfo {
    let addr6: Option<Ipv6Addr> = dual.and_then(|d| d.addr6(c.addr));
    ContainerInfo {
        name: c.name.clone(),
        id: c.id,
        addr: c.addr,
        gateway,
        addr6,
        gateway6: addr6.map(|_| GATEWAY6),
        netns: c.netns.clone(),
        ifname: c.ifname.clone(),
        host_ifname: c.host_ifname.clone(),
        publish: c.publish.iter().map(ToString::to_string).collect(),
        cgroup: c.cgroup.clone(),
        pending: c.limits_pending(),
        mtu: c.mtu,
        limits: c.limits,
        counters: reader.rate_counters(c.cgroup_id, &c.limits),
        netns_id: c.netns_id.map(|id| id.to_string()),
        degraded: None,
    }
}

/// The agent's CPU use so far and what its periodic work has cost.
fn agent_work(reader: &Reader) -> AgentWork {
    use nix::sys::resource::{UsageWho, getrusage};
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let (cpu_user_s, cpu_system_s) = getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| (secs(u.user_time()), secs(u.system_time())))
        .unwrap_or_default();
    let w = reader.count_work();
    AgentWork {
        cpu_user_s,
        cpu_system_s,
        conntrack_count: CountWork {
            pass_budget: COUNT_PASS_BUDGET as u64,
            passes: w.passes,
            walks: w.walks,
            last_pass_entries: w.last_pass_entries,
            max_pass_entries: w.max_pass_entries,
            max_pass_syscalls: w.max_pass_syscalls,
        },
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
