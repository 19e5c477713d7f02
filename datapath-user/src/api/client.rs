//! A client of the agent's API, for the CLI and the CNI plugin.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use futures::{StreamExt as _, stream::BoxStream};

use super::wire::{
    AddContainer, ApiError, ContainerInfo, Flow, FlowQuery, Flushed, MAX_PORTS_BODY, MonitorEvent,
    MonitorQuery, NodeInfo, PortRequest, SPLIT_PORTS, Specs, Status, UpdateContainer, too_large,
};

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
    /// The agent did not answer in time.
    #[error(
        "the agent at {socket} did not answer within {after:?} (is it stuck? its log says more)"
    )]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// How long the client waited.
        after: Duration,
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

/// How long a client waits to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for an answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A client of the agent's API. Every call is bounded: connecting by
/// [`CONNECT_TIMEOUT`] (then the agent counts as unreachable), the whole
/// exchange by the client's timeout ([`DEFAULT_TIMEOUT`] unless set).
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client, waiting at most `timeout` for each answer.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `exchange`, given up after the client's timeout.
    async fn bounded<T>(
        &self,
        exchange: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                socket: self.socket.clone(),
                after: self.timeout,
            }),
        }
    }

    /// Sends one request; the answer's head, its body still to read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let http = |message: String| ClientError::Http {
            socket: self.socket.clone(),
            message,
        };
        let connect_err = |source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        };
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::UnixStream::connect(&self.socket),
        )
        .await
        .map_err(|_| {
            connect_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {CONNECT_TIMEOUT:?}"),
            ))
        })?
        .map_err(connect_err)?;
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
        sender
            .send_request(req)
            .await
            .map_err(|e| http(format!("request: {e}")))
    }

    /// The whole body of an answer, or the agent's error.
    async fn body(
        &self,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http {
                socket: self.socket.clone(),
                message: format!("read answer: {e}"),
            })?
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
        Ok((status, bytes))
    }

    /// `GET /metrics`: the metrics page.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        self.bounded(async {
            let resp = self.send(Method::GET, "/metrics", None).await?;
            let (_, bytes) = self.body(resp).await?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
        .await
    }

    /// `GET /v1/monitor`: the monitor's events as they come, until the
    /// agent stops.
    pub async fn monitor(
        &self,
        query: &MonitorQuery,
    ) -> Result<BoxStream<'static, Result<MonitorEvent, ClientError>>, ClientError> {
        let mut path = format!("/v1/monitor?drops={}&flows={}", query.drops, query.flows);
        if let Some(c) = &query.container {
            path.push_str("&container=");
            path.push_str(&encode(c));
        }
        // Bounded until the answer's head; the stream itself runs until
        // the agent stops or the caller drops it.
        let resp = self.bounded(self.send(Method::GET, &path, None)).await?;
        if !resp.status().is_success() {
            self.body(resp).await?;
            return Err(ClientError::Http {
                socket: self.socket.clone(),
                message: "the monitor was refused".to_owned(),
            });
        }
        let socket = self.socket.clone();
        let state = (resp.into_body(), Vec::<u8>::new(), socket);
        let stream = futures::stream::unfold(state, |(mut body, mut buf, socket)| async move {
            loop {
                if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let ev = serde_json::from_slice::<MonitorEvent>(&line).map_err(|e| {
                        ClientError::Http {
                            socket: socket.clone(),
                            message: format!("bad monitor event: {e}"),
                        }
                    });
                    return Some((ev, (body, buf, socket)));
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => {
                        let err = ClientError::Http {
                            socket: socket.clone(),
                            message: format!("read the monitor: {e}"),
                        };
                        return Some((Err(err), (body, Vec::new(), socket)));
                    }
                    None => return None,
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        self.bounded(async {
            let resp = self.send(method, path, body).await?;
            let (status, bytes) = self.body(resp).await?;
            let bytes = if bytes.is_empty() || status == StatusCode::NO_CONTENT {
                Bytes::from_static(b"null")
            } else {
                bytes
            };
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Http {
                socket: self.socket.clone(),
                message: format!("decode answer: {e}"),
            })
        })
        .await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call(Method::GET, "/v1/status", None).await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        self.call(Method::GET, "/v1/nodes", None).await
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
        fits_ports_body(&body)?;
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

    /// `POST /v1/containers/{name}/ports`: publishes `specs` in one
    /// request (all or none); with `force`, even where a process of the
    /// node listens on a port.
    pub async fn publish(
        &self,
        name: &str,
        specs: &[String],
        force: bool,
    ) -> Result<ContainerInfo, ClientError> {
        self.port_call(Method::POST, name, specs, force).await
    }

    /// `DELETE /v1/containers/{name}/ports`: stops publishing `specs` in
    /// one request.
    pub async fn unpublish(
        &self,
        name: &str,
        specs: &[String],
    ) -> Result<ContainerInfo, ClientError> {
        self.port_call(Method::DELETE, name, specs, false).await
    }

    async fn port_call(
        &self,
        method: Method,
        name: &str,
        specs: &[String],
        force: bool,
    ) -> Result<ContainerInfo, ClientError> {
        let body = serde_json::to_vec(&PortRequest {
            publish: Specs::List(specs.to_vec()),
            force,
        })
        .map_err(|e| ClientError::Http {
            socket: self.socket.clone(),
            message: format!("encode request: {e}"),
        })?;
        fits_ports_body(&body)?;
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

    /// `GET /v1/conntrack[?container=NAME][&limit=N]`.
    pub async fn conntrack(&self, query: &FlowQuery) -> Result<Vec<Flow>, ClientError> {
        let mut params = Vec::new();
        if let Some(c) = &query.container {
            params.push(format!("container={}", encode(c)));
        }
        if let Some(n) = query.limit {
            params.push(format!("limit={n}"));
        }
        let path = if params.is_empty() {
            "/v1/conntrack".to_owned()
        } else {
            format!("/v1/conntrack?{}", params.join("&"))
        };
        self.call(Method::GET, &path, None).await
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

/// Refuses, before sending it, a body the agent would refuse as too large
/// (the agent stops reading such a body and answers at once; a client
/// still writing it may never see the answer).
fn fits_ports_body(body: &[u8]) -> Result<(), ClientError> {
    if body.len() > MAX_PORTS_BODY {
        return Err(ClientError::Agent {
            status: 413,
            message: too_large(MAX_PORTS_BODY, SPLIT_PORTS),
        });
    }
    Ok(())
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
