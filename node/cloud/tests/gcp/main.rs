//! The GCP provider against an in-repo fake of Google's token endpoint, Compute API, Billing
//! Catalog and metadata server ([`fake`]), with the real `gcp_auth` JWT-bearer flow: each test
//! generates an RSA key, writes a service-account key file whose `token_uri` points at the fake,
//! and the fake checks the signed JWT against the public key.
//!
//! The fake is strict about what it is sent (unknown fields, wrong enums, bad names are 400s, as
//! Compute Engine answers), and a test below proves that on the fake itself, so the provider
//! tests passing means the provider's requests would pass Compute Engine's checks too.

mod fake;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use blendnet_cloud::gcp::{GcpConfig, GcpProvider, USER_DATA_KEY, label};
use blendnet_cloud::local::tags;
use blendnet_cloud::{CloudError, InstanceState, LaunchSpec, Provider, TAG_MESH, TAG_PROVISIONER};
use bytes::Bytes;
use fake::{Fake, MachineType};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

const PROJECT: &str = "render-farm-4711";
const EMAIL: &str = "blendnet@render-farm-4711.iam.gserviceaccount.com";
const ZONES: [&str; 3] = ["us-central1-a", "us-central1-b", "europe-west1-b"];
/// A peer id: base58, with uppercase letters, longer than a label may be.
const PROVISIONER: &str = "12D3KooWGzPMqHDpCQq5RjLWqKxX6nP8uZb8aS1vVbEw3nTGZxHk";
/// Every wait in these tests is bounded by this.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// An RSA key pair: (PKCS#8 PEM private key, PKCS#1 DER public key). Generated once per run
/// (2048-bit generation is slow in a debug build).
fn key_pair() -> &'static (String, Vec<u8>) {
    static KEY: OnceLock<(String, Vec<u8>)> = OnceLock::new();
    KEY.get_or_init(generate_key)
}

/// Another key, that the fake does not know.
fn other_key_pair() -> &'static (String, Vec<u8>) {
    static KEY: OnceLock<(String, Vec<u8>)> = OnceLock::new();
    KEY.get_or_init(generate_key)
}

fn generate_key() -> (String, Vec<u8>) {
    let key = KeyPair::generate(KeySize::Rsa2048).unwrap();
    let der = key.as_der().unwrap();
    let base64 = data_encoding::BASE64.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in base64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    (pem, key.public_key().as_ref().to_vec())
}

fn machine_types() -> Vec<MachineType> {
    let t = |name, cpus, memory_mb, gpus, shared| MachineType {
        name,
        cpus,
        memory_mb,
        gpus,
        shared,
    };
    vec![
        t("e2-micro", 2, 1024, 0, true),
        t("e2-standard-4", 4, 16384, 0, false),
        t("n2-standard-8", 8, 32768, 0, false),
        t("n2-highcpu-32", 32, 32768, 0, false),
        t("c2d-highcpu-56", 56, 112640, 0, false),
        t("a2-highgpu-1g", 12, 87040, 1, false),
    ]
}

/// The fake, and a service-account key file for it (its `token_uri` the fake's).
struct Setup {
    fake: Fake,
    _dir: tempfile::TempDir,
    key_file: std::path::PathBuf,
}

async fn setup() -> Setup {
    let (pem, public) = key_pair().clone();
    let fake = Fake::start(PROJECT, EMAIL, public, &ZONES, machine_types()).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key.json");
    write_key(&key_file, &pem, &format!("{}/token", fake.url));
    Setup {
        fake,
        _dir: dir,
        key_file,
    }
}

/// A key file as the console downloads it.
fn write_key(path: &std::path::Path, pem: &str, token_uri: &str) {
    let key = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "104857600000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/blendnet",
        "universe_domain": "googleapis.com",
    });
    std::fs::write(path, key.to_string()).unwrap();
}

fn config(setup: &Setup) -> GcpConfig {
    let mut config = GcpConfig::new(
        PROJECT,
        ZONES.iter().map(|z| z.to_string()).collect(),
        &setup.key_file,
        "projects/debian-cloud/global/images/family/debian-12",
    );
    config.compute_endpoint = Some(format!("{}/compute/v1", setup.fake.url));
    config.billing_endpoint = Some(format!("{}/v1", setup.fake.url));
    config
}

