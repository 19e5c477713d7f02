//! The `datapath` command line: the agent daemon and the client verbs, in
//! the style of `ip` and `docker`; the agent's flags can also come from its
//! configuration file ([`config`]).

pub mod config;

use std::{io::Write as _, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use datapath_common::ct::Timeouts;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    agent::{self, AgentConfig, SocketCgroup, XdpMode},
    api::{
        AddContainer, Client, ContainerInfo, DEFAULT_SOCKET, FlowEndpoint, FlowQuery, MonitorQuery,
        UpdateContainer,
    },
    cluster::ClusterConfig,
    model::{Figures, Limit, names::validate_cli_container_name},
};

/// Container networking with eBPF: published ports, masquerade and
/// bandwidth limits without iptables.
#[derive(Debug, Parser)]
#[command(name = "datapath", version)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "DATAPATH_API_SOCKET", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
    /// How long to wait for the agent's answer (e.g. 30s, 2m).
    #[arg(long, global = true, default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent in the foreground (until SIGINT/SIGTERM).
    Agent(AgentArgs),
    /// Show what the agent has loaded and attached.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage containers.
    #[command(subcommand)]
    Container(ContainerCmd),
    /// Inspect or flush tracked connections.
    #[command(subcommand)]
    Conntrack(ConntrackCmd),
    /// Stream what the datapath does, live: dropped packets (reason,
    /// addresses, ports, hook) and new, closed and expired flows. Both
    /// unless --drops or --flows. The kernel sends events only while a
    /// monitor runs, at most 64 per CPU per millisecond (the rest are
    /// counted: monitor_sampled_out, monitor_lost).
    Monitor {
        /// Only this container's events.
        #[arg(long)]
        container: Option<String>,
        /// Dropped packets.
        #[arg(long)]
        drops: bool,
        /// New, closed and expired flows.
        #[arg(long)]
        flows: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The nodes of the cluster (cluster mode).
    #[command(subcommand)]
    Node(NodeCmd),
}

