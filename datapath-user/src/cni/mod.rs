//! The CNI plugin (`datapath-cni`): podman, containerd and Kubernetes attach
//! containers to the datapath through it.
//!
//! The plugin is a thin client of the running agent: `ADD` asks the agent
//! for a container (veth pair, address from the agent's pool, routes,
//! published ports from `runtimeConfig.portMappings`, rate limits from the
//! plugin's `ingressRate`/`egressRate`/... keys or `runtimeConfig.bandwidth`
//! on the container's cgroup) and prints the CNI result; `DEL` removes it
//! (map entries and conntrack entries with it); `CHECK` compares what the
//! agent and the kernel hold (interface, address, routes, host veth,
//! published ports) with the `prevResult` and the configuration; `GC`
//! removes the network's attachments the runtime no longer knows; `STATUS`
//! asks whether the agent can take more; `VERSION` lists the supported
//! versions (0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0: results are converted for
//! the older ones, see [`types::Success::for_version`]).
//!
//! A limit's cgroup need not exist at `ADD` (runtimes create it after the
//! network): the agent keeps the limits pending until it appears. A
//! retried `ADD` of an attachment that exists returns it, and does not
//! remove it if reading it back fails. `CHECK` compares network namespaces
//! by identity (device and inode), not by the text of their paths.
//!
//! The agent allocates every address: an `ipam` section may only restate
//! the agent's pool (see [`config::NetConf::check_ipam`]); no IPAM plugin
//! is executed.
//!
//! The agent's socket comes from the network configuration (`agentSocket`,
//! default [`crate::api::DEFAULT_SOCKET`]), never from the environment:
//! runtimes call `DEL` with a minimal environment.
//!
//! The plugin depends on the API (its client and wire types), the shared
//! vocabulary and the link-reading helpers, never on the agent.
//!
//! Each attachment `(CNI_CONTAINERID, CNI_IFNAME)` of network `name` is one
//! agent container named by [`attachment_name`]:
//! `cni-<network hash>-<container id prefix>-<attachment hash>`. The name is
//! a pure function of the three, so `DEL` needs no state of its own, and
//! `GC` recomputes the names of the valid attachments and removes the
//! network's other containers. Names starting with `cni-` are the plugin's.
//!
//! Errors are printed as the specification's error structure on stdout,
//! with a non-zero exit status: 1 for an unsupported version, 2 for a
//! configuration value the datapath cannot honour, 4 for a missing or
//! invalid environment variable, 6 for a configuration that is not JSON,
//! 7 for an invalid configuration, 11 when the agent cannot be reached
//! (retry later), 50 when `STATUS` finds the agent unavailable, 999 when
//! the agent refuses or `CHECK` finds the attachment broken.

pub mod config;
pub mod types;

use std::{
    collections::BTreeSet,
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use self::{
    config::NetConf,
    types::{
        CniError, Interface, IpConfig, LATEST_VERSION, Route, SUPPORTED_VERSIONS, Success,
        VersionResult, code,
    },
};
use crate::{
    api::{AddContainer, Client, ClientError, ContainerInfo, Status},
    error::error_chain,
    model::{PortMapping, mac::format_mac, names::validate_ifname},
    net::{inspect, netns},
};

/// How long the plugin waits for one answer of the agent.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The prefix of every agent container the plugin creates.
pub const NAME_PREFIX: &str = crate::model::names::CNI_NAME_PREFIX;

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container.
    Del,
    /// Verify an attachment.
    Check,
    /// Remove stale attachments.
    Gc,
    /// Report readiness.
    Status,
    /// List supported versions.
    Version,
}

impl std::str::FromStr for Command {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            _ => return Err(()),
        })
    }
}

/// The attachment parameters from the environment.
#[derive(Clone, Debug, Default)]
struct Params {
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
}

impl Params {
    fn container_id(&self) -> Result<&str, CniError> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| CniError::env("CNI_CONTAINERID", "missing"))?;
        if !config::is_valid_identifier(id) {
            return Err(CniError::env(
                "CNI_CONTAINERID",
                format!(
                    "{id:?} is not a container id (a letter or digit, then letters, digits, '_', '.' or '-')"
                ),
            ));
        }
        Ok(id)
    }

    fn ifname(&self) -> Result<&str, CniError> {
        let name = self
            .ifname
            .as_deref()
            .ok_or_else(|| CniError::env("CNI_IFNAME", "missing"))?;
        validate_ifname(name).map_err(|e| CniError::env("CNI_IFNAME", e))?;
        Ok(name)
    }

    fn netns(&self) -> Result<&str, CniError> {
        self.netns
            .as_deref()
            .ok_or_else(|| CniError::env("CNI_NETNS", "missing"))
    }
}

/// What the plugin prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Standard output (a result, a version answer, an error structure, or
    /// nothing).
    pub stdout: String,
    /// Whether to exit with status 0.
    pub success: bool,
}

