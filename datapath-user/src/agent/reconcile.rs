//! Adoption at start: what a previous agent left (pinned maps and links,
//! veths, the state file) is reconciled with the state. A container whose
//! netns is gone is removed, one whose veth is gone is recreated with the
//! same address, and every other one gets its map entries and programs
//! re-applied. Then orphans go: veths, map entries, link pins, buckets and
//! flows of no known container — which is also what is left of a container
//! whose creation was cut off (it is recorded only once complete).
//!
//! [`cleanup`] removes everything an agent made, for `--cleanup`.

use std::collections::HashSet;

use datapath_common::ratelimit::direction;

use super::{
    AgentConfig, AgentError,
    lifecycle::{HostEnd, Lifecycle},
    rate_target,
    transaction::Transaction,
};
use crate::{
    cgroup,
    datapath::Flows,
    error::error_chain,
    model::{
        mac::{format_mac, parse_mac},
        names::{HOST_VETH_PREFIX, is_host_veth_name},
    },
    net::{link::Netlink, netns},
    store::{State, StateStore, Store},
};

/// Reconciles the kernel with the state (see the module's documentation)
/// and saves the state.
pub async fn reconcile(lc: &mut Lifecycle<'_>) -> anyhow::Result<()> {
    let containers: Vec<_> = lc.store.containers().values().cloned().collect();
    for c in containers {
        if !netns::is_netns(&c.netns).unwrap_or(false) {
            tracing::warn!(container = %c.name, "its network namespace is gone: removing the container");
            lc.teardown(&c).await;
            lc.store.remove(&c.name);
            continue;
        }
        if let Err(e) = restore(lc, &c.name).await {
            tracing::warn!(container = %c.name, "cannot restore the container, removing it: {e}");
            lc.teardown(&c).await;
            lc.store.remove(&c.name);
        }
    }
    lc.store.save()?;
    remove_orphans(lc).await;
    Ok(())
}

/// Brings known container `name` back: its veth (recreated with the same
/// address if it vanished), map entries and programs, and rate limits.
async fn restore(lc: &mut Lifecycle<'_>, name: &str) -> Result<(), AgentError> {
    let Some(mut c) = lc.store.get(name).cloned() else {
        return Ok(());
    };
    let mut recreated = false;
    let (host, mac) = match lc.net.link(&c.host_ifname).await {
        Ok(Some(host)) => {
            let mac = parse_mac(&c.mac).ok_or_else(|| {
                AgentError::Internal(format!("no container MAC recorded for {}", c.name))
            })?;
            let host = HostEnd {
                index: host.index,
                mac: host.mac,
            };
            (host, mac)
        }
        Ok(None) => {
            tracing::warn!(container = %c.name, veth = %c.host_ifname, "veth gone: recreating it");
            // The link pinned for the vanished veth is defunct (it cannot
            // take a new program): drop it, attaching makes a fresh one.
            lc.dp.detach_container(&c.host_ifname)?;
            let link = lc.create_link(&c).await?;
            recreated = true;
            c.mac = format_mac(link.container_mac);
            let host = HostEnd {
                index: link.host_ifindex,
                mac: link.host_mac,
            };
            (host, link.container_mac)
        }
        Err(e) => return Err(AgentError::Internal(error_chain(&e))),
    };
    // A container that cannot be restored is torn down whole by the
    // caller: the steps need not be undone one by one.
    let mut tx = Transaction::new();
    let filled = lc.fill(&mut tx, &c, host, mac);
    tx.commit();
    filled?;
    if recreated {
        // Its flows still send to the vanished veth: gone, the next packet
        // of each starts afresh through the entries just written.
        match lc.dp.flush_flows(Flows::Container(c.id)) {
            Ok(n) => {
                tracing::info!(container = %c.name, entries = n, "flows of the old veth removed")
            }
            Err(e) => tracing::warn!(container = %c.name, "flush the old veth's flows: {e}"),
        }
    }
    restore_limits(lc, &mut c);
    lc.store.put(c.clone());
    tracing::info!(container = %c.name, "adopted");
    Ok(())
}

/// Re-applies a known container's rate limits with freshly attached
/// programs, following its cgroup if it was recreated (new id). A cgroup
/// that is gone leaves the limits recorded but unapplied.
fn restore_limits(lc: &mut Lifecycle<'_>, c: &mut crate::store::Container) {
    let Some(path) = &c.cgroup else {
        return;
    };
    match cgroup::resolve_cgroup(&path.to_string_lossy()) {
        Ok(cg) if cg.id == c.cgroup_id => {}
        Ok(cg) => {
            lc.dp.remove_limits(&rate_target(c));
            c.cgroup_id = cg.id;
        }
        Err(e) => {
            tracing::warn!(container = %c.name, "rate limits not applied: {e}");
            lc.dp.remove_limits(&rate_target(c));
            return;
        }
    }
    if let Err(e) = lc.dp.apply_limits(&rate_target(c), true) {
        tracing::warn!(container = %c.name, "rate limits not applied: {e}");
    }
}

