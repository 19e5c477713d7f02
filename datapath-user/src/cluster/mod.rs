//! Cluster mode: many nodes, one container network, kept in etcd (v3).
//!
//! * [`record`]: the keys under `/datapath/v1/` and the node record's
//!   schema; records of an unknown schema are skipped and logged.
//! * [`claim`]: the node CIDR, claimed from the cluster CIDR with an etcd
//!   transaction (create-if-absent): two nodes racing never get the same
//!   one, and a node restarted under the same name gets its own back.
//! * [`sync`]: the node's record, registered under a lease kept alive, and
//!   the other nodes, listed and then watched from the listing's revision;
//!   on any failure the session starts over with backoff (re-register,
//!   list, watch: a resync), while the datapath keeps the last known peers.
//!
//! The store client is `etcd-client`; nothing here touches the datapath:
//! the agent turns the peers [`sync`] publishes into its maps.

pub mod claim;
pub mod record;
pub mod sync;

use std::{net::Ipv4Addr, time::Duration};

use etcd_client::{Client, ConnectOptions};
use ipnet::Ipv4Net;

pub use self::{
    record::{NodeRecord, Overlay},
    sync::{PeerRoute, View},
};

/// How cluster mode is configured (`datapath agent --cluster-store …`).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://ADDR:2379`).
    pub endpoints: Vec<String>,
    /// This node's name in the cluster.
    pub node_name: String,
    /// The cluster's container network.
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of each node's CIDR.
    pub node_cidr_size: u8,
    /// Wait for the store at start instead of failing.
    pub wait: bool,
    /// TTL of the node's lease: a node whose agent stops renewing it is
    /// removed from every peer this long after.
    pub lease_ttl: Duration,
}

/// An error of cluster mode.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The store could not be reached or refused a request.
    #[error("cluster store {endpoints}")]
    Store {
        /// The endpoints tried.
        endpoints: String,
        /// What failed.
        #[source]
        source: etcd_client::Error,
    },
    /// Every node CIDR of the cluster CIDR is taken.
    #[error("no free /{size} left in cluster CIDR {cidr}")]
    Exhausted {
        /// The cluster CIDR.
        cidr: Ipv4Net,
        /// The node CIDR size.
        size: u8,
    },
    /// The configuration cannot work.
    #[error("{0}")]
    Invalid(String),
    /// The node's lease is gone (it expired while the store was away).
    #[error("the node's lease expired")]
    LeaseLost,
    /// The watch of the other nodes ended or was cancelled.
    #[error("the watch of the other nodes ended: {0}")]
    WatchEnded(String),
}

impl ClusterConfig {
    /// Checks what can be checked without the store: the node CIDR size
    /// fits the cluster CIDR, and the name is a usable key.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.node_cidr_size < self.cluster_cidr.prefix_len() || self.node_cidr_size > 30 {
            return Err(ClusterError::Invalid(format!(
                "--node-cidr-size {} must lie between the cluster CIDR's prefix length ({}) and 30",
                self.node_cidr_size,
                self.cluster_cidr.prefix_len()
            )));
        }
        if !record::valid_node_name(&self.node_name) {
            return Err(ClusterError::Invalid(format!(
                "invalid node name {:?}: 1-63 letters, digits, '-', '_' or '.'",
                self.node_name
            )));
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(ClusterError::Invalid(
                "--cluster-lease-ttl must be at least 1s".to_owned(),
            ));
        }
        Ok(())
    }

    /// A [`ClusterError::Store`] of these endpoints.
    pub fn store_error(&self, source: etcd_client::Error) -> ClusterError {
        ClusterError::Store {
            endpoints: self.endpoints.join(","),
            source,
        }
    }

    /// A client of the store. (Connections are made lazily: the first
    /// request tells whether the store is there.)
    pub async fn connect(&self) -> Result<Client, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(|e| self.store_error(e))
    }
}

/// Refuses a cluster CIDR that overlaps the underlay: one of the node's
/// addresses, or a network it is attached to (`addrs` are the uplink's
/// addresses with their prefix lengths).
pub fn check_overlap(
    cluster: Ipv4Net,
    node_ip: Option<Ipv4Addr>,
    addrs: &[(Ipv4Addr, u8)],
) -> Result<(), ClusterError> {
    if let Some(ip) = node_ip.filter(|ip| cluster.contains(ip)) {
        return Err(ClusterError::Invalid(format!(
            "cluster CIDR {cluster} contains the node address {ip}"
        )));
    }
    for &(addr, len) in addrs {
        let net = Ipv4Net::new(addr, len).map_or(Ipv4Net::from(addr), |n| n.trunc());
        if overlaps(cluster, net) {
            return Err(ClusterError::Invalid(format!(
                "cluster CIDR {cluster} overlaps the underlay network {net} (address {addr})"
            )));
        }
    }
    Ok(())
}

/// Whether two networks share an address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test CIDR")
    }

    #[test]
    fn a_cluster_cidr_overlapping_the_underlay_is_refused() {
        let cluster = net("198.19.0.0/16");
        let ok = [(Ipv4Addr::new(198, 18, 0, 2), 24)];
        assert!(check_overlap(cluster, None, &ok).is_ok());
        let inside = [(Ipv4Addr::new(198, 19, 7, 2), 24)];
        assert!(check_overlap(cluster, None, &inside).is_err());
        let around = [(Ipv4Addr::new(198, 18, 0, 2), 15)];
        assert!(check_overlap(cluster, None, &around).is_err());
        assert!(check_overlap(cluster, Some(Ipv4Addr::new(198, 19, 0, 9)), &ok).is_err());
    }

    #[test]
    fn node_cidr_sizes_must_fit_the_cluster_cidr() {
        let mut cfg = ClusterConfig {
            endpoints: vec!["http://198.18.0.1:2379".into()],
            node_name: "n1".into(),
            cluster_cidr: net("198.19.0.0/16"),
            node_cidr_size: 24,
            wait: false,
            lease_ttl: Duration::from_secs(10),
        };
        assert!(cfg.validate().is_ok());
        cfg.node_cidr_size = 15;
        assert!(cfg.validate().is_err());
        cfg.node_cidr_size = 24;
        cfg.node_name = "a/b".into();
        assert!(cfg.validate().is_err());
    }
}
