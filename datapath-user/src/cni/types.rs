//! The CNI wire types: results, errors and the version answer (section 5 of
//! the CNI specification), for versions 1.0.0 and 1.1.0, whose result
//! formats differ only in optional fields this plugin never sets, and the
//! older 0.3.0, 0.3.1 and 0.4.0 that podman 3 and older containerd still
//! ask for: their results carry each address's IP `version` and no MTUs
//! ([`Success::for_version`]).

use serde::{Deserialize, Serialize};

/// The specification versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version, used where the caller named none.
pub const LATEST_VERSION: &str = "1.1.0";

/// Whether `version` is one this plugin speaks.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Whether `version` has the 1.1 operations (`STATUS`, `GC`).
pub fn has_status_and_gc(version: &str) -> bool {
    version == "1.1.0"
}

/// Whether `version` has `CHECK` (0.4.0 and later).
pub fn has_check(version: &str) -> bool {
    !matches!(version, "0.3.0" | "0.3.1")
}

/// Whether `version` uses the results of before 1.0.0 (0.3.x, 0.4.0).
pub fn is_pre_1_0(version: &str) -> bool {
    version.starts_with("0.")
}

/// The error codes of the specification, and this plugin's own.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field of the network configuration has a value this plugin cannot
    /// honour (the message names the key and the value).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// A required environment variable is missing or invalid (the message
    /// names it).
    pub const INVALID_ENV: u32 = 4;
    /// Reading the configuration failed.
    pub const IO_FAILURE: u32 = 5;
    /// The configuration or `prevResult` is not valid JSON of the expected
    /// shape.
    pub const DECODE: u32 = 6;
    /// The network configuration is invalid.
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition (the agent is unreachable): retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// `STATUS`: the plugin cannot serve `ADD` requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Anything else: the agent refused or failed, or the attachment is not
    /// as it should be (`CHECK`).
    pub const FAILED: u32 = 999;
}

/// A CNI error: printed as the specification's error structure on stdout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    /// One of [`code`].
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// What exactly was wrong, and what to do.
    pub details: String,
}

impl CniError {
    /// An error with code `code`.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Code 7: the network configuration is invalid.
    pub fn config(details: impl Into<String>) -> Self {
        Self::new(
            code::INVALID_CONFIG,
            "invalid network configuration",
            details,
        )
    }

    /// Code 2: `key` has a value this plugin does not support.
    pub fn unsupported(key: &str, value: impl std::fmt::Display, why: &str) -> Self {
        Self::new(
            code::UNSUPPORTED_FIELD,
            "unsupported field in network configuration",
            format!("{key} = {value}: {why}"),
        )
    }

    /// Code 4: an environment variable is missing or invalid.
    pub fn env(variable: &str, details: impl std::fmt::Display) -> Self {
        Self::new(
            code::INVALID_ENV,
            format!("invalid environment variable {variable}"),
            format!("{variable}: {details}"),
        )
    }

    /// Code 999: the operation failed.
    pub fn failed(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(code::FAILED, msg, details)
    }

    /// The error structure for `cni_version`.
    pub fn to_result(&self, cni_version: &str) -> ErrorResult {
        ErrorResult {
            cni_version: cni_version.to_owned(),
            code: self.code,
            msg: self.msg.clone(),
            details: self.details.clone(),
        }
    }
}

/// The error structure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResult {
    /// The protocol version in use.
    pub cni_version: String,
    /// Error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer description.
    #[serde(default)]
    pub details: String,
}

/// The answer to `VERSION`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    /// The version given on input.
    pub cni_version: String,
    /// Every version this plugin speaks.
    pub supported_versions: Vec<String>,
}

/// The result of a successful `ADD` (and the `prevResult` of later
/// operations).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Success {
    /// The protocol version in use.
    pub cni_version: String,
    /// Interfaces created, host side included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes created.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings for the container.
    #[serde(default)]
    pub dns: Dns,
}

