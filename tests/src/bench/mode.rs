//! The ways of getting a client's packets to a container that the bench
//! compares.

use std::fmt;

/// One way of publishing a container's ports (or, for [`Mode::Route`], of
/// not translating at all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// No NAT: the client reaches the container's address through a route
    /// via the node, which forwards in the kernel. The limit of the path.
    Route,
    /// `iptables-legacy`: one DNAT rule per published port in a chain
    /// jumped to from nat PREROUTING, MASQUERADE in POSTROUTING, and
    /// nf_conntrack (what Docker and CNI portmap install).
    Iptables,
    /// The same rules through Debian's default `iptables` (nf_tables).
    IptablesNft,
    /// One nftables table whose DNAT looks the port up in a map: the best
    /// netfilter offers.
    NftablesMap,
    /// This datapath with its uplink hook in TC (`--xdp-mode off`).
    DatapathTc,
    /// This datapath with its uplink hook in native XDP (`--xdp-mode
    /// native`; the client's TX checksum offload is off, see FACTS).
    DatapathXdp,
    /// [`Mode::DatapathTc`] with its metrics scraped every second (the
    /// kernel's program statistics on): what observing costs.
    DatapathTcMetrics,
    /// [`Mode::DatapathTc`] with a `datapath monitor` of drops and flows
    /// running: what the monitor costs.
    DatapathTcMonitor,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 8] = [
        Mode::Route,
        Mode::Iptables,
        Mode::IptablesNft,
        Mode::NftablesMap,
        Mode::DatapathTc,
        Mode::DatapathXdp,
        Mode::DatapathTcMetrics,
        Mode::DatapathTcMonitor,
    ];

    /// The modes the targets speak of as "ours".
    pub const OURS: [Mode; 2] = [Mode::DatapathTc, Mode::DatapathXdp];

    /// The name used on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Route => "route",
            Mode::Iptables => "iptables",
            Mode::IptablesNft => "iptables-nft",
            Mode::NftablesMap => "nftables-map",
            Mode::DatapathTc => "datapath-tc",
            Mode::DatapathXdp => "datapath-xdp",
            Mode::DatapathTcMetrics => "datapath-tc-metrics",
            Mode::DatapathTcMonitor => "datapath-tc-monitor",
        }
    }

    /// The mode named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the mode publishes ports (every mode but [`Mode::Route`]).
    pub fn publishes(self) -> bool {
        self != Mode::Route
    }

    /// Whether the mode is this datapath (an agent runs in the node).
    pub fn is_datapath(self) -> bool {
        matches!(
            self,
            Mode::DatapathTc
                | Mode::DatapathXdp
                | Mode::DatapathTcMetrics
                | Mode::DatapathTcMonitor
        )
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_parses_back_from_its_name() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()), Some(m));
        }
        assert_eq!(Mode::parse("ipvs"), None);
        assert!(!Mode::Route.publishes() && Mode::Iptables.publishes());
    }
}
