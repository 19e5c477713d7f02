//! Counters exported by every program through the per-CPU [`crate::names::STATS`]
//! array, indexed by [`Stat`]. Drops are never silent: each has a reason here.

macro_rules! stats {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Index into the per-CPU counters array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $($(#[$doc])* $variant,)*
        }

        impl Stat {
            /// Every counter, in index order.
            pub const ALL: &'static [Stat] = &[$(Stat::$variant,)*];

            /// The counter with index `i` ([`Stat::DropHelperFailed`] if
            /// there is none).
            #[inline(always)]
            pub const fn from_index(i: u32) -> Self {
                if i < Self::ALL.len() as u32 {
                    // SAFETY: `Stat` is `repr(u32)` with the discriminants
                    // 0..ALL.len(), and `i` is among them.
                    unsafe { core::mem::transmute::<u32, Stat>(i) }
                } else {
                    Stat::DropHelperFailed
                }
            }

            /// Whether the counter counts dropped packets (its name starts
            /// with `drop_`).
            pub const fn is_drop(self) -> bool {
                let n = self.name().as_bytes();
                n.len() > 5 && n[0] == b'd' && n[1] == b'r' && n[2] == b'o' && n[3] == b'p' && n[4] == b'_'
            }

            /// The counter's name in listings and the API.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)*
                }
            }
        }
    };
}

stats! {
    /// New DNAT flows (first packet to a published port).
    DnatNew = "dnat_new",
    /// Packets translated by a DNAT conntrack entry (either direction).
    DnatPackets = "dnat_packets",
    /// New masqueraded flows.
    SnatNew = "snat_new",
    /// Packets translated by a SNAT conntrack entry (either direction).
    SnatPackets = "snat_packets",
    /// ICMP errors about a tracked flow, translated.
    IcmpErrorTranslated = "icmp_error_translated",
    /// Packets passed to the kernel untouched (not ours).
    Passed = "passed",
    /// Flows confirmed (established TCP, UDP/ICMP streams): moved to the
    /// main table.
    CtConfirmed = "ct_confirmed",
    /// Flows that stayed unconfirmed because the main table was full.
    CtMainFull = "ct_main_full",
    /// Flows that stayed unconfirmed because their container used up its
    /// share of the main table.
    CtOverShare = "ct_over_share",
    /// Flows removed once idle for their whole timeout.
    CtExpired = "ct_expired",
    /// TCP flows closed (FIN both ways or an accepted RST): moved to the
    /// table of unconfirmed flows, where they give way first.
    CtClosed = "ct_closed",
    /// Closing or closed TCP flows reopened by a new SYN.
    CtReopened = "ct_reopened",
    /// RSTs outside the connection's window: passed on, the flow kept.
    CtRstIgnored = "ct_rst_ignored",
    /// TCP flows picked up from a segment without SYN.
    CtPickedUp = "ct_picked_up",
    /// Creations that lost a race with another CPU and used its entry.
    CtRaceLost = "ct_race_lost",
    /// Expiry timers that could not be armed (the flow stayed
    /// unconfirmed).
    CtTimerFailed = "ct_timer_failed",
    /// Non-first fragments translated through the fragment table.
    FragmentTranslated = "fragment_translated",
    /// Replies to the node's own connections left to the node even though
    /// their port is published.
    NodeFlowPassed = "node_flow_passed",
    /// Packets too big for their egress path, left to the node's stack,
    /// which answers "fragmentation needed".
    TooBig = "too_big",
    /// Monitor events not sent: over the per-CPU rate of
    /// `monitor::MONITOR_BURST` per millisecond.
    MonitorSampledOut = "monitor_sampled_out",
    /// Monitor events lost: the ring buffer was full (its reader is behind).
    MonitorLost = "monitor_lost",
    /// Node sockets sent to a container instead of a published port by the
    /// socket programs (connects, and UDP datagrams sent without one).
    SockTranslated = "sock_translated",
    /// New hairpin flows: a container to a port published on the node.
    HairpinNew = "hairpin_new",
    /// Dropped: the conntrack table is full.
    DropCtFull = "drop_ct_full",
    /// Dropped: the new flow's reply tuple belongs to another live flow.
    DropCtCollision = "drop_ct_collision",
    /// Dropped: no free masquerade port.
    DropSnatPortsExhausted = "drop_snat_ports_exhausted",
    /// Not forwarded: TTL would reach zero (dropped on the uplink; from a
    /// container, left to the node's stack, which answers time exceeded).
    DropTtlExceeded = "drop_ttl_exceeded",
    /// Dropped: a fragment whose first fragment was not seen (or expired),
    /// so its flow is unknown.
    DropFragment = "drop_fragment",
    /// Dropped: a packet from a container that would leave with its pool
    /// address (no flow, and none may be created: a TCP RST or FIN, or a
    /// datagram too big for the path without DF).
    DropNoFlow = "drop_no_flow",
    /// Dropped: malformed header (bad IHL, length, data offset).
    DropMalformed = "drop_malformed",
    /// Dropped: a container sent with a source address or MAC not its own.
    DropSpoofed = "drop_spoofed",
    /// Dropped: uplink packet straight to a container address.
    DropDirectRouting = "drop_direct_routing",
    /// Dropped: the interface a packet was redirected to refused it or is
    /// gone (a flow that outlived its container's veth).
    DropRedirectFailed = "drop_redirect_failed",
    /// Dropped: a checksum, rewrite or lookup helper failed.
    DropHelperFailed = "drop_helper_failed",
    /// Dropped: the datapath is not configured yet (container traffic is
    /// never passed unchecked).
    DropNotConfigured = "drop_not_configured",
    /// Dropped: an uplink packet from a martian source (loopback, 0/8,
    /// multicast, class E, link-local unless the node is link-local).
    DropMartian = "drop_martian",
    /// Dropped: an uplink packet claiming a source only the node or its
    /// containers hold (the pool, a node or the gateway address).
    DropUplinkSpoofed = "drop_uplink_spoofed",
    /// Dropped: a router advertisement from a container.
    DropRouterAdvertisement = "drop_router_advertisement",
    /// Dropped: an ICMP or ICMPv6 redirect from a container.
    DropRedirect = "drop_redirect",
    /// Dropped: an unsolicited neighbour advertisement from a container for
    /// an address not its own.
    DropNeighbourAdvertisement = "drop_neighbour_advertisement",
    /// Dropped (XDP): a translated packet's container has no endpoint to
    /// take its MACs from.
    DropNoEndpoint = "drop_no_endpoint",
    /// Dropped (XDP): the container's MACs could not be written into the
    /// frame.
    DropMacStore = "drop_mac_store",
    /// Packets from a container to a container on another node of the
    /// cluster, sent into the overlay (VXLAN) with the peer's address.
    OverlayEncapsulated = "overlay_encapsulated",
    /// Packets from the overlay delivered straight into a container.
    OverlayDelivered = "overlay_delivered",
    /// Dropped: a container sent to the cluster's network, but no node
    /// owns the destination (it is never masqueraded).
    DropNoPeer = "drop_no_peer",
    /// Dropped: an overlay packet whose inner source is not in the node
    /// CIDR of the node that sent it.
    DropOverlaySpoofed = "drop_overlay_spoofed",
}

/// Number of counters: the length of the [`crate::names::STATS`] array.
pub const STAT_COUNT: u32 = Stat::ALL.len() as u32;
