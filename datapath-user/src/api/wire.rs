//! The API's wire types: the JSON bodies of requests and answers. They
//! depend only on the shared vocabulary ([`crate::model`]), so that the
//! server, the client and the CNI plugin share them without depending on
//! the agent.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::model::{Figures, RateCounters, RateLimits};
pub use crate::model::{Flow, FlowEndpoint};

/// Largest request body the agent accepts on most routes.
pub const MAX_BODY: usize = 64 * 1024;

/// Largest request body of the routes that take port lists (`POST
/// /v1/containers` and `POST|DELETE /v1/containers/{name}/ports`): room
/// for every TCP and UDP port of a node, each with a host address,
/// written out one by one.
pub const MAX_PORTS_BODY: usize = 8 * 1024 * 1024;

/// How a request with many ports is split to fit [`MAX_PORTS_BODY`].
pub const SPLIT_PORTS: &str = "split the ports over several requests of at most 100,000 ports \
    each (`datapath container add` with the first part, then `datapath container publish NAME \
    --publish-file PART` with each other part; through the API, `POST \
    /v1/containers/{name}/ports` with a list)";

/// What the agent (or the client, before sending) says of a request body
/// over a route's `limit`: which limit, and `what_to_do`.
pub fn too_large(limit: usize, what_to_do: &str) -> String {
    let size = if limit >= 1 << 20 {
        format!("{} MiB", limit >> 20)
    } else {
        format!("{} KiB", limit >> 10)
    };
    format!("the request body is larger than the {size} this route accepts: {what_to_do}")
}

/// `POST /v1/containers`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AddContainer {
    /// Container name: 1-64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Network namespace: a path, or a name under /var/run/netns.
    pub netns: String,
    /// Interface name inside the container (default `eth0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Published ports in Docker's `-p` syntax.
    #[serde(default)]
    pub publish: Vec<String>,
    /// The container's cgroup v2 directory, which rate limits apply to: a
    /// path inside the cgroup2 mount, or a path under it (`web1`,
    /// `/machine.slice/web1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Egress (from the container) rate in tc's units, e.g. `10mbit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_rate: Option<String>,
    /// Ingress (to the container) rate in tc's units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate: Option<String>,
    /// Egress bucket size in tc's units, e.g. `64kb` (default: 4 ms of the
    /// rate, at least 1mb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_burst: Option<String>,
    /// Ingress bucket size in tc's units (default: 500 ms of the rate, at
    /// least 1mb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_burst: Option<String>,
    /// MTU of both ends of the veth pair (68-65535; default: the agent's
    /// `--mtu`, or the uplink's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Publish ports even where a process of the node listens on them
    /// (refused otherwise).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// `PATCH /v1/containers/{name}`: changes rate limits in place (no flow
/// is lost). An absent field is unchanged; a rate of `none` removes that
/// direction's limit; a new rate keeps a burst that was given and
/// derives the default one from the new rate otherwise.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpdateContainer {
    /// Egress rate in tc's units, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_rate: Option<String>,
    /// Ingress rate in tc's units, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate: Option<String>,
    /// Egress bucket size in tc's units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_burst: Option<String>,
    /// Ingress bucket size in tc's units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_burst: Option<String>,
}

/// `POST /v1/containers/{name}/ports` and `DELETE …/ports`: published
/// ports or ranges in Docker's `-p` syntax, one or a list. A list is one
/// change: all of it is done, in one durable write, or none of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    /// `[ip:]host[-end]:container[-end][/tcp|/udp]`, or a list of them.
    pub publish: Specs,
    /// Publish even where a process of the node listens on a port
    /// (refused otherwise); unpublishing ignores it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// One port specification or a list of them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Specs {
    /// One.
    One(String),
    /// Several.
    List(Vec<String>),
}

impl Specs {
    /// The specifications as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::List(l) => l,
        }
    }
}

