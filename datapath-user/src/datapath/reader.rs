//! A read-only view of the datapath for the API's reads (status, listings,
//! flows), on map handles of its own: reading through it never waits for
//! the owner of the [`Datapath`], whatever that is busy with. Reads are
//! plain syscalls that may walk a large map: call them off the async
//! workers (`spawn_blocking`).
//!
//! Nothing here holds a whole table in memory: flows are walked a batch
//! at a time ([`Reader::walk_flows`]), and the conntrack entries are
//! counted (by table, protocol and state, with the masquerade ports by
//! destination) in the background at most once a second
//! ([`Reader::conntrack_entries`], [`Reader::conntrack_figures`]), never by
//! the read that asks for them.

use std::{
    collections::BTreeMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap};
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
    ct_containers: HashMap<MapData, u32, CtContainer>,
    container_stats: PerCpuArray<MapData, ContainerStats>,
    container_drops: Array<MapData, ContainerDrops>,
}

/// Handles on both conntrack tables: confirmed flows (CT) and unconfirmed
/// ones (CT_NEW).
struct Tables {
    ct: HashMap<MapData, CtKey, CtTimedEntry>,
    ct_new: HashMap<MapData, CtKey, CtEntry>,
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
#[derive(Default, Debug)]
pub struct ConntrackFigures {
    /// Entries by table, protocol and state.
    pub entries: Vec<ConntrackFigure>,
    /// Masquerade ports in use by destination, busiest first.
    pub masquerade: Vec<MasqueradeFigure>,
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

/// The conntrack tables' census (entries by table, protocol and state;
/// masquerade ports by destination), taken on a thread of its own.
struct EntryCount {
    tables: Arc<Tables>,
    entries: AtomicUsize,
    figures: Mutex<Arc<ConntrackFigures>>,
    /// When the last census finished, and whether one is running.
    state: Mutex<(Option<Instant>, bool)>,
}

impl EntryCount {
    /// Starts a new census (with `timeouts`) in the background if the last
    /// one is older than [`COUNT_MAX_AGE`] and none is running.
    fn refresh(self: &Arc<Self>, timeouts: &Timeouts) {
        let start = {
            let Ok(mut state) = self.state.lock() else {
                return;
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
    }

    /// The last count of entries (see [`Self::refresh`]).
    fn get(self: &Arc<Self>, timeouts: &Timeouts) -> usize {
        self.refresh(timeouts);
        self.entries.load(Ordering::Relaxed)
    }

    /// The last census (see [`Self::refresh`]).
    fn figures(self: &Arc<Self>, timeouts: &Timeouts) -> Arc<ConntrackFigures> {
        self.refresh(timeouts);
        self.figures
            .lock()
            .map(|f| Arc::clone(&f))
            .unwrap_or_default()
    }

    fn count(&self, timeouts: &Timeouts) {
        let mut census = Census::default();
        let walked = self.tables.walk(timeouts, conntrack::now_ns(), |f| {
            census.add(&f);
            true
        });
        match walked {
            Ok(()) => {
                self.entries.store(census.total, Ordering::Relaxed);
                if let Ok(mut figures) = self.figures.lock() {
                    *figures = Arc::new(census.finish());
                }
            }
            Err(e) => tracing::warn!("count the conntrack entries: {e}"),
        }
        if let Ok(mut state) = self.state.lock() {
            *state = (Some(Instant::now()), false);
        }
    }
}

/// Conntrack figures being gathered, a flow at a time.
#[derive(Default)]
struct Census {
    total: usize,
    entries: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    masquerade: BTreeMap<String, u64>,
}

impl Census {
    fn add(&mut self, f: &conntrack::FlowEntries) {
        let n = 1 + usize::from(f.reply.is_some());
        self.total += n;
        let table = if f.confirmed { "main" } else { "new" };
        let protocol = match f.key.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::ICMP => "icmp",
            _ => "other",
        };
        *self
            .entries
            .entry((table, protocol, ct_state::name(f.orig.state)))
            .or_default() += n as u64;
        if f.orig.action == ct_action::SNAT {
            let [a, b, c, d] = f.key.daddr;
            let dest = format!("{a}.{b}.{c}.{d}:{}/{protocol}", f.key.dport);
            *self.masquerade.entry(dest).or_default() += 1;
        }
    }

    fn finish(self) -> ConntrackFigures {
        let mut masquerade: Vec<MasqueradeFigure> = self
            .masquerade
            .into_iter()
            .map(|(destination, ports)| MasqueradeFigure { destination, ports })
            .collect();
        masquerade.sort_by(|a, b| {
            b.ports
                .cmp(&a.ports)
                .then(a.destination.cmp(&b.destination))
        });
        masquerade.truncate(MASQUERADE_DESTINATIONS);
        ConntrackFigures {
            entries: self
                .entries
                .into_iter()
                .map(|((table, protocol, state), entries)| ConntrackFigure {
                    table: table.to_owned(),
                    protocol: protocol.to_owned(),
                    state: state.to_owned(),
                    entries,
                })
                .collect(),
            masquerade,
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
            figures: Mutex::default(),
            state: Mutex::new((None, false)),
        });
        Ok(Self {
            stats: second_handle(&dp.stats, names::STATS)?,
            tables,
            rate_stats: second_handle(&dp.rate_stats, names::RATE_STATS)?,
            count,
            ct_containers: second_handle(&dp.ct_containers, names::CT_CONTAINERS)?,
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
    /// ports in use by destination, as counted in the background within the
    /// last second or so (like [`Self::conntrack_entries`]).
    pub fn conntrack_figures(&self, timeouts: &Timeouts) -> Arc<ConntrackFigures> {
        self.count.figures(timeouts)
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
