//! A read-only view of the datapath for the API's reads (status, listings,
//! flows), on map handles of its own: reading through it never waits for
//! the owner of the [`Datapath`], whatever that is busy with. Reads are
//! plain syscalls that may walk a large map: call them off the async
//! workers (`spawn_blocking`).

use std::{collections::BTreeMap, io};

use aya::maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuHashMap};
use datapath_common::{
    CtContainer, CtEntry, CtKey, CtTimedEntry, STAT_COUNT, Stat,
    ct::Timeouts,
    ct_action, ct_state,
    monitor::{ContainerDrops, ContainerStats, slot},
    names, proto,
    ratelimit::{RateKey, RateStats},
};

use super::{BpfError, Datapath, conntrack, ratelimit::read_counters, second_handle};
use crate::model::{
    RateCounters, RateLimits,
    figures::{
        ConntrackFigure, ContainerFigures, MASQUERADE_DESTINATIONS, MasqueradeFigure, ProgramFigure,
    },
};

/// Read-only handles on the counters, the conntrack tables and the rate
/// limiter's counters.
pub struct Reader {
    stats: PerCpuArray<MapData, u64>,
    ct: HashMap<MapData, CtKey, CtTimedEntry>,
    ct_new: HashMap<MapData, CtKey, CtEntry>,
    ct_containers: HashMap<MapData, u32, CtContainer>,
    rate_stats: PerCpuHashMap<MapData, RateKey, RateStats>,
    container_stats: PerCpuArray<MapData, ContainerStats>,
    container_drops: Array<MapData, ContainerDrops>,
}

/// A container whose figures [`Reader::container_figures`] reads.
pub struct ContainerRef<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its id.
    pub id: u32,
    /// Its cgroup's id (0: none).
    pub cgroup_id: u64,
    /// Its rate limits.
    pub limits: &'a RateLimits,
}

/// The conntrack figures [`Reader::conntrack_figures`] reads.
#[derive(Default)]
pub struct ConntrackFigures {
    /// Entries by table, protocol and state.
    pub entries: Vec<ConntrackFigure>,
    /// Masquerade ports in use by destination, busiest first.
    pub masquerade: Vec<MasqueradeFigure>,
}

impl Reader {
    pub(super) fn new(dp: &Datapath) -> Result<Self, BpfError> {
        Ok(Self {
            stats: second_handle(&dp.stats, names::STATS)?,
            ct: second_handle(&dp.ct, names::CT)?,
            ct_new: second_handle(&dp.ct_new, names::CT_NEW)?,
            ct_containers: second_handle(&dp.ct_containers, names::CT_CONTAINERS)?,
            rate_stats: second_handle(&dp.rate_stats, names::RATE_STATS)?,
            container_stats: second_handle(&dp.container_stats, names::CONTAINER_STATS)?,
            container_drops: second_handle(&dp.container_drops, names::CONTAINER_DROPS)?,
        })
    }

    /// A container's traffic, drops, conntrack share and rate limiter
    /// counters.
    pub fn container_figures(&self, c: &ContainerRef<'_>) -> ContainerFigures {
        let mut f = ContainerFigures {
            name: c.name.to_owned(),
            rate: self.rate_counters(c.cgroup_id, c.limits),
            ..ContainerFigures::default()
        };
        if let Ok(per_cpu) = self.container_stats.get(&slot(c.id), 0) {
            for s in per_cpu.iter() {
                f.rx_packets += s.rx_packets;
                f.rx_bytes += s.rx_bytes;
                f.tx_packets += s.tx_packets;
                f.tx_bytes += s.tx_bytes;
            }
        }
        if let Ok(drops) = self.container_drops.get(&slot(c.id), 0) {
            for (stat, n) in Stat::ALL.iter().zip(drops.iter()) {
                if *n != 0 && stat.is_drop() {
                    f.drops.insert(stat.name().to_owned(), *n);
                }
            }
        }
        if let Ok(ct) = self.ct_containers.get(&c.id, 0) {
            f.conntrack_entries = ct.entries;
            f.conntrack_over_share = ct.over_share;
            f.masquerade_exhausted = ct.snat_exhausted;
        }
        f
    }