/// Runs one plugin invocation: `env` looks up environment variables,
/// `stdin` is the network configuration.
pub async fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Output {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    // The version errors are reported in: the configuration's, if this
    // plugin speaks it.
    let version = peek_version(stdin)
        .filter(|v| types::is_supported(v))
        .unwrap_or_else(|| LATEST_VERSION.to_owned());
    let params = Params {
        container_id: var("CNI_CONTAINERID"),
        netns: var("CNI_NETNS"),
        ifname: var("CNI_IFNAME"),
    };
    let result = match var("CNI_COMMAND") {
        None => Err(CniError::env("CNI_COMMAND", "missing")),
        Some(c) => match c.parse::<Command>() {
            Err(()) => Err(CniError::env(
                "CNI_COMMAND",
                format!("unknown command {c:?} (ADD, DEL, CHECK, GC, STATUS or VERSION)"),
            )),
            Ok(command) => dispatch(command, &params, stdin).await,
        },
    };
    match result {
        Ok(stdout) => Output {
            stdout,
            success: true,
        },
        Err(e) => Output {
            stdout: to_json(&e.to_result(&version)),
            success: false,
        },
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // The wire types are plain structs of strings and numbers.
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The `cniVersion` of `stdin`, if it is a JSON object with one.
fn peek_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()?
        .get("cniVersion")?
        .as_str()
        .map(str::to_owned)
}

async fn dispatch(command: Command, params: &Params, stdin: &[u8]) -> Result<String, CniError> {
    if command == Command::Version {
        return version(stdin);
    }
    let conf = NetConf::parse(stdin)?;
    if !types::is_supported(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "cniVersion {:?}: this plugin speaks {}",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if command == Command::Check && !types::has_check(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "CHECK needs cniVersion 0.4.0 or later, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    if matches!(command, Command::Gc | Command::Status)
        && !types::has_status_and_gc(&conf.cni_version)
    {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "{command:?} needs cniVersion 1.1.0, the configuration says {}",
                conf.cni_version
            ),
        ));
    }
    let plugin = Plugin::new(&conf);
    match command {
        Command::Add => Ok(to_json(&plugin.add(params).await?)),
        Command::Del => plugin.del(params).await.map(|()| String::new()),
        Command::Check => plugin.check(params).await.map(|()| String::new()),
        Command::Gc => plugin.gc().await.map(|()| String::new()),
        Command::Status => plugin.status().await.map(|()| String::new()),
        Command::Version => version(stdin),
    }
}

/// `VERSION`: echoes the input's `cniVersion` if this plugin speaks it,
/// else answers with the newest it speaks (never a version it does not
/// support: the caller compares the list with its own).
fn version(stdin: &[u8]) -> Result<String, CniError> {
    let cni_version = if stdin.iter().all(u8::is_ascii_whitespace) {
        LATEST_VERSION.to_owned()
    } else {
        let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "cannot decode the VERSION request",
                format!("stdin is not JSON: {e}"),
            )
        })?;
        value
            .get("cniVersion")
            .and_then(|v| v.as_str())
            .filter(|v| types::is_supported(v))
            .unwrap_or(LATEST_VERSION)
            .to_owned()
    };
    Ok(to_json(&VersionResult {
        cni_version,
        supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
    }))
}

/// FNV-1a, 64 bits: a hash that never changes between builds (names made
/// by one version of the plugin are found by the next).
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            // A separator, so that ("ab", "c") and ("a", "bc") differ.
            h ^= 0xff;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The prefix of the agent container names of network `network`.
pub fn network_prefix(network: &str) -> String {
    // The low 32 bits: networks on one node are few.
    let net = fnv1a64(&[network.as_bytes()]) as u32;
    format!("{NAME_PREFIX}{net:08x}-")
}

/// The agent container name of attachment `(container_id, ifname)` of
/// network `network`: at most 42 characters of `[a-z0-9_.-]`-like text
/// (the container id is one of `[A-Za-z0-9_.-]` by the specification).
pub fn attachment_name(network: &str, container_id: &str, ifname: &str) -> String {
    let short: String = container_id.chars().take(12).collect();
    let hash = fnv1a64(&[container_id.as_bytes(), ifname.as_bytes()]);
    format!("{}{short}-{hash:016x}", network_prefix(network))
}

/// Maps a failed agent call to a CNI error.
fn agent_error(what: &str, e: ClientError) -> CniError {
    match e {
        ClientError::Connect { .. } | ClientError::Http { .. } | ClientError::Timeout { .. } => {
            CniError::new(
                code::TRY_AGAIN_LATER,
                "the datapath agent is not reachable",
                format!(
                    "{what}: {e} (start the agent, or set agentSocket in the network configuration)"
                ),
            )
        }
        ClientError::Agent { status, message } => CniError::failed(
            format!("the datapath agent refused to {what}"),
            format!("{message} (HTTP {status})"),
        ),
    }
}

/// Awaits an agent call for at most [`AGENT_TIMEOUT`].
async fn call<T>(
    what: &str,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, CniError> {
    match tokio::time::timeout(AGENT_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| agent_error(what, e)),
        Err(_) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the datapath agent did not answer",
            format!("{what}: no answer within {AGENT_TIMEOUT:?}"),
        )),
    }
}

