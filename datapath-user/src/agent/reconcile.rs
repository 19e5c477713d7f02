//! Adoption at start: what a previous agent left (pinned maps and links,
//! veths, the persisted state) is reconciled with the state. A container
//! whose network namespace is certainly gone — nothing at its path, or the
//! path names another namespace than the one recorded — is removed; one
//! whose veth is gone is recreated with the same address, in the namespace
//! it was recorded with and no other; every other one gets whatever of its
//! map entries is missing or wrong, and its programs. A container that
//! cannot be restored for any other reason (a transient error, something
//! in the way) is kept, listed as degraded and retried
//! ([`retry_degraded`]): only "gone" deletes.
//!
//! Then orphans go: veths the agent made (in its group,
//! [`crate::model::identity::VETH_GROUP`]), map entries, link pins,
//! buckets and flows of no known container — which is also what is left of
//! a change cut off before its record was durable (a container being
//! added, a port being published), and map entries whose removal was cut
//! off after it (a port unpublished, a container deleted). A veth the agent
//! did not make is never touched, whatever its name.
//!
//! The kernel is read in bulk, once: one netlink dump of the host ends, one
//! pass over each of ENDPOINTS and SERVICES. Only what differs from the
//! state is written, so the work beyond those reads is proportional to
//! what changed while the agent was away, not to the number of containers
//! and ports. The adoptions that change a record (a recreated veth's new
//! MAC, a recreated cgroup's id, a namespace identity recorded) are
//! recorded in one durable write.
//!
//! [`cleanup`] removes everything an agent made, for `--cleanup`.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use datapath_common::{Endpoint, ServiceKey, ServiceValue, ratelimit::direction};

use super::{
    AgentConfig,
    lifecycle::{HostEnd, Lifecycle, veth_tag},
    publish::service_key,
    rate_target,
};
use crate::{
    cgroup,
    datapath::Flows,
    error::error_chain,
    model::{
        PortMapping, Protocol,
        identity::VETH_GROUP,
        mac::{format_mac, parse_mac},
        names::{HOST_VETH_PREFIX, is_host_veth_name},
        ports::PortSet,
    },
    net::{
        inspect::Link,
        link::Netlink,
        netns::{Netns, NetnsError},
    },
    store::{self, Change, Container, State, StateLock},
};

/// What the kernel holds, read once at start.
struct Found {
    /// Host ends of container veths, by name.
    links: HashMap<String, Link>,
    /// ENDPOINTS.
    endpoints: HashMap<Ipv4Addr, Endpoint>,
    /// SERVICES.
    services: HashMap<ServiceKey, ServiceValue>,
}

/// Why a container could not be restored.
#[derive(Debug)]
enum Unrestored {
    /// Its namespace is certainly gone: the container goes.
    Gone(String),
    /// Anything else: the container stays, degraded, and is retried.
    Failed(String),
}

/// Reconciles the kernel with the state (see the module's documentation)
/// and records what adoption changed.
pub async fn reconcile(lc: &mut Lifecycle<'_>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut found = read_found(lc).await?;
    let containers: Vec<Arc<Container>> = lc.store.containers().values().cloned().collect();
    let mut changes = Vec::new();
    let mut written = 0;
    for c in &containers {
        let (change, n) = settle(lc, c, &mut found).await;
        written += n;
        changes.extend(change);
    }
    let recorded = changes.len();
    lc.store.commit(changes)?;
    remove_orphans(lc, &found).await;
    tracing::info!(
        containers = lc.store.containers().len(),
        degraded = lc.degraded.len(),
        entries_written = written,
        records_changed = recorded,
        took_ms = started.elapsed().as_millis() as u64,
        "adopted"
    );
    Ok(())
}

/// Tries again to restore every degraded container, and records what
/// changed. Returns how many are still degraded.
pub async fn retry_degraded(lc: &mut Lifecycle<'_>) -> usize {
    let names: Vec<String> = lc.degraded.keys().cloned().collect();
    let mut found = match read_found(lc).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!("retry the degraded containers: {e:#}");
            return lc.degraded.len();
        }
    };
    let mut changes = Vec::new();
    for name in names {
        let Some(c) = lc.store.get(&name).cloned() else {
            lc.degraded.remove(&name);
            continue;
        };
        let (change, _) = settle(lc, &c, &mut found).await;
        changes.extend(change);
    }
    if let Err(e) = lc.store.commit(changes) {
        tracing::warn!("record the state after a retry: {e}");
    }
    lc.degraded.len()
}

