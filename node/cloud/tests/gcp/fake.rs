//! A fake of the Google endpoints the GCP provider talks to, on one loopback port, as strict as
//! the real ones about what it is sent:
//!
//! - `POST /token`: Google's OAuth token endpoint for the JWT-bearer grant. The assertion must
//!   be an RS256 JWT signed by the test's service-account key, for this endpoint (`aud`), from
//!   the key's `client_email` (`iss`), with the `cloud-platform` scope, issued now and valid for
//!   at most an hour. Refusals are OAuth errors (`{"error":"invalid_grant",...}`).
//! - `/compute/v1/projects/{project}/...`: `zones/{z}/instances` (insert, list, get, delete),
//!   `aggregated/instances`, `zones/{z}/operations/{op}` (get, wait), `zones/{z}/machineTypes`
//!   (list, get). Request bodies are read into `deny_unknown_fields` structs with the real API's
//!   field names and enums, then checked as Compute Engine checks them (names, URLs, labels,
//!   scheduling rules). A stockout or a quota for a chosen zone and type fails the insert's
//!   operation, as Compute Engine does.
//! - `/v1/services/{id}/skus`: the Billing Catalog, in the pages the test sets.
//! - `/computeMetadata/v1/instance/...`: the metadata server (`Metadata-Flavor: Google`
//!   required), `preempted` and `attributes/{key}` of the instance the test points it at.
//!
//! Compute and billing calls need `Authorization: Bearer` with a token this fake issued and has
//! not revoked; errors use Google's body `{"error":{"code","message","errors":[{"reason"}]}}`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

pub(crate) const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
pub(crate) const COMPUTE_SERVICE: &str = "6F81-5844-456A";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Largest request body read.
const MAX_BODY: usize = 1 << 20;
/// Compute Engine's limit on one metadata value.
const MAX_METADATA_VALUE: usize = 256 * 1024;

/// A machine type the fake's zones offer.
#[derive(Debug, Clone)]
pub(crate) struct MachineType {
    pub name: &'static str,
    pub cpus: u32,
    pub memory_mb: u64,
    pub gpus: u32,
    pub shared: bool,
}

