//! The AWS provider: render peers as EC2 instances, through `aws-sdk-ec2`.
//!
//! The client is built from explicit settings ([`AwsConfig`]: region, access keys, an optional
//! endpoint URL), not from `aws-config`'s environment and profile chain, so what a provisioner
//! uses is what its configuration says, and tests point it at an emulator (moto).
//!
//! - [`Provider::launch`] is one `RunInstances` call for exactly one instance: spot (a one-time
//!   request that terminates on interruption) or on-demand, the configured AMI, the user data
//!   base64-encoded, the spec's tags plus a `Name` on the instance, its volumes (and its spot
//!   request), the mesh's security group ([`AwsProvider::ensure_security_group`]), the zone
//!   when the spec names one, and `InstanceInitiatedShutdownBehavior::Terminate`: an instance
//!   that powers itself off is gone and no longer billed for its disk.
//! - [`Provider::list`] is `DescribeInstances` filtered by `tag:<key>`, every page.
//! - [`Provider::terminate`] is `TerminateInstances`; ids AWS no longer knows are no error.
//! - [`Provider::instance_types`] describes the configured types (`DescribeInstanceTypes`).
//! - [`Provider::prices`]: spot prices from `DescribeSpotPriceHistory` (the latest per zone);
//!   on-demand prices from [`AwsConfig::on_demand_prices`], a table in the settings, because
//!   EC2 does not publish them (that is the separate Pricing API, not worth another SDK here).
//!
//! Errors are sorted into [`CloudError`] by AWS error code (see [`classify`]). The SDK retries
//! throttling and transient failures up to [`MAX_ATTEMPTS`] times, except capacity answers to
//! `RunInstances`: those come back at once so the provisioner falls through to another type or
//! zone instead of waiting out the SDK's backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::interceptors::InterceptorContext;
use aws_sdk_ec2::config::retry::{ClassifyRetry, RetryAction, RetryConfig};
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{Credentials, Region};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::run_instances::RunInstancesError;
use aws_sdk_ec2::primitives::DateTime;
use aws_sdk_ec2::types::{
    Filter, InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName,
    IpPermission, IpRange, Ipv6Range, LocationType, MarketType, Placement, ResourceType,
    SecurityGroup, ShutdownBehavior, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::userdata::MAX_USER_DATA_BYTES;
use crate::{
    CloudError, Instance, InstanceState, InstanceType, LaunchSpec, Price, Provider, TAG_MESH,
};

/// The port peers listen on (TCP and QUIC), as the daemon's default `listen` addresses.
pub const DEFAULT_PEER_PORT: u16 = 7741;
/// Attempts per API call, the SDK's standard retry mode: throttling and 5xx answers are retried
/// with backoff; more attempts would only delay a provisioner that can try another type.
pub const MAX_ATTEMPTS: u32 = 3;
/// Time to open a connection to the API: a firewall that drops packets fails this fast.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for one attempt of one call. `RunInstances` answers in a few seconds.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for one call, retries included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(90);
/// Results per page of `DescribeInstances` (the API's maximum).
const LIST_PAGE: i32 = 1000;
/// Most pages read for one list: a million instances, far beyond any mesh; a bound so that a
/// misbehaving endpoint cannot page forever.
const MAX_PAGES: usize = 1000;
/// Ids per `TerminateInstances` and `DescribeInstanceTypes` call: `DescribeInstanceTypes` takes
/// at most 100, and small batches keep one unknown id from failing many.
const BATCH: usize = 100;
/// The spot product whose prices are read: BlendNet images are Linux.
const SPOT_PRODUCT: &str = "Linux/UNIX";
/// `Name` tag: the console shows it.
const TAG_NAME: &str = "Name";
/// Where the keys came from, as the SDK's credential provider names it in its logs.
const CREDENTIALS_SOURCE: &str = "blendnet-config";

/// The AWS provider's settings.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AwsConfig {
    /// `us-east-1`, ...
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials (STS).
    #[serde(default)]
    pub session_token: Option<String>,
    /// Another EC2 endpoint (an emulator in tests); `https://ec2.<region>.amazonaws.com` if
    /// unset.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The AMI instances boot (one with `blendnet` installed, reading its user data at boot).
    pub image_id: String,
    /// The types offered to the provisioner, in order of preference.
    #[serde(default)]
    pub instance_types: Vec<String>,
    /// On-demand prices in US dollars per hour, by type: EC2 does not publish them.
    #[serde(default)]
    pub on_demand_prices: BTreeMap<String, f64>,
    /// The port opened in the security group, TCP and UDP.
    #[serde(default = "default_peer_port")]
    pub peer_port: u16,
}

