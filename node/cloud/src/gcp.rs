//! The GCP provider: render peers as Compute Engine instances, through the Compute REST API
//! (`compute/v1`) and the Cloud Billing Catalog, with OAuth tokens from `gcp_auth`.
//!
//! Credentials are a service-account key file (JSON). `gcp_auth` signs a JWT with its key and
//! trades it at the key's `token_uri` (Google's OAuth endpoint, or [`GcpConfig::token_uri`])
//! for an access token with the `cloud-platform` scope, cached until shortly before it expires.
//! Every endpoint can be overridden ([`GcpConfig`]), so tests point the provider at a fake on
//! loopback and the real token flow runs against it.
//!
//! - [`Provider::launch`] is one `instances.insert` in the spec's zone (or the first configured
//!   zone) with a fresh name (`blendnet-` and 16 random base32 characters) and a `requestId`,
//!   so an insert the client retries is not done twice. Spot instances get
//!   `scheduling {provisioningModel: SPOT, instanceTerminationAction: DELETE,
//!   automaticRestart: false, onHostMaintenance: TERMINATE}`: a preempted instance is deleted,
//!   not stopped (a stopped one keeps billing its disk). [`GcpConfig::max_run_duration_secs`]
//!   adds `maxRunDuration`, after which Compute Engine deletes the instance whatever happens to
//!   the provisioner. Metadata: `startup-script` ([`startup_script`]) and
//!   `blendnet-user-data` (the spec's user data), and `blendnet-tags` (the spec's tags, exactly).
//!   Labels carry the tags for filtering (see [`label`]). The boot disk is made from
//!   [`GcpConfig::image`] and deleted with the instance; the network interface has an external
//!   IP (`ONE_TO_ONE_NAT`). The returned zone operation is waited for (`operations.wait`): a
//!   stockout shows up there, not in the insert's answer.
//! - [`Provider::list`] is `instances.aggregatedList` (every zone of the project) filtered by
//!   `labels.<key>=<label value>`, every page; the exact tags are then read back from the
//!   `blendnet-tags` metadata item and checked, so a label that two values share (see [`label`])
//!   never mixes meshes.
//! - [`Provider::terminate`] is `instances.delete` per name, in the zone the provider saw the
//!   instance in (an aggregated list by name when it has not); 404 is no error.
//! - [`Provider::instance_types`] lists `machineTypes` of the first zone: the configured types
//!   in their order, or all of them (shared-core ones left out) when none are configured.
//! - [`Provider::prices`]: the machine type's cores and memory (`machineTypes.get`) priced with
//!   the Billing Catalog's per-core and per-GiB SKUs of its family in each configured zone's
//!   region (see [`family_sku_prefix`] for the families handled).
//!
//! Errors are sorted into [`CloudError`] by [`classify`], from Google's error body
//! (`{"error":{"code":..,"message":..,"errors":[{"reason":..}]}}`) or a failed operation's
//! `error.errors[].code`. Throttling and server errors are retried ([`MAX_ATTEMPTS`]) except
//! capacity answers, which come back at once so the provisioner tries another type or zone.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use gcp_auth::{CustomServiceAccount, TokenProvider};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::userdata::MAX_USER_DATA_BYTES;
use crate::{CloudError, Instance, InstanceState, InstanceType, LaunchSpec, Price, Provider};

/// Compute Engine's REST root.
pub const COMPUTE_ENDPOINT: &str = "https://compute.googleapis.com/compute/v1";
/// The Cloud Billing Catalog's REST root.
pub const BILLING_ENDPOINT: &str = "https://cloudbilling.googleapis.com/v1";
/// Compute Engine's service id in the Billing Catalog.
pub const COMPUTE_SERVICE_ID: &str = "6F81-5844-456A";
/// The OAuth scope asked for: Compute and the Billing Catalog both accept it.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Metadata key of the user data (read by the startup script).
pub const USER_DATA_KEY: &str = "blendnet-user-data";
/// Metadata key of the spec's tags, as JSON: labels cannot hold them exactly.
pub const TAGS_KEY: &str = "blendnet-tags";
/// Metadata key of the script Compute Engine's guest agent runs at every boot.
pub const STARTUP_SCRIPT_KEY: &str = "startup-script";
/// Where the startup script puts the user data on the instance.
pub const USER_DATA_PATH: &str = "/var/lib/blendnet/user-data";
/// The bootstrap's default command on the image (see `bootstrap/blendnet-bootstrap.sh`; its
/// pins come from `/etc/default/blendnet` on the image).
pub const DEFAULT_BOOTSTRAP_COMMAND: &str = "/usr/local/lib/blendnet/blendnet-bootstrap.sh";
/// Attempts per API call: throttling (429) and server errors are retried with backoff; more
/// would only delay a provisioner that can try another type.
pub const MAX_ATTEMPTS: u32 = 3;
/// Time for one attempt of one call (connect, send, read the whole answer), and for getting an
/// access token (`gcp_auth` sets no time limit of its own).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for one `operations.wait`: Compute Engine answers it when the operation is done or after
/// about two minutes, whichever comes first.
pub const WAIT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(150);
/// Longest wait for an insert's operation: an instance is usually created in under a minute.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(300);
/// First pause before a retry; doubled each time.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Largest answer read: a Billing Catalog page of 5000 SKUs is a few MiB.
const MAX_RESPONSE_BYTES: usize = 32 << 20;
/// Most pages read for one listing: a bound so a misbehaving endpoint cannot page forever.
const MAX_PAGES: usize = 1000;
/// Results per page of instance and machine type lists (the API's maximum).
const LIST_PAGE: u32 = 500;
/// SKUs per Billing Catalog page (the API's maximum).
const SKU_PAGE: u32 = 5000;
/// Most `operations.wait` calls for one operation (each waits up to two minutes server-side).
const MAX_WAITS: usize = 100;
/// How long the Billing Catalog's compute SKUs are kept: prices change rarely, the catalog is
/// large.
const CATALOG_TTL: Duration = Duration::from_secs(3600);
/// GCE allows 64 labels per resource.
const MAX_LABELS: usize = 64;
/// Label keys and values are at most 63 characters.
const MAX_LABEL_LEN: usize = 63;