/// Removes what no known container owns: `dp<hex>` veths, SERVICES and
/// ENDPOINTS entries, container link pins, buckets, and conntrack flows.
async fn remove_orphans(lc: &mut Lifecycle<'_>) {
    let containers = lc.store.containers();
    let ids: HashSet<u32> = containers.values().map(|c| c.id).collect();
    let veths: HashSet<String> = containers.values().map(|c| c.host_ifname.clone()).collect();
    let limited: HashSet<(u64, u32)> = containers
        .values()
        .flat_map(|c| {
            [direction::EGRESS, direction::INGRESS]
                .into_iter()
                .filter(|d| c.limits.get(*d).is_some())
                .map(|d| (c.cgroup_id, d))
        })
        .collect();
    match lc.net.links_with_prefix(HOST_VETH_PREFIX).await {
        Ok(links) => {
            for link in links {
                if is_host_veth_name(&link.name) && !veths.contains(&link.name) {
                    tracing::warn!(veth = %link.name, "removing an orphaned veth");
                    if let Err(e) = lc.net.delete_container_link(&link.name).await {
                        tracing::warn!(veth = %link.name, "{}", error_chain(&e));
                    }
                }
            }
        }
        Err(e) => tracing::warn!("cannot list veths: {}", error_chain(&e)),
    }
    for k in lc.dp.retain_services(|id| ids.contains(&id)) {
        tracing::warn!(port = k.port, "removed an orphaned published port");
    }
    for addr in lc.dp.retain_endpoints(|id| ids.contains(&id)) {
        tracing::warn!(%addr, "removed an orphaned endpoint");
    }
    lc.dp.remove_orphan_links(&veths);
    for cgroup_id in lc.dp.retain_buckets(&limited) {
        tracing::warn!(cgroup_id, "removed an orphaned rate limit");
    }
    match lc.dp.flow_container_ids() {
        Ok(found) => {
            for id in found.into_iter().filter(|id| *id != 0 && !ids.contains(id)) {
                if let Err(e) = lc.dp.flush_flows(Flows::Container(id)) {
                    tracing::warn!(container_id = id, "flush orphaned flows: {e}");
                }
            }
        }
        Err(e) => tracing::warn!("read conntrack: {e}"),
    }
}

/// Removes everything an agent with these paths made: every container's
/// veth, every `dp<hex>` veth, the bpffs directory (pins of maps and
/// links: the programs are detached) and the state file. Works without
/// loading anything, and with a corrupt state file.
pub async fn cleanup(cfg: &AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let net = Netlink::new().context("open a netlink connection")?;
    let file = StateStore::new(&cfg.state_dir);
    let state = match Store::open(&cfg.state_dir) {
        Ok(store) => store.state().clone(),
        Err(e) => {
            tracing::warn!("{e}; removing veths by name only");
            State::default()
        }
    };
    let mut names: Vec<String> = state
        .containers
        .values()
        .map(|c| c.host_ifname.clone())
        .collect();
    for link in net
        .links_with_prefix(HOST_VETH_PREFIX)
        .await
        .unwrap_or_default()
    {
        if is_host_veth_name(&link.name) && !names.contains(&link.name) {
            names.push(link.name);
        }
    }
    for name in names {
        match net.delete_container_link(&name).await {
            Ok(()) => tracing::info!(veth = %name, "removed"),
            Err(e) => tracing::warn!(veth = %name, "{}", error_chain(&e)),
        }
    }
    match net.delete_vxlan(super::cluster::OVERLAY_IF).await {
        Ok(()) => {}
        Err(e) => tracing::warn!(device = super::cluster::OVERLAY_IF, "{}", error_chain(&e)),
    }
    match std::fs::remove_dir_all(&cfg.bpffs_dir) {
        Ok(()) => tracing::info!(dir = %cfg.bpffs_dir.display(), "removed pins"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", cfg.bpffs_dir.display())),
    }
    match std::fs::remove_file(file.path()) {
        Ok(()) => tracing::info!(file = %file.path().display(), "removed state"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", file.path().display())),
    }
    // The directory too, if nothing else lives there.
    let _ = std::fs::remove_dir(file.dir());
    Ok(())
}
