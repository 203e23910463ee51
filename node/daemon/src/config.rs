//! Node configuration: `<data dir>/blendnet.toml`, then command-line flags on top.
//!
//! The file is optional; a missing file means every default. Every key is optional. Unknown keys
//! are an error (a typo must not silently leave a default in place), and every error names the
//! key and where its value came from (the file, or the flag that set it). Flags replace file
//! values; for lists (`--listen`, `--bootstrap`) the flags replace the whole list, they do not
//! append to it.
//!
//! ```toml
//! # <data dir>/blendnet.toml — every key shown with its default
//! listen = ["/ip4/0.0.0.0/tcp/7741", "/ip4/0.0.0.0/udp/7741/quic-v1"]
//! bootstrap = []
//! api = "127.0.0.1:0"
//! # web = "0.0.0.0:7743"            # also serve the status page here, over TLS
//! render = true
//! mdns = true
//! # psk_file = "swarm.key"          # relative to the data directory
//! # blender = "/opt/blender/blender"
//! # render_threads = 4             # Blender's render threads (default: every core)
//! # preemption = "aws"             # watch this cloud's preemption notices ("aws", "gcp")
//! # price_per_hour = 0.68          # US dollars an hour of this machine costs, for job costs
//! log_level = "info"
//! max_log_files = 7
//!
//! [store]
//! quota = "50 GiB"                  # bytes of blobs kept; least-recently-used evicted
//! ```
//!
//! Multiaddresses stay strings here, as written; [`Config::validate`] parses each one and
//! reports ``invalid value for `listen[1]` ...`` naming the entry.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;

/// The TCP and UDP port a node listens on by default.
pub const DEFAULT_PORT: u16 = 7741;

/// Largest configuration file read. A real one is a few hundred bytes; anything near this is
/// not a config file, and reading it whole could exhaust memory (DESIGN §11).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Highest `price_per_hour` taken, in US dollars: far above any machine's price, low enough
/// that a job's cost in millionths of a dollar never overflows.
pub const MAX_PRICE_PER_HOUR: f64 = 100_000.0;

/// Every key the file may contain, in the order the documentation lists them.
pub const KEYS: [&str; 15] = [
    "listen",
    "bootstrap",
    "api",
    "web",
    "render",
    "mdns",
    "psk_file",
    "blender",
    "render_threads",
    "preemption",
    "price_per_hour",
    "log_level",
    "max_log_files",
    "store",
    "cloud",
];

/// The node's configuration after the file and the flags are merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `listen`: multiaddresses to listen on for other peers.
    /// Default `["/ip4/0.0.0.0/tcp/7741", "/ip4/0.0.0.0/udp/7741/quic-v1"]`.
    /// Flag: `--listen ADDR` (repeatable; replaces the list).
    pub listen: Vec<String>,
    /// `bootstrap`: multiaddresses of peers to dial at start, each ending in `/p2p/<peer id>`.
    /// Default empty (LAN peers are found by mDNS; `blendnet join CODE` brings its own).
    /// Flag: `--bootstrap ADDR` (repeatable; replaces the list).
    pub bootstrap: Vec<String>,
    /// `api`: `IP:PORT` of the local HTTP API. Must be a loopback address: the API is plain
    /// HTTP. Port 0 picks a free port; the chosen one is written to `<data dir>/api.addr`.
    /// Default `"127.0.0.1:0"`. Flag: `--api IP:PORT`.
    pub api: SocketAddr,
    /// `web`: `IP:PORT` where the status page (and the API, with a page session or the token)
    /// is also served, over TLS with the node's web certificate (`<data dir>/web/`), for
    /// browsers on other machines. The API address serves the page on this machine anyway.
    /// Port 0 picks a free port. Default none. Flag: `--web IP:PORT`.
    pub web: Option<SocketAddr>,
    /// `render`: whether this node renders tasks for the mesh (it can still submit jobs).
    /// Default `true`. Flag: `--no-render` sets it to `false`.
    pub render: bool,
    /// `mdns`: whether to find and announce peers on the local network with mDNS.
    /// Default `true`. Flag: `--no-mdns` sets it to `false`.
    pub mdns: bool,
    /// `psk_file`: a libp2p pre-shared key file (`swarm.key` format) that hides the mesh from
    /// scanners. TCP only: setting it turns QUIC off. A relative path in the file is relative
    /// to the data directory; on the command line, to the current directory.
    /// Default none. Flag: `--psk-file PATH`.
    pub psk_file: Option<PathBuf>,
    /// `blender`: the Blender executable. Without it, `BLENDNET_BLENDER`, then `blender` on
    /// `PATH`. Default none. Flag: `--blender PATH`.
    pub blender: Option<PathBuf>,
    /// `render_threads`: how many threads Blender renders with on this node (Blender's `-t`):
    /// fewer leave cores to other work. Default none (every core). Flag: `--render-threads N`.
    pub render_threads: Option<u32>,
    /// `preemption`: the cloud whose preemption notices this node watches (`"aws"`, `"gcp"`):
    /// on notice it hands back its running task and leaves. Set by `blendnet enroll` from the
    /// user data of a spot instance. Default none. Flag: `--preemption CLOUD`.
    pub preemption: Option<String>,
    /// `price_per_hour`: what an hour of this machine costs, in US dollars. The node puts it
    /// in the statistics of every task it renders, so a job's cost can be summed from them,
    /// and advertises it with its capabilities. Set by `blendnet enroll` from a cloud
    /// instance's launch price. Default none (unknown: a job's cost leaves this node out and
    /// names it). Flag: `--price-per-hour DOLLARS`.
    pub price_per_hour: Option<f64>,
    /// `log_level`: a tracing `EnvFilter` directive such as `"info"` or
    /// `"info,blendnet_net=debug"`. The `RUST_LOG` environment variable, when set, wins.
    /// Default `"info"`.
    pub log_level: String,
    /// `max_log_files`: how many daily log files to keep in `<data dir>/logs/` (at least 1).
    /// Default `7`.
    pub max_log_files: usize,
    /// `store.quota` (in a `[store]` table): most bytes of blobs the store keeps; unpinned
    /// blobs are evicted least-recently-used first to stay under it. An integer of bytes or a
    /// string such as `"50 GiB"` or `"500MB"`. Default none (bounded by the disk).
    pub store_quota: Option<u64>,
    /// `[cloud]`: where `blendnet cloud up` starts instances. Default none.
    pub cloud: Option<CloudConfig>,
    /// The file this configuration was read from (or would have been, when missing).
    #[serde(skip)]
    file: PathBuf,
    /// Keys whose value came from a flag, so errors can say so.
    #[serde(skip)]
    from_flags: BTreeSet<&'static str>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
            ],
            bootstrap: Vec::new(),
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            web: None,
            render: true,
            mdns: true,
            psk_file: None,
            blender: None,
            render_threads: None,
            preemption: None,
            price_per_hour: None,
            log_level: "info".to_owned(),
            max_log_files: 7,
            store_quota: None,
            cloud: None,
            file: PathBuf::new(),
            from_flags: BTreeSet::new(),
        }
    }
}

