//! The API's HTTP server on its unix socket. It serves a [`Backend`]: the
//! agent implements it, and this module knows nothing else of the agent.
//!
//! No client can hold the API hostage: a request's headers must arrive
//! within [`HEADER_TIMEOUT`] (an idle kept-alive connection is closed after
//! as long) and its body within [`BODY_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] connections are served at once, at most
//! [`MAX_CONNECTIONS_PER_PEER`] from one process (others get a 503 at once);
//! shutdown waits at most [`SHUTDOWN_GRACE`] for requests in progress. Every
//! change is logged with the uid and pid of the process that asked for it
//! (`SO_PEERCRED`).

use std::{
    collections::HashMap,
    future::Future,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, FromRequest, MatchedPath, Path as UrlPath, Query, Request, State,
        rejection::QueryRejection,
    },
    http::{Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::{StreamExt as _, stream::BoxStream};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::{Deserialize, de::DeserializeOwned};
use tokio::net::{UnixListener, UnixStream};

use super::wire::{
    AddContainer, ApiError, ContainerInfo, Flow, FlowQuery, Flushed, MAX_BODY, MAX_PORTS_BODY,
    MonitorEvent, MonitorQuery, NodeInfo, PortRequest, SPLIT_PORTS, Status, UpdateContainer,
};
use crate::metrics;

/// What the API's routes are served by (the agent). Every method answers
/// one route; reads must not wait for mutations in progress.
pub trait Backend: Clone + Send + Sync + 'static {
    /// `GET /v1/status`.
    fn status(&self) -> impl Future<Output = Result<Status, Failure>> + Send;
    /// `GET /v1/containers`.
    fn containers(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, Failure>> + Send;
    /// `GET /v1/containers/{name}`.
    fn container(
        &self,
        name: String,
    ) -> impl Future<Output = Result<ContainerInfo, Failure>> + Send;
    /// `POST /v1/containers`.
    fn add(&self, req: AddContainer)
    -> impl Future<Output = Result<ContainerInfo, Failure>> + Send;
    /// `PATCH /v1/containers/{name}`.
    fn update(
        &self,
        name: String,
        req: UpdateContainer,
    ) -> impl Future<Output = Result<ContainerInfo, Failure>> + Send;
    /// `POST /v1/containers/{name}/ports`: one spec or a list, all or none.
    fn publish(
        &self,
        name: String,
        specs: Vec<String>,
        force: bool,
    ) -> impl Future<Output = Result<ContainerInfo, Failure>> + Send;
    /// `DELETE /v1/containers/{name}/ports`: one spec or a list.
    fn unpublish(
        &self,
        name: String,
        specs: Vec<String>,
    ) -> impl Future<Output = Result<ContainerInfo, Failure>> + Send;
    /// `DELETE /v1/containers/{name}`.
    fn delete(&self, name: String) -> impl Future<Output = Result<(), Failure>> + Send;
    /// `GET /v1/conntrack[?container=NAME][&limit=N]`: the flows as they
    /// are read, in batches, ending with an error if the walk failed.
    fn conntrack(
        &self,
        query: FlowQuery,
    ) -> impl Future<Output = Result<FlowBatches, Failure>> + Send;
    /// `DELETE /v1/conntrack[?container=NAME]`: the number of entries removed.
    fn flush(
        &self,
        container: Option<String>,
    ) -> impl Future<Output = Result<usize, Failure>> + Send;
    /// `GET /metrics`: the metrics page (OpenMetrics text).
    fn metrics(&self) -> impl Future<Output = Result<String, Failure>> + Send;
    /// `GET /v1/monitor`: the monitor's events, until the client goes.
    fn monitor(
        &self,
        query: MonitorQuery,
    ) -> impl Future<Output = Result<BoxStream<'static, MonitorEvent>, Failure>> + Send;
    /// `GET /v1/nodes`: the nodes of the cluster (cluster mode only).
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeInfo>, Failure>> + Send;
}

/// Flows as they are read from the table: batches, or the error that cut
/// the walk short.
pub type FlowBatches = tokio::sync::mpsc::Receiver<Result<Vec<Flow>, String>>;

/// A refused or failed request: the HTTP status and what to tell the
/// client (what was wrong and what to do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// HTTP status (4xx: the request, 5xx: the agent).
    pub status: u16,
    /// The message.
    pub message: String,
}

