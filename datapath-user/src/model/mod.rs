//! The datapath's shared vocabulary: published ports, rate limits and the
//! limiter's counters, tracked flows, names, MAC addresses and MTUs. Every other
//! module speaks it; it depends on nothing else in this crate (only on the
//! map layouts of `datapath-common`), so that the API's wire types, the
//! persisted state, the agent and the CNI plugin can all use it without
//! depending on each other.

pub mod dual;
pub mod figures;
pub mod flow;
pub mod identity;
pub mod limits;
pub mod mac;
pub mod mtu;
pub mod names;
pub mod ports;

pub use dual::{DualPool, GATEWAY6};
pub use figures::Figures;
pub use flow::{Flow, FlowEndpoint};
pub use limits::{DirectionCounters, Limit, RateCounters, RateLimits};
pub use ports::{PortMapping, Protocol};