fn default_peer_port() -> u16 {
    DEFAULT_PEER_PORT
}

impl std::fmt::Debug for AwsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret and the session token are never printed.
        f.debug_struct("AwsConfig")
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("endpoint_url", &self.endpoint_url)
            .field("image_id", &self.image_id)
            .field("instance_types", &self.instance_types)
            .field("on_demand_prices", &self.on_demand_prices)
            .field("peer_port", &self.peer_port)
            .finish()
    }
}

/// EC2 instances as render peers.
#[derive(Debug)]
pub struct AwsProvider {
    config: AwsConfig,
    client: Client,
    /// Security group id by mesh, once ensured (a launch then costs one call, not three).
    groups: Mutex<HashMap<String, String>>,
}

impl AwsProvider {
    /// A provider using `config`. Nothing is called until the first request.
    pub fn new(config: AwsConfig) -> AwsProvider {
        let credentials = Credentials::new(
            &config.access_key_id,
            &config.secret_access_key,
            config.session_token.clone(),
            None,
            CREDENTIALS_SOURCE,
        );
        let mut builder = aws_sdk_ec2::Config::builder()
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
            .retry_classifier(NoRetryOnCapacity)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(CALL_TIMEOUT)
                    .build(),
            );
        if let Some(url) = &config.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        AwsProvider {
            client: Client::from_conf(builder.build()),
            config,
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    /// The EC2 client, for calls this provider does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The name of the mesh's security group.
    pub fn security_group_name(mesh: &str) -> String {
        format!("blendnet-{mesh}")
    }

    /// The id of the mesh's security group in the region's default VPC, which lets the peer
    /// port in (TCP and UDP, IPv4 and IPv6): found by name, created if missing, its rules added
    /// if someone removed them. Remembered for the provider's life. Cancel-safe: a dropped
    /// call leaves at most a group the next call finds.
    pub async fn ensure_security_group(&self, mesh: &str) -> Result<String, CloudError> {
        if let Some(id) = self.groups.lock().ok().and_then(|g| g.get(mesh).cloned()) {
            return Ok(id);
        }
        let name = Self::security_group_name(mesh);
        let vpc = self.default_vpc().await?;
        let group = match self.find_group(&vpc, &name).await? {
            Some(group) => group,
            None => match self.create_group(&vpc, &name, mesh).await {
                Ok(id) => SecurityGroup::builder().group_id(id).build(),
                // Another provisioner created it since we looked.
                Err(CloudError::Api { code, .. }) if code == "InvalidGroup.Duplicate" => self
                    .find_group(&vpc, &name)
                    .await?
                    .ok_or_else(|| CloudError::Api {
                        code,
                        message: format!("security group {name} exists but cannot be found"),
                    })?,
                Err(e) => return Err(e),
            },
        };
        let id = group.group_id().unwrap_or_default().to_owned();
        let missing = self.missing_rules(&group);
        if !missing.is_empty() {
            let result = self
                .client
                .authorize_security_group_ingress()
                .group_id(&id)
                .set_ip_permissions(Some(missing))
                .send()
                .await;
            match result {
                Ok(_) => {}
                Err(e) if e.code() == Some("InvalidPermission.Duplicate") => {}
                Err(e) => return Err(self.sdk_error(e, None)),
            }
        }
        tracing::debug!(group = %id, %name, "security group ready");
        if let Ok(mut groups) = self.groups.lock() {
            groups.insert(mesh.to_owned(), id.clone());
        }
        Ok(id)
    }

    async fn default_vpc(&self) -> Result<String, CloudError> {
        let out = self
            .client
            .describe_vpcs()
            .filters(filter("is-default", "true"))
            .send()
            .await
            .map_err(|e| self.sdk_error(e, None))?;
        out.vpcs()
            .iter()
            .find_map(|v| v.vpc_id())
            .map(str::to_owned)
            .ok_or_else(|| {
                CloudError::BadRequest(format!(
                    "region {} has no default VPC: BlendNet launches into the default VPC",
                    self.config.region
                ))
            })
    }

    async fn find_group(&self, vpc: &str, name: &str) -> Result<Option<SecurityGroup>, CloudError> {
        let out = self
            .client
            .describe_security_groups()
            .filters(filter("vpc-id", vpc))
            .filters(filter("group-name", name))
            .send()
            .await
            .map_err(|e| self.sdk_error(e, None))?;
        Ok(out.security_groups().first().cloned())
    }

    async fn create_group(&self, vpc: &str, name: &str, mesh: &str) -> Result<String, CloudError> {
        let out = self
            .client
            .create_security_group()
            .group_name(name)
            .description(format!("BlendNet render peers of mesh {mesh}"))
            .vpc_id(vpc)
            .tag_specifications(tag_spec(
                ResourceType::SecurityGroup,
                &BTreeMap::from([
                    (TAG_MESH.to_owned(), mesh.to_owned()),
                    (TAG_NAME.to_owned(), name.to_owned()),
                ]),
            ))
            .send()
            .await
            .map_err(|e| self.sdk_error(e, None))?;
        let id = out.group_id().unwrap_or_default().to_owned();
        tracing::info!(group = %id, %name, %vpc, "security group created");
        Ok(id)
    }

    /// The ingress rules for the peer port that `group` lacks.
    fn missing_rules(&self, group: &SecurityGroup) -> Vec<IpPermission> {
        let port = i32::from(self.config.peer_port);
        ["tcp", "udp"]
            .into_iter()
            .filter(|protocol| {
                !group.ip_permissions().iter().any(|p| {
                    matches!(p.ip_protocol(), Some(x) if x == *protocol || x == "-1")
                        && p.from_port().unwrap_or(port) <= port
                        && port <= p.to_port().unwrap_or(port)
                        && p.ip_ranges()
                            .iter()
                            .any(|r| r.cidr_ip() == Some("0.0.0.0/0"))
                })
            })
            .map(|protocol| {
                IpPermission::builder()
                    .ip_protocol(protocol)
                    .from_port(port)
                    .to_port(port)
                    .ip_ranges(
                        IpRange::builder()
                            .cidr_ip("0.0.0.0/0")
                            .description("BlendNet peers")
                            .build(),
                    )
                    .ipv6_ranges(
                        Ipv6Range::builder()
                            .cidr_ipv6("::/0")
                            .description("BlendNet peers")
                            .build(),
                    )
                    .build()
            })
            .collect()
    }

    async fn launch_now(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        let Some(mesh) = spec.tags.get(TAG_MESH) else {
            return Err(CloudError::BadRequest(format!(
                "the launch spec has no {TAG_MESH} tag (it names the security group)"
            )));
        };
        if spec.user_data.len() > MAX_USER_DATA_BYTES {
            return Err(CloudError::BadRequest(format!(
                "the user data is {} bytes, more than AWS's {MAX_USER_DATA_BYTES}",
                spec.user_data.len()
            )));
        }
        let group = self.ensure_security_group(mesh).await?;
        let mut tags = spec.tags.clone();
        tags.entry(TAG_NAME.to_owned())
            .or_insert_with(|| Self::security_group_name(mesh));
        let mut request = self
            .client
            .run_instances()
            .image_id(&self.config.image_id)
            .instance_type(aws_sdk_ec2::types::InstanceType::from(
                spec.instance_type.as_str(),
            ))
            .min_count(1)
            .max_count(1)
            .user_data(data_encoding::BASE64.encode(spec.user_data.as_bytes()))
            .security_group_ids(group)
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .tag_specifications(tag_spec(ResourceType::Instance, &tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &tags));
        if spec.spot {
            request = request
                .instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(
                            // No max price: AWS caps it at the on-demand price.
                            SpotMarketOptions::builder()
                                .spot_instance_type(SpotInstanceType::OneTime)
                                .instance_interruption_behavior(
                                    InstanceInterruptionBehavior::Terminate,
                                )
                                .build(),
                        )
                        .build(),
                )
                .tag_specifications(tag_spec(ResourceType::SpotInstancesRequest, &tags));
        }
        if let Some(zone) = &spec.zone {
            request = request.placement(Placement::builder().availability_zone(zone).build());
        }
        let out = request
            .send()
            .await
            .map_err(|e| self.sdk_error(e, Some(spec)))?;
        let instance = out
            .instances()
            .first()
            .map(to_instance)
            .ok_or_else(|| CloudError::Api {
                code: "NoInstance".into(),
                message: "RunInstances answered without an instance".into(),
            })?;
        tracing::info!(
            id = %instance.id,
            instance_type = %instance.instance_type,
            zone = %instance.zone,
            spot = spec.spot,
            "instance launched"
        );
        Ok(instance)
    }

