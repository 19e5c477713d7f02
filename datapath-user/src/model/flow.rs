//! Tracked flows as the API lists them (`GET /v1/conntrack`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One end of a flow tuple: an address and a port.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowEndpoint {
    /// Address.
    pub addr: Ipv4Addr,
    /// Port (ICMP echo: identifier).
    pub port: u16,
}

/// One tracked flow: `GET /v1/conntrack` returns a list of these.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flow {
    /// `tcp`, `udp`, `icmp`.
    pub proto: String,
    /// `dnat` (to a published port), `snat` (masqueraded egress) or
    /// `routed` (directly routed, tracked so replies are not masqueraded).
    pub kind: String,
    /// Source as first seen.
    pub orig_src: FlowEndpoint,
    /// Destination as first seen.
    pub orig_dst: FlowEndpoint,
    /// Source after translation.
    pub nat_src: FlowEndpoint,
    /// Destination after translation.
    pub nat_dst: FlowEndpoint,
    /// TCP state (`syn`, `established`, `closing`), or `active` for others.
    pub state: String,
    /// Seconds since the first packet.
    pub age_s: u64,
    /// Seconds since the last packet in either direction.
    pub idle_s: u64,
    /// Seconds until it expires if idle.
    pub expires_in_s: u64,
    /// Packets in the original direction.
    pub packets: u64,
    /// Bytes in the original direction.
    pub bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
    /// Owning container, if it still exists.
    pub container: Option<String>,
}