/// A container as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Name.
    pub name: String,
    /// The agent's number for it.
    pub id: u32,
    /// Address from the pool.
    pub addr: Ipv4Addr,
    /// Gateway (host-side veth address).
    pub gateway: Ipv4Addr,
    /// The IPv6 address, on a dual-stack node (`--pool6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr6: Option<Ipv6Addr>,
    /// The IPv6 gateway (link-local, on the host-side veth), on a
    /// dual-stack node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    /// Network namespace path.
    pub netns: PathBuf,
    /// Interface inside the container.
    pub ifname: String,
    /// Host-side veth.
    pub host_ifname: String,
    /// Published ports, normalized (`[ip:]host:container/proto`).
    pub publish: Vec<String>,
    /// The cgroup rate limits apply to.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Whether the rate limits are pending: the cgroup does not exist yet
    /// (runtimes create it after the network), and the limits apply as
    /// soon as it appears.
    #[serde(default)]
    pub pending: bool,
    /// The veth pair's MTU, if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Rate limits per direction (rates in bits/s, bursts in bytes; `null`:
    /// unlimited).
    #[serde(default)]
    pub limits: RateLimits,
    /// The rate limiter's counters per direction.
    #[serde(default)]
    pub counters: RateCounters,
    /// The identity (`dev:ino`) of its network namespace, recorded when it
    /// was added: `netns` is that namespace only while it has this identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<String>,
    /// Why the container is not as it should be, if it is not (its veth
    /// could not be restored, its namespace could not be checked): the
    /// agent keeps it and retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// The uplink's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UplinkInfo {
    /// Interface name.
    pub ifname: String,
    /// Interface index.
    pub ifindex: u32,
    /// The hook serving it (`tc`, `xdp-native`, `xdp-generic`).
    pub hook: String,
    /// The node's primary address (masquerade source).
    pub node_ip: Ipv4Addr,
    /// Every node address published ports answer on.
    pub node_addrs: Vec<Ipv4Addr>,
}

/// An attached program.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachmentInfo {
    /// Program name.
    pub program: String,
    /// Kernel program id.
    pub program_id: u32,
    /// Interface.
    pub ifname: String,
    /// Hook.
    pub hook: String,
    /// Link pin.
    pub pin: PathBuf,
}

/// A pinned map, with the layout the kernel reports for it (all zero if
/// nothing is pinned at `pin`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapInfo {
    /// Map name.
    pub name: String,
    /// Pin path.
    pub pin: PathBuf,
    /// `BPF_MAP_TYPE_*` number.
    #[serde(default)]
    pub map_type: u32,
    /// Key size in bytes.
    #[serde(default)]
    pub key_size: u32,
    /// Value size in bytes.
    #[serde(default)]
    pub value_size: u32,
    /// Maximum number of entries.
    #[serde(default)]
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    #[serde(default)]
    pub flags: u32,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// Agent version.
    pub version: String,
    /// bpffs directory.
    pub bpffs_dir: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Container pool.
    pub pool: String,
    /// The containers' IPv6 pool, on a dual-stack node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool6: Option<String>,
    /// Containers' gateway.
    pub gateway: Ipv4Addr,
    /// The uplink, if one is configured.
    pub uplink: Option<UplinkInfo>,
    /// Attached programs.
    pub attachments: Vec<AttachmentInfo>,
    /// Pinned maps.
    pub maps: Vec<MapInfo>,
    /// Datapath counters (summed over CPUs).
    pub counters: BTreeMap<String, u64>,
    /// Number of containers.
    pub containers: usize,
    /// Conntrack entries in use (two per flow) and capacity.
    pub conntrack_entries: usize,
    /// Conntrack capacity.
    pub conntrack_max: u32,
    /// Every figure of the metrics page (`/metrics`), for `datapath
    /// status` to show in words.
    #[serde(default)]
    pub figures: Figures,
    /// The agent's own CPU use and the cost of its periodic work.
    #[serde(default)]
    pub agent: AgentWork,
}

/// The agent's own CPU use (`getrusage`), and what its only periodic
/// work, counting the conntrack entries for `status`, has cost: the
/// kernel expires flows itself, so nothing else runs on a timer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentWork {
    /// CPU seconds spent in user mode since the agent started.
    pub cpu_user_s: f64,
    /// CPU seconds spent in the kernel on the agent's behalf since it
    /// started (syscalls: map reads and writes, netlink, fsync).
    pub cpu_system_s: f64,
    /// The count of the conntrack entries.
    pub conntrack_count: CountWork,
}