/// Reads the container veths, ENDPOINTS and SERVICES.
async fn read_found(lc: &Lifecycle<'_>) -> anyhow::Result<Found> {
    use anyhow::Context as _;
    let links = lc
        .net
        .links_with_prefix(HOST_VETH_PREFIX)
        .await
        .map_err(|e| anyhow::anyhow!("list the container veths: {}", error_chain(&e)))?;
    Ok(Found {
        links: links.into_iter().map(|l| (l.name.clone(), l)).collect(),
        endpoints: lc.dp.endpoints().context("read ENDPOINTS")?,
        services: lc.dp.services().context("read SERVICES")?,
    })
}

/// Restores container `c`, removes it if its namespace is gone, or marks
/// it degraded; returns the change to record, if any, and the number of
/// map entries written.
async fn settle(
    lc: &mut Lifecycle<'_>,
    c: &Container,
    found: &mut Found,
) -> (Option<Change>, usize) {
    match restore(lc, c, found).await {
        Ok((changed, written)) => {
            if lc.degraded.remove(&c.name).is_some() {
                tracing::info!(container = %c.name, "restored");
            }
            (changed.map(|c| Change::Put(Box::new(c))), written)
        }
        Err(Unrestored::Gone(why)) => {
            tracing::warn!(container = %c.name, "{why}: removing the container");
            lc.teardown(c).await;
            lc.degraded.remove(&c.name);
            let name = c.name.clone();
            (Some(Change::Remove { name }), 0)
        }
        Err(Unrestored::Failed(why)) => {
            tracing::warn!(container = %c.name, "cannot restore the container (kept, retried): {why}");
            lc.degraded.insert(c.name.clone(), why);
            (None, 0)
        }
    }
}

/// Opens the namespace container `c` was recorded with: [`Unrestored::Gone`]
/// if nothing is at its path or it names another namespace now.
fn open_netns(c: &Container) -> Result<Netns, Unrestored> {
    let ns = Netns::open_expecting(&c.netns, c.netns_id).map_err(|e| match e {
        e if e.is_gone() => Unrestored::Gone(error_chain(&e)),
        e => Unrestored::Failed(format!("check its network namespace: {}", error_chain(&e))),
    })?;
    ns.check_container_netns()
        .map_err(|e: NetnsError| Unrestored::Failed(format!("{}; delete it", error_chain(&e))))?;
    Ok(ns)
}

