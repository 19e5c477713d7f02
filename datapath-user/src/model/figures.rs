//! What the datapath has done, as one set of figures: `datapath status`
//! shows them in words and the metrics page in the Prometheus format, so
//! the two always agree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::RateCounters;

/// Every figure of the datapath at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    /// The datapath's counters by name, summed over CPUs (the `STATS` map:
    /// `drop_*` are drops by reason).
    pub counters: BTreeMap<String, u64>,
    /// Each container's figures, by name.
    pub containers: Vec<ContainerFigures>,
    /// Conntrack entries (two per flow) by table, protocol and state.
    pub conntrack: Vec<ConntrackFigure>,
    /// Capacity of the main conntrack table (entries).
    pub conntrack_max: u64,
    /// Capacity of the table of unconfirmed flows (entries).
    pub conntrack_new_max: u64,
    /// Masquerade ports in use per destination (address, port, protocol),
    /// the busiest [`MASQUERADE_DESTINATIONS`] destinations.
    pub masquerade: Vec<MasqueradeFigure>,
    /// Ports of the masquerade range (per destination).
    pub masquerade_range: u64,
    /// Kernel statistics of the attached programs (only while the kernel
    /// gathers them; see [`Figures::program_stats`]).
    pub programs: Vec<ProgramFigure>,
    /// Whether the kernel gathers program run times now
    /// (`BPF_ENABLE_STATS`): while metrics are scraped, or by
    /// `--bpf-stats`.
    pub program_stats: bool,
    /// The agent's own CPU time since it started, in user mode and in the
    /// kernel on its behalf (µs).
    #[serde(default)]
    pub agent_cpu_user_us: u64,
    /// See [`Figures::agent_cpu_user_us`].
    #[serde(default)]
    pub agent_cpu_system_us: u64,
    /// Passes made by the background count of the conntrack entries (its
    /// only periodic work).
    #[serde(default)]
    pub conntrack_count_passes: u64,
    /// The most entries one pass of that count touched.
    #[serde(default)]
    pub conntrack_count_max_pass_entries: u64,
}

/// How many masquerade destinations [`Figures::masquerade`] lists at most:
/// the label stays bounded whatever the containers connect to.
pub const MASQUERADE_DESTINATIONS: usize = 32;

/// One container's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerFigures {
    /// Its name.
    pub name: String,
    /// Packets the datapath delivered to it.
    pub rx_packets: u64,
    /// Bytes the datapath delivered to it (whole frames).
    pub rx_bytes: u64,
    /// Packets it sent.
    pub tx_packets: u64,
    /// Bytes it sent (whole frames).
    pub tx_bytes: u64,
    /// Its drops by reason (only reasons that occurred).
    pub drops: BTreeMap<String, u64>,
    /// Its entries in the main conntrack table.
    pub conntrack_entries: u64,
    /// Its flows kept out of the main table (share used up).
    pub conntrack_over_share: u64,
    /// Its new flows dropped for want of a masquerade port.
    pub masquerade_exhausted: u64,
    /// Its rate limiter's counters.
    pub rate: RateCounters,
}

/// Conntrack entries of one table, protocol and state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackFigure {
    /// `main` (confirmed flows) or `new` (unconfirmed).
    pub table: String,
    /// `tcp`, `udp`, `icmp`.
    pub protocol: String,
    /// The flows' state (`established`, `syn-sent`, …).
    pub state: String,
    /// Entries (two per flow).
    pub entries: u64,
}

/// Masquerade ports in use towards one destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasqueradeFigure {
    /// `address:port/protocol`.
    pub destination: String,
    /// Ports in use.
    pub ports: u64,
}

/// Kernel statistics of one program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramFigure {
    /// The program's name.
    pub program: String,
    /// Where it is attached (interface or hook).
    pub attachment: String,
    /// Time spent running it (ns).
    pub run_time_ns: u64,
    /// Times it ran.
    pub run_count: u64,
}