/// Whether the files `a` and `b` are the same network namespace: the same
/// device and inode, as `/run/netns/x` and `/var/run/netns/x` (or a bind
/// mount of `/proc/PID/ns/net`) are. Paths that cannot be examined are
/// compared as text.
fn same_netns(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

/// The normalized text of a set of mappings (for comparison).
fn mapping_set<'a>(m: impl IntoIterator<Item = &'a PortMapping>) -> BTreeSet<String> {
    m.into_iter().map(ToString::to_string).collect()
}

/// One invocation's configuration and agent.
struct Plugin<'c> {
    conf: &'c NetConf,
    client: Client,
}

impl<'c> Plugin<'c> {
    fn new(conf: &'c NetConf) -> Self {
        Self {
            conf,
            client: Client::new(conf.agent_socket()).with_timeout(AGENT_TIMEOUT),
        }
    }

    fn name(&self, container_id: &str, ifname: &str) -> String {
        attachment_name(&self.conf.name, container_id, ifname)
    }

    async fn agent_status(&self) -> Result<(Status, Ipv4Net), CniError> {
        let status = call("report its status", self.client.status()).await?;
        let pool = status.pool.parse::<Ipv4Net>().map_err(|e| {
            CniError::failed(
                "the datapath agent reported an invalid pool",
                format!("{:?}: {e}", status.pool),
            )
        })?;
        Ok((status, pool))
    }