    async fn list_now(&self, key: &str, value: &str) -> Result<Vec<Instance>, CloudError> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter(&format!("tag:{key}"), value))
            .into_paginator()
            .page_size(LIST_PAGE)
            .send();
        let mut instances = Vec::new();
        let mut read = 0;
        while let Some(page) = pages.next().await {
            read += 1;
            if read > MAX_PAGES {
                return Err(too_many_pages("DescribeInstances"));
            }
            let page = page.map_err(|e| self.sdk_error(e, None))?;
            for reservation in page.reservations() {
                instances.extend(reservation.instances().iter().map(to_instance));
            }
        }
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(instances)
    }

    async fn terminate_now(&self, ids: &[String]) -> Result<(), CloudError> {
        for batch in ids.chunks(BATCH) {
            match self.terminate_batch(batch).await {
                // One unknown id fails the whole call: terminate the others one by one.
                Err(NotFound) if batch.len() > 1 => {
                    for id in batch {
                        match self.terminate_batch(std::slice::from_ref(id)).await {
                            Err(NotFound) => {
                                tracing::debug!(%id, "instance unknown to AWS: nothing to terminate")
                            }
                            Ok(result) => result?,
                        }
                    }
                }
                Err(NotFound) => {
                    tracing::debug!(ids = ?batch, "instance unknown to AWS: nothing to terminate")
                }
                Ok(result) => result?,
            }
        }
        Ok(())
    }

    /// `Err(NotFound)` when AWS knows one of the ids no more (or never did); the call's result
    /// otherwise.
    async fn terminate_batch(&self, ids: &[String]) -> Result<Result<(), CloudError>, NotFound> {
        let result = self
            .client
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await;
        match result {
            Ok(out) => {
                for change in out.terminating_instances() {
                    tracing::info!(
                        id = change.instance_id().unwrap_or_default(),
                        state = ?change.current_state().and_then(|s| s.name()),
                        "instance terminated"
                    );
                }
                Ok(Ok(()))
            }
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Err(NotFound),
            Err(e) => Ok(Err(self.sdk_error(e, None))),
        }
    }

    async fn instance_types_now(&self) -> Result<Vec<InstanceType>, CloudError> {
        let mut found = HashMap::new();
        for batch in self.config.instance_types.chunks(BATCH) {
            let mut pages = self
                .client
                .describe_instance_types()
                .set_instance_types(Some(
                    batch
                        .iter()
                        .map(|t| aws_sdk_ec2::types::InstanceType::from(t.as_str()))
                        .collect(),
                ))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.sdk_error(e, None))?;
                for info in page.instance_types() {
                    let Some(name) = info.instance_type() else {
                        continue;
                    };
                    let gpus = info.gpu_info().map_or(0, |g| {
                        g.gpus().iter().map(|d| d.count().unwrap_or(0)).sum::<i32>()
                    });
                    found.insert(
                        name.as_str().to_owned(),
                        InstanceType {
                            name: name.as_str().to_owned(),
                            cores: non_negative(info.v_cpu_info().and_then(|v| v.default_v_cpus())),
                            ram_bytes: info
                                .memory_info()
                                .and_then(|m| m.size_in_mib())
                                .map_or(0, |mib| u64::try_from(mib).unwrap_or(0) << 20),
                            gpus: non_negative(Some(gpus)),
                        },
                    );
                }
            }
        }
        let missing: Vec<&str> = self
            .config
            .instance_types
            .iter()
            .filter(|t| !found.contains_key(t.as_str()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(CloudError::BadRequest(format!(
                "instance types not offered in {}: {}",
                self.config.region,
                missing.join(", ")
            )));
        }
        Ok(self
            .config
            .instance_types
            .iter()
            .filter_map(|t| found.remove(t))
            .collect())
    }

    async fn spot_prices(&self, instance_type: &str) -> Result<Vec<Price>, CloudError> {
        // A start time of now and no end time: the price in effect now, per zone.
        let mut pages = self
            .client
            .describe_spot_price_history()
            .instance_types(aws_sdk_ec2::types::InstanceType::from(instance_type))
            .product_descriptions(SPOT_PRODUCT)
            .start_time(DateTime::from(std::time::SystemTime::now()))
            .into_paginator()
            .send();
        let mut latest: BTreeMap<String, (i64, f64)> = BTreeMap::new();
        let mut read = 0;
        while let Some(page) = pages.next().await {
            read += 1;
            if read > MAX_PAGES {
                return Err(too_many_pages("DescribeSpotPriceHistory"));
            }
            let page = page.map_err(|e| self.sdk_error(e, None))?;
            for entry in page.spot_price_history() {
                let (Some(zone), Some(price)) = (entry.availability_zone(), entry.spot_price())
                else {
                    continue;
                };
                let Ok(price) = price.parse::<f64>() else {
                    tracing::warn!(zone, price, "unreadable spot price");
                    continue;
                };
                let at = entry.timestamp().map_or(0, |t| t.secs());
                let slot = latest.entry(zone.to_owned()).or_insert((at, price));
                if at > slot.0 {
                    *slot = (at, price);
                }
            }
        }
        Ok(latest
            .into_iter()
            .map(|(zone, (_, per_hour))| Price {
                instance_type: instance_type.to_owned(),
                zone,
                per_hour,
                spot: true,
            })
            .collect())
    }

    async fn on_demand_prices(&self, instance_type: &str) -> Result<Vec<Price>, CloudError> {
        let Some(&per_hour) = self.config.on_demand_prices.get(instance_type) else {
            return Err(CloudError::BadRequest(format!(
                "no on-demand price for {instance_type}: add it to the AWS settings' \
                 on_demand_prices (EC2 does not publish on-demand prices)"
            )));
        };
        let mut pages = self
            .client
            .describe_instance_type_offerings()
            .location_type(LocationType::AvailabilityZone)
            .filters(filter("instance-type", instance_type))
            .into_paginator()
            .send();
        let mut zones = Vec::new();
        let mut read = 0;
        while let Some(page) = pages.next().await {
            read += 1;
            if read > MAX_PAGES {
                return Err(too_many_pages("DescribeInstanceTypeOfferings"));
            }
            let page = page.map_err(|e| self.sdk_error(e, None))?;
            zones.extend(
                page.instance_type_offerings()
                    .iter()
                    .filter_map(|o| o.location().map(str::to_owned)),
            );
        }
        zones.sort();
        zones.dedup();
        Ok(zones
            .into_iter()
            .map(|zone| Price {
                instance_type: instance_type.to_owned(),
                zone,
                per_hour,
                spot: false,
            })
            .collect())
    }

    fn endpoint(&self) -> String {
        self.config
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("https://ec2.{}.amazonaws.com", self.config.region))
    }

    /// The [`CloudError`] for a failed call; `launch` is the spec of a `RunInstances` call.
    fn sdk_error<E, R>(&self, err: SdkError<E, R>, launch: Option<&LaunchSpec>) -> CloudError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        match &err {
            SdkError::ServiceError(service) => {
                let e = service.err();
                let code = e.code().unwrap_or("Unknown");
                let message = e.message().unwrap_or_default();
                match launch {
                    Some(spec) => {
                        let zone = spec.zone.as_deref().unwrap_or(&self.config.region);
                        classify(code, message, Some((&spec.instance_type, zone)))
                    }
                    None => classify(code, message, None),
                }
            }
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => CloudError::Io(format!(
                "cannot reach the EC2 API at {}: {}",
                self.endpoint(),
                DisplayErrorContext(&err)
            )),
            SdkError::ConstructionFailure(_) => {
                CloudError::BadRequest(DisplayErrorContext(&err).to_string())
            }
            _ => CloudError::Api {
                code: "UnreadableResponse".into(),
                message: format!("from {}: {}", self.endpoint(), DisplayErrorContext(&err)),
            },
        }
    }
}

