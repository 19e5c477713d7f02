//! One test bed per [`Mode`]: a namespace node of its own, a server
//! container, the servers the measurements talk to, and the mode's way of
//! publishing the container's ports.
//!
//! ```text
//!  client netns                  node netns                       container netns "srv"
//!  eth0 198.18.0.1/24 ──veth── up0 198.18.0.2/24 ──veth (per mode)── eth0 <pool>.x
//!       + 198.18.0.10-73          route: forwarding only                iperf3 -s :5201
//!  iperf3 -s :5202                iptables / nft: rules here            RR server :7000
//!  connection server :7002        datapath: the agent                   connection server :7001
//! ```
//!
//! Every mode gets its own node, so no mode's rules or programs can touch
//! another's packets: the netfilter modes never see an agent, the datapath
//! modes never see a netfilter rule. The ports under test ([`UNDER_TEST`])
//! come last: after the filler ports ([`Backend::set_fillers`]), which is
//! where iptables evaluates them.

pub mod datapath;
pub mod manual;
pub mod netfilter;
pub mod route;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    agent::Agent,
    bench::{api::Api, connrate::ConnServer, iperf::IperfServer, mode::Mode, rr::RrServer},
    netns::Netns,
    node::{CLIENT_IF, Node},
};

/// iperf3's port in the container (TCP and UDP).
pub const IPERF_PORT: u16 = 5201;
/// The request/response server's port in the container.
pub const RR_PORT: u16 = 7000;
/// The connection server's port in the container.
pub const CONN_PORT: u16 = 7001;
/// A container port `p` is published on host port `p + HOST_OFFSET`.
pub const HOST_OFFSET: u16 = 10_000;
/// iperf3's port in the client namespace (container → outside).
pub const EGRESS_IPERF_PORT: u16 = 5202;
/// The connection server's port in the client namespace.
pub const EGRESS_CONN_PORT: u16 = 7002;
/// The first filler port; filler port `p` leads to port `p` of a filler
/// container that is never reached.
pub const FILLER_BASE: u16 = 20_000;
/// The most filler ports a bed can hold (up to port 59,999, below the
/// agent's masquerade ports).
pub const MAX_FILLERS: usize = 40_000;
/// The port added and removed to time one mapping's update.
pub const UPDATE_PORT: u16 = 60_000;
/// Extra client addresses: connection sources (and, from containers,
/// destinations) rotate over them so that TIME_WAIT never runs a 4-tuple
/// space dry.
pub const CLIENT_EXTRA_ADDRS: u8 = 64;
/// The first extra client address's last octet.
const CLIENT_EXTRA_FIRST: u8 = 10;
/// Threads of each connection server.
const CONN_SERVER_THREADS: usize = 2;

/// One published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// The port on the node.
    pub host_port: u16,
    /// The port in the container.
    pub ctr_port: u16,
}

impl Mapping {
    /// A TCP mapping.
    pub const fn tcp(host_port: u16, ctr_port: u16) -> Self {
        Self {
            proto: "tcp",
            host_port,
            ctr_port,
        }
    }

    /// A UDP mapping.
    pub const fn udp(host_port: u16, ctr_port: u16) -> Self {
        Self {
            proto: "udp",
            host_port,
            ctr_port,
        }
    }

    /// In Docker's `-p` syntax.
    pub fn spec(&self) -> String {
        format!("{}:{}/{}", self.host_port, self.ctr_port, self.proto)
    }
}

/// The server container's published ports: what every measurement hits.
pub const UNDER_TEST: [Mapping; 4] = [
    Mapping::tcp(IPERF_PORT + HOST_OFFSET, IPERF_PORT),
    Mapping::udp(IPERF_PORT + HOST_OFFSET, IPERF_PORT),
    Mapping::tcp(RR_PORT + HOST_OFFSET, RR_PORT),
    Mapping::tcp(CONN_PORT + HOST_OFFSET, CONN_PORT),
];

/// The filler ports of a bed with `n` of them.
pub fn filler_ports(n: usize) -> impl Iterator<Item = u16> {
    (0..n.min(MAX_FILLERS)).map(|i| FILLER_BASE + i as u16)
}

/// A mode's way of publishing ports, behind one interface.
pub trait Backend {
    /// Makes `n` filler ports present besides the ports under test.
    fn set_fillers(&mut self, n: usize) -> Result<()>;
    /// Publishes one more port ([`UPDATE_PORT`]) the mode's usual way;
    /// returns how long it took.
    fn time_add(&mut self) -> Result<Duration>;
    /// Removes the port [`Backend::time_add`] published; returns how long
    /// it took.
    fn time_del(&mut self) -> Result<Duration>;
    /// Like [`Backend::time_add`] through a command line tool, where the
    /// mode's usual way is not one.
    fn time_cli_add(&mut self) -> Option<Result<Duration>> {
        None
    }
    /// Like [`Backend::time_del`] through a command line tool.
    fn time_cli_del(&mut self) -> Option<Result<Duration>> {
        None
    }
    /// The time to insert and to remove one entry in the kernel's table
    /// alone, where it can be reached directly.
    fn time_map_update(&mut self) -> Option<Result<(Duration, Duration)>> {
        None
    }
    /// Forgets every tracked connection.
    fn flush_conntrack(&self) -> Result<()>;
    /// The process id of the agent, where one runs.
    fn agent_pid(&self) -> Option<u32> {
        None
    }
    /// What is installed, in a few words.
    fn describe(&self) -> String;
}