/// The GCP provider's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GcpConfig {
    /// The project instances are created in.
    pub project: String,
    /// Zones offered, first one the default (`us-central1-a`, ...).
    pub zones: Vec<String>,
    /// A service-account key file (JSON, as the console downloads it).
    pub credentials_file: PathBuf,
    /// Another Compute root (a fake in tests); [`COMPUTE_ENDPOINT`] if unset.
    #[serde(default)]
    pub compute_endpoint: Option<String>,
    /// Another Billing Catalog root; [`BILLING_ENDPOINT`] if unset.
    #[serde(default)]
    pub billing_endpoint: Option<String>,
    /// Another OAuth token endpoint; the key file's `token_uri` if unset.
    #[serde(default)]
    pub token_uri: Option<String>,
    /// The boot image: `projects/debian-cloud/global/images/family/debian-12`, or an image of
    /// the project's with the bootstrap on it.
    pub image: String,
    /// The VPC network (`default`, or a full `projects/.../global/networks/...` path).
    #[serde(default = "default_network")]
    pub network: String,
    /// A subnetwork (`regions/us-central1/subnetworks/...`), for custom-mode networks.
    #[serde(default)]
    pub subnetwork: Option<String>,
    /// Boot disk size in GB.
    #[serde(default = "default_disk_size_gb")]
    pub disk_size_gb: u32,
    /// Boot disk type (`pd-balanced`, `pd-ssd`, `hyperdisk-balanced` for C3/N4...).
    #[serde(default = "default_disk_type")]
    pub disk_type: String,
    /// The types offered to the provisioner, in order of preference.
    #[serde(default)]
    pub instance_types: Vec<String>,
    /// When set, Compute Engine deletes an instance this many seconds after it starts, whatever
    /// happens to its provisioner (30 s to 120 days).
    #[serde(default)]
    pub max_run_duration_secs: Option<u64>,
    /// A service account for the instances (its identity token proves an instance is one);
    /// none if unset.
    #[serde(default)]
    pub service_account: Option<String>,
    /// What the startup script runs once the user data is in [`USER_DATA_PATH`].
    #[serde(default = "default_bootstrap_command")]
    pub bootstrap_command: String,
}

fn default_network() -> String {
    "default".into()
}
fn default_disk_size_gb() -> u32 {
    20
}
fn default_disk_type() -> String {
    "pd-balanced".into()
}
fn default_bootstrap_command() -> String {
    DEFAULT_BOOTSTRAP_COMMAND.into()
}

impl GcpConfig {
    /// Settings with the defaults for everything optional.
    pub fn new(
        project: impl Into<String>,
        zones: Vec<String>,
        credentials_file: impl Into<PathBuf>,
        image: impl Into<String>,
    ) -> GcpConfig {
        GcpConfig {
            project: project.into(),
            zones,
            credentials_file: credentials_file.into(),
            compute_endpoint: None,
            billing_endpoint: None,
            token_uri: None,
            image: image.into(),
            network: default_network(),
            subnetwork: None,
            disk_size_gb: default_disk_size_gb(),
            disk_type: default_disk_type(),
            instance_types: Vec::new(),
            max_run_duration_secs: None,
            service_account: None,
            bootstrap_command: default_bootstrap_command(),
        }
    }
}

/// The region of a zone: `us-central1-a` → `us-central1`.
pub fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(region, _)| region)
}

/// Whether `s` is a valid GCE resource name: `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`.
pub fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// Whether `s` may be a label value as it is: at most 63 of `[a-z0-9_-]` (keys must also start
/// with a letter).
fn is_label_text(s: &str) -> bool {
    s.len() <= MAX_LABEL_LEN
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

/// The label key or value a tag key or value is stored as.
///
/// GCE labels allow at most 63 lowercase letters, digits, `-` and `_` (keys start with a
/// letter), and BlendNet's tag values are often more (a peer id is 52 base58 characters with
/// uppercase). So: a text that is already a valid label stays as it is (`blendnet-mesh`, a mesh
/// id); any other becomes `h` and 32 lowercase base32 characters of its SHA-256. The mapping is
/// deterministic, so [`Provider::list`] filters by it on the server, but not reversible: the
/// exact tags travel in the [`TAGS_KEY`] metadata item, and `list` checks them there.
pub fn label(text: &str) -> String {
    let starts_with_letter = text.as_bytes().first().is_some_and(u8::is_ascii_lowercase);
    if starts_with_letter && is_label_text(text) {
        return text.to_owned();
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    let encoded = data_encoding::BASE32_NOPAD.encode(&digest.as_ref()[..20]);
    format!("h{}", encoded.to_ascii_lowercase())
}

/// The startup script: fetches the user data from the metadata server into
/// [`USER_DATA_PATH`] (mode 0600) and runs `bootstrap` with `BLENDNET_USER_DATA` set to it,
/// after reading `/etc/default/blendnet` (the bootstrap's pins) when the image has one.
pub fn startup_script(bootstrap: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # BlendNet render peer: fetch the provisioner's user data, then run the bootstrap.\n\
         set -eu\n\
         install -d -m 0700 /var/lib/blendnet\n\
         umask 077\n\
         curl -fsS --retry 10 --retry-connrefused -H 'Metadata-Flavor: Google' \\\n  \
         'http://metadata.google.internal/computeMetadata/v1/instance/attributes/{USER_DATA_KEY}' \\\n  \
         -o {USER_DATA_PATH}\n\
         if [ -f /etc/default/blendnet ]; then set -a; . /etc/default/blendnet; set +a; fi\n\
         export BLENDNET_USER_DATA={USER_DATA_PATH}\n\
         exec {bootstrap}\n"
    )
}

/// Machine families priced, and how the Billing Catalog names their SKUs: the core SKU's
/// description is `<prefix> Core running in <place>` and the memory SKU's
/// `<prefix> Ram running in <place>`, each with `Spot Preemptible ` before it for spot.
///
/// Handled: `e2` (`E2 Instance`), `n1` (`N1 Predefined Instance`), `n2` (`N2 Instance`),
/// `n2d` (`N2D AMD Instance`), `c2` (`Compute optimized`), `c2d` (`C2D AMD Instance`), `c3`
/// (`C3 Instance`), `t2d` (`T2D AMD Instance`). Other families (GPU types, whose accelerators
/// are priced apart, custom types) are a [`CloudError::BadRequest`] naming the family.
pub fn family_sku_prefix(machine_type: &str) -> Option<&'static str> {
    let family = machine_type.split('-').next().unwrap_or_default();
    Some(match family {
        "e2" => "E2 Instance",
        "n1" => "N1 Predefined Instance",
        "n2" => "N2 Instance",
        "n2d" => "N2D AMD Instance",
        "c2" => "Compute optimized",
        "c2d" => "C2D AMD Instance",
        "c3" => "C3 Instance",
        "t2d" => "T2D AMD Instance",
        _ => return None,
    })
}

