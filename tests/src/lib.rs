//! Test harnesses of the datapath.
//!
//! * Packet tests run the real eBPF programs on crafted frames with
//!   `BPF_PROG_TEST_RUN`: [`frame`] builds frames, [`programs`] loads the
//!   object, fills its maps and runs a program, [`testbed`] is the
//!   datapath most of them run on, [`packet`] reads the result back and
//!   verifies checksums.
//! * Namespace tests build a whole node out of network namespaces:
//!   [`netns`] (one namespace), [`node`] (client, node and containers),
//!   [`agent`] (the agent running in the node), [`cgroup`] (cgroups for
//!   the rate limiter), [`lock`] (serialising traffic-heavy tests) and
//!   [`leaks`] (finding what a test left behind); [`traffic`] (servers and
//!   clients of real traffic) and [`inspect`] (bpftool and `ip` views of
//!   what the agent made); [`ratebench`] (iperf3 runners and the rate
//!   limiter's benchmark against tc tbf); [`cluster`] (an underlay switch,
//!   nodes on it and etcd, for cluster mode); [`sandbox`] (a node-like mount
//!   namespace for programs run with their default paths: the README's
//!   commands, containerd).
//! * [`bench`] compares the datapath with iptables, nftables and plain
//!   routing (`cargo xtask bench`).
//!
//! Everything a test creates is named with the [`names::PREFIX`] prefix and a
//! per-process unique id, and removed by a guard's `Drop`.

pub mod agent;
pub mod bench;
pub mod capture;
pub mod cgroup;
pub mod cluster;
pub mod events;
pub mod fixture;
pub mod frame;
pub mod inspect;
pub mod leaks;
pub mod lock;
pub mod names;
pub mod netns;
pub mod nginx;
pub mod node;
pub mod packet;
pub mod programs;
pub mod ratebench;
pub mod sandbox;
pub mod sys;
pub mod testbed;
pub mod traffic;
pub mod wait;
