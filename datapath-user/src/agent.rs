//! The node agent: owns the loaded datapath, the persisted state and the
//! netlink connection, and carries out container operations.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use datapath_common::{
    CONFIG_F_ALLOW_DIRECT_ROUTING, CONFIG_F_FIB, CONFIG_F_READY, CONFIG_F_SNAT, Config, Endpoint,
    EndpointKey, FLUSH_F_CONTAINER, FlushRequest, NodeAddr, NodeAddrKey, STAT_COUNT, ServiceKey,
    ServiceValue, Stat, ct::Timeouts, names,
};
use ipnet::Ipv4Net;

use crate::{
    api::{self, AddContainer, ContainerInfo, UpdateContainer},
    bpf::{BpfError, Datapath, LoadOptions, UplinkHook},
    conntrack,
    netlink::{ContainerLink, Netlink},
    netns, ratelimit,
    spec::PortMapping,
    state::{Container, State, StateError, StateStore, gateway_of},
};

/// How the uplink hook is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// TC on veth uplinks (XDP on a veth costs its peer TSO), native XDP
    /// on other devices.
    Auto,
    /// XDP in the driver.
    Native,
    /// XDP on the skb.
    Generic,
    /// TC only.
    Off,
}

/// Everything the agent is configured with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The uplink interface, if any.
    pub uplink: Option<String>,
    /// The node address (default: the uplink's first IPv4 address).
    pub node_ip: Option<Ipv4Addr>,
    /// The container pool.
    pub pool: Ipv4Net,
    /// Uplink hook choice.
    pub xdp_mode: XdpMode,
    /// bpffs directory for pins.
    pub bpffs_dir: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Masquerade port range.
    pub snat_ports: (u16, u16),
    /// Masquerade container egress.
    pub masquerade: bool,
    /// Capacity of the main conntrack table in entries (two per flow).
    pub ct_max: Option<u32>,
    /// Percentage of the main conntrack table one container may hold
    /// (0 or 100: no limit).
    pub ct_container_share: u8,
    /// Let the uplink reach container addresses directly.
    pub allow_direct_routing: bool,
    /// Conntrack idle timeouts.
    pub timeouts: Timeouts,
    /// Kernel-side log level (aya-log).
    pub log_level: u8,
}

/// An error of an agent operation, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is invalid; nothing was changed.
    #[error("{0}")]
    BadRequest(String),
    /// No such object.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with existing state; nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// A BPF operation failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// Something else failed.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::NotFound(_) => 404,
            Self::Conflict(_) => 409,
            _ => 500,
        }
    }
}

fn internal(context: &str) -> impl FnOnce(String) -> AgentError + '_ {
    move |e| AgentError::Internal(format!("{context}: {e}"))
}

/// The uplink as configured at start.
#[derive(Clone, Debug)]
struct Uplink {
    ifname: String,
    ifindex: u32,
    hook: UplinkHook,
    node_ip: Ipv4Addr,
    node_addrs: Vec<Ipv4Addr>,
}

/// The running agent.
pub struct Agent {
    cfg: AgentConfig,
    dp: Datapath,
    store: StateStore,
    state: State,
    netlink: Netlink,
    uplink: Option<Uplink>,
}

/// Validates a container name.
fn validate_name(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadRequest(format!(
            "invalid container name {name:?}: use 1-64 characters of A-Z a-z 0-9 _ . -"
        )))
    }
}

fn validate_ifname(name: &str) -> Result<(), AgentError> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ':']) {
        return Err(AgentError::BadRequest(format!(
            "invalid interface name {name:?}: 1-15 characters, no '/', ':' or spaces"
        )));
    }
    Ok(())
}

