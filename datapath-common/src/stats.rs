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
    /// Dropped: the conntrack table is full.
    DropCtFull = "drop_ct_full",
    /// Dropped: no free masquerade port.
    DropSnatPortsExhausted = "drop_snat_ports_exhausted",
    /// Not forwarded: TTL would reach zero (dropped on the uplink; from a
    /// container, left to the node's stack, which answers time exceeded).
    DropTtlExceeded = "drop_ttl_exceeded",
    /// Dropped: IPv4 fragment of a flow we would have to translate.
    DropFragment = "drop_fragment",
    /// Dropped: malformed header (bad IHL, length, data offset).
    DropMalformed = "drop_malformed",
    /// Dropped: a container sent with a source address or MAC not its own.
    DropSpoofed = "drop_spoofed",
    /// Dropped: uplink packet straight to a container address.
    DropDirectRouting = "drop_direct_routing",
    /// Dropped: a redirect or checksum helper failed.
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
}

/// Number of counters: the length of the [`crate::names::STATS`] array.
pub const STAT_COUNT: u32 = Stat::ALL.len() as u32;