/// The `[cloud]` table: the provider instances are started with, by hand (`blendnet cloud up`)
/// and, when `max_instances` is above 0, by this node's provisioner whenever the mesh has more
/// work than its render peers finish within the `horizon`.
///
/// ```toml
/// [cloud]
/// provider = "local"            # or "aws", "gcp"
/// instance_type = "local"       # default: the provider's types, cheapest per core first
/// spot = true
/// join_timeout = "15m"          # an instance's token is worthless after this, and an
///                               # instance that has not joined by then is terminated
/// max_instances = 4             # most instances the provisioner keeps; 0 (the default):
///                               # none are started by themselves
/// idle_grace = "5m"             # an instance without a task this long is terminated
/// horizon = "10m"               # start enough to finish the pending work within this
/// budget_per_hour = 2.0         # US dollars: the instances alive at once never cost more
/// cert_lifetime = "6h"          # an instance's certificate lasts this long; renewed at half
///                               # while the instance lives, so a machine that is gone drops
///                               # out of the mesh by itself
/// local_root = "instances"      # local: where instances live, relative to the data dir
/// local_args = ["--no-mdns"]    # local: more flags for `blendnet enroll`
/// local_price_per_hour = 0.0    # local: the price the instances are billed at (US dollars;
///                               #        default 0), for trying budgets and `blendnet cost`
/// aws_region = "us-east-1"      # aws: keys from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
/// aws_image_id = "ami-..."      #      (and AWS_SESSION_TOKEN)
/// # aws_endpoint_url = "http://127.0.0.1:5000"
/// gcp_project = "my-project"    # gcp: a service-account key file from gcp_credentials or
/// gcp_zones = ["us-central1-a"] #      GOOGLE_APPLICATION_CREDENTIALS
/// gcp_image = "projects/debian-cloud/global/images/family/debian-12"
/// gcp_max_run_duration = "12h"  #      Compute Engine deletes an instance after this, whatever
///                               #      happens to this node
/// # gcp_endpoint_url, gcp_billing_url, gcp_token_uri: other API roots (tests)
/// aws_identity_certificate = "aws-rsa.pem"  # AWS's public certificate for the identity
///                               # document's RSA signature (your region's "RSA" one in AWS's
///                               # "public certificates for instance identity document
///                               # signatures"); set, AWS instances must prove who they are
/// gcp_identity_keys = "google-certs.json"   # Google's token-signing certificates
///                               # (https://www.googleapis.com/oauth2/v1/certs, or PEM); set,
///                               # GCP instances must prove who they are
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    pub provider: String,
    #[serde(default)]
    pub instance_type: Option<String>,
    #[serde(default = "yes")]
    pub spot: bool,
    #[serde(default)]
    pub join_timeout: Option<String>,
    #[serde(default)]
    pub max_instances: u32,
    #[serde(default)]
    pub idle_grace: Option<String>,
    #[serde(default)]
    pub horizon: Option<String>,
    #[serde(default)]
    pub budget_per_hour: Option<f64>,
    #[serde(default)]
    pub cert_lifetime: Option<String>,
    #[serde(default)]
    pub local_root: Option<PathBuf>,
    #[serde(default)]
    pub local_args: Vec<String>,
    #[serde(default)]
    pub local_price_per_hour: Option<f64>,
    #[serde(default)]
    pub aws_region: Option<String>,
    #[serde(default)]
    pub aws_image_id: Option<String>,
    #[serde(default)]
    pub aws_endpoint_url: Option<String>,
    #[serde(default)]
    pub gcp_project: Option<String>,
    #[serde(default)]
    pub gcp_zones: Vec<String>,
    #[serde(default)]
    pub gcp_credentials: Option<PathBuf>,
    #[serde(default)]
    pub gcp_image: Option<String>,
    #[serde(default)]
    pub gcp_max_run_duration: Option<String>,
    #[serde(default)]
    pub gcp_endpoint_url: Option<String>,
    #[serde(default)]
    pub gcp_billing_url: Option<String>,
    #[serde(default)]
    pub gcp_token_uri: Option<String>,
    #[serde(default)]
    pub aws_identity_certificate: Option<PathBuf>,
    #[serde(default)]
    pub gcp_identity_keys: Option<PathBuf>,
}