/// `datapath node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the nodes: name, node CIDR, underlay address, lease age, state.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `datapath agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The uplink interface (where clients and the outside are).
    #[arg(long)]
    pub uplink: Option<String>,
    /// The node address (default: the uplink's first IPv4 address).
    #[arg(long)]
    pub node_ip: Option<Ipv4Addr>,
    /// The containers' address pool [default: 10.88.0.0/16]. Not in
    /// cluster mode: there the pool is the node CIDR claimed from
    /// --cluster-cidr.
    #[arg(long)]
    pub pool: Option<Ipv4Net>,
    /// The containers' IPv6 pool (dual stack): each container also gets
    /// the address at its IPv4 address's offset in this prefix, and a
    /// default route via the link-local fe80::1 of its veth's host end.
    /// Needs at least as many host bits as --pool (a /64 for any IPv4
    /// pool). Without it the node is IPv4-only.
    #[arg(long)]
    pub pool6: Option<Ipv6Net>,
    /// Cluster mode: the etcd (v3) store the nodes share, e.g.
    /// http://198.18.0.1:2379 (several: comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub cluster_store: Vec<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long)]
    pub node_name: Option<String>,
    /// The cluster's container network, from which each node claims its
    /// node CIDR.
    #[arg(long, default_value = "10.88.0.0/14")]
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of each node's CIDR.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(1..=30))]
    pub node_cidr_size: u8,
    /// Wait for the cluster store at start instead of failing.
    #[arg(long)]
    pub cluster_wait: bool,
    /// TTL of the node's registration: a node whose agent stops renewing
    /// it leaves every peer this long after.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub cluster_lease_ttl: Duration,
    /// Uplink hook: auto = TC on veth uplinks, native XDP elsewhere.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpMode,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/datapath")]
    pub bpffs_dir: PathBuf,
    /// Directory of the persisted state.
    #[arg(long, default_value = "/var/lib/datapath")]
    pub state_dir: PathBuf,
    /// Masquerade source port range (never published).
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    pub snat_ports: (u16, u16),
    /// Do not masquerade container egress.
    #[arg(long)]
    pub no_masquerade: bool,
    /// Capacity of the main conntrack table in entries (two per flow);
    /// the table of unconfirmed flows gets a quarter of it.
    #[arg(long)]
    pub ct_max: Option<u32>,
    /// Percentage of the main conntrack table one container's flows may
    /// hold (100: no limit); beyond it they are tracked, but evictable.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub ct_container_share: u8,
    /// Let uplink traffic reach container addresses directly.
    #[arg(long)]
    pub allow_direct_routing: bool,
    /// MTU of the containers' veth pairs (default: the uplink's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(68..=65535))]
    pub mtu: Option<u32>,
    /// Idle timeout of established TCP flows.
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    pub ct_timeout_tcp: Duration,
    /// Idle timeout of TCP flows after FIN both ways or RST.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ct_timeout_tcp_close: Duration,
    /// Idle timeout of TCP flows before the reply.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ct_timeout_tcp_syn: Duration,
    /// Idle timeout of UDP flows seen one way, or answered once.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ct_timeout_udp: Duration,
    /// Idle timeout of UDP flows with traffic both ways more than once.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ct_timeout_udp_stream: Duration,
    /// Idle timeout of ICMP echo flows.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ct_timeout_icmp: Duration,
    /// Forward kernel-side debug logs (costly under floods).
    #[arg(long)]
    pub kernel_debug_logs: bool,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by
    /// default; the API socket serves them at /metrics either way).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Keep the kernel's BPF program statistics (run time and count) on;
    /// without it they are on only while metrics are scraped (they cost a
    /// clock read per program run).
    #[arg(long)]
    pub bpf_stats: bool,
    /// Traffic from containers to this CIDR keeps its source address and
    /// goes to the node's stack (repeatable): a Kubernetes cluster's pod and
    /// service CIDRs, for kube-proxy or the node's routes to handle.
    #[arg(long = "non-masquerade-cidr", value_name = "CIDR")]
    pub non_masquerade_cidr: Vec<Ipv4Net>,
    /// The cgroup (v2 directory) whose processes reach published ports at
    /// the socket layer: their connections and UDP datagrams to a node
    /// address or 127.0.0.1 at a published port go straight to the
    /// container, and still show the address they dialed. `none` attaches
    /// nothing [default: the cgroup2 root, i.e. every process of the node].
    #[arg(long, value_name = "PATH")]
    pub socket_cgroup: Option<PathBuf>,
    /// The configuration file (every flag is a key; flags win)
    /// [default: /etc/datapath/agent.toml, if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Check the configuration (file and flags), print the one that results,
    /// and exit without starting.
    #[arg(long)]
    pub check_config: bool,
    /// Instead of running: remove every program, link, pin, veth and state
    /// file an agent with these paths made, and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// What `--check-config` prints (set by [`parse`]).
    #[arg(skip)]
    pub effective: Option<String>,
}

