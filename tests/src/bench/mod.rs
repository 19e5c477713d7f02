//! `cargo xtask bench`: this datapath against iptables, nftables and plain
//! routing, side by side, in namespace nodes.
//!
//! * [`mode`]: the modes compared; [`bed`]: one namespace node per mode,
//!   with its container, servers and way of publishing ports (one module
//!   per kind of backend).
//! * Measurements, one module each: [`iperf`] (bulk TCP, small-packet
//!   UDP), [`rr`] (request/response latency), [`connrate`] (new
//!   connections per second), [`control`] (container add/delete), and the
//!   update timings in the beds' backends; [`cpu`] reads `/proc/stat`
//!   around them and waits for a quiet machine, [`snmp`] counts the
//!   datagrams that reach the container; [`ratelimit`] compares the rate
//!   limiter with tc tbf through [`crate::ratebench`]; [`flowcore`] loads
//!   the conntrack tables (sustained connections, SYN floods, masquerade
//!   to one destination, table walks); [`cluster`] compares pod to pod
//!   across two nodes with a kernel VXLAN overlay and plain routing;
//!   [`tails`] the latency tails with
//!   10,000 ports published (connect p99 per repetition, updates under
//!   load, the agent's CPU time).
//! * [`run`] schedules them (interleaved modes, repetitions, scaling
//!   sizes); [`results`] and [`stats`] keep and summarize the samples;
//!   [`targets`] checks the targets; [`report`] writes markdown and
//!   JSON.
//!
//! Every loop is bounded in count and time; every namespace is removed by
//! its guard, on errors and on SIGINT too.

pub mod api;
pub mod bed;
pub mod cluster;
pub mod connrate;
pub mod control;
pub mod cpu;
pub mod flowcore;
pub mod iperf;
pub mod local;
pub mod mode;
pub mod ratelimit;
pub mod report;
pub mod results;
pub mod rr;
pub mod run;
pub mod snmp;
pub mod sock;
pub mod stats;
pub mod tails;
pub mod targets;
