//! A read-only view of the datapath for the API's reads (status, listings,
//! flows), on map handles of its own: reading through it never waits for
//! the owner of the [`Datapath`], whatever that is busy with. Reads are
//! plain syscalls that may walk a large map: call them off the async
//! workers (`spawn_blocking`).
//!
//! Nothing here holds a whole table in memory: flows are walked a batch
//! at a time ([`Reader::walk_flows`]), and the conntrack entries are
//! counted (by table, protocol and state, with the masquerade ports by
//! destination) in the background, never by the read that asks for them,
//! in passes of bounded work ([`Reader::conntrack_entries`],
//! [`Reader::conntrack_figures`], [`COUNT_PASS_BUDGET`]).

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

/// The most entries one pass of the count touches: entries read from the
/// tables plus reply entries looked up. Whatever the tables' sizes, the
/// count costs at most this per [`COUNT_PASS_INTERVAL`] (about a hundred
/// batch reads and half as many lookups as entries: a few tens of ms of one
/// CPU); a table larger than this is counted over several passes.
pub const COUNT_PASS_BUDGET: usize = 65_536;

/// The least time between the starts of two passes of the count.
const COUNT_PASS_INTERVAL: Duration = Duration::from_secs(1);

/// The smallest batch a pass of the count reads: the pass ends when less
/// than twice this is left of its budget. A batch holds whole buckets of
/// the hash table, and a bucket holds far fewer entries than this (the
/// table has at least as many buckets as entries), so a batch never
/// grows past what was asked and a pass never past its budget.
const COUNT_MIN_BATCH: usize = 64;

/// What the count of the conntrack entries has cost so far (the only
/// periodic work of the agent: the kernel expires flows itself).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountWork {
    /// Passes made.
    pub passes: u64,
    /// Walks of both tables completed (each publishing a new count).
    pub walks: u64,
    /// Entries touched (read or looked up) by the last pass.
    pub last_pass_entries: u64,
    /// The most entries touched by one pass.
    pub max_pass_entries: u64,
    /// The most syscalls made by one pass.
    pub max_pass_syscalls: u64,
}

/// Where a walk of both tables for the count is, and what it has counted.
#[derive(Default)]
struct CountWalk {
    /// The main table's cursor, then the unconfirmed table's.
    ct: conntrack::BatchCursor,
    ct_new: conntrack::BatchCursor,
    /// The live entries counted so far, by table, protocol and state,
    /// with the masquerade ports by destination.
    census: Census,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    entries: u64,
    syscalls: u64,
}

impl Tables {
    /// One pass of the count: goes on with `walk` for at most `budget`
    /// entries touched (read, or looked up as a reply), adding the live
    /// ones (flows not expired at `now`, two entries per answered flow).
    fn count_pass(
        &self,
        walk: &mut CountWalk,
        budget: usize,
        timeouts: &Timeouts,
        now: u64,
    ) -> io::Result<Pass> {
        let mut pass = Pass::default();
        let mut left = budget;
        let mut main: Vec<(CtKey, CtTimedEntry)> = Vec::new();
        // A batch of n entries touches at most 2n: n read, n lookups.
        while !walk.ct.done() && left >= 2 * COUNT_MIN_BATCH {
            walk.ct
                .next(self.ct.map(), (left / 2).min(WALK_BATCH), &mut main)?;
            pass.syscalls += 1;
            let mut touched = main.len();
            for (key, v) in &main {
                if !v.entry.is_original() {
                    continue;
                }
                let reply_key = v.entry.peer_key(key);
                let reply = lookup(self.ct.get(&reply_key, 0))?.map(|r| r.entry);
                pass.syscalls += 1;
                touched += 1;
                let f = flow(*key, v.entry, reply_key, reply, true);
                if !f.expired(timeouts, now) {
                    walk.census.add(&f);
                }
            }
            left = left.saturating_sub(touched);
            pass.entries += touched as u64;
        }
        let mut new: Vec<(CtKey, CtEntry)> = Vec::new();
        while walk.ct.done() && !walk.ct_new.done() && left >= 2 * COUNT_MIN_BATCH {
            walk.ct_new
                .next(self.ct_new.map(), (left / 2).min(WALK_BATCH), &mut new)?;
            pass.syscalls += 1;
            let mut touched = new.len();
            for (key, v) in &new {
                if !v.is_original() {
                    continue;
                }
                let reply_key = v.peer_key(key);
                let reply = lookup(self.ct_new.get(&reply_key, 0))?;
                pass.syscalls += 1;
                touched += 1;
                let f = flow(*key, *v, reply_key, reply, false);
                if !f.expired(timeouts, now) {
                    walk.census.add(&f);
                }
            }
            left = left.saturating_sub(touched);
            pass.entries += touched as u64;
        }
        Ok(pass)
    }
}