/// `datapath container …`.
#[derive(Debug, Subcommand)]
pub enum ContainerCmd {
    /// Give a container its network: veth, address, routes, published ports.
    Add {
        /// Container name.
        name: String,
        /// Its network namespace: a path or a name under /var/run/netns.
        #[arg(long)]
        netns: String,
        /// Interface name inside the container.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Publish a port like docker -p: [IP:]HOST[-END]:CONTAINER[-END][/tcp|/udp]
        /// (repeatable).
        #[arg(long = "publish", short = 'p')]
        publish: Vec<String>,
        /// Also publish the ports of a JSON list of specs in FILE (`-`:
        /// standard input), e.g. `["8080:80", "8443:443"]`.
        #[arg(long, value_name = "FILE")]
        publish_file: Option<PathBuf>,
        /// Publish even ports a process of the node listens on.
        #[arg(long)]
        force: bool,
        /// The container's cgroup v2 directory, which rate limits apply to
        /// (its processes and every cgroup below): a path in the cgroup2
        /// mount, or a name under it.
        #[arg(long)]
        cgroup: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        /// MTU of both ends of the veth pair (default: the agent's `--mtu`,
        /// or the uplink's).
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// Change a container's rate limits at once, without losing a flow.
    Update {
        /// Container name.
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Publish more ports of a running container, all in one request:
    /// every port is published, or none is.
    Publish {
        /// Container name.
        name: String,
        /// Ports like docker -p: [IP:]HOST[-END]:CONTAINER[-END][/tcp|/udp].
        specs: Vec<String>,
        #[command(flatten)]
        more: MorePorts,
        /// Publish even ports a process of the node listens on.
        #[arg(long)]
        force: bool,
    },
    /// Stop publishing ports of a container, all in one request (its
    /// established TCP connections go on; its UDP flows through them are
    /// removed).
    Unpublish {
        /// Container name.
        name: String,
        /// Ports as they were published.
        specs: Vec<String>,
        #[command(flatten)]
        more: MorePorts,
    },
    /// Remove a container's network (succeeds if it is already gone).
    Del {
        /// Container name.
        name: String,
    },
    /// List containers.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Ports given by flag or file besides the positional ones.
#[derive(Debug, Args)]
pub struct MorePorts {
    /// A port, as with `container add` (repeatable).
    #[arg(long = "publish", short = 'p', value_name = "SPEC")]
    publish: Vec<String>,
    /// The ports of a JSON list of specs in FILE (`-`: standard input),
    /// e.g. `["8080:80", "8443:443"]`.
    #[arg(long, value_name = "FILE")]
    publish_file: Option<PathBuf>,
}

impl MorePorts {
    /// Every port: `specs`, then the flags', then the file's; at least one.
    fn all(self, mut specs: Vec<String>) -> anyhow::Result<Vec<String>> {
        specs.extend(self.publish);
        if let Some(file) = &self.publish_file {
            specs.extend(read_specs(file)?);
        }
        anyhow::ensure!(
            !specs.is_empty(),
            "give at least one port (SPEC, --publish SPEC or --publish-file FILE)"
        );
        Ok(specs)
    }
}

/// Reads a JSON list of port specs from `path` (`-`: standard input).
fn read_specs(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("read standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of port specs, e.g. [\"8080:80\", \"53:53/udp\"]",
            path.display()
        )
    })
}

/// What `container publish|unpublish` prints: the ports now published
/// (their number, beyond a screenful).
fn print_ports(c: &ContainerInfo) {
    if c.publish.len() <= 32 {
        println!("{} publishes {}", c.name, c.publish.join(","));
    } else {
        println!(
            "{} publishes {} ports (`datapath container list` shows them)",
            c.name,
            c.publish.len()
        );
    }
}

/// Rate limits in tc's units (rates: bit, kbit, mbit, gbit, tbit, bps,
/// kbps, mbps, gbps; sizes: b, kb/k, mb/m, gb/g with kb = 1024 bytes).
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Limit what the container sends, e.g. 10mbit (`none` removes it).
    #[arg(long)]
    pub egress_rate: Option<String>,
    /// Limit what the container receives, e.g. 50mbit (`none` removes it).
    #[arg(long)]
    pub ingress_rate: Option<String>,
    /// Egress bucket size, e.g. 64kb (default: 4 ms of the rate, at least 1mb).
    #[arg(long)]
    pub egress_burst: Option<String>,
    /// Ingress bucket size, e.g. 256kb (default: 500 ms of the rate, at least 1mb).
    #[arg(long)]
    pub ingress_burst: Option<String>,
}

/// `datapath conntrack …`.
#[derive(Debug, Subcommand)]
pub enum ConntrackCmd {
    /// List tracked flows (the agent streams them as it reads the table).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only this container's flows.
        #[arg(long)]
        container: Option<String>,
        /// At most this many flows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Remove tracked flows (all, or one container's).
    Flush {
        /// Only this container's flows.
        #[arg(long)]
        container: Option<String>,
    },
}

/// Parses the command line of this process, the agent's configuration file
/// included (see [`config`]). A command line clap refuses (or `--help`)
/// exits the process with clap's message, as [`Parser::parse`] does.
pub fn parse() -> Result<Cli, config::ConfigError> {
    parse_from(std::env::args_os().collect())
}

