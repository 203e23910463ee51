//! The local HTTP API (DESIGN §10): how the CLI, the Blender add-on and (later) a web page talk
//! to their daemon.
//!
//! The server listens on a loopback address only. It knows nothing of the node's actors: every
//! route calls a [`Backend`], which the daemon implements by sending a message to the node
//! actor and awaiting the reply. The server owns only the bearer token.
//!
//! Discovery: after binding, the daemon calls [`publish`], which writes `<data dir>/api.token`
//! (mode 0600) and then `<data dir>/api.addr` (`IP:PORT` and a newline). Clients wait for
//! `api.addr`, so it is written last; both files are written atomically. [`unpublish`] removes
//! `api.addr` on exit.
//!
//! Wire format: JSON bodies, `Content-Type: application/json`. Every request carries
//! `Authorization: Bearer <token>`, or the status page's session cookie (see [`crate::web`]);
//! without either, or with a wrong token, the answer is 401. Every error is a JSON object
//! `{"error": "<message a person can act on>"}`. The same server serves the status page at `/`.
//!
//! | route | request | response |
//! |---|---|---|
//! | `GET /v1/status` | – | [`StatusView`] |
//! | `GET /v1/peers?pending=true\|false` | – (default `false`) | JSON array of peers |
//! | `POST /v1/invites` | [`InviteRequest`] | [`InviteView`] |
//! | `POST /v1/admit` | [`AdmitRequest`] | [`PeerRef`] |
//! | `POST /v1/revoke` | [`RevokeRequest`] | [`PeerRef`] |
//! | `GET /v1/jobs` | – | JSON array of job summaries |
//! | `POST /v1/jobs` | [`SubmitRequest`] | [`JobRef`] |
//! | `GET /v1/jobs/{id}` | – | the job: spec, progress per frame, every task with its workers' reports, and `stats` (where the time and money went) |
//! | `DELETE /v1/jobs/{id}` | – | [`JobRef`] (cancelled) |
//! | `GET /v1/jobs/{id}/logs` | – | JSON array of `{"task", "log"}`: the tasks this node rendered |
//! | `GET /v1/jobs/{id}/preview?frame=N&size=PX` | – | `image/png`: the merge of the frame's slices so far |
//! | `POST /v1/jobs/{id}/fetch` | [`FetchRequest`] | [`FetchView`]: the finished frames, copied into a folder |
//! | `GET /v1/events` | – | server-sent events, one [`JobChange`] per job change |
//! | `GET /v1/cloud` | – | the provisioner's instances with their cost so far (404 without a provisioner) |
//! | `POST /v1/web/login` | – | [`LoginView`](crate::web::LoginView): a one-time link to the status page (token only) |
//! | `POST /v1/cost` | [`CostRequest`] | [`CostView`](crate::cost_cmd::CostView): a job's time and money per instance type (answers after a probe render of a few seconds) |
//!
//! Status codes: 400 bad request (malformed JSON, wrong fields, a value the backend refuses),
//! 401 missing or wrong token, 404 unknown route or thing, 405 wrong method, 409 conflict, 413
//! body over [`MAX_BODY_BYTES`], 415 body without the JSON content type, 500 internal, 503 the
//! node cannot answer now (starting, shutting down).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::data_dir::{self, DataDir, WriteError};
use crate::web::{self, Auth, Credential};

/// Largest request body accepted. Requests are a few small fields; the bound stops a local
/// process from making the daemon buffer an arbitrary amount of memory (DESIGN §11).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Length of the API token in random bytes (hex-encoded, so twice as many characters).
/// 256 bits: not guessable, whatever the rate of tries.
pub const TOKEN_BYTES: usize = 32;

/// What the node reports about itself: `GET /v1/status`. The network actor's own view.
pub type StatusView = blendnet_net::NodeStatus;

/// `POST /v1/jobs`: render a scene already in the store (`blendnet store add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The scene's manifest hash.
    pub scene: String,
    /// The `.blend` to render: its path inside the manifest.
    pub blend: String,
    pub frames: Vec<u32>,
    /// Samples per frame (Cycles); for other engines, what the scene renders.
    pub samples: u32,
    /// `auto` (default), `samples` or `frames`.
    #[serde(default)]
    pub split: Option<String>,
    /// `CYCLES` (default), `BLENDER_EEVEE`, `BLENDER_WORKBENCH` or another engine's identifier.
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// The render time a task aims at, in seconds (default 60).
    #[serde(default)]
    pub target_task_secs: Option<u32>,
    /// Frames per task when split by frames (default 1).
    #[serde(default)]
    pub frames_per_task: Option<u32>,
    /// The Blender the scene was made with, `major.minor` (default: this node's Blender);
    /// only peers with the same major.minor render it.
    #[serde(default)]
    pub blender: Option<String>,
    /// Where this node puts the finished frames (an absolute path), whoever renders them.
    #[serde(default)]
    pub out: Option<String>,
}

