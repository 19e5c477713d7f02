//! The API's HTTP server on its unix socket. It serves a [`Backend`]: the
//! agent implements it, and this module knows nothing else of the agent.

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, FromRequest, Path as UrlPath, Query, Request, State,
        rejection::QueryRejection,
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, de::DeserializeOwned};

use super::wire::{
    AddContainer, ApiError, ContainerInfo, Flow, FlowQuery, Flushed, MAX_BODY, MAX_PORTS_BODY,
    NodeInfo, PortRequest, SPLIT_PORTS, Status, UpdateContainer,
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

async fn not_found() -> Failure {
    Failure::new(404, "no such API route; see `datapath --help`")
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
        .route("/v1/nodes", get(nodes::<B>))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(backend)
}

/// Binds the socket (mode 0600: the API is root's), calls `listening`
/// once it accepts connections, and serves until `shutdown` completes;
/// removes the socket afterwards.
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
    listening();
    let result = axum::serve(listener, router(backend))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result.context("serve the API")
}
