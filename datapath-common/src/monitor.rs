//! What the datapath tells about itself beyond [`crate::Stat`]: each
//! container's traffic ([`ContainerStats`], [`ContainerDrops`]) and the
//! monitor's events ([`Event`]), written by the programs into the
//! [`crate::names::EVENTS`] ring buffer while the monitor is on.

use bytemuck::{Pod, Zeroable};

use crate::{CtKey, STAT_COUNT};

/// Slots of the per-container counters: a container's counters are at
/// index `container_id % CONTAINER_SLOTS` ([`slot`]). The agent hands out
/// container ids so that no two live containers share a slot, and zeroes a
/// slot when it gives it to a new container.
pub const CONTAINER_SLOTS: u32 = crate::capacity::ENDPOINTS;

/// The counters' slot of container `container_id`.
#[inline(always)]
pub const fn slot(container_id: u32) -> u32 {
    container_id % CONTAINER_SLOTS
}

/// Per-CPU value of [`crate::names::CONTAINER_STATS`]: a container's IPv4
/// traffic through the datapath. `tx`: every packet the container sent
/// from its own address (seen by its veth's program); `rx`: packets the
/// datapath delivered to it (from the uplink: published ports, replies to
/// masqueraded flows, direct routing). Bytes are whole frames; a GSO
/// packet counts as its segments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ContainerStats {
    /// Packets delivered to the container.
    pub rx_packets: u64,
    /// Bytes delivered to the container.
    pub rx_bytes: u64,
    /// Packets the container sent.
    pub tx_packets: u64,
    /// Bytes the container sent.
    pub tx_bytes: u64,
}

/// Value of [`crate::names::CONTAINER_DROPS`] (not per-CPU; atomic adds:
/// drops are rare): a container's drops, indexed by [`crate::Stat`] like
/// [`crate::names::STATS`], so that every new drop reason is counted per
/// container too.
pub type ContainerDrops = [u64; STAT_COUNT as usize];

/// Bytes of the [`crate::names::EVENTS`] ring buffer (a power of two,
/// multiple of the page size): about 6,500 events in flight.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// At most this many events per CPU per [`MONITOR_WINDOW_NS`]: the rest
/// are counted ([`crate::Stat::MonitorSampledOut`]), not sent, so a flood
/// costs the monitor's reader a bounded rate.
pub const MONITOR_BURST: u32 = 64;

/// The window of [`MONITOR_BURST`]: 1 ms.
pub const MONITOR_WINDOW_NS: u64 = 1_000_000;

/// [`Event::kind`] values.
pub mod event_kind {
    /// A dropped packet; [`super::Event::reason`] says why.
    pub const DROP: u8 = 1;
    /// A new flow.
    pub const FLOW_NEW: u8 = 2;
    /// A TCP flow closed (FIN both ways or RST).
    pub const FLOW_CLOSED: u8 = 3;
    /// A flow removed once idle for its whole timeout.
    pub const FLOW_EXPIRED: u8 = 4;

    /// The kind's name in the monitor's output.
    pub const fn name(kind: u8) -> &'static str {
        match kind {
            DROP => "drop",
            FLOW_NEW => "flow-new",
            FLOW_CLOSED => "flow-closed",
            FLOW_EXPIRED => "flow-expired",
            _ => "unknown",
        }
    }
}

/// [`Event::hook`] values: where the datapath saw the packet.
pub mod hook {
    /// No packet (a flow's expiry timer).
    pub const TIMER: u8 = 0;
    /// TC ingress of the uplink.
    pub const UPLINK_TC: u8 = 1;
    /// XDP of the uplink.
    pub const UPLINK_XDP: u8 = 2;
    /// TC ingress of a container's host-side veth.
    pub const CONTAINER_TC: u8 = 3;
    /// TC ingress of the overlay (VXLAN) device: packets from the other
    /// nodes of the cluster.
    pub const OVERLAY_TC: u8 = 4;
    /// TC egress of the overlay (VXLAN) device: the node's own packets for
    /// containers on other nodes.
    pub const OVERLAY_EGRESS_TC: u8 = 5;

    /// The hook's name in the monitor's output.
    pub const fn name(hook: u8) -> &'static str {
        match hook {
            TIMER => "timer",
            UPLINK_TC => "uplink-tc",
            UPLINK_XDP => "uplink-xdp",
            CONTAINER_TC => "container-tc",
            OVERLAY_TC => "overlay-tc",
            OVERLAY_EGRESS_TC => "overlay-egress-tc",
            _ => "unknown",
        }
    }
}

/// One record of the [`crate::names::EVENTS`] ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// When (the programs' clock, ns).
    pub time_ns: u64,
    /// The packet's tuple as it arrived (for a flow: its original
    /// direction's). Zero where the packet was not parsed that far.
    pub key: CtKey,
    /// The container concerned (0: none known).
    pub container_id: u32,
    /// The interface the packet came in on (0 for timers).
    pub ifindex: u32,
    /// The frame's length (0 for flows).
    pub len: u32,
    /// For a drop, the [`crate::Stat`] index of its reason.
    pub reason: u16,
    /// [`event_kind`].
    pub kind: u8,
    /// [`hook`].
    pub hook: u8,
}

const _: () = {
    assert!(size_of::<ContainerStats>() == 32);
    assert!(size_of::<Event>() == 40);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: `#[repr(C)]`, no padding, every bit pattern valid.
    unsafe impl aya::Pod for ContainerStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
}