/// `POST /v1/cost`: estimate a job on a cloud provider's instance types from a short probe
/// render of the scene on the daemon's machine (what `blendnet cost` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostRequest {
    /// The `.blend`: an absolute path on the daemon's machine.
    pub scene: String,
    /// The frames (default: the scene's range).
    #[serde(default)]
    pub frames: Option<Vec<u32>>,
    /// Samples per frame (default: the scene's).
    #[serde(default)]
    pub samples: Option<u32>,
    /// `local`, `aws` or `gcp` (default: the `[cloud]` table's provider).
    #[serde(default)]
    pub provider: Option<String>,
}

/// A job's id, as submitted or cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub job: String,
}

/// One entry of the `GET /v1/events` stream: something about `job` changed; read it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobChange {
    pub job: String,
}

/// `POST /v1/invites`: make a single-use invite code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// How long the code stays valid, in seconds.
    pub ttl_secs: u64,
    /// Roles the joining peer receives.
    pub roles: Vec<String>,
    /// How long the joining peer's certificate lasts, in seconds (default: a member's usual
    /// ten years). Cloud instances get short ones that their provisioner renews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_lifetime_secs: Option<u64>,
    /// The cloud instance that must redeem it, as `CLOUD:ID` (`aws:i-0123…`, `gcp:NAME`): its
    /// redemption must carry that cloud's signed proof naming the instance. `CLOUD` alone
    /// (`aws`): an instance about to launch, named later with `POST /v1/invites/bind`; until
    /// then its redemption is answered "not ready".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// `POST /v1/invites/bind`: names the instance an invite made with `"instance": "aws"` (or
/// `"gcp"`) was for, once its launch returned the id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindRequest {
    /// The invite code.
    pub code: String,
    /// `CLOUD:ID`, as in [`InviteRequest::instance`].
    pub instance: String,
}

/// An invite code and when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteView {
    /// The code to give to `blendnet join`.
    pub code: String,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// `POST /v1/admit`: admit a pending peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitRequest {
    /// The fingerprint shown for the pending peer (or a unique prefix of its peer id).
    pub fingerprint: String,
}

/// `POST /v1/revoke`: revoke a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The peer id or fingerprint of the member.
    pub peer: String,
}

/// A peer an operation acted on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRef {
    /// Its peer id.
    pub peer_id: String,
}

/// `POST /v1/store/add`: import files and directories as one manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreAddRequest {
    /// Absolute paths on the daemon's machine: each file under its name, each directory's
    /// files under the directory's name (or at the top, when it is the only path).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Files under names of the caller's choosing: how a scene keeps its project's layout.
    #[serde(default)]
    pub files: Vec<NamedFile>,
}

/// A file to import, and the relative path it gets in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFile {
    /// An absolute path on the daemon's machine.
    pub path: String,
    /// Its relative path in the manifest (`/`-separated, no `..`).
    pub name: String,
}

/// `POST /v1/jobs/{id}/fetch`: copy a job's finished frames into a folder on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// An absolute path.
    pub out: String,
}

/// What a fetch wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchView {
    /// The files written, sorted.
    pub files: Vec<String>,
    /// The job is done: every frame is in the files.
    pub complete: bool,
}

/// What `store add` imported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreAddView {
    /// The manifest's hash: what `store get` takes.
    pub hash: String,
    pub files: usize,
    pub bytes: u64,
}

/// `POST /v1/store/get`: fetch a manifest and its files, and write them into `out`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreGetRequest {
    pub hash: String,
    /// An absolute directory on the daemon's machine.
    pub out: String,
    /// Fetch only from this peer (a peer id) instead of every member.
    #[serde(default)]
    pub from: Option<String>,
}

/// What `store get` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreGetView {
    pub files: usize,
    /// Bytes of the files.
    pub bytes: u64,
    /// Payload bytes received in this fetch, by provider.
    pub received_from: std::collections::BTreeMap<String, u64>,
    /// Payload bytes that were already here.
    pub resumed: u64,
    /// Providers dropped for sending data that failed verification.
    pub dropped: Vec<String>,
}

impl StoreGetView {
    /// Adds one blob's fetch report.
    pub fn absorb(&mut self, report: &blendnet_store::transfer::FetchReport) {
        for (peer, bytes) in &report.bytes_from {
            *self.received_from.entry(peer.to_string()).or_default() += bytes;
        }
        self.resumed += report.resumed_bytes;
        for peer in &report.dropped {
            let peer = peer.to_string();
            if !self.dropped.contains(&peer) {
                self.dropped.push(peer);
            }
        }
    }
}

/// What `store gc` freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreGcView {
    pub freed: u64,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

/// An error a [`Backend`] returns; each variant is one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// The thing asked for does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The node cannot answer now: starting, shutting down, its actor is gone (503).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status this error is sent with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        error_response(status, self.to_string())
    }
}