impl Failure {
    /// A failure with HTTP status `status`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// A request body: JSON, whatever its `Content-Type` says (`curl -d` sends
/// `application/x-www-form-urlencoded`; the API speaks nothing but JSON).
/// A body that is not the expected JSON is a 400 that says why; one over
/// [`MAX_BODY`] a 413 naming the limit (see [`ports_body`] for the routes
/// with a larger one).
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(MAX_BODY, "send a smaller body")
            } else {
                Failure::new(e.status().as_u16(), e.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| Failure::new(400, format!("invalid request body: {e}")))
    }
}

/// A body over a route's limit: which limit, and what to do.
fn too_large(limit: usize, what_to_do: &str) -> Failure {
    Failure::new(413, super::wire::too_large(limit, what_to_do))
}

/// The body of a route that takes port lists, or why it was refused.
fn ports_body<T>(body: Result<Body<T>, Failure>) -> Result<T, Failure> {
    match body {
        Ok(Body(t)) => Ok(t),
        Err(e) if e.status == StatusCode::PAYLOAD_TOO_LARGE.as_u16() => {
            Err(too_large(MAX_PORTS_BODY, SPLIT_PORTS))
        }
        Err(e) => Err(e),
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(ApiError {
            error: self.message,
        });
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body will not come: no next request either.
            return (status, [(axum::http::header::CONNECTION, "close")], body).into_response();
        }
        (status, body).into_response()
    }
}

async fn status<B: Backend>(State(b): State<B>) -> Result<Json<Status>, Failure> {
    Ok(Json(b.status().await?))
}

async fn list<B: Backend>(State(b): State<B>) -> Result<Json<Vec<ContainerInfo>>, Failure> {
    Ok(Json(b.containers().await?))
}