    /// The agent's container `name`, or `None` if it has none.
    async fn container(&self, name: &str) -> Result<Option<ContainerInfo>, CniError> {
        let what = format!("look up container {name}");
        match tokio::time::timeout(AGENT_TIMEOUT, self.client.container(name)).await {
            Ok(Ok(info)) => Ok(Some(info)),
            Ok(Err(ClientError::Agent { status: 404, .. })) => Ok(None),
            Ok(Err(e)) => Err(agent_error(&what, e)),
            Err(_) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "the datapath agent did not answer",
                format!("{what}: no answer within {AGENT_TIMEOUT:?}"),
            )),
        }
    }

    /// `ADD`.
    async fn add(&self, params: &Params) -> Result<Success, CniError> {
        let container_id = params.container_id()?;
        let ifname = params.ifname()?;
        let netns = params.netns()?;
        let request = attach_request(self.conf, container_id, ifname, netns)?;
        let name = request.name.clone();
        let prev = self.conf.prev_result()?;
        let (status, pool) = self.agent_status().await?;
        let pool6 = match &status.pool6 {
            Some(p) => Some(p.parse::<Ipv6Net>().map_err(|e| {
                CniError::failed(
                    "the datapath agent reported an invalid IPv6 pool",
                    format!("{p:?}: {e}"),
                )
            })?),
            None => None,
        };
        self.conf.check_ipam(pool, status.gateway, pool6)?;
        // A retried ADD finds the attachment its first try made: if reading
        // it back fails now, it is not this ADD's to remove.
        let existed = self.container(&name).await?.is_some();
        let info = call(
            &format!("attach container {container_id} ({name})"),
            self.client.add_container(&request),
        )
        .await?;
        match self.result(&info, netns, ifname).await {
            Ok(ours) => Ok(merge(prev, ours).for_version(&self.conf.cni_version)),
            Err(e) => {
                if !existed {
                    // Leave nothing behind; the runtime's DEL finds nothing.
                    let _ = call("roll back", self.client.del_container(&name)).await;
                }
                Err(e)
            }
        }
    }

    /// The result of a fresh attachment.
    async fn result(
        &self,
        info: &ContainerInfo,
        netns: &str,
        ifname: &str,
    ) -> Result<Success, CniError> {
        let inside = inspect::link(Some(&info.netns), ifname)
            .await
            .map_err(|e| {
                CniError::failed("cannot read the container's interface", error_chain(&e))
            })?
            .ok_or_else(|| {
                CniError::failed(
                    "the container's interface is missing",
                    format!(
                        "{ifname} is not in {} right after the agent created it",
                        info.netns.display()
                    ),
                )
            })?;
        // The host end is in the agent's netns, which is the runtime's (and
        // so the plugin's) on any sane node; without it the result merely
        // lacks its MAC address.
        let host = inspect::link(None, &info.host_ifname).await.ok().flatten();
        let gateway = info.gateway.to_string();
        let mut ips = vec![IpConfig {
            address: format!("{}/32", info.addr),
            gateway: Some(gateway.clone()),
            interface: Some(1),
            ..IpConfig::default()
        }];
        let mut routes = vec![Route {
            dst: "0.0.0.0/0".to_owned(),
            gw: Some(gateway),
            ..Route::default()
        }];
        if let (Some(addr6), Some(gateway6)) = (info.addr6, info.gateway6) {
            ips.push(IpConfig {
                address: format!("{addr6}/128"),
                gateway: Some(gateway6.to_string()),
                interface: Some(1),
                ..IpConfig::default()
            });
            routes.push(Route {
                dst: "::/0".to_owned(),
                gw: Some(gateway6.to_string()),
                ..Route::default()
            });
        }
        Ok(Success {
            cni_version: self.conf.cni_version.clone(),
            interfaces: vec![
                Interface {
                    name: info.host_ifname.clone(),
                    mac: host.as_ref().map(|h| format_mac(h.mac)),
                    mtu: host.as_ref().and_then(|h| h.mtu),
                    ..Interface::default()
                },
                Interface {
                    name: ifname.to_owned(),
                    mac: Some(format_mac(inside.mac)),
                    mtu: inside.mtu,
                    sandbox: Some(netns.to_owned()),
                    ..Interface::default()
                },
            ],
            ips,
            routes,
            dns: self.conf.dns.clone().unwrap_or_default(),
        })
    }

    /// `DEL`: removes the attachment's container; succeeds if it is gone,
    /// and whether or not its netns still exists.
    async fn del(&self, params: &Params) -> Result<(), CniError> {
        let container_id = params.container_id()?;
        let ifname = params.ifname()?;
        let name = self.name(container_id, ifname);
        call(
            &format!("detach container {container_id} ({name})"),
            self.client.del_container(&name),
        )
        .await
    }

    /// `CHECK`.
    async fn check(&self, params: &Params) -> Result<(), CniError> {
        let container_id = params.container_id()?;
        let ifname = params.ifname()?;
        let netns = params.netns()?;
        let publish = self.conf.port_mappings()?;
        let prev = self.conf.prev_result()?.ok_or_else(|| {
            CniError::config("CHECK needs prevResult, the result of the attachment's ADD")
        })?;
        let name = self.name(container_id, ifname);
        let broken = |what: String| {
            CniError::failed(
                format!("attachment of container {container_id} ({ifname}) is broken"),
                what,
            )
        };
        let (status, _) = self.agent_status().await?;
        let info = self.container(&name).await?.ok_or_else(|| {
            broken(format!(
                "the agent has no container {name}: it was deleted (ADD it again)"
            ))
        })?;
        let want_netns = netns::resolve(netns).unwrap_or_else(|_| PathBuf::from(netns));
        if !same_netns(&info.netns, &want_netns) || info.ifname != ifname {
            return Err(broken(format!(
                "the agent's container {name} is {} in {}, not {ifname} in {netns}",
                info.ifname,
                info.netns.display()
            )));
        }

        // The container's interface, as the previous result describes it.
        let index = prev
            .interfaces
            .iter()
            .position(|i| {
                i.name == ifname
                    && i.sandbox
                        .as_deref()
                        .is_some_and(|s| same_netns(Path::new(s), &want_netns))
            })
            .ok_or_else(|| {
                CniError::config(format!(
                    "prevResult lists no interface {ifname} with sandbox {netns}"
                ))
            })?;
        let want_addr = Ipv4Net::new(info.addr, 32).map_err(|e| broken(e.to_string()))?;
        for ip in prev.ips.iter().filter(|ip| ip.interface == Some(index)) {
            let addr: IpNet = ip.address.parse().map_err(|_| {
                CniError::config(format!(
                    "prevResult address {:?} is not an IP address in CIDR notation",
                    ip.address
                ))
            })?;
            let (want, want_gw) = match addr {
                IpNet::V4(_) => (IpNet::V4(want_addr), IpAddr::V4(info.gateway)),
                IpNet::V6(_) => match (info.addr6, info.gateway6) {
                    (Some(a), Some(g)) => (
                        IpNet::V6(Ipv6Net::new(a, 128).map_err(|e| broken(e.to_string()))?),
                        IpAddr::V6(g),
                    ),
                    _ => {
                        return Err(broken(format!(
                            "prevResult gives {ifname} the IPv6 address {addr}, the agent gave it none (it is IPv4-only now)"
                        )));
                    }
                },
            };
            if addr != want {
                return Err(broken(format!(
                    "prevResult gives {ifname} the address {addr}, the agent gave it {want}"
                )));
            }
            if let Some(gw) = &ip.gateway
                && gw.parse::<IpAddr>().ok() != Some(want_gw)
            {
                return Err(broken(format!(
                    "prevResult gives the gateway {gw}, the agent's is {want_gw}"
                )));
            }
        }

        // Inside the container: the namespace the agent recorded, by
        // identity (a reused path names another one).
        let recorded = info
            .netns_id
            .as_deref()
            .and_then(|id| id.parse::<netns::NetnsId>().ok());
        let ns = netns::Netns::open_expecting(&info.netns, recorded)
            .map_err(|e| broken(error_chain(&e)))?;
        let link = inspect::link_in(Some(&ns), ifname)
            .await
            .map_err(|e| broken(error_chain(&e)))?
            .ok_or_else(|| broken(format!("{ifname} is missing in {netns}")))?;
        if !link.up {
            return Err(broken(format!("{ifname} in {netns} is down")));
        }
        if let Some(mac) = &prev.interfaces[index].mac
            && !mac.eq_ignore_ascii_case(&format_mac(link.mac))
        {
            return Err(broken(format!(
                "{ifname} in {netns} has MAC {}, prevResult says {mac}",
                format_mac(link.mac)
            )));
        }
        if !link.addrs.contains(&(info.addr, 32)) {
            return Err(broken(format!(
                "{ifname} in {netns} lacks its address {want_addr} (it has {:?})",
                link.addrs
            )));
        }
        let gw_route = Ipv4Net::new(info.gateway, 32).map_err(|e| broken(e.to_string()))?;
        if !link
            .routes
            .iter()
            .any(|r| r.dst == gw_route && r.gateway.is_none())
        {
            return Err(broken(format!(
                "{ifname} in {netns} lacks the link route to the gateway {gw_route}"
            )));
        }
        if let (Some(addr6), Some(gateway6)) = (info.addr6, info.gateway6) {
            if !link.addrs6.contains(&(addr6, 128)) {
                return Err(broken(format!(
                    "{ifname} in {netns} lacks its IPv6 address {addr6}/128 (it has {:?})",
                    link.addrs6
                )));
            }
            if !link.routes6.contains(&(Ipv6Net::default(), Some(gateway6))) {
                return Err(broken(format!(
                    "{ifname} in {netns} lacks the IPv6 default route via {gateway6}"
                )));
            }
        }
        for route in &prev.routes {
            let dst: IpNet = route.dst.parse().map_err(|_| {
                CniError::config(format!(
                    "prevResult route {:?} is not a destination in CIDR notation",
                    route.dst
                ))
            })?;
            let gw = match &route.gw {
                Some(g) => Some(g.parse::<IpAddr>().map_err(|_| {
                    CniError::config(format!("prevResult route gateway {g:?} is not an address"))
                })?),
                None => match dst {
                    IpNet::V4(_) => Some(IpAddr::V4(info.gateway)),
                    IpNet::V6(_) => info.gateway6.map(IpAddr::V6),
                },
            };
            let present = match (dst, gw) {
                (IpNet::V4(d), Some(IpAddr::V4(g))) => link
                    .routes
                    .iter()
                    .any(|r| r.dst == d.trunc() && r.gateway == Some(g)),
                (IpNet::V6(d), Some(IpAddr::V6(g))) => link.routes6.contains(&(d.trunc(), Some(g))),
                _ => false,
            };
            if !present {
                return Err(broken(format!(
                    "{ifname} in {netns} lacks the route to {dst} via {}",
                    gw.map(|g| g.to_string()).unwrap_or_default()
                )));
            }
        }

        // The host end.
        let host = inspect::link(None, &info.host_ifname)
            .await
            .map_err(|e| broken(error_chain(&e)))?
            .ok_or_else(|| {
                broken(format!(
                    "the host-side veth {} is missing",
                    info.host_ifname
                ))
            })?;
        if host.kind != "veth" || !host.up {
            return Err(broken(format!(
                "the host-side link {} is a {:?} that is {}",
                info.host_ifname,
                host.kind,
                if host.up { "up" } else { "down" }
            )));
        }
        if let Some(mac) = prev
            .interfaces
            .iter()
            .find(|i| i.name == info.host_ifname && i.sandbox.is_none())
            .and_then(|i| i.mac.as_ref())
            && !mac.eq_ignore_ascii_case(&format_mac(host.mac))
        {
            return Err(broken(format!(
                "the host-side veth {} has MAC {}, prevResult says {mac}",
                info.host_ifname,
                format_mac(host.mac)
            )));
        }

        // Published ports.
        let want = mapping_set(&publish);
        let have: BTreeSet<String> = info
            .publish
            .iter()
            .map(|p| {
                p.parse::<PortMapping>()
                    .map_or_else(|_| p.clone(), |m| m.to_string())
            })
            .collect();
        if want != have {
            let missing: Vec<_> = want.difference(&have).collect();
            let extra: Vec<_> = have.difference(&want).collect();
            return Err(broken(format!(
                "published ports differ: missing {missing:?}, unexpected {extra:?}"
            )));
        }
        if !publish.is_empty() && status.uplink.is_none() {
            return Err(broken(
                "the agent has no uplink, so published ports are unreachable".to_owned(),
            ));
        }
        Ok(())
    }

    /// `GC`: removes the network's attachments that are not valid any more,
    /// going on after failures and reporting them all.
    async fn gc(&self) -> Result<(), CniError> {
        let valid = self.conf.valid_attachments()?;
        let keep: BTreeSet<String> = valid
            .iter()
            .map(|a| self.name(&a.container_id, &a.ifname))
            .collect();
        let prefix = network_prefix(&self.conf.name);
        let containers = call("list containers", self.client.containers()).await?;
        let mut errors = Vec::new();
        for c in containers
            .iter()
            .filter(|c| c.name.starts_with(&prefix) && !keep.contains(&c.name))
        {
            if let Err(e) = call(
                &format!("delete stale container {}", c.name),
                self.client.del_container(&c.name),
            )
            .await
            {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::failed(
                "GC could not remove every stale attachment",
                errors.join("; "),
            ))
        }
    }

    /// `STATUS`: the agent answers and has a free address.
    async fn status(&self) -> Result<(), CniError> {
        // Whatever keeps the agent from answering, ADD cannot succeed.
        let (status, pool) = self
            .agent_status()
            .await
            .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg, e.details))?;
        // Host addresses of the pool, minus the gateway.
        let hosts: u64 = match pool.prefix_len() {
            32 => 1,
            31 => 2,
            p => (1u64 << (32 - p)) - 2,
        };
        let capacity = hosts.saturating_sub(1);
        if status.containers as u64 >= capacity {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                "the datapath agent's pool is exhausted",
                format!(
                    "{} containers use all {capacity} addresses of {pool}",
                    status.containers
                ),
            ));
        }
        Ok(())
    }
}