/// Brings known container `c` back: its namespace checked, its veth
/// (recreated with the same address if it vanished, its flows then
/// removed; tagged if an older agent made it), whatever of its map entries
/// is missing or wrong, its program and rate limits. Every step overwrites what is there: a retry
/// redoes them. Returns its record if adoption changed it, and the number
/// of map entries written.
async fn restore(
    lc: &mut Lifecycle<'_>,
    c: &Container,
    found: &mut Found,
) -> Result<(Option<Container>, usize), Unrestored> {
    let failed = |what: &str, e: &dyn std::error::Error| {
        Unrestored::Failed(format!("{what}: {}", error_chain(e)))
    };
    let mut new = c.clone();
    let ns = open_netns(c)?;
    if new.netns_id.is_none() {
        // Recorded by an older agent: the namespace there now is the one.
        new.netns_id = Some(ns.id());
    }
    drop(ns);
    let mut recreated = false;
    let (host, mac) = match found.links.get(&c.host_ifname) {
        Some(host) => {
            let mac = parse_mac(&c.mac).ok_or_else(|| {
                Unrestored::Failed(format!("no container MAC recorded for {}", c.name))
            })?;
            let alias = veth_tag(&new).and_then(|t| t.alias()).unwrap_or_default();
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
        None => {
            tracing::warn!(container = %c.name, veth = %c.host_ifname, "veth gone: recreating it");
            // The link pinned for the vanished veth is defunct (it cannot
            // take a new program): drop it, attaching makes a fresh one.
            lc.dp
                .detach_container(&c.host_ifname)
                .map_err(|e| failed("detach", &e))?;
            // The namespace is checked again, by identity, as the veth is
            // made: a path that names another namespace gets nothing.
            let link = lc.create_link(&new).await.map_err(|e| {
                if e.is_netns_gone() {
                    Unrestored::Gone(error_chain(&e))
                } else {
                    failed("recreate its veth", &e)
                }
            })?;
            recreated = true;
            new.mac = format_mac(link.container_mac);
            let host = HostEnd {
                index: link.host_ifindex,
                mac: link.host_mac,
            };
            (host, link.container_mac)
        }
    };
    let mut written = 0;
    let endpoint = Endpoint {
        ifindex: host.index,
        container_id: c.id,
        mac,
        host_mac: host.mac,
        flags: 0,
    };
    if found.endpoints.get(&c.addr) != Some(&endpoint) {
        lc.dp
            .insert_endpoint(c.addr, endpoint)
            .map_err(|e| failed("add the endpoint", &e))?;
        found.endpoints.insert(c.addr, endpoint);
        written += 1;
    }
    for m in &c.publish {
        for (hp, cp) in m.ports() {
            let key = service_key(m, hp);
            let value = ServiceValue {
                backend_addr: c.addr.octets(),
                backend_port: cp,
                _pad: 0,
                ifindex: host.index,
                container_id: c.id,
            };
            if found.services.get(&key) != Some(&value) {
                lc.dp
                    .insert_service(key, value)
                    .map_err(|e| failed("publish a port", &e))?;
                found.services.insert(key, value);
                written += 1;
            }
        }
    }
    // The freshly loaded program goes into the pinned link (or a new one).
    lc.dp
        .attach_container(&c.host_ifname)
        .map_err(|e| failed("attach its program", &e))?;
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
    restore_limits(lc, &mut new);
    let changed = (new != *c).then_some(new);
    Ok((changed, written))
}

/// Re-applies a known container's rate limits with freshly attached
/// programs, following its cgroup if it was recreated (new id). A cgroup
/// that is gone (or not there yet) leaves the limits pending: they are
/// applied when it appears ([`super::cgroups`]).
fn restore_limits(lc: &mut Lifecycle<'_>, c: &mut Container) {
    let Some(path) = &c.cgroup else {
        return;
    };
    match cgroup::lookup(path) {
        Ok(Some(id)) if id == c.cgroup_id => {}
        Ok(Some(id)) => {
            lc.dp.remove_limits(&rate_target(c));
            c.cgroup_id = id;
        }
        Ok(None) => {
            lc.dp.remove_limits(&rate_target(c));
            c.cgroup_id = 0;
            if !c.limits.is_empty() {
                tracing::info!(container = %c.name, cgroup = %path.display(), "cgroup absent: rate limits pending");
            }
            return;
        }
        Err(e) => {
            tracing::warn!(container = %c.name, "rate limits not applied: {e}");
            lc.dp.remove_limits(&rate_target(c));
            c.cgroup_id = 0;
            return;
        }
    }
    if let Err(e) = lc.dp.apply_limits(&rate_target(c), true) {
        tracing::warn!(container = %c.name, "rate limits not applied: {e}");
    }
}

/// Whether published port `key` → `value` is one the state describes: a
/// mapping of the container `value` names covers it, on the same address.
fn wanted_service(state: &State, key: &ServiceKey, value: &ServiceValue) -> bool {
    let protocol = match key.proto {
        p if p == Protocol::Tcp.number() => Protocol::Tcp,
        p if p == Protocol::Udp.number() => Protocol::Udp,
        _ => return false,
    };
    let host_ip = (key.addr != [0; 4]).then(|| Ipv4Addr::from(key.addr));
    let probe = PortMapping {
        host_ip,
        host_port: key.port,
        container_port: key.port,
        count: 1,
        protocol,
    };
    let Some((owner, m)) = state.ports().overlap(&probe) else {
        return false;
    };
    m.host_ip == host_ip
        && state.name_of(value.container_id) == Some(owner)
        && state.get(owner).is_some_and(|c| {
            let cp = m.container_port + (key.port - m.host_port);
            value.backend_addr == c.addr.octets() && value.backend_port == cp
        })
}

/// Removes what no known container owns, or the state does not describe:
/// the agent's `dp<hex>` veths, SERVICES and ENDPOINTS entries, container link pins,
/// buckets, and conntrack flows.
async fn remove_orphans(lc: &mut Lifecycle<'_>, found: &Found) {
    let state = lc.store.state().clone();
    let containers = state.containers();
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
    for (name, link) in &found.links {
        if !is_host_veth_name(name) || veths.contains(name) {
            continue;
        }
        if link.group != VETH_GROUP || link.kind != "veth" {
            tracing::info!(veth = %name, "not removing a link the agent did not make");
            continue;
        }
        tracing::warn!(veth = %name, "removing an orphaned veth");
        if let Err(e) = lc.net.delete_container_link(name).await {
            tracing::warn!(veth = %name, "{}", error_chain(&e));
        }
    }
    for (key, value) in &found.services {
        if !wanted_service(&state, key, value) {
            tracing::warn!(
                port = key.port,
                proto = key.proto,
                "removed an orphaned published port"
            );
            lc.dp.remove_service_any(key);
        }
    }
    for (addr, e) in &found.endpoints {
        let wanted = state
            .name_of(e.container_id)
            .and_then(|n| state.get(n))
            .is_some_and(|c| c.addr == *addr);
        if !wanted {
            tracing::warn!(%addr, "removed an orphaned endpoint");
            lc.dp.remove_endpoint_any(*addr);
        }
    }
    lc.dp.remove_orphan_links(&veths);
    for cgroup_id in lc.dp.retain_buckets(&limited) {
        tracing::warn!(cgroup_id, "removed an orphaned rate limit");
    }
    match lc.dp.flow_container_ids() {
        Ok(ids) => {
            for id in ids.into_iter().filter(|id| *id != 0 && !state.has_id(*id)) {
                if let Err(e) = lc.dp.flush_flows(Flows::Container(id)) {
                    tracing::warn!(container_id = id, "flush orphaned flows: {e}");
                }
            }
        }
        Err(e) => tracing::warn!("read conntrack: {e}"),
    }
}

/// Removes everything an agent with these paths made: every veth it made
/// (its containers', and any other in its group), the pins it names under
/// the bpffs directory (the programs are detached; the directory goes only
/// if nothing else is in it) and the persisted state (snapshot and
/// journal). Refuses while an agent runs with this state directory. Works
/// without loading anything, and with a corrupt state.
pub async fn cleanup(cfg: &AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let lock = StateLock::acquire(&cfg.state_dir)
        .context("datapath agent --cleanup refuses to run under a live agent")?;
    let net = Netlink::new().context("open a netlink connection")?;
    let state = match store::journal::load(&cfg.state_dir) {
        Ok(state) => {
            // The ports this agent reserved go back to the node.
            if let Err(e) = super::reserved::reserve(&PortSet::default(), state.reserved_ports()) {
                tracing::warn!("give back the reserved ports: {e:#}");
            }
            state
        }
        Err(e) => {
            tracing::warn!("{e}; removing the agent's veths by their tag only");
            State::default()
        }
    };
    let links = net.links().await.context("list links")?;
    for link in &links {
        let known = state
            .containers()
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
    match net.delete_vxlan(super::cluster::OVERLAY_IF).await {
        Ok(()) => {}
        Err(e) => tracing::warn!(device = super::cluster::OVERLAY_IF, "{}", error_chain(&e)),
    }
    for path in store::remove_all(&cfg.state_dir)
        .with_context(|| format!("remove the state in {}", cfg.state_dir.display()))?
    {
        tracing::info!(file = %path.display(), "removed state");
    }
    lock.remove()?;
    // The directory too, if nothing else lives there.
    let _ = std::fs::remove_dir(&cfg.state_dir);
    Ok(())
}
