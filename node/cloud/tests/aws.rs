//! The AWS provider against moto, an EC2 emulator, in server mode on loopback: one
//! `moto_server` child per test, found through `BLENDNET_MOTO_SERVER` or on `PATH`.
//!
//! moto never answers with a capacity error, so the test of that classification puts a small
//! proxy in front of it that answers `RunInstances` for chosen types with AWS's error body and
//! passes everything else through.
//!
//! One test binary on purpose: each binary that links `aws-sdk-ec2` pays a long link.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, InstanceLifecycleType, IpPermission, IpRange};
use blendnet_cloud::aws::{AwsConfig, AwsProvider, DEFAULT_PEER_PORT};
use blendnet_cloud::local::tags;
use blendnet_cloud::userdata::{USER_DATA_VERSION, UserData};
use blendnet_cloud::{
    CloudError, InstanceState, LaunchSpec, Provider, TAG_INVITE, TAG_MESH, TAG_PROVISIONER,
    launch_first, launch_specs,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// moto imports all of its services at start: a few seconds on a slow machine.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);
const REGION: &str = "us-east-1";
/// moto's instance type offerings list these three in us-east-1a..d and f.
const TYPES: [&str; 3] = ["c7a.16xlarge", "c6a.16xlarge", "c5a.16xlarge"];

/// A `moto_server` child on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    url: String,
    _log: tempfile::NamedTempFile,
}

impl Moto {
    fn start() -> Moto {
        Moto::start_with(&[])
    }

