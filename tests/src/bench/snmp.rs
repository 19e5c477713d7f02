//! A namespace's UDP counters (`/proc/net/snmp`): how many datagrams
//! reached its UDP layer, whether or not the application kept up.

use anyhow::{Context as _, Result};

use crate::netns::Netns;

/// The UDP counters the bench uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams delivered to sockets.
    pub in_datagrams: u64,
    /// Datagrams dropped because a socket's buffer was full.
    pub rcvbuf_errors: u64,
    /// Datagrams with a bad checksum.
    pub in_csum_errors: u64,
}

impl UdpCounters {
    /// Reads `ns`'s counters.
    pub fn read(ns: &Netns) -> Result<Self> {
        let text = ns.exec_ok("cat", ["/proc/net/snmp"]);
        Self::parse(&text).with_context(|| format!("no Udp counters in {}", ns.name()))
    }

    /// Parses the `Udp:` header and value lines of `/proc/net/snmp`.
    pub fn parse(snmp: &str) -> Option<Self> {
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next()?, udp.next()?);
        let field = |name: &str| {
            let i = names.split_whitespace().position(|n| n == name)?;
            values.split_whitespace().nth(i)?.parse().ok()
        };
        Some(Self {
            in_datagrams: field("InDatagrams")?,
            rcvbuf_errors: field("RcvbufErrors")?,
            in_csum_errors: field("InCsumErrors")?,
        })
    }

    /// Datagrams that reached the UDP layer intact since `earlier`:
    /// delivered plus dropped for a full socket buffer.
    pub fn arrived_since(&self, earlier: &Self) -> u64 {
        (self.in_datagrams + self.rcvbuf_errors)
            .saturating_sub(earlier.in_datagrams + earlier.rcvbuf_errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_lines_are_matched_by_name() {
        let snmp = "Tcp: RtoAlgorithm\nTcp: 1\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    Udp: 100 1 2 3 40 0 5\n";
        let a = UdpCounters::parse(snmp).expect("parses");
        assert_eq!(
            a,
            UdpCounters {
                in_datagrams: 100,
                rcvbuf_errors: 40,
                in_csum_errors: 5
            }
        );
        let b = UdpCounters {
            in_datagrams: 150,
            rcvbuf_errors: 60,
            ..a
        };
        assert_eq!(b.arrived_since(&a), 70);
        assert!(UdpCounters::parse("Tcp: x\nTcp: 1\n").is_none());
    }
}
