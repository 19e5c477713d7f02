//! Adoption at start: what a previous agent left (pinned maps and links,
//! veths, the state file) is reconciled with the state. A container whose
//! network namespace is certainly gone — nothing at its path, or the path
//! names another namespace than the one recorded — is removed; one whose
//! veth is gone is recreated with the same address, in the namespace it
//! was recorded with and no other; every other one gets its map entries
//! and programs re-applied. A container that cannot be restored for any
//! other reason (a transient error, something in the way) is kept, listed
//! as degraded and retried ([`retry_degraded`]): only "gone" deletes.
//!
//! Then orphans go: veths the agent made (in its group,
//! [`crate::model::identity::VETH_GROUP`]), map entries, link pins,
//! buckets and flows of no known container — which is also what is left of
//! a container whose creation was cut off (it is recorded only once
//! complete). A veth the agent did not make is never touched, whatever its
//! name.
//!
//! [`cleanup`] removes everything an agent made, for `--cleanup`.

use std::collections::HashSet;

use datapath_common::ratelimit::direction;

use super::{
    AgentConfig,
    lifecycle::{HostEnd, Lifecycle, veth_tag},
    rate_target,
    transaction::Transaction,
};
use crate::{
    cgroup,
    error::error_chain,
    model::{
        identity::VETH_GROUP,
        mac::{format_mac, parse_mac},
        names::is_host_veth_name,
    },
    net::{
        link::Netlink,
        netns::{Netns, NetnsError},
    },
    store::{State, StateLock, StateStore, Store},
};

/// Why a container could not be restored.
#[derive(Debug)]
enum Unrestored {
    /// Its namespace is certainly gone: the container goes.
    Gone(String),
    /// Anything else: the container stays, degraded, and is retried.
    Failed(String),
}

/// Reconciles the kernel with the state (see the module's documentation)
/// and saves the state.
pub async fn reconcile(lc: &mut Lifecycle<'_>) -> anyhow::Result<()> {
    let names: Vec<String> = lc.store.containers().keys().cloned().collect();
    for name in names {
        settle(lc, &name).await;
    }
    lc.store.save()?;
    remove_orphans(lc).await;
    Ok(())
}

/// Tries again to restore every degraded container; saves the state if
/// anything changed. Returns how many are still degraded.
pub async fn retry_degraded(lc: &mut Lifecycle<'_>) -> usize {
    let names: Vec<String> = lc.degraded.keys().cloned().collect();
    let mut changed = false;
    for name in names {
        if lc.store.get(&name).is_none() {
            lc.degraded.remove(&name);
            continue;
        }
        if settle(lc, &name).await {
            changed = true;
        }
    }
    if changed && let Err(e) = lc.store.save() {
        tracing::warn!("save the state after a retry: {e}");
    }
    lc.degraded.len()
}

/// Restores container `name`, removes it if its namespace is gone, or
/// marks it degraded; returns whether the state changed.
async fn settle(lc: &mut Lifecycle<'_>, name: &str) -> bool {
    let Some(c) = lc.store.get(name).cloned() else {
        return false;
    };
    match restore(lc, name).await {
        Ok(()) => {
            if lc.degraded.remove(name).is_some() {
                tracing::info!(container = %name, "restored");
            }
            lc.store.get(name) != Some(&c)
        }
        Err(Unrestored::Gone(why)) => {
            tracing::warn!(container = %name, "{why}: removing the container");
            lc.teardown(&c).await;
            lc.store.remove(name);
            lc.degraded.remove(name);
            true
        }
        Err(Unrestored::Failed(why)) => {
            tracing::warn!(container = %name, "cannot restore the container (kept, retried): {why}");
            lc.degraded.insert(name.to_owned(), why);
            false
        }
    }
}

/// Opens the namespace container `c` was recorded with: [`Unrestored::Gone`]
/// if nothing is at its path or it names another namespace now.
fn open_netns(c: &crate::store::Container) -> Result<Netns, Unrestored> {
    let ns = Netns::open_expecting(&c.netns, c.netns_id).map_err(|e| match e {
        e if e.is_gone() => Unrestored::Gone(error_chain(&e)),
        e => Unrestored::Failed(format!("check its network namespace: {}", error_chain(&e))),
    })?;
    ns.check_container_netns()
        .map_err(|e: NetnsError| Unrestored::Failed(format!("{}; delete it", error_chain(&e))))?;
    Ok(ns)
}