/// The families [`family_sku_prefix`] knows, for error messages.
const PRICED_FAMILIES: &str = "e2, n1, n2, n2d, c2, c2d, c3, t2d";

/// Sorts a Google error into a [`CloudError`]. `status` is the HTTP status (of the answer, or
/// an operation's `httpErrorStatusCode`), `reason` Google's `errors[].reason` (or an
/// operation error's `code`), `launch` the type and zone of an insert.
///
/// - Capacity: `ZONE_RESOURCE_POOL_EXHAUSTED`, `ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS`,
///   `resourceExhausted` (stockouts, whatever the status).
/// - Quota: `QUOTA_EXCEEDED`, `quotaExceeded` (also answered with 403: checked before auth).
/// - Auth: 401, 403, or the reasons `authError`, `forbidden`, `insufficientPermissions`,
///   `accessNotConfigured`.
/// - Bad request: 400 and 404 in a launch (an unknown type, zone or image), and the reasons
///   `invalid`, `badRequest`, `required`.
/// - Anything else: [`CloudError::Api`] with the reason (or the status).
pub fn classify(
    status: Option<u16>,
    reason: &str,
    message: &str,
    launch: Option<(&str, &str)>,
) -> CloudError {
    const CAPACITY: &[&str] = &[
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        "resourceExhausted",
    ];
    const QUOTA: &[&str] = &["QUOTA_EXCEEDED", "quotaExceeded"];
    const AUTH: &[&str] = &[
        "authError",
        "forbidden",
        "insufficientPermissions",
        "accessNotConfigured",
    ];
    const BAD_REQUEST: &[&str] = &["invalid", "badRequest", "required"];
    let text = match status {
        Some(status) => format!("{reason} (HTTP {status}): {message}"),
        None => format!("{reason}: {message}"),
    };
    if CAPACITY.contains(&reason) {
        let (instance_type, zone) = launch.unwrap_or_default();
        CloudError::Capacity {
            instance_type: instance_type.to_owned(),
            zone: zone.to_owned(),
            message: text,
        }
    } else if QUOTA.contains(&reason) {
        CloudError::Quota(text)
    } else if matches!(status, Some(401 | 403)) || AUTH.contains(&reason) {
        CloudError::Auth(text)
    } else if status == Some(400)
        || (status == Some(404) && launch.is_some())
        || BAD_REQUEST.contains(&reason)
    {
        CloudError::BadRequest(text)
    } else {
        CloudError::Api {
            code: if reason.is_empty() {
                status.map_or_else(|| "unknown".to_owned(), |s| format!("HTTP {s}"))
            } else {
                reason.to_owned()
            },
            message: message.to_owned(),
        }
    }
}

/// Google's error body.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(Debug, Deserialize)]
struct ErrorInner {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<ErrorItem>,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorItem {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// A zone operation.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Operation {
    name: String,
    status: String,
    #[serde(default)]
    http_error_status_code: Option<u16>,
    #[serde(default)]
    error: Option<OperationError>,
}

#[derive(Debug, Deserialize)]
struct OperationError {
    #[serde(default)]
    errors: Vec<OperationErrorItem>,
}

#[derive(Debug, Deserialize)]
struct OperationErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// An instance as Compute answers it (the fields read).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiInstance {
    name: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    machine_type: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    creation_timestamp: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    metadata: Option<ApiMetadata>,
}

#[derive(Debug, Deserialize)]
struct ApiMetadata {
    #[serde(default)]
    items: Vec<ApiMetadataItem>,
}

