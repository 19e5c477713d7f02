//! The node agent: the one owner of the loaded datapath, the netlink
//! connection and the desired state, fed by the API over a channel.
//!
//! * [`owner`]: the owner task, on a thread of its own, carries out one
//!   change after another; every blocking step (BPF syscalls, fsync,
//!   setns) runs there, never on the API's async workers.
//! * [`handle`]: what the API server holds ([`Handle`]): changes go to the
//!   owner as commands; reads (status, listings, flows) use the last
//!   published [`status::Snapshot`] and a read-only view of the maps, so
//!   they never wait behind a slow change.
//! * [`lifecycle`]: container add, update and delete, each one
//!   transaction whose steps are undone if a later one fails
//!   ([`transaction::Transaction`], the undo log).
//! * [`cgroups`]: rate limits whose cgroup appears after the container
//!   (runtimes create it after the network), attached when it does.
//! * [`publish`]: publishing and unpublishing ports of running containers.
//! * [`reconcile`]: adopting what a previous agent left, removing orphans,
//!   retrying degraded containers, and `datapath agent --cleanup`.
//! * [`rebuild`]: the state rebuilt from the kernel when its file is lost.
//! * [`pool`]: the pool checked against the node and the recorded state.
//! * [`uplink`]: the uplink and the global configuration, at start.
//! * [`status`]: what the API shows.
//! * [`cluster`]: cluster mode: joining, the overlay device, the peers.

pub mod cgroups;
pub mod cluster;
pub mod handle;
pub mod lifecycle;
pub mod observe;
mod owner;
pub mod pool;
pub mod publish;
pub mod rebuild;
pub mod reconcile;
pub mod reserved;
pub mod status;
pub mod transaction;
pub mod uplink;

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use datapath_common::ct::Timeouts;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::{oneshot, watch};

use self::{
    cgroups::Cgroups, lifecycle::Lifecycle, owner::Command, publish::Ports, status::Snapshot,
    uplink::Uplink,
};
pub use self::{handle::Handle, reconcile::cleanup};
use crate::{
    api::server::Failure,
    datapath::{BpfError, Datapath, Flows, LoadOptions, RateTarget, Reader, UplinkHook},
    model::DualPool,
    net::link::Netlink,
    store::{self, Container, StateError, StateLock, Store, gateway_of},
};

/// How often containers that could not be restored are tried again.
pub const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// The containers' IPv6 pool (`--pool6`): each container's IPv6
    /// address is its IPv4 address's offset in it ([`DualPool`]).
    pub pool6: Option<Ipv6Net>,
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
    /// (100: no limit).
    pub ct_container_share: u8,
    /// Let the uplink reach container addresses directly.
    pub allow_direct_routing: bool,
    /// MTU of the containers' veth pairs (default: the uplink's).
    pub mtu: Option<u32>,
    /// Conntrack idle timeouts.
    pub timeouts: Timeouts,
    /// Where to serve the metrics page over TCP (`--metrics`), if at all.
    pub metrics: Option<std::net::SocketAddr>,
    /// Keep the kernel's program statistics on (`--bpf-stats`), not only
    /// while metrics are scraped.
    pub bpf_stats: bool,
    /// Kernel-side log level (aya-log).
    pub log_level: u8,
    /// Cluster mode, if configured: [`run`] replaces the pool with the
    /// node CIDR it claims.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Destinations container traffic keeps its source address for: it
    /// goes to the node's stack unmasqueraded (a cluster's pod and service
    /// CIDRs).
    pub non_masquerade: Vec<Ipv4Net>,
    /// Where the socket programs are attached.
    pub socket_cgroup: SocketCgroup,
}

/// Where the socket programs (published ports for the node's own
/// processes) are attached: `--socket-cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketCgroup {
    /// The cgroup2 root: every process of the node (the default).
    Root,
    /// This cgroup directory and those below it.
    Dir(PathBuf),
    /// Nowhere: the node's own processes reach published ports only if
    /// the node routes their packets out and back.
    None,
}

