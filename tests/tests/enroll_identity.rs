//! Enrollment with the cloud's identity proof (DESIGN §9): an invite bound to an AWS instance
//! is redeemed only by a node whose metadata server serves that instance's identity document,
//! signed by a key the inviter trusts. The metadata servers are fakes on loopback, the trust
//! root a key made by the test.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use blendnet_tests::{Node, e2e, eventually, has_error_line, serve_http, string_array};
use data_encoding::BASE64;
use serde_json::json;

const ONLINE_WITHIN: Duration = Duration::from_secs(30);

/// An IMDSv2 fake serving one instance identity document and its signature by `key`.
fn fake_imds(key: &RsaKeyPair, instance: &str) -> Result<std::net::SocketAddr> {
    let document = json!({
        "accountId": "123456789012",
        "architecture": "x86_64",
        "availabilityZone": "us-east-1a",
        "imageId": "ami-0abc",
        "instanceId": instance,
        "instanceType": "c7i.large",
        "pendingTime": "2026-11-26T03:00:00Z",
        "privateIp": "10.0.0.7",
        "region": "us-east-1",
        "version": "2017-09-30"
    })
    .to_string();
    let mut sig = vec![0; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        document.as_bytes(),
        &mut sig,
    )
    .map_err(|_| anyhow::anyhow!("signing the document"))?;
    // IMDS wraps the signature in lines of 64 characters.
    let signature = BASE64
        .encode(&sig)
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    serve_http(move |r| {
        let (status, body) = match (r.method.as_str(), r.path.as_str()) {
            ("PUT", "/latest/api/token") => ("200 OK", "imds-token"),
            ("GET", _) if !r.has("x-aws-ec2-metadata-token: imds-token") => {
                ("401 Unauthorized", "")
            }
            ("GET", "/latest/dynamic/instance-identity/document") => ("200 OK", document.as_str()),
            ("GET", "/latest/dynamic/instance-identity/signature") => {
                ("200 OK", signature.as_str())
            }
            _ => ("404 Not Found", ""),
        };
        (status, body.to_owned())
    })
}

/// A node enrolling with `user_data`, its metadata server at `imds` (if any).
fn enrolling(name: &str, user_data: &str, imds: Option<std::net::SocketAddr>) -> Result<Node> {
    let mut node = Node::new(name)?;
    if let Some(addr) = imds {
        node.set_env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            &format!("http://{addr}"),
        );
    }
    let file = node.data_dir().with_file_name("user-data");
    std::fs::write(&file, user_data)?;
    let mut args = Node::default_up_args();
    args.extend(["--user-data".to_string(), file.display().to_string()]);
    node.start_command("enroll", &args)?;
    Ok(node)
}

/// `node`'s enrollment ends in a refusal whose message contains each of `words`.
fn refused(node: &mut Node, words: &[&str]) -> Result<()> {
    let status = node.wait_exit(ONLINE_WITHIN)?;
    let stderr = node.stderr()?;
    ensure!(
        !status.success() && has_error_line(&stderr) && words.iter().all(|w| stderr.contains(w)),
        "{}: expected a refusal naming {words:?} ({status}):\n{stderr}",
        node.name()
    );
    Ok(())
}

#[test]
fn only_the_instance_an_invite_is_bound_to_redeems_it() {
    e2e(|| {
        let key = RsaKeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("generating a test key"))?;
        let (mut a, mesh) = Node::init("inviter")?;
        std::fs::write(
            a.data_dir().join("aws-test.pem"),
            format!(
                "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
                BASE64.encode(key.public_key().as_ref())
            ),
        )?;
        std::fs::write(
            a.data_dir().join("blendnet.toml"),
            "[cloud]\nprovider = \"local\"\naws_identity_certificate = \"aws-test.pem\"\n",
        )?;
        a.up(&[])?;
        // A malformed instance is refused before anything is issued.
        let bad = a.cli(&["invite", "--roles", "render", "--instance", "i-0123"])?;
        ensure!(
            !bad.status.success()
                && String::from_utf8_lossy(&bad.stderr).contains("CLOUD:INSTANCE"),
            "a bare instance id was accepted: {bad:?}"
        );
        let token = a.invite(&[
            "--ttl",
            "10m",
            "--roles",
            "render",
            "--instance",
            "aws:i-0123",
        ])?;
        let mut user_data = blendnet_tests::user_data(&a, &mesh, &token)?;
        user_data["identity"] = json!("aws");
        let without_identity = {
            let mut u = user_data.clone();
            u.as_object_mut().context("object")?.remove("identity");
            u.to_string()
        };
        let user_data = user_data.to_string();

        // Another instance's genuine document, a document signed by a key the inviter does
        // not trust, no proof at all: each is refused, saying why.
        let mut other = enrolling("other", &user_data, Some(fake_imds(&key, "i-9999")?))?;
        refused(
            &mut other,
            &["identity proof was refused", "i-9999", "i-0123"],
        )?;
        let stranger = RsaKeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("generating a test key"))?;
        let mut forger = enrolling("forger", &user_data, Some(fake_imds(&stranger, "i-0123")?))?;
        refused(
            &mut forger,
            &["identity proof was refused", "does not verify"],
        )?;
        let mut bare = enrolling("bare", &without_identity, None)?;
        refused(
            &mut bare,
            &["identity proof was refused", "no identity proof"],
        )?;

        // The instance itself: the invite is still unused, and it joins with it.
        let mut instance = enrolling("instance", &user_data, Some(fake_imds(&key, "i-0123")?))?;
        instance.wait_api(ONLINE_WITHIN)?;
        eventually(ONLINE_WITHIN, Duration::from_millis(250), || {
            let status = instance.status()?;
            ensure!(status["member"] == true, "not a member yet: {status}");
            ensure!(
                string_array(&status, "roles")? == ["render"],
                "the instance gets the render role only: {status}"
            );
            Ok(())
        })
        .context("the bound instance did not enroll")?;
        // And the token is spent now.
        let mut late = enrolling("late", &user_data, Some(fake_imds(&key, "i-0123")?))?;
        refused(&mut late, &["already been used"])?;
        Ok(())
    })
}