/// What `ADD` asks the agent for attachment (`container_id`, `ifname`) in
/// `netns` under configuration `conf`: the container with its published
/// ports (`runtimeConfig.portMappings`), MTU, and rate limits
/// ([`NetConf::limits`]) on its cgroup ([`NetConf::cgroup`]).
pub fn attach_request(
    conf: &NetConf,
    container_id: &str,
    ifname: &str,
    netns: &str,
) -> Result<AddContainer, CniError> {
    let publish = conf.port_mappings()?;
    let limits = conf.limits()?;
    add_request(
        AddContainer {
            name: attachment_name(&conf.name, container_id, ifname),
            netns: netns.to_owned(),
            ifname: Some(ifname.to_owned()),
            publish: publish.iter().map(ToString::to_string).collect(),
            mtu: conf.mtu()?,
            ..AddContainer::default()
        },
        &limits,
        conf.cgroup(container_id),
    )
}

/// The agent request for an attachment with rate limits `limits` on cgroup
/// `cgroup`.
///
/// The limits travel under the agent API's field names (`cgroup`,
/// `ingress_rate`, `ingress_burst`, `egress_rate`, `egress_burst`, in tc's
/// units), set through JSON: an [`AddContainer`] without those fields
/// refuses them, and the attachment fails with code 2 instead of running
/// without its limits.
pub fn add_request(
    base: AddContainer,
    limits: &config::TcLimits,
    cgroup: Option<String>,
) -> Result<AddContainer, CniError> {
    if limits.is_empty() {
        return Ok(base);
    }
    let Some(cgroup) = cgroup else {
        return Err(CniError::config(
            "rate limits apply to the container's cgroup: declare the cgroupPath capability \
             (containerd and CRI-O pass it) or set \"cgroup\" in the plugin configuration \
             (e.g. \"/libpod_parent/libpod-{containerID}\" for podman)",
        ));
    };
    let mut request = serde_json::to_value(&base)
        .map_err(|e| CniError::failed("cannot build the agent request", e.to_string()))?;
    request["cgroup"] = cgroup.into();
    for (dir, limit) in [("ingress", &limits.ingress), ("egress", &limits.egress)] {
        if let Some(l) = limit {
            request[format!("{dir}_rate")] = l.rate.clone().into();
            if let Some(burst) = &l.burst {
                request[format!("{dir}_burst")] = burst.clone().into();
            }
        }
    }
    serde_json::from_value(request).map_err(|e| {
        CniError::unsupported(
            "bandwidth",
            limits,
            &format!("this build of the datapath cannot limit rates ({e})"),
        )
    })
}