    /// Starts moto with AMI and instance type validation on (as AWS does), plus `env`.
    fn start_with(env: &[(&str, &str)]) -> Moto {
        let program = moto_server();
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _log: log,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = moto.child.try_wait().unwrap();
            if exited.is_some() || started.elapsed() > MOTO_START_TIMEOUT {
                let log = std::fs::read_to_string(moto._log.path()).unwrap_or_default();
                panic!(
                    "{} did not answer on port {port} within {MOTO_START_TIMEOUT:?} \
                     (exit: {exited:?}); its log:\n{log}",
                    program.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn addr(&self) -> SocketAddr {
        self.url.trim_start_matches("http://").parse().unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `BLENDNET_MOTO_SERVER`, else `moto_server` on `PATH`; a missing one fails the test.
fn moto_server() -> PathBuf {
    if let Some(path) = std::env::var_os("BLENDNET_MOTO_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "BLENDNET_MOTO_SERVER={} is not a file; install moto with \
             `python3 -m venv /tmp/moto-venv && /tmp/moto-venv/bin/pip install 'moto[server]'` \
             and set BLENDNET_MOTO_SERVER=/tmp/moto-venv/bin/moto_server",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "these tests need moto's EC2 emulator and found no moto_server: install it with \
                 `python3 -m venv /tmp/moto-venv && /tmp/moto-venv/bin/pip install 'moto[server]'` \
                 and set BLENDNET_MOTO_SERVER=/tmp/moto-venv/bin/moto_server (or put moto_server \
                 on PATH)"
            )
        })
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(endpoint: &str, image_id: &str) -> AwsConfig {
    AwsConfig {
        region: REGION.into(),
        access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        session_token: None,
        endpoint_url: Some(endpoint.into()),
        image_id: image_id.into(),
        instance_types: TYPES.map(String::from).to_vec(),
        on_demand_prices: BTreeMap::from([("c7a.16xlarge".into(), 3.28)]),
        peer_port: DEFAULT_PEER_PORT,
    }
}

/// A provider on `endpoint` with an AMI moto knows (moto checks AMIs here).
async fn provider(moto: &Moto, endpoint: &str) -> AwsProvider {
    let probe = AwsProvider::new(config(&moto.url, "ami-unknown"));
    let images = probe
        .client()
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .unwrap();
    let image = images.images()[0].image_id().unwrap();
    AwsProvider::new(config(endpoint, image))
}

fn spec(mesh: &str, instance_type: &str, zone: Option<&str>, spot: bool) -> LaunchSpec {
    LaunchSpec {
        instance_type: instance_type.into(),
        zone: zone.map(String::from),
        user_data: format!("{{\"mesh\":\"{mesh}\",\"token\":\"BN1-ünïcode\"}}\n"),
        tags: tags([(TAG_MESH, mesh), (TAG_PROVISIONER, "12D3KooWprov")]),
        spot,
    }
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder().name(key).values(value).build()
}

/// The group's ingress rules as `(protocol, from, to, cidr)`.
fn rules(permissions: &[IpPermission]) -> Vec<(String, i32, i32, String)> {
    let mut rules: Vec<_> = permissions
        .iter()
        .flat_map(|p| {
            p.ip_ranges().iter().map(move |r| {
                (
                    p.ip_protocol().unwrap_or_default().to_owned(),
                    p.from_port().unwrap_or(-1),
                    p.to_port().unwrap_or(-1),
                    r.cidr_ip().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect();
    rules.sort();
    rules
}

#[tokio::test]
async fn spot_and_on_demand_instances_launch_tagged_list_by_tag_and_terminate() {
    let moto = Moto::start();
    let provider = provider(&moto, &moto.url).await;
    let client = provider.client();
    let mesh = "l2bq63h5";

    let spot = provider
        .launch(&spec(mesh, "c7a.16xlarge", Some("us-east-1b"), true))
        .await
        .unwrap();
    let on_demand_spec = spec(mesh, "c6a.16xlarge", None, false);
    let on_demand = provider.launch(&on_demand_spec).await.unwrap();
    assert_eq!(
        (spot.instance_type.as_str(), spot.zone.as_str()),
        ("c7a.16xlarge", "us-east-1b")
    );
    assert!(spot.state.is_alive() && on_demand.state.is_alive());
    assert!(spot.id.starts_with("i-") && spot.id != on_demand.id);

    // Listed by either tag, with type, zone, state, launch time and tags.
    let listed = provider.list(TAG_MESH, mesh).await.unwrap();
    assert_eq!(listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), {
        let mut ids = vec![spot.id.as_str(), on_demand.id.as_str()];
        ids.sort();
        ids
    });
    let listed_spot = listed.iter().find(|i| i.id == spot.id).unwrap();
    let listed_od = listed.iter().find(|i| i.id == on_demand.id).unwrap();
    assert_eq!(listed_spot.instance_type, "c7a.16xlarge");
    assert_eq!(listed_spot.zone, "us-east-1b");
    assert_eq!(listed_od.instance_type, "c6a.16xlarge");
    assert!(listed_od.zone.starts_with(REGION), "{}", listed_od.zone);
    for i in &listed {
        assert_eq!(i.state, InstanceState::Running, "{i:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(i.launched_at.abs_diff(now) < 600, "{i:?}");
        assert_eq!(i.tags.get(TAG_MESH).map(String::as_str), Some(mesh));
        assert_eq!(
            i.tags.get(TAG_PROVISIONER).map(String::as_str),
            Some("12D3KooWprov")
        );
        assert_eq!(
            i.tags.get("Name").map(String::as_str),
            Some("blendnet-l2bq63h5")
        );
    }
    assert_eq!(
        provider
            .list(TAG_PROVISIONER, "12D3KooWprov")
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(provider.list(TAG_MESH, "another").await.unwrap().is_empty());

    // What AWS was asked: spot only for the spot one, terminate on shutdown, the user data
    // (base64 on the wire, the same text back), tags on the volumes too.
    let described = client
        .describe_instances()
        .instance_ids(&spot.id)
        .instance_ids(&on_demand.id)
        .send()
        .await
        .unwrap();
    for instance in described.reservations().iter().flat_map(|r| r.instances()) {
        let id = instance.instance_id().unwrap();
        let expected = (id == spot.id).then_some(&InstanceLifecycleType::Spot);
        assert_eq!(instance.instance_lifecycle(), expected, "{id}");
        let behaviour = client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
            .send()
            .await
            .unwrap();
        assert_eq!(
            behaviour
                .instance_initiated_shutdown_behavior()
                .and_then(|v| v.value()),
            Some("terminate")
        );
        let user_data = client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let encoded = user_data.user_data().and_then(|v| v.value()).unwrap();
        let decoded = data_encoding::BASE64.decode(encoded.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            on_demand_spec.user_data
        );
        let volumes = client
            .describe_volumes()
            .filters(tag_filter("attachment.instance-id", id))
            .send()
            .await
            .unwrap();
        assert!(!volumes.volumes().is_empty(), "{id} has no volume");
        for volume in volumes.volumes() {
            let volume_tags: BTreeMap<_, _> = volume
                .tags()
                .iter()
                .map(|t| (t.key().unwrap(), t.value().unwrap()))
                .collect();
            assert_eq!(volume_tags.get(TAG_MESH), Some(&mesh), "{volume_tags:?}");
            assert_eq!(volume_tags.get("Name"), Some(&"blendnet-l2bq63h5"));
        }
    }

    // One security group for the mesh, port 7741 open over TCP and UDP, on both instances.
    let groups = client
        .describe_security_groups()
        .filters(tag_filter("group-name", "blendnet-l2bq63h5"))
        .send()
        .await
        .unwrap();
    assert_eq!(groups.security_groups().len(), 1);
    let group = &groups.security_groups()[0];
    let group_id = group.group_id().unwrap().to_owned();
    assert_eq!(
        rules(group.ip_permissions()),
        vec![
            ("tcp".into(), 7741, 7741, "0.0.0.0/0".into()),
            ("udp".into(), 7741, 7741, "0.0.0.0/0".into()),
        ]
    );
    assert!(
        group
            .tags()
            .iter()
            .any(|t| t.key() == Some(TAG_MESH) && t.value() == Some(mesh))
    );
    for instance in described.reservations().iter().flat_map(|r| r.instances()) {
        let ids: Vec<_> = instance
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect();
        assert_eq!(ids, vec![group_id.as_str()]);
    }

    // A provisioner that restarts finds the group by name (no second one), and puts back a
    // rule someone removed.
    client
        .revoke_security_group_ingress()
        .group_id(&group_id)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("udp")
                .from_port(7741)
                .to_port(7741)
                .ip_ranges(IpRange::builder().cidr_ip("0.0.0.0/0").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let restarted = AwsProvider::new(provider.config().clone());
    let third = restarted
        .launch(&spec(mesh, "c5a.16xlarge", Some("us-east-1a"), true))
        .await
        .unwrap();
    assert_eq!(
        restarted.ensure_security_group(mesh).await.unwrap(),
        group_id
    );
    let groups = client
        .describe_security_groups()
        .filters(tag_filter("group-name", "blendnet-l2bq63h5"))
        .send()
        .await
        .unwrap();
    assert_eq!(groups.security_groups().len(), 1);
    assert_eq!(rules(groups.security_groups()[0].ip_permissions()).len(), 2);
    // Another mesh gets its own group.
    let other = provider.ensure_security_group("othermesh").await.unwrap();
    assert_ne!(other, group_id);

    // Terminate: listed as terminated; again, or with ids AWS does not know, is no error, and
    // an unknown id does not keep the known ones in its batch alive.
    provider
        .terminate(std::slice::from_ref(&spot.id))
        .await
        .unwrap();
    provider
        .terminate(std::slice::from_ref(&spot.id))
        .await
        .unwrap();
    provider
        .terminate(&[
            "i-0123456789abcdef0".into(),
            on_demand.id.clone(),
            third.id.clone(),
        ])
        .await
        .unwrap();
    provider
        .terminate(&["i-0123456789abcdef0".into()])
        .await
        .unwrap();
    provider.terminate(&[]).await.unwrap();
    let states: Vec<_> = provider
        .list(TAG_MESH, mesh)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.state)
        .collect();
    assert_eq!(states, vec![InstanceState::Terminated; 3]);
}

#[tokio::test]
async fn instance_types_and_prices() {
    let moto = Moto::start();
    let provider = provider(&moto, &moto.url).await;

    let types = provider.instance_types().await.unwrap();
    assert_eq!(
        types.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        TYPES.to_vec(),
        "in the configured order"
    );
    for t in &types {
        assert_eq!((t.cores, t.ram_bytes, t.gpus), (64, 128 << 30, 0), "{t:?}");
    }
    let mut gpu = provider.config().clone();
    gpu.instance_types = vec!["g5.xlarge".into()];
    let g5 = AwsProvider::new(gpu).instance_types().await.unwrap();
    assert_eq!((g5[0].cores, g5[0].ram_bytes, g5[0].gpus), (4, 16 << 30, 1));
    let mut unknown = provider.config().clone();
    unknown.instance_types = vec!["c7a.16xlarge".into(), "c7a.huge".into()];
    let err = AwsProvider::new(unknown)
        .instance_types()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("c7a.huge")),
        "{err:?}"
    );

    // Spot: the latest price per zone that offers the type (moto's prices are a fixed 0.00001).
    let spot = provider.prices("c7a.16xlarge", true).await.unwrap();
    assert_eq!(
        spot.iter().map(|p| p.zone.as_str()).collect::<Vec<_>>(),
        [
            "us-east-1a",
            "us-east-1b",
            "us-east-1c",
            "us-east-1d",
            "us-east-1f"
        ]
    );
    assert!(
        spot.iter()
            .all(|p| p.spot && p.per_hour > 0.0 && p.instance_type == "c7a.16xlarge")
    );
    // On-demand: the configured price, in the same zones; a type without one is refused.
    let on_demand = provider.prices("c7a.16xlarge", false).await.unwrap();
    assert_eq!(on_demand.len(), 5);
    assert!(on_demand.iter().all(|p| !p.spot && p.per_hour == 3.28));
    let err = provider.prices("c6a.16xlarge", false).await.unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("on_demand_prices")),
        "{err:?}"
    );
}

/// What the fault proxy answers for `RunInstances` of one type (`TYPE`, or `TYPE@ZONE` for one
/// zone only): HTTP status and AWS error code.
type Faults = &'static [(&'static str, u16, &'static str)];

/// A proxy in front of moto that answers `RunInstances` of the types in `faults` with AWS's
/// error body, counting those answers, and passes every other request through.
struct FaultProxy {
    url: String,
    answered: Arc<std::sync::Mutex<BTreeMap<&'static str, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    async fn start(upstream: SocketAddr, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let answered = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let counts = answered.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let counts = counts.clone();
                tokio::spawn(async move {
                    if let Err(e) = proxy_one(conn, upstream, faults, &counts).await {
                        eprintln!("fault proxy: {e}");
                    }
                });
            }
        });
        FaultProxy {
            url,
            answered,
            task,
        }
    }

    fn answered(&self, instance_type: &str) -> usize {
        self.answered
            .lock()
            .unwrap()
            .get(instance_type)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request on one connection (the answer says `Connection: close`).
async fn proxy_one(
    mut conn: TcpStream,
    upstream: SocketAddr,
    faults: Faults,
    counts: &std::sync::Mutex<BTreeMap<&'static str, usize>>,
) -> std::io::Result<()> {
    const MAX_REQUEST: usize = 1 << 20;
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    let (head_len, body_len) = loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 || request.len() > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, body_len);
        }
    };
    while request.len() < head_len + body_len {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&request[head_len..]).into_owned();
    let params: Vec<&str> = body.split('&').collect();
    if params.contains(&"Action=RunInstances") {
        for &(key, status, code) in faults {
            let (instance_type, zone) = key.split_once('@').unwrap_or((key, ""));
            if params.contains(&format!("InstanceType={instance_type}").as_str())
                && (zone.is_empty()
                    || params.contains(&format!("Placement.AvailabilityZone={zone}").as_str()))
            {
                *counts.lock().unwrap().entry(key).or_default() += 1;
                let xml = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                     <Code>{code}</Code><Message>We currently do not have sufficient \
                     {instance_type} capacity in the Availability Zone you requested.</Message>\
                     </Error></Errors><RequestID>fault-proxy</RequestID></Response>"
                );
                let answer = format!(
                    "HTTP/1.1 {status} Fault\r\nContent-Type: text/xml;charset=UTF-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                    xml.len()
                );
                conn.write_all(answer.as_bytes()).await?;
                return conn.shutdown().await;
            }
        }
    }
    // Through to moto, one request per connection.
    let head = String::from_utf8_lossy(&request[..head_len - 2]).into_owned();
    let mut forwarded: String = head
        .split_inclusive("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(forwarded.as_bytes()).await?;
    up.write_all(&request[head_len..]).await?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).await?;
    conn.write_all(&answer).await?;
    conn.shutdown().await
}

