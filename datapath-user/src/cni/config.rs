//! The plugin's network configuration (stdin) and its validation.
//!
//! ```json
//! {
//!   "cniVersion": "1.1.0",
//!   "name": "datapath",
//!   "type": "datapath-cni",
//!   "agentSocket": "/run/datapath/api.sock",
//!   "ipam": { "type": "datapath", "ranges": [[{ "subnet": "10.88.0.0/16" }]] },
//!   "dns": { "nameservers": ["10.88.0.1"] },
//!   "mtu": 1450,
//!   "capabilities": { "portMappings": true, "bandwidth": true, "cgroupPath": true },
//!   "egressRate": 10000000, "egressBurst": 800000,
//!   "cgroup": "/libpod_parent/libpod-{containerID}"
//! }
//! ```
//!
//! Unknown keys are ignored, as the specification asks of plugins that
//! share a configuration with others.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::types::{CniError, Dns, Success};
use crate::{
    api::DEFAULT_SOCKET,
    model::{GATEWAY6, PortMapping, Protocol, mtu::validate_mtu},
};

/// The placeholder for the container id in the `cgroup` template.
pub const CONTAINER_ID_PLACEHOLDER: &str = "{containerID}";

/// A network configuration as the runtime hands it to the plugin.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The protocol version in use.
    pub cni_version: String,
    /// The network's name.
    pub name: String,
    /// The plugin's binary name.
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    /// The agent's API socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Host-local-style address ranges; they must restate the agent's pool.
    #[serde(default)]
    pub ipam: Option<Ipam>,
    /// DNS settings handed to the container in the result.
    #[serde(default)]
    pub dns: Option<Dns>,
    /// The MTU of the container's interface and its host end (default:
    /// the agent's `--mtu`, else the uplink's).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Per-attachment arguments from the runtime (capabilities).
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// Rate limits for the whole network, as the `bandwidth` plugin takes
    /// them (they win over `runtimeConfig.bandwidth`).
    #[serde(flatten)]
    pub bandwidth: BandwidthConf,
    /// The container's cgroup v2 path (relative to the cgroup2 mount), with
    /// `{containerID}` replaced by the container id; rate limits apply to
    /// it. `runtimeConfig.cgroupPath` wins over it.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The result of the previous plugin (`ADD` in a chain, `CHECK`, `DEL`).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// `GC`: the attachments that are still valid (`null` for none).
    #[serde(
        default,
        rename = "cni.dev/valid-attachments",
        deserialize_with = "present"
    )]
    pub valid_attachments: Option<Option<Vec<Attachment>>>,
}

/// Deserializes a key that is present (even as `null`) to `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The `ipam` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ipam {
    /// `datapath` or `host-local` (the ranges are honoured by the agent,
    /// no IPAM plugin is executed); absent means the agent's pool.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// A single subnet (host-local's old form).
    #[serde(default)]
    pub subnet: Option<String>,
    /// First address of the single subnet's range.
    #[serde(default)]
    pub range_start: Option<String>,
    /// Last address of the single subnet's range.
    #[serde(default)]
    pub range_end: Option<String>,
    /// Gateway of the single subnet.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Range sets: one address is allocated from each set.
    #[serde(default)]
    pub ranges: Vec<Vec<Range>>,
    /// Routes to install.
    #[serde(default)]
    pub routes: Vec<RouteConf>,
}

/// One host-local range.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Range {
    /// The subnet.
    pub subnet: String,
    /// First address to hand out.
    #[serde(default)]
    pub range_start: Option<String>,
    /// Last address to hand out.
    #[serde(default)]
    pub range_end: Option<String>,
    /// The subnet's gateway.
    #[serde(default)]
    pub gateway: Option<String>,
}

/// One route of the `ipam` section.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RouteConf {
    /// Destination.
    pub dst: String,
    /// Next hop.
    #[serde(default)]
    pub gw: Option<String>,
}

