//! A read-only view of the datapath for the API's reads (status, listings,
//! flows), on map handles of its own: reading through it never waits for
//! the owner of the [`Datapath`], whatever that is busy with. Reads are
//! plain syscalls that may walk a large map: call them off the async
//! workers (`spawn_blocking`).

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap};
use datapath_common::{
    CtEntry, CtKey, STAT_COUNT, Stat, names,
    ratelimit::{RateKey, RateStats},
};

use super::{BpfError, Datapath, conntrack, ratelimit::read_counters, second_handle};
use crate::model::{RateCounters, RateLimits};

/// Read-only handles on the counters, the conntrack table and the rate
/// limiter's counters.
pub struct Reader {
    stats: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    rate_stats: PerCpuHashMap<MapData, RateKey, RateStats>,
}

impl Reader {
    pub(super) fn new(dp: &Datapath) -> Result<Self, BpfError> {
        Ok(Self {
            stats: second_handle(&dp.stats, names::STATS)?,
            conntrack: second_handle(&dp.conntrack, names::CONNTRACK)?,
            rate_stats: second_handle(&dp.rate_stats, names::RATE_STATS)?,
        })
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

    /// The number of conntrack entries (two per flow).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().count()
    }

    /// Every tracked flow.
    pub fn flows(&self) -> Result<Vec<conntrack::FlowEntries>, MapError> {
        conntrack::read_flows(&self.conntrack).map(|(flows, _)| flows)
    }

    /// The rate limiter's counters of cgroup `cgroup_id` with `limits`.
    pub fn rate_counters(&self, cgroup_id: u64, limits: &RateLimits) -> RateCounters {
        read_counters(&self.rate_stats, cgroup_id, limits)
    }
}
