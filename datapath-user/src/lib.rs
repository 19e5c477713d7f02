//! The datapath's userspace: the agent that loads the eBPF programs and
//! fills their maps, its HTTP API and CLI, and the CNI plugin.

pub mod agent;
pub mod api;
pub mod bpf;
pub mod cli;
pub mod cni;
pub mod conntrack;
pub mod netlink;
pub mod netns;
pub mod ratelimit;
pub mod server;
pub mod spec;
pub mod state;

/// The compiled eBPF object (all programs and maps), embedded at build time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath-ebpf"));