/// `runtimeConfig`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The `portMappings` capability.
    #[serde(default)]
    pub port_mappings: Vec<PortMapEntry>,
    /// The `bandwidth` capability.
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
    /// The `cgroupPath` capability.
    #[serde(default)]
    pub cgroup_path: Option<String>,
}

/// One entry of `portMappings`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapEntry {
    /// Port on the node.
    pub host_port: i64,
    /// Port in the container.
    pub container_port: i64,
    /// `tcp` (the default) or `udp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Node address to publish on; empty or `0.0.0.0` for all.
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<String>,
}

/// Rate limits in the `bandwidth` capability's units: bits per second and
/// bits; zero means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    /// Towards the container, bits/s.
    #[serde(default)]
    pub ingress_rate: u64,
    /// Towards the container, bits.
    #[serde(default)]
    pub ingress_burst: u64,
    /// From the container, bits/s.
    #[serde(default)]
    pub egress_rate: u64,
    /// From the container, bits.
    #[serde(default)]
    pub egress_burst: u64,
}

/// The plugin-level rate limit keys (each optional).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthConf {
    /// Towards the container, bits/s.
    #[serde(default)]
    pub ingress_rate: Option<u64>,
    /// Towards the container, bits.
    #[serde(default)]
    pub ingress_burst: Option<u64>,
    /// From the container, bits/s.
    #[serde(default)]
    pub egress_rate: Option<u64>,
    /// From the container, bits.
    #[serde(default)]
    pub egress_burst: Option<u64>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// `CNI_CONTAINERID` of the attachment's `ADD`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME` of the attachment's `ADD`.
    pub ifname: String,
}

/// One direction's limit in the agent API's units (tc's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcLimit {
    /// Rate, e.g. `1000000bit`.
    pub rate: String,
    /// Burst in bytes, e.g. `8000b`; `None`: the agent's default for the
    /// rate.
    pub burst: Option<String>,
}

/// The burst containerd's CRI sends with each rate it takes from a pod's
/// `kubernetes.io/ingress-bandwidth` or `egress-bandwidth` annotation:
/// 2^32 - 1 bits, meaning "none given". The agent then picks its default
/// bucket for the rate (a 512 MiB bucket would let the first 512 MiB
/// through unlimited).
pub const CRI_UNSPECIFIED_BURST: u64 = u32::MAX as u64;

/// Both directions' limits, in the agent API's units.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcLimits {
    /// Towards the container.
    pub ingress: Option<TcLimit>,
    /// From the container.
    pub egress: Option<TcLimit>,
}

impl TcLimits {
    /// Whether no direction is limited.
    pub fn is_empty(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none()
    }
}