fn spec(mesh: &str, instance_type: &str, zone: Option<&str>, spot: bool) -> LaunchSpec {
    LaunchSpec {
        instance_type: instance_type.into(),
        zone: zone.map(String::from),
        user_data: format!("{{\"mesh\":\"{mesh}\",\"token\":\"BN1-ünïcode\"}}\n"),
        tags: tags([(TAG_MESH, mesh), (TAG_PROVISIONER, PROVISIONER)]),
        spot,
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("a call to the fake took too long")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The metadata items of an insert body, by key.
fn metadata_items(body: &Value) -> BTreeMap<String, String> {
    body["metadata"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_owned(),
                i["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn spot_and_standard_instances_launch_labelled_list_by_label_and_terminate() {
    let setup = setup().await;
    let mut config = config(&setup);
    config.max_run_duration_secs = Some(6 * 3600);
    // The key file's token_uri is Google's; the setting points the real flow at the fake
    // (the fake checks the JWT's audience is its own URL).
    let google_key = setup._dir.path().join("google-key.json");
    write_key(
        &google_key,
        &key_pair().0,
        "https://oauth2.googleapis.com/token",
    );
    config.credentials_file = google_key;
    config.token_uri = Some(format!("{}/token", setup.fake.url));
    let provider = GcpProvider::new(config.clone()).unwrap();
    let mesh = "l2bq63h5";

    let spot = bounded(provider.launch(&spec(mesh, "n2-standard-8", Some("us-central1-b"), true)))
        .await
        .unwrap();
    let standard_spec = spec(mesh, "e2-standard-4", None, false);
    let standard = bounded(provider.launch(&standard_spec)).await.unwrap();
    assert_eq!(
        (spot.instance_type.as_str(), spot.zone.as_str()),
        ("n2-standard-8", "us-central1-b")
    );
    assert_eq!(
        (standard.instance_type.as_str(), standard.zone.as_str()),
        ("e2-standard-4", "us-central1-a"),
        "no zone in the spec: the first configured one"
    );
    // The instance was read back after its operation: staging, not running yet.
    assert_eq!(spot.state, InstanceState::Pending);
    assert!(spot.id.starts_with("blendnet-") && spot.id != standard.id);
    assert!(fake::valid_name(&spot.id), "{}", spot.id);
    assert_eq!(
        spot.tags.get(TAG_PROVISIONER).map(String::as_str),
        Some(PROVISIONER)
    );

    // Listed by either tag (the peer id's label is a hash of it), with type, zone, state,
    // launch time and the exact tags.
    let listed = bounded(provider.list(TAG_MESH, mesh)).await.unwrap();
    let mut ids = vec![spot.id.clone(), standard.id.clone()];
    ids.sort();
    assert_eq!(listed.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), ids);
    for i in &listed {
        assert_eq!(i.state, InstanceState::Running, "{i:?}");
        assert!(i.launched_at.abs_diff(now()) < 600, "{i:?}");
        assert_eq!(i.tags, spec(mesh, "x", None, true).tags, "{i:?}");
    }
    let listed_spot = listed.iter().find(|i| i.id == spot.id).unwrap();
    assert_eq!(
        (
            listed_spot.instance_type.as_str(),
            listed_spot.zone.as_str()
        ),
        ("n2-standard-8", "us-central1-b")
    );
    assert_eq!(
        bounded(provider.list(TAG_PROVISIONER, PROVISIONER))
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        bounded(provider.list(TAG_MESH, "another"))
            .await
            .unwrap()
            .is_empty()
    );
    // Labels are case-blind, the tags are not: another peer id that differs only in case
    // is not this one.
    assert!(
        bounded(provider.list(TAG_PROVISIONER, &PROVISIONER.to_lowercase()))
            .await
            .unwrap()
            .is_empty()
    );

    // What Compute Engine was sent.
    let inserts = setup.fake.state().inserts.clone();
    assert_eq!(inserts.len(), 2);
    let (spot_body, standard_body) = (&inserts[0], &inserts[1]);
    assert_eq!(spot_body["name"], json!(spot.id));
    assert_eq!(
        spot_body["machineType"],
        json!("zones/us-central1-b/machineTypes/n2-standard-8")
    );
    assert_eq!(
        spot_body["scheduling"],
        json!({
            "provisioningModel": "SPOT",
            "instanceTerminationAction": "DELETE",
            "automaticRestart": false,
            "onHostMaintenance": "TERMINATE",
            "maxRunDuration": { "seconds": "21600" },
        })
    );
    assert_eq!(
        standard_body["scheduling"]["provisioningModel"],
        json!("STANDARD")
    );
    assert_eq!(
        standard_body["scheduling"]["maxRunDuration"],
        json!({ "seconds": "21600" })
    );
    for body in [spot_body, standard_body] {
        let items = metadata_items(body);
        assert_eq!(items[USER_DATA_KEY], standard_spec.user_data);
        let script = &items["startup-script"];
        assert!(script.starts_with("#!/bin/sh\n"), "{script}");
        assert!(
            script.contains(&format!("instance/attributes/{USER_DATA_KEY}"))
                && script.contains("Metadata-Flavor: Google")
                && script.contains(&config.bootstrap_command),
            "{script}"
        );
        let labels = body["labels"].as_object().unwrap();
        assert_eq!(labels[TAG_MESH], json!(mesh));
        let peer_label = labels[TAG_PROVISIONER].as_str().unwrap();
        assert_eq!(peer_label, label(PROVISIONER));
        assert!(peer_label.len() <= 63 && peer_label == peer_label.to_lowercase());
        let disk = &body["disks"][0];
        assert_eq!(disk["boot"], json!(true));
        assert_eq!(disk["autoDelete"], json!(true));
        assert_eq!(disk["initializeParams"]["sourceImage"], json!(config.image));
        assert_eq!(
            body["networkInterfaces"][0]["accessConfigs"][0]["type"],
            json!("ONE_TO_ONE_NAT")
        );
    }
    // The metadata server serves the user data to the instance, as the startup script reads it.
    setup.fake.state().metadata_instance = Some(spot.id.clone());
    let (status, text) = raw(
        "GET",
        &format!(
            "{}/computeMetadata/v1/instance/attributes/{USER_DATA_KEY}",
            setup.fake.url
        ),
        &[("Metadata-Flavor", "Google")],
        None,
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (200, standard_spec.user_data.as_str())
    );

    // One token for all of it: gcp_auth caches it.
    assert_eq!(setup.fake.state().token_requests, 1);

    // Terminate: gone; again, or a name GCE does not know, is no error.
    bounded(provider.terminate(std::slice::from_ref(&spot.id)))
        .await
        .unwrap();
    bounded(provider.terminate(&[
        spot.id.clone(),
        "blendnet-unknown".into(),
        "Not A Name".into(),
    ]))
    .await
    .unwrap();
    let left = bounded(provider.list(TAG_MESH, mesh)).await.unwrap();
    assert_eq!(
        left.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        [standard.id.as_str()]
    );

    // A provisioner that restarts (nothing remembered) finds the zone of what it terminates.
    let restarted = GcpProvider::new(config).unwrap();
    bounded(restarted.terminate(std::slice::from_ref(&standard.id)))
        .await
        .unwrap();
    assert!(
        bounded(provider.list(TAG_MESH, mesh))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(setup.fake.state().instances.is_empty());
}

#[tokio::test]
async fn listings_read_every_page() {
    let setup = setup().await;
    setup.fake.state().page_limit = 1;
    let provider = GcpProvider::new(config(&setup)).unwrap();
    for zone in ["us-central1-a", "us-central1-b", "europe-west1-b"] {
        bounded(provider.launch(&spec("paged", "n2-standard-8", Some(zone), true)))
            .await
            .unwrap();
    }
    bounded(provider.launch(&spec("other", "n2-standard-8", None, true)))
        .await
        .unwrap();
    let listed = bounded(provider.list(TAG_MESH, "paged")).await.unwrap();
    let mut zones: Vec<_> = listed.iter().map(|i| i.zone.as_str()).collect();
    zones.sort();
    assert_eq!(zones, ["europe-west1-b", "us-central1-a", "us-central1-b"]);
}

/// One request without the provider: (status, body).
async fn raw(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let response = bounded(client.request(request)).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// An insert body Compute Engine accepts.
fn good_body(name: &str) -> Value {
    json!({
        "name": name,
        "machineType": "zones/us-central1-a/machineTypes/n2-standard-8",
        "labels": { "blendnet-mesh": "m1" },
        "scheduling": {
            "provisioningModel": "SPOT",
            "instanceTerminationAction": "DELETE",
            "automaticRestart": false,
            "onHostMaintenance": "TERMINATE",
        },
        "metadata": { "items": [{ "key": "startup-script", "value": "#!/bin/sh\n" }] },
        "disks": [{
            "boot": true,
            "autoDelete": true,
            "initializeParams": {
                "sourceImage": "projects/debian-cloud/global/images/family/debian-12",
                "diskSizeGb": "20",
            },
        }],
        "networkInterfaces": [{
            "network": "global/networks/default",
            "accessConfigs": [{ "type": "ONE_TO_ONE_NAT", "name": "External NAT" }],
        }],
    })
}

/// The `errors[0].reason` and message of a Google error body.
fn reason(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (
        v["error"]["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .to_owned(),
        v["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn the_fake_refuses_what_compute_engine_refuses() {
    let setup = setup().await;
    let token = setup.fake.state().issue_token();
    let bearer = format!("Bearer {token}");
    let url = format!(
        "{}/compute/v1/projects/{PROJECT}/zones/us-central1-a/instances",
        setup.fake.url
    );
    let auth = [("Authorization", bearer.as_str())];

    // The good body passes, so each refusal below is for its one fault.
    let (status, body) = raw("POST", &url, &auth, Some(&good_body("good-1"))).await;
    assert_eq!(status, 200, "{body}");

    let mut misspelt = good_body("bad-1");
    let scheduling = misspelt["scheduling"].as_object_mut().unwrap();
    let model = scheduling.remove("provisioningModel").unwrap();
    scheduling.insert("provisioningModle".into(), model);
    let (status, body) = raw("POST", &url, &auth, Some(&misspelt)).await;
    assert_eq!(status, 400, "{body}");
    let (why, message) = reason(&body);
    assert_eq!(why, "invalid");
    assert!(message.contains("provisioningModle"), "{message}");

    let mut wrong_enum = good_body("bad-2");
    wrong_enum["scheduling"]["provisioningModel"] = json!("PREEMPTIBLE");
    let (status, body) = raw("POST", &url, &auth, Some(&wrong_enum)).await;
    assert_eq!(status, 400, "{body}");
    assert!(reason(&body).1.contains("PREEMPTIBLE"), "{body}");

    let mut snake_case = good_body("bad-3");
    snake_case["network_interfaces"] = snake_case["networkInterfaces"].take();
    snake_case
        .as_object_mut()
        .unwrap()
        .remove("networkInterfaces");
    let (status, body) = raw("POST", &url, &auth, Some(&snake_case)).await;
    assert_eq!(status, 400, "{body}");

    for name in ["Blendnet-1", "1blendnet", "blendnet_1", "blendnet-"] {
        let (status, body) = raw("POST", &url, &auth, Some(&good_body(name))).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(reason(&body).1.contains("resource.name"), "{body}");
    }

    let mut restart = good_body("bad-4");
    restart["scheduling"]["automaticRestart"] = json!(true);
    let (status, body) = raw("POST", &url, &auth, Some(&restart)).await;
    assert_eq!(status, 400, "{body}");

    let mut uppercase_label = good_body("bad-5");
    uppercase_label["labels"]["blendnet-provisioner"] = json!(PROVISIONER);
    let (status, body) = raw("POST", &url, &auth, Some(&uppercase_label)).await;
    assert_eq!(status, 400, "{body}");

    let mut unknown_type = good_body("bad-6");
    unknown_type["machineType"] = json!("zones/us-central1-a/machineTypes/n9-mega-1");
    let (status, body) = raw("POST", &url, &auth, Some(&unknown_type)).await;
    assert_eq!(status, 400, "{body}");

    let mut other_zone = good_body("bad-7");
    other_zone["machineType"] = json!("zones/us-central1-b/machineTypes/n2-standard-8");
    let (status, body) = raw("POST", &url, &auth, Some(&other_zone)).await;
    assert_eq!(status, 400, "{body}");

    // No token, a token the fake never issued: 401 in Google's format.
    for headers in [&[][..], &[("Authorization", "Bearer ya29.forged")][..]] {
        let (status, body) = raw("GET", &url, headers, None).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(reason(&body).0, "authError");
    }
    assert_eq!(
        setup.fake.state().inserts.len(),
        1,
        "only the good body was taken"
    );

    // The token endpoint refuses a grant that is not the JWT bearer one, and a forged JWT.
    let (status, body) = raw(
        "POST",
        &format!("{}/token", setup.fake.url),
        &[("content-type", "application/x-www-form-urlencoded")],
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unsupported_grant_type"), "{body}");

    // The metadata server wants its header.
    let preempted = format!("{}/computeMetadata/v1/instance/preempted", setup.fake.url);
    let (status, _) = raw("GET", &preempted, &[], None).await;
    assert_eq!(status, 403);
    let (status, text) = raw("GET", &preempted, &[("Metadata-Flavor", "Google")], None).await;
    assert_eq!((status, text.as_str()), (200, "FALSE"));
    setup.fake.state().preempted = true;
    let (_, text) = raw("GET", &preempted, &[("Metadata-Flavor", "Google")], None).await;
    assert_eq!(text, "TRUE");
}

#[tokio::test]
async fn stockouts_quotas_and_bad_requests_are_told_apart() {
    let setup = setup().await;
    {
        let mut state = setup.fake.state();
        state
            .stockouts
            .insert(("us-central1-a".into(), "n2-standard-8".into()));
        state.quota_exceeded.insert("n2-highcpu-32".into());
    }
    let provider = GcpProvider::new(config(&setup)).unwrap();
    let mesh = "capmesh";

    let err = bounded(provider.launch(&spec(mesh, "n2-standard-8", Some("us-central1-a"), true)))
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
                ("n2-standard-8", "us-central1-a")
            );
            assert!(
                message.contains("ZONE_RESOURCE_POOL_EXHAUSTED"),
                "{message}"
            );
        }
        e => panic!("expected a capacity error, got {e:?}"),
    }

    // What the provisioner does on a capacity error: the next zone.
    let mut launched = None;
    for zone in ["us-central1-a", "us-central1-b"] {
        match bounded(provider.launch(&spec(mesh, "n2-standard-8", Some(zone), true))).await {
            Err(e) if e.is_capacity() => continue,
            other => {
                launched = Some(other.unwrap());
                break;
            }
        }
    }
    assert_eq!(launched.unwrap().zone, "us-central1-b");
    assert_eq!(
        bounded(provider.list(TAG_MESH, mesh)).await.unwrap().len(),
        1
    );

    let err = bounded(provider.launch(&spec(mesh, "n2-highcpu-32", None, true)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Quota(m) if m.contains("QUOTA_EXCEEDED")),
        "{err:?}"
    );
    let err = bounded(provider.launch(&spec(mesh, "n9-mega-1", None, true)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("n9-mega-1")),
        "{err:?}"
    );
    let mut big = spec(mesh, "n2-standard-8", None, true);
    big.user_data = "x".repeat(17 * 1024);
    let err = bounded(provider.launch(&big)).await.unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("user data")),
        "{err:?}"
    );
    let err = bounded(provider.launch(&spec(mesh, "n2-standard-8", Some("mars-north1-a"), true)))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::BadRequest(_)), "{err:?}");
    // A settings mistake: another project.
    let mut other = config(&setup);
    other.project = "someone-elses".into();
    let err = bounded(GcpProvider::new(other).unwrap().list(TAG_MESH, mesh))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::Auth(_)), "{err:?}");
    assert_eq!(
        bounded(provider.list(TAG_MESH, mesh)).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn bad_revoked_and_short_lived_credentials() {
    let setup = setup().await;

    // A key the fake does not know: the token endpoint refuses the JWT's signature.
    let forged = setup._dir.path().join("forged.json");
    write_key(
        &forged,
        &other_key_pair().0,
        &format!("{}/token", setup.fake.url),
    );
    let mut config_forged = config(&setup);
    config_forged.credentials_file = forged;
    let err = bounded(GcpProvider::new(config_forged).unwrap().list(TAG_MESH, "m"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Auth(m) if m.contains("token")),
        "{err:?}"
    );
    assert!(setup.fake.state().tokens.is_empty(), "no token was issued");

    // A missing key file, and one that is not a key.
    let mut missing = config(&setup);
    missing.credentials_file = setup._dir.path().join("nowhere.json");
    assert!(
        matches!(GcpProvider::new(missing), Err(CloudError::Auth(m)) if m.contains("nowhere.json"))
    );
    let not_key = setup._dir.path().join("not-key.json");
    std::fs::write(&not_key, "{\"type\":\"service_account\"}").unwrap();
    let mut broken = config(&setup);
    broken.credentials_file = not_key;
    assert!(matches!(GcpProvider::new(broken), Err(CloudError::Auth(_))));

    // Tokens that expire at once are fetched again for each call.
    setup.fake.state().token_lifetime = 5;
    let before = setup.fake.state().token_requests;
    let provider = GcpProvider::new(config(&setup)).unwrap();
    bounded(provider.list(TAG_MESH, "m")).await.unwrap();
    bounded(provider.list(TAG_MESH, "m")).await.unwrap();
    assert_eq!(setup.fake.state().token_requests - before, 2);

    // A token the API no longer accepts (revoked, or expired early): Auth, not a retry loop.
    setup.fake.state().token_lifetime = 3599;
    let provider = GcpProvider::new(config(&setup)).unwrap();
    bounded(provider.list(TAG_MESH, "m")).await.unwrap();
    setup.fake.state().tokens.clear();
    let err = bounded(provider.list(TAG_MESH, "m")).await.unwrap_err();
    assert!(
        matches!(&err, CloudError::Auth(m) if m.contains("authError")),
        "{err:?}"
    );
    let err = bounded(provider.launch(&spec("m", "n2-standard-8", None, true)))
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::Auth(_)), "{err:?}");
    assert!(setup.fake.state().inserts.is_empty());

    // Nothing listening: an I/O error naming the endpoint.
    let mut nowhere = config(&setup);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}/compute/v1");
    nowhere.compute_endpoint = Some(endpoint.clone());
    let err = bounded(GcpProvider::new(nowhere).unwrap().list(TAG_MESH, "m"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Io(m) if m.contains(&endpoint)),
        "{err:?}"
    );
}