#[tokio::test]
async fn capacity_answers_let_a_caller_fall_through_and_are_not_retried() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(
        moto.addr(),
        &[
            ("c7a.16xlarge", 500, "InsufficientInstanceCapacity"),
            ("c6a.16xlarge", 400, "VcpuLimitExceeded"),
            ("m7a.16xlarge", 500, "InternalError"),
        ],
    )
    .await;
    let provider = provider(&moto, &proxy.url).await;
    let mesh = "capmesh";

    let err = provider
        .launch(&spec(mesh, "c7a.16xlarge", Some("us-east-1a"), true))
        .await
        .unwrap_err();
    match &err {
        CloudError::Capacity {
            instance_type,
            zone,
            message,
        } => {
            assert_eq!(
                (instance_type.as_str(), zone.as_str()),
                ("c7a.16xlarge", "us-east-1a")
            );
            assert!(
                message.contains("InsufficientInstanceCapacity"),
                "{message}"
            );
        }
        e => panic!("expected a capacity error, got {e:?}"),
    }
    assert_eq!(
        proxy.answered("c7a.16xlarge"),
        1,
        "a capacity answer is not retried"
    );

    // What the provisioner does: the next type or zone on a capacity error.
    let launched = launch_first(
        &provider,
        &[
            spec(mesh, "c7a.16xlarge", Some("us-east-1a"), true),
            spec(mesh, "c5a.16xlarge", Some("us-east-1a"), true),
        ],
    )
    .await;
    let launched = launched.unwrap();
    assert_eq!(launched.instance_type, "c5a.16xlarge");
    assert_eq!(provider.list(TAG_MESH, mesh).await.unwrap().len(), 1);

    // A quota stops the fall-through: the next type is not tried.
    let err = launch_first(
        &provider,
        &[
            spec(mesh, "c6a.16xlarge", None, true),
            spec(mesh, "c5a.16xlarge", None, true),
        ],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, CloudError::Quota(m) if m.contains("VcpuLimitExceeded")),
        "{err:?}"
    );
    assert!(!err.is_capacity());
    assert_eq!(provider.list(TAG_MESH, mesh).await.unwrap().len(), 1);
    // With no capacity anywhere, the last capacity error comes back.
    let err = launch_first(
        &provider,
        &[
            spec(mesh, "c7a.16xlarge", Some("us-east-1a"), true),
            spec(mesh, "c7a.16xlarge", Some("us-east-1b"), true),
        ],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, CloudError::Capacity { zone, .. } if zone == "us-east-1b"),
        "{err:?}"
    );
    // Other server errors are retried by the SDK (three attempts), then reported with their code.
    let err = provider
        .launch(&spec(mesh, "m7a.16xlarge", None, true))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Api { code, .. } if code == "InternalError"),
        "{err:?}"
    );
    assert_eq!(proxy.answered("m7a.16xlarge"), 3);
}