impl std::fmt::Display for TcLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [("ingress", &self.ingress), ("egress", &self.egress)]
            .into_iter()
            .filter_map(|(dir, l)| {
                l.as_ref().map(|l| match &l.burst {
                    Some(b) => format!("{dir} {} burst {b}", l.rate),
                    None => format!("{dir} {}", l.rate),
                })
            })
            .collect();
        if parts.is_empty() {
            f.write_str("no limits")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Whether `name` is a valid network name or container id: an
/// alphanumeric character, then alphanumerics, `_`, `.` or `-`.
pub fn is_valid_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl NetConf {
    /// Decodes a configuration: malformed JSON is code 6, a wrong shape
    /// (a missing key, a string where a number belongs) code 7.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                super::types::code::DECODE,
                "cannot decode the network configuration",
                format!("stdin is not JSON: {e}"),
            )
        })?;
        let conf: NetConf = serde_json::from_value(value)
            .map_err(|e| CniError::config(format!("network configuration: {e}")))?;
        if !is_valid_identifier(&conf.name) {
            return Err(CniError::config(format!(
                "name {:?}: a network name starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
                conf.name
            )));
        }
        if let Some(socket) = &conf.agent_socket
            && !socket.is_absolute()
        {
            return Err(CniError::config(format!(
                "agentSocket {:?}: give the absolute path of the agent's API socket",
                socket.display()
            )));
        }
        Ok(conf)
    }

    /// The agent's socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// `runtimeConfig.portMappings` as the agent's publish specs, checked
    /// and without duplicates.
    pub fn port_mappings(&self) -> Result<Vec<PortMapping>, CniError> {
        let mut out: Vec<PortMapping> = Vec::new();
        for (i, entry) in self.runtime_config.port_mappings.iter().enumerate() {
            let key = |field: &str| format!("runtimeConfig.portMappings[{i}].{field}");
            let port = |field: &str, value: i64| {
                u16::try_from(value)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        CniError::config(format!("{} = {value}: ports are 1-65535", key(field)))
                    })
            };
            let host_port = port("hostPort", entry.host_port)?;
            let container_port = port("containerPort", entry.container_port)?;
            let protocol = match entry
                .protocol
                .as_deref()
                .unwrap_or("tcp")
                .to_ascii_lowercase()
                .as_str()
            {
                "" | "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    return Err(CniError::unsupported(
                        &key("protocol"),
                        format!("{other:?}"),
                        "only tcp and udp ports can be published",
                    ));
                }
            };
            let host_ip = match entry.host_ip.as_deref().unwrap_or("") {
                "" => None,
                text => match text.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) => (!ip.is_unspecified()).then_some(ip),
                    Ok(IpAddr::V6(_)) => {
                        return Err(CniError::unsupported(
                            &key("hostIP"),
                            format!("{text:?}"),
                            "the datapath publishes IPv4 addresses only",
                        ));
                    }
                    Err(_) => {
                        return Err(CniError::config(format!(
                            "{} = {text:?}: not an IP address",
                            key("hostIP")
                        )));
                    }
                },
            };
            let mapping = PortMapping {
                host_ip,
                host_port,
                container_port,
                count: 1,
                protocol,
            };
            if !out.contains(&mapping) {
                out.push(mapping);
            }
        }
        Ok(out)
    }

    /// The MTU asked for, checked.
    pub fn mtu(&self) -> Result<Option<u32>, CniError> {
        self.mtu
            .map(|m| validate_mtu(m).map_err(CniError::config))
            .transpose()
    }

    /// The requested rate limits: the plugin-level keys if any is set,
    /// else `runtimeConfig.bandwidth`; checked (a rate needs a burst and
    /// the other way round) and converted to the agent's units.
    pub fn limits(&self) -> Result<TcLimits, CniError> {
        let b = self.bandwidth;
        let plugin_level = b.ingress_rate.is_some()
            || b.ingress_burst.is_some()
            || b.egress_rate.is_some()
            || b.egress_burst.is_some();
        let (bw, prefix) = if plugin_level {
            (
                Bandwidth {
                    ingress_rate: b.ingress_rate.unwrap_or(0),
                    ingress_burst: b.ingress_burst.unwrap_or(0),
                    egress_rate: b.egress_rate.unwrap_or(0),
                    egress_burst: b.egress_burst.unwrap_or(0),
                },
                "",
            )
        } else {
            (
                self.runtime_config.bandwidth.unwrap_or_default(),
                "runtimeConfig.bandwidth.",
            )
        };
        Ok(TcLimits {
            ingress: limit(prefix, "ingress", bw.ingress_rate, bw.ingress_burst)?,
            egress: limit(prefix, "egress", bw.egress_rate, bw.egress_burst)?,
        })
    }

    /// The cgroup the rate limits apply to, relative to the cgroup2 mount:
    /// `runtimeConfig.cgroupPath`, else the `cgroup` template with the
    /// container id filled in.
    /// A systemd slice name (what runtimes using the systemd cgroup driver
    /// pass, e.g. `kubepods-burstable-pod1.slice`) becomes its path.
    pub fn cgroup(&self, container_id: &str) -> Option<String> {
        self.runtime_config
            .cgroup_path
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(expand_slice)
            .or_else(|| {
                self.cgroup
                    .as_ref()
                    .map(|t| t.replace(CONTAINER_ID_PLACEHOLDER, container_id))
            })
    }

    /// Checks the `ipam` section against the agent's pools and gateways:
    /// the agent allocates every address, so the section may only restate
    /// them (one IPv4 range whose subnet is the pool, the pool's gateway;
    /// on a dual-stack agent, `pool6`, also one IPv6 range whose subnet is
    /// the IPv6 pool; the default routes).
    pub fn check_ipam(
        &self,
        pool: Ipv4Net,
        gateway: Ipv4Addr,
        pool6: Option<Ipv6Net>,
    ) -> Result<(), CniError> {
        let Some(ipam) = &self.ipam else {
            return Ok(());
        };
        match ipam.kind.as_deref() {
            None | Some("datapath" | "host-local") => {}
            Some(other) => {
                return Err(CniError::unsupported(
                    "ipam.type",
                    format!("{other:?}"),
                    "the datapath agent allocates addresses itself; use \"datapath\" (or \"host-local\" ranges restating the agent's pool) or leave ipam out",
                ));
            }
        }
        let mut ranges: Vec<(String, Range)> = Vec::new();
        if let Some(subnet) = &ipam.subnet {
            ranges.push((
                "ipam".to_owned(),
                Range {
                    subnet: subnet.clone(),
                    range_start: ipam.range_start.clone(),
                    range_end: ipam.range_end.clone(),
                    gateway: ipam.gateway.clone(),
                },
            ));
        }
        for (i, set) in ipam.ranges.iter().enumerate() {
            for (j, r) in set.iter().enumerate() {
                ranges.push((format!("ipam.ranges[{i}][{j}]"), r.clone()));
            }
        }
        let (mut v4, mut v6) = (0, 0);
        for (key, r) in &ranges {
            let subnet: IpNet = r.subnet.parse().map_err(|_| {
                CniError::config(format!(
                    "{key}.subnet = {:?}: not a subnet in CIDR notation",
                    r.subnet
                ))
            })?;
            match subnet {
                IpNet::V4(subnet) => {
                    v4 += 1;
                    if subnet.trunc() != pool {
                        return Err(CniError::config(format!(
                            "{key}.subnet = {subnet} differs from the agent's pool {pool}: make it {pool} (the agent allocates every address) or start the agent with --pool {subnet}"
                        )));
                    }
                }
                IpNet::V6(subnet) => {
                    v6 += 1;
                    let Some(pool6) = pool6 else {
                        return Err(CniError::unsupported(
                            &format!("{key}.subnet"),
                            subnet,
                            "the datapath agent is IPv4-only: start it with --pool6 for IPv6 addresses",
                        ));
                    };
                    if subnet.trunc() != pool6 {
                        return Err(CniError::config(format!(
                            "{key}.subnet = {subnet} differs from the agent's IPv6 pool {pool6}: make it {pool6} (the agent allocates every address) or start the agent with --pool6 {subnet}"
                        )));
                    }
                }
            }
            for (field, value) in [("rangeStart", &r.range_start), ("rangeEnd", &r.range_end)] {
                if let Some(v) = value {
                    return Err(CniError::unsupported(
                        &format!("{key}.{field}"),
                        format!("{v:?}"),
                        "the agent allocates from its whole pool",
                    ));
                }
            }
            if let Some(gw) = &r.gateway {
                let ok = match subnet {
                    IpNet::V4(_) => gw.parse::<Ipv4Addr>().ok() == Some(gateway),
                    IpNet::V6(_) => gw.parse::<Ipv6Addr>().ok() == Some(GATEWAY6),
                };
                if !ok {
                    let theirs = match subnet {
                        IpNet::V4(_) => gateway.to_string(),
                        IpNet::V6(_) => GATEWAY6.to_string(),
                    };
                    return Err(CniError::config(format!(
                        "{key}.gateway = {gw:?}: the agent's gateway is {theirs}"
                    )));
                }
            }
        }
        if v4 > 1 || v6 > 1 {
            return Err(CniError::unsupported(
                "ipam.ranges",
                format!("{} ranges", ranges.len()),
                "give one IPv4 range (and, on a dual-stack agent, one IPv6 range): the agent assigns one address per family and attachment from its pools",
            ));
        }
        for (i, route) in ipam.routes.iter().enumerate() {
            let dst: Option<IpNet> = route.dst.parse().ok();
            let ok = match dst {
                Some(IpNet::V4(d)) => {
                    d == Ipv4Net::default()
                        && route
                            .gw
                            .as_deref()
                            .is_none_or(|g| g.parse::<Ipv4Addr>().ok() == Some(gateway))
                }
                Some(IpNet::V6(d)) => {
                    pool6.is_some()
                        && d == Ipv6Net::default()
                        && route
                            .gw
                            .as_deref()
                            .is_none_or(|g| g.parse::<Ipv6Addr>().ok() == Some(GATEWAY6))
                }
                None => false,
            };
            if !ok {
                return Err(CniError::unsupported(
                    &format!("ipam.routes[{i}]"),
                    format!("{{dst: {:?}, gw: {:?}}}", route.dst, route.gw),
                    "containers get exactly one route per family, the default route via the agent's gateway",
                ));
            }
        }
        Ok(())
    }

    /// `prevResult`, decoded.
    pub fn prev_result(&self) -> Result<Option<Success>, CniError> {
        self.prev_result
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| {
                serde_json::from_value::<Success>(v.clone()).map_err(|e| {
                    CniError::new(
                        super::types::code::DECODE,
                        "cannot decode prevResult",
                        e.to_string(),
                    )
                })
            })
            .transpose()
    }

    /// `GC`: the valid attachments (the key must be present; `null` is an
    /// empty list).
    pub fn valid_attachments(&self) -> Result<BTreeSet<Attachment>, CniError> {
        match &self.valid_attachments {
            None => Err(CniError::config(
                "GC needs the cni.dev/valid-attachments key (an empty list if no attachment is valid)",
            )),
            Some(list) => Ok(list.iter().flatten().cloned().collect()),
        }
    }
}

