//! A read-only view of the datapath for the API's reads (status, listings,
//! flows), on map handles of its own: reading through it never waits for
//! the owner of the [`Datapath`], whatever that is busy with. Reads are
//! plain syscalls that may walk a large map: call them off the async
//! workers (`spawn_blocking`).

use std::{collections::BTreeMap, io};

use aya::maps::{HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuHashMap};
use datapath_common::{
    CtEntry, CtKey, CtTimedEntry, STAT_COUNT, Stat,
    ct::Timeouts,
    names,
    ratelimit::{RateKey, RateStats},
};

use super::{BpfError, Datapath, conntrack, ratelimit::read_counters, second_handle};
use crate::model::{RateCounters, RateLimits};

/// Read-only handles on the counters, the conntrack tables and the rate
/// limiter's counters.
pub struct Reader {
    stats: PerCpuArray<MapData, u64>,
    ct: HashMap<MapData, CtKey, CtTimedEntry>,
    ct_new: HashMap<MapData, CtKey, CtEntry>,
    rate_stats: PerCpuHashMap<MapData, RateKey, RateStats>,
}

impl Reader {
    pub(super) fn new(dp: &Datapath) -> Result<Self, BpfError> {
        Ok(Self {
            stats: second_handle(&dp.stats, names::STATS)?,
            ct: second_handle(&dp.ct, names::CT)?,
            ct_new: second_handle(&dp.ct_new, names::CT_NEW)?,
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