/// Most bytes read from a trust-root file (Google's list of certificates is about 4 KiB).
const MAX_TRUST_ROOT_BYTES: u64 = 256 * 1024;

/// How long an instance's certificate lasts when `cert_lifetime` is not set.
pub const DEFAULT_CERT_LIFETIME_SECS: u64 = 6 * 3600;

impl CloudConfig {
    /// The keys instance identity proofs are checked against, read from
    /// `aws_identity_certificate` and `gcp_identity_keys`; none for a cloud without its key.
    pub fn trust_roots(&self) -> anyhow::Result<blendnet_cloud::identity::TrustRoots> {
        use anyhow::Context as _;
        use std::io::Read as _;
        let read = |path: &std::path::Path| -> anyhow::Result<String> {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_TRUST_ROOT_BYTES).read_to_string(&mut text))
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(text)
        };
        let mut roots = blendnet_cloud::identity::TrustRoots::default();
        if let Some(path) = &self.aws_identity_certificate {
            roots
                .add_aws_pem(&read(path)?)
                .with_context(|| format!("aws_identity_certificate {}", path.display()))?;
        }
        if let Some(path) = &self.gcp_identity_keys {
            roots
                .add_gcp(&read(path)?)
                .with_context(|| format!("gcp_identity_keys {}", path.display()))?;
        }
        Ok(roots)
    }

    /// How long the certificate of an instance lasts (checked when the table was read).
    pub fn cert_lifetime_secs(&self) -> u64 {
        self.cert_lifetime
            .as_deref()
            .and_then(|t| crate::cli::parse_ttl(t).ok())
            .unwrap_or(DEFAULT_CERT_LIFETIME_SECS)
    }

    /// The provisioner's limits from the table (durations were checked when it was read).
    pub fn limits(&self) -> blendnet_cloud::policy::Limits {
        let defaults = blendnet_cloud::policy::Limits::default();
        let secs = |text: &Option<String>, default: u64| {
            text.as_deref()
                .and_then(|t| crate::cli::parse_ttl(t).ok())
                .unwrap_or(default)
        };
        blendnet_cloud::policy::Limits {
            max_instances: self.max_instances,
            idle_grace_secs: secs(&self.idle_grace, defaults.idle_grace_secs),
            join_timeout_secs: secs(&self.join_timeout, defaults.join_timeout_secs),
            horizon_secs: secs(&self.horizon, defaults.horizon_secs),
            budget_left: self.budget_per_hour.map(|per_hour| {
                per_hour * secs(&self.horizon, defaults.horizon_secs) as f64 / 3600.0
            }),
        }
    }
}

fn yes() -> bool {
    true
}

