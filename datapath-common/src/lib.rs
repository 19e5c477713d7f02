//! Everything the eBPF programs and the agent must agree on.
//!
//! * [`maps`]: the `#[repr(C)]` key and value types of every BPF map, their
//!   names and sizes. One definition serves the kernel side, the agent and the
//!   tests, so the layouts can never drift apart.
//! * [`flow`]: the flow core's layouts (conntrack, fragments), generic over
//!   the address family; [`ct`]: its timeouts and rules (TCP sequence
//!   windows, UDP streams, the masquerade port search).
//! * [`csum`]: incremental Internet checksum arithmetic (RFC 1624), used by the
//!   XDP program (which has no checksum helpers) and by the tests.
//! * [`stats`]: the counters every program exports, drop reasons included.
//! * [`ratelimit`]: the per-cgroup token buckets' layouts and arithmetic.
//! * [`monitor`]: per-container counters and the monitor's events.
//! * [`clock`]: the test clock that can stand in for the programs' clock.
//! * [`policy`]: who may send what (martian sources, neighbour discovery).
//!
//! The crate is `no_std` so that the eBPF crate can use it; the `user` feature
//! adds the userspace-only trait impls.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

pub mod clock;
pub mod csum;
pub mod ct;
pub mod flow;
pub mod maps;
pub mod monitor;
pub mod policy;
pub mod ratelimit;
pub mod stats;

pub use flow::*;
pub use maps::*;
pub use stats::{STAT_COUNT, Stat};
