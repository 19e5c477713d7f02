//! The node's registration and its view of the other nodes.
//!
//! A session registers the node's record under a fresh lease, keeps the
//! lease alive (a third of its TTL apart), lists every node record and
//! watches the prefix from the listing's revision on. Any failure (the
//! store gone, the lease expired, the watch cancelled or compacted) ends
//! the session; the next one starts after a backoff and resyncs from a
//! new listing. Meanwhile the peers last published stay in force: the
//! datapath keeps forwarding to the nodes it knew.
//!
//! The node's record is not deleted when the agent stops: an agent
//! restarted within the lease's TTL is never seen gone by its peers, and
//! cross-node flows go on.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};
use ipnet::Ipv4Net;
use tokio::sync::watch;

use super::{
    ClusterConfig, ClusterError, overlaps,
    record::{self, NodeRecord},
};

/// First wait after a failed session; doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest wait between sessions.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where another node's containers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoute {
    /// The node's name.
    pub name: String,
    /// Its node CIDR.
    pub cidr: Ipv4Net,
    /// Its underlay address.
    pub underlay: Ipv4Addr,
}

/// A node as this agent knows it.
#[derive(Clone, Debug)]
pub struct Known {
    /// Its record.
    pub record: NodeRecord,
    /// The lease its record is under.
    pub lease: i64,
    /// When this agent first saw that lease: the lease's age.
    pub since: Instant,
}

/// What the agent knows of the cluster.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// This node's record.
    pub me: Option<NodeRecord>,
    /// Whether a session with the store is up (else the nodes are the last
    /// known ones).
    pub connected: bool,
    /// Every node with a valid record, this one included.
    pub nodes: BTreeMap<String, Known>,
    /// Why the last session ended.
    pub last_error: Option<String>,
}

/// The running synchronisation's outputs.
pub struct Outputs {
    /// The routes to the other nodes; `None` until the first listing.
    pub peers: watch::Sender<Option<Arc<Vec<PeerRoute>>>>,
    /// The view the API shows.
    pub view: watch::Sender<Arc<View>>,
}