#[tokio::test]
async fn bad_requests_and_credentials_and_an_unreachable_endpoint_are_told_apart() {
    let moto = Moto::start();
    let provider = provider(&moto, &moto.url).await;

    // An AMI that does not exist, a type that does not exist, a spec without the mesh tag.
    let mut no_ami = provider.config().clone();
    no_ami.image_id = "ami-00000000".into();
    let err = AwsProvider::new(no_ami)
        .launch(&spec("m", "c7a.16xlarge", None, true))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("InvalidAMIID")),
        "{err:?}"
    );
    let err = provider
        .launch(&spec("m", "c7a.huge", None, true))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("c7a.huge")),
        "{err:?}"
    );
    let mut untagged = spec("m", "c7a.16xlarge", None, true);
    untagged.tags.remove(TAG_MESH);
    let err = provider.launch(&untagged).await.unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains(TAG_MESH)),
        "{err:?}"
    );
    assert!(provider.list(TAG_MESH, "m").await.unwrap().is_empty());

    // Credentials moto's IAM does not know (authentication on from the first call).
    let strict = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let denied = AwsProvider::new(config(&strict.url, "ami-00000000"));
    let err = denied.list(TAG_MESH, "m").await.unwrap_err();
    assert!(
        matches!(&err, CloudError::Auth(m) if m.contains("AuthFailure")),
        "{err:?}"
    );
    let err = denied
        .launch(&spec("m", "c7a.16xlarge", None, true))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::Auth(_)), "{err:?}");

    // Nothing listening: an I/O error naming the endpoint.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let err = AwsProvider::new(config(&nowhere, "ami-00000000"))
        .list(TAG_MESH, "m")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Io(m) if m.contains(&nowhere)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_launch_falls_through_the_zones_of_a_type_cheapest_first() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(
        moto.addr(),
        &[(
            "c5a.16xlarge@us-east-1a",
            500,
            "InsufficientInstanceCapacity",
        )],
    )
    .await;
    let provider = provider(&moto, &proxy.url).await;
    let user_data = UserData {
        version: USER_DATA_VERSION,
        mesh: "zonemesh".into(),
        bootstrap: vec!["/ip4/10.0.0.1/tcp/7741/p2p/12D3KooWprov".into()],
        provisioner: "12D3KooWprov".into(),
        token: "BN1token".into(),
        expires_at: u64::MAX,
        preemption: Some("aws".into()),
        identity: None,
        price_per_hour_micros: None,
    };
    let specs = launch_specs(
        &provider,
        Some("c5a.16xlarge"),
        true,
        &user_data,
        "0123456789abcdef",
    )
    .await
    .unwrap();
    // One spec per zone the type is priced in; moto prices them alike, so by name.
    let zones: Vec<&str> = specs.iter().filter_map(|s| s.zone.as_deref()).collect();
    assert_eq!(zones.len(), specs.len(), "every spec names its zone");
    assert!(zones.len() >= 2 && zones[0] == "us-east-1a", "{zones:?}");
    assert!(specs.iter().all(|s| s.instance_type == "c5a.16xlarge"
        && s.tags[TAG_INVITE] == "0123456789abcdef"
        && s.tags[TAG_MESH] == "zonemesh"));
    // No capacity in the cheapest zone: the next one.
    let instance = launch_first(&provider, &specs).await.unwrap();
    assert_eq!(instance.zone, zones[1]);
    assert_eq!(proxy.answered("c5a.16xlarge@us-east-1a"), 1);
    assert_eq!(instance.tags[TAG_INVITE], "0123456789abcdef");
}