/// An operation: advances one status per read, PENDING → RUNNING → DONE.
#[derive(Debug, Clone)]
struct Operation {
    name: String,
    zone: String,
    kind: &'static str,
    target: String,
    status: &'static str,
    /// What happens when it is done: an instance created, or an error.
    create: Option<Value>,
    error: Option<(u16, &'static str, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct FakeState {
    pub project: String,
    pub client_email: String,
    /// The service account's public key (PKCS#1 DER).
    pub public_key: Vec<u8>,
    pub token_url: String,
    /// Seconds a token is said to last.
    pub token_lifetime: u64,
    pub tokens: HashSet<String>,
    pub token_requests: usize,
    pub zones: Vec<String>,
    pub machine_types: Vec<MachineType>,
    /// (zone, name) → the instance as Compute answers it.
    pub instances: BTreeMap<(String, String), Value>,
    /// Every insert body accepted, in order.
    pub inserts: Vec<Value>,
    operations: HashMap<String, Operation>,
    /// requestId → operation name: an insert sent twice is done once.
    request_ids: HashMap<String, String>,
    /// (zone, type) answered with a stockout.
    pub stockouts: HashSet<(String, String)>,
    /// Types answered with QUOTA_EXCEEDED.
    pub quota_exceeded: HashSet<String>,
    /// Most results per page, whatever `maxResults` says (to make listings page).
    pub page_limit: usize,
    pub sku_pages: Vec<Vec<Value>>,
    pub sku_requests: usize,
    /// The instance the metadata server describes.
    pub metadata_instance: Option<String>,
    pub preempted: bool,
    counter: u64,
}

impl FakeState {
    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// A token, as the token endpoint issues them.
    pub(crate) fn issue_token(&mut self) -> String {
        let id = self.next_id();
        let token = format!("ya29.fake-{id}-{}", std::process::id());
        self.tokens.insert(token.clone());
        token
    }
}

/// The fake, serving until dropped.
#[derive(Debug)]
pub(crate) struct Fake {
    pub url: String,
    pub state: Arc<Mutex<FakeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    pub(crate) async fn start(
        project: &str,
        client_email: &str,
        public_key: Vec<u8>,
        zones: &[&str],
        machine_types: Vec<MachineType>,
    ) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        let state = Arc::new(Mutex::new(FakeState {
            project: project.into(),
            client_email: client_email.into(),
            public_key,
            token_url: format!("{url}/token"),
            token_lifetime: 3599,
            zones: zones.iter().map(|z| z.to_string()).collect(),
            machine_types,
            page_limit: 500,
            ..FakeState::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake { url, state, task }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
}

type Shared = Arc<Mutex<FakeState>>;

/// Google's error body.
pub(crate) fn google_error(status: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "error": {
            "code": status.as_u16(),
            "message": message,
            "errors": [{ "message": message, "domain": "global", "reason": reason }],
        }
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_ok(value: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn bad(message: impl Into<String>) -> Response {
    google_error(StatusCode::BAD_REQUEST, "invalid", &message.into())
}

fn not_found(what: &str) -> Response {
    google_error(
        StatusCode::NOT_FOUND,
        "notFound",
        &format!("The resource '{what}' was not found"),
    )
}

async fn handle(State(state): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(Body::new(body), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return bad("request body too large"),
    };
    let path = parts.uri.path().to_owned();
    let query = parse_query(parts.uri.query().unwrap_or(""));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut state = state.lock().unwrap();
    match segments.as_slice() {
        ["token"] if parts.method == Method::POST => token(&mut state, &parts.headers, &body),
        ["computeMetadata", "v1", "instance", rest @ ..] => metadata(&state, &parts.headers, rest),
        ["compute", "v1", "projects", project, rest @ ..] => {
            if let Err(e) = check_bearer(&state, &parts.headers) {
                return *e;
            }
            if *project != state.project {
                return google_error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &format!(
                        "Required 'compute.instances.list' permission for 'projects/{project}'"
                    ),
                );
            }
            compute(&mut state, &parts.method, rest, &query, &body)
        }
        ["v1", "services", service, "skus"] if parts.method == Method::GET => {
            if let Err(e) = check_bearer(&state, &parts.headers) {
                return *e;
            }
            if *service != COMPUTE_SERVICE {
                return not_found(&format!("services/{service}"));
            }
            skus(&mut state, &query)
        }
        _ => not_found(&path),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding of one part.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- OAuth ----

fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": error, "error_description": description }).to_string(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtHeader {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtClaims {
    iss: String,
    aud: String,
    scope: String,
    exp: i64,
    iat: i64,
    #[serde(default)]
    sub: Option<String>,
}

fn b64url(part: &str) -> Option<Vec<u8>> {
    data_encoding::BASE64URL_NOPAD
        .decode(part.trim_end_matches('=').as_bytes())
        .ok()
}

fn token(state: &mut FakeState, headers: &HeaderMap, body: &[u8]) -> Response {
    state.token_requests += 1;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return oauth_error("invalid_request", "expected a form body");
    }
    let form = parse_query(&String::from_utf8_lossy(body));
    if form.get("grant_type").map(String::as_str) != Some(GRANT_TYPE) {
        return oauth_error("unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error("invalid_request", "Missing required parameter: assertion");
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [head, claims, signature] = parts.as_slice() else {
        return oauth_error("invalid_grant", "Invalid JWT: not three parts");
    };
    let Some(header) = b64url(head).and_then(|h| serde_json::from_slice::<JwtHeader>(&h).ok())
    else {
        return oauth_error("invalid_grant", "Invalid JWT header");
    };
    if header.alg != "RS256" || header.typ.as_deref().is_some_and(|t| t != "JWT") {
        return oauth_error("invalid_grant", "Invalid JWT: alg must be RS256");
    }
    let _ = header.kid;
    let claims: JwtClaims = match b64url(claims).map(|c| serde_json::from_slice(&c)) {
        Some(Ok(c)) => c,
        Some(Err(e)) => return oauth_error("invalid_grant", &format!("Invalid JWT claims: {e}")),
        None => return oauth_error("invalid_grant", "Invalid JWT claims encoding"),
    };
    let Some(signature) = b64url(signature) else {
        return oauth_error("invalid_grant", "Invalid JWT signature encoding");
    };
    let signed = format!("{head}.{}", parts[1]);
    if UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &state.public_key)
        .verify(signed.as_bytes(), &signature)
        .is_err()
    {
        return oauth_error("invalid_grant", "Invalid JWT Signature.");
    }
    if claims.iss != state.client_email {
        return oauth_error("invalid_grant", "Invalid JWT: unknown issuer");
    }
    if claims.aud != state.token_url {
        return oauth_error(
            "invalid_grant",
            &format!(
                "Invalid JWT: audience {} is not {}",
                claims.aud, state.token_url
            ),
        );
    }
    let now = now() as i64;
    if (claims.iat - now).abs() > 300 || claims.exp <= now || claims.exp - claims.iat > 3600 {
        return oauth_error(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe",
        );
    }
    if claims.sub.is_some() {
        return oauth_error("unauthorized_client", "no domain-wide delegation here");
    }
    if !claims.scope.split(' ').any(|s| s == CLOUD_PLATFORM) {
        return oauth_error("invalid_scope", "the cloud-platform scope is required");
    }
    let access_token = state.issue_token();
    json_ok(json!({
        "access_token": access_token,
        "expires_in": state.token_lifetime,
        "token_type": "Bearer",
    }))
}

fn check_bearer(state: &FakeState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) if state.tokens.contains(t) => Ok(()),
        _ => Err(Box::new(google_error(
            StatusCode::UNAUTHORIZED,
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential.",
        ))),
    }
}

// ---- Metadata server ----

fn metadata(state: &FakeState, headers: &HeaderMap, rest: &[&str]) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing required header: \"Metadata-Flavor\"\n",
        )
            .into_response();
    }
    let text = match rest {
        ["preempted"] => Some(if state.preempted { "TRUE" } else { "FALSE" }.to_owned()),
        ["attributes", key] => state.metadata_instance.as_ref().and_then(|name| {
            let instance = state.instances.iter().find(|((_, n), _)| n == name)?.1;
            instance["metadata"]["items"]
                .as_array()?
                .iter()
                .find(|i| i["key"] == *key)?["value"]
                .as_str()
                .map(str::to_owned)
        }),
        _ => None,
    };
    match text {
        Some(text) => (StatusCode::OK, [("metadata-flavor", "Google")], text).into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

// ---- Compute ----

/// An int64 in Google's JSON: a string, or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Int64 {
    Text(String),
    Number(i64),
}

impl Int64 {
    fn value(&self) -> Option<i64> {
        match self {
            Int64::Text(s) => s.parse().ok(),
            Int64::Number(n) => Some(*n),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InsertInstance {
    name: String,
    machine_type: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    scheduling: Option<Scheduling>,
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    disks: Vec<AttachedDisk>,
    #[serde(default)]
    network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    service_accounts: Vec<ServiceAccount>,
    #[serde(default)]
    tags: Option<NetworkTags>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ProvisioningModel {
    Spot,
    Standard,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum TerminationAction {
    Delete,
    Stop,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum OnHostMaintenance {
    Migrate,
    Terminate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Scheduling {
    #[serde(default)]
    provisioning_model: Option<ProvisioningModel>,
    #[serde(default)]
    instance_termination_action: Option<TerminationAction>,
    #[serde(default)]
    automatic_restart: Option<bool>,
    #[serde(default)]
    on_host_maintenance: Option<OnHostMaintenance>,
    #[serde(default)]
    preemptible: Option<bool>,
    #[serde(default)]
    max_run_duration: Option<GoogleDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoogleDuration {
    seconds: Int64,
    #[serde(default)]
    nanos: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(default)]
    items: Vec<MetadataItem>,
    #[serde(default)]
    fingerprint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataItem {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum DiskKind {
    Persistent,
    Scratch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AttachedDisk {
    #[serde(default)]
    boot: Option<bool>,
    #[serde(default)]
    auto_delete: Option<bool>,
    #[serde(default, rename = "type")]
    kind: Option<DiskKind>,
    #[serde(default)]
    device_name: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    initialize_params: Option<InitializeParams>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InitializeParams {
    #[serde(default)]
    source_image: Option<String>,
    #[serde(default)]
    disk_size_gb: Option<Int64>,
    #[serde(default)]
    disk_type: Option<String>,
    #[serde(default)]
    disk_name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NetworkInterface {
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    subnetwork: Option<String>,
    #[serde(default)]
    access_configs: Vec<AccessConfig>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum AccessConfigKind {
    OneToOneNat,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum NetworkTier {
    Premium,
    Standard,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AccessConfig {
    #[serde(rename = "type")]
    kind: AccessConfigKind,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    network_tier: Option<NetworkTier>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceAccount {
    email: String,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkTags {
    #[serde(default)]
    items: Vec<String>,
}

/// `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`
pub(crate) fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

fn valid_label(key: &str, value: &str) -> bool {
    let ok = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
    };
    ok(key) && key.as_bytes().first().is_some_and(u8::is_ascii_lowercase) && ok(value)
}

fn valid_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|c| c.is_ascii_hexdigit()))
        && s.bytes().any(|c| c != b'0' && c != b'-')
}

/// Strips `https://compute.googleapis.com/compute/v1/` or `https://www.googleapis.com/compute/v1/`.
fn strip_host(url: &str) -> &str {
    for host in [
        "https://compute.googleapis.com/compute/v1/",
        "https://www.googleapis.com/compute/v1/",
    ] {
        if let Some(rest) = url.strip_prefix(host) {
            return rest;
        }
    }
    url
}

/// `zones/{z}/{collection}/{name}` (optionally under `projects/{project}/`, or a full URL).
fn zonal<'a>(url: &'a str, project: &str, collection: &str) -> Option<(&'a str, &'a str)> {
    let rest = strip_host(url);
    let rest = match rest.strip_prefix("projects/") {
        Some(r) => r.strip_prefix(project)?.strip_prefix('/')?,
        None => rest,
    };
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["zones", zone, c, name] if *c == collection => Some((zone, name)),
        _ => None,
    }
}

fn valid_image(url: &str) -> bool {
    let rest = strip_host(url);
    let parts: Vec<&str> = rest.split('/').collect();
    let tail = match parts.as_slice() {
        ["projects", p, "global", "images", tail @ ..] if valid_name(p) => tail,
        ["global", "images", tail @ ..] => tail,
        _ => return false,
    };
    matches!(tail, [name] | ["family", name] if valid_name(name))
}

fn valid_network(url: &str, project: &str) -> bool {
    let rest = strip_host(url);
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["global", "networks", name] => valid_name(name),
        ["projects", p, "global", "networks", name] => *p == project && valid_name(name),
        _ => false,
    }
}

fn compute(
    state: &mut FakeState,
    method: &Method,
    rest: &[&str],
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    match (method, rest) {
        (&Method::POST, ["zones", zone, "instances"]) => insert(state, zone, query, body),
        (&Method::GET, ["zones", zone, "instances"]) => {
            let zone = zone.to_string();
            if !state.zones.contains(&zone) {
                return not_found(&format!("projects/{}/zones/{zone}", state.project));
            }
            list(state, query, Some(&zone))
        }
        (&Method::GET, ["aggregated", "instances"]) => list(state, query, None),
        (&Method::GET, ["zones", zone, "instances", name]) => {
            let key = (zone.to_string(), name.to_string());
            match state.instances.get_mut(&key) {
                Some(instance) => {
                    advance(instance);
                    json_ok(instance.clone())
                }
                None => not_found(&format!(
                    "projects/{}/zones/{zone}/instances/{name}",
                    state.project
                )),
            }
        }
        (&Method::DELETE, ["zones", zone, "instances", name]) => {
            let key = (zone.to_string(), name.to_string());
            if state.instances.remove(&key).is_none() {
                return not_found(&format!(
                    "projects/{}/zones/{zone}/instances/{name}",
                    state.project
                ));
            }
            let id = state.next_id();
            let op = Operation {
                name: format!("operation-{id}-delete"),
                zone: zone.to_string(),
                kind: "delete",
                target: name.to_string(),
                status: "DONE",
                create: None,
                error: None,
            };
            let answer = operation_json(state, &op);
            state.operations.insert(op.name.clone(), op);
            json_ok(answer)
        }
        (&Method::GET, ["zones", zone, "operations", name])
        | (&Method::POST, ["zones", zone, "operations", name, "wait"]) => {
            let Some(mut op) = state.operations.get(*name).cloned() else {
                return not_found(&format!(
                    "projects/{}/zones/{zone}/operations/{name}",
                    state.project
                ));
            };
            if op.zone != *zone {
                return not_found(&format!(
                    "projects/{}/zones/{zone}/operations/{name}",
                    state.project
                ));
            }
            op.status = match op.status {
                "PENDING" => "RUNNING",
                _ => "DONE",
            };
            if op.status == "DONE"
                && let Some(instance) = op.create.take()
            {
                state
                    .instances
                    .insert((op.zone.clone(), op.target.clone()), instance);
            }
            let answer = operation_json(state, &op);
            state.operations.insert(op.name.clone(), op);
            json_ok(answer)
        }
        (&Method::GET, ["zones", zone, "machineTypes"]) => {
            if !state.zones.contains(&zone.to_string()) {
                return not_found(&format!("projects/{}/zones/{zone}", state.project));
            }
            let all: Vec<Value> = state
                .machine_types
                .iter()
                .map(|t| machine_type_json(state, zone, t))
                .collect();
            paged(
                state,
                query,
                all,
                |items| json!({ "kind": "compute#machineTypeList", "items": items }),
            )
        }
        (&Method::GET, ["zones", zone, "machineTypes", name]) => {
            match state.machine_types.iter().find(|t| t.name == *name) {
                Some(t) if state.zones.contains(&zone.to_string()) => {
                    json_ok(machine_type_json(state, zone, t))
                }
                _ => not_found(&format!(
                    "projects/{}/zones/{zone}/machineTypes/{name}",
                    state.project
                )),
            }
        }
        _ => not_found(&rest.join("/")),
    }
}

/// One page of `all` as `maxResults`/`pageToken` ask (tokens are offsets), wrapped by `wrap`.
fn paged(
    state: &FakeState,
    query: &HashMap<String, String>,
    all: Vec<Value>,
    wrap: impl Fn(Vec<Value>) -> Value,
) -> Response {
    let max = match query.get("maxResults").map(|m| m.parse::<usize>()) {
        None => 500,
        Some(Ok(m)) if (1..=500).contains(&m) => m,
        Some(_) => return bad("Invalid value for field 'maxResults': must be 0 to 500"),
    }
    .min(state.page_limit);
    let start = match query.get("pageToken").map(|t| {
        t.strip_prefix("page-")
            .and_then(|n| n.parse::<usize>().ok())
    }) {
        None => 0,
        Some(Some(n)) if n <= all.len() => n,
        Some(_) => return bad("Invalid value for field 'pageToken'"),
    };
    let end = (start + max).min(all.len());
    let mut page = wrap(all[start..end].to_vec());
    if end < all.len() {
        page["nextPageToken"] = json!(format!("page-{end}"));
    }
    json_ok(page)
}

fn machine_type_json(state: &FakeState, zone: &str, t: &MachineType) -> Value {
    let mut value = json!({
        "kind": "compute#machineType",
        "id": "801016",
        "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
        "name": t.name,
        "description": format!("{} vCPUs, {} GB RAM", t.cpus, t.memory_mb / 1024),
        "guestCpus": t.cpus,
        "memoryMb": t.memory_mb,
        "maximumPersistentDisks": 128,
        "maximumPersistentDisksSizeGb": "263168",
        "zone": zone,
        "selfLink": format!("https://www.googleapis.com/compute/v1/projects/{}/zones/{zone}/machineTypes/{}", state.project, t.name),
        "isSharedCpu": t.shared,
    });
    if t.gpus > 0 {
        value["accelerators"] = json!([{
            "guestAcceleratorType": "nvidia-tesla-a100",
            "guestAcceleratorCount": t.gpus,
        }]);
    }
    value
}

fn operation_json(state: &FakeState, op: &Operation) -> Value {
    let base = format!(
        "https://www.googleapis.com/compute/v1/projects/{}",
        state.project
    );
    let mut value = json!({
        "kind": "compute#operation",
        "id": "7311093829",
        "name": op.name,
        "zone": format!("{base}/zones/{}", op.zone),
        "operationType": op.kind,
        "targetLink": format!("{base}/zones/{}/instances/{}", op.zone, op.target),
        "status": op.status,
        "progress": if op.status == "DONE" { 100 } else { 0 },
        "selfLink": format!("{base}/zones/{}/operations/{}", op.zone, op.name),
    });
    if op.status == "DONE"
        && let Some((status, code, message)) = &op.error
    {
        value["error"] = json!({ "errors": [{ "code": code, "message": message }] });
        value["httpErrorStatusCode"] = json!(status);
        value["httpErrorMessage"] = json!(if *status == 503 {
            "SERVICE UNAVAILABLE"
        } else {
            "FORBIDDEN"
        });
    }
    value
}

/// PROVISIONING → STAGING → RUNNING, one step per read.
fn advance(instance: &mut Value) {
    let next = match instance["status"].as_str() {
        Some("PROVISIONING") => "STAGING",
        Some("STAGING") => "RUNNING",
        Some(other) => other,
        None => "RUNNING",
    }
    .to_owned();
    instance["status"] = json!(next);
}

fn insert(
    state: &mut FakeState,
    zone: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    let zone = zone.to_owned();
    if !state.zones.contains(&zone) {
        return not_found(&format!("projects/{}/zones/{zone}", state.project));
    }
    if let Some(id) = query.get("requestId") {
        if !valid_uuid(id) {
            return bad(format!(
                "Invalid value for field 'requestId': '{id}'. Must be a UUID."
            ));
        }
        if let Some(op) = state
            .request_ids
            .get(id)
            .and_then(|n| state.operations.get(n))
        {
            return json_ok(operation_json(state, op));
        }
    }
    let request: InsertInstance = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return bad(format!("Invalid JSON payload received. {e}"));
        }
    };
    if let Err(message) = check_insert(state, &zone, &request) {
        return bad(message);
    }
    let key = (zone.clone(), request.name.clone());
    if state.instances.contains_key(&key) {
        return google_error(
            StatusCode::CONFLICT,
            "alreadyExists",
            &format!(
                "The resource 'projects/{}/zones/{zone}/instances/{}' already exists",
                state.project, request.name
            ),
        );
    }
    let value: Value = serde_json::from_slice(body).unwrap_or_default();
    state.inserts.push(value.clone());
    let (_, machine_type) =
        zonal(&request.machine_type, &state.project, "machineTypes").unwrap_or_default();
    let base = format!(
        "https://www.googleapis.com/compute/v1/projects/{}",
        state.project
    );
    let error = if state
        .stockouts
        .contains(&(zone.clone(), machine_type.to_owned()))
    {
        Some((
            503,
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            format!(
                "The zone 'projects/{}/zones/{zone}' does not have enough resources available \
                 to fulfill the request.  Try a different zone, or try again later.",
                state.project
            ),
        ))
    } else if state.quota_exceeded.contains(machine_type) {
        Some((
            403,
            "QUOTA_EXCEEDED",
            "Quota 'N2_CPUS' exceeded.  Limit: 24.0 in region us-central1.".to_owned(),
        ))
    } else {
        None
    };
    let create = error.is_none().then(|| {
        let mut instance = value.clone();
        instance["kind"] = json!("compute#instance");
        instance["id"] = json!(state.counter.to_string());
        instance["zone"] = json!(format!("{base}/zones/{zone}"));
        instance["machineType"] = json!(format!("{base}/zones/{zone}/machineTypes/{machine_type}"));
        instance["status"] = json!("PROVISIONING");
        instance["creationTimestamp"] = json!(
            chrono::Utc::now()
                .with_timezone(&chrono::FixedOffset::west_opt(7 * 3600).unwrap())
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
        );
        instance["selfLink"] = json!(format!("{base}/zones/{zone}/instances/{}", request.name));
        instance
    });
    let id = state.next_id();
    let op = Operation {
        name: format!("operation-{id}-insert"),
        zone: zone.clone(),
        kind: "insert",
        target: request.name.clone(),
        status: "PENDING",
        create,
        error,
    };
    if let Some(request_id) = query.get("requestId") {
        state
            .request_ids
            .insert(request_id.clone(), op.name.clone());
    }
    let answer = operation_json(state, &op);
    state.operations.insert(op.name.clone(), op);
    json_ok(answer)
}

/// Compute Engine's checks of an insert, the first failure's message.
fn check_insert(state: &FakeState, zone: &str, r: &InsertInstance) -> Result<(), String> {
    if !valid_name(&r.name) {
        return Err(format!(
            "Invalid value for field 'resource.name': '{}'. Must be a match of regex \
             '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?|[1-9][0-9]{{0,19}})'",
            r.name
        ));
    }
    match zonal(&r.machine_type, &state.project, "machineTypes") {
        Some((z, t)) if z == zone && state.machine_types.iter().any(|m| m.name == t) => {}
        _ => {
            return Err(format!(
                "Invalid value for field 'resource.machineType': '{}'. Machine type with name \
                 does not exist in zone '{zone}'.",
                r.machine_type
            ));
        }
    }
    if r.description.as_ref().is_some_and(|d| d.len() > 2048) {
        return Err("Invalid value for field 'resource.description'".into());
    }
    if r.labels.len() > 64 {
        return Err("Invalid value for field 'resource.labels': at most 64 labels".into());
    }
    for (k, v) in &r.labels {
        if !valid_label(k, v) {
            return Err(format!(
                "Invalid value for field 'resource.labels': '{k}={v}'"
            ));
        }
    }
    if let Some(s) = &r.scheduling {
        let spot = s.provisioning_model == Some(ProvisioningModel::Spot);
        if spot && s.automatic_restart != Some(false) {
            return Err(
                "Invalid value for field 'resource.scheduling.automaticRestart': 'true'. \
                        Automatic restart must be false for Spot VMs."
                    .into(),
            );
        }
        if (spot || s.preemptible == Some(true))
            && s.on_host_maintenance == Some(OnHostMaintenance::Migrate)
        {
            return Err(
                "Invalid value for field 'resource.scheduling.onHostMaintenance': \
                        'MIGRATE'. Spot VMs must terminate on host maintenance."
                    .into(),
            );
        }
        if s.preemptible == Some(true) && s.provisioning_model == Some(ProvisioningModel::Standard)
        {
            return Err(
                "Invalid value for field 'resource.scheduling.preemptible': preemptible \
                        instances cannot use the STANDARD provisioning model."
                    .into(),
            );
        }
        if let Some(d) = &s.max_run_duration {
            match d.seconds.value() {
                Some(sec) if (30..=120 * 86400).contains(&sec) => {}
                _ => {
                    return Err("Invalid value for field \
                                'resource.scheduling.maxRunDuration.seconds'"
                        .into());
                }
            }
            if d.nanos.is_some_and(|n| !(0..1_000_000_000).contains(&n)) {
                return Err(
                    "Invalid value for field 'resource.scheduling.maxRunDuration.nanos'".into(),
                );
            }
            if s.instance_termination_action.is_none() {
                return Err(
                    "Invalid value for field 'resource.scheduling': maxRunDuration \
                            requires instanceTerminationAction."
                        .into(),
                );
            }
        }
        if s.instance_termination_action.is_some() && !spot && s.max_run_duration.is_none() {
            return Err("Invalid value for field \
                        'resource.scheduling.instanceTerminationAction': only Spot VMs or VMs \
                        with a run duration have a termination action."
                .into());
        }
    }
    if let Some(m) = &r.metadata {
        let _ = &m.fingerprint;
        let mut keys = HashSet::new();
        for item in &m.items {
            let key_ok = !item.key.is_empty()
                && item.key.len() <= 128
                && item
                    .key
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
            if !key_ok || !keys.insert(item.key.as_str()) {
                return Err(format!(
                    "Invalid value for field 'resource.metadata': key '{}'",
                    item.key
                ));
            }
            if item
                .value
                .as_ref()
                .is_some_and(|v| v.len() > MAX_METADATA_VALUE)
            {
                return Err(format!(
                    "Value for metadata key '{}' is too large",
                    item.key
                ));
            }
        }
    }
    let boots: Vec<&AttachedDisk> = r.disks.iter().filter(|d| d.boot == Some(true)).collect();
    let [boot] = boots.as_slice() else {
        return Err(
            "Invalid value for field 'resource.disks': exactly one boot disk is required".into(),
        );
    };
    if boot.kind == Some(DiskKind::Scratch) {
        return Err(
            "Invalid value for field 'resource.disks[0].type': a boot disk is PERSISTENT".into(),
        );
    }
    let _ = (&boot.auto_delete, &boot.device_name);
    match (&boot.source, &boot.initialize_params) {
        (None, Some(p)) => {
            if !p.source_image.as_deref().is_some_and(valid_image) {
                return Err(format!(
                    "Invalid value for field 'resource.disks[0].initializeParams.sourceImage': \
                     '{}'",
                    p.source_image.as_deref().unwrap_or_default()
                ));
            }
            if let Some(size) = &p.disk_size_gb
                && !size.value().is_some_and(|s| (10..=65536).contains(&s))
            {
                return Err("Invalid value for field \
                            'resource.disks[0].initializeParams.diskSizeGb'"
                    .into());
            }
            if let Some(t) = &p.disk_type {
                match zonal(t, &state.project, "diskTypes") {
                    Some((z, name)) if z == zone && valid_name(name) => {}
                    _ => {
                        return Err(format!(
                            "Invalid value for field \
                             'resource.disks[0].initializeParams.diskType': '{t}'"
                        ));
                    }
                }
            }
            if p.disk_name.as_deref().is_some_and(|n| !valid_name(n)) {
                return Err(
                    "Invalid value for field 'resource.disks[0].initializeParams.diskName'".into(),
                );
            }
            for (k, v) in &p.labels {
                if !valid_label(k, v) {
                    return Err(format!(
                        "Invalid value for field 'resource.disks[0].initializeParams.labels': '{k}={v}'"
                    ));
                }
            }
        }
        (Some(_), None) => {}
        _ => {
            return Err(
                "Invalid value for field 'resource.disks[0]': one of source or \
                        initializeParams is required"
                    .into(),
            );
        }
    }
    if r.network_interfaces.is_empty() {
        return Err(
            "Invalid value for field 'resource.networkInterfaces': at least one is required".into(),
        );
    }
    for ni in &r.network_interfaces {
        match (&ni.network, &ni.subnetwork) {
            (Some(n), _) if valid_network(n, &state.project) => {}
            (None, Some(_)) => {}
            _ => {
                return Err(format!(
                    "Invalid value for field 'resource.networkInterfaces[0].network': '{}'",
                    ni.network.as_deref().unwrap_or_default()
                ));
            }
        }
        if ni.access_configs.len() > 1 {
            return Err("Invalid value for field 'resource.networkInterfaces[0].accessConfigs': at most one".into());
        }
        for a in &ni.access_configs {
            // The type and the tier are checked by their enums.
            let _ = (&a.kind, &a.network_tier);
            if a.name.as_ref().is_some_and(|n| n.len() > 63) {
                return Err(
                    "Invalid value for field 'resource.networkInterfaces[0].accessConfigs[0].name'"
                        .into(),
                );
            }
        }
    }
    for sa in &r.service_accounts {
        if !sa.email.contains('@') && sa.email != "default" {
            return Err(format!(
                "Invalid value for field 'resource.serviceAccounts[0].email': '{}'",
                sa.email
            ));
        }
        let _ = &sa.scopes;
    }
    if let Some(tags) = &r.tags
        && tags.items.iter().any(|t| !valid_name(t))
    {
        return Err("Invalid value for field 'resource.tags.items'".into());
    }
    Ok(())
}

/// `labels.KEY=VALUE`, `labels.KEY = VALUE`, `name=NAME` (spaces around `=` allowed), or none.
fn parse_filter(filter: &str) -> Result<Option<(String, String)>, String> {
    let filter = filter.trim();
    if filter.is_empty() {
        return Ok(None);
    }
    let (field, value) = filter
        .split_once('=')
        .ok_or_else(|| format!("Invalid list filter expression '{filter}'"))?;
    let (field, value) = (field.trim(), value.trim().trim_matches('"'));
    let ok = field == "name" || field.strip_prefix("labels.").is_some_and(|k| !k.is_empty());
    if !ok || value.contains(' ') {
        return Err(format!("Invalid list filter expression '{filter}'"));
    }
    Ok(Some((field.to_owned(), value.to_owned())))
}

fn list(state: &mut FakeState, query: &HashMap<String, String>, zone: Option<&str>) -> Response {
    let filter = match parse_filter(query.get("filter").map(String::as_str).unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return bad(e),
    };
    let mut matched: Vec<Value> = Vec::new();
    for ((z, _), instance) in state.instances.iter_mut() {
        if zone.is_some_and(|zone| zone != z) {
            continue;
        }
        let keep = match &filter {
            None => true,
            Some((field, value)) => match field.strip_prefix("labels.") {
                Some(key) => instance["labels"][key].as_str() == Some(value.as_str()),
                None => instance["name"].as_str() == Some(value.as_str()),
            },
        };
        if keep {
            advance(instance);
            matched.push(instance.clone());
        }
    }
    let zones = state.zones.clone();
    match zone {
        Some(_) => paged(
            state,
            query,
            matched,
            |items| json!({ "kind": "compute#instanceList", "items": items }),
        ),
        None => paged(state, query, matched, |items| {
            // Grouped by zone, with the warning real aggregated lists give empty scopes.
            let mut scopes = serde_json::Map::new();
            for z in &zones {
                let here: Vec<Value> = items
                    .iter()
                    .filter(|i| {
                        i["zone"]
                            .as_str()
                            .is_some_and(|u| u.ends_with(&format!("/{z}")))
                    })
                    .cloned()
                    .collect();
                let scope = if here.is_empty() {
                    json!({ "warning": { "code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope on this page." } })
                } else {
                    json!({ "instances": here })
                };
                scopes.insert(format!("zones/{z}"), scope);
            }
            json!({ "kind": "compute#instanceAggregatedList", "items": scopes })
        }),
    }
}

// ---- Billing Catalog ----

fn skus(state: &mut FakeState, query: &HashMap<String, String>) -> Response {
    state.sku_requests += 1;
    if let Some(size) = query.get("pageSize")
        && !size.parse::<u32>().is_ok_and(|s| (1..=5000).contains(&s))
    {
        return bad(format!("Invalid pageSize {size}"));
    }
    let page = match query.get("pageToken").map(String::as_str) {
        None | Some("") => 0,
        Some(token) => match token
            .strip_prefix("skus-page-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if n < state.sku_pages.len() => n,
            _ => return bad(format!("Invalid page token {token}")),
        },
    };
    let mut answer = json!({ "skus": state.sku_pages.get(page).cloned().unwrap_or_default() });
    if page + 1 < state.sku_pages.len() {
        answer["nextPageToken"] = json!(format!("skus-page-{}", page + 1));
    } else {
        answer["nextPageToken"] = json!("");
    }
    json_ok(answer)
}
