//! The rate limiter's side of the datapath: a token bucket per (cgroup,
//! direction) in RATE_LIMITS, its counters in RATE_STATS, and the cgroup
//! hooks that use them (see [`RateHook`]).

use std::{collections::HashSet, path::Path};

use aya::maps::{MapData, MapError, PerCpuHashMap, PerCpuValues};
use datapath_common::ratelimit::{
    RateFlows, RateKey, RateLimit, RateStats, default_burst, direction,
};

use super::{BpfError, Datapath, RateHook, conntrack::now_ns};
use crate::model::{DirectionCounters, Limit, RateCounters, RateLimits};

/// `BPF_F_LOCK`: read or write a spin-locked map value under its lock.
pub const BPF_F_LOCK: u64 = 4;

/// What limits apply where: one container's cgroup and limits.
#[derive(Clone, Copy, Debug)]
pub struct RateTarget<'a> {
    /// The container's name (for messages).
    pub name: &'a str,
    /// Its host-side veth, which names its hooks' link pins.
    pub host_ifname: &'a str,
    /// Its cgroup v2 directory, if it has one.
    pub cgroup: Option<&'a Path>,
    /// That cgroup's id (0 without one, or while it does not exist).
    pub cgroup_id: u64,
    /// The limits.
    pub limits: RateLimits,
}

/// A failure applying limits to the datapath.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Attaching or detaching failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// A map update failed.
    #[error("{action}: {source}")]
    Map {
        /// What was being done.
        action: &'static str,
        /// The error.
        source: MapError,
    },
    /// The number of CPUs is unknown.
    #[error("count the CPUs: {0}")]
    Cpus(String),
    /// Limits without a cgroup (a bug: requests are validated first).
    #[error("container {0:?} has rate limits but no cgroup")]
    NoCgroup(String),
}

fn map_err(action: &'static str) -> impl FnOnce(MapError) -> ApplyError {
    move |source| ApplyError::Map { action, source }
}

impl Datapath {
    /// Makes the datapath match `t`'s limits: a bucket and a hook per
    /// limited direction on its cgroup (and the sock_ops hook that paces
    /// TCP senders and chooses TCP receivers' windows while either is
    /// limited), none for the others. A bucket that exists is reconfigured
    /// in place under its lock, so its state and counters survive and the
    /// change applies to the next packet (and to the next window of every
    /// socket). Hooks already attached are kept unless `reattach` (after a
    /// restart: the freshly loaded programs replace the old ones).
    ///
    /// The sock_ops hook stays attached after the limits are removed:
    /// paced and clamped sockets get their pacing and window back from it
    /// on their next segment. It goes with the container
    /// ([`Datapath::remove_limits`]).
    pub fn apply_limits(&mut self, t: &RateTarget<'_>, reattach: bool) -> Result<(), ApplyError> {
        let Some(cgroup) = t.cgroup else {
            return if t.limits.is_empty() {
                Ok(())
            } else {
                Err(ApplyError::NoCgroup(t.name.to_owned()))
            };
        };
        if t.cgroup_id == 0 {
            // The cgroup does not exist (yet): the limits are pending and
            // applied once it appears.
            return Ok(());
        }
        let now = now_ns();
        for hook in [RateHook::Egress, RateHook::Ingress] {
            let key = RateKey::new(t.cgroup_id, hook.direction());
            let Some(params) = t.limits.get(hook.direction()).and_then(|l| l.params()) else {
                self.detach_rate(hook, t.host_ifname)?;
                self.remove_bucket(key);
                continue;
            };
            match self.rate_limits.get(&key, BPF_F_LOCK) {
                Ok(mut bucket) => {
                    if bucket.params() != Some(params) {
                        bucket.reconfigure(&params, now);
                        self.rate_limits
                            .insert(key, bucket, BPF_F_LOCK)
                            .map_err(map_err("update a rate limit in place"))?;
                    }
                }
                Err(MapError::KeyNotFound) => self
                    .rate_limits
                    .insert(key, RateLimit::new(&params), 0)
                    .map_err(map_err("add a rate limit"))?,
                Err(e) => return Err(map_err("read a rate limit")(e)),
            }
            if hook == RateHook::Ingress
                && matches!(self.rate_flows.get(&key, 0), Err(MapError::KeyNotFound))
            {
                self.rate_flows
                    .insert(key, RateFlows::default(), 0)
                    .map_err(map_err("add a TCP flow count"))?;
            }
            if matches!(self.rate_stats.get(&key, 0), Err(MapError::KeyNotFound)) {
                let cpus = aya::util::nr_cpus()
                    .map_err(|(file, e)| ApplyError::Cpus(format!("{file}: {e}")))?;
                let zeros = PerCpuValues::try_from(vec![RateStats::default(); cpus])
                    .map_err(|e| ApplyError::Cpus(e.to_string()))?;
                self.rate_stats
                    .insert(key, zeros, 0)
                    .map_err(map_err("add rate limit counters"))?;
            }
            if reattach || !self.rate_attached(hook, t.host_ifname) {
                self.attach_rate(hook, cgroup, t.cgroup_id, t.host_ifname)?;
            }
        }
        if !t.limits.is_empty()
            && (reattach || !self.rate_attached(RateHook::SockOps, t.host_ifname))
        {
            self.attach_rate(RateHook::SockOps, cgroup, t.cgroup_id, t.host_ifname)?;
        }
        Ok(())
    }