/// A Compute SKU as the Billing Catalog lists it.
fn sku(
    description: &str,
    usage: &str,
    regions: &[&str],
    unit: &str,
    units: &str,
    nanos: i64,
) -> Value {
    json!({
        "name": format!("services/6F81-5844-456A/skus/{:X}", description.len() * 7919 + nanos as usize),
        "skuId": "0000-AAAA-1111",
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": if description.contains("Core") { "CPU" } else { "RAM" },
            "usageType": usage,
        },
        "serviceRegions": regions,
        "pricingInfo": [{
            "summary": "",
            "pricingExpression": {
                "usageUnit": unit,
                "displayQuantity": 1,
                "tieredRates": [{
                    "startUsageAmount": 0,
                    "unitPrice": { "currencyCode": "USD", "units": units, "nanos": nanos },
                }],
                "usageUnitDescription": if unit == "h" { "hour" } else { "gibibyte hour" },
                "baseUnit": if unit == "h" { "s" } else { "By.s" },
                "baseUnitDescription": "second",
                "baseUnitConversionFactor": 3600,
            },
            "currencyConversionRate": 1,
            "effectiveTime": "2026-11-25T10:00:00.000Z",
        }],
        "serviceProviderName": "Google",
        "geoTaxonomy": { "type": "REGIONAL", "regions": regions },
    })
}