impl AgentConfig {
    /// The containers' gateway: the pool's first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        gateway_of(self.pool)
    }

    /// Both pools, when the node is dual-stack (`--pool6`) and they fit
    /// together ([`AgentConfig::validate`] says why not).
    pub fn dual(&self) -> Option<DualPool> {
        DualPool::new(self.pool, self.pool6?).ok()
    }

    /// The IPv6 address of the container with IPv4 address `addr`, on a
    /// dual-stack node.
    pub fn addr6(&self, addr: Ipv4Addr) -> Option<Ipv6Addr> {
        self.dual()?.addr6(addr)
    }

    /// Checks what the flags' parsers cannot: a pool with room for the
    /// gateway and a container, a valid uplink name, absolute directories,
    /// at most [`MAX_NON_MASQUERADE`] CIDRs.
    pub fn validate(&self) -> Result<(), String> {
        if self.pool.prefix_len() > 30 {
            return Err(format!(
                "--pool {}: a pool needs room for the gateway and containers (/30 at most)",
                self.pool
            ));
        }
        if let Some(uplink) = &self.uplink {
            crate::model::names::validate_ifname(uplink)
                .map_err(|e| format!("--uplink {uplink:?}: {e}"))?;
        }
        for (flag, dir) in [
            ("--bpffs-dir", &self.bpffs_dir),
            ("--state-dir", &self.state_dir),
        ] {
            if !dir.is_absolute() {
                return Err(format!("{flag} {}: give an absolute path", dir.display()));
            }
        }
        if let SocketCgroup::Dir(dir) = &self.socket_cgroup
            && !dir.is_absolute()
        {
            return Err(format!(
                "--socket-cgroup {}: give an absolute path (or none)",
                dir.display()
            ));
        }
        if self.non_masquerade.len() > MAX_NON_MASQUERADE {
            return Err(format!(
                "--non-masquerade-cidr: at most {MAX_NON_MASQUERADE} CIDRs, {} given",
                self.non_masquerade.len()
            ));
        }
        if let Some(pool6) = self.pool6 {
            DualPool::new(self.pool, pool6)?;
        }
        Ok(())
    }
}

/// How many `--non-masquerade-cidr` the datapath takes.
pub const MAX_NON_MASQUERADE: usize = datapath_common::capacity::NON_MASQUERADE as usize;

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
    /// The persisted state could not be read or written.
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

    /// No container named `name`.
    pub fn no_container(name: &str) -> Self {
        Self::NotFound(format!("no container named {name:?}"))
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        Failure::new(e.status(), e.to_string())
    }
}

/// An [`AgentError::Internal`] saying what was being done.
fn internal<E: std::fmt::Display>(context: &str) -> impl FnOnce(E) -> AgentError + '_ {
    move |e| AgentError::Internal(format!("{context}: {e}"))
}

/// Where container `c`'s rate limits apply.
pub fn rate_target(c: &Container) -> RateTarget<'_> {
    RateTarget {
        name: &c.name,
        host_ifname: &c.host_ifname,
        cgroup: c.cgroup.as_deref(),
        cgroup_id: c.cgroup_id,
        limits: c.limits,
    }
}

/// What the agent was configured with and found at start; fixed while it
/// runs.
#[derive(Debug)]
pub struct Node {
    /// The configuration.
    pub cfg: AgentConfig,
    /// The uplink, if one is configured.
    pub uplink: Option<Uplink>,
}

impl Node {
    /// The MTU of the containers' veth pairs: `--mtu`, else the uplink's
    /// (less the overlay's overhead in cluster mode), else the kernel's
    /// default.
    pub fn container_mtu(&self) -> Option<u32> {
        self.cfg.mtu.or_else(|| {
            let mtu = self.uplink.as_ref().and_then(|u| u.mtu)?;
            Some(if self.cfg.cluster.is_some() {
                mtu.saturating_sub(datapath_common::overlay::OVERHEAD)
            } else {
                mtu
            })
        })
    }

    /// Whether container ends need GRO: native XDP redirects into a veth
    /// are dropped unless its peer has GRO (or an XDP program).
    pub fn gro(&self) -> bool {
        matches!(
            self.uplink.as_ref().map(|u| u.hook),
            Some(UplinkHook::XdpNative)
        )
    }
}

/// The agent's state, owned by the owner task: a thin owner of the parts
/// each concern borrows ([`Lifecycle`], [`Ports`], [`Snapshot`]).
struct Agent {
    node: Node,
    dp: Datapath,
    net: Netlink,
    store: Store,
    reader: Arc<Reader>,
    /// Containers kept though they could not be restored, with why.
    degraded: BTreeMap<String, String>,
}

