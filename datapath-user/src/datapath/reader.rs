//! A read-only view of the datapath for the API's reads (status, listings,
//! flows), on map handles of its own: reading through it never waits for
//! the owner of the [`Datapath`], whatever that is busy with. Reads are
//! plain syscalls that may walk a large map: call them off the async
//! workers (`spawn_blocking`).
//!
//! Nothing here holds a whole table in memory: flows are walked one at a
//! time ([`Reader::walk_flows`]), and the number of conntrack entries is
//! counted in the background at most once a second
//! ([`Reader::conntrack_entries`]), never by the read that asks for it.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap};
use datapath_common::{
    CT_F_ORIGINAL, CtEntry, CtKey, STAT_COUNT, Stat, names,
    ratelimit::{RateKey, RateStats},
};

use super::{BpfError, Datapath, conntrack, ratelimit::read_counters, second_handle};
use crate::model::{RateCounters, RateLimits};

/// How old the conntrack entry count may be before a read asks for a new
/// one.
const COUNT_MAX_AGE: Duration = Duration::from_secs(1);

/// Read-only handles on the counters, the conntrack table and the rate
/// limiter's counters.
pub struct Reader {
    stats: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    rate_stats: PerCpuHashMap<MapData, RateKey, RateStats>,
    count: Arc<EntryCount>,
    /// The conntrack table's capacity: the most keys a walk visits.
    ct_capacity: usize,
}

/// The number of conntrack entries, counted on a thread of its own.
struct EntryCount {
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    entries: AtomicUsize,
    /// When the last count finished, and whether one is running.
    state: Mutex<(Option<Instant>, bool)>,
}

impl EntryCount {
    /// The last count, starting a new one in the background if it is
    /// older than [`COUNT_MAX_AGE`].
    fn get(self: &Arc<Self>) -> usize {
        let start = {
            let Ok(mut state) = self.state.lock() else {
                return self.entries.load(Ordering::Relaxed);
            };
            let (at, running) = &mut *state;
            let stale = at.is_none_or(|t| t.elapsed() >= COUNT_MAX_AGE);
            let start = stale && !*running;
            if start {
                *running = true;
            }
            start
        };
        if start {
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("conntrack-count".into())
                .spawn(move || me.count());
            if spawned.is_err()
                && let Ok(mut state) = self.state.lock()
            {
                state.1 = false;
            }
        }
        self.entries.load(Ordering::Relaxed)
    }

    fn count(&self) {
        let n = self.conntrack.keys().count();
        self.entries.store(n, Ordering::Relaxed);
        if let Ok(mut state) = self.state.lock() {
            *state = (Some(Instant::now()), false);
        }
    }
}

impl Reader {
    pub(super) fn new(dp: &Datapath) -> Result<Self, BpfError> {
        let count = Arc::new(EntryCount {
            conntrack: second_handle(&dp.conntrack, names::CONNTRACK)?,
            entries: AtomicUsize::new(0),
            state: Mutex::new((None, false)),
        });
        // The first count, so that the first read has one.
        count.get();
        Ok(Self {
            stats: second_handle(&dp.stats, names::STATS)?,
            conntrack: second_handle(&dp.conntrack, names::CONNTRACK)?,
            rate_stats: second_handle(&dp.rate_stats, names::RATE_STATS)?,
            ct_capacity: dp.conntrack.map().info().map_or(usize::MAX, |i| {
                usize::try_from(i.max_entries()).unwrap_or(usize::MAX)
            }),
            count,
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

    /// The number of conntrack entries (two per flow), as counted in the
    /// background within the last second or so: a read never walks the
    /// table for it.
    pub fn conntrack_entries(&self) -> usize {
        self.count.get()
    }

    /// Walks the tracked flows one at a time, calling `visit` with each
    /// (its original-direction entry and, if present, its reply entry)
    /// until it returns `false`. Memory stays O(1) whatever the table's
    /// size. A walk visits at most as many keys as the table holds, so
    /// entries that come and go meanwhile cannot keep it going (a flow
    /// removed during the walk may be seen twice or not at all).
    pub fn walk_flows(
        &self,
        mut visit: impl FnMut(conntrack::FlowEntries) -> bool,
    ) -> Result<(), MapError> {
        for key in self.conntrack.keys().take(self.ct_capacity) {
            let key = key?;
            let orig = match self.conntrack.get(&key, 0) {
                Ok(e) => e,
                // Removed since its key was read.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e),
            };
            if orig.flags & CT_F_ORIGINAL == 0 {
                continue;
            }
            let reply_key = orig.peer_key(&key);
            let reply = match self.conntrack.get(&reply_key, 0) {
                Ok(e) => Some(e),
                Err(MapError::KeyNotFound) => None,
                Err(e) => return Err(e),
            };
            if !visit(conntrack::FlowEntries {
                key,
                orig,
                reply_key,
                reply,
            }) {
                break;
            }
        }
        Ok(())
    }

    /// The rate limiter's counters of cgroup `cgroup_id` with `limits`.
    pub fn rate_counters(&self, cgroup_id: u64, limits: &RateLimits) -> RateCounters {
        read_counters(&self.rate_stats, cgroup_id, limits)
    }
}
