//! What the cluster keeps in etcd, under `/datapath/v1/`:
//!
//! * `/datapath/v1/cidrs/<cidr>` → the owning node's name: a node CIDR's
//!   claim (no lease: a node keeps its CIDR across restarts).
//! * `/datapath/v1/nodes/<name>` → a [`NodeRecord`] (JSON), under the
//!   node's lease: it disappears when the node stops renewing it.
//!
//! Records carry a schema number; a reader skips (and logs) a record of a
//! schema it does not know rather than guessing at its fields.

use std::net::Ipv4Addr;

use datapath_common::overlay;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Prefix of every node CIDR claim.
pub const CIDRS: &str = "/datapath/v1/cidrs/";
/// Prefix of every node record.
pub const NODES: &str = "/datapath/v1/nodes/";
/// The node record schema this agent writes and reads.
pub const SCHEMA: u32 = 1;

/// The key of node `name`'s record.
pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

/// The key of the claim on `cidr`.
pub fn cidr_key(cidr: Ipv4Net) -> String {
    format!("{CIDRS}{cidr}")
}

/// Whether `name` may name a node: 1-63 letters, digits, `-`, `_`, `.`.
pub fn valid_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// How other nodes reach this node's containers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// Encapsulation: `vxlan`.
    pub kind: String,
    /// UDP port of the endpoint.
    pub port: u16,
    /// VXLAN network identifier.
    pub vni: u32,
}

impl Default for Overlay {
    fn default() -> Self {
        Self {
            kind: "vxlan".to_owned(),
            port: overlay::PORT,
            vni: overlay::VNI,
        }
    }
}

/// A node of the cluster, as registered in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Schema number ([`SCHEMA`]).
    pub schema: u32,
    /// The node's name (also its key).
    pub name: String,
    /// Its underlay address: where the overlay's packets go.
    pub underlay: Ipv4Addr,
    /// Its node CIDR: the addresses of its containers.
    pub cidr: Ipv4Net,
    /// Its overlay endpoint.
    pub overlay: Overlay,
}

/// Why a record was not used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Written by a newer (or unknown) version of the agent.
    #[error("unknown schema {0}")]
    UnknownSchema(u64),
    /// Not a record at all.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// Its name is not the one of its key.
    #[error("record of {record:?} under the key of {key:?}")]
    NameMismatch {
        /// The name in the key.
        key: String,
        /// The name in the record.
        record: String,
    },
    /// An overlay this agent cannot send to.
    #[error("unsupported overlay {0:?}")]
    UnsupportedOverlay(String),
}

impl NodeRecord {
    /// A record of the current schema.
    pub fn new(name: &str, underlay: Ipv4Addr, cidr: Ipv4Net) -> Self {
        Self {
            schema: SCHEMA,
            name: name.to_owned(),
            underlay,
            cidr,
            overlay: Overlay::default(),
        }
    }

    /// The record's JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the record stored under node name `key_name`: the schema is
    /// checked before anything else.
    pub fn parse(key_name: &str, value: &[u8]) -> Result<Self, RecordError> {
        let v: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| RecordError::Malformed(e.to_string()))?;
        let schema = v
            .get("schema")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| RecordError::Malformed("no schema".to_owned()))?;
        if schema != u64::from(SCHEMA) {
            return Err(RecordError::UnknownSchema(schema));
        }
        let r: Self =
            serde_json::from_value(v).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if r.name != key_name {
            return Err(RecordError::NameMismatch {
                key: key_name.to_owned(),
                record: r.name,
            });
        }
        if r.overlay.kind != "vxlan" || r.overlay.port != overlay::PORT {
            return Err(RecordError::UnsupportedOverlay(format!(
                "{}:{}",
                r.overlay.kind, r.overlay.port
            )));
        }
        Ok(Self {
            cidr: r.cidr.trunc(),
            ..r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_unknown_schemas_are_refused() {
        let r = NodeRecord::new(
            "n1",
            Ipv4Addr::new(198, 18, 0, 11),
            "198.19.1.0/24".parse().expect("CIDR"),
        );
        assert_eq!(
            NodeRecord::parse("n1", r.to_json().as_bytes()),
            Ok(r.clone())
        );
        let newer = r.to_json().replace("\"schema\":1", "\"schema\":2");
        assert_eq!(
            NodeRecord::parse("n1", newer.as_bytes()),
            Err(RecordError::UnknownSchema(2))
        );
        assert!(matches!(
            NodeRecord::parse("n2", r.to_json().as_bytes()),
            Err(RecordError::NameMismatch { .. })
        ));
        assert!(matches!(
            NodeRecord::parse("n1", b"{\"schema\":1}"),
            Err(RecordError::Malformed(_))
        ));
    }
}
