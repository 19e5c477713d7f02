//! The agent's HTTP server on its unix socket.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path as UrlPath, Query, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::{
    agent::{Agent, AgentError},
    api::{self, AddContainer, ApiError, MAX_BODY, UpdateContainer},
};

/// The agent shared by the handlers; operations are serialized.
pub type Shared = Arc<Mutex<Agent>>;

/// An error answer.
struct Error(u16, String);

impl From<AgentError> for Error {
    fn from(e: AgentError) -> Self {
        Error(e.status(), e.to_string())
    }
}

impl From<JsonRejection> for Error {
    fn from(e: JsonRejection) -> Self {
        Error(
            e.status().as_u16(),
            format!("invalid request body: {}", e.body_text()),
        )
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ApiError { error: self.1 })).into_response()
    }
}

async fn status(State(agent): State<Shared>) -> Json<api::Status> {
    Json(agent.lock().await.status())
}

async fn list(State(agent): State<Shared>) -> Json<Vec<api::ContainerInfo>> {
    Json(agent.lock().await.list())
}

async fn get_one(
    State(agent): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<api::ContainerInfo>, Error> {
    Ok(Json(agent.lock().await.get(&name)?))
}

async fn add(
    State(agent): State<Shared>,
    body: Result<Json<AddContainer>, JsonRejection>,
) -> Result<(StatusCode, Json<api::ContainerInfo>), Error> {
    let Json(req) = body?;
    let info = agent.lock().await.add(req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn del(
    State(agent): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, Error> {
    agent.lock().await.del(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn update(
    State(agent): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<UpdateContainer>, JsonRejection>,
) -> Result<Json<api::ContainerInfo>, Error> {
    let Json(req) = body?;
    Ok(Json(agent.lock().await.update(&name, &req)?))
}

async fn publish(
    State(agent): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<api::PortRequest>, JsonRejection>,
) -> Result<Json<api::ContainerInfo>, Error> {
    let Json(req) = body?;
    Ok(Json(agent.lock().await.publish(&name, &req.publish)?))
}

async fn unpublish(
    State(agent): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<api::PortRequest>, JsonRejection>,
) -> Result<Json<api::ContainerInfo>, Error> {
    let Json(req) = body?;
    Ok(Json(agent.lock().await.unpublish(&name, &req.publish)?))
}

async fn conntrack(State(agent): State<Shared>) -> Result<Json<Vec<api::Flow>>, Error> {
    Ok(Json(agent.lock().await.conntrack()?))
}

#[derive(Deserialize)]
struct FlushQuery {
    container: Option<String>,
}

async fn flush(
    State(agent): State<Shared>,
    Query(q): Query<FlushQuery>,
) -> Result<Json<api::Flushed>, Error> {
    let removed = agent.lock().await.flush(q.container.as_deref())?;
    Ok(Json(api::Flushed { removed }))
}

async fn not_found() -> Error {
    Error(404, "no such API route; see `datapath --help`".to_owned())
}

/// The API's routes.
pub fn router(agent: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/containers", get(list).post(add))
        .route(
            "/v1/containers/{name}",
            get(get_one).delete(del).patch(update),
        )
        .route(
            "/v1/containers/{name}/ports",
            axum::routing::post(publish).delete(unpublish),
        )
        .route("/v1/conntrack", get(conntrack).delete(flush))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

/// Binds the socket (mode 0600: the API is root's) and serves until
/// `shutdown` completes; removes the socket afterwards.
pub async fn serve(
    agent: Shared,
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
    let result = axum::serve(listener, router(agent))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result.context("serve the API")
}