impl Agent {
    /// Loads the datapath, configures the uplink and adopts the persisted
    /// state.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        crate::bpf::ensure_bpffs()?;
        let dp = Datapath::load(&LoadOptions {
            bpffs_dir: cfg.bpffs_dir.clone(),
            ct_max: cfg.ct_max,
            log_level: cfg.log_level,
        })
        .context("load the datapath")?;
        let store = StateStore::new(&cfg.state_dir);
        let state = store.load()?;
        let netlink = Netlink::new().context("open a netlink connection")?;
        let mut agent = Agent {
            cfg,
            dp,
            store,
            state,
            netlink,
            uplink: None,
        };
        agent.setup_uplink().await?;
        agent.reconcile().await?;
        Ok(agent)
    }

    /// The datapath (for the log forwarder).
    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    async fn setup_uplink(&mut self) -> anyhow::Result<()> {
        use anyhow::{Context as _, bail};
        let pool = self.cfg.pool;
        let (lo, hi) = self.cfg.snat_ports;
        let ct_max = crate::bpf::ct_max(self.cfg.ct_max);
        let share = u32::from(self.cfg.ct_container_share.min(100));
        let mut config = Config {
            pool_addr: pool.network().octets(),
            pool_mask: pool.netmask().octets(),
            gateway_addr: gateway_of(pool).octets(),
            snat_port_min: lo,
            snat_port_max: hi,
            flags: CONFIG_F_FIB,
            ct_container_max: if share == 100 {
                0
            } else {
                (u64::from(ct_max) * u64::from(share) / 100) as u32
            },
            timeouts: self.cfg.timeouts,
            ..Config::default()
        };
        if self.cfg.masquerade {
            config.flags |= CONFIG_F_SNAT;
        }
        if self.cfg.allow_direct_routing {
            config.flags |= CONFIG_F_ALLOW_DIRECT_ROUTING;
        }
        let Some(ifname) = self.cfg.uplink.clone() else {
            tracing::warn!("no --uplink given: programs loaded and maps pinned, nothing attached");
            self.dp.config.set(0, config, 0)?;
            return Ok(());
        };
        let Some((ifindex, _mac, kind)) = self
            .netlink
            .link(&ifname)
            .await
            .with_context(|| format!("look up uplink {ifname}"))?
        else {
            bail!("uplink {ifname} does not exist in this network namespace");
        };
        let addrs: Vec<Ipv4Addr> = self
            .netlink
            .ipv4_addrs(ifindex)
            .await
            .with_context(|| format!("read addresses of {ifname}"))?
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        let node_ip = match (self.cfg.node_ip, addrs.first()) {
            (Some(ip), _) => ip,
            (None, Some(ip)) => *ip,
            (None, None) => {
                bail!("uplink {ifname} has no IPv4 address; give one to it or pass --node-ip")
            }
        };
        let mut node_addrs = addrs;
        if !node_addrs.contains(&node_ip) {
            node_addrs.push(node_ip);
        }
        let hook = match (self.cfg.xdp_mode, kind.as_str()) {
            (XdpMode::Off, _) | (XdpMode::Auto, "veth") => UplinkHook::Tc,
            (XdpMode::Auto, _) | (XdpMode::Native, _) => UplinkHook::XdpNative,
            (XdpMode::Generic, _) => UplinkHook::XdpGeneric,
        };
        config.node_addr = node_ip.octets();
        config.uplink_ifindex = ifindex;
        config.flags |= CONFIG_F_READY;
        // Node addresses first, so that no packet sees a ready config
        // without them.
        let stale: Vec<NodeAddrKey> = self.dp.node_addrs.keys().filter_map(Result::ok).collect();
        for k in stale {
            if !node_addrs.contains(&Ipv4Addr::from(k.addr)) {
                let _ = self.dp.node_addrs.remove(&k);
            }
        }
        for a in &node_addrs {
            self.dp
                .node_addrs
                .insert(NodeAddrKey { addr: a.octets() }, NodeAddr { ifindex }, 0)?;
        }
        self.dp.config.set(0, config, 0)?;
        crate::netlink::enable_ip_forward().context("enable IPv4 forwarding")?;
        self.dp.attach_uplink(&ifname, hook)?;
        tracing::info!(
            uplink = %ifname,
            ?hook,
            %node_ip,
            "uplink attached"
        );
        self.uplink = Some(Uplink {
            ifname,
            ifindex,
            hook,
            node_ip,
            node_addrs,
        });
        Ok(())
    }

    /// Adopts what a previous agent left (pinned maps and links, veths, the
    /// state file) and reconciles it with the state: a container whose netns
    /// is gone is removed, one whose veth is gone is recreated, and every
    /// other one gets its map entries and program re-applied. Then orphans
    /// go: veths, map entries, link pins and flows of no known container
    /// (which is also what is left of a container whose creation was cut
    /// off: it is saved only once complete).
    async fn reconcile(&mut self) -> anyhow::Result<()> {
        let containers: Vec<Container> = self.state.containers.values().cloned().collect();
        for c in containers {
            if !netns::is_netns(&c.netns).unwrap_or(false) {
                tracing::warn!(container = %c.name, "its network namespace is gone: removing the container");
                self.remove_container(&c).await;
                self.state.containers.remove(&c.name);
                continue;
            }
            if let Err(e) = self.restore(&c).await {
                tracing::warn!(container = %c.name, "cannot restore the container, removing it: {e}");
                self.remove_container(&c).await;
                self.state.containers.remove(&c.name);
            }
        }
        self.store.save(&self.state)?;
        self.remove_orphans().await;
        Ok(())
    }

    /// Brings one known container back: its veth (recreated with the same
    /// address if it vanished), map entries and program.
    async fn restore(&mut self, c: &Container) -> Result<(), AgentError> {
        let (ifindex, host_mac, mac) = match self.netlink.link(&c.host_ifname).await {
            Ok(Some((ifindex, host_mac, _))) => match parse_mac(&c.mac) {
                Some(mac) => (ifindex, host_mac, mac),
                None => {
                    return Err(AgentError::Internal(format!(
                        "no container MAC recorded for {}",
                        c.name
                    )));
                }
            },
            Ok(None) => {
                tracing::warn!(container = %c.name, veth = %c.host_ifname, "veth gone: recreating it");
                // The link pinned for the vanished veth is defunct (it cannot
                // take a new program): drop it, attaching makes a fresh one.
                self.dp.detach_container(&c.host_ifname)?;
                let link = self.create_link(c).await?;
                let mac = link.container_mac;
                if let Some(stored) = self.state.containers.get_mut(&c.name) {
                    stored.mac = format_mac(mac);
                }
                (link.host_ifindex, link.host_mac, mac)
            }
            Err(e) => return Err(AgentError::Internal(error_chain(&e))),
        };
        self.fill_maps(c, ifindex, mac, host_mac)?;
        self.restore_limits(c);
        tracing::info!(container = %c.name, "adopted");
        Ok(())
    }

    /// Re-applies a known container's rate limits with freshly attached
    /// programs, following its cgroup if it was recreated (new id). A
    /// cgroup that is gone leaves the limits recorded but unapplied.
    fn restore_limits(&mut self, c: &Container) {
        let Some(path) = &c.cgroup else {
            return;
        };
        let mut c = c.clone();
        match ratelimit::resolve_cgroup(&path.to_string_lossy()) {
            Ok(cg) if cg.id == c.cgroup_id => {}
            Ok(cg) => {
                ratelimit::remove(&mut self.dp, &c);
                c.cgroup_id = cg.id;
                if let Some(stored) = self.state.containers.get_mut(&c.name) {
                    stored.cgroup_id = cg.id;
                }
            }
            Err(e) => {
                tracing::warn!(container = %c.name, "rate limits not applied: {e}");
                ratelimit::remove(&mut self.dp, &c);
                return;
            }
        }
        if let Err(e) = ratelimit::apply(&mut self.dp, &c, true) {
            tracing::warn!(container = %c.name, "rate limits not applied: {e}");
        }
    }

    /// Refuses a second container with limits on a cgroup whose buckets
    /// another container's limits already use.
    fn check_cgroup(
        &self,
        name: &str,
        cgroup_id: u64,
        limits: &ratelimit::Limits,
    ) -> Result<(), AgentError> {
        if cgroup_id == 0 || limits.is_empty() {
            return Ok(());
        }
        match self
            .state
            .containers
            .values()
            .find(|c| c.name != name && c.cgroup_id == cgroup_id && !c.limits.is_empty())
        {
            Some(other) => Err(AgentError::Conflict(format!(
                "container {:?} already limits the cgroup {}; one cgroup has one set of limits",
                other.name,
                other.cgroup.as_deref().unwrap_or(Path::new("?")).display()
            ))),
            None => Ok(()),
        }
    }

    /// Changes a container's rate limits in place: every value is checked
    /// first, then each direction's bucket is created, reconfigured under
    /// its lock (no flow notices more than the new rate) or removed.
    pub fn update(
        &mut self,
        name: &str,
        req: &UpdateContainer,
    ) -> Result<ContainerInfo, AgentError> {
        let c = self
            .state
            .containers
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("no container named {name:?}")))?;
        let bad = |e: ratelimit::LimitError| AgentError::BadRequest(e.to_string());
        let limits = ratelimit::Limits {
            egress: ratelimit::updated(
                "egress",
                c.limits.egress,
                req.egress_rate.as_deref(),
                req.egress_burst.as_deref(),
            )
            .map_err(bad)?,
            ingress: ratelimit::updated(
                "ingress",
                c.limits.ingress,
                req.ingress_rate.as_deref(),
                req.ingress_burst.as_deref(),
            )
            .map_err(bad)?,
        };
        if limits == c.limits {
            return Ok(self.info(&c));
        }
        if c.cgroup.is_none() && !limits.is_empty() {
            return Err(AgentError::BadRequest(format!(
                "container {name:?} was added without a cgroup: rate limits apply to a cgroup, \
                 so delete it and add it again with --cgroup"
            )));
        }
        self.check_cgroup(name, c.cgroup_id, &limits)?;
        let mut updated = c.clone();
        updated.limits = limits;
        if let Err(e) = ratelimit::apply(&mut self.dp, &updated, false) {
            if let Err(back) = ratelimit::apply(&mut self.dp, &c, false) {
                tracing::warn!(container = %name, "restore the previous limits: {back}");
            }
            return Err(internal("apply rate limits")(e.to_string()));
        }
        self.state
            .containers
            .insert(name.to_owned(), updated.clone());
        if let Err(e) = self.store.save(&self.state) {
            self.state.containers.insert(name.to_owned(), c.clone());
            if let Err(back) = ratelimit::apply(&mut self.dp, &c, false) {
                tracing::warn!(container = %name, "restore the previous limits: {back}");
            }
            return Err(e.into());
        }
        tracing::info!(container = %name, egress = ?updated.limits.egress, ingress = ?updated.limits.ingress, "rate limits changed");
        Ok(self.info(&updated))
    }

    /// Removes what no known container owns: `dp<hex>` veths, SERVICES and
    /// ENDPOINTS entries, container link pins, and conntrack flows.
    async fn remove_orphans(&mut self) {
        let ids: std::collections::HashSet<u32> =
            self.state.containers.values().map(|c| c.id).collect();
        let veths: std::collections::HashSet<String> = self
            .state
            .containers
            .values()
            .map(|c| c.host_ifname.clone())
            .collect();
        match self.netlink.list_links_with_prefix("dp").await {
            Ok(links) => {
                for (name, _) in links {
                    if is_our_veth_name(&name) && !veths.contains(&name) {
                        tracing::warn!(veth = %name, "removing an orphaned veth");
                        if let Err(e) = self.netlink.delete_container_link(&name).await {
                            tracing::warn!(veth = %name, "{}", error_chain(&e));
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("cannot list veths: {}", error_chain(&e)),
        }
        let stale: Vec<ServiceKey> = self
            .dp
            .services
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| !ids.contains(&v.container_id))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            tracing::warn!(port = k.port, "removing an orphaned published port");
            let _ = self.dp.services.remove(&k);
        }
        let stale: Vec<EndpointKey> = self
            .dp
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| !ids.contains(&v.container_id))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            tracing::warn!(addr = %Ipv4Addr::from(k.addr), "removing an orphaned endpoint");
            let _ = self.dp.endpoints.remove(&k);
        }
        let links = self.cfg.bpffs_dir.join("links");
        if let Ok(entries) = std::fs::read_dir(&links) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(veth) = name.strip_prefix(crate::bpf::CONTAINER_LINK_PREFIX)
                    && !veths.contains(veth)
                {
                    tracing::warn!(link = %name, "removing an orphaned link");
                    let _ = self.dp.detach_container(veth);
                }
                if name.starts_with(crate::bpf::STAGING_LINK_PREFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
                for hook in crate::bpf::RateHook::ALL {
                    let prefix = crate::bpf::rate_link_name(hook, "");
                    if let Some(veth) = name.strip_prefix(&prefix)
                        && !veths.contains(veth)
                    {
                        tracing::warn!(link = %name, "removing an orphaned link");
                        let _ = self.dp.detach_rate(hook, veth);
                    }
                }
            }
        }
        let limited: std::collections::HashSet<(u64, u32)> = self
            .state
            .containers
            .values()
            .flat_map(|c| {
                [
                    datapath_common::ratelimit::direction::EGRESS,
                    datapath_common::ratelimit::direction::INGRESS,
                ]
                .into_iter()
                .filter(|d| c.limits.get(*d).is_some())
                .map(|d| (c.cgroup_id, d))
            })
            .collect();
        let stale: Vec<datapath_common::ratelimit::RateKey> = self
            .dp
            .rate_limits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !limited.contains(&(k.cgroup_id, k.direction)))
            .collect();
        for k in stale {
            tracing::warn!(cgroup_id = k.cgroup_id, "removing an orphaned rate limit");
            let _ = self.dp.rate_limits.remove(&k);
            let _ = self.dp.rate_stats.remove(&k);
        }
        match self.flow_container_ids() {
            Ok(found) => {
                for id in found.into_iter().filter(|id| *id != 0 && !ids.contains(id)) {
                    if let Err(e) = self.flush_container_flows(id) {
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
        let netlink = Netlink::new().context("open a netlink connection")?;
        let store = StateStore::new(&cfg.state_dir);
        let state = match store.load() {
            Ok(s) => s,
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
        for (name, _) in netlink
            .list_links_with_prefix("dp")
            .await
            .unwrap_or_default()
        {
            if is_our_veth_name(&name) && !names.contains(&name) {
                names.push(name);
            }
        }
        for name in names {
            match netlink.delete_container_link(&name).await {
                Ok(()) => tracing::info!(veth = %name, "removed"),
                Err(e) => tracing::warn!(veth = %name, "{}", error_chain(&e)),
            }
        }
        match std::fs::remove_dir_all(&cfg.bpffs_dir) {
            Ok(()) => tracing::info!(dir = %cfg.bpffs_dir.display(), "removed pins"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", cfg.bpffs_dir.display())),
        }
        match std::fs::remove_file(store.path()) {
            Ok(()) => tracing::info!(file = %store.path().display(), "removed state"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", store.path().display())),
        }
        // The directory too, if nothing else lives there.
        let _ = std::fs::remove_dir(store.dir());
        Ok(())
    }

    fn info(&self, c: &Container) -> ContainerInfo {
        ContainerInfo {
            name: c.name.clone(),
            id: c.id,
            addr: c.addr,
            gateway: gateway_of(self.cfg.pool),
            netns: c.netns.clone(),
            ifname: c.ifname.clone(),
            host_ifname: c.host_ifname.clone(),
            publish: c.publish.iter().map(ToString::to_string).collect(),
            cgroup: c.cgroup.clone(),
            limits: c.limits,
            counters: ratelimit::counters(&self.dp, c),
        }
    }

    /// All containers.
    pub fn list(&self) -> Vec<ContainerInfo> {
        self.state
            .containers
            .values()
            .map(|c| self.info(c))
            .collect()
    }

    /// One container.
    pub fn get(&self, name: &str) -> Result<ContainerInfo, AgentError> {
        self.state
            .containers
            .get(name)
            .map(|c| self.info(c))
            .ok_or_else(|| AgentError::NotFound(format!("no container named {name:?}")))
    }

    fn check_publish(&self, name: &str, publish: &[PortMapping]) -> Result<(), AgentError> {
        let (lo, hi) = self.cfg.snat_ports;
        for (i, m) in publish.iter().enumerate() {
            if m.host_port <= hi && lo <= m.host_end() {
                return Err(AgentError::BadRequest(format!(
                    "cannot publish {m}: host ports {lo}-{hi} are reserved for masquerading (--snat-ports)"
                )));
            }
            if let (Some(ip), Some(up)) = (m.host_ip, &self.uplink)
                && !up.node_addrs.contains(&ip)
            {
                return Err(AgentError::BadRequest(format!(
                    "cannot publish {m}: {ip} is not an address of this node ({})",
                    up.node_addrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if let Some(other) = publish[..i].iter().find(|o| o.overlaps(m)) {
                return Err(AgentError::BadRequest(format!(
                    "{m} overlaps {other} in the same request"
                )));
            }
            for c in self.state.containers.values().filter(|c| c.name != name) {
                if let Some(other) = c.publish.iter().find(|o| o.overlaps(m)) {
                    return Err(AgentError::Conflict(format!(
                        "cannot publish {m}: {other} is already published by container {:?}",
                        c.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Creates a container's network: veth pair, address, routes, maps.
    /// Idempotent: adding an existing container with the same spec returns
    /// it unchanged. Nothing is left half-applied on failure.
    pub async fn add(&mut self, req: AddContainer) -> Result<ContainerInfo, AgentError> {
        validate_name(&req.name)?;
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".to_owned());
        validate_ifname(&ifname)?;
        let netns = netns::resolve(&req.netns).map_err(|e| {
            AgentError::BadRequest(format!(
                "network namespace {:?}: {}",
                req.netns,
                error_chain(&e)
            ))
        })?;
        let publish = req
            .publish
            .iter()
            .map(|s| s.parse::<PortMapping>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let rate = ratelimit::request(
            req.cgroup.as_deref(),
            (req.egress_rate.as_deref(), req.egress_burst.as_deref()),
            (req.ingress_rate.as_deref(), req.ingress_burst.as_deref()),
        )
        .map_err(AgentError::BadRequest)?;
        let (cgroup, cgroup_id) = rate.cgroup.map_or((None, 0), |cg| (Some(cg.path), cg.id));
        if let Some(c) = self.state.containers.get(&req.name) {
            if c.netns == netns
                && c.ifname == ifname
                && c.publish == publish
                && c.cgroup == cgroup
                && c.limits == rate.limits
            {
                return Ok(self.info(c));
            }
            return Err(AgentError::Conflict(format!(
                "container {:?} exists with another network namespace, interface or ports; delete it first",
                req.name
            )));
        }
        self.check_publish(&req.name, &publish)?;
        self.check_cgroup(&req.name, cgroup_id, &rate.limits)?;
        let addr = self.state.allocate_addr(self.cfg.pool).ok_or_else(|| {
            AgentError::Conflict(format!("the pool {} has no free address", self.cfg.pool))
        })?;
        let id = self.state.take_id();
        // Saved only once complete: an agent cut off before that finds the
        // veth, map entries and link of a container it does not know on its
        // next start and removes them as orphans, so a container is all
        // there or not at all, at the cost of a single state write.
        let mut container = Container {
            id,
            name: req.name.clone(),
            netns,
            ifname,
            host_ifname: format!("dp{id:x}"),
            addr,
            publish,
            mac: String::new(),
            cgroup,
            cgroup_id,
            limits: rate.limits,
        };
        let result = match self.create_link(&container).await {
            Ok(link) => {
                container.mac = format_mac(link.container_mac);
                self.fill_maps(
                    &container,
                    link.host_ifindex,
                    link.container_mac,
                    link.host_mac,
                )
                .and_then(|()| {
                    ratelimit::apply(&mut self.dp, &container, false)
                        .map_err(|e| internal("apply rate limits")(e.to_string()))
                })
                .and_then(|()| {
                    self.state
                        .containers
                        .insert(container.name.clone(), container.clone());
                    self.store.save(&self.state).map_err(AgentError::from)
                })
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.remove_container(&container).await;
            self.state.containers.remove(&container.name);
            if let Err(save) = self.store.save(&self.state) {
                tracing::warn!("{save}");
            }
            return Err(e);
        }
        tracing::info!(container = %container.name, addr = %container.addr, veth = %container.host_ifname, "container added");
        Ok(self.info(&container))
    }

    /// Creates a container's veth pair.
    async fn create_link(&self, c: &Container) -> Result<crate::netlink::LinkInfo, AgentError> {
        let gro = matches!(
            self.uplink.as_ref().map(|u| u.hook),
            Some(UplinkHook::XdpNative)
        );
        self.netlink
            .create_container_link(&ContainerLink {
                host_ifname: c.host_ifname.clone(),
                netns: c.netns.clone(),
                ifname: c.ifname.clone(),
                addr: c.addr,
                gateway: gateway_of(self.cfg.pool),
                mtu: None,
                gro,
            })
            .await
            .map_err(|e| match e {
                crate::netlink::NetlinkError::Netns(_) => AgentError::BadRequest(error_chain(&e)),
                e => AgentError::Internal(format!("create the veth pair: {}", error_chain(&e))),
            })
    }

    fn fill_maps(
        &mut self,
        c: &Container,
        host_ifindex: u32,
        mac: [u8; 6],
        host_mac: [u8; 6],
    ) -> Result<(), AgentError> {
        self.dp
            .endpoints
            .insert(
                EndpointKey {
                    addr: c.addr.octets(),
                },
                Endpoint {
                    ifindex: host_ifindex,
                    container_id: c.id,
                    mac,
                    host_mac,
                    flags: 0,
                },
                0,
            )
            .map_err(|e| internal("add the endpoint")(e.to_string()))?;
        for m in &c.publish {
            for (hp, cp) in m.ports() {
                self.dp
                    .services
                    .insert(
                        service_key(m, hp),
                        ServiceValue {
                            backend_addr: c.addr.octets(),
                            backend_port: cp,
                            _pad: 0,
                            ifindex: host_ifindex,
                            container_id: c.id,
                        },
                        0,
                    )
                    .map_err(|e| internal("publish a port")(e.to_string()))?;
            }
        }
        self.dp.attach_container(&c.host_ifname)?;
        Ok(())
    }

    /// Undoes everything of a container, going on after failures (logged).
    async fn remove_container(&mut self, c: &Container) {
        for m in &c.publish {
            for (hp, _) in m.ports() {
                let key = service_key(m, hp);
                // Only our own entry: never a port another container owns.
                if self
                    .dp
                    .services
                    .get(&key, 0)
                    .is_ok_and(|v| v.container_id == c.id)
                {
                    let _ = self.dp.services.remove(&key);
                }
            }
        }
        let ekey = EndpointKey {
            addr: c.addr.octets(),
        };
        if self
            .dp
            .endpoints
            .get(&ekey, 0)
            .is_ok_and(|e| e.container_id == c.id)
        {
            let _ = self.dp.endpoints.remove(&ekey);
        }
        if let Err(e) = self.dp.detach_container(&c.host_ifname) {
            tracing::warn!(container = %c.name, "detach: {e}");
        }
        ratelimit::remove(&mut self.dp, c);
        if let Err(e) = self.flush_container_flows(c.id) {
            tracing::warn!(container = %c.name, "flush conntrack: {e}");
        }
        if let Err(e) = self.netlink.delete_container_link(&c.host_ifname).await {
            tracing::warn!(container = %c.name, "delete veth: {}", error_chain(&e));
        }
    }

    /// Publishes one more port (or range) of an existing container.
    /// Publishing what it already publishes succeeds unchanged.
    pub fn publish(&mut self, name: &str, spec: &str) -> Result<ContainerInfo, AgentError> {
        let m: PortMapping = spec
            .parse()
            .map_err(|e: crate::spec::SpecError| AgentError::BadRequest(e.to_string()))?;
        let c = self
            .state
            .containers
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("no container named {name:?}")))?;
        if c.publish.contains(&m) {
            return Ok(self.info(&c));
        }
        if let Some(other) = c.publish.iter().find(|o| o.overlaps(&m)) {
            return Err(AgentError::Conflict(format!(
                "cannot publish {m}: container {name:?} already publishes {other}"
            )));
        }
        self.check_publish(name, std::slice::from_ref(&m))?;
        let ifindex = self
            .dp
            .endpoints
            .get(
                &EndpointKey {
                    addr: c.addr.octets(),
                },
                0,
            )
            .map(|e| e.ifindex)
            .map_err(|e| internal("read the endpoint")(e.to_string()))?;
        let mut inserted = Vec::new();
        for (hp, cp) in m.ports() {
            let key = service_key(&m, hp);
            let value = ServiceValue {
                backend_addr: c.addr.octets(),
                backend_port: cp,
                _pad: 0,
                ifindex,
                container_id: c.id,
            };
            if let Err(e) = self.dp.services.insert(key, value, 0) {
                for k in inserted {
                    let _ = self.dp.services.remove(&k);
                }
                return Err(internal("publish a port")(e.to_string()));
            }
            inserted.push(key);
        }
        let mut updated = c;
        updated.publish.push(m);
        self.state
            .containers
            .insert(name.to_owned(), updated.clone());
        if let Err(e) = self.store.save(&self.state) {
            for k in inserted {
                let _ = self.dp.services.remove(&k);
            }
            updated.publish.pop();
            self.state.containers.insert(name.to_owned(), updated);
            return Err(e.into());
        }
        tracing::info!(container = %name, publish = %m, "port published");
        Ok(self.info(&self.state.containers[name]))
    }

    /// Stops publishing one port (or range) of a container. Established
    /// flows keep their container; new connections are no longer
    /// translated. Unpublishing what is not published succeeds.
    pub fn unpublish(&mut self, name: &str, spec: &str) -> Result<ContainerInfo, AgentError> {
        let m: PortMapping = spec
            .parse()
            .map_err(|e: crate::spec::SpecError| AgentError::BadRequest(e.to_string()))?;
        let mut c = self
            .state
            .containers
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("no container named {name:?}")))?;
        let Some(pos) = c.publish.iter().position(|o| *o == m) else {
            return Ok(self.info(&c));
        };
        c.publish.remove(pos);
        self.state.containers.insert(name.to_owned(), c.clone());
        self.store.save(&self.state)?;
        for (hp, _) in m.ports() {
            let key = service_key(&m, hp);
            if self
                .dp
                .services
                .get(&key, 0)
                .is_ok_and(|v| v.container_id == c.id)
            {
                let _ = self.dp.services.remove(&key);
            }
        }
        tracing::info!(container = %name, publish = %m, "port unpublished");
        Ok(self.info(&c))
    }

    /// Deletes a container; deleting an absent one succeeds.
    pub async fn del(&mut self, name: &str) -> Result<(), AgentError> {
        let Some(c) = self.state.containers.get(name).cloned() else {
            return Ok(());
        };
        self.remove_container(&c).await;
        self.state.containers.remove(name);
        self.store.save(&self.state)?;
        tracing::info!(container = %name, "container deleted");
        Ok(())
    }

    /// Every live flow.
    fn flows(&self, now: u64) -> Result<Vec<conntrack::FlowEntries>, AgentError> {
        use aya::maps::IterableMap as _;
        conntrack::read_flows(
            self.dp.ct.map(),
            self.dp.ct_new.map(),
            &self.cfg.timeouts,
            now,
        )
        .map_err(|e| internal("read conntrack")(e.to_string()))
    }

    /// The container ids of every flow.
    fn flow_container_ids(&self) -> Result<std::collections::BTreeSet<u32>, AgentError> {
        Ok(self
            .flows(conntrack::now_ns())?
            .iter()
            .map(|f| f.orig.container_id)
            .collect())
    }

    /// Removes a container's flows (in the kernel, which keeps its
    /// per-container count exact) and its conntrack record; returns the
    /// number of entries removed.
    fn flush_container_flows(&mut self, id: u32) -> Result<u64, AgentError> {
        let flows = self.dp.flush_flows(FlushRequest {
            container_id: id,
            flags: FLUSH_F_CONTAINER,
        })?;
        let _ = self.dp.ct_containers.remove(&id);
        Ok(flows * 2)
    }

    /// Every tracked flow.
    pub fn conntrack(&self) -> Result<Vec<api::Flow>, AgentError> {
        let now = conntrack::now_ns();
        let flows = self.flows(now)?;
        let by_id: BTreeMap<u32, String> = self
            .state
            .containers
            .values()
            .map(|c| (c.id, c.name.clone()))
            .collect();
        Ok(flows
            .iter()
            .map(|f| {
                conntrack::to_api(
                    f,
                    &self.cfg.timeouts,
                    now,
                    by_id.get(&f.orig.container_id).cloned(),
                )
            })
            .collect())
    }

    /// Removes the flows of one container, or all.
    pub fn flush(&mut self, container: Option<&str>) -> Result<usize, AgentError> {
        let id = match container {
            Some(name) => Some(
                self.state
                    .containers
                    .get(name)
                    .map(|c| c.id)
                    .ok_or_else(|| AgentError::NotFound(format!("no container named {name:?}")))?,
            ),
            None => None,
        };
        let removed = match id {
            Some(id) => self.flush_container_flows(id)?,
            None => self.dp.flush_flows(FlushRequest::default())? * 2,
        };
        Ok(removed as usize)
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (i, stat) in Stat::ALL.iter().enumerate().take(STAT_COUNT as usize) {
            let v = self
                .dp
                .stats
                .get(&(i as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            out.insert(stat.name().to_owned(), v);
        }
        out
    }

    /// What is loaded and attached.
    pub fn status(&self) -> api::Status {
        let maps_dir = self.cfg.bpffs_dir.join("maps");
        api::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            bpffs_dir: self.cfg.bpffs_dir.clone(),
            state_dir: self.cfg.state_dir.clone(),
            pool: self.cfg.pool.to_string(),
            gateway: gateway_of(self.cfg.pool),
            uplink: self.uplink.as_ref().map(|u| api::UplinkInfo {
                ifname: u.ifname.clone(),
                ifindex: u.ifindex,
                hook: match u.hook {
                    UplinkHook::Tc => "tc",
                    UplinkHook::XdpNative => "xdp-native",
                    UplinkHook::XdpGeneric => "xdp-generic",
                }
                .to_owned(),
                node_ip: u.node_ip,
                node_addrs: u.node_addrs.clone(),
            }),
            attachments: self.dp.attachments().iter().map(Into::into).collect(),
            maps: names::ALL
                .iter()
                .map(|n| api::MapInfo {
                    name: (*n).to_owned(),
                    pin: maps_dir.join(n),
                })
                .collect(),
            counters: self.counters(),
            containers: self.state.containers.len(),
            conntrack_entries: self.flows(conntrack::now_ns()).map_or(0, |f| {
                f.iter().map(|f| 1 + usize::from(f.reply.is_some())).sum()
            }),
            conntrack_max: crate::bpf::ct_max(self.cfg.ct_max),
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }
}

/// Whether `name` is a host-side veth name the agent hands out (`dp<hex>`).
fn is_our_veth_name(name: &str) -> bool {
    name.strip_prefix("dp")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}

/// The services-map key of host port `port` of mapping `m`.
fn service_key(m: &PortMapping, port: u16) -> ServiceKey {
    ServiceKey {
        addr: m.host_ip.map_or([0; 4], |ip| ip.octets()),
        port,
        proto: m.protocol.number(),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dp_hex_names_count_as_our_veths() {
        assert!(is_our_veth_name("dp1"));
        assert!(is_our_veth_name("dp1f3a"));
        assert!(!is_our_veth_name("dp"));
        assert!(!is_our_veth_name("dpdk0"));
        assert!(!is_our_veth_name("eth0"));
    }

    #[test]
    fn macs_round_trip_through_their_text_form() {
        let mac = [0x02, 0xab, 0x00, 0x10, 0xff, 0x7e];
        assert_eq!(format_mac(mac), "02:ab:00:10:ff:7e");
        assert_eq!(parse_mac(&format_mac(mac)), Some(mac));
        assert_eq!(parse_mac("02:ab:00:10:ff"), None);
        assert_eq!(parse_mac("02:ab:00:10:ff:7e:00"), None);
        assert_eq!(parse_mac(""), None);
    }

    #[test]
    fn container_names_are_validated() {
        assert!(validate_name("web-1.a_b").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