/// A `TerminateInstances` answer of `InvalidInstanceID.NotFound`.
struct NotFound;

/// Sorts an AWS error code into a [`CloudError`]. `launch` is the type and zone of a launch.
///
/// - Capacity (another type or zone may work): `InsufficientInstanceCapacity`,
///   `InsufficientCapacity`, `InsufficientHostCapacity`; `SpotMaxPriceTooLow` (the spot price in
///   this zone is above our cap, the on-demand price: other zones and types are priced apart);
///   `Unsupported` (the type is not offered in this zone, or not with these options).
/// - Quota: `VcpuLimitExceeded`, `InstanceLimitExceeded`, and `MaxSpotInstanceCountExceeded`:
///   the spot limit counts vCPUs over the region and the instance family class, so another zone
///   or a type of the same class fails the same way; raising the limit is the user's to do.
///   `SecurityGroupLimitExceeded` too.
/// - Auth: `AuthFailure`, `UnauthorizedOperation`, `Blocked`, `OptInRequired`, and
///   `InvalidClientTokenId` / `SignatureDoesNotMatch` (what other AWS endpoints answer).
/// - Bad request: `InvalidParameter*`, `MissingParameter`, `InvalidAMIID.*`,
///   `InvalidInstanceType*` (moto's answer for an unknown type; AWS's is
///   `InvalidParameterValue`), `InvalidUserData.*`, `InvalidBlockDeviceMapping`,
///   `InvalidInstanceID.Malformed`.
/// - Anything else: [`CloudError::Api`] with the code.
pub fn classify(code: &str, message: &str, launch: Option<(&str, &str)>) -> CloudError {
    const CAPACITY: &[&str] = &[
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "SpotMaxPriceTooLow",
        "Unsupported",
    ];
    const QUOTA: &[&str] = &[
        "VcpuLimitExceeded",
        "InstanceLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "SecurityGroupLimitExceeded",
    ];
    const AUTH: &[&str] = &[
        "AuthFailure",
        "UnauthorizedOperation",
        "Blocked",
        "OptInRequired",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
    ];
    const BAD_REQUEST_PREFIXES: &[&str] = &[
        "InvalidParameter",
        "MissingParameter",
        "InvalidAMIID.",
        "InvalidInstanceType",
        "InvalidUserData.",
        "InvalidBlockDeviceMapping",
        "InvalidInstanceID.Malformed",
    ];
    let text = format!("{code}: {message}");
    if CAPACITY.contains(&code) {
        let (instance_type, zone) = launch.unwrap_or_default();
        CloudError::Capacity {
            instance_type: instance_type.to_owned(),
            zone: zone.to_owned(),
            message: text,
        }
    } else if QUOTA.contains(&code) {
        CloudError::Quota(text)
    } else if AUTH.contains(&code) {
        CloudError::Auth(text)
    } else if BAD_REQUEST_PREFIXES.iter().any(|p| code.starts_with(p)) {
        CloudError::BadRequest(text)
    } else {
        CloudError::Api {
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// Stops the SDK from retrying a `RunInstances` that failed for capacity (AWS answers those
/// with HTTP 500, which the SDK would retry): the provisioner tries another type or zone.
#[derive(Debug)]
struct NoRetryOnCapacity;

impl ClassifyRetry for NoRetryOnCapacity {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let code = match ctx.output_or_error() {
            Some(Err(err)) => err
                .as_operation_error()
                .and_then(|e| e.downcast_ref::<RunInstancesError>())
                .and_then(|e| e.code()),
            _ => None,
        };
        match code.map(|c| classify(c, "", None)) {
            Some(CloudError::Capacity { .. }) => RetryAction::RetryForbidden,
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "blendnet: no retry on capacity"
    }
}

impl Provider for AwsProvider {
    fn name(&self) -> &str {
        "aws"
    }

    /// The configured types, in their order, as `DescribeInstanceTypes` describes them; a type
    /// the region does not know is a [`CloudError::BadRequest`].
    fn instance_types(&self) -> BoxFuture<'_, Result<Vec<InstanceType>, CloudError>> {
        Box::pin(self.instance_types_now())
    }

    /// Needs the spec's [`TAG_MESH`] tag: it names the security group.
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

    /// Ids AWS answers `InvalidInstanceID.NotFound` for are skipped, not an error: AWS forgets
    /// terminated instances about an hour after, and cannot tell those from ids that never
    /// existed. (Right after a launch, AWS's eventual consistency may also answer NotFound for
    /// a new instance; the next [`Provider::list`] shows it alive, and it is terminated then.)
    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(self.terminate_now(ids))
    }

    /// Spot: the current price per zone from the spot price history. On-demand: the price in
    /// [`AwsConfig::on_demand_prices`] for each zone that offers the type, and
    /// [`CloudError::BadRequest`] for a type missing there.
    fn prices<'a>(
        &'a self,
        instance_type: &'a str,
        spot: bool,
    ) -> BoxFuture<'a, Result<Vec<Price>, CloudError>> {
        Box::pin(async move {
            if spot {
                self.spot_prices(instance_type).await
            } else {
                self.on_demand_prices(instance_type).await
            }
        })
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

fn tag_spec(resource: ResourceType, tags: &BTreeMap<String, String>) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .build()
}