#[derive(Debug, Deserialize)]
struct ApiMetadataItem {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AggregatedInstances {
    #[serde(default)]
    items: BTreeMap<String, InstancesScoped>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InstancesScoped {
    #[serde(default)]
    instances: Vec<ApiInstance>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MachineTypeList {
    #[serde(default)]
    items: Vec<ApiMachineType>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiMachineType {
    name: String,
    guest_cpus: u32,
    memory_mb: u64,
    #[serde(default)]
    is_shared_cpu: bool,
    #[serde(default)]
    accelerators: Vec<ApiAccelerator>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiAccelerator {
    #[serde(default)]
    guest_accelerator_count: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SkuList {
    #[serde(default)]
    skus: Vec<Sku>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// A Billing Catalog SKU (the fields read).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sku {
    #[serde(default)]
    description: String,
    category: SkuCategory,
    #[serde(default)]
    service_regions: Vec<String>,
    #[serde(default)]
    pricing_info: Vec<PricingInfo>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SkuCategory {
    #[serde(default)]
    resource_family: String,
    #[serde(default)]
    usage_type: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PricingInfo {
    pricing_expression: PricingExpression,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PricingExpression {
    #[serde(default)]
    usage_unit: String,
    #[serde(default)]
    tiered_rates: Vec<TieredRate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TieredRate {
    #[serde(default)]
    start_usage_amount: f64,
    unit_price: Money,
}

/// `google.type.Money`: `units` is an int64, so a JSON string.
#[derive(Debug, Clone, Deserialize)]
struct Money {
    #[serde(default)]
    units: Option<Value>,
    #[serde(default)]
    nanos: i64,
}

impl Money {
    fn dollars(&self) -> Option<f64> {
        let units = match &self.units {
            None => 0,
            Some(Value::String(s)) => s.parse::<i64>().ok()?,
            Some(Value::Number(n)) => n.as_i64()?,
            Some(_) => return None,
        };
        Some(units as f64 + self.nanos as f64 / 1e9)
    }
}

impl Sku {
    /// The price per unit of the first tier (compute SKUs have one tier, from 0), and the unit.
    fn unit_price(&self) -> Option<(f64, &str)> {
        let expression = &self.pricing_info.first()?.pricing_expression;
        let rate = expression
            .tiered_rates
            .iter()
            .find(|r| r.start_usage_amount == 0.0)
            .or_else(|| expression.tiered_rates.first())?;
        Some((rate.unit_price.dollars()?, expression.usage_unit.as_str()))
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Compute Engine instances as render peers.
pub struct GcpProvider {
    config: GcpConfig,
    auth: CustomServiceAccount,
    http: HttpClient,
    /// Zone by instance name, for instances launched or listed (a delete needs the zone).
    zones: Mutex<HashMap<String, String>>,
    /// The Billing Catalog's Compute SKUs, and when they were read.
    catalog: tokio::sync::Mutex<Option<(Instant, Arc<Vec<Sku>>)>>,
}

impl std::fmt::Debug for GcpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GcpProvider {
    /// A provider using `config`: reads the key file (a missing or unreadable one is a
    /// [`CloudError::Auth`]). Nothing is called until the first request.
    pub fn new(config: GcpConfig) -> Result<GcpProvider, CloudError> {
        if config.zones.is_empty() {
            return Err(CloudError::BadRequest(
                "the GCP settings list no zones".into(),
            ));
        }
        let path = &config.credentials_file;
        let text = std::fs::read_to_string(path).map_err(|e| {
            CloudError::Auth(format!(
                "cannot read the GCP service-account key {}: {e}",
                path.display()
            ))
        })?;
        let mut key: Value = serde_json::from_str(&text).map_err(|e| {
            CloudError::Auth(format!(
                "the GCP service-account key {} is not JSON: {e}",
                path.display()
            ))
        })?;
        if let (Some(uri), Some(object)) = (&config.token_uri, key.as_object_mut()) {
            object.insert("token_uri".into(), Value::String(uri.clone()));
        }
        let auth = CustomServiceAccount::from_json(&key.to_string()).map_err(|e| {
            CloudError::Auth(format!(
                "the GCP service-account key {} is not usable: {e}",
                path.display()
            ))
        })?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .map_err(|e| CloudError::Io(format!("no TLS root certificates on this machine: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(GcpProvider {
            config,
            auth,
            http: Client::builder(TokioExecutor::new()).build(https),
            zones: Mutex::new(HashMap::new()),
            catalog: tokio::sync::Mutex::new(None),
        })
    }

    /// The settings.
    pub fn config(&self) -> &GcpConfig {
        &self.config
    }

    fn compute(&self) -> &str {
        self.config
            .compute_endpoint
            .as_deref()
            .unwrap_or(COMPUTE_ENDPOINT)
            .trim_end_matches('/')
    }

    fn billing(&self) -> &str {
        self.config
            .billing_endpoint
            .as_deref()
            .unwrap_or(BILLING_ENDPOINT)
            .trim_end_matches('/')
    }

    fn zone_url(&self, zone: &str) -> String {
        format!(
            "{}/projects/{}/zones/{zone}",
            self.compute(),
            self.config.project
        )
    }

    async fn token(&self) -> Result<String, CloudError> {
        let token = tokio::time::timeout(ATTEMPT_TIMEOUT, self.auth.token(&[SCOPE]))
            .await
            .map_err(|_| {
                CloudError::Io(format!(
                    "the GCP token endpoint did not answer within {ATTEMPT_TIMEOUT:?}"
                ))
            })?;
        match token {
            Ok(token) => Ok(token.as_str().to_owned()),
            Err(e @ gcp_auth::Error::Other(..)) => Err(CloudError::Io(format!(
                "cannot reach the GCP token endpoint: {}",
                error_chain(&e)
            ))),
            Err(e) => Err(CloudError::Auth(format!(
                "no access token for the GCP service account: {}",
                error_chain(&e)
            ))),
        }
    }

    /// One API call with retries: the status and body of the answer, any status.
    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), CloudError> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let mut backoff = RETRY_BACKOFF;
        let mut attempt = 1;
        loop {
            let token = self.token().await?;
            let mut request = Request::builder()
                .method(method.clone())
                .uri(url)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::ACCEPT, "application/json");
            if body.is_some() {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            let request = request
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|e| CloudError::BadRequest(format!("bad request URL {url}: {e}")))?;
            let limit = if url.ends_with("/wait") {
                WAIT_ATTEMPT_TIMEOUT
            } else {
                ATTEMPT_TIMEOUT
            };
            let result = tokio::time::timeout(limit, async {
                let response = self.http.request(request).await.map_err(|e| {
                    CloudError::Io(format!("cannot reach {url}: {}", error_chain(&e)))
                })?;
                let status = response.status();
                let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map_err(|e| CloudError::Io(format!("reading the answer of {url}: {e}")))?
                    .to_bytes();
                Ok::<_, CloudError>((status, bytes))
            })
            .await
            .unwrap_or_else(|_| {
                Err(CloudError::Io(format!(
                    "{url} did not answer within {limit:?}"
                )))
            });
            let retry = match &result {
                Err(CloudError::Io(_)) => true,
                Ok((status, bytes)) => {
                    let retryable =
                        *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                    retryable && !api_error(*status, bytes, None).is_capacity()
                }
                Err(_) => false,
            };
            if !retry || attempt >= MAX_ATTEMPTS {
                return result;
            }
            tracing::debug!(%url, attempt, "GCP call failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        }
    }

    /// A call that must succeed, its JSON answer read as `T`.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        launch: Option<(&str, &str)>,
    ) -> Result<T, CloudError> {
        let (status, bytes) = self.send(method, url, body).await?;
        if !status.is_success() {
            return Err(api_error(status, &bytes, launch));
        }
        serde_json::from_slice(&bytes).map_err(|e| CloudError::Api {
            code: "UnreadableResponse".into(),
            message: format!("from {url}: {e}"),
        })
    }

    /// The `instances.insert` body for `spec` in `zone`.
    fn instance_body(&self, name: &str, zone: &str, spec: &LaunchSpec) -> Value {
        let labels: BTreeMap<String, String> = spec
            .tags
            .iter()
            .map(|(k, v)| (label(k), label(v)))
            .collect();
        let mut scheduling = if spec.spot {
            json!({
                "provisioningModel": "SPOT",
                "instanceTerminationAction": "DELETE",
                "automaticRestart": false,
                "onHostMaintenance": "TERMINATE",
            })
        } else {
            json!({ "provisioningModel": "STANDARD" })
        };
        if let Some(seconds) = self.config.max_run_duration_secs {
            scheduling["maxRunDuration"] = json!({ "seconds": seconds.to_string() });
            scheduling["instanceTerminationAction"] = json!("DELETE");
        }
        let mut interface = json!({
            "network": network_path(&self.config.network),
            "accessConfigs": [{ "type": "ONE_TO_ONE_NAT", "name": "External NAT" }],
        });
        if let Some(subnetwork) = &self.config.subnetwork {
            interface["subnetwork"] = json!(subnetwork);
        }
        let tags = serde_json::to_string(&spec.tags).unwrap_or_default();
        let mut body = json!({
            "name": name,
            "machineType": format!("zones/{zone}/machineTypes/{}", spec.instance_type),
            "labels": labels,
            "scheduling": scheduling,
            "metadata": {
                "items": [
                    { "key": STARTUP_SCRIPT_KEY, "value": startup_script(&self.config.bootstrap_command) },
                    { "key": USER_DATA_KEY, "value": spec.user_data },
                    { "key": TAGS_KEY, "value": tags },
                ],
            },
            "disks": [{
                "boot": true,
                "autoDelete": true,
                "initializeParams": {
                    "sourceImage": self.config.image,
                    "diskSizeGb": self.config.disk_size_gb.to_string(),
                    "diskType": format!("zones/{zone}/diskTypes/{}", self.config.disk_type),
                    "labels": labels,
                },
            }],
            "networkInterfaces": [interface],
        });
        if let Some(email) = &self.config.service_account {
            body["serviceAccounts"] = json!([{ "email": email, "scopes": [] }]);
        }
        body
    }

    async fn launch_now(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        let zone = spec
            .zone
            .clone()
            .unwrap_or_else(|| self.config.zones[0].clone());
        if spec.user_data.len() > MAX_USER_DATA_BYTES {
            return Err(CloudError::BadRequest(format!(
                "the user data is {} bytes, more than {MAX_USER_DATA_BYTES}",
                spec.user_data.len()
            )));
        }
        if spec.tags.len() > MAX_LABELS {
            return Err(CloudError::BadRequest(format!(
                "{} tags, more than the {MAX_LABELS} labels GCE allows",
                spec.tags.len()
            )));
        }
        if !is_valid_name(&spec.instance_type) || !is_valid_name(&zone) {
            return Err(CloudError::BadRequest(format!(
                "not a GCE machine type and zone: {:?} in {zone:?}",
                spec.instance_type
            )));
        }
        let name = new_name();
        let body = self.instance_body(&name, &zone, spec);
        let url = format!(
            "{}/instances?requestId={}",
            self.zone_url(&zone),
            new_request_id()
        );
        let launch = Some((spec.instance_type.as_str(), zone.as_str()));
        let operation: Operation = self.call(Method::POST, &url, Some(&body), launch).await?;
        // Remembered before waiting: a launch dropped from here on leaves an instance that
        // terminate can find without a listing.
        if let Ok(mut zones) = self.zones.lock() {
            zones.insert(name.clone(), zone.clone());
        }
        self.wait(&zone, operation, launch).await?;
        let url = format!("{}/instances/{name}", self.zone_url(&zone));
        let api: ApiInstance = self.call(Method::GET, &url, None, None).await?;
        let instance = to_instance(&api);
        tracing::info!(
            id = %instance.id,
            instance_type = %instance.instance_type,
            zone = %instance.zone,
            spot = spec.spot,
            "instance launched"
        );
        Ok(instance)
    }

    /// Waits for a zone operation to be done; its error, sorted, if it failed.
    async fn wait(
        &self,
        zone: &str,
        mut operation: Operation,
        launch: Option<(&str, &str)>,
    ) -> Result<(), CloudError> {
        let started = Instant::now();
        let mut waits = 0;
        while operation.status != "DONE" {
            waits += 1;
            if waits > MAX_WAITS || started.elapsed() > OPERATION_TIMEOUT {
                return Err(CloudError::Api {
                    code: "OperationTimeout".into(),
                    message: format!(
                        "operation {} in {zone} not done after {:?}",
                        operation.name,
                        started.elapsed()
                    ),
                });
            }
            let url = format!("{}/operations/{}/wait", self.zone_url(zone), operation.name);
            operation = self.call(Method::POST, &url, None, launch).await?;
        }
        match operation.error.as_ref().and_then(|e| e.errors.first()) {
            None => Ok(()),
            Some(first) => Err(classify(
                operation.http_error_status_code,
                &first.code,
                &first.message,
                launch,
            )),
        }
    }

    async fn list_now(&self, key: &str, value: &str) -> Result<Vec<Instance>, CloudError> {
        let filter = format!("labels.{}={}", label(key), label(value));
        let apis = self.aggregated(&filter).await?;
        let mut instances: Vec<Instance> = apis
            .iter()
            .map(to_instance)
            .filter(|i| i.tags.get(key).map(String::as_str) == Some(value))
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(instances)
    }

    /// Every instance of the project matching `filter`, every page; remembers their zones.
    async fn aggregated(&self, filter: &str) -> Result<Vec<ApiInstance>, CloudError> {
        let mut found = Vec::new();
        let mut page_token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = format!(
                "{}/projects/{}/aggregated/instances?maxResults={LIST_PAGE}&filter={}",
                self.compute(),
                self.config.project,
                percent_encode(filter)
            );
            if let Some(token) = &page_token {
                url.push_str(&format!("&pageToken={}", percent_encode(token)));
            }
            let page: AggregatedInstances = self.call(Method::GET, &url, None, None).await?;
            for scoped in page.items.into_values() {
                found.extend(scoped.instances);
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(token) => page_token = Some(token),
                None => {
                    if let Ok(mut zones) = self.zones.lock() {
                        for i in &found {
                            zones.insert(i.name.clone(), last_segment(&i.zone).to_owned());
                        }
                    }
                    return Ok(found);
                }
            }
        }
        Err(too_many_pages("instances.aggregatedList"))
    }

    async fn terminate_now(&self, ids: &[String]) -> Result<(), CloudError> {
        for name in ids {
            if !is_valid_name(name) {
                tracing::debug!(%name, "not a GCE instance name: nothing to terminate");
                continue;
            }
            let known = self.zones.lock().ok().and_then(|z| z.get(name).cloned());
            let zone = match known {
                Some(zone) => zone,
                None => match self.aggregated(&format!("name={name}")).await?.first() {
                    Some(i) => last_segment(&i.zone).to_owned(),
                    None => {
                        tracing::debug!(%name, "instance unknown to GCE: nothing to terminate");
                        continue;
                    }
                },
            };
            let url = format!("{}/instances/{name}", self.zone_url(&zone));
            let (status, bytes) = self.send(Method::DELETE, &url, None).await?;
            if status == StatusCode::NOT_FOUND {
                tracing::debug!(%name, %zone, "instance already gone");
            } else if !status.is_success() {
                return Err(api_error(status, &bytes, None));
            } else {
                tracing::info!(%name, %zone, "instance terminated");
            }
            if let Ok(mut zones) = self.zones.lock() {
                zones.remove(name);
            }
        }
        Ok(())
    }

    /// The machine types of `zone`, every page.
    async fn machine_types(&self, zone: &str) -> Result<Vec<ApiMachineType>, CloudError> {
        let mut found = Vec::new();
        let mut page_token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = format!(
                "{}/machineTypes?maxResults={LIST_PAGE}",
                self.zone_url(zone)
            );
            if let Some(token) = &page_token {
                url.push_str(&format!("&pageToken={}", percent_encode(token)));
            }
            let page: MachineTypeList = self.call(Method::GET, &url, None, None).await?;
            found.extend(page.items);
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(token) => page_token = Some(token),
                None => return Ok(found),
            }
        }
        Err(too_many_pages("machineTypes.list"))
    }

    async fn instance_types_now(&self) -> Result<Vec<InstanceType>, CloudError> {
        let zone = &self.config.zones[0];
        let all = self.machine_types(zone).await?;
        if self.config.instance_types.is_empty() {
            let mut types: Vec<InstanceType> = all
                .iter()
                .filter(|t| !t.is_shared_cpu)
                .map(to_instance_type)
                .collect();
            types.sort_by(|a, b| a.name.cmp(&b.name));
            return Ok(types);
        }
        let by_name: HashMap<&str, &ApiMachineType> =
            all.iter().map(|t| (t.name.as_str(), t)).collect();
        let missing: Vec<&str> = self
            .config
            .instance_types
            .iter()
            .filter(|t| !by_name.contains_key(t.as_str()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(CloudError::BadRequest(format!(
                "machine types not offered in {zone}: {}",
                missing.join(", ")
            )));
        }
        Ok(self
            .config
            .instance_types
            .iter()
            .filter_map(|t| by_name.get(t.as_str()).map(|t| to_instance_type(t)))
            .collect())
    }

    /// The Billing Catalog's Compute SKUs, read through every page at most once per
    /// [`CATALOG_TTL`].
    async fn compute_skus(&self) -> Result<Arc<Vec<Sku>>, CloudError> {
        let mut cached = self.catalog.lock().await;
        if let Some((at, skus)) = cached.as_ref()
            && at.elapsed() < CATALOG_TTL
        {
            return Ok(skus.clone());
        }
        let mut skus = Vec::new();
        let mut page_token: Option<String> = None;
        let mut done = false;
        for _ in 0..MAX_PAGES {
            let mut url = format!(
                "{}/services/{COMPUTE_SERVICE_ID}/skus?pageSize={SKU_PAGE}",
                self.billing()
            );
            if let Some(token) = &page_token {
                url.push_str(&format!("&pageToken={}", percent_encode(token)));
            }
            let page: SkuList = self.call(Method::GET, &url, None, None).await?;
            skus.extend(
                page.skus
                    .into_iter()
                    .filter(|s| s.category.resource_family == "Compute"),
            );
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(token) => page_token = Some(token),
                None => {
                    done = true;
                    break;
                }
            }
        }
        if !done {
            return Err(too_many_pages("services.skus.list"));
        }
        let skus = Arc::new(skus);
        *cached = Some((Instant::now(), skus.clone()));
        Ok(skus)
    }

    async fn prices_now(&self, instance_type: &str, spot: bool) -> Result<Vec<Price>, CloudError> {
        let Some(prefix) = family_sku_prefix(instance_type) else {
            return Err(CloudError::BadRequest(format!(
                "no price rule for the machine family of {instance_type}: BlendNet prices \
                 the families {PRICED_FAMILIES}"
            )));
        };
        let zone = &self.config.zones[0];
        let url = format!("{}/machineTypes/{instance_type}", self.zone_url(zone));
        let machine: ApiMachineType = self
            .call(Method::GET, &url, None, Some((instance_type, zone)))
            .await?;
        if machine.is_shared_cpu {
            return Err(CloudError::BadRequest(format!(
                "{instance_type} is a shared-core type: BlendNet prices whole cores only"
            )));
        }
        let skus = self.compute_skus().await?;
        let usage = if spot { "Preemptible" } else { "OnDemand" };
        let ram_gib = machine.memory_mb as f64 / 1024.0;
        let mut prices = Vec::new();
        let mut unpriced = Vec::new();
        for zone in &self.config.zones {
            let region = region_of(zone);
            let core = sku_price(&skus, prefix, "Core", "h", usage, spot, region)?;
            let ram = sku_price(&skus, prefix, "Ram", "GiBy.h", usage, spot, region)?;
            match (core, ram) {
                (Some(core), Some(ram)) => prices.push(Price {
                    instance_type: instance_type.to_owned(),
                    zone: zone.clone(),
                    per_hour: f64::from(machine.guest_cpus) * core + ram_gib * ram,
                    spot,
                }),
                _ => unpriced.push(zone.as_str()),
            }
        }
        if prices.is_empty() {
            return Err(CloudError::Api {
                code: "NoPrice".into(),
                message: format!(
                    "the Billing Catalog has no {usage} core and RAM prices for \
                     \"{prefix}\" ({instance_type}) in the regions of {}",
                    unpriced.join(", ")
                ),
            });
        }
        Ok(prices)
    }
}

/// The price per unit of the SKU `<Spot Preemptible >?<prefix> <what> running in ...` in
/// `region` with `usage`; an SKU found in another unit is an error (the sum would be wrong).
fn sku_price(
    skus: &[Sku],
    prefix: &str,
    what: &str,
    unit: &str,
    usage: &str,
    spot: bool,
    region: &str,
) -> Result<Option<f64>, CloudError> {
    let wanted = format!("{prefix} {what} running in ");
    for sku in skus {
        let description = if spot {
            match sku.description.strip_prefix("Spot Preemptible ") {
                Some(rest) => rest,
                None => continue,
            }
        } else {
            sku.description.as_str()
        };
        if sku.category.usage_type != usage
            || !description.starts_with(&wanted)
            || !sku.service_regions.iter().any(|r| r == region)
        {
            continue;
        }
        return match sku.unit_price() {
            Some((price, u)) if u == unit => Ok(Some(price)),
            Some((_, u)) => Err(CloudError::Api {
                code: "UnexpectedUnit".into(),
                message: format!(
                    "the SKU \"{}\" is priced per {u}, expected per {unit}",
                    sku.description
                ),
            }),
            None => Err(CloudError::Api {
                code: "NoPrice".into(),
                message: format!("the SKU \"{}\" has no readable price", sku.description),
            }),
        };
    }
    Ok(None)
}

impl Provider for GcpProvider {
    fn name(&self) -> &str {
        "gcp"
    }

    /// The configured types in their order (all non-shared-core types of the first zone when
    /// none are configured); a type the zone does not offer is a [`CloudError::BadRequest`].
    fn instance_types(&self) -> BoxFuture<'_, Result<Vec<InstanceType>, CloudError>> {
        Box::pin(self.instance_types_now())
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Instance, CloudError>> {
        Box::pin(self.launch_now(spec))
    }

    fn list<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, CloudError>> {
        Box::pin(self.list_now(key, value))
    }

    /// Ids are instance names. Names GCE does not know (deleted, or never there) are skipped.
    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(self.terminate_now(ids))
    }

    /// One price per configured zone whose region the catalog prices; an unknown family is a
    /// [`CloudError::BadRequest`].
    fn prices<'a>(
        &'a self,
        instance_type: &'a str,
        spot: bool,
    ) -> BoxFuture<'a, Result<Vec<Price>, CloudError>> {
        Box::pin(self.prices_now(instance_type, spot))
    }
}

/// The [`CloudError`] for a failed answer.
fn api_error(status: StatusCode, bytes: &[u8], launch: Option<(&str, &str)>) -> CloudError {
    let (reason, message) = match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => {
            let first = body.error.errors.first();
            let reason = first
                .and_then(|e| e.reason.clone())
                .or(body.error.status)
                .unwrap_or_default();
            let message = if body.error.message.is_empty() {
                first.and_then(|e| e.message.clone()).unwrap_or_default()
            } else {
                body.error.message
            };
            (reason, message)
        }
        Err(_) => (
            String::new(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned(),
        ),
    };
    classify(Some(status.as_u16()), &reason, &message, launch)
}

fn to_instance(api: &ApiInstance) -> Instance {
    let state = match api.status.as_str() {
        "RUNNING" => InstanceState::Running,
        "STOPPING" | "SUSPENDING" => InstanceState::Stopping,
        "TERMINATED" | "STOPPED" | "SUSPENDED" => InstanceState::Terminated,
        // PROVISIONING, STAGING, REPAIRING and states not known here: counted as alive, so
        // that an instance that may cost money is never forgotten.
        _ => InstanceState::Pending,
    };
    let metadata = |key: &str| {
        api.metadata
            .as_ref()
            .and_then(|m| m.items.iter().find(|i| i.key == key))
            .and_then(|i| i.value.as_deref())
    };
    let tags = metadata(TAGS_KEY)
        .and_then(|t| serde_json::from_str::<BTreeMap<String, String>>(t).ok())
        .unwrap_or_else(|| api.labels.clone());
    Instance {
        id: api.name.clone(),
        instance_type: last_segment(&api.machine_type).to_owned(),
        zone: last_segment(&api.zone).to_owned(),
        state,
        launched_at: api
            .creation_timestamp
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .and_then(|t| u64::try_from(t.timestamp()).ok())
            .unwrap_or(0),
        tags,
    }
}

fn to_instance_type(t: &ApiMachineType) -> InstanceType {
    InstanceType {
        name: t.name.clone(),
        cores: t.guest_cpus,
        ram_bytes: t.memory_mb << 20,
        gpus: t
            .accelerators
            .iter()
            .map(|a| a.guest_accelerator_count)
            .sum(),
    }
}

/// The network as the API wants it: a bare name becomes `global/networks/<name>`.
fn network_path(network: &str) -> String {
    if network.contains('/') {
        network.to_owned()
    } else {
        format!("global/networks/{network}")
    }
}

/// The last segment of a resource URL (`.../zones/us-central1-a` → `us-central1-a`).
fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// `blendnet-` and 16 random lowercase base32 characters: a valid GCE name, unique.
fn new_name() -> String {
    let mut bytes = [0u8; 10];
    // aws-lc's generator only fails if the OS has no randomness at all.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    let suffix = data_encoding::BASE32_NOPAD
        .encode(&bytes)
        .to_ascii_lowercase();
    format!("blendnet-{suffix}")
}

/// A random (version 4) UUID, as `requestId` wants.
fn new_request_id() -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = data_encoding::HEXLOWER.encode(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Percent-encodes a query parameter value (everything but unreserved characters).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn too_many_pages(operation: &str) -> CloudError {
    CloudError::Api {
        code: "TooManyPages".into(),
        message: format!("{operation} answered more than {MAX_PAGES} pages"),
    }
}

/// An error and its sources, joined: `gcp_auth` and hyper put the useful part in the source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reasons_sort_into_what_a_provisioner_does_next() {
        let launch = Some(("n2-standard-8", "us-central1-a"));
        for reason in [
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
            "resourceExhausted",
        ] {
            let e = classify(Some(503), reason, "no room", launch);
            assert!(e.is_capacity(), "{reason}: {e:?}");
            assert!(
                e.to_string().contains("n2-standard-8 in us-central1-a"),
                "{e}"
            );
        }
        // Quota answers come with 403: they are not credential problems.
        for reason in ["QUOTA_EXCEEDED", "quotaExceeded"] {
            let e = classify(Some(403), reason, "", launch);
            assert!(matches!(e, CloudError::Quota(_)), "{reason}: {e:?}");
        }
        for (status, reason) in [(401, "authError"), (403, "forbidden"), (403, "")] {
            let e = classify(Some(status), reason, "", None);
            assert!(matches!(e, CloudError::Auth(_)), "{status} {reason}: {e:?}");
        }
        assert!(matches!(
            classify(Some(400), "invalid", "", launch),
            CloudError::BadRequest(_)
        ));
        assert!(matches!(
            classify(Some(404), "notFound", "", launch),
            CloudError::BadRequest(_)
        ));
        match classify(Some(429), "rateLimitExceeded", "slow down", None) {
            CloudError::Api { code, message } => {
                assert_eq!(
                    (code.as_str(), message.as_str()),
                    ("rateLimitExceeded", "slow down")
                )
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn labels_keep_valid_text_and_hash_the_rest() {
        assert_eq!(label("blendnet-mesh"), "blendnet-mesh");
        assert_eq!(label("l2bq63h5"), "l2bq63h5");
        let peer = "12D3KooWGzPMqHDpCQq5RjLWqKxX6nP8uZb8aS1vVbEw3nTGZxHk";
        let l = label(peer);
        assert_eq!(l, label(peer), "deterministic");
        assert_ne!(l, label("12D3KooWother"));
        assert!(l.len() <= MAX_LABEL_LEN && l.starts_with('h'), "{l}");
        assert!(is_label_text(&l), "{l}");
        // Uppercase, a leading digit, too long: hashed.
        assert_ne!(label("Mesh"), "Mesh");
        assert_ne!(label("1mesh"), "1mesh");
        assert_ne!(label(&"a".repeat(64)), "a".repeat(64));
        assert_eq!(label(&"a".repeat(63)), "a".repeat(63));
    }

    #[test]
    fn names_and_request_ids_are_what_gce_accepts() {
        let a = new_name();
        assert!(is_valid_name(&a), "{a}");
        assert_ne!(a, new_name());
        for bad in ["", "1abc", "abc-", "Abc", "a_b", &"a".repeat(64)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_eq!(region_of("us-central1-a"), "us-central1");
        assert_eq!(percent_encode("labels.a=b c"), "labels.a%3Db%20c");
    }

    #[test]
    fn money_reads_int64_units_as_strings() {
        let m: Money =
            serde_json::from_str(r#"{"currencyCode":"USD","units":"1","nanos":500000000}"#)
                .unwrap();
        assert_eq!(m.dollars(), Some(1.5));
        let m: Money = serde_json::from_str(r#"{"currencyCode":"USD","nanos":31611}"#).unwrap();
        assert_eq!(m.dollars(), Some(0.000031611));
    }
}