impl Agent {
    /// Loads the datapath, configures the uplink and adopts what a previous
    /// agent left.
    async fn start(cfg: AgentConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        crate::datapath::ensure_bpffs()?;
        let mut dp = Datapath::load(&LoadOptions {
            bpffs_dir: cfg.bpffs_dir.clone(),
            ct_max: cfg.ct_max,
            log_level: cfg.log_level,
        })
        .context("load the datapath")?;
        let net = Netlink::new().context("open a netlink connection")?;
        let mut store = open_store(&cfg, &dp, &net).await?;
        let mut known: HashSet<String> = store
            .containers()
            .values()
            .map(|c| c.host_ifname.clone())
            .collect();
        // The agent's overlay device carries the pool's gateway address and
        // the cluster's route by design in cluster mode; outside it, one
        // left by a cluster-mode run is removed below.
        known.insert(cluster::OVERLAY_IF.to_owned());
        let view = pool::NodeView::read(&net, &known).await?;
        pool::check(&cfg, store.state(), &view)?;
        store.set_ranges(cfg.pool, cfg.snat_ports)?;
        let uplink = uplink::setup(&cfg, &mut dp, &net).await?;
        uplink::attach_sockets(&cfg, &mut dp)?;
        let reader = Arc::new(dp.reader()?);
        let mut agent = Agent {
            node: Node { cfg, uplink },
            dp,
            net,
            store,
            reader,
            degraded: BTreeMap::new(),
        };
        reconcile::reconcile(&mut agent.lifecycle()).await?;
        agent.reserve_ports();
        // From now on each change carries the reservation it leads to.
        let snat = reserved::snat_range(&agent.node);
        agent.store.set_reserver(reserved::reserver(snat));
        Ok(agent)
    }

    fn lifecycle(&mut self) -> Lifecycle<'_> {
        Lifecycle {
            node: &self.node,
            dp: &mut self.dp,
            net: &self.net,
            store: &mut self.store,
            reader: &self.reader,
            degraded: &mut self.degraded,
        }
    }

    /// Tries the degraded containers again.
    async fn retry(&mut self) {
        let left = reconcile::retry_degraded(&mut self.lifecycle()).await;
        if left > 0 {
            tracing::debug!(degraded = left, "containers still degraded");
        }
    }

    fn cgroups(&mut self) -> Cgroups<'_> {
        Cgroups {
            dp: &mut self.dp,
            store: &mut self.store,
        }
    }

    fn ports(&mut self) -> Ports<'_> {
        Ports {
            node: &self.node,
            dp: &mut self.dp,
            net: &self.net,
            store: &mut self.store,
            reader: &self.reader,
        }
    }

    /// What the API's reads see until the next change.
    fn snapshot(&self) -> Snapshot {
        Snapshot::capture(&self.node, &self.dp, &self.store, &self.degraded)
    }

    /// Carries out one command. A change is answered once `publish` has
    /// the snapshot that shows it: a client that reads after its change
    /// was acknowledged sees it.
    async fn execute(&mut self, command: Command, publish: impl Fn(Snapshot)) {
        match command {
            Command::Add(req, reply) => {
                let result = self.lifecycle().add(req).await;
                self.answer(&publish, reply, result);
            }
            Command::Update(name, req, reply) => {
                let result = self.lifecycle().update(&name, &req).await;
                self.answer(&publish, reply, result);
            }
            Command::Delete(name, reply) => {
                let result = self.lifecycle().delete(&name).await;
                self.answer(&publish, reply, result);
            }
            Command::Publish(name, specs, force, reply) => {
                let result = self.ports().publish(&name, &specs, force).await;
                self.answer(&publish, reply, result);
            }
            Command::Unpublish(name, specs, reply) => {
                let result = self.ports().unpublish(&name, &specs).await;
                self.answer(&publish, reply, result);
            }
            Command::SyncCgroups(reply) => {
                let result = self.cgroups().sync();
                self.answer(&publish, reply, result);
            }
            // Flows are read live, not from the snapshot.
            Command::Flush(container, reply) => {
                let _ = reply.send(self.flush(container.as_deref()));
            }
            Command::Monitor(flags, reply) => {
                let _ = reply.send(
                    self.dp
                        .set_monitor(flags)
                        .map_err(internal("turn the monitor on or off")),
                );
            }
        }
    }

    /// Brings the node's reserved ports in line with what is published and
    /// masqueraded ([`reserved`]), at start (every change after that does
    /// it in its own record). A failure is logged: the datapath works
    /// without it.
    fn reserve_ports(&mut self) {
        let wanted = reserved::wanted(reserved::snat_range(&self.node), self.store.state());
        if let Err(e) = reserved::apply(&wanted, &mut self.store) {
            tracing::warn!("reserve the published ports: {e:#}");
        }
    }

    /// Follows an address change on link `ifindex` if it is the uplink's.
    async fn addresses_changed(&mut self, ifindex: u32, publish: impl Fn(Snapshot)) {
        let Some(up) = self.node.uplink.as_mut() else {
            return;
        };
        if up.ifindex != ifindex {
            return;
        }
        match uplink::follow_addresses(&self.node.cfg, up, &mut self.dp, &self.net).await {
            Ok(true) => publish(self.snapshot()),
            Ok(false) => {}
            Err(e) => tracing::warn!("follow the uplink's addresses: {e:#}"),
        }
    }

    /// Makes the datapath's peers the ones the cluster published.
    fn peers_changed(&mut self, peers: &[crate::cluster::PeerRoute]) {
        if let Err(e) = cluster::apply_peers(&mut self.dp, peers) {
            tracing::error!("apply the cluster's peers: {e}");
        }
    }

    /// Publishes the snapshot, then answers. A client that went away
    /// meanwhile misses the answer; the change stands.
    fn answer<T>(
        &self,
        publish: &impl Fn(Snapshot),
        reply: owner::Reply<T>,
        result: Result<T, AgentError>,
    ) {
        publish(self.snapshot());
        let _ = reply.send(result);
    }

    /// Removes the tracked flows of one container, or all; returns the
    /// number of entries removed.
    fn flush(&mut self, container: Option<&str>) -> Result<usize, AgentError> {
        let id = match container {
            Some(name) => Some(
                self.store
                    .get(name)
                    .map(|c| c.id)
                    .ok_or_else(|| AgentError::no_container(name))?,
            ),
            None => None,
        };
        self.dp
            .flush_flows(id.map_or(Flows::All, Flows::Container))
            .map_err(internal("flush conntrack"))
    }
}