/// What counting the conntrack entries has cost. The count runs only
/// while `status` is asked for, in passes at least a second apart, each
/// touching at most `pass_budget` entries whatever the tables' sizes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountWork {
    /// The most entries one pass may touch (read, or looked up).
    pub pass_budget: u64,
    /// Passes made.
    pub passes: u64,
    /// Walks of both tables completed.
    pub walks: u64,
    /// Entries touched by the last pass.
    pub last_pass_entries: u64,
    /// The most entries touched by one pass.
    pub max_pass_entries: u64,
    /// The most syscalls made by one pass.
    pub max_pass_syscalls: u64,
}

/// `GET /v1/monitor` query: what to stream (drops and flows when neither
/// is asked for).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MonitorQuery {
    /// Dropped packets.
    #[serde(default)]
    pub drops: bool,
    /// New, closed and expired flows.
    #[serde(default)]
    pub flows: bool,
    /// Only this container's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl MonitorQuery {
    /// Whether drops are streamed.
    pub fn wants_drops(&self) -> bool {
        self.drops || !self.flows
    }

    /// Whether flows are streamed.
    pub fn wants_flows(&self) -> bool {
        self.flows || !self.drops
    }
}

/// One line of `GET /v1/monitor` (newline-delimited JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MonitorEvent {
    /// `drop`, `flow-new`, `flow-closed`, `flow-expired`, or `lost` (this
    /// reader fell behind: `count` events were skipped).
    pub kind: String,
    /// When (the datapath's clock, ns).
    #[serde(default)]
    pub time_ns: u64,
    /// For a drop: its reason (the counter's name without `drop_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where the datapath saw it: `uplink-tc`, `uplink-xdp`,
    /// `container-tc`, `overlay-tc`, `overlay-egress-tc`, `timer`.
    #[serde(default)]
    pub hook: String,
    /// The container concerned, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// `tcp`, `udp`, `icmp` or the protocol number.
    #[serde(default)]
    pub protocol: String,
    /// Source address.
    #[serde(default)]
    pub src: Option<Ipv4Addr>,
    /// Source port (ICMP: the echo identifier).
    #[serde(default)]
    pub sport: u16,
    /// Destination address.
    #[serde(default)]
    pub dst: Option<Ipv4Addr>,
    /// Destination port.
    #[serde(default)]
    pub dport: u16,
    /// The interface the packet came in on.
    #[serde(default)]
    pub ifindex: u32,
    /// The frame's length.
    #[serde(default)]
    pub len: u32,
    /// For `lost`: how many events.
    #[serde(default)]
    pub count: u64,
}

impl std::fmt::Display for MonitorEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == "lost" {
            return write!(f, "lost {} events (the reader fell behind)", self.count);
        }
        let addr = |a: Option<Ipv4Addr>, p: u16| match a {
            Some(a) if p != 0 => format!("{a}:{p}"),
            Some(a) => a.to_string(),
            None => "-".to_owned(),
        };
        write!(f, "{:<12} {:<13}", self.kind, self.hook)?;
        if let Some(r) = &self.reason {
            write!(f, " reason={r}")?;
        }
        write!(
            f,
            " {} {} -> {}",
            self.protocol,
            addr(self.src, self.sport),
            addr(self.dst, self.dport)
        )?;
        if let Some(c) = &self.container {
            write!(f, " container={c}")?;
        }
        if self.len != 0 {
            write!(f, " len={}", self.len)?;
        }
        if self.ifindex != 0 {
            write!(f, " ifindex={}", self.ifindex)?;
        }
        Ok(())
    }
}

/// `GET /v1/conntrack` query: which flows to list. The answer is a JSON
/// list streamed as the table is walked: however large the table, neither
/// side holds more than a batch of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Only this container's flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// At most this many flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `DELETE /v1/conntrack` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flushed {
    /// Entries removed (two per flow).
    pub removed: usize,
}

/// `GET /v1/nodes`: one node of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its node CIDR (its containers' addresses).
    pub cidr: String,
    /// Its underlay address (its overlay endpoint).
    pub underlay: Ipv4Addr,
    /// Whether it is the node this agent runs on.
    pub this_node: bool,
    /// Seconds since this agent first saw the node's current lease.
    pub lease_age_s: u64,
    /// `local` (this node), `reachable` (its record is live in the store
    /// and its route installed), or `last-known` (the store is unreachable:
    /// the datapath keeps forwarding to it as last seen).
    pub state: String,
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}
