//! The BPF maps. Layouts come from `datapath_common::maps`; the agent sizes
//! and pins them (aya-ebpf's BTF maps cannot pin by name).

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use datapath_common::{
    CONFIG_F_MONITOR_DROPS, CONFIG_F_MONITOR_FLOWS, Config, CtContainer, Endpoint, EndpointKey,
    NodeAddr, NodeAddrKey, Peer, STAT_COUNT, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
    Stat, capacity, is_loopback,
    monitor::{
        CONTAINER_SLOTS, ContainerDrops, ContainerStats, EVENTS_BYTES, Event, MONITOR_BURST,
        MONITOR_WINDOW_NS, event_kind, slot,
    },
    proto,
};

use crate::conntrack::{FragTable, MainTable, NewTable};

/// Global configuration, one entry.
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Published ports.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { capacity::SERVICES as usize }> =
    HashMap::new();

/// The published addresses node sockets dialed (see `sock`).
#[btf_map]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { capacity::SOCK_REV as usize }> =
    LruHashMap::new();

/// Where a published port leads: the entry for the exact address, else
/// the wildcard entry, which only matches the node's own addresses (and,
/// for the node's own sockets, `from_node`, its loopback addresses). A
/// loopback address is never published to a packet: the uplink and the
/// containers cannot reach a port published on the node's loopback.
#[inline(always)]
pub fn service(
    addr: [u8; 4],
    port: u16,
    protocol: u8,
    from_node: bool,
) -> Option<&'static ServiceValue> {
    if protocol != proto::TCP && protocol != proto::UDP {
        return None;
    }
    let loopback = is_loopback(addr);
    if loopback && !from_node {
        return None;
    }
    let mut key = ServiceKey {
        addr,
        port,
        proto: protocol,
        _pad: 0,
    };
    // SAFETY: service values are only replaced whole by the agent; a torn
    // read is impossible for values this size under RCU.
    if let Some(v) = unsafe { SERVICES.get(&key) } {
        return Some(v);
    }
    if !loopback && unsafe { NODE_ADDRS.get(NodeAddrKey { addr }) }.is_none() {
        return None;
    }
    key.addr = [0; 4];
    unsafe { SERVICES.get(&key) }
}

/// Containers by address.
#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint, { capacity::ENDPOINTS as usize }> =
    HashMap::new();

/// The node's own addresses.
#[btf_map]
pub static NODE_ADDRS: HashMap<NodeAddrKey, NodeAddr, { capacity::NODE_ADDRS as usize }> =
    HashMap::new();

/// The other nodes of the cluster by node CIDR (see `overlay`).
#[btf_map]
pub static PEERS: LpmTrie<[u8; 4], Peer, { capacity::PEERS as usize }> = LpmTrie::new();

/// Confirmed flows, with their expiry timers (see `conntrack`). A plain
/// hash: nothing is ever evicted from it.
#[btf_map]
pub static CT: MainTable<[u8; 4]> = HashMap::new();

/// Unconfirmed flows: an LRU, where floods and closed flows push out only
/// each other.
#[btf_map]
pub static CT_NEW: NewTable<[u8; 4]> = LruHashMap::new();

/// Ports of fragmented datagrams, for their later fragments.
#[btf_map]
pub static CT_FRAGS: FragTable<[u8; 4]> = LruHashMap::new();

/// Each container's use of [`CT`] and what it was refused.
#[btf_map]
pub static CT_CONTAINERS: HashMap<u32, CtContainer, { capacity::CT_CONTAINERS as usize }> =
    HashMap::new();