#[tokio::test]
async fn prices_come_from_every_page_of_the_catalog() {
    let setup = setup().await;
    let us = ["us-central1"];
    setup.fake.state().sku_pages = vec![
        vec![
            sku(
                "N2 Instance Core running in Americas",
                "OnDemand",
                &us,
                "h",
                "0",
                31_611_000,
            ),
            // Decoys: another region, custom types, a commitment, another family.
            sku(
                "N2 Instance Core running in EMEA",
                "OnDemand",
                &["europe-west1"],
                "h",
                "0",
                34_773_000,
            ),
            sku(
                "N2 Custom Instance Core running in Americas",
                "OnDemand",
                &us,
                "h",
                "0",
                33_191_000,
            ),
            sku(
                "Commitment v1: N2 Cpu in Americas for 1 Year",
                "Commit1Yr",
                &us,
                "h",
                "0",
                19_915_000,
            ),
            sku(
                "E2 Instance Core running in Americas",
                "OnDemand",
                &us,
                "h",
                "0",
                21_811_590,
            ),
            sku(
                "Spot Preemptible N2 Custom Instance Ram running in Americas",
                "Preemptible",
                &us,
                "GiBy.h",
                "0",
                900_000,
            ),
        ],
        vec![
            sku(
                "N2 Instance Ram running in Americas",
                "OnDemand",
                &us,
                "GiBy.h",
                "0",
                4_237_000,
            ),
            sku(
                "Spot Preemptible N2 Instance Core running in Americas",
                "Preemptible",
                &us,
                "h",
                "0",
                7_000_000,
            ),
            sku(
                "Spot Preemptible N2 Instance Ram running in Americas",
                "Preemptible",
                &us,
                "GiBy.h",
                "0",
                1_000_000,
            ),
            sku(
                "N2 Instance Ram running in EMEA",
                "OnDemand",
                &["europe-west1"],
                "GiBy.h",
                "0",
                4_661_000,
            ),
            sku(
                "C2D AMD Instance Core running in Americas",
                "OnDemand",
                &us,
                "h",
                "1",
                250_000_000,
            ),
            sku(
                "C2D AMD Instance Ram running in Americas",
                "OnDemand",
                &us,
                "GiBy.h",
                "0",
                500_000_000,
            ),
        ],
    ];
    let provider = GcpProvider::new(config(&setup)).unwrap();

    // n2-standard-8: 8 cores and 32 GiB.
    let on_demand = bounded(provider.prices("n2-standard-8", false))
        .await
        .unwrap();
    let by_zone: BTreeMap<&str, f64> = on_demand
        .iter()
        .map(|p| (p.zone.as_str(), p.per_hour))
        .collect();
    let expected = 8.0 * 0.031611 + 32.0 * 0.004237;
    assert_eq!(by_zone.len(), 3, "{on_demand:?}");
    assert!(
        (by_zone["us-central1-a"] - expected).abs() < 1e-9,
        "{on_demand:?}"
    );
    assert!(
        (by_zone["us-central1-b"] - expected).abs() < 1e-9,
        "{on_demand:?}"
    );
    let emea = 8.0 * 0.034773 + 32.0 * 0.004661;
    assert!(
        (by_zone["europe-west1-b"] - emea).abs() < 1e-9,
        "{on_demand:?}"
    );
    assert!(
        on_demand
            .iter()
            .all(|p| !p.spot && p.instance_type == "n2-standard-8")
    );
    assert_eq!(setup.fake.state().sku_requests, 2, "both pages read");

    let spot = bounded(provider.prices("n2-standard-8", true))
        .await
        .unwrap();
    assert_eq!(
        spot.iter().map(|p| p.zone.as_str()).collect::<Vec<_>>(),
        ["us-central1-a", "us-central1-b"],
        "no spot SKU for europe-west1"
    );
    assert!(
        (spot[0].per_hour - (8.0 * 0.007 + 32.0 * 0.001)).abs() < 1e-9,
        "{spot:?}"
    );
    assert!(spot.iter().all(|p| p.spot));
    assert_eq!(setup.fake.state().sku_requests, 2, "the catalog is cached");

    // Whole dollars in `units`: c2d-highcpu-56 has 56 cores and 110 GiB.
    let c2d = bounded(provider.prices("c2d-highcpu-56", false))
        .await
        .unwrap();
    assert!(
        (c2d[0].per_hour - (56.0 * 1.25 + 110.0 * 0.5)).abs() < 1e-9,
        "{c2d:?}"
    );

    let err = bounded(provider.prices("a2-highgpu-1g", true))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("a2-highgpu-1g") && m.contains("n2d")),
        "{err:?}"
    );
    let err = bounded(provider.prices("e2-micro", false))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("shared-core")),
        "{err:?}"
    );
}