/// [`parse`] of `args` (the program name first).
pub fn parse_from(args: Vec<std::ffi::OsString>) -> Result<Cli, config::ConfigError> {
    let cmd = Cli::command();
    let loaded = config::load(&cmd, args)?;
    let mut cli = Cli::parse_from(&loaded.args);
    if let Command::Agent(agent) = &mut cli.command
        && agent.check_config
    {
        let table = config::effective(&cmd, &loaded.args).unwrap_or_else(|e| e.exit());
        let source = loaded.path.as_deref().map_or_else(
            || "no configuration file".to_owned(),
            |p| format!("{} and the command line", p.display()),
        );
        agent.effective = Some(format!(
            "# datapath agent: the configuration from {source} (flags win)\n{}",
            toml::to_string(&table).unwrap_or_default()
        ));
    }
    Ok(cli)
}

impl AgentArgs {
    fn config(&self) -> AgentConfig {
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        AgentConfig {
            uplink: self.uplink.clone(),
            node_ip: self.node_ip,
            pool: self
                .pool
                .unwrap_or_else(|| {
                    Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap_or_default()
                })
                .trunc(),
            pool6: self.pool6.map(|p| p.trunc()),
            xdp_mode: self.xdp_mode,
            bpffs_dir: self.bpffs_dir.clone(),
            state_dir: self.state_dir.clone(),
            snat_ports: self.snat_ports,
            masquerade: !self.no_masquerade,
            ct_max: self.ct_max,
            ct_container_share: self.ct_container_share,
            allow_direct_routing: self.allow_direct_routing,
            mtu: self.mtu,
            timeouts: Timeouts {
                tcp_syn: secs(self.ct_timeout_tcp_syn),
                tcp_established: secs(self.ct_timeout_tcp),
                tcp_closing: secs(self.ct_timeout_tcp_close),
                udp: secs(self.ct_timeout_udp),
                udp_stream: secs(self.ct_timeout_udp_stream),
                icmp: secs(self.ct_timeout_icmp),
            },
            non_masquerade: self.non_masquerade_cidr.iter().map(|n| n.trunc()).collect(),
            socket_cgroup: match &self.socket_cgroup {
                None => SocketCgroup::Root,
                Some(p) if p.as_os_str() == "none" => SocketCgroup::None,
                Some(p) => SocketCgroup::Dir(p.clone()),
            },
            // aya-log levels: 3 info, 4 debug.
            log_level: if self.kernel_debug_logs { 4 } else { 3 },
            metrics: self.metrics,
            bpf_stats: self.bpf_stats,
            cluster: (!self.cluster_store.is_empty()).then(|| ClusterConfig {
                endpoints: self.cluster_store.clone(),
                node_name: self.node_name.clone().unwrap_or_else(host_name),
                cluster_cidr: self.cluster_cidr.trunc(),
                node_cidr_size: self.node_cidr_size,
                wait: self.cluster_wait,
                lease_ttl: self.cluster_lease_ttl,
            }),
        }
    }
}