/// Runs sessions forever (until the task is dropped): the node `me`
/// (whose underlay address follows `underlay`) registered, the other
/// nodes published to `out`.
pub async fn run(
    cfg: ClusterConfig,
    mut client: Client,
    mut me: NodeRecord,
    mut underlay: watch::Receiver<Ipv4Addr>,
    out: Outputs,
) {
    let mut state = Session {
        cfg: &cfg,
        lease: None,
        nodes: BTreeMap::new(),
        out: &out,
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        me.underlay = *underlay.borrow_and_update();
        let started = Instant::now();
        let err = state.session(&mut client, &mut me, &mut underlay).await;
        tracing::warn!("cluster store session ended: {err}; retrying");
        out.view.send_modify(|v| {
            let mut nv = View::clone(v);
            nv.connected = false;
            nv.last_error = Some(err.to_string());
            *v = Arc::new(nv);
        });
        if started.elapsed() > BACKOFF_MAX * 2 {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Session<'a> {
    cfg: &'a ClusterConfig,
    /// The lease of the last registration.
    lease: Option<i64>,
    nodes: BTreeMap<String, Known>,
    out: &'a Outputs,
}

impl Session<'_> {
    /// One session: returns why it ended.
    async fn session(
        &mut self,
        client: &mut Client,
        me: &mut NodeRecord,
        underlay: &mut watch::Receiver<Ipv4Addr>,
    ) -> ClusterError {
        match self.try_session(client, me, underlay).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn try_session(
        &mut self,
        client: &mut Client,
        me: &mut NodeRecord,
        underlay: &mut watch::Receiver<Ipv4Addr>,
    ) -> Result<std::convert::Infallible, ClusterError> {
        let cfg = self.cfg;
        let store = |e| cfg.store_error(e);
        let ttl = i64::try_from(self.cfg.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl, None).await.map_err(store)?.id();
        let key = record::node_key(&me.name);
        client
            .put(
                key.clone(),
                me.to_json(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(store)?;
        // The record is under the new lease now: the old one (if it is
        // still there) holds nothing of ours.
        if let Some(old) = self.lease.replace(lease).filter(|old| *old != lease) {
            let _ = client.lease_revoke(old).await;
        }
        tracing::info!(node = %me.name, underlay = %me.underlay, cidr = %me.cidr, lease, "node registered");
        let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await.map_err(store)?;
        let listing = client
            .get(record::NODES, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(store)?;
        let revision = listing.header().map_or(0, |h| h.revision());
        self.nodes.clear();
        for kv in listing.kvs() {
            self.put(kv);
        }
        self.publish(me, true);
        let mut watch = client
            .watch(
                record::NODES,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(store)?;
        let mut renew = tokio::time::interval(self.cfg.lease_ttl / 3);
        loop {
            tokio::select! {
                _ = renew.tick() => keeper.keep_alive().await.map_err(store)?,
                renewal = renewals.message() => match renewal.map_err(store)? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Err(ClusterError::LeaseLost),
                },
                event = watch.message() => {
                    let Some(resp) = event.map_err(store)? else {
                        return Err(ClusterError::WatchEnded("closed by the store".to_owned()));
                    };
                    if resp.canceled() {
                        return Err(ClusterError::WatchEnded(format!(
                            "cancelled (compacted at {}): {}",
                            resp.compact_revision(),
                            resp.cancel_reason()
                        )));
                    }
                    for ev in resp.events() {
                        match (ev.event_type(), ev.kv()) {
                            (EventType::Put, Some(kv)) => self.put(kv),
                            (EventType::Delete, Some(kv)) => self.delete(kv),
                            _ => {}
                        }
                    }
                    self.publish(me, true);
                }
                changed = underlay.changed() => {
                    if changed.is_err() {
                        // The agent is stopping.
                        return std::future::pending().await;
                    }
                    me.underlay = *underlay.borrow_and_update();
                    client
                        .put(key.clone(), me.to_json(), Some(PutOptions::new().with_lease(lease)))
                        .await
                        .map_err(store)?;
                    tracing::info!(underlay = %me.underlay, "node record updated");
                }
            }
        }
    }

    /// A record written or rewritten.
    fn put(&mut self, kv: &KeyValue) {
        let key = String::from_utf8_lossy(kv.key());
        let Some(name) = key.strip_prefix(record::NODES) else {
            return;
        };
        match NodeRecord::parse(name, kv.value()) {
            Ok(record) => {
                let lease = kv.lease();
                let since = match self.nodes.get(name) {
                    Some(k) if k.lease == lease => k.since,
                    _ => Instant::now(),
                };
                self.nodes.insert(
                    name.to_owned(),
                    Known {
                        record,
                        lease,
                        since,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(key = %key, "skipping node record: {e}");
                self.nodes.remove(name);
            }
        }
    }

    /// A record deleted (or expired with its lease).
    fn delete(&mut self, kv: &KeyValue) {
        let key = String::from_utf8_lossy(kv.key());
        if let Some(name) = key.strip_prefix(record::NODES)
            && self.nodes.remove(name).is_some()
        {
            tracing::info!(node = name, "node left the cluster");
        }
    }

    /// Publishes the view and, if they changed, the routes to the peers.
    fn publish(&self, me: &NodeRecord, connected: bool) {
        let routes = peer_routes(me, self.nodes.values().map(|k| &k.record));
        self.out.peers.send_if_modified(|cur| {
            if cur.as_deref() == Some(&routes) {
                return false;
            }
            *cur = Some(Arc::new(routes));
            true
        });
        self.out.view.send_replace(Arc::new(View {
            me: Some(me.clone()),
            connected,
            nodes: self.nodes.clone(),
            last_error: None,
        }));
    }
}

/// The routes to the nodes of `records` other than `me`, leaving out (and
/// logging) any whose CIDR overlaps `me`'s or an earlier one's.
pub fn peer_routes<'a>(
    me: &NodeRecord,
    records: impl Iterator<Item = &'a NodeRecord>,
) -> Vec<PeerRoute> {
    let mut routes: Vec<PeerRoute> = Vec::new();
    for r in records.filter(|r| r.name != me.name) {
        if overlaps(r.cidr, me.cidr) || routes.iter().any(|p| overlaps(p.cidr, r.cidr)) {
            tracing::warn!(node = %r.name, cidr = %r.cidr, "skipping a node whose CIDR overlaps another's");
            continue;
        }
        routes.push(PeerRoute {
            name: r.name.clone(),
            cidr: r.cidr,
            underlay: r.underlay,
        });
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_leave_out_this_node_and_overlapping_cidrs() {
        let rec = |name: &str, cidr: &str, last: u8| {
            NodeRecord::new(
                name,
                Ipv4Addr::new(198, 18, 0, last),
                cidr.parse().expect("CIDR"),
            )
        };
        let me = rec("a", "198.19.0.0/24", 1);
        let all = [
            me.clone(),
            rec("b", "198.19.1.0/24", 2),
            rec("c", "198.19.0.0/25", 3),
            rec("d", "198.19.1.128/25", 4),
            rec("e", "198.19.2.0/24", 5),
        ];
        let names: Vec<String> = peer_routes(&me, all.iter())
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["b", "e"]);
    }
}
