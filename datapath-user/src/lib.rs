//! The datapath's userspace: the agent that loads the eBPF programs and
//! fills their maps, its HTTP API and CLI, and the CNI plugin.

/// The compiled eBPF object (all programs and maps), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath-ebpf"));

pub mod netlink;
pub mod netns;