/// The host's name (the default node name).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Runs the agent until SIGINT or SIGTERM (or, with `--cleanup`, removes
/// what one made).
pub async fn run_agent(args: &AgentArgs, socket: PathBuf) -> anyhow::Result<()> {
    let cfg = args.config();
    if args.cleanup {
        return agent::cleanup(&cfg).await;
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    if args.check_config {
        print!("{}", args.effective.as_deref().unwrap_or_default());
        return Ok(());
    }
    // Every key may stand in one configuration file (`--check-config`
    // shows them all), but an agent starts in one mode.
    if let Some(pool6) = args.pool6
        && !args.cluster_store.is_empty()
    {
        anyhow::bail!(
            "--pool6 {pool6} is not for cluster mode (--cluster-store) yet: every node would \
             derive the same IPv6 addresses"
        );
    }
    if args.pool.is_some() && !args.cluster_store.is_empty() {
        anyhow::bail!(
            "--pool is not for cluster mode (--cluster-store): the pool is the node CIDR \
             claimed from --cluster-cidr"
        );
    }
    agent::run(cfg, &socket, shutdown_signal()).await
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down; programs stay attached and maps pinned");
}

/// What `container add` says of limits whose cgroup does not exist yet.
fn pending_note(c: &ContainerInfo) -> String {
    format!(
        "rate limits pending: {} does not exist yet; they apply as soon as it appears",
        c.cgroup
            .as_deref()
            .map_or_else(String::new, |p| p.display().to_string())
    )
}

/// The rate limit lines of `datapath container list` for one container.
fn print_limits(c: &ContainerInfo) {
    if let Some(cg) = &c.cgroup {
        if c.pending {
            println!("  cgroup {} (pending)", cg.display());
        } else {
            println!("  cgroup {}", cg.display());
        }
    }
    for (dir, limit, n) in [
        ("egress", c.limits.egress, c.counters.egress),
        ("ingress", c.limits.ingress, c.counters.ingress),
    ] {
        if let Some(limit) = limit {
            println!(
                "  {dir:<7} {limit}: passed {} B {} pkts, marked {} B {} pkts, dropped {} B {} pkts",
                n.passed_bytes,
                n.passed_packets,
                n.marked_bytes,
                n.marked_packets,
                n.dropped_bytes,
                n.dropped_packets
            );
        }
    }
}

/// The figures of the metrics page, in words (`datapath status`).
fn print_figures(f: &Figures) {
    let main: u64 = f
        .conntrack
        .iter()
        .filter(|c| c.table == "main")
        .map(|c| c.entries)
        .sum();
    let new: u64 = f
        .conntrack
        .iter()
        .filter(|c| c.table == "new")
        .map(|c| c.entries)
        .sum();
    let pct = |used: u64, max: u64| {
        if max == 0 {
            0.0
        } else {
            used as f64 * 100.0 / max as f64
        }
    };
    println!(
        "conntrack tables: main {main} of {} entries ({:.1}% full), unconfirmed {new} of {} ({:.1}%)",
        f.conntrack_max,
        pct(main, f.conntrack_max),
        f.conntrack_new_max,
        pct(new, f.conntrack_new_max)
    );
    for c in &f.conntrack {
        println!(
            "  {:<4} {:<5} {:<12} {} entries",
            c.table, c.protocol, c.state, c.entries
        );
    }
    if !f.masquerade.is_empty() {
        println!(
            "masquerade ports in use (of {} per destination):",
            f.masquerade_range
        );
        for m in &f.masquerade {
            println!("  {:<28} {} ports", m.destination, m.ports);
        }
    }
    let drops: Vec<_> = f
        .counters
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("drop_")?, *v)))
        .filter(|(_, v)| *v > 0)
        .collect();
    if drops.is_empty() {
        println!("drops: none");
    } else {
        println!("drops by reason:");
        for (k, v) in drops {
            println!("  {k:<28} {v} packets");
        }
    }
    for c in &f.containers {
        println!(
            "container {}: received {} packets ({} bytes), sent {} packets ({} bytes), {} conntrack entries",
            c.name, c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes, c.conntrack_entries
        );
        for (k, v) in &c.drops {
            println!(
                "  dropped {v} packets: {}",
                k.strip_prefix("drop_").unwrap_or(k)
            );
        }
        if c.conntrack_over_share > 0 {
            println!(
                "  {} flows kept out of the main conntrack table (share used up)",
                c.conntrack_over_share
            );
        }
        if c.masquerade_exhausted > 0 {
            println!(
                "  {} new flows dropped: no free masquerade port",
                c.masquerade_exhausted
            );
        }
        for (dir, d) in [("egress", &c.rate.egress), ("ingress", &c.rate.ingress)] {
            if d.passed_packets + d.dropped_packets > 0 {
                println!(
                    "  rate limiter {dir}: passed {} packets ({} marked), dropped {}",
                    d.passed_packets, d.marked_packets, d.dropped_packets
                );
            }
        }
    }
    if f.program_stats {
        println!("programs (kernel statistics):");
        for p in &f.programs {
            let avg = p.run_time_ns.checked_div(p.run_count).unwrap_or(0);
            println!(
                "  {:<14} {:<12} {} runs, {:.3} s total, {avg} ns each",
                p.program,
                p.attachment,
                p.run_count,
                p.run_time_ns as f64 / 1e9
            );
        }
    } else {
        println!(
            "programs: kernel statistics off (on while metrics are scraped, or with --bpf-stats)"
        );
    }
}