async fn get_one<B: Backend>(
    State(b): State<B>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ContainerInfo>, Failure> {
    Ok(Json(b.container(name).await?))
}

async fn add<B: Backend>(
    State(b): State<B>,
    body: Result<Body<AddContainer>, Failure>,
) -> Result<(StatusCode, Json<ContainerInfo>), Failure> {
    let req = ports_body(body)?;
    let info = b.add(req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn del<B: Backend>(
    State(b): State<B>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, Failure> {
    b.delete(name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn update<B: Backend>(
    State(b): State<B>,
    UrlPath(name): UrlPath<String>,
    Body(req): Body<UpdateContainer>,
) -> Result<Json<ContainerInfo>, Failure> {
    Ok(Json(b.update(name, req).await?))
}

async fn publish<B: Backend>(
    State(b): State<B>,
    UrlPath(name): UrlPath<String>,
    body: Result<Body<PortRequest>, Failure>,
) -> Result<Json<ContainerInfo>, Failure> {
    let req = ports_body(body)?;
    Ok(Json(
        b.publish(name, req.publish.into_vec(), req.force).await?,
    ))
}

async fn unpublish<B: Backend>(
    State(b): State<B>,
    UrlPath(name): UrlPath<String>,
    body: Result<Body<PortRequest>, Failure>,
) -> Result<Json<ContainerInfo>, Failure> {
    let req = ports_body(body)?;
    Ok(Json(b.unpublish(name, req.publish.into_vec()).await?))
}

async fn nodes<B: Backend>(State(b): State<B>) -> Result<Json<Vec<NodeInfo>>, Failure> {
    Ok(Json(b.nodes().await?))
}

/// Streams the flows as one JSON list, a batch at a time, as the backend
/// reads them. A walk that fails midway ends the answer early, so the
/// client sees a list that does not parse rather than a partial one.
async fn conntrack<B: Backend>(
    State(b): State<B>,
    query: Result<Query<FlowQuery>, QueryRejection>,
) -> Result<Response, Failure> {
    let Query(query) =
        query.map_err(|e| Failure::new(400, format!("invalid query: {}", e.body_text())))?;
    let batches = b.conntrack(query).await?;
    let chunks = futures::stream::unfold(
        (batches, true, false),
        |(mut batches, first, done)| async move {
            if done {
                return None;
            }
            let mut chunk = Vec::new();
            let next = batches.recv().await;
            let end = match next {
                Some(Ok(flows)) => {
                    let mut first = first;
                    for f in &flows {
                        chunk.push(if first { b'[' } else { b',' });
                        first = false;
                        if let Err(e) = serde_json::to_writer(&mut chunk, f) {
                            return Some((Err(std::io::Error::other(e)), (batches, false, true)));
                        }
                    }
                    return Some((Ok(chunk), (batches, first, false)));
                }
                Some(Err(e)) => {
                    return Some((Err(std::io::Error::other(e)), (batches, false, true)));
                }
                None if first => b"[]".to_vec(),
                None => b"]".to_vec(),
            };
            Some((Ok(end), (batches, false, true)))
        },
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

#[derive(Deserialize)]
struct FlushQuery {
    container: Option<String>,
}

async fn flush<B: Backend>(
    State(b): State<B>,
    Query(q): Query<FlushQuery>,
) -> Result<Json<Flushed>, Failure> {
    let removed = b.flush(q.container).await?;
    Ok(Json(Flushed { removed }))
}

async fn metrics<B: Backend>(State(b): State<B>) -> Result<Response, Failure> {
    let page = b.metrics().await?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], page).into_response())
}

async fn monitor<B: Backend>(
    State(b): State<B>,
    Query(q): Query<MonitorQuery>,
) -> Result<Response, Failure> {
    let events = b.monitor(q).await?;
    let lines = events.map(|e| {
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// Counts every request and its latency by method, route pattern and
/// status (the metrics' `datapath_api_requests_total`).
async fn track(req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics::api_request(&method, &route, resp.status().as_u16(), start.elapsed());
    resp
}

/// The metrics page alone (`datapath agent --metrics ADDR:PORT`), served by
/// `backend`.
pub fn metrics_router<B: Backend>(backend: B) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<B>))
        .fallback(not_found)
        .with_state(backend)
}

/// Serves [`metrics_router`] on TCP `listener` until `shutdown` completes.
pub async fn serve_metrics<B: Backend>(
    backend: B,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    axum::serve(listener, metrics_router(backend))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serve the metrics")
}

async fn not_found() -> Failure {
    Failure::new(404, "no such API route; see `datapath --help`")
}

/// How long a client may take to send a request's headers (and how long
/// a kept-alive connection may sit idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Connections served at once for one client process.
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// How long shutdown waits for requests in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The process at the other end of a connection (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its process id, if the kernel knows it.
    pub pid: Option<i32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Option<Self> {
        stream.peer_cred().ok().map(|c| Self {
            uid: c.uid(),
            pid: c.pid(),
        })
    }
}

/// Whether a request goes to a route that takes port lists (and so
/// [`MAX_PORTS_BODY`] rather than [`MAX_BODY`]).
fn takes_ports(method: &Method, path: &str) -> bool {
    let mut parts = path.trim_end_matches('/').split('/').skip(1);
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("v1"), Some("containers"), None, None, None) => method == Method::POST,
        (Some("v1"), Some("containers"), Some(_), Some("ports"), None) => {
            method == Method::POST || method == Method::DELETE
        }
        _ => false,
    }
}

/// Reads the whole request body within [`BODY_TIMEOUT`] (and the route's
/// limit: [`MAX_PORTS_BODY`] for port lists, [`MAX_BODY`] otherwise),
/// before any route sees it.
async fn read_body_in_time(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let (limit, what_to_do) = if takes_ports(&parts.method, parts.uri.path()) {
        (MAX_PORTS_BODY, SPLIT_PORTS)
    } else {
        (MAX_BODY, "send a smaller body")
    };
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => Failure::new(
            408,
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )
        .into_response(),
        Ok(Err(_)) => too_large(limit, what_to_do).into_response(),
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
    }
}

/// Logs every request that changes something with who asked.
async fn log_changes(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req.extensions().get::<Peer>().copied();
    let response = next.run(req).await;
    let (uid, pid) = peer.map_or((None, None), |p| (Some(p.uid), p.pid));
    if method == Method::GET || method == Method::HEAD {
        tracing::debug!(%method, %path, status = response.status().as_u16(), ?uid, ?pid, "API read");
    } else {
        tracing::info!(
            %method,
            %path,
            status = response.status().as_u16(),
            uid = %uid.map_or_else(|| "?".to_owned(), |u| u.to_string()),
            pid = %pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
            "API change"
        );
    }
    response
}

/// The API's routes, served by `backend`.
pub fn router<B: Backend>(backend: B) -> Router {
    Router::new()
        .route("/v1/status", get(status::<B>))
        .route(
            "/v1/containers",
            get(list::<B>)
                .merge(axum::routing::post(add::<B>).layer(DefaultBodyLimit::max(MAX_PORTS_BODY))),
        )
        .route(
            "/v1/containers/{name}",
            get(get_one::<B>).delete(del::<B>).patch(update::<B>),
        )
        .route(
            "/v1/containers/{name}/ports",
            axum::routing::post(publish::<B>)
                .delete(unpublish::<B>)
                .layer(DefaultBodyLimit::max(MAX_PORTS_BODY)),
        )
        .route("/v1/conntrack", get(conntrack::<B>).delete(flush::<B>))
        .route("/v1/monitor", get(monitor::<B>))
        .route("/v1/nodes", get(nodes::<B>))
        .route("/metrics", get(metrics::<B>))
        .route_layer(axum::middleware::from_fn(track))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(read_body_in_time))
        .layer(middleware::from_fn(log_changes))
        .with_state(backend)
}

