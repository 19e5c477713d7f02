//! The agent's HTTP+JSON API over a unix socket, and a client for it.
//!
//! Routes (all JSON; errors are `{"error": "..."}` with a 4xx/5xx status):
//! * `GET /v1/status`
//! * `GET /v1/containers`, `POST /v1/containers` ([`AddContainer`]),
//!   `GET|DELETE /v1/containers/{name}`, `PATCH /v1/containers/{name}`
//!   ([`UpdateContainer`]: rate limits)
//! * `GET /v1/conntrack`, `DELETE /v1/conntrack[?container=NAME]`
//!
//! Usable with `curl --unix-socket /run/datapath/api.sock http://x/v1/status`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    bpf::Attachment,
    ratelimit::{Limits, RateCounters},
};

/// Largest request body the agent accepts.
pub const MAX_BODY: usize = 64 * 1024;

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
}

/// `PATCH /v1/containers/{name}`: changes rate limits in place (no flow
/// is lost). An absent field is unchanged; a rate of `none` removes that
/// direction's limit; a new rate keeps the current burst unless one is
/// given (a default burst follows the new rate).
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

/// `POST /v1/containers/{name}/ports` and `DELETE …/ports`: one published
/// port or range in Docker's `-p` syntax.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    /// `[ip:]host[-end]:container[-end][/tcp|/udp]`.
    pub publish: String,
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
    /// Rate limits per direction (rates in bits/s, bursts in bytes; `null`:
    /// unlimited).
    #[serde(default)]
    pub limits: Limits,
    /// The rate limiter's counters per direction.
    #[serde(default)]
    pub counters: RateCounters,
}

/// The uplink's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UplinkInfo {
    /// Interface name.
    pub ifname: String,
    /// Interface index.
    pub ifindex: u32,
    /// The hook serving it (`tc`, `xdpnative`, `xdpgeneric`).
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

impl From<&Attachment> for AttachmentInfo {
    fn from(a: &Attachment) -> Self {
        Self {
            program: a.program.to_owned(),
            program_id: a.program_id,
            ifname: a.ifname.clone(),
            hook: a.hook.to_owned(),
            pin: a.pin.clone(),
        }
    }
}

/// A pinned map.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapInfo {
    /// Map name.
    pub name: String,
    /// Pin path.
    pub pin: PathBuf,
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
}

/// One endpoint of a flow tuple.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    /// Address.
    pub addr: Ipv4Addr,
    /// Port (ICMP echo: identifier).
    pub port: u16,
}

/// One tracked flow: `GET /v1/conntrack` returns a list of these.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flow {
    /// `tcp`, `udp`, `icmp`.
    pub proto: String,
    /// `dnat` (to a published port) or `snat` (masqueraded egress).
    pub kind: String,
    /// Source as first seen.
    pub orig_src: Endpoint,
    /// Destination as first seen.
    pub orig_dst: Endpoint,
    /// Source after translation.
    pub nat_src: Endpoint,
    /// Destination after translation.
    pub nat_dst: Endpoint,
    /// TCP state (`syn`, `established`, `closing`), or `active` for others.
    pub state: String,
    /// Seconds since the first packet.
    pub age_s: u64,
    /// Seconds since the last packet in either direction.
    pub idle_s: u64,
    /// Seconds until it expires if idle.
    pub expires_in_s: u64,
    /// Packets in the original direction.
    pub packets: u64,
    /// Bytes in the original direction.
    pub bytes: u64,
    /// Packets in the reply direction.
    pub reply_packets: u64,
    /// Bytes in the reply direction.
    pub reply_bytes: u64,
    /// Owning container, if it still exists.
    pub container: Option<String>,
}

/// `DELETE /v1/conntrack` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flushed {
    /// Entries removed (two per flow).
    pub removed: usize,
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent's socket could not be reached.
    #[error(
        "cannot reach the agent at {socket}: {source} (is `datapath agent` running? use --api-socket or DATAPATH_API_SOCKET to point elsewhere)"
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the agent at {socket}: {message}")]
    Http {
        /// The socket path.
        socket: PathBuf,
        /// What failed.
        message: String,
    },
    /// The agent answered with an error.
    #[error("{message}")]
    Agent {
        /// HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
    },
}

impl ClientError {
    /// Whether the agent was unreachable (as opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// A client of the agent's API.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let http = |message: String| ClientError::Http {
            socket: self.socket.clone(),
            message,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(format!("handshake: {e}")))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "datapath")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http(format!("build request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http(format!("request: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(format!("read answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Agent {
                status: status.as_u16(),
                message,
            });
        }
        let bytes = if bytes.is_empty() || status == StatusCode::NO_CONTENT {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| http(format!("decode answer: {e}")))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call(Method::GET, "/v1/status", None).await
    }

    /// `GET /v1/containers`.
    pub async fn containers(&self) -> Result<Vec<ContainerInfo>, ClientError> {
        self.call(Method::GET, "/v1/containers", None).await
    }

    /// `GET /v1/containers/{name}`.
    pub async fn container(&self, name: &str) -> Result<ContainerInfo, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/containers/{}", encode(name)),
            None,
        )
        .await
    }

    /// `POST /v1/containers`.
    pub async fn add_container(&self, req: &AddContainer) -> Result<ContainerInfo, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Http {
            socket: self.socket.clone(),
            message: format!("encode request: {e}"),
        })?;
        self.call(Method::POST, "/v1/containers", Some(body)).await
    }

    /// `PATCH /v1/containers/{name}`: changes rate limits.
    pub async fn update_container(
        &self,
        name: &str,
        req: &UpdateContainer,
    ) -> Result<ContainerInfo, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Http {
            socket: self.socket.clone(),
            message: format!("encode request: {e}"),
        })?;
        self.call(
            Method::PATCH,
            &format!("/v1/containers/{}", encode(name)),
            Some(body),
        )
        .await
    }

    /// `POST /v1/containers/{name}/ports`.
    pub async fn publish(&self, name: &str, spec: &str) -> Result<ContainerInfo, ClientError> {
        self.port_call(Method::POST, name, spec).await
    }

    /// `DELETE /v1/containers/{name}/ports`.
    pub async fn unpublish(&self, name: &str, spec: &str) -> Result<ContainerInfo, ClientError> {
        self.port_call(Method::DELETE, name, spec).await
    }

    async fn port_call(
        &self,
        method: Method,
        name: &str,
        spec: &str,
    ) -> Result<ContainerInfo, ClientError> {
        let body = serde_json::to_vec(&PortRequest {
            publish: spec.to_owned(),
        })
        .map_err(|e| ClientError::Http {
            socket: self.socket.clone(),
            message: format!("encode request: {e}"),
        })?;
        self.call(
            method,
            &format!("/v1/containers/{}/ports", encode(name)),
            Some(body),
        )
        .await
    }

    /// `DELETE /v1/containers/{name}`.
    pub async fn del_container(&self, name: &str) -> Result<(), ClientError> {
        self.call::<Option<()>>(
            Method::DELETE,
            &format!("/v1/containers/{}", encode(name)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// `GET /v1/conntrack`.
    pub async fn conntrack(&self) -> Result<Vec<Flow>, ClientError> {
        self.call(Method::GET, "/v1/conntrack", None).await
    }

    /// `DELETE /v1/conntrack[?container=NAME]`.
    pub async fn flush_conntrack(&self, container: Option<&str>) -> Result<Flushed, ClientError> {
        let path = match container {
            Some(c) => format!("/v1/conntrack?container={}", encode(c)),
            None => "/v1/conntrack".to_owned(),
        };
        self.call(Method::DELETE, &path, None).await
    }
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