impl Success {
    /// This result in the format of `version`: before 1.0.0, each address
    /// names its IP version, and interfaces and routes have only the
    /// fields of that format (no MTU, socket, PCI id, route attributes).
    pub fn for_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_owned();
        let old = is_pre_1_0(version);
        for ip in &mut self.ips {
            ip.version = if old {
                Some(if ip.address.contains(':') { "6" } else { "4" }.to_owned())
            } else {
                None
            };
        }
        if old {
            for i in &mut self.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for r in &mut self.routes {
                *r = Route {
                    dst: std::mem::take(&mut r.dst),
                    gw: r.gw.take(),
                    ..Route::default()
                };
            }
        }
        self
    }
}

/// One interface of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The container's netns (as given in `CNI_NETNS`); absent for host
    /// interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// A socket of the interface (1.1.0; never set by this plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// A PCI device of the interface (1.1.0; never set by this plugin).
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One address of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    /// `"4"` or `"6"`: results before 1.0.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Address in CIDR notation.
    pub address: String,
    /// Default gateway of its subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into the result's interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Destination in CIDR notation.
    pub dst: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    /// Path MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Priority (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Scope (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

/// DNS settings (the network configuration's `dns` key, passed through).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    /// Name servers, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_serializes_with_the_specifications_keys() {
        let r = Success {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "dp1".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: Some("/run/netns/x".into()),
                    pci_id: Some("0000:00:01.0".into()),
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
                gw: Some("198.19.0.1".into()),
                ..Route::default()
            }],
            dns: Dns::default(),
        };
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["interfaces"][0]["mac"], "02:00:00:00:00:01");
        assert!(v["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(v["interfaces"][1]["pciID"], "0000:00:01.0");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(v["routes"][0]["gw"], "198.19.0.1");
        assert!(v["routes"][0].get("mtu").is_none());
        assert_eq!(v["dns"], serde_json::json!({}));
        let back: Success = serde_json::from_value(v).expect("parses back");
        assert_eq!(back, r);
    }

    #[test]
    fn results_for_runtimes_asking_0_4_0_carry_the_ip_version_and_no_mtu() {
        let r = Success {
            cni_version: "1.0.0".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mtu: Some(1400),
                sandbox: Some("/run/netns/x".into()),
                ..Interface::default()
            }],
            ips: vec![IpConfig {
                address: "198.19.0.2/32".into(),
                gateway: Some("198.19.0.1".into()),
                interface: Some(0),
                ..IpConfig::default()
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("198.19.0.1".into()),
                mtu: Some(1400),
                ..Route::default()
            }],
            dns: Dns::default(),
        };
        for version in ["0.3.0", "0.3.1", "0.4.0"] {
            let v = serde_json::to_value(r.clone().for_version(version)).expect("serializes");
            assert_eq!(v["cniVersion"], version);
            assert_eq!(v["ips"][0]["version"], "4", "{v:#}");
            assert_eq!(v["ips"][0]["address"], "198.19.0.2/32");
            assert_eq!(v["ips"][0]["interface"], 0);
            assert!(v["interfaces"][0].get("mtu").is_none(), "{v:#}");
            assert_eq!(v["interfaces"][0]["sandbox"], "/run/netns/x");
            assert_eq!(
                v["routes"][0],
                serde_json::json!({"dst": "0.0.0.0/0", "gw": "198.19.0.1"})
            );
        }
        let v = serde_json::to_value(r.for_version("1.1.0")).expect("serializes");
        assert!(v["ips"][0].get("version").is_none(), "{v:#}");
        assert_eq!(v["interfaces"][0]["mtu"], 1400);
    }

    #[test]
    fn errors_carry_code_message_and_details() {
        let e = CniError::unsupported("ipam.type", "\"dhcp\"", "the agent allocates addresses");
        let v = serde_json::to_value(e.to_result("1.0.0")).expect("serializes");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 2);
        assert_eq!(v["msg"], "unsupported field in network configuration");
        assert_eq!(
            v["details"],
            "ipam.type = \"dhcp\": the agent allocates addresses"
        );
    }
}
