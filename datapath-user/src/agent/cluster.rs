//! The agent in cluster mode: joining (the node CIDR becomes the pool),
//! the overlay device, the peers applied to the datapath, and the nodes
//! the API lists.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use etcd_client::Client;
use ipnet::Ipv4Net;

use crate::{
    api::NodeInfo,
    cluster::{self, ClusterConfig, ClusterError, PeerRoute, View},
    datapath::{BpfError, Datapath},
    net::link::Netlink,
};

/// The overlay (VXLAN) device in the node's network namespace.
pub const OVERLAY_IF: &str = "dp-vxlan";

/// How long the agent waits between attempts to reach the store at start.
const WAIT_RETRY: Duration = Duration::from_secs(1);
/// How many times the agent tries to reach the store at start (without
/// `--cluster-wait`) before it gives up.
const START_ATTEMPTS: u32 = 5;

/// Joins the cluster before the agent starts: checks the cluster CIDR
/// against the node's addresses, reaches the store (waiting for it with
/// `--cluster-wait`) and claims the node CIDR, which becomes the pool.
pub async fn join(
    cfg: &ClusterConfig,
    uplink: Option<&str>,
    node_ip: Option<Ipv4Addr>,
) -> anyhow::Result<(Client, Ipv4Net)> {
    cfg.validate()?;
    if uplink.is_none() {
        anyhow::bail!("cluster mode needs an uplink (--uplink) to reach the other nodes");
    }
    let mut addrs = Vec::new();
    if let Some(ifname) = uplink {
        let net = Netlink::new().context("open a netlink connection")?;
        if let Some(link) = net.link(ifname).await? {
            addrs = net.ipv4_addrs(link.index).await?;
        }
    }
    cluster::check_overlap(cfg.cluster_cidr, node_ip, &addrs)?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = async {
            let mut client = cfg.connect().await?;
            let cidr = cluster::claim::claim(&mut client, cfg).await?;
            Ok::<_, ClusterError>((client, cidr))
        };
        match attempt.await {
            Ok(joined) => return Ok(joined),
            Err(e @ ClusterError::Store { .. }) if cfg.wait || attempts < START_ATTEMPTS => {
                tracing::warn!("{e}; trying the cluster store again");
                tokio::time::sleep(WAIT_RETRY).await;
            }
            Err(e @ ClusterError::Store { .. }) => {
                return Err(e).context(
                    "cannot reach the cluster store (is etcd running? --cluster-wait waits for it)",
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Makes the datapath's peers exactly `peers`.
pub fn apply_peers(dp: &mut Datapath, peers: &[PeerRoute]) -> Result<(), BpfError> {
    let routes: Vec<(Ipv4Net, Ipv4Addr)> = peers.iter().map(|p| (p.cidr, p.underlay)).collect();
    dp.set_peers(&routes)?;
    tracing::info!(
        peers = ?peers.iter().map(|p| format!("{}={}@{}", p.name, p.cidr, p.underlay)).collect::<Vec<_>>(),
        "cluster peers applied"
    );
    Ok(())
}

/// The nodes as the API lists them.
pub fn node_infos(view: &View) -> Vec<NodeInfo> {
    let me = view.me.as_ref().map(|m| m.name.as_str());
    view.nodes
        .values()
        .map(|k| {
            let this = Some(k.record.name.as_str()) == me;
            NodeInfo {
                name: k.record.name.clone(),
                cidr: k.record.cidr.to_string(),
                underlay: k.record.underlay,
                this_node: this,
                lease_age_s: k.since.elapsed().as_secs(),
                state: if this {
                    "local"
                } else if view.connected {
                    "reachable"
                } else {
                    "last-known"
                }
                .to_owned(),
            }
        })
        .collect()
}