/// What the API needs from the node. The daemon implements it on a cloneable handle to its
/// node actor; tests implement it with canned answers.
///
/// The server may drop a returned future before it completes (the client went away), so the
/// futures should be cancel-safe: a request already sent to an actor simply has its reply
/// discarded.
pub trait Backend: Clone + Send + Sync + 'static {
    /// `GET /v1/status`.
    fn status(&self) -> impl Future<Output = Result<StatusView, ApiError>> + Send;
    /// `GET /v1/peers`: connected and known peers, or with `pending` the peers waiting to be
    /// admitted. A JSON array.
    fn peers(
        &self,
        pending: bool,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// `POST /v1/invites`.
    fn invite(
        &self,
        req: InviteRequest,
    ) -> impl Future<Output = Result<InviteView, ApiError>> + Send;
    /// `POST /v1/invites/bind`.
    fn bind_invite(
        &self,
        req: BindRequest,
    ) -> impl Future<Output = Result<InviteView, ApiError>> + Send;
    /// `POST /v1/admit`.
    fn admit(&self, req: AdmitRequest) -> impl Future<Output = Result<PeerRef, ApiError>> + Send;
    /// `POST /v1/revoke`.
    fn revoke(&self, req: RevokeRequest) -> impl Future<Output = Result<PeerRef, ApiError>> + Send;
    /// `POST /v1/store/add`.
    fn store_add(
        &self,
        req: StoreAddRequest,
    ) -> impl Future<Output = Result<StoreAddView, ApiError>> + Send;
    /// `POST /v1/store/get`: answers when the files are written, which may take long.
    fn store_get(
        &self,
        req: StoreGetRequest,
    ) -> impl Future<Output = Result<StoreGetView, ApiError>> + Send;
    /// `GET /v1/store`: the blobs held (a JSON array).
    fn store_list(&self) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// `GET /v1/store/fetches`: progress of running fetches (a JSON array).
    fn store_fetches(&self) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// `POST /v1/store/gc`.
    fn store_gc(&self) -> impl Future<Output = Result<StoreGcView, ApiError>> + Send;
    /// `GET /v1/jobs`: a JSON array.
    fn jobs(&self) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// `GET /v1/jobs/{id}`.
    fn job(&self, id: String) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// `POST /v1/jobs`.
    fn submit(&self, req: SubmitRequest) -> impl Future<Output = Result<JobRef, ApiError>> + Send;
    /// `GET /v1/jobs/{id}/logs`: the logs of the job's tasks rendered here.
    fn job_logs(
        &self,
        id: String,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
    /// `GET /v1/jobs/{id}/preview`: a PNG of the merge of a sample-split frame's slices so far.
    fn job_preview(
        &self,
        id: String,
        query: PreviewQuery,
    ) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send;
    /// `POST /v1/jobs/{id}/fetch`: answers when the files are written.
    fn job_fetch(
        &self,
        id: String,
        req: FetchRequest,
    ) -> impl Future<Output = Result<FetchView, ApiError>> + Send;
    /// `DELETE /v1/jobs/{id}`.
    fn cancel(&self, id: String) -> impl Future<Output = Result<JobRef, ApiError>> + Send;
    /// `POST /v1/cost`: answers after the probe render.
    fn cost(
        &self,
        req: CostRequest,
    ) -> impl Future<Output = Result<crate::cost_cmd::CostView, ApiError>> + Send;
    /// `GET /v1/events`: job changes from now on.
    fn job_changes(&self) -> Result<tokio::sync::broadcast::Receiver<JobChange>, ApiError>;

    /// The cloud instances this node's provisioner runs, with their cost so far.
    fn cloud(&self) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
}

/// A new random API token: [`TOKEN_BYTES`] bytes from the OS-seeded CSPRNG, hex-encoded.
pub fn new_token() -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API's routes and the status page, with the access check and the body limit, over
/// `backend`.
pub fn router<B: Backend>(auth: Arc<Auth>, backend: B) -> Router {
    let api = Router::new()
        .route("/v1/status", get(status::<B>))
        .route("/v1/peers", get(peers::<B>))
        .route("/v1/invites", post(invite::<B>))
        .route("/v1/invites/bind", post(bind_invite::<B>))
        .route("/v1/admit", post(admit::<B>))
        .route("/v1/revoke", post(revoke::<B>))
        .route("/v1/store", get(store_list::<B>))
        .route("/v1/store/add", post(store_add::<B>))
        .route("/v1/store/get", post(store_get::<B>))
        .route("/v1/store/fetches", get(store_fetches::<B>))
        .route("/v1/store/gc", post(store_gc::<B>))
        .route("/v1/jobs", get(jobs::<B>).post(submit::<B>))
        .route("/v1/jobs/{id}", get(job::<B>).delete(cancel::<B>))
        .route("/v1/jobs/{id}/logs", get(job_logs::<B>))
        .route("/v1/jobs/{id}/preview", get(job_preview::<B>))
        .route("/v1/jobs/{id}/fetch", post(job_fetch::<B>))
        .route("/v1/events", get(events::<B>))
        .route("/v1/cost", post(cost::<B>))
        .route("/v1/cloud", get(cloud::<B>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(backend);
    let page = Router::new()
        .route("/", get(web::index))
        .route("/web/{file}", get(web::file))
        .route("/login", get(web::login))
        .route("/v1/web/login", post(web_login))
        .with_state(auth.clone());
    page.merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost: nothing runs, not even body parsing, before the caller is checked.
        .layer(middleware::from_fn_with_state(auth, require_access))
}

/// Serves the API and the page on `listener` until `shutdown` completes, then stops accepting
/// and waits for requests in flight to finish (graceful shutdown).
///
/// Cancelling the returned future drops every connection at once.
pub async fn serve<L>(
    listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Makes a running API discoverable: writes `api.token` (mode 0600), then `api.addr`, both
/// atomically. Call it after the listener is bound and after the data directory's state is
/// opened (which guarantees no other daemon uses the directory). Blocking (fsyncs).
pub fn publish(data_dir: &DataDir, addr: SocketAddr, token: &str) -> Result<(), WriteError> {
    data_dir::write_atomic(
        &data_dir.api_token(),
        format!("{token}\n").as_bytes(),
        data_dir::SECRET_MODE,
    )?;
    data_dir::write_atomic(
        &data_dir.api_addr(),
        format!("{addr}\n").as_bytes(),
        data_dir::PUBLIC_MODE,
    )
}

/// Removes `api.addr` on exit, if it still names `addr` (so a later daemon's file is never
/// removed). A missing file is fine. The token file stays; the next daemon replaces it.
pub fn unpublish(data_dir: &DataDir, addr: SocketAddr) -> std::io::Result<()> {
    let path = data_dir.api_addr();
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim() == addr.to_string() => std::fs::remove_file(&path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn error_response(status: StatusCode, error: String) -> Response {
    (status, axum::Json(ErrorBody { error })).into_response()
}

fn reply<T: Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(value) => axum::Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A body axum could not take: keeps its status (413, 415) except that JSON of the wrong shape
/// is a plain 400 like malformed JSON; the message is serde's.
fn json_rejection(rejection: JsonRejection) -> Response {
    let status = match rejection.status() {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        status => status,
    };
    error_response(status, rejection.body_text())
}

fn query_rejection(rejection: QueryRejection) -> Response {
    error_response(StatusCode::BAD_REQUEST, rejection.body_text())
}

async fn require_access(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // The login link itself, and the style its refusals (and the "log in first" page) use.
    if path == "/login" || path == "/web/style.css" {
        return next.run(req).await;
    }
    let api = path.starts_with("/v1/");
    match auth.credential(req.headers()) {
        Err(message) => unauthorized(message),
        Ok(Some(Credential::Token)) => next.run(req).await,
        Ok(Some(Credential::Session)) => {
            if path == "/v1/web/login" {
                return error_response(
                    StatusCode::FORBIDDEN,
                    "login links are made with the API token (`blendnet web`), not from a page \
                     session"
                        .into(),
                );
            }
            let reads = matches!(*req.method(), Method::GET | Method::HEAD);
            let guarded = req
                .headers()
                .get(web::CSRF_HEADER)
                .is_some_and(|v| v.as_bytes() == web::CSRF_VALUE.as_bytes());
            if !reads && !guarded {
                return error_response(
                    StatusCode::FORBIDDEN,
                    format!(
                        "a change made with the page's session cookie must carry the header \
                         `X-Requested-With: {}`",
                        web::CSRF_VALUE
                    ),
                );
            }
            next.run(req).await
        }
        Ok(None) if api => unauthorized(
            "missing `Authorization: Bearer <token>` header; the token is in api.token in the \
             daemon's data directory (a page session needs the cookie of a `blendnet web` login \
             link)",
        ),
        Ok(None) => web::login_required(),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = error_response(StatusCode::UNAUTHORIZED, message.to_owned());
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed token
/// was right. (The length is not secret: every token has the same one.)
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

async fn not_found(req: Request) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        format!("no such API route: {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// The query of `GET /v1/jobs/{id}/preview`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewQuery {
    /// The frame (default: the job's first frame with samples done, else its first).
    #[serde(default)]
    pub frame: Option<u32>,
    /// The long side in pixels (default [`blendnet_exr::DEFAULT_PREVIEW_SIZE`]).
    #[serde(default)]
    pub size: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersQuery {
    #[serde(default)]
    pending: bool,
}

async fn status<B: Backend>(State(backend): State<B>) -> Response {
    reply(backend.status().await)
}

async fn peers<B: Backend>(
    State(backend): State<B>,
    query: Result<Query<PeersQuery>, QueryRejection>,
) -> Response {
    match query {
        Ok(Query(q)) => reply(backend.peers(q.pending).await),
        Err(rejection) => query_rejection(rejection),
    }
}

async fn invite<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<InviteRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.invite(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn bind_invite<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<BindRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.bind_invite(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn admit<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<AdmitRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.admit(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn revoke<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<RevokeRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.revoke(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn store_add<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<StoreAddRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.store_add(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn store_get<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<StoreGetRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.store_get(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn store_list<B: Backend>(State(backend): State<B>) -> Response {
    reply(backend.store_list().await)
}

async fn store_fetches<B: Backend>(State(backend): State<B>) -> Response {
    reply(backend.store_fetches().await)
}

async fn store_gc<B: Backend>(State(backend): State<B>) -> Response {
    reply(backend.store_gc().await)
}

async fn jobs<B: Backend>(State(backend): State<B>) -> Response {
    reply(backend.jobs().await)
}

async fn job<B: Backend>(State(backend): State<B>, Path(id): Path<String>) -> Response {
    reply(backend.job(id).await)
}

async fn submit<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<SubmitRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.submit(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn cost<B: Backend>(
    State(backend): State<B>,
    body: Result<axum::Json<CostRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.cost(req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn cloud<B: Backend>(State(backend): State<B>) -> Response {
    reply(backend.cloud().await)
}

async fn web_login(State(auth): State<Arc<Auth>>) -> Response {
    axum::Json(auth.login()).into_response()
}

async fn job_logs<B: Backend>(State(backend): State<B>, Path(id): Path<String>) -> Response {
    reply(backend.job_logs(id).await)
}

async fn job_preview<B: Backend>(
    State(backend): State<B>,
    Path(id): Path<String>,
    query: Result<Query<PreviewQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(rejection) => return query_rejection(rejection),
    };
    match backend.job_preview(id, query).await {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn job_fetch<B: Backend>(
    State(backend): State<B>,
    Path(id): Path<String>,
    body: Result<axum::Json<FetchRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(req)) => reply(backend.job_fetch(id, req).await),
        Err(rejection) => json_rejection(rejection),
    }
}

async fn cancel<B: Backend>(State(backend): State<B>, Path(id): Path<String>) -> Response {
    reply(backend.cancel(id).await)
}

/// How often an idle event stream sends a comment, so proxies and clients see it is alive.
const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

async fn events<B: Backend>(State(backend): State<B>) -> Response {
    let changes = match backend.job_changes() {
        Ok(changes) => changes,
        Err(e) => return e.into_response(),
    };
    let stream = futures::stream::unfold(changes, |mut changes| async move {
        loop {
            match changes.recv().await {
                Ok(change) => {
                    let event = SseEvent::default().event("job").json_data(&change);
                    return Some((event, changes));
                }
                // A slow reader missed some: the next change still says which job to read.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response()
}

/// A backend with canned answers, shared by the tests of this module and of `client`.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// Answers depend on the request, so tests can reach every error variant.
    #[derive(Debug, Clone)]
    pub(crate) struct FakeBackend;

    impl Backend for FakeBackend {
        async fn status(&self) -> Result<StatusView, ApiError> {
            Ok(StatusView {
                peer_id: "12D3KooWFake".into(),
                fingerprint: "ABCD-EFGH".into(),
                mesh_id: Some("mesh1".into()),
                member: true,
                state: "member".into(),
                roles: vec!["submit".into(), "render".into()],
                listen_addrs: vec!["/ip4/127.0.0.1/tcp/7741".into()],
                peer_count: 2,
                version: "0.1.0".into(),
            })
        }

        async fn peers(&self, pending: bool) -> Result<serde_json::Value, ApiError> {
            Ok(serde_json::json!([{ "peer_id": "p1", "pending": pending }]))
        }

        async fn invite(&self, req: InviteRequest) -> Result<InviteView, ApiError> {
            if req.ttl_secs == 0 {
                return Err(ApiError::BadRequest("ttl_secs must be positive".into()));
            }
            Ok(InviteView {
                code: format!("code:{}", req.roles.join(",")),
                expires_at: 1_000 + req.ttl_secs,
            })
        }

        async fn bind_invite(&self, req: BindRequest) -> Result<InviteView, ApiError> {
            Ok(InviteView {
                code: req.code,
                expires_at: 1_000,
            })
        }

        async fn admit(&self, req: AdmitRequest) -> Result<PeerRef, ApiError> {
            match req.fingerprint.as_str() {
                "missing" => Err(ApiError::NotFound("no pending peer".into())),
                "member" => Err(ApiError::Conflict("already a member".into())),
                "starting" => Err(ApiError::Unavailable("node is starting".into())),
                "bug" => Err(ApiError::Internal("actor gone".into())),
                fp => Ok(PeerRef {
                    peer_id: format!("peer-{fp}"),
                }),
            }
        }

        async fn revoke(&self, req: RevokeRequest) -> Result<PeerRef, ApiError> {
            Ok(PeerRef { peer_id: req.peer })
        }

        async fn store_add(&self, req: StoreAddRequest) -> Result<StoreAddView, ApiError> {
            Ok(StoreAddView {
                hash: "00".repeat(32),
                files: req.paths.len(),
                bytes: 0,
            })
        }

        async fn store_get(&self, _req: StoreGetRequest) -> Result<StoreGetView, ApiError> {
            Ok(StoreGetView::default())
        }

        async fn store_list(&self) -> Result<serde_json::Value, ApiError> {
            Ok(serde_json::json!([]))
        }

        async fn store_fetches(&self) -> Result<serde_json::Value, ApiError> {
            Ok(serde_json::json!([]))
        }

        async fn store_gc(&self) -> Result<StoreGcView, ApiError> {
            Ok(StoreGcView { freed: 0 })
        }

        async fn jobs(&self) -> Result<serde_json::Value, ApiError> {
            Ok(serde_json::json!([]))
        }

        async fn job(&self, id: String) -> Result<serde_json::Value, ApiError> {
            Err(ApiError::NotFound(format!("no job {id}")))
        }

        async fn submit(&self, req: SubmitRequest) -> Result<JobRef, ApiError> {
            Ok(JobRef { job: req.scene })
        }

        async fn cancel(&self, id: String) -> Result<JobRef, ApiError> {
            Ok(JobRef { job: id })
        }

        async fn job_logs(&self, _id: String) -> Result<serde_json::Value, ApiError> {
            Ok(serde_json::json!([]))
        }

        async fn job_preview(&self, id: String, _query: PreviewQuery) -> Result<Vec<u8>, ApiError> {
            Err(ApiError::NotFound(format!("no job {id}")))
        }

        async fn job_fetch(&self, id: String, _req: FetchRequest) -> Result<FetchView, ApiError> {
            Err(ApiError::NotFound(format!("no job {id}")))
        }

        fn job_changes(&self) -> Result<tokio::sync::broadcast::Receiver<JobChange>, ApiError> {
            Err(ApiError::Unavailable("no job board here".into()))
        }

        async fn cost(&self, req: CostRequest) -> Result<crate::cost_cmd::CostView, ApiError> {
            Err(ApiError::BadRequest(format!("{} is not a file", req.scene)))
        }

        async fn cloud(&self) -> Result<serde_json::Value, ApiError> {
            Err(ApiError::NotFound("no provisioner here".into()))
        }
    }

    /// Serves [`FakeBackend`] on a free loopback port until the returned sender is dropped.
    pub(crate) async fn spawn(
        token: &str,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let auth = Arc::new(Auth::new(
            token.to_owned(),
            web::Places {
                local: addr,
                remote: None,
            },
        ));
        let task = tokio::spawn(serve(listener, router(auth, FakeBackend), async move {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TOKEN: &str = "0123456789abcdef";

    /// Bounds every wait of these tests.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// One raw HTTP/1.1 exchange, so the tests control every header and byte.
    async fn raw(
        addr: SocketAddr,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&[u8]>,
    ) -> (u16, String, serde_json::Value) {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        raw_with(addr, method, path, &headers, body).await
    }

    /// [`raw`] with any headers.
    async fn raw_with(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> (u16, String, serde_json::Value) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());

        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(&bytes).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            response
        };
        let response = tokio::time::timeout(TEST_TIMEOUT, exchange).await.unwrap();
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
        (status, head.to_owned(), json)
    }

    fn bearer() -> String {
        format!("Bearer {TOKEN}")
    }

    /// The value of header `name` in a response head.
    fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn a_login_link_works_once_and_its_cookie_opens_the_page_and_the_api() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;
        let bearer = bearer();

        // Without a token or a cookie, neither the page nor the API answers.
        let (status, head, _) = raw(addr, "GET", "/", None, None).await;
        assert_eq!(status, 401, "{head}");
        assert!(
            header_of(&head, "content-type")
                .unwrap()
                .starts_with("text/html")
        );
        let (status, _, _) = raw(addr, "GET", "/web/app.js", None, None).await;
        assert_eq!(status, 401);
        // Only the style is open: the refusal pages use it.
        let (status, head, _) = raw(addr, "GET", "/web/style.css", None, None).await;
        assert_eq!(status, 200, "{head}");

        let (status, _, login) = raw(addr, "POST", "/v1/web/login", Some(&bearer), None).await;
        assert_eq!(status, 200, "{login}");
        let url = login["url"].as_str().unwrap();
        assert!(
            url.starts_with(&format!("http://{addr}/login?code=")),
            "{url}"
        );
        let path = &url[url.find("/login").unwrap()..];

        let (status, head, _) = raw(addr, "GET", path, None, None).await;
        assert_eq!(status, 303, "{head}");
        assert_eq!(header_of(&head, "location"), Some("/"));
        assert_eq!(header_of(&head, "referrer-policy"), Some("no-referrer"));
        let set_cookie = header_of(&head, "set-cookie").unwrap();
        assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
        assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
        assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
        let cookie = set_cookie.split(';').next().unwrap();
        assert!(cookie.starts_with("blendnet_session="), "{cookie}");

        // The link works once.
        let (status, head, _) = raw(addr, "GET", path, None, None).await;
        assert_eq!(status, 401, "{head}");
        assert!(header_of(&head, "set-cookie").is_none());
        let (status, _, _) = raw(addr, "GET", "/login?code=0000", None, None).await;
        assert_eq!(status, 401);

        let with_cookie = [("Cookie", cookie)];
        let (status, head, _) = raw_with(addr, "GET", "/", &with_cookie, None).await;
        assert_eq!(status, 200, "{head}");
        assert!(
            header_of(&head, "content-security-policy")
                .unwrap()
                .contains("default-src 'self'")
        );
        let (status, head, _) = raw_with(addr, "GET", "/web/style.css", &with_cookie, None).await;
        assert_eq!(status, 200, "{head}");
        let (status, _, body) = raw_with(addr, "GET", "/v1/status", &with_cookie, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["peer_id"], "12D3KooWFake");

        // Another cookie, or a session id one character off, is no session.
        let forged = format!("{}0", &cookie[..cookie.len() - 1]);
        let (status, _, _) =
            raw_with(addr, "GET", "/v1/status", &[("Cookie", &forged)], None).await;
        assert_eq!(status, 401);
        let (status, _, _) =
            raw_with(addr, "GET", "/v1/status", &[("Cookie", "other=1")], None).await;
        assert_eq!(status, 401);

        // A change made with the cookie needs the cross-site guard header.
        let (status, _, body) = raw_with(addr, "DELETE", "/v1/jobs/j1", &with_cookie, None).await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("X-Requested-With"),
            "{body}"
        );
        let guarded = [("Cookie", cookie), ("X-Requested-With", "blendnet")];
        let (status, _, body) = raw_with(addr, "DELETE", "/v1/jobs/j1", &guarded, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["job"], "j1");

        // A page session cannot make more login links.
        let (status, _, _) = raw_with(addr, "POST", "/v1/web/login", &guarded, None).await;
        assert_eq!(status, 403);
    }

    #[tokio::test]
    async fn token_is_required() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;

        let (status, head, body) = raw(addr, "GET", "/v1/status", None, None).await;
        assert_eq!(status, 401);
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer")
        );
        assert!(
            body["error"].as_str().unwrap().contains("missing"),
            "{body}"
        );

        let (status, _, body) = raw(addr, "GET", "/v1/status", Some("Bearer nope"), None).await;
        assert_eq!(status, 401);
        assert!(body["error"].as_str().unwrap().contains("wrong"), "{body}");

        // Right length, one character off.
        let almost = format!("Bearer {}0", &TOKEN[..TOKEN.len() - 1]);
        let (status, _, _) = raw(addr, "GET", "/v1/status", Some(&almost), None).await;
        assert_eq!(status, 401);

        let (status, _, body) = raw(addr, "GET", "/v1/status", Some(TOKEN), None).await;
        assert_eq!(status, 401);
        assert!(
            body["error"].as_str().unwrap().contains("malformed"),
            "{body}"
        );

        // Even an unknown route does not tell an unauthenticated caller anything.
        let (status, _, _) = raw(addr, "GET", "/v1/nothing", None, None).await;
        assert_eq!(status, 401);
        // POST bodies are not parsed before the token is checked.
        let (status, _, _) = raw(addr, "POST", "/v1/admit", None, Some(b"{")).await;
        assert_eq!(status, 401);
    }

    #[tokio::test]
    async fn right_token_gets_answers() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;
        let (status, _, body) = raw(addr, "GET", "/v1/status", Some(&bearer()), None).await;
        assert_eq!(status, 200);
        let view: StatusView = serde_json::from_value(body).unwrap();
        assert_eq!(view.peer_id, "12D3KooWFake");
        assert_eq!(view.peer_count, 2);

        // Scheme is case-insensitive.
        let lower = format!("bearer {TOKEN}");
        let (status, _, _) = raw(addr, "GET", "/v1/status", Some(&lower), None).await;
        assert_eq!(status, 200);

        let (status, _, body) = raw(addr, "GET", "/v1/peers", Some(&bearer()), None).await;
        assert_eq!(status, 200);
        assert_eq!(body[0]["pending"], false);
        let (_, _, body) = raw(addr, "GET", "/v1/peers?pending=true", Some(&bearer()), None).await;
        assert_eq!(body[0]["pending"], true);
        let (status, _, _) = raw(
            addr,
            "GET",
            "/v1/peers?pending=maybe",
            Some(&bearer()),
            None,
        )
        .await;
        assert_eq!(status, 400);

        let (status, _, body) = raw(
            addr,
            "POST",
            "/v1/invites",
            Some(&bearer()),
            Some(br#"{"ttl_secs": 60, "roles": ["render", "submit"]}"#),
        )
        .await;
        assert_eq!(status, 200);
        let view: InviteView = serde_json::from_value(body).unwrap();
        assert_eq!(view.code, "code:render,submit");
        assert_eq!(view.expires_at, 1_060);

        let (status, _, body) = raw(
            addr,
            "POST",
            "/v1/revoke",
            Some(&bearer()),
            Some(br#"{"peer": "12D3KooWX"}"#),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body["peer_id"], "12D3KooWX");
    }

    #[tokio::test]
    async fn bad_bodies_are_400_with_serde_message() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;
        let (status, _, body) = raw(
            addr,
            "POST",
            "/v1/admit",
            Some(&bearer()),
            Some(b"{\"finger"),
        )
        .await;
        assert_eq!(status, 400);
        assert!(body["error"].is_string(), "{body}");

        // Well-formed JSON of the wrong shape.
        let (status, _, body) = raw(
            addr,
            "POST",
            "/v1/admit",
            Some(&bearer()),
            Some(br#"{"fingerprint": 5}"#),
        )
        .await;
        assert_eq!(status, 400);
        assert!(
            body["error"].as_str().unwrap().contains("invalid type"),
            "{body}"
        );

        let (status, _, body) = raw(
            addr,
            "POST",
            "/v1/admit",
            Some(&bearer()),
            Some(br#"{"fingerprint": "a", "extra": 1}"#),
        )
        .await;
        assert_eq!(status, 400);
        assert!(body["error"].as_str().unwrap().contains("extra"), "{body}");
    }

    #[tokio::test]
    async fn oversize_body_is_413() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;
        let mut big = br#"{"fingerprint": ""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_BODY_BYTES));
        big.extend_from_slice(br#""}"#);
        let (status, _, body) = raw(addr, "POST", "/v1/admit", Some(&bearer()), Some(&big)).await;
        assert_eq!(status, 413);
        assert!(body["error"].is_string(), "{body}");

        // Just under the limit is accepted.
        let mut ok = br#"{"fingerprint": ""#.to_vec();
        ok.extend(std::iter::repeat_n(b'a', MAX_BODY_BYTES - 64));
        ok.extend_from_slice(br#""}"#);
        let (status, _, _) = raw(addr, "POST", "/v1/admit", Some(&bearer()), Some(&ok)).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn cost_takes_a_scene_and_names_what_is_wrong() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;
        let body = br#"{"scene": "/nope/shot.blend", "frames": [1, 2], "provider": "local"}"#;
        let (status, _, _) = raw(addr, "POST", "/v1/cost", None, Some(body)).await;
        assert_eq!(status, 401);
        let (status, _, json) = raw(addr, "POST", "/v1/cost", Some(&bearer()), Some(body)).await;
        assert_eq!(status, 400);
        assert!(
            json["error"].as_str().unwrap().contains("/nope/shot.blend"),
            "{json}"
        );
        let odd = br#"{"scene": "/a.blend", "sample": 3}"#;
        let (status, _, json) = raw(addr, "POST", "/v1/cost", Some(&bearer()), Some(odd)).await;
        assert_eq!(status, 400);
        assert!(json["error"].as_str().unwrap().contains("sample"), "{json}");
    }

    #[tokio::test]
    async fn backend_errors_map_to_statuses() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;
        for (fingerprint, want, text) in [
            ("missing", 404, "no pending peer"),
            ("member", 409, "already a member"),
            ("starting", 503, "node is starting"),
            ("bug", 500, "actor gone"),
        ] {
            let body = format!(r#"{{"fingerprint": "{fingerprint}"}}"#);
            let (status, _, json) = raw(
                addr,
                "POST",
                "/v1/admit",
                Some(&bearer()),
                Some(body.as_bytes()),
            )
            .await;
            assert_eq!(status, want, "{fingerprint}");
            assert_eq!(json["error"], text);
        }
        let (status, _, json) = raw(
            addr,
            "POST",
            "/v1/invites",
            Some(&bearer()),
            Some(br#"{"ttl_secs": 0, "roles": []}"#),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(json["error"], "ttl_secs must be positive");
    }

    #[tokio::test]
    async fn unknown_route_and_method_are_json_errors() {
        let (addr, _stop, _task) = fake::spawn(TOKEN).await;
        let (status, _, body) = raw(addr, "GET", "/v1/nothing", Some(&bearer()), None).await;
        assert_eq!(status, 404);
        assert!(body["error"].as_str().unwrap().contains("/v1/nothing"));
        let (status, _, body) = raw(addr, "GET", "/v1/admit", Some(&bearer()), None).await;
        assert_eq!(status, 405);
        assert!(body["error"].is_string());
    }

    #[tokio::test]
    async fn graceful_shutdown_ends_serve() {
        let (_addr, stop, task) = fake::spawn(TOKEN).await;
        drop(stop);
        let result = tokio::time::timeout(TEST_TIMEOUT, task).await.unwrap();
        result.unwrap().unwrap();
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = new_token();
        let b = new_token();
        assert_eq!(a.len(), TOKEN_BYTES * 2);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[cfg(unix)]
    #[test]
    fn publish_writes_token_then_addr_and_unpublish_removes_addr() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let addr: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        publish(&dir, addr, "tok").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.api_addr()).unwrap(),
            "127.0.0.1:4567\n"
        );
        assert_eq!(
            String::from_utf8(data_dir::read_secret(&dir.api_token()).unwrap()).unwrap(),
            "tok\n"
        );
        let mode = std::fs::metadata(dir.api_token())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Another daemon's address is left alone.
        unpublish(&dir, "127.0.0.1:1".parse().unwrap()).unwrap();
        assert!(dir.api_addr().exists());
        unpublish(&dir, addr).unwrap();
        assert!(!dir.api_addr().exists());
        // Twice is fine.
        unpublish(&dir, addr).unwrap();
    }
}