/// Command-line values that override the file. `None`, `false` and empty lists mean "flag not
/// given". The binary's clap struct fills this.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--listen ADDR`, repeatable; non-empty replaces `listen`.
    pub listen: Vec<String>,
    /// `--bootstrap ADDR`, repeatable; non-empty replaces `bootstrap`.
    pub bootstrap: Vec<String>,
    /// `--api IP:PORT`.
    pub api: Option<SocketAddr>,
    /// `--web IP:PORT`.
    pub web: Option<SocketAddr>,
    /// `--no-render`.
    pub no_render: bool,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `--psk-file PATH` (relative to the current directory).
    pub psk_file: Option<PathBuf>,
    /// `--blender PATH`.
    pub blender: Option<PathBuf>,
    /// `--render-threads N`.
    pub render_threads: Option<u32>,
    /// `--preemption CLOUD`.
    pub preemption: Option<String>,
    /// `--price-per-hour DOLLARS`.
    pub price_per_hour: Option<f64>,
}

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file.
    File(PathBuf),
    /// A command-line flag.
    Flag(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Flag(flag) => write!(f, "from {flag}"),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// The file is too large to be a configuration file.
    #[error("config file {path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML. The message shows the line and column.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// toml's description, with the position.
        message: String,
    },
    /// The file has a key this version does not know.
    #[error("unknown key `{key}` in {path} (known keys: {known})", known = KEYS.join(", "))]
    UnknownKey {
        /// The unknown key.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// A key has a value of the wrong type or an unusable value.
    #[error("invalid value for `{key}` {origin}: {reason}")]
    Invalid {
        /// The key, with an index for list items (`listen[1]`).
        key: String,
        /// The file or the flag that gave the value.
        origin: Origin,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Loads `<data dir>/blendnet.toml` (all defaults if it is missing), applies the flags, and
    /// [validates](Self::validate) the result. Blocking (reads a small file).
    pub fn load(data_dir: &DataDir, overrides: &Overrides) -> Result<Self, ConfigError> {
        let path = data_dir.config();
        let mut config = match read_bounded(&path)? {
            Some(text) => Self::from_toml(&text, &path, data_dir.path())?,
            None => Self {
                file: path,
                ..Self::default()
            },
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    /// Parses the text of a configuration file. `path` is used in error messages; a relative
    /// `psk_file` is resolved against `base` (the data directory). Does not [validate](Self::validate).
    pub fn from_toml(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        let mut config = Self {
            file: path.to_owned(),
            ..Self::default()
        };
        for (key, value) in table {
            let field = FileField { path, key: &key };
            match key.as_str() {
                "listen" => config.listen = field.parse(value)?,
                "bootstrap" => config.bootstrap = field.parse(value)?,
                "api" => {
                    let text: String = field.parse(value)?;
                    config.api = text.parse().map_err(|e| {
                        field.invalid(format!(
                            "{text:?} is not an IP:PORT socket address such as \"127.0.0.1:0\" ({e})"
                        ))
                    })?;
                }
                "web" => {
                    let text: String = field.parse(value)?;
                    config.web = Some(text.parse().map_err(|e| {
                        field.invalid(format!(
                            "{text:?} is not an IP:PORT socket address such as \"0.0.0.0:7743\" ({e})"
                        ))
                    })?);
                }
                "render" => config.render = field.parse(value)?,
                "mdns" => config.mdns = field.parse(value)?,
                "psk_file" => {
                    let psk: PathBuf = field.parse(value)?;
                    config.psk_file = Some(base.join(psk));
                }
                "blender" => config.blender = Some(field.parse(value)?),
                "render_threads" => config.render_threads = Some(field.parse(value)?),
                "preemption" => config.preemption = Some(field.parse(value)?),
                "price_per_hour" => {
                    // TOML writes a whole number of dollars as an integer.
                    let price = match value {
                        toml::Value::Integer(n) => n as f64,
                        other => field.parse(other)?,
                    };
                    config.price_per_hour = Some(price);
                }
                "log_level" => config.log_level = field.parse(value)?,
                "max_log_files" => config.max_log_files = field.parse(value)?,
                "store" => {
                    let table: toml::Table = field.parse(value)?;
                    for (sub, value) in table {
                        let key = format!("store.{sub}");
                        let field = FileField { path, key: &key };
                        match sub.as_str() {
                            "quota" => {
                                config.store_quota =
                                    Some(parse_size(value).map_err(|r| field.invalid(r))?)
                            }
                            _ => {
                                return Err(ConfigError::UnknownKey {
                                    key,
                                    path: path.to_owned(),
                                });
                            }
                        }
                    }
                }
                "cloud" => {
                    let mut cloud: CloudConfig = field.parse(value)?;
                    if !matches!(cloud.provider.as_str(), "local" | "aws" | "gcp") {
                        return Err(field.invalid(format!(
                            "provider {:?} is not one of \"local\", \"aws\", \"gcp\"",
                            cloud.provider
                        )));
                    }
                    for (name, ttl) in [
                        ("join_timeout", &cloud.join_timeout),
                        ("idle_grace", &cloud.idle_grace),
                        ("horizon", &cloud.horizon),
                        ("gcp_max_run_duration", &cloud.gcp_max_run_duration),
                        ("cert_lifetime", &cloud.cert_lifetime),
                    ] {
                        if let Some(ttl) = ttl {
                            crate::cli::parse_ttl(ttl)
                                .map_err(|e| field.invalid(format!("{name}: {e}")))?;
                        }
                    }
                    for (name, amount) in [
                        ("budget_per_hour", cloud.budget_per_hour),
                        ("local_price_per_hour", cloud.local_price_per_hour),
                    ] {
                        if let Some(amount) = amount
                            && !(amount.is_finite() && amount >= 0.0)
                        {
                            return Err(field.invalid(format!(
                                "{name}: {amount} is not an amount of US dollars (0 or more)"
                            )));
                        }
                    }
                    cloud.local_root =
                        Some(base.join(cloud.local_root.unwrap_or_else(|| "instances".into())));
                    cloud.gcp_credentials = cloud.gcp_credentials.map(|p| base.join(p));
                    cloud.aws_identity_certificate =
                        cloud.aws_identity_certificate.map(|p| base.join(p));
                    cloud.gcp_identity_keys = cloud.gcp_identity_keys.map(|p| base.join(p));
                    config.cloud = Some(cloud);
                }
                _ => {
                    return Err(ConfigError::UnknownKey {
                        key,
                        path: path.to_owned(),
                    });
                }
            }
        }
        Ok(config)
    }

    /// Applies command-line flags on top of the file's values.
    pub fn apply(&mut self, overrides: &Overrides) {
        if !overrides.listen.is_empty() {
            self.listen = overrides.listen.clone();
            self.from_flags.insert("listen");
        }
        if !overrides.bootstrap.is_empty() {
            self.bootstrap = overrides.bootstrap.clone();
            self.from_flags.insert("bootstrap");
        }
        if let Some(api) = overrides.api {
            self.api = api;
            self.from_flags.insert("api");
        }
        if let Some(web) = overrides.web {
            self.web = Some(web);
            self.from_flags.insert("web");
        }
        if overrides.no_render {
            self.render = false;
            self.from_flags.insert("render");
        }
        if overrides.no_mdns {
            self.mdns = false;
            self.from_flags.insert("mdns");
        }
        if let Some(psk) = &overrides.psk_file {
            // Relative to the current directory, as any path on a command line.
            self.psk_file = Some(std::path::absolute(psk).unwrap_or_else(|_| psk.clone()));
            self.from_flags.insert("psk_file");
        }
        if let Some(blender) = &overrides.blender {
            self.blender = Some(blender.clone());
            self.from_flags.insert("blender");
        }
        if let Some(cloud) = &overrides.preemption {
            self.preemption = Some(cloud.clone());
            self.from_flags.insert("preemption");
        }
        if let Some(threads) = overrides.render_threads {
            self.render_threads = Some(threads);
            self.from_flags.insert("render_threads");
        }
        if let Some(price) = overrides.price_per_hour {
            self.price_per_hour = Some(price);
            self.from_flags.insert("price_per_hour");
        }
    }

    /// `price_per_hour` in millionths of a US dollar, as peers exchange it (checked by
    /// [`Config::validate`]).
    pub fn price_per_hour_micros(&self) -> Option<u64> {
        self.price_per_hour.map(|p| (p * 1e6).round() as u64)
    }

    /// The configuration file these values were read from (or would be, if it is missing).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Where the value of `key` came from.
    pub fn origin(&self, key: &str) -> Origin {
        match self.from_flags.get(key) {
            Some(key) => Origin::Flag(flag_name(key)),
            None => Origin::File(self.file.clone()),
        }
    }

    /// Checks every value: each multiaddress parses,
    /// `api` is a loopback address, `log_level` parses as an `EnvFilter`, `max_log_files` is
    /// at least 1, and `psk_file` (if set) is an existing file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, list) in [("listen", &self.listen), ("bootstrap", &self.bootstrap)] {
            for (i, addr) in list.iter().enumerate() {
                check_multiaddr(addr).map_err(|reason| ConfigError::Invalid {
                    key: format!("{key}[{i}]"),
                    origin: self.origin(key),
                    reason,
                })?;
            }
        }
        if !self.api.ip().is_loopback() {
            return Err(self.invalid(
                "api",
                format!(
                    "{} is not a loopback address; the local API is plain HTTP, so it listens \
                     only on 127.0.0.1 or ::1",
                    self.api
                ),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(self.invalid(
                "log_level",
                format!(
                    "{:?} is not a log filter such as \"info\" or \"info,blendnet_net=debug\" ({e})",
                    self.log_level
                ),
            ));
        }
        if self.max_log_files == 0 {
            return Err(self.invalid("max_log_files", "must be at least 1".to_owned()));
        }
        if let Some(cloud) = &self.preemption
            && let Err(e) = cloud.parse::<blendnet_cloud::preempt::Cloud>()
        {
            return Err(self.invalid("preemption", e));
        }
        if let Some(price) = self.price_per_hour
            && !(price.is_finite() && (0.0..=MAX_PRICE_PER_HOUR).contains(&price))
        {
            return Err(self.invalid(
                "price_per_hour",
                format!("{price} is not an amount of US dollars from 0 to {MAX_PRICE_PER_HOUR}"),
            ));
        }
        if self.render_threads == Some(0) {
            return Err(self.invalid(
                "render_threads",
                "must be at least 1 (leave it out for every core)".to_owned(),
            ));
        }
        if let Some(psk) = &self.psk_file {
            match std::fs::metadata(psk) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(
                        self.invalid("psk_file", format!("{} is not a file", psk.display()))
                    );
                }
                Err(e) => {
                    return Err(
                        self.invalid("psk_file", format!("cannot read {}: {e}", psk.display()))
                    );
                }
            }
        }
        Ok(())
    }

    fn invalid(&self, key: &'static str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            origin: self.origin(key),
            reason,
        }
    }
}