/// Expands a systemd slice name to its cgroup path the way systemd nests
/// slices: `a-b-c.slice` is `/a.slice/a-b.slice/a-b-c.slice`, `-.slice` the
/// root. Anything else (a path) is returned unchanged.
pub fn expand_slice(cgroup: &str) -> String {
    let Some(stem) = cgroup.strip_suffix(".slice") else {
        return cgroup.to_owned();
    };
    if cgroup.contains('/') {
        return cgroup.to_owned();
    }
    if stem == "-" {
        return "/".to_owned();
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in stem.split('-').filter(|p| !p.is_empty()) {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push('/');
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    path
}

/// One direction's limit: both zero is none; one without the other is an
/// error; bursts become whole bytes.
fn limit(prefix: &str, dir: &str, rate: u64, burst: u64) -> Result<Option<TcLimit>, CniError> {
    match (rate, burst) {
        (0, 0) => Ok(None),
        (_, 0) | (0, _) => Err(CniError::config(format!(
            "{prefix}{dir}Rate = {rate}, {prefix}{dir}Burst = {burst}: set both (bits/s and bits) or neither"
        ))),
        (rate, CRI_UNSPECIFIED_BURST) => Ok(Some(TcLimit {
            rate: format!("{rate}bit"),
            burst: None,
        })),
        (_, _) if burst / 8 >= u64::from(u32::MAX) => Err(CniError::config(format!(
            "{prefix}{dir}Burst = {burst}: bursts are below 4 GiB"
        ))),
        (rate, burst) => Ok(Some(TcLimit {
            rate: format!("{rate}bit"),
            burst: Some(format!("{}b", burst.div_ceil(8))),
        })),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{super::types::code, *};

    fn conf(v: serde_json::Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    fn base() -> serde_json::Value {
        json!({"cniVersion": "1.0.0", "name": "dp", "type": "datapath-cni"})
    }

    fn with(mut v: serde_json::Value, key: &str, value: serde_json::Value) -> serde_json::Value {
        v[key] = value;
        v
    }

    const POOL: &str = "198.19.0.0/24";

    fn pool() -> Ipv4Net {
        POOL.parse().expect("valid")
    }

    fn gw() -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, 1)
    }

    #[test]
    fn malformed_json_is_a_decoding_failure_and_a_wrong_shape_an_invalid_config() {
        let e = NetConf::parse(b"{not json").expect_err("malformed");
        assert_eq!(e.code, code::DECODE);
        let e = conf(json!({"cniVersion": "1.0.0"})).expect_err("no name");
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("name"), "{e}");
        let e = conf(with(base(), "agentSocket", json!(5))).expect_err("number");
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn network_names_and_sockets_are_checked() {
        for bad in ["", "-x", "a/b", "a b"] {
            let e = conf(with(base(), "name", json!(bad))).expect_err(bad);
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
        }
        let e = conf(with(base(), "agentSocket", json!("api.sock"))).expect_err("relative");
        assert_eq!(e.code, code::INVALID_CONFIG);
        let c = conf(base()).expect("valid");
        assert_eq!(c.agent_socket(), PathBuf::from(DEFAULT_SOCKET));
        let c = conf(with(base(), "agentSocket", json!("/tmp/x.sock"))).expect("valid");
        assert_eq!(c.agent_socket(), PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn port_mappings_become_publish_specs() {
        let c = conf(with(
            base(),
            "runtimeConfig",
            json!({"portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "UDP", "hostIP": "198.18.0.2"},
                {"hostPort": 9000, "containerPort": 9000, "hostIP": "0.0.0.0"},
            ]}),
        ))
        .expect("valid");
        let specs: Vec<String> = c
            .port_mappings()
            .expect("valid")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            specs,
            ["8080:80/tcp", "198.18.0.2:5353:53/udp", "9000:9000/tcp"]
        );
    }

    #[test]
    fn bad_port_mappings_are_refused_with_their_key() {
        let cases = [
            (
                json!({"hostPort": 0, "containerPort": 80}),
                code::INVALID_CONFIG,
                "hostPort",
            ),
            (
                json!({"hostPort": 70000, "containerPort": 80}),
                code::INVALID_CONFIG,
                "hostPort",
            ),
            (
                json!({"hostPort": 80, "containerPort": -1}),
                code::INVALID_CONFIG,
                "containerPort",
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "protocol": "sctp"}),
                code::UNSUPPORTED_FIELD,
                "protocol",
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "hostIP": "::"}),
                code::UNSUPPORTED_FIELD,
                "hostIP",
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "hostIP": "x"}),
                code::INVALID_CONFIG,
                "hostIP",
            ),
        ];
        for (entry, want, key) in cases {
            let c = conf(with(
                base(),
                "runtimeConfig",
                json!({"portMappings": [entry]}),
            ))
            .expect("decodes");
            let e = c.port_mappings().expect_err("refused");
            assert_eq!(e.code, want, "{e}");
            assert!(e.details.contains(&format!("portMappings[0].{key}")), "{e}");
        }
    }

    #[test]
    fn bandwidth_comes_from_the_plugin_keys_first_then_runtime_config() {
        let rc = json!({"bandwidth": {"ingressRate": 1_000_000, "ingressBurst": 64_000, "egressRate": 0, "egressBurst": 0}});
        let c = conf(with(base(), "runtimeConfig", rc.clone())).expect("valid");
        assert_eq!(
            c.limits().expect("valid"),
            TcLimits {
                ingress: Some(TcLimit {
                    rate: "1000000bit".into(),
                    burst: Some("8000b".into())
                }),
                egress: None,
            }
        );
        let mut v = with(base(), "runtimeConfig", rc);
        v["egressRate"] = json!(8_000_000);
        v["egressBurst"] = json!(12_345);
        let c = conf(v).expect("valid");
        assert_eq!(
            c.limits().expect("valid"),
            TcLimits {
                ingress: None,
                egress: Some(TcLimit {
                    rate: "8000000bit".into(),
                    burst: Some("1544b".into())
                }),
            }
        );
        assert!(
            conf(base())
                .expect("valid")
                .limits()
                .expect("valid")
                .is_empty()
        );
    }

    #[test]
    fn a_rate_without_a_burst_is_an_invalid_config() {
        let e = conf(with(base(), "ingressRate", json!(1000)))
            .expect("decodes")
            .limits()
            .expect_err("no burst");
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("ingressBurst"), "{e}");
        let e = conf(with(
            base(),
            "runtimeConfig",
            json!({"bandwidth": {"egressBurst": 1000}}),
        ))
        .expect("decodes")
        .limits()
        .expect_err("no rate");
        assert!(
            e.details.contains("runtimeConfig.bandwidth.egressRate"),
            "{e}"
        );
        let e = conf(with(
            with(base(), "egressRate", json!(1)),
            "egressBurst",
            json!(u64::from(u32::MAX) * 8),
        ))
        .expect("decodes")
        .limits()
        .expect_err("huge burst");
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn the_cgroup_comes_from_runtime_config_then_the_template() {
        let c = conf(with(base(), "cgroup", json!("/x/libpod-{containerID}"))).expect("valid");
        assert_eq!(c.cgroup("abc").as_deref(), Some("/x/libpod-abc"));
        let mut v = with(base(), "cgroup", json!("/x/libpod-{containerID}"));
        v["runtimeConfig"] = json!({"cgroupPath": "/kubepods/pod1"});
        assert_eq!(
            conf(v).expect("valid").cgroup("abc").as_deref(),
            Some("/kubepods/pod1")
        );
        assert_eq!(conf(base()).expect("valid").cgroup("abc"), None);
    }

    #[test]
    fn systemd_slices_expand_to_their_paths() {
        assert_eq!(
            expand_slice("kubepods-burstable-pod1_2.slice"),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice"
        );
        assert_eq!(expand_slice("machine.slice"), "/machine.slice");
        assert_eq!(expand_slice("-.slice"), "/");
        assert_eq!(expand_slice("/kubepods/pod1"), "/kubepods/pod1");
        assert_eq!(expand_slice("/a.slice/b.slice"), "/a.slice/b.slice");
        let mut v = base();
        v["runtimeConfig"] = json!({"cgroupPath": "kubepods-pod9.slice"});
        assert_eq!(
            conf(v).expect("valid").cgroup("x").as_deref(),
            Some("/kubepods.slice/kubepods-pod9.slice")
        );
    }

    #[test]
    fn ipam_restating_the_pool_is_accepted() {
        for ipam in [
            json!({"type": "datapath"}),
            json!({"type": "host-local", "subnet": POOL, "gateway": "198.19.0.1"}),
            json!({"ranges": [[{"subnet": "198.19.0.7/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}),
            json!({"type": "host-local", "ranges": [[{"subnet": POOL, "gateway": "198.19.0.1"}]],
                   "routes": [{"dst": "0.0.0.0/0", "gw": "198.19.0.1"}]}),
        ] {
            let c = conf(with(base(), "ipam", ipam.clone())).expect("decodes");
            c.check_ipam(pool(), gw(), None)
                .unwrap_or_else(|e| panic!("{ipam}: {e}"));
        }
    }

    #[test]
    fn a_dual_stack_agent_takes_one_range_per_family() {
        let pool6: Ipv6Net = "fd00:db8:19::/64".parse().expect("a prefix");
        let both = json!({"type": "host-local",
            "ranges": [[{"subnet": POOL}], [{"subnet": "fd00:db8:19::/64", "gateway": "fe80::1"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fe80::1"}]});
        let c = conf(with(base(), "ipam", both)).expect("decodes");
        c.check_ipam(pool(), gw(), Some(pool6))
            .expect("both pools restated");
        let e = c
            .check_ipam(pool(), gw(), None)
            .expect_err("an IPv4-only agent");
        assert!(e.to_string().contains("--pool6"), "{e}");
        let other = json!({"ranges": [[{"subnet": POOL}], [{"subnet": "fd00:db8:20::/64"}]]});
        let e = conf(with(base(), "ipam", other))
            .expect("decodes")
            .check_ipam(pool(), gw(), Some(pool6))
            .expect_err("another IPv6 pool");
        assert!(e.to_string().contains("IPv6 pool fd00:db8:19::/64"), "{e}");
        let two =
            json!({"ranges": [[{"subnet": "fd00:db8:19::/64"}], [{"subnet": "fd00:db8:19::/64"}]]});
        conf(with(base(), "ipam", two))
            .expect("decodes")
            .check_ipam(pool(), gw(), Some(pool6))
            .expect_err("two IPv6 ranges");
    }

    #[test]
    fn ipam_the_agent_cannot_honour_is_refused_with_its_key() {
        let cases = [
            (
                json!({"type": "dhcp"}),
                code::UNSUPPORTED_FIELD,
                "ipam.type",
            ),
            (
                json!({"subnet": "198.19.1.0/24"}),
                code::INVALID_CONFIG,
                "differs from the agent's pool",
            ),
            (
                json!({"subnet": "198.19.0.0/25"}),
                code::INVALID_CONFIG,
                "differs from the agent's pool",
            ),
            (
                json!({"subnet": "nonsense"}),
                code::INVALID_CONFIG,
                "ipam.subnet",
            ),
            (
                json!({"ranges": [[{"subnet": "fd00::/64"}]]}),
                code::UNSUPPORTED_FIELD,
                "IPv4",
            ),
            (
                json!({"ranges": [[{"subnet": POOL}], [{"subnet": POOL}]]}),
                code::UNSUPPORTED_FIELD,
                "ipam.ranges",
            ),
            (
                json!({"ranges": [[{"subnet": POOL, "rangeStart": "198.19.0.10"}]]}),
                code::UNSUPPORTED_FIELD,
                "rangeStart",
            ),
            (
                json!({"ranges": [[{"subnet": POOL, "gateway": "198.19.0.254"}]]}),
                code::INVALID_CONFIG,
                "gateway",
            ),
            (
                json!({"routes": [{"dst": "10.0.0.0/8"}]}),
                code::UNSUPPORTED_FIELD,
                "ipam.routes[0]",
            ),
            (
                json!({"routes": [{"dst": "0.0.0.0/0", "gw": "198.19.0.9"}]}),
                code::UNSUPPORTED_FIELD,
                "ipam.routes[0]",
            ),
        ];
        for (ipam, want, text) in cases {
            let c = conf(with(base(), "ipam", ipam.clone())).expect("decodes");
            let e = c.check_ipam(pool(), gw(), None).expect_err("refused");
            assert_eq!(e.code, want, "{ipam}: {e}");
            assert!(e.details.contains(text), "{ipam}: {e}");
        }
    }

    #[test]
    fn valid_attachments_must_be_present_but_may_be_null() {
        let e = conf(base())
            .expect("valid")
            .valid_attachments()
            .expect_err("absent");
        assert_eq!(e.code, code::INVALID_CONFIG);
        let c = conf(with(base(), "cni.dev/valid-attachments", json!(null))).expect("valid");
        assert!(c.valid_attachments().expect("null").is_empty());
        let c = conf(with(
            base(),
            "cni.dev/valid-attachments",
            json!([{"containerID": "a", "ifname": "eth0"}]),
        ))
        .expect("valid");
        assert_eq!(
            c.valid_attachments()
                .expect("list")
                .into_iter()
                .collect::<Vec<_>>(),
            vec![Attachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn identifiers_follow_the_specification() {
        for ok in ["a", "0", "web-1_x.y", "f00dfeed"] {
            assert!(is_valid_identifier(ok), "{ok}");
        }
        for bad in ["", "_a", ".a", "a/b", "a b", "ä"] {
            assert!(!is_valid_identifier(bad), "{bad}");
        }
    }
}