/// Brings known container `name` back: its namespace checked, its veth
/// (recreated with the same address if it vanished, tagged if an older
/// agent made it), map entries and programs, and rate limits.
async fn restore(lc: &mut Lifecycle<'_>, name: &str) -> Result<(), Unrestored> {
    let Some(mut c) = lc.store.get(name).cloned() else {
        return Ok(());
    };
    let failed = |what: &str, e: &dyn std::error::Error| {
        Unrestored::Failed(format!("{what}: {}", error_chain(e)))
    };
    let ns = open_netns(&c)?;
    if c.netns_id.is_none() {
        // Recorded by an older agent: the namespace there now is the one.
        c.netns_id = Some(ns.id());
    }
    drop(ns);
    let (host, mac) = match lc.net.link(&c.host_ifname).await {
        Ok(Some(host)) => {
            let mac = parse_mac(&c.mac).ok_or_else(|| {
                Unrestored::Failed(format!("no container MAC recorded for {}", c.name))
            })?;
            let alias = veth_tag(&c).and_then(|t| t.alias()).unwrap_or_default();
            if host.group != VETH_GROUP || host.alias.as_deref() != Some(alias.as_str()) {
                lc.net
                    .retag(&c.host_ifname, &alias)
                    .await
                    .map_err(|e| failed("tag its veth", &e))?;
            }
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
            lc.dp
                .detach_container(&c.host_ifname)
                .map_err(|e| failed("detach", &e))?;
            // The namespace is checked again, by identity, as the veth is
            // made: a path that names another namespace gets nothing.
            let link = lc.create_link(&c).await.map_err(|e| {
                if e.is_netns_gone() {
                    Unrestored::Gone(error_chain(&e))
                } else {
                    failed("recreate its veth", &e)
                }
            })?;
            c.mac = format_mac(link.container_mac);
            let host = HostEnd {
                index: link.host_ifindex,
                mac: link.host_mac,
            };
            (host, link.container_mac)
        }
        Err(e) => return Err(failed("look up its veth", &e)),
    };
    // Every step below overwrites what is there: a retry redoes them.
    let mut tx = Transaction::new();
    let filled = lc.fill(&mut tx, &c, host, mac);
    tx.commit();
    filled.map_err(|e| failed("fill the maps", &e))?;
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

/// Removes what no known container owns: the agent's `dp<hex>` veths,
/// SERVICES and ENDPOINTS entries, container link pins, buckets, and
/// conntrack flows.
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
    match lc.net.links().await {
        Ok(links) => {
            for link in links {
                if !is_host_veth_name(&link.name) || veths.contains(&link.name) {
                    continue;
                }
                if link.group != VETH_GROUP || link.kind != "veth" {
                    tracing::info!(veth = %link.name, "not removing a link the agent did not make");
                    continue;
                }
                tracing::warn!(veth = %link.name, "removing an orphaned veth");
                if let Err(e) = lc.net.delete_container_link(&link.name).await {
                    tracing::warn!(veth = %link.name, "{}", error_chain(&e));
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
    if let Err(e) = lc
        .dp
        .flush_flows(|f| f.orig.container_id != 0 && !ids.contains(&f.orig.container_id))
    {
        tracing::warn!("flush orphaned flows: {e}");
    }
}

/// Removes everything an agent with these paths made: every veth it made
/// (its containers', and any other in its group), the pins it names under
/// the bpffs directory (the programs are detached; the directory goes only
/// if nothing else is in it) and the state file. Refuses while an agent
/// runs with this state directory. Works without loading anything, and
/// with a corrupt state file.
pub async fn cleanup(cfg: &AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let lock = StateLock::acquire(&cfg.state_dir)
        .context("datapath agent --cleanup refuses to run under a live agent")?;
    let net = Netlink::new().context("open a netlink connection")?;
    let file = StateStore::new(&cfg.state_dir);
    let state = match Store::open(&cfg.state_dir) {
        Ok(store) => store.state().clone(),
        Err(e) => {
            tracing::warn!("{e}; removing the agent's veths by their tag only");
            State::default()
        }
    };
    let links = net.links().await.context("list links")?;
    for link in &links {
        let known = state
            .containers
            .values()
            .any(|c| c.host_ifname == link.name);
        let ours = link.group == VETH_GROUP && link.kind == "veth";
        if !(ours || known) || !is_host_veth_name(&link.name) {
            continue;
        }
        if !ours && link.kind == "veth" {
            // A container's veth made by an agent that did not tag it.
            let _ = net.retag(&link.name, "").await;
        }
        match net.delete_container_link(&link.name).await {
            Ok(()) => tracing::info!(veth = %link.name, "removed"),
            Err(e) => tracing::warn!(veth = %link.name, "{}", error_chain(&e)),
        }
    }
    let left = crate::datapath::remove_pins(&cfg.bpffs_dir)
        .with_context(|| format!("remove the pins under {}", cfg.bpffs_dir.display()))?;
    if left.is_empty() {
        tracing::info!(dir = %cfg.bpffs_dir.display(), "removed pins");
    } else {
        tracing::warn!(dir = %cfg.bpffs_dir.display(), ?left, "removed the agent's pins; left what it did not make");
    }
    match std::fs::remove_file(file.path()) {
        Ok(()) => tracing::info!(file = %file.path().display(), "removed state"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", file.path().display())),
    }
    lock.remove()?;
    // The directory too, if nothing else lives there.
    let _ = std::fs::remove_dir(file.dir());
    Ok(())
}