/// Runs one CLI invocation.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.api_socket).with_timeout(cli.timeout);
    // The CNI plugin's containers are changed by the runtimes through it,
    // never by hand (they can be listed and deleted).
    let named = match &cli.command {
        Command::Container(
            ContainerCmd::Add { name, .. }
            | ContainerCmd::Update { name, .. }
            | ContainerCmd::Publish { name, .. }
            | ContainerCmd::Unpublish { name, .. },
        ) => Some(name),
        _ => None,
    };
    if let Some(name) = named {
        validate_cli_container_name(name)?;
    }
    match cli.command {
        Command::Agent(args) => run_agent(&args, cli.api_socket.clone()).await,
        Command::Status { json } => {
            let st = client.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            println!("agent {}  state {}", st.version, st.state_dir.display());
            match &st.uplink {
                Some(u) => println!(
                    "uplink {} (ifindex {}) hook {}  node {}  addresses {}",
                    u.ifname,
                    u.ifindex,
                    u.hook,
                    u.node_ip,
                    u.node_addrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                None => println!("uplink none"),
            }
            println!(
                "pool {}  gateway {}  containers {}",
                st.pool, st.gateway, st.containers
            );
            println!(
                "conntrack {} / {} entries",
                st.conntrack_entries, st.conntrack_max
            );
            let count = &st.agent.conntrack_count;
            println!(
                "agent cpu {:.2} s user, {:.2} s system  conntrack count: {} passes, \
                 at most {} entries and {} syscalls per pass (budget {})",
                st.agent.cpu_user_s,
                st.agent.cpu_system_s,
                count.passes,
                count.max_pass_entries,
                count.max_pass_syscalls,
                count.pass_budget
            );
            println!("attached:");
            for a in &st.attachments {
                println!(
                    "  {:<14} id {:<6} {:<12} {:<10} {}",
                    a.program,
                    a.program_id,
                    a.hook,
                    a.ifname,
                    a.pin.display()
                );
            }
            println!("maps:");
            for m in &st.maps {
                println!(
                    "  {:<12} type {:<2} key {:<3} value {:<4} max {:<8} flags {:#x}  {}",
                    m.name,
                    m.map_type,
                    m.key_size,
                    m.value_size,
                    m.max_entries,
                    m.flags,
                    m.pin.display()
                );
            }
            println!("counters:");
            for (k, v) in st.counters.iter().filter(|(_, v)| **v > 0) {
                println!("  {k:<28} {v}");
            }
            print_figures(&st.figures);
            Ok(())
        }
        Command::Monitor {
            container,
            drops,
            flows,
            json,
        } => {
            let mut events = client
                .monitor(&MonitorQuery {
                    drops,
                    flows,
                    container,
                })
                .await?;
            use futures::StreamExt as _;
            let mut out = std::io::stdout();
            while let Some(ev) = events.next().await {
                let ev = ev?;
                let line = if json {
                    serde_json::to_string(&ev)?
                } else {
                    ev.to_string()
                };
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // The reader went away (a closed pipe): done.
                    return Ok(());
                }
            }
            Ok(())
        }
        Command::Container(ContainerCmd::Add {
            name,
            netns,
            ifname,
            mut publish,
            publish_file,
            force,
            cgroup,
            limits,
            mtu,
        }) => {
            if let Some(file) = &publish_file {
                publish.extend(read_specs(file)?);
            }
            let info = client
                .add_container(&AddContainer {
                    name,
                    netns,
                    ifname: Some(ifname),
                    publish,
                    cgroup,
                    egress_rate: limits.egress_rate,
                    ingress_rate: limits.ingress_rate,
                    egress_burst: limits.egress_burst,
                    ingress_burst: limits.ingress_burst,
                    mtu,
                    force,
                })
                .await?;
            println!(
                "{} {} via {} ({})",
                info.name, info.addr, info.gateway, info.host_ifname
            );
            if info.pending {
                println!("{}", pending_note(&info));
            }
            Ok(())
        }
        Command::Container(ContainerCmd::Update { name, limits }) => {
            let info = client
                .update_container(
                    &name,
                    &UpdateContainer {
                        egress_rate: limits.egress_rate,
                        ingress_rate: limits.ingress_rate,
                        egress_burst: limits.egress_burst,
                        ingress_burst: limits.ingress_burst,
                    },
                )
                .await?;
            let show =
                |l: Option<Limit>| l.map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
            println!(
                "{} egress {} ingress {}",
                info.name,
                show(info.limits.egress),
                show(info.limits.ingress)
            );
            Ok(())
        }
        Command::Container(ContainerCmd::Publish {
            name,
            specs,
            more,
            force,
        }) => {
            let info = client.publish(&name, &more.all(specs)?, force).await?;
            print_ports(&info);
            Ok(())
        }
        Command::Container(ContainerCmd::Unpublish { name, specs, more }) => {
            let info = client.unpublish(&name, &more.all(specs)?).await?;
            print_ports(&info);
            Ok(())
        }
        Command::Container(ContainerCmd::Del { name }) => {
            client.del_container(&name).await.context("delete")?;
            Ok(())
        }
        Command::Container(ContainerCmd::List { json }) => {
            let list = client.containers().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!("{:<20} {:<16} {:<12} PUBLISH", "NAME", "ADDRESS", "VETH");
            for c in list {
                println!(
                    "{:<20} {:<16} {:<12} {}",
                    c.name,
                    c.addr,
                    c.host_ifname,
                    c.publish.join(",")
                );
                if let Some(why) = &c.degraded {
                    println!("  degraded: {why}");
                }
                print_limits(&c);
            }
            Ok(())
        }
        Command::Conntrack(ConntrackCmd::List {
            json,
            container,
            limit,
        }) => {
            let flows = client.conntrack(&FlowQuery { container, limit }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
                return Ok(());
            }
            println!(
                "{:<5} {:<5} {:<44} {:<44} {:<12} {:>6} {:>6} {:>9} {:>9} CONTAINER",
                "PROTO", "KIND", "ORIGINAL", "TRANSLATED", "STATE", "AGE", "IDLE", "PKTS", "BYTES"
            );
            for f in flows {
                let t = |a: FlowEndpoint, b: FlowEndpoint| {
                    format!("{}:{} -> {}:{}", a.addr, a.port, b.addr, b.port)
                };
                println!(
                    "{:<5} {:<5} {:<44} {:<44} {:<12} {:>6} {:>6} {:>9} {:>9} {}",
                    f.proto,
                    f.kind,
                    t(f.orig_src, f.orig_dst),
                    t(f.nat_src, f.nat_dst),
                    f.state,
                    f.age_s,
                    f.idle_s,
                    f.packets + f.reply_packets,
                    f.bytes + f.reply_bytes,
                    f.container.unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        Command::Node(NodeCmd::List { json }) => {
            let nodes = client.nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<18} {:<16} {:>9}  STATE",
                "NAME", "CIDR", "UNDERLAY", "LEASE-AGE"
            );
            for n in nodes {
                println!(
                    "{:<24} {:<18} {:<16} {:>8}s  {}",
                    n.name, n.cidr, n.underlay, n.lease_age_s, n.state
                );
            }
            Ok(())
        }
        Command::Conntrack(ConntrackCmd::Flush { container }) => {
            let r = client.flush_conntrack(container.as_deref()).await?;
            println!("removed {} entries", r.removed);
            Ok(())
        }
    }
}

/// Parses a duration as people type it: `30s`, `500ms`, `5m`, `6h`, or a
/// bare number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 30s, 500ms, 5m"))?;
    let ms = match unit {
        "" | "s" => n.checked_mul(1000),
        "ms" => Some(n),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(|| format!("invalid duration {text:?}: units are ms, s, m, h"))?;
    Ok(std::time::Duration::from_millis(ms))
}

/// Parses a port range `LOW-HIGH`.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let err = || format!("invalid port range {text:?}: expected LOW-HIGH within 1-65535");
    let (a, b) = text.split_once('-').ok_or_else(err)?;
    let a: u16 = a.trim().parse().map_err(|_| err())?;
    let b: u16 = b.trim().parse().map_err(|_| err())?;
    if a == 0 || b < a {
        return Err(err());
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_and_port_ranges_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2d").is_err());
        assert_eq!(parse_port_range("61000-65535"), Ok((61000, 65535)));
        assert!(parse_port_range("65535-61000").is_err());
        assert!(parse_port_range("0-10").is_err());
    }
}
