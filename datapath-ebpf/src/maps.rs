//! The BPF maps. Layouts come from `datapath_common::maps`; the agent sizes
//! and pins them (aya-ebpf's BTF maps cannot pin by name).

use aya_ebpf::{
    btf_maps::{Array, HashMap, PerCpuArray},
    macros::btf_map,
};
use datapath_common::{
    Config, CtEntry, CtKey, Endpoint, EndpointKey, NodeAddr, NodeAddrKey, STAT_COUNT, ServiceKey,
    ServiceValue, Stat, capacity,
};

/// Global configuration, one entry.
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Published ports.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }> =
    HashMap::new();

/// Containers by address.
#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint, { capacity::ENDPOINTS as usize }> =
    HashMap::new();

/// The node's own addresses.
#[btf_map]
pub static NODE_ADDRS: HashMap<NodeAddrKey, NodeAddr, { capacity::NODE_ADDRS as usize }> =
    HashMap::new();

/// Connection tracking. A plain (not LRU) hash: when it is full new flows
/// are dropped and counted, and established flows are never evicted.
#[btf_map]
pub static CONNTRACK: HashMap<CtKey, CtEntry, { capacity::CONNTRACK as usize }> = HashMap::new();

/// Per-CPU counters indexed by [`Stat`].
#[btf_map]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Adds one to counter `stat` on this CPU.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs.
        unsafe { *c += 1 };
    }
}

/// The configuration, if an agent has written it.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG
        .get(0)
        .filter(|c| c.flags & datapath_common::CONFIG_F_READY != 0)
}

/// Token buckets per (cgroup, direction); see `datapath_common::ratelimit`.
#[btf_map]
pub static RATE_LIMITS: aya_ebpf::btf_maps::HashMap<
    datapath_common::ratelimit::RateKey,
    datapath_common::ratelimit::RateLimit,
    { capacity::RATE_LIMITS as usize },
> = aya_ebpf::btf_maps::HashMap::new();

/// Per-CPU counters of each bucket.
#[btf_map]
pub static RATE_STATS: aya_ebpf::btf_maps::PerCpuHashMap<
    datapath_common::ratelimit::RateKey,
    datapath_common::ratelimit::RateStats,
    { capacity::RATE_LIMITS as usize },
> = aya_ebpf::btf_maps::PerCpuHashMap::new();

/// The TCP sockets sharing each ingress bucket's receive windows (entries
/// made and removed by the agent with the bucket; counted by sock_ops).
#[btf_map]
pub static RATE_FLOWS: aya_ebpf::btf_maps::HashMap<
    datapath_common::ratelimit::RateKey,
    datapath_common::ratelimit::RateFlows,
    { capacity::RATE_LIMITS as usize },
> = aya_ebpf::btf_maps::HashMap::new();

/// The bucket key of each cgroup attachment of the rate limiter, written by
/// the agent after attaching: a program attached to a container's cgroup
/// also runs for the cgroups below it, and this is how it knows whose
/// bucket to charge.
#[btf_map]
#[allow(deprecated)]
pub static RATE_CGROUPS: aya_ebpf::btf_maps::CgroupStorage<datapath_common::ratelimit::RateKey> =
    aya_ebpf::btf_maps::CgroupStorage::new();