#[tokio::test]
async fn instance_types_are_read_from_every_page() {
    let setup = setup().await;
    setup.fake.state().page_limit = 2;
    let mut config = config(&setup);
    config.instance_types = vec![
        "c2d-highcpu-56".into(),
        "a2-highgpu-1g".into(),
        "n2-standard-8".into(),
    ];
    let provider = GcpProvider::new(config.clone()).unwrap();
    let types = bounded(provider.instance_types()).await.unwrap();
    let summary: Vec<_> = types
        .iter()
        .map(|t| (t.name.as_str(), t.cores, t.ram_bytes >> 20, t.gpus))
        .collect();
    assert_eq!(
        summary,
        [
            ("c2d-highcpu-56", 56, 112640, 0),
            ("a2-highgpu-1g", 12, 87040, 1),
            ("n2-standard-8", 8, 32768, 0),
        ],
        "in the configured order"
    );

    // None configured: every type but the shared-core ones.
    config.instance_types.clear();
    let all = bounded(GcpProvider::new(config.clone()).unwrap().instance_types())
        .await
        .unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|t| t.name != "e2-micro"));

    config.instance_types = vec!["n2-standard-8".into(), "n9-mega-1".into()];
    let err = bounded(GcpProvider::new(config).unwrap().instance_types())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::BadRequest(m) if m.contains("n9-mega-1") && !m.contains("n2-standard-8")),
        "{err:?}"
    );
}