/// The flag that overrides `key`.
fn flag_name(key: &str) -> &'static str {
    match key {
        "listen" => "--listen",
        "bootstrap" => "--bootstrap",
        "api" => "--api",
        "web" => "--web",
        "render" => "--no-render",
        "mdns" => "--no-mdns",
        "psk_file" => "--psk-file",
        "blender" => "--blender",
        "render_threads" => "--render-threads",
        "preemption" => "--preemption",
        "price_per_hour" => "--price-per-hour",
        _ => "the command line",
    }
}

/// One key of the file being parsed, for error messages.
struct FileField<'a> {
    path: &'a Path,
    key: &'a str,
}

impl FileField<'_> {
    fn parse<T: DeserializeOwned>(&self, value: toml::Value) -> Result<T, ConfigError> {
        value
            .try_into()
            .map_err(|e: toml::de::Error| self.invalid(e.message().to_owned()))
    }

    fn invalid(&self, reason: String) -> ConfigError {
        ConfigError::Invalid {
            key: self.key.to_owned(),
            origin: Origin::File(self.path.to_owned()),
            reason,
        }
    }
}

/// Checks that `addr` parses as a libp2p multiaddr, with a hint for the common mistake of
/// writing `HOST:PORT`.
fn check_multiaddr(addr: &str) -> Result<(), String> {
    if !addr.starts_with('/') {
        return Err(format!(
            "{addr:?} is not a multiaddress; write it like \"/ip4/192.168.1.5/tcp/{DEFAULT_PORT}\""
        ));
    }
    addr.parse::<blendnet_net::Multiaddr>()
        .map(|_| ())
        .map_err(|e| format!("{addr:?} is not a multiaddress: {e}"))
}

