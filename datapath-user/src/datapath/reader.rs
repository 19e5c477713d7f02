//! A read-only view of the datapath for the API's reads (status, listings,
//! flows), on map handles of its own: reading through it never waits for
//! the owner of the [`Datapath`], whatever that is busy with. Reads are
//! plain syscalls that may walk a large map: call them off the async
//! workers (`spawn_blocking`).
//!
//! Nothing here holds a whole table in memory: flows are walked a batch
//! at a time ([`Reader::walk_flows`]), and the number of conntrack entries
//! is counted in the background at most once a second
//! ([`Reader::conntrack_entries`]), never by the read that asks for it.

use std::{
    collections::BTreeMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap};
use datapath_common::{
    CtEntry, CtKey, CtTimedEntry, STAT_COUNT, Stat,
    ct::Timeouts,
    names,
    ratelimit::{RateKey, RateStats},
};

use super::{BpfError, Datapath, conntrack, ratelimit::read_counters, second_handle};
use crate::model::{RateCounters, RateLimits};

/// How old the conntrack entry count may be before a read asks for a new
/// one.
const COUNT_MAX_AGE: Duration = Duration::from_secs(1);

/// How many entries a walk reads per `BPF_MAP_LOOKUP_BATCH`.
const WALK_BATCH: usize = 1024;

/// Read-only handles on the counters, the conntrack tables and the rate
/// limiter's counters.
pub struct Reader {
    stats: PerCpuArray<MapData, u64>,
    tables: Arc<Tables>,
    rate_stats: PerCpuHashMap<MapData, RateKey, RateStats>,
    count: Arc<EntryCount>,
}

/// Handles on both conntrack tables: confirmed flows (CT) and unconfirmed
/// ones (CT_NEW).
struct Tables {
    ct: HashMap<MapData, CtKey, CtTimedEntry>,
    ct_new: HashMap<MapData, CtKey, CtEntry>,
}

impl Tables {
    /// Walks the live flows of both tables (flows the kernel would find
    /// expired at `now` are left out), a batch at a time, calling `visit`
    /// with each until it returns `false`. A flow's reply entry is looked
    /// up in the table of its original entry.
    fn walk(
        &self,
        timeouts: &Timeouts,
        now: u64,
        mut visit: impl FnMut(conntrack::FlowEntries) -> bool,
    ) -> io::Result<()> {
        let mut go = true;
        conntrack::walk_batches(
            self.ct.map(),
            WALK_BATCH,
            |batch: &[(CtKey, CtTimedEntry)]| {
                for (key, v) in batch {
                    if !v.entry.is_original() {
                        continue;
                    }
                    let reply_key = v.entry.peer_key(key);
                    let reply = lookup(self.ct.get(&reply_key, 0))?.map(|r| r.entry);
                    let flow = flow(*key, v.entry, reply_key, reply, true);
                    if !flow.expired(timeouts, now) && !visit(flow) {
                        go = false;
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        if !go {
            return Ok(());
        }
        conntrack::walk_batches(
            self.ct_new.map(),
            WALK_BATCH,
            |batch: &[(CtKey, CtEntry)]| {
                for (key, v) in batch {
                    if !v.is_original() {
                        continue;
                    }
                    let reply_key = v.peer_key(key);
                    let reply = lookup(self.ct_new.get(&reply_key, 0))?;
                    let flow = flow(*key, *v, reply_key, reply, false);
                    if !flow.expired(timeouts, now) && !visit(flow) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
    }
}

/// A lookup's entry, `None` if the key is gone (removed since the walk
/// read its peer).
fn lookup<V>(r: Result<V, MapError>) -> io::Result<Option<V>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(io::Error::other(e)),
    }
}

fn flow(
    key: CtKey,
    orig: CtEntry,
    reply_key: CtKey,
    reply: Option<CtEntry>,
    confirmed: bool,
) -> conntrack::FlowEntries {
    conntrack::FlowEntries {
        key,
        orig,
        reply_key,
        reply,
        confirmed,
    }
}

/// The number of live conntrack entries, counted on a thread of its own.
struct EntryCount {
    tables: Arc<Tables>,
    entries: AtomicUsize,
    /// When the last count finished, and whether one is running.
    state: Mutex<(Option<Instant>, bool)>,
}

impl EntryCount {
    /// The last count, starting a new one (with `timeouts`) in the
    /// background if it is older than [`COUNT_MAX_AGE`].
    fn get(self: &Arc<Self>, timeouts: &Timeouts) -> usize {
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
            let timeouts = *timeouts;
            let spawned = std::thread::Builder::new()
                .name("conntrack-count".into())
                .spawn(move || me.count(&timeouts));
            if spawned.is_err()
                && let Ok(mut state) = self.state.lock()
            {
                state.1 = false;
            }
        }
        self.entries.load(Ordering::Relaxed)
    }

    fn count(&self, timeouts: &Timeouts) {
        let mut n = 0;
        let walked = self.tables.walk(timeouts, conntrack::now_ns(), |f| {
            n += 1 + usize::from(f.reply.is_some());
            true
        });
        match walked {
            Ok(()) => self.entries.store(n, Ordering::Relaxed),
            Err(e) => tracing::warn!("count the conntrack entries: {e}"),
        }
        if let Ok(mut state) = self.state.lock() {
            *state = (Some(Instant::now()), false);
        }
    }
}

impl Reader {
    pub(super) fn new(dp: &Datapath) -> Result<Self, BpfError> {
        let tables = Arc::new(Tables {
            ct: second_handle(&dp.ct, names::CT)?,
            ct_new: second_handle(&dp.ct_new, names::CT_NEW)?,
        });
        let count = Arc::new(EntryCount {
            tables: Arc::clone(&tables),
            entries: AtomicUsize::new(0),
            state: Mutex::new((None, false)),
        });
        Ok(Self {
            stats: second_handle(&dp.stats, names::STATS)?,
            tables,
            rate_stats: second_handle(&dp.rate_stats, names::RATE_STATS)?,
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

    /// The number of live conntrack entries (two per answered flow) in
    /// both tables, as counted in the background within the last second
    /// or so: a read never walks the tables for it.
    pub fn conntrack_entries(&self, timeouts: &Timeouts) -> usize {
        self.count.get(timeouts)
    }

    /// Walks the live flows of both tables a batch at a time (flows the
    /// kernel would find expired at `now` are left out), calling `visit`
    /// with each until it returns `false`. Memory stays that of one batch
    /// whatever the tables' sizes; a flow created or removed during the
    /// walk may or may not be seen.
    pub fn walk_flows(
        &self,
        timeouts: &Timeouts,
        now: u64,
        visit: impl FnMut(conntrack::FlowEntries) -> bool,
    ) -> io::Result<()> {
        self.tables.walk(timeouts, now, visit)
    }

    /// The rate limiter's counters of cgroup `cgroup_id` with `limits`.
    pub fn rate_counters(&self, cgroup_id: u64, limits: &RateLimits) -> RateCounters {
        read_counters(&self.rate_stats, cgroup_id, limits)
    }
}