    /// Conntrack entries by table, protocol and state, and masquerade
    /// ports in use by destination.
    pub fn conntrack_figures(&self, timeouts: &Timeouts) -> io::Result<ConntrackFigures> {
        let flows = self.flows(timeouts, conntrack::now_ns())?;
        let mut entries: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
        let mut masq: BTreeMap<String, u64> = BTreeMap::new();
        for f in &flows {
            let table = if f.confirmed { "main" } else { "new" };
            let protocol = match f.key.proto {
                proto::TCP => "tcp",
                proto::UDP => "udp",
                proto::ICMP => "icmp",
                _ => "other",
            };
            *entries
                .entry((table, protocol, ct_state::name(f.orig.state)))
                .or_default() += 1 + u64::from(f.reply.is_some());
            if f.orig.action == ct_action::SNAT {
                let [a, b, c, d] = f.key.daddr;
                let dest = format!("{a}.{b}.{c}.{d}:{}/{protocol}", f.key.dport);
                *masq.entry(dest).or_default() += 1;
            }
        }
        let mut masquerade: Vec<MasqueradeFigure> = masq
            .into_iter()
            .map(|(destination, ports)| MasqueradeFigure { destination, ports })
            .collect();
        masquerade.sort_by(|a, b| {
            b.ports
                .cmp(&a.ports)
                .then(a.destination.cmp(&b.destination))
        });
        masquerade.truncate(MASQUERADE_DESTINATIONS);
        Ok(ConntrackFigures {
            entries: entries
                .into_iter()
                .map(|((table, protocol, state), entries)| ConntrackFigure {
                    table: table.to_owned(),
                    protocol: protocol.to_owned(),
                    state: state.to_owned(),
                    entries,
                })
                .collect(),
            masquerade,
        })
    }

    /// The kernel's statistics of the programs with ids `programs` (id,
    /// name, where attached): run time and count.
    pub fn program_figures(&self, programs: &[(u32, String, String)]) -> Vec<ProgramFigure> {
        let mut out = Vec::new();
        for info in aya::programs::loaded_programs().flatten() {
            if let Some((_, name, at)) = programs.iter().find(|(id, ..)| *id == info.id()) {
                out.push(ProgramFigure {
                    program: name.clone(),
                    attachment: at.clone(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: info.run_count(),
                });
            }
        }
        out.sort_by(|a, b| (&a.program, &a.attachment).cmp(&(&b.program, &b.attachment)));
        out
    }

    /// The datapath's counters by name, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (i, stat) in Stat::ALL.iter().enumerate().take(STAT_COUNT as usize) {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            out.insert(stat.name().to_owned(), v);
        }
        out
    }

    /// The number of live conntrack entries (two per flow), in both
    /// tables.
    pub fn conntrack_entries(&self, timeouts: &Timeouts) -> usize {
        self.flows(timeouts, conntrack::now_ns())
            .map_or(0, |flows| {
                flows
                    .iter()
                    .map(|f| 1 + usize::from(f.reply.is_some()))
                    .sum()
            })
    }

    /// Every live flow (flows the kernel would find expired are left out).
    pub fn flows(&self, timeouts: &Timeouts, now: u64) -> io::Result<Vec<conntrack::FlowEntries>> {
        conntrack::read_flows(self.ct.map(), self.ct_new.map(), timeouts, now)
    }

    /// The rate limiter's counters of cgroup `cgroup_id` with `limits`.
    pub fn rate_counters(&self, cgroup_id: u64, limits: &RateLimits) -> RateCounters {
        read_counters(&self.rate_stats, cgroup_id, limits)
    }
}