/// Refuses to go on if an agent answers on `socket`: its socket is never
/// removed from under it. A socket nobody listens on is stale.
pub async fn refuse_if_answered(socket: &Path) -> anyhow::Result<()> {
    match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(socket)).await {
        Ok(Ok(_)) | Err(_) => anyhow::bail!(
            "another agent answers on {}: stop it first, or give this one an --api-socket \
             (and --state-dir, --bpffs-dir) of its own",
            socket.display()
        ),
        Ok(Err(_)) => Ok(()),
    }
}

/// How many connections are open, in all and by process.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_pid: HashMap<Option<i32>, usize>,
}

/// Admits connections within the limits.
#[derive(Clone, Debug, Default)]
struct Admission(Arc<Mutex<Counts>>);

/// A connection's place within the limits, given back when dropped.
struct Admitted {
    admission: Admission,
    pid: Option<i32>,
}

impl Admission {
    fn admit(&self, pid: Option<i32>) -> Option<Admitted> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = counts.by_pid.get(&pid).copied().unwrap_or(0);
        if counts.total >= MAX_CONNECTIONS || mine >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        counts.total += 1;
        counts.by_pid.insert(pid, mine + 1);
        Some(Admitted {
            admission: self.clone(),
            pid,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_pid.get_mut(&self.pid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.by_pid.remove(&self.pid);
            }
        }
    }
}

/// Answers a connection beyond the limits with a 503 (if the socket takes
/// it at once) and closes it.
fn refuse(stream: UnixStream, peer: Option<Peer>) {
    let body = r#"{"error":"too many connections to the agent's API; try again"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
    tracing::warn!(?peer, "refused an API connection: too many connections");
}

/// Serves one connection until it closes, its client is too slow, or
/// `stop` turns true (then it finishes its request in progress).
async fn serve_connection(
    stream: UnixStream,
    app: Router,
    peer: Option<Peer>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let hyper_service = TowerToHyperService::new(app);
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if let Some(peer) = peer {
                req.extensions_mut().insert(peer);
            }
            hyper::service::Service::call(&hyper_service, req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(?peer, "API connection: {e}");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    if let Err(e) = conn.await {
        tracing::debug!(?peer, "API connection at shutdown: {e}");
    }
}

/// Binds the socket (mode 0600: the API is root's; never removing the
/// socket of an agent that answers on it), calls `listening` once it
/// accepts connections, and serves until `shutdown` completes; then waits at most [`SHUTDOWN_GRACE`] for requests in
/// progress and removes the socket.
pub async fn serve<B: Backend>(
    backend: B,
    socket: &Path,
    listening: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    refuse_if_answered(socket).await?;
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale API socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", socket.display())),
    }
    // No window in which the socket is reachable with wider permissions.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "API listening");
    listening();
    let app = router(backend);
    let admission = Admission::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, say: wait a little, go on.
                        tracing::warn!("accept an API connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let peer = Peer::of(&stream);
                let Some(admitted) = admission.admit(peer.and_then(|p| p.pid)) else {
                    refuse(stream, peer);
                    continue;
                };
                let (app, stop) = (app.clone(), stop_rx.clone());
                connections.spawn(async move {
                    serve_connection(stream, app, peer, stop).await;
                    drop(admitted);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(socket);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "API connections still open after {SHUTDOWN_GRACE:?}: closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}