    fn remove_bucket(&mut self, key: RateKey) {
        let _ = self.rate_limits.remove(&key);
        let _ = self.rate_stats.remove(&key);
        let _ = self.rate_flows.remove(&key);
    }

    /// Removes every hook and bucket of `t` (going on after failures,
    /// which are logged).
    pub fn remove_limits(&mut self, t: &RateTarget<'_>) {
        for hook in RateHook::ALL {
            if let Err(e) = self.detach_rate(hook, t.host_ifname) {
                tracing::warn!(container = %t.name, "detach {}: {e}", hook.name());
            }
        }
        if t.cgroup_id != 0 {
            for dir in [direction::EGRESS, direction::INGRESS] {
                self.remove_bucket(RateKey::new(t.cgroup_id, dir));
            }
        }
    }

    /// The limit each bucket was configured with (to rebuild a lost
    /// state).
    pub fn buckets(&self) -> Vec<(RateKey, Limit)> {
        self.rate_limits
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                // A bucket of the size the rate derives was most likely
                // not given: it keeps following the rate.
                let derived = default_burst(k.direction, v.rate_bps);
                (
                    k,
                    Limit {
                        rate_bps: v.rate_bps,
                        burst_bytes: v.burst_bytes,
                        burst_given: v.burst_bytes != derived,
                    },
                )
            })
            .collect()
    }

    /// Removes every bucket not in `limited` (pairs of cgroup id and
    /// direction); returns the cgroup ids of the buckets removed.
    pub fn retain_buckets(&mut self, limited: &HashSet<(u64, u32)>) -> Vec<u64> {
        let stale: Vec<RateKey> = self
            .rate_limits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !limited.contains(&(k.cgroup_id, k.direction)))
            .collect();
        for k in &stale {
            self.remove_bucket(*k);
        }
        stale.iter().map(|k| k.cgroup_id).collect()
    }
}

/// The counters of cgroup `cgroup_id` with `limits` in `stats`, summed over
/// CPUs (zero for an unlimited direction).
pub fn read_counters(
    stats: &PerCpuHashMap<MapData, RateKey, RateStats>,
    cgroup_id: u64,
    limits: &RateLimits,
) -> RateCounters {
    let read = |dir: u32| -> DirectionCounters {
        if cgroup_id == 0 || limits.get(dir).is_none() {
            return DirectionCounters::default();
        }
        stats
            .get(&RateKey::new(cgroup_id, dir), 0)
            .map(|per_cpu| {
                per_cpu
                    .iter()
                    .fold(RateStats::default(), |a, b| a.sum(b))
                    .into()
            })
            .unwrap_or_default()
    };
    RateCounters {
        egress: read(direction::EGRESS),
        ingress: read(direction::INGRESS),
    }
}