/// Appends this plugin's result to a previous plugin's (renumbering the
/// interface indexes of its addresses).
fn merge(prev: Option<Success>, ours: Success) -> Success {
    let Some(mut out) = prev else {
        return ours;
    };
    let offset = out.interfaces.len();
    out.interfaces.extend(ours.interfaces);
    out.ips.extend(ours.ips.into_iter().map(|mut ip| {
        ip.interface = ip.interface.map(|i| i + offset);
        ip
    }));
    out.routes.extend(ours.routes);
    if out.dns.is_empty() {
        out.dns = ours.dns;
    }
    out.cni_version = ours.cni_version;
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn attachment_names_are_stable_valid_and_distinct() {
        let id = "3f0c1a2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
        let a = attachment_name("podman-dp", id, "eth0");
        // A fixed value: a change would orphan every existing attachment.
        assert_eq!(a, "cni-2c066063-3f0c1a2b4d5e-51cd9f1e60799f88");
        assert!(a.starts_with(&network_prefix("podman-dp")));
        assert!(a.starts_with("cni-"));
        assert!(a.contains("-3f0c1a2b4d5e-"), "{a}");
        // The agent takes it as a container name.
        crate::model::names::validate_container_name(&a).expect("a valid container name");
        assert_ne!(a, attachment_name("podman-dp", id, "eth1"));
        assert_ne!(a, attachment_name("other", id, "eth0"));
        assert_ne!(
            attachment_name("n", "ab", "c"),
            attachment_name("n", "a", "bc")
        );
        assert_ne!(network_prefix("a"), network_prefix("b"));
    }

    #[test]
    fn the_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&[b"foobar"]), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn commands_parse_exactly() {
        assert_eq!("ADD".parse::<Command>(), Ok(Command::Add));
        assert_eq!("STATUS".parse::<Command>(), Ok(Command::Status));
        assert!("add".parse::<Command>().is_err());
        assert!("".parse::<Command>().is_err());
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    fn error_of(out: &Output) -> types::ErrorResult {
        assert!(!out.success, "{}", out.stdout);
        serde_json::from_str(&out.stdout).expect("an error structure")
    }

    #[tokio::test]
    async fn version_echoes_a_supported_input_version_and_never_another() {
        let version_of = |out: &Output| -> VersionResult {
            assert!(out.success, "{}", out.stdout);
            serde_json::from_str(&out.stdout).expect("a version result")
        };
        for asked in ["1.0.0", "0.4.0", "0.3.1"] {
            let stdin = format!(r#"{{"cniVersion":"{asked}"}}"#);
            let v = version_of(&run(env(&[("CNI_COMMAND", "VERSION")]), stdin.as_bytes()).await);
            assert_eq!(v.cni_version, asked);
            assert_eq!(
                v.supported_versions,
                ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
            );
        }
        for asked in ["0.2.0", "2.0.0", "", "banana"] {
            let stdin = format!(r#"{{"cniVersion":"{asked}"}}"#);
            let v = version_of(&run(env(&[("CNI_COMMAND", "VERSION")]), stdin.as_bytes()).await);
            assert_eq!(v.cni_version, "1.1.0", "asked {asked:?}");
        }
        let v = version_of(&run(env(&[("CNI_COMMAND", "VERSION")]), b"").await);
        assert_eq!(v.cni_version, "1.1.0");
    }

    #[tokio::test]
    async fn environment_errors_name_the_variable() {
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"datapath-cni"}"#;
        let e = error_of(&run(env(&[]), conf).await);
        assert_eq!(
            (e.code, e.cni_version.as_str()),
            (code::INVALID_ENV, "1.0.0")
        );
        assert!(e.msg.contains("CNI_COMMAND"), "{e:?}");
        let e = error_of(&run(env(&[("CNI_COMMAND", "FROB")]), conf).await);
        assert_eq!(e.code, code::INVALID_ENV);
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ];
        let e = error_of(&run(env(&add), conf).await);
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.details.contains("CNI_CONTAINERID"), "{e:?}");
        let mut bad = add.to_vec();
        bad.push(("CNI_CONTAINERID", "-bad/id"));
        let e = error_of(&run(env(&bad), conf).await);
        assert!(e.details.contains("CNI_CONTAINERID"), "{e:?}");
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "way-too-long-ifname"),
        ];
        let e = error_of(&run(env(&del), conf).await);
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.details.contains("CNI_IFNAME"), "{e:?}");
    }

    #[tokio::test]
    async fn unsupported_versions_and_1_0_gc_are_incompatible() {
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        for old in ["0.1.0", "0.2.0"] {
            let conf = format!(r#"{{"cniVersion":"{old}","name":"n","type":"datapath-cni"}}"#);
            let e = error_of(&run(env(&del), conf.as_bytes()).await);
            assert_eq!(
                (e.code, e.cni_version.as_str()),
                (code::INCOMPATIBLE_VERSION, "1.1.0")
            );
        }
        // 0.3.x has no CHECK.
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ];
        let e = error_of(
            &run(
                env(&check),
                br#"{"cniVersion":"0.3.1","name":"n","type":"datapath-cni"}"#,
            )
            .await,
        );
        assert_eq!(
            (e.code, e.cni_version.as_str()),
            (code::INCOMPATIBLE_VERSION, "0.3.1")
        );
        assert!(e.details.contains("0.4.0"), "{e:?}");
        let e = error_of(
            &run(
                env(&[("CNI_COMMAND", "GC")]),
                br#"{"cniVersion":"1.0.0","name":"n","cni.dev/valid-attachments":[]}"#,
            )
            .await,
        );
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }

    #[tokio::test]
    async fn an_unreachable_agent_is_try_again_later_and_status_unavailable() {
        let conf =
            br#"{"cniVersion":"1.1.0","name":"n","agentSocket":"/nonexistent/dpt-api.sock"}"#;
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        let e = error_of(&run(env(&del), conf).await);
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e:?}");
        assert!(e.details.contains("/nonexistent/dpt-api.sock"), "{e:?}");
        let e = error_of(&run(env(&[("CNI_COMMAND", "STATUS")]), conf).await);
        assert_eq!(e.code, code::NOT_AVAILABLE, "{e:?}");
    }

    #[test]
    fn the_example_conflists_are_valid_for_an_agent_with_the_default_pool() {
        let examples = [
            include_str!("../../../examples/cni/podman.conflist"),
            include_str!("../../../examples/cni/containerd.conflist"),
            include_str!("../../../examples/cni/kubernetes.conflist"),
        ];
        for text in examples {
            let list: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
            let plugins = list["plugins"].as_array().expect("a plugin list");
            assert_eq!(plugins.len(), 1, "{list}");
            assert_eq!(plugins[0]["type"], "datapath-cni");
            // What a runtime hands the plugin: the plugin object with the
            // list's version and name.
            let mut request = plugins[0].clone();
            request["cniVersion"] = list["cniVersion"].clone();
            request["name"] = list["name"].clone();
            let conf = NetConf::parse(request.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(types::is_supported(&conf.cni_version));
            assert_eq!(
                conf.agent_socket(),
                PathBuf::from(crate::api::DEFAULT_SOCKET)
            );
            conf.check_ipam(
                "10.88.0.0/16".parse().expect("pool"),
                Ipv4Addr::new(10, 88, 0, 1),
                None,
            )
            .unwrap_or_else(|e| panic!("{e}: {text}"));
            for v in list["cniVersions"].as_array().into_iter().flatten() {
                assert!(types::is_supported(v.as_str().unwrap_or_default()), "{v}");
            }
        }
    }

    fn request() -> AddContainer {
        AddContainer {
            name: "cni-x".into(),
            netns: "/run/netns/x".into(),
            ifname: Some("eth0".into()),
            publish: vec!["8080:80/tcp".into()],
            ..AddContainer::default()
        }
    }

    #[test]
    fn without_limits_the_request_is_the_plain_one() {
        let r = add_request(request(), &config::TcLimits::default(), Some("/x".into()))
            .expect("no limits");
        assert_eq!(r, request());
    }

    #[test]
    fn limits_without_a_cgroup_are_an_invalid_config() {
        let limits = config::TcLimits {
            egress: Some(config::TcLimit {
                rate: "1000bit".into(),
                burst: Some("100b".into()),
            }),
            ingress: None,
        };
        let e = add_request(request(), &limits, None).expect_err("no cgroup");
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("cgroupPath"), "{e}");
    }

    #[test]
    fn a_chained_result_keeps_the_previous_interfaces() {
        let prev = Success {
            cni_version: "1.0.0".into(),
            interfaces: vec![Interface {
                name: "lo0".into(),
                ..Interface::default()
            }],
            ips: vec![IpConfig {
                address: "198.18.9.9/32".into(),
                gateway: None,
                interface: Some(0),
                ..IpConfig::default()
            }],
            routes: vec![],
            dns: types::Dns {
                nameservers: vec!["198.18.0.53".into()],
                ..types::Dns::default()
            },
        };
        let ours = Success {
            cni_version: "1.0.0".into(),
            interfaces: vec![
                Interface {
                    name: "dp1".into(),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: Some("/x".into()),
                    ..Interface::default()
                },
            ],
            ips: vec![IpConfig {
                address: "198.19.0.2/32".into(),
                gateway: Some("198.19.0.1".into()),
                interface: Some(1),
                ..IpConfig::default()
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                ..Route::default()
            }],
            dns: types::Dns::default(),
        };
        let m = merge(Some(prev), ours);
        assert_eq!(m.interfaces.len(), 3);
        assert_eq!(m.ips[1].interface, Some(2));
        assert_eq!(m.interfaces[2].name, "eth0");
        assert_eq!(m.dns.nameservers, ["198.18.0.53"]);
        assert_eq!(m.routes.len(), 1);
    }

    /// What containerd's CRI hands the plugin for a Kubernetes pod with
    /// `kubernetes.io/ingress-bandwidth: 10M`,
    /// `kubernetes.io/egress-bandwidth: 20M`, a `hostPort` with a `hostIP`,
    /// under the systemd cgroup driver: the `bandwidth` capability with
    /// each rate and the burst 2^32 - 1 bits ("none given"), and the pod's
    /// cgroup parent as `cgroupPath` (containerd 1.7 and later).
    #[test]
    fn kubernetes_bandwidth_annotations_through_containerds_cri_reach_the_agent() {
        let stdin = br#"{
            "cniVersion": "1.0.0",
            "name": "k8s-datapath",
            "type": "datapath-cni",
            "agentSocket": "/run/datapath/api.sock",
            "ipam": {"type": "datapath"},
            "capabilities": {"portMappings": true, "bandwidth": true, "cgroupPath": true},
            "runtimeConfig": {
                "portMappings": [
                    {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "198.18.0.2"}
                ],
                "bandwidth": {
                    "ingressRate": 10000000, "ingressBurst": 4294967295,
                    "egressRate": 20000000, "egressBurst": 4294967295
                },
                "cgroupPath": "kubepods-besteffort-pod0a1b2c3d.slice"
            }
        }"#;
        let conf = NetConf::parse(stdin).expect("valid");
        let id = "5d1a0c9e8f7b6a5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d";
        let req = attach_request(&conf, id, "eth0", "/var/run/netns/cni-1234").expect("valid");
        let want: AddContainer = serde_json::from_value(serde_json::json!({
            "name": attachment_name("k8s-datapath", id, "eth0"),
            "netns": "/var/run/netns/cni-1234",
            "ifname": "eth0",
            "publish": ["198.18.0.2:8080:80/tcp"],
            "cgroup": "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d.slice",
            "ingress_rate": "10000000bit",
            "egress_rate": "20000000bit",
        }))
        .expect("a valid request");
        // No burst: the agent's default bucket for the rate, not 512 MiB.
        assert_eq!(req, want);
        // With the cgroupfs driver the parent is a path.
        let stdin = String::from_utf8_lossy(stdin).replace(
            "kubepods-besteffort-pod0a1b2c3d.slice",
            "/kubepods/besteffort/pod0a1b2c3d",
        );
        let conf = NetConf::parse(stdin.as_bytes()).expect("valid");
        let req = attach_request(&conf, id, "eth0", "/var/run/netns/cni-1234").expect("valid");
        assert_eq!(
            req.cgroup.as_deref(),
            Some("/kubepods/besteffort/pod0a1b2c3d")
        );
        // A burst the runtime did give is kept (bits to bytes).
        let stdin = stdin.replace("\"egressBurst\": 4294967295", "\"egressBurst\": 800000");
        let conf = NetConf::parse(stdin.as_bytes()).expect("valid");
        let req = attach_request(&conf, id, "eth0", "/x").expect("valid");
        assert_eq!(req.egress_burst.as_deref(), Some("100000b"));
        assert_eq!(req.ingress_burst, None);
    }
}
