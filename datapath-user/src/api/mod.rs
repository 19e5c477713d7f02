//! The agent's HTTP+JSON API over a unix socket: its wire types
//! ([`wire`]), the server ([`server`], which serves any [`server::Backend`]:
//! the agent plugs itself in) and a client ([`client`]) for the CLI and the
//! CNI plugin. Nothing here depends on the agent.
//!
//! Routes (all JSON; errors are `{"error": "..."}` with a 4xx/5xx status):
//! * `GET /v1/status`
//! * `GET /v1/containers`, `POST /v1/containers` ([`AddContainer`]),
//!   `GET|DELETE /v1/containers/{name}`, `PATCH /v1/containers/{name}`
//!   ([`UpdateContainer`]: rate limits)
//! * `POST|DELETE /v1/containers/{name}/ports` ([`PortRequest`])
//! * `GET /v1/conntrack`, `DELETE /v1/conntrack[?container=NAME]`
//!
//! Usable with `curl --unix-socket /run/datapath/api.sock http://x/v1/status`.

pub mod client;
pub mod server;
pub mod wire;

pub use client::{Client, ClientError};
pub use wire::*;

/// Where the agent listens unless told otherwise (`--api-socket`,
/// `DATAPATH_API_SOCKET`, the CNI plugin's `agentSocket`).
pub const DEFAULT_SOCKET: &str = "/run/datapath/api.sock";
