//! The node CIDR claim: a transaction that creates
//! `/datapath/v1/cidrs/<cidr>` only if it does not exist (its create
//! revision is 0), with the node's name as its value. Of two nodes racing
//! for the same CIDR one transaction fails, and that node tries the next
//! free one. A node that already owns a claim (a restart under the same
//! name) gets it back.

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use ipnet::Ipv4Net;

use super::{ClusterConfig, ClusterError, overlaps, record};

/// How many times a claim is retried after losing a race.
const ATTEMPTS: usize = 64;

/// Claims (or finds) this node's CIDR.
pub async fn claim(client: &mut Client, cfg: &ClusterConfig) -> Result<Ipv4Net, ClusterError> {
    for _ in 0..ATTEMPTS {
        let resp = client
            .get(record::CIDRS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| cfg.store_error(e))?;
        let mut taken = Vec::new();
        for kv in resp.kvs() {
            let Some(cidr) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(record::CIDRS))
                .and_then(|c| c.parse::<Ipv4Net>().ok())
            else {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping a malformed CIDR claim");
                continue;
            };
            let owner = kv.value_str().unwrap_or_default();
            if owner == cfg.node_name
                && cfg.cluster_cidr.contains(&cidr)
                && cidr.prefix_len() == cfg.node_cidr_size
            {
                tracing::info!(%cidr, node = %cfg.node_name, "node CIDR already ours");
                return Ok(cidr);
            }
            taken.push(cidr);
        }
        let subnets = cfg
            .cluster_cidr
            .subnets(cfg.node_cidr_size)
            .map_err(|e| ClusterError::Invalid(e.to_string()))?;
        let Some(free) = subnets
            .into_iter()
            .find(|c| !taken.iter().any(|t| overlaps(*t, *c)))
        else {
            return Err(ClusterError::Exhausted {
                cidr: cfg.cluster_cidr,
                size: cfg.node_cidr_size,
            });
        };
        let key = record::cidr_key(free);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, cfg.node_name.clone(), None)]);
        let won = client
            .txn(txn)
            .await
            .map_err(|e| cfg.store_error(e))?
            .succeeded();
        if won {
            tracing::info!(cidr = %free, node = %cfg.node_name, "node CIDR claimed");
            return Ok(free);
        }
        tracing::debug!(cidr = %free, "lost the race for a node CIDR; trying the next");
    }
    Err(ClusterError::Invalid(format!(
        "could not claim a node CIDR in {ATTEMPTS} attempts"
    )))
}