/// The state kept in the state directory; if its snapshot is missing, the
/// state rebuilt from what the kernel holds ([`rebuild`]), so that a lost
/// snapshot never removes the node's containers. A corrupt
/// snapshot or journal is refused (and left alone): moving it away lets
/// the agent rebuild.
async fn open_store(cfg: &AgentConfig, dp: &Datapath, net: &Netlink) -> anyhow::Result<Store> {
    // Checked before opening: opening writes an empty snapshot.
    if store::exists(&cfg.state_dir) {
        return Ok(Store::open(&cfg.state_dir)?);
    }
    match rebuild::rebuild(
        cfg.pool,
        cfg.snat_ports,
        cfg.mtu,
        cfg.uplink.as_deref(),
        dp,
        net,
    )
    .await?
    {
        None => Ok(Store::open(&cfg.state_dir)?),
        Some(state) => {
            tracing::warn!(
                dir = %cfg.state_dir.display(),
                containers = state.containers().len(),
                "no state snapshot, but the kernel holds an agent's containers: state rebuilt from them"
            );
            Ok(Store::create(&cfg.state_dir, &state)?)
        }
    }
}

/// Runs the agent until `shutdown` completes: takes its state directory
/// (refusing if another agent has it, or answers on `socket`), loads and
/// adopts, then serves the API on `socket` (telling a service manager it is
/// ready once it listens), follows the cgroups of pending limits and
/// forwards kernel logs (flows expire in the kernel) and keeps the cluster in
/// sync (joined first, in cluster mode). The programs stay attached and the
/// maps pinned when it returns.
pub async fn run(
    mut cfg: AgentConfig,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Before anything in the state directory is read; held until exit.
    let _lock = StateLock::acquire(&cfg.state_dir)?;
    crate::api::server::refuse_if_answered(socket).await?;
    use anyhow::Context as _;
    let metrics_addr = cfg.metrics;
    let program_stats = Arc::new(observe::ProgramStats::new(cfg.bpf_stats));
    let mut joined = None;
    if let Some(cl) = cfg.cluster.clone() {
        let (client, cidr) = cluster::join(&cl, cfg.uplink.as_deref(), cfg.node_ip).await?;
        tracing::info!(node = %cl.node_name, %cidr, "joined the cluster; the node CIDR is the pool");
        cfg.pool = cidr;
        joined = Some((cl, client));
    }
    let (peers_tx, peers_rx) = watch::channel(None);
    let started = owner::spawn(cfg, peers_rx).await?;
    if let Some(logger) = started.logger {
        tokio::spawn(forward_kernel_logs(logger));
    }
    let monitor = observe::Monitor::new(started.commands.clone());
    if let Some(ring) = started.events {
        tokio::spawn(Arc::clone(&monitor).read(ring));
    }
    {
        let stats = Arc::clone(&program_stats);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
            loop {
                tick.tick().await;
                stats.expire();
            }
        });
    }
    let mut nodes = None;
    let mut sync = None;
    if let Some((cl, client)) = joined {
        let snapshot = started.snapshot.borrow().clone();
        let Some(node_ip) = snapshot.node_ip() else {
            anyhow::bail!("cluster mode needs an uplink (--uplink) to reach the other nodes");
        };
        let me = crate::cluster::NodeRecord::new(&cl.node_name, node_ip, snapshot.pool());
        let (underlay_tx, underlay_rx) = watch::channel(node_ip);
        let mut snapshots = started.snapshot.clone();
        tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                let ip = snapshots.borrow_and_update().node_ip();
                if let Some(ip) = ip {
                    underlay_tx.send_if_modified(|cur| std::mem::replace(cur, ip) != ip);
                }
            }
        });
        let (view_tx, view_rx) = watch::channel(Arc::new(crate::cluster::View::default()));
        let outputs = crate::cluster::sync::Outputs {
            peers: peers_tx,
            view: view_tx,
        };
        sync = Some(tokio::spawn(crate::cluster::sync::run(
            cl,
            client,
            me,
            underlay_rx,
            outputs,
        )));
        nodes = Some(view_rx);
    }
    let handle = Handle::new(
        started.commands,
        started.snapshot,
        started.reader,
        program_stats,
        monitor,
        nodes,
    );
    let (metrics_stop, metrics_stopped) = oneshot::channel::<()>();
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for metrics on {addr}"))?;
        tracing::info!(%addr, "metrics listening");
        let backend = handle.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = metrics_stopped.await;
            };
            if let Err(e) = crate::api::server::serve_metrics(backend, listener, stop).await {
                tracing::error!("metrics server: {e:#}");
            }
        });
    }
    tokio::spawn(cgroups::watch(handle.clone()));
    // An owner that died (a bug) takes the API down with it: a restarted
    // agent adopts what is there, where this one could only refuse changes.
    let mut gone = started.gone;
    let (owner_died_tx, owner_died) = oneshot::channel();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            _ = &mut gone => {
                tracing::error!("the owner task stopped; shutting down");
                let _ = owner_died_tx.send(());
            }
        }
    };
    let served =
        crate::api::server::serve(handle.clone(), socket, || notify_ready(socket), stop).await;
    let _ = metrics_stop.send(());
    notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(sync) = sync {
        sync.abort();
    }
    // Every request has been answered; the owner finishes and stops.
    handle.stop().await;
    let owner = started.owner;
    let _ = tokio::task::spawn_blocking(move || owner.join()).await;
    if owner_died.await.is_ok() {
        anyhow::bail!("the agent's owner task stopped unexpectedly");
    }
    served
}

/// Tells the service manager (systemd with `Type=notify`, through
/// `NOTIFY_SOCKET`) that the agent is ready: the maps are loaded and
/// pinned, what a previous agent left is adopted, and the API accepts
/// connections. Without `NOTIFY_SOCKET` nothing is sent.
fn notify_ready(socket: &Path) {
    let status = format!("serving the API on {}", socket.display());
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
}

/// Sends `states` to the service manager, if there is one.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("notify the service manager (NOTIFY_SOCKET): {e}");
    }
}

async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd, which stays open for
    // as long as the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        tracing::warn!("cannot poll the kernel log ring buffer");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