/// The conntrack tables' census (entries by table, protocol and state;
/// masquerade ports by destination), taken on a thread of its own in passes
/// of bounded work ([`COUNT_PASS_BUDGET`] entries touched at most per
/// [`COUNT_PASS_INTERVAL`]), and only while someone asks.
struct EntryCount {
    tables: Arc<Tables>,
    entries: AtomicUsize,
    figures: Mutex<Arc<ConntrackFigures>>,
    work: Mutex<CountWork>,
    /// When the last count finished, and whether one is running.
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

    /// One whole count, pass by pass, each pass starting at least
    /// [`COUNT_PASS_INTERVAL`] after the one before.
    fn count(&self, timeouts: &Timeouts) {
        let mut walk = CountWalk::default();
        loop {
            let started = Instant::now();
            let pass =
                self.tables
                    .count_pass(&mut walk, COUNT_PASS_BUDGET, timeouts, conntrack::now_ns());
            let finished = walk.ct.done() && walk.ct_new.done();
            match pass {
                Ok(pass) => {
                    if let Ok(mut work) = self.work.lock() {
                        work.passes += 1;
                        work.walks += u64::from(finished);
                        work.last_pass_entries = pass.entries;
                        work.max_pass_entries = work.max_pass_entries.max(pass.entries);
                        work.max_pass_syscalls = work.max_pass_syscalls.max(pass.syscalls);
                    }
                    if finished {
                        let census = std::mem::take(&mut walk.census);
                        self.entries.store(census.total, Ordering::Relaxed);
                        if let Ok(mut figures) = self.figures.lock() {
                            *figures = Arc::new(census.finish());
                        }
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("count the conntrack entries: {e}");
                    break;
                }
            }
            std::thread::sleep(COUNT_PASS_INTERVAL.saturating_sub(started.elapsed()));
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
    /// Masquerade ports by destination address, port and protocol (made
    /// into words only for the busiest, by [`Self::finish`]).
    masquerade: BTreeMap<([u8; 4], u16, &'static str), u64>,
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
            *self
                .masquerade
                .entry((f.key.daddr, f.key.dport, protocol))
                .or_default() += 1;
        }
    }

    fn finish(self) -> ConntrackFigures {
        let mut busiest: Vec<_> = self.masquerade.into_iter().collect();
        busiest.sort_by(|(a, a_ports), (b, b_ports)| b_ports.cmp(a_ports).then(a.cmp(b)));
        busiest.truncate(MASQUERADE_DESTINATIONS);
        let masquerade = busiest
            .into_iter()
            .map(|(([a, b, c, d], port, protocol), ports)| MasqueradeFigure {
                destination: format!("{a}.{b}.{c}.{d}:{port}/{protocol}"),
                ports,
            })
            .collect();
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
            work: Mutex::new(CountWork::default()),
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
    /// both tables, as last counted in the background: a read never walks
    /// the tables for it. A table larger than one pass's budget is
    /// counted over several passes, a second apart.
    pub fn conntrack_entries(&self, timeouts: &Timeouts) -> usize {
        self.count.get(timeouts)
    }

    /// What counting the conntrack entries has cost so far.
    pub fn count_work(&self) -> CountWork {
        self.count.work.lock().map(|w| *w).unwrap_or_default()
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