fn too_many_pages(operation: &str) -> CloudError {
    CloudError::Api {
        code: "TooManyPages".into(),
        message: format!("{operation} answered more than {MAX_PAGES} pages"),
    }
}

fn non_negative(n: Option<i32>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

fn to_instance(i: &aws_sdk_ec2::types::Instance) -> Instance {
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::ShuttingDown | InstanceStateName::Stopping)
        | Some(InstanceStateName::Stopped) => InstanceState::Stopping,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        // Pending, and states this SDK does not know: counted as alive, so that an instance
        // that may cost money is never forgotten.
        _ => InstanceState::Pending,
    };
    Instance {
        id: i.instance_id().unwrap_or_default().to_owned(),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_owned(),
        state,
        launched_at: i
            .launch_time()
            .map_or(0, |t| u64::try_from(t.secs()).unwrap_or(0)),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_sort_into_what_a_provisioner_does_next() {
        let launch = Some(("c7a.16xlarge", "us-east-1a"));
        for code in [
            "InsufficientInstanceCapacity",
            "InsufficientCapacity",
            "InsufficientHostCapacity",
            "SpotMaxPriceTooLow",
            "Unsupported",
        ] {
            let e = classify(code, "no room", launch);
            assert!(e.is_capacity(), "{code}: {e:?}");
            assert!(e.to_string().contains("c7a.16xlarge in us-east-1a"), "{e}");
        }
        for code in [
            "VcpuLimitExceeded",
            "InstanceLimitExceeded",
            "MaxSpotInstanceCountExceeded",
        ] {
            assert!(
                matches!(classify(code, "", launch), CloudError::Quota(_)),
                "{code}"
            );
        }
        for code in [
            "AuthFailure",
            "UnauthorizedOperation",
            "Blocked",
            "InvalidClientTokenId",
        ] {
            assert!(
                matches!(classify(code, "", None), CloudError::Auth(_)),
                "{code}"
            );
        }
        for code in [
            "InvalidParameterValue",
            "InvalidParameterCombination",
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "InvalidInstanceType.NotFound",
            "InvalidInstanceID.Malformed",
        ] {
            assert!(
                matches!(classify(code, "", launch), CloudError::BadRequest(_)),
                "{code}"
            );
        }
        match classify("RequestLimitExceeded", "slow down", None) {
            CloudError::Api { code, message } => {
                assert_eq!(
                    (code.as_str(), message.as_str()),
                    ("RequestLimitExceeded", "slow down")
                )
            }
            e => panic!("{e:?}"),
        }
        // Close names are not confused: "UnsupportedOperation" is no capacity answer.
        assert!(!classify("UnsupportedOperation", "", launch).is_capacity());
    }

    #[test]
    fn the_secret_is_not_printed() {
        let config = AwsConfig {
            region: "us-east-1".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI".into(),
            session_token: Some("FwoGZX".into()),
            endpoint_url: None,
            image_id: "ami-1".into(),
            instance_types: vec![],
            on_demand_prices: BTreeMap::new(),
            peer_port: DEFAULT_PEER_PORT,
        };
        let printed = format!("{:?}", AwsProvider::new(config));
        assert!(printed.contains("AKIDEXAMPLE"), "{printed}");
        assert!(
            !printed.contains("wJalrXUtnFEMI") && !printed.contains("FwoGZX"),
            "{printed}"
        );
    }
}