/// The servers a bed's measurements talk to; stopped on drop.
#[derive(Debug)]
struct Servers {
    _iperf: IperfServer,
    _egress_iperf: IperfServer,
    _rr: RrServer,
    _conn: ConnServer,
    _egress_conn: ConnServer,
}

/// A mode's node, container, servers and backend.
pub struct Bed<'n> {
    // Fields drop in order: servers, the observer, then the backend (the
    // agent), then the container namespace.
    _servers: Servers,
    _observer: Option<Observer>,
    backend: Box<dyn Backend + 'n>,
    api: Option<Api>,
    mode: Mode,
    node: &'n Node,
    ctr: Netns,
    ctr_addr: Ipv4Addr,
    client_addrs: Vec<Ipv4Addr>,
    fillers: usize,
}

impl std::fmt::Debug for Bed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bed")
            .field("mode", &self.mode)
            .field("node", &self.node.id())
            .field("ctr_addr", &self.ctr_addr)
            .field("backend", &self.backend.describe())
            .finish_non_exhaustive()
    }
}

/// What watches the agent of an observed mode while it is measured: a
/// thread scraping its metrics every second, or a `datapath monitor`.
struct Observer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    child: Option<std::process::Child>,
}

impl Observer {
    /// Scrapes the metrics on API socket `socket` every second.
    fn scraper(socket: &std::path::Path) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, socket) = (std::sync::Arc::clone(&stop), socket.to_owned());
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = crate::agent::metrics_at(&socket) {
                    eprintln!("scraping the metrics: {e}");
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        Self {
            stop,
            thread: Some(thread),
            child: None,
        }
    }

    /// Runs `datapath monitor` (drops and flows) against API socket
    /// `socket`, in `node`'s namespace, its output discarded.
    fn monitor(node: &Node, socket: &std::path::Path) -> Self {
        let mut cmd = std::process::Command::new(crate::agent::datapath_bin());
        cmd.arg("--api-socket")
            .arg(socket)
            .args(["monitor", "--json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Self {
            stop: std::sync::Arc::default(),
            thread: None,
            child: Some(node.node.spawn(&mut cmd)),
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The node a bed of `mode` needs (native XDP needs the client's TX
/// checksum offload off, see FACTS).
pub fn node_for(mode: Mode) -> Node {
    Node::builder()
        .client_tx_offload(mode != Mode::DatapathXdp)
        .build()
}

impl<'n> Bed<'n> {
    /// Sets up `mode` in `node` (made by [`node_for`]) with container pool
    /// `198.19.<pool_octet>.0/24`.
    pub fn new(mode: Mode, node: &'n Node, pool_octet: u8) -> Result<Self> {
        let pool = format!("198.19.{pool_octet}.0/24");
        let gateway = Ipv4Addr::new(198, 19, pool_octet, 1);
        let filler_addr = Ipv4Addr::new(198, 19, pool_octet, 254);
        let client_addrs = add_client_addrs(node);
        let ctr = node.add_container_netns("srv");
        for ns in [&node.client, &ctr] {
            ns.exec_ok("sysctl", ["-qw", "net.ipv4.ip_local_port_range=1024 65535"]);
        }
        let mut api = None;
        let mut observer = None;
        let (backend, ctr_addr): (Box<dyn Backend + 'n>, Ipv4Addr) = if mode.is_datapath() {
            let xdp = if mode == Mode::DatapathXdp {
                "native"
            } else {
                "off"
            };
            let agent = Agent::builder(node)
                .pool(&pool)
                .args(["--xdp-mode", xdp])
                .start();
            observer = match mode {
                Mode::DatapathTcMetrics => Some(Observer::scraper(agent.socket())),
                Mode::DatapathTcMonitor => Some(Observer::monitor(node, agent.socket())),
                _ => None,
            };
            let backend = datapath::AgentBackend::new(
                agent,
                node.add_container_netns("fill"),
                node.add_container_netns("upd"),
            )?;
            let publish: Vec<String> = UNDER_TEST.iter().map(Mapping::spec).collect();
            let info = backend
                .api()
                .add_container("srv", ctr.name(), &publish)
                .context("adding the server container")?;
            api = Some(backend.api().clone());
            let addr = info["addr"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("no container address in {info}"))?;
            (Box::new(backend), addr)
        } else {
            let addr = Ipv4Addr::new(198, 19, pool_octet, 2);
            manual::enable_forwarding(node);
            manual::attach(
                node,
                &ctr,
                &manual::ManualLink {
                    host_if: "vsrv".to_owned(),
                    addr,
                    gateway,
                },
            );
            let backend: Box<dyn Backend + 'n> = match mode {
                Mode::Route => Box::new(route::Route::new(node, &pool)),
                Mode::Iptables | Mode::IptablesNft => {
                    let tool = if mode == Mode::Iptables {
                        "iptables-legacy"
                    } else {
                        "iptables"
                    };
                    Box::new(netfilter::Iptables::new(
                        node,
                        tool,
                        &pool,
                        addr,
                        filler_addr,
                    )?)
                }
                Mode::NftablesMap => {
                    Box::new(netfilter::NftMap::new(node, &pool, addr, filler_addr)?)
                }
                Mode::DatapathTc
                | Mode::DatapathXdp
                | Mode::DatapathTcMetrics
                | Mode::DatapathTcMonitor => unreachable!("handled above"),
            };
            (backend, addr)
        };
        let servers = Servers {
            _iperf: IperfServer::start(&ctr, IPERF_PORT)?,
            _egress_iperf: IperfServer::start(&node.client, EGRESS_IPERF_PORT)?,
            _rr: RrServer::start(&ctr, RR_PORT)?,
            _conn: ConnServer::start(&ctr, CONN_PORT, CONN_SERVER_THREADS)?,
            _egress_conn: ConnServer::start(&node.client, EGRESS_CONN_PORT, CONN_SERVER_THREADS)?,
        };
        Ok(Self {
            _servers: servers,
            _observer: observer,
            backend,
            api,
            mode,
            node,
            ctr,
            ctr_addr,
            client_addrs,
            fillers: 0,
        })
    }

    /// The bed's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The agent's API (datapath modes).
    pub fn api(&self) -> Option<&Api> {
        self.api.as_ref()
    }

    /// The bed's node.
    pub fn node(&self) -> &'n Node {
        self.node
    }

    /// The server container's namespace.
    pub fn container(&self) -> &Netns {
        &self.ctr
    }

    /// Where the client reaches container port `ctr_port`: the published
    /// port on the node, or (route mode) the container itself.
    pub fn ingress(&self, ctr_port: u16) -> SocketAddrV4 {
        if self.mode.publishes() {
            SocketAddrV4::new(self.node.node_addr(), ctr_port + HOST_OFFSET)
        } else {
            SocketAddrV4::new(self.ctr_addr, ctr_port)
        }
    }

    /// The client's extra addresses (connection sources).
    pub fn client_addrs(&self) -> &[Ipv4Addr] {
        &self.client_addrs
    }

    /// The egress iperf3 server (in the client namespace).
    pub fn egress_iperf(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.node.client_addr(), EGRESS_IPERF_PORT)
    }

    /// The egress connection server on each extra client address.
    pub fn egress_conn_dests(&self) -> Vec<SocketAddrV4> {
        self.client_addrs
            .iter()
            .map(|a| SocketAddrV4::new(*a, EGRESS_CONN_PORT))
            .collect()
    }

    /// The number of filler ports present.
    pub fn fillers(&self) -> usize {
        self.fillers
    }

    /// Makes `n` filler ports present (route mode: nothing to do).
    pub fn set_fillers(&mut self, n: usize) -> Result<()> {
        self.backend
            .set_fillers(n)
            .with_context(|| format!("{}: {n} filler ports", self.mode))?;
        self.fillers = n;
        Ok(())
    }

    /// The mode's backend.
    pub fn backend(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }

    /// The CPU seconds (user and system) the mode's agent has used so
    /// far, where one runs.
    pub fn agent_cpu_secs(&self) -> Option<f64> {
        self.backend
            .agent_pid()
            .and_then(crate::bench::cpu::process_cpu_secs)
    }

    /// Forgets every tracked connection of the mode.
    pub fn flush_conntrack(&self) -> Result<()> {
        self.backend
            .flush_conntrack()
            .with_context(|| format!("{}: flushing conntrack", self.mode))
    }

    /// What the mode installed.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }
}

/// Adds [`CLIENT_EXTRA_ADDRS`] addresses (198.18.0.10…) to the client's
/// interface, in the link's prefix.
fn add_client_addrs(node: &Node) -> Vec<Ipv4Addr> {
    let prefix = node.prefix_len();
    let base = node.client_addr().octets();
    (0..CLIENT_EXTRA_ADDRS)
        .map(|i| {
            let a = Ipv4Addr::new(base[0], base[1], base[2], CLIENT_EXTRA_FIRST + i);
            node.client.exec_ok(
                "ip",
                ["addr", "add", &format!("{a}/{prefix}"), "dev", CLIENT_IF],
            );
            a
        })
        .collect()
}