/// Parses a size: an integer of bytes, or a string such as `"50 GiB"`, `"500MB"`, `"1024"`.
fn parse_size(value: toml::Value) -> Result<u64, String> {
    let text = match value {
        toml::Value::Integer(n) => return u64::try_from(n).map_err(|_| format!("{n} is negative")),
        toml::Value::String(s) => s,
        other => return Err(format!("{other} is not a size such as \"50 GiB\"")),
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as \"50 GiB\""))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    let bytes = number * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

/// Reads the file if it exists, refusing one larger than [`MAX_CONFIG_BYTES`].
fn read_bounded(path: &Path) -> Result<Option<String>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(text: Option<&str>) -> (tempfile::TempDir, DataDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path().join("node")).unwrap();
        if let Some(text) = text {
            std::fs::write(dir.config(), text).unwrap();
        }
        (tmp, dir)
    }

    fn load_err(text: &str) -> (ConfigError, String, DataDir, tempfile::TempDir) {
        let (tmp, dir) = dir_with(Some(text));
        let err = Config::load(&dir, &Overrides::default()).unwrap_err();
        let msg = err.to_string();
        (err, msg, dir, tmp)
    }

    #[test]
    fn a_multiaddr_that_does_not_parse_is_named_by_its_entry() {
        let (err, msg, _dir, _tmp) =
            load_err("listen = [\"/ip4/127.0.0.1/tcp/0\", \"/ip4/999.0.0.1/tcp/1\"]");
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        assert!(msg.contains("`listen[1]`"), "{msg}");
        let (_, msg, _dir, _tmp) = load_err("bootstrap = [\"/ip4/1.2.3.4/tcp/7741/p2p/nope\"]");
        assert!(msg.contains("`bootstrap[0]`"), "{msg}");
    }

    #[test]
    fn store_quota_takes_units_and_names_bad_keys() {
        let (_tmp, dir) = dir_with(Some("[store]\nquota = \"2 GiB\"\n"));
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        assert_eq!(config.store_quota, Some(2 << 30));
        let (_tmp, dir) = dir_with(Some("[store]\nquota = 5000\n"));
        assert_eq!(
            Config::load(&dir, &Overrides::default())
                .unwrap()
                .store_quota,
            Some(5000)
        );
        let (_, msg, _, _tmp) = load_err("[store]\nquota = \"lots\"\n");
        assert!(msg.contains("`store.quota`"), "{msg}");
        let (_, msg, _, _tmp) = load_err("[store]\nquota = \"5 parsecs\"\n");
        assert!(msg.contains("`store.quota`"), "{msg}");
        let (_, msg, _, _tmp) = load_err("[store]\nqouta = 1\n");
        assert!(msg.contains("store.qouta"), "{msg}");
    }

    #[test]
    fn the_cloud_table_gives_the_provisioner_its_limits_and_names_bad_values() {
        let (_tmp, dir) = dir_with(Some(
            "[cloud]\nprovider = \"gcp\"\nmax_instances = 3\nidle_grace = \"90s\"\n\
             horizon = \"30m\"\nbudget_per_hour = 1.5\ngcp_credentials = \"key.json\"\n",
        ));
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        let cloud = config.cloud.unwrap();
        assert_eq!(cloud.gcp_credentials, Some(dir.path().join("key.json")));
        let limits = cloud.limits();
        assert_eq!(limits.max_instances, 3);
        assert_eq!(limits.idle_grace_secs, 90);
        assert_eq!(limits.horizon_secs, 1800);
        // Defaults where unset: a 15-minute join timeout.
        assert_eq!(limits.join_timeout_secs, 900);
        // $1.50 an hour over a half-hour horizon: 75 cents to spend.
        assert_eq!(limits.budget_left, Some(0.75));
        assert_eq!(cloud.cert_lifetime_secs(), DEFAULT_CERT_LIFETIME_SECS);
        // No max_instances: the provisioner starts nothing by itself.
        let (_tmp, dir) = dir_with(Some("[cloud]\nprovider = \"local\"\n"));
        let cloud = Config::load(&dir, &Overrides::default())
            .unwrap()
            .cloud
            .unwrap();
        assert_eq!(cloud.limits().max_instances, 0);

        let (_, msg, _, _tmp) = load_err("[cloud]\nprovider = \"azure\"\n");
        assert!(
            msg.contains("`cloud`") && msg.contains("\"azure\""),
            "{msg}"
        );
        let (_, msg, _, _tmp) = load_err("[cloud]\nprovider = \"local\"\nidle_grace = \"soon\"\n");
        assert!(msg.contains("idle_grace") && msg.contains("soon"), "{msg}");
        let (_, msg, _, _tmp) = load_err("[cloud]\nprovider = \"local\"\nbudget_per_hour = -2.0\n");
        assert!(msg.contains("budget_per_hour"), "{msg}");
        let (_, msg, _, _tmp) =
            load_err("[cloud]\nprovider = \"local\"\nlocal_price_per_hour = -1.0\n");
        assert!(msg.contains("local_price_per_hour"), "{msg}");
        let (_, msg, _, _tmp) = load_err("[cloud]\nprovider = \"local\"\nmax_instance = 2\n");
        assert!(msg.contains("max_instance"), "{msg}");
    }

    #[test]
    fn missing_file_gives_defaults() {
        let (_tmp, dir) = dir_with(None);
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        assert_eq!(
            config.listen,
            ["/ip4/0.0.0.0/tcp/7741", "/ip4/0.0.0.0/udp/7741/quic-v1"]
        );
        assert!(config.bootstrap.is_empty());
        assert_eq!(config.api, "127.0.0.1:0".parse().unwrap());
        assert!(config.render);
        assert!(config.mdns);
        assert_eq!(config.psk_file, None);
        assert_eq!(config.blender, None);
        assert_eq!(config.log_level, "info");
        assert_eq!(config.max_log_files, 7);
        assert_eq!(config.file(), dir.config());
    }

    #[test]
    fn file_values_are_read() {
        let (_tmp, dir) = dir_with(Some(
            r#"
            listen = ["/ip4/127.0.0.1/tcp/9000"]
            bootstrap = ["/ip4/10.0.0.2/tcp/7741/p2p/12D3KooWJnagPNcxTwpPBpUApYy4y8Q1K5kbCBS7L2iQcCy2vRbF"]
            api = "127.0.0.1:8123"
            render = false
            mdns = false
            blender = "/opt/blender/blender"
            log_level = "debug,hyper=info"
            max_log_files = 3
            "#,
        ));
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        assert_eq!(config.listen, ["/ip4/127.0.0.1/tcp/9000"]);
        assert_eq!(
            config.bootstrap,
            ["/ip4/10.0.0.2/tcp/7741/p2p/12D3KooWJnagPNcxTwpPBpUApYy4y8Q1K5kbCBS7L2iQcCy2vRbF"]
        );
        assert_eq!(config.api.port(), 8123);
        assert!(!config.render);
        assert!(!config.mdns);
        assert_eq!(
            config.blender.as_deref(),
            Some(Path::new("/opt/blender/blender"))
        );
        assert_eq!(config.log_level, "debug,hyper=info");
        assert_eq!(config.max_log_files, 3);
    }

    #[test]
    fn unknown_key_is_named_with_file() {
        let (err, msg, dir, _tmp) = load_err("render = true\nrendr = false\n");
        assert!(matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "rendr"));
        assert!(msg.contains("`rendr`"), "{msg}");
        assert!(msg.contains(&dir.config().display().to_string()), "{msg}");
    }

    #[test]
    fn bad_type_names_key_and_file() {
        let (err, msg, dir, _tmp) = load_err("render = \"yes\"\n");
        assert!(matches!(err, ConfigError::Invalid { ref key, .. } if key == "render"));
        assert!(msg.starts_with("invalid value for `render` in "), "{msg}");
        assert!(msg.contains(&dir.config().display().to_string()), "{msg}");

        let (_, msg, _, _tmp) = load_err("listen = \"/ip4/0.0.0.0/tcp/1\"\n");
        assert!(msg.contains("`listen`"), "{msg}");
    }

    #[test]
    fn bad_api_address() {
        let (_, msg, dir, _tmp) = load_err("api = \"localhost\"\n");
        assert!(msg.starts_with("invalid value for `api` in "), "{msg}");
        assert!(msg.contains(&dir.config().display().to_string()), "{msg}");
        assert!(msg.contains("\"localhost\""), "{msg}");

        let (_, msg, _, _tmp) = load_err("api = \"0.0.0.0:8000\"\n");
        assert!(msg.contains("`api`") && msg.contains("loopback"), "{msg}");
    }

    #[test]
    fn bad_max_log_files() {
        let (_, msg, _, _tmp) = load_err("max_log_files = 0\n");
        assert!(msg.contains("`max_log_files`"), "{msg}");
        assert!(msg.contains("at least 1"), "{msg}");

        let (_, msg, _, _tmp) = load_err("max_log_files = -2\n");
        assert!(msg.contains("`max_log_files`"), "{msg}");
    }

    #[test]
    fn bad_log_level() {
        let (_, msg, _, _tmp) = load_err("log_level = \"info,foo=[\"\n");
        assert!(msg.contains("`log_level`"), "{msg}");
    }

    #[test]
    fn syntax_error_names_file() {
        let (err, msg, dir, _tmp) = load_err("render = \n");
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(msg.contains(&dir.config().display().to_string()), "{msg}");
    }

    #[test]
    fn host_port_in_listen_is_caught_with_index() {
        let (_, msg, _, _tmp) = load_err("listen = [\"/ip4/0.0.0.0/tcp/1\", \"0.0.0.0:7741\"]\n");
        assert!(
            msg.starts_with("invalid value for `listen[1]` in "),
            "{msg}"
        );
    }

    #[test]
    fn psk_file_is_relative_to_data_dir_and_must_exist() {
        let (_tmp, dir) = dir_with(Some("psk_file = \"swarm.key\"\n"));
        let err = Config::load(&dir, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("`psk_file`"), "{err}");

        std::fs::write(dir.path().join("swarm.key"), "x").unwrap();
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        assert_eq!(config.psk_file, Some(dir.path().join("swarm.key")));
    }

    #[test]
    fn flags_override_file() {
        let (_tmp, dir) = dir_with(Some(
            r#"
            listen = ["/ip4/127.0.0.1/tcp/9000", "/ip4/127.0.0.1/udp/9000/quic-v1"]
            bootstrap = ["/ip4/10.0.0.2/tcp/7741"]
            api = "127.0.0.1:8123"
            blender = "/from/file"
            render_threads = 3
            "#,
        ));
        let overrides = Overrides {
            listen: vec!["/ip4/127.0.0.1/tcp/9100".to_owned()],
            bootstrap: vec![],
            api: Some("127.0.0.1:9999".parse().unwrap()),
            web: Some("0.0.0.0:7743".parse().unwrap()),
            no_render: true,
            no_mdns: true,
            psk_file: None,
            blender: Some("/from/flag".into()),
            render_threads: None,
            preemption: Some("gcp".into()),
            price_per_hour: None,
        };
        let config = Config::load(&dir, &overrides).unwrap();
        assert_eq!(config.web, Some("0.0.0.0:7743".parse().unwrap()));
        assert_eq!(config.render_threads, Some(3));
        assert_eq!(config.preemption.as_deref(), Some("gcp"));
        // Replaced, not appended to.
        assert_eq!(config.listen, ["/ip4/127.0.0.1/tcp/9100"]);
        // Not given on the command line: the file's value stays.
        assert_eq!(config.bootstrap, ["/ip4/10.0.0.2/tcp/7741"]);
        assert_eq!(config.api.port(), 9999);
        assert!(!config.render);
        assert!(!config.mdns);
        assert_eq!(config.blender.as_deref(), Some(Path::new("/from/flag")));
        assert_eq!(config.origin("listen"), Origin::Flag("--listen"));
        assert_eq!(config.origin("bootstrap"), Origin::File(dir.config()));
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let (_tmp, dir) = dir_with(None);
        let overrides = Overrides {
            listen: vec!["127.0.0.1:9000".to_owned()],
            ..Overrides::default()
        };
        let msg = Config::load(&dir, &overrides).unwrap_err().to_string();
        assert!(
            msg.starts_with("invalid value for `listen[0]` from --listen"),
            "{msg}"
        );
        let overrides = Overrides {
            render_threads: Some(0),
            ..Overrides::default()
        };
        let msg = Config::load(&dir, &overrides).unwrap_err().to_string();
        assert!(
            msg.starts_with("invalid value for `render_threads` from --render-threads"),
            "{msg}"
        );
        let overrides = Overrides {
            preemption: Some("azure".into()),
            ..Overrides::default()
        };
        let msg = Config::load(&dir, &overrides).unwrap_err().to_string();
        assert!(
            msg.starts_with("invalid value for `preemption` from --preemption")
                && msg.contains("\"azure\""),
            "{msg}"
        );
    }

    #[test]
    fn price_per_hour_is_read_in_dollars_and_exchanged_in_micro_dollars() {
        let (_tmp, dir) = dir_with(Some("price_per_hour = 0.6834\n"));
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        assert_eq!(config.price_per_hour_micros(), Some(683_400));
        let (_tmp, dir) = dir_with(Some("price_per_hour = 2\n"));
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        assert_eq!(config.price_per_hour_micros(), Some(2_000_000));
        let overrides = Overrides {
            price_per_hour: Some(0.25),
            ..Overrides::default()
        };
        let config = Config::load(&dir, &overrides).unwrap();
        assert_eq!(config.price_per_hour_micros(), Some(250_000));
        let (_tmp, dir) = dir_with(None);
        let config = Config::load(&dir, &Overrides::default()).unwrap();
        assert_eq!(config.price_per_hour_micros(), None, "unknown unless set");
        let (_, msg, _dir, _tmp) = load_err("price_per_hour = -1.0\n");
        assert!(msg.contains("`price_per_hour`"), "{msg}");
        let (_, msg, _dir, _tmp) = load_err("price_per_hour = \"cheap\"\n");
        assert!(msg.contains("`price_per_hour`"), "{msg}");
        let overrides = Overrides {
            price_per_hour: Some(f64::NAN),
            ..Overrides::default()
        };
        let msg = Config::load(&dir, &overrides).unwrap_err().to_string();
        assert!(msg.contains("from --price-per-hour"), "{msg}");
    }

    #[test]
    fn too_large_file_is_refused() {
        let (_tmp, dir) = dir_with(None);
        let big = format!(
            "log_level = \"{}\"\n",
            "a".repeat(MAX_CONFIG_BYTES as usize)
        );
        std::fs::write(dir.config(), big).unwrap();
        assert!(matches!(
            Config::load(&dir, &Overrides::default()),
            Err(ConfigError::TooLarge { .. })
        ));
    }

    #[test]
    fn serde_struct_rejects_unknown_fields_too() {
        let err = toml::from_str::<Config>("nope = 1").unwrap_err();
        assert!(err.to_string().contains("nope"));
    }
}
