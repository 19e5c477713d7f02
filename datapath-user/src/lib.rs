//! The datapath's userspace: the agent that loads the eBPF programs and
//! fills their maps, its HTTP API and CLI, and the CNI plugin.
//!
//! Modules, each depending only on those listed before it (see
//! ARCHITECTURE.md):
//!
//! * [`model`]: the shared vocabulary (ports, limits, flows, names, MACs);
//!   [`error`] and [`cgroup`]: small helpers.
//! * [`api`]: wire types, the HTTP server (of any [`api::server::Backend`])
//!   and its client.
//! * [`store`]: the persisted desired state.
//! * [`net`]: rtnetlink links, addresses, routes; network namespaces.
//! * [`datapath`]: the eBPF object, its maps and programs.
//! * [`agent`]: the owner task and its parts (lifecycle, publishing,
//!   reconcile, status).
//! * [`cluster`]: cluster mode: the node CIDR claim, registration and the
//!   other nodes, kept in etcd.
//! * [`cni`]: the CNI plugin, a client of the API.
//! * [`cli`]: the `datapath` command line.

pub mod agent;
pub mod api;
pub mod cgroup;
pub mod cli;
pub mod cluster;
pub mod cni;
pub mod datapath;
pub mod error;
pub mod metrics;
pub mod model;
pub mod net;
pub mod store;

pub use datapath::EBPF_OBJECT;
