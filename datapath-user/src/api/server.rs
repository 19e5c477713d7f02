//! The API's HTTP server on its unix socket. It serves a [`Backend`]: the
//! agent implements it, and this module knows nothing else of the agent.

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path as UrlPath, Query, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;

use super::wire::{
    AddContainer, ApiError, ContainerInfo, Flow, Flushed, MAX_BODY, NodeInfo, PortRequest, Status,
    UpdateContainer,
};

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
    /// `POST /v1/containers/{name}/ports`.
    fn publish(
        &self,
        name: String,
        spec: String,
    ) -> impl Future<Output = Result<ContainerInfo, Failure>> + Send;
    /// `DELETE /v1/containers/{name}/ports`.
    fn unpublish(
        &self,
        name: String,
        spec: String,
    ) -> impl Future<Output = Result<ContainerInfo, Failure>> + Send;
    /// `DELETE /v1/containers/{name}`.
    fn delete(&self, name: String) -> impl Future<Output = Result<(), Failure>> + Send;
    /// `GET /v1/conntrack`.
    fn conntrack(&self) -> impl Future<Output = Result<Vec<Flow>, Failure>> + Send;
    /// `DELETE /v1/conntrack[?container=NAME]`: the number of entries removed.
    fn flush(
        &self,
        container: Option<String>,
    ) -> impl Future<Output = Result<usize, Failure>> + Send;
    /// `GET /v1/nodes`: the nodes of the cluster (cluster mode only).
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeInfo>, Failure>> + Send;
}

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

impl From<JsonRejection> for Failure {
    fn from(e: JsonRejection) -> Self {
        Failure::new(
            e.status().as_u16(),
            format!("invalid request body: {}", e.body_text()),
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ApiError {
                error: self.message,
            }),
        )
            .into_response()
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
    body: Result<Json<AddContainer>, JsonRejection>,
) -> Result<(StatusCode, Json<ContainerInfo>), Failure> {
    let Json(req) = body?;
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
    body: Result<Json<UpdateContainer>, JsonRejection>,
) -> Result<Json<ContainerInfo>, Failure> {
    let Json(req) = body?;
    Ok(Json(b.update(name, req).await?))
}

async fn publish<B: Backend>(
    State(b): State<B>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<PortRequest>, JsonRejection>,
) -> Result<Json<ContainerInfo>, Failure> {
    let Json(req) = body?;
    Ok(Json(b.publish(name, req.publish).await?))
}

async fn unpublish<B: Backend>(
    State(b): State<B>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<PortRequest>, JsonRejection>,
) -> Result<Json<ContainerInfo>, Failure> {
    let Json(req) = body?;
    Ok(Json(b.unpublish(name, req.publish).await?))
}

async fn nodes<B: Backend>(State(b): State<B>) -> Result<Json<Vec<NodeInfo>>, Failure> {
    Ok(Json(b.nodes().await?))
}

async fn conntrack<B: Backend>(State(b): State<B>) -> Result<Json<Vec<Flow>>, Failure> {
    Ok(Json(b.conntrack().await?))
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

async fn not_found() -> Failure {
    Failure::new(404, "no such API route; see `datapath --help`")
}

/// The API's routes, served by `backend`.
pub fn router<B: Backend>(backend: B) -> Router {
    Router::new()
        .route("/v1/status", get(status::<B>))
        .route("/v1/containers", get(list::<B>).post(add::<B>))
        .route(
            "/v1/containers/{name}",
            get(get_one::<B>).delete(del::<B>).patch(update::<B>),
        )
        .route(
            "/v1/containers/{name}/ports",
            axum::routing::post(publish::<B>).delete(unpublish::<B>),
        )
        .route("/v1/conntrack", get(conntrack::<B>).delete(flush::<B>))
        .route("/v1/nodes", get(nodes::<B>))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(backend)
}

/// Binds the socket (mode 0600: the API is root's) and serves until
/// `shutdown` completes; removes the socket afterwards.
pub async fn serve<B: Backend>(
    backend: B,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale API socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", socket.display())),
    }
    // No window in which the socket is reachable with wider permissions.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "API listening");
    let result = axum::serve(listener, router(backend))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result.context("serve the API")
}
