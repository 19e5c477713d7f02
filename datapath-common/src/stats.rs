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
    /// Dropped: the datapath is not configured yet.
    DropNotConfigured = "drop_not_configured",
}

/// Number of counters: the length of the [`crate::names::STATS`] array.
pub const STAT_COUNT: u32 = Stat::ALL.len() as u32;