/// Per-CPU scratch space of the programs: the parsed packet and the
/// request for a new flow live here rather than on the stack, which the
/// programs share (512 bytes) with the global functions they call. A
/// program runs to completion on its CPU before the next one there uses
/// it (softirq, or bottom halves disabled).
#[btf_map]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// See [`SCRATCH`].
#[repr(C)]
pub struct Scratch {
    /// The packet's flow.
    pub flow: crate::parse::Flow,
    /// A new flow's description.
    pub req: crate::conntrack::NewFlow<[u8; 4]>,
    /// Flows a flush removed.
    pub flushed: u64,
    /// The hook running ([`datapath_common::monitor::hook`]), for the
    /// monitor's events.
    pub hook: u32,
    /// The container the packet is from or for, once known (0: none), for
    /// its drop counters and the monitor's events.
    pub container: u32,
    /// Start of this CPU's monitor window (see [`emit`]).
    pub mon_window_ns: u64,
    /// Events sent in it.
    pub mon_sent: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU slot, used by one program run at a time (see
    // SCRATCH).
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Per-CPU counters indexed by [`Stat`].
#[btf_map]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Each container's packets and bytes, per CPU, by
/// [`datapath_common::monitor::slot`].
#[btf_map]
pub static CONTAINER_STATS: PerCpuArray<ContainerStats, { CONTAINER_SLOTS as usize }> =
    PerCpuArray::new();

/// Each container's drops by reason (atomic adds), by
/// [`datapath_common::monitor::slot`].
#[btf_map]
pub static CONTAINER_DROPS: Array<ContainerDrops, { CONTAINER_SLOTS as usize }> = Array::new();

/// Each container's host-side veth (ifindex) → its id: read only on the
/// drop path, for a packet dropped before its container is known.
#[btf_map]
pub static CONTAINER_VETHS: HashMap<u32, u32, { capacity::ENDPOINTS as usize }> = HashMap::new();

/// The monitor's events (drops, flows); written only while the monitor is
/// on.
#[btf_map]
pub static EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

/// Starts a packet's run: which hook, no container known yet.
#[inline(always)]
pub fn begin(sc: &mut Scratch, hook: u8) {
    sc.hook = u32::from(hook);
    sc.container = 0;
    // A drop before the packet is parsed must not show the last one's
    // addresses.
    sc.flow.key = datapath_common::CtKey::default();
}

/// Counts a packet of `frame_len` bytes (`segments` on the wire) to or
/// from container `container_id` on this CPU: an array slot, no lookup.
#[inline(always)]
pub fn account(container_id: u32, rx: bool, frame_len: u64, segments: u64) {
    if let Some(c) = CONTAINER_STATS.get_ptr_mut(slot(container_id)) {
        // SAFETY: per-CPU slot, no other writer while this program runs.
        unsafe {
            if rx {
                (*c).rx_packets += segments;
                (*c).rx_bytes += frame_len;
            } else {
                (*c).tx_packets += segments;
                (*c).tx_bytes += frame_len;
            }
        }
    }
}

/// Counts a dropped packet: globally, for its container if known, and
/// tells the monitor if it is on for drops.
#[inline(always)]
pub fn dropped(stat: Stat, ifindex: u32, frame_len: u32) {
    count(stat);
    let Some(sc) = scratch() else {
        return;
    };
    let mut id = sc.container;
    if id == 0 && sc.hook == u32::from(datapath_common::monitor::hook::CONTAINER_TC) {
        // A packet a container sent, dropped before its address was read:
        // its veth tells whose it is (a lookup on the drop path only).
        // SAFETY: plain values, replaced whole by the agent.
        if let Some(c) = unsafe { CONTAINER_VETHS.get(ifindex) } {
            id = *c;
            sc.container = id;
        }
    }
    if id != 0
        && let Some(d) = CONTAINER_DROPS.get_ptr_mut(slot(id))
    {
        // Opaque to the compiler, which would drop the bounds check the
        // verifier needs (it knows every `Stat` is in range).
        let i = stat as u32;
        // SAFETY: a local.
        let i = unsafe { core::ptr::read_volatile(&i) } as usize;
        if i < STAT_COUNT as usize {
            // SAFETY: a live array value, `i` below its length.
            unsafe { crate::conntrack::add((&raw mut (*d)[i]).cast(), 1) };
        }
    }
    if config().is_some_and(|c| c.flags & CONFIG_F_MONITOR_DROPS != 0) {
        let ev = Event {
            time_ns: crate::conntrack::now(),
            key: sc.flow.key,
            container_id: id,
            ifindex,
            len: frame_len,
            reason: stat as u16,
            kind: event_kind::DROP,
            hook: sc.hook as u8,
        };
        emit(sc, &ev);
    }
}

/// Tells the monitor, if it is on for flows, of flow event `kind` of the
/// flow of `key` (its original direction) of container `container_id`.
#[inline(always)]
pub fn flow_event(kind: u8, key: &datapath_common::CtKey, container_id: u32) {
    if !config().is_some_and(|c| c.flags & CONFIG_F_MONITOR_FLOWS != 0) {
        return;
    }
    let Some(sc) = scratch() else {
        return;
    };
    let ev = Event {
        time_ns: crate::conntrack::now(),
        key: *key,
        container_id,
        ifindex: 0,
        len: 0,
        reason: 0,
        kind,
        hook: if kind == event_kind::FLOW_NEW {
            sc.hook as u8
        } else {
            datapath_common::monitor::hook::TIMER
        },
    };
    emit(sc, &ev);
}

/// Writes `ev` to the ring buffer, at most [`MONITOR_BURST`] per CPU per
/// [`MONITOR_WINDOW_NS`] (the rest counted as sampled out); a full ring
/// buffer is counted as lost.
#[inline(always)]
fn emit(sc: &mut Scratch, ev: &Event) {
    if ev.time_ns.wrapping_sub(sc.mon_window_ns) >= MONITOR_WINDOW_NS {
        sc.mon_window_ns = ev.time_ns;
        sc.mon_sent = 0;
    }
    if sc.mon_sent >= MONITOR_BURST {
        count(Stat::MonitorSampledOut);
        return;
    }
    sc.mon_sent += 1;
    if EVENTS.output(ev, 0).is_err() {
        count(Stat::MonitorLost);
    }
}

/// Destinations container traffic keeps its source address for
/// (`--non-masquerade-cidr`): prefix → 1.
#[btf_map]
pub static NON_MASQUERADE: aya_ebpf::btf_maps::LpmTrie<
    [u8; 4],
    u8,
    { capacity::NON_MASQUERADE as usize },
> = aya_ebpf::btf_maps::LpmTrie::new();

/// Whether traffic to `addr` keeps the container's source address.
#[inline(always)]
pub fn non_masquerade(addr: [u8; 4]) -> bool {
    NON_MASQUERADE
        .get(&aya_ebpf::btf_maps::lpm_trie::Key::new(32, addr))
        .is_some()
}

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
