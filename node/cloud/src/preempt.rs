//! Preemption notices (DESIGN §9): a spot instance learns from its cloud's metadata server that
//! it is about to be taken away, so its worker can hand back its leases and leave before the
//! machine goes, instead of the coordinator waiting out a lease.
//!
//! - AWS (IMDSv2): `PUT /latest/api/token` for a session token, then
//!   `GET /latest/meta-data/spot/instance-action` (404 until an interruption is scheduled, two
//!   minutes ahead) and `GET /latest/meta-data/events/recommendations/rebalance` (404 until EC2
//!   advises the instance is at elevated risk). Both are treated as notice: leaving early loses
//!   no work, and the provisioner starts a replacement if work is pending.
//! - GCP: `GET /computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google`: `TRUE`
//!   once preemption has begun (about 30 s ahead).
//!
//! The metadata roots come from the variables the clouds' own SDKs read,
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT` and `GCE_METADATA_HOST`, so tests point them at a fake.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How often the metadata server is asked. It is on the instance's own link; once a second
/// leaves the worker most of AWS's two minutes and GCP's thirty seconds.
pub const POLL: Duration = Duration::from_secs(1);
/// One metadata request's limit: the server is local, so a slow answer is a failed one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an IMDSv2 session token is asked to last (seconds); renewed well before.
const AWS_TOKEN_TTL_SECS: u64 = 21_600;
/// The header that carries an IMDSv2 session token.
const AWS_TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// The header every GCE metadata request must carry.
const GCP_FLAVOR: (&str, &str) = ("Metadata-Flavor", "Google");

/// Which cloud's notices to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
}

impl std::str::FromStr for Cloud {
    type Err = String;

    fn from_str(s: &str) -> Result<Cloud, String> {
        match s {
            "aws" => Ok(Cloud::Aws),
            "gcp" => Ok(Cloud::Gcp),
            other => Err(format!(
                "{other:?} is not a cloud whose preemption notices can be watched (\"aws\" or \"gcp\")"
            )),
        }
    }
}

/// A notice: what the metadata server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `spot/instance-action`, `rebalance` or `preempted`.
    pub kind: &'static str,
    /// The server's body (AWS: the action and its time).
    pub detail: String,
}

/// Watches one cloud's metadata server.
#[derive(Debug, Clone)]
pub struct Watcher {
    cloud: Cloud,
    /// `http://host[:port]`, without a trailing slash.
    root: String,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Watcher {
    /// A watcher of `cloud`'s metadata server, at the address its SDKs would use.
    pub fn new(cloud: Cloud) -> Watcher {
        let root = match cloud {
            Cloud::Aws => std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                .unwrap_or_else(|_| "http://169.254.169.254".into()),
            Cloud::Gcp => format!(
                "http://{}",
                std::env::var("GCE_METADATA_HOST")
                    .unwrap_or_else(|_| "metadata.google.internal".into())
            ),
        };
        Watcher::at(cloud, &root)
    }

    /// A watcher of the metadata server at `root` (`http://host:port`).
    pub fn at(cloud: Cloud, root: &str) -> Watcher {
        Watcher {
            cloud,
            root: root.trim_end_matches('/').to_owned(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Waits for a notice, asking every `poll`. A metadata server that cannot be reached or
    /// answers oddly is logged (once per kind of failure) and asked again: no notice is
    /// assumed from silence.
    pub async fn notice(&self, poll: Duration) -> Notice {
        let mut token: Option<(String, tokio::time::Instant)> = None;
        let mut last_problem = String::new();
        loop {
            let result = match self.cloud {
                Cloud::Aws => self.aws_once(&mut token).await,
                Cloud::Gcp => self.gcp_once().await,
            };
            match result {
                Ok(Some(notice)) => return notice,
                Ok(None) => last_problem.clear(),
                Err(problem) => {
                    if problem != last_problem {
                        tracing::warn!(%problem, "cannot read preemption notices");
                        last_problem = problem;
                    }
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    async fn aws_once(
        &self,
        token: &mut Option<(String, tokio::time::Instant)>,
    ) -> Result<Option<Notice>, String> {
        let renew_after = Duration::from_secs(AWS_TOKEN_TTL_SECS / 2);
        let fresh = token
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < renew_after);
        if !fresh {
            let value = self.aws_token(AWS_TOKEN_TTL_SECS).await?;
            *token = Some((value, tokio::time::Instant::now()));
        }
        let value = token.as_ref().map(|(t, _)| t.clone()).unwrap_or_default();
        for (kind, path) in [
            ("spot/instance-action", "spot/instance-action"),
            ("rebalance", "events/recommendations/rebalance"),
        ] {
            let asked = self
                .get(
                    Method::GET,
                    &format!("latest/meta-data/{path}"),
                    (AWS_TOKEN_HEADER, &value),
                )
                .await?;
            match asked {
                (StatusCode::OK, detail) => return Ok(Some(Notice { kind, detail })),
                (StatusCode::NOT_FOUND, _) => {}
                (StatusCode::UNAUTHORIZED, _) => {
                    // The token expired early (the server restarted): a new one next time.
                    *token = None;
                    return Ok(None);
                }
                (status, body) => return Err(format!("{path}: HTTP {status}: {body}")),
            }
        }
        Ok(None)
    }

    async fn gcp_once(&self) -> Result<Option<Notice>, String> {
        let asked = self
            .get(
                Method::GET,
                "computeMetadata/v1/instance/preempted",
                GCP_FLAVOR,
            )
            .await?;
        match asked {
            (StatusCode::OK, body) if body.trim() == "TRUE" => Ok(Some(Notice {
                kind: "preempted",
                detail: body.trim().to_owned(),
            })),
            (StatusCode::OK, body) if body.trim() == "FALSE" => Ok(None),
            (status, body) => Err(format!("instance/preempted: HTTP {status}: {body:?}")),
        }
    }

    /// Fetches this instance's identity proof (see [`crate::identity`]): AWS's signed
    /// identity document, or a GCP identity token (`format=full`) for `audience` (the mesh id).
    pub async fn identity(
        &self,
        audience: &str,
    ) -> Result<blendnet_proto::wire::IdentityProof, String> {
        use blendnet_proto::wire::IdentityProof;
        match self.cloud {
            Cloud::Aws => {
                let token = self.aws_token(60).await?;
                let mut parts = Vec::new();
                for part in ["document", "signature"] {
                    let asked = self
                        .get(
                            Method::GET,
                            &format!("latest/dynamic/instance-identity/{part}"),
                            (AWS_TOKEN_HEADER, &token),
                        )
                        .await?;
                    match asked {
                        (StatusCode::OK, body) => parts.push(body),
                        (status, body) => {
                            return Err(format!("instance-identity/{part}: HTTP {status}: {body}"));
                        }
                    }
                }
                let signature = parts.pop().unwrap_or_default();
                let document = parts.pop().unwrap_or_default();
                Ok(IdentityProof::Aws {
                    document,
                    signature,
                })
            }
            Cloud::Gcp => {
                let asked = self
                    .get(
                        Method::GET,
                        &format!(
                            "computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}&format=full"
                        ),
                        GCP_FLAVOR,
                    )
                    .await?;
                match asked {
                    (StatusCode::OK, token) => Ok(IdentityProof::Gcp {
                        token: token.trim().to_owned(),
                    }),
                    (status, body) => Err(format!("identity token: HTTP {status}: {body}")),
                }
            }
        }
    }

    /// A new IMDSv2 session token that lasts `ttl_secs`.
    async fn aws_token(&self, ttl_secs: u64) -> Result<String, String> {
        let ttl = ttl_secs.to_string();
        match self
            .get(
                Method::PUT,
                "latest/api/token",
                ("X-aws-ec2-metadata-token-ttl-seconds", &ttl),
            )
            .await?
        {
            (StatusCode::OK, token) => Ok(token.trim().to_owned()),
            (status, body) => Err(format!("IMDSv2 token: HTTP {status}: {body}")),
        }
    }

    /// Asks the metadata server for `path` (under its root) with one header.
    async fn get(
        &self,
        method: Method,
        path: &str,
        (name, value): (&str, &str),
    ) -> Result<(StatusCode, String), String> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}/{path}", self.root))
            .header(name, value)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        self.send(request).await
    }

    async fn send(&self, request: Request<Empty<Bytes>>) -> Result<(StatusCode, String), String> {
        let uri = request.uri().to_string();
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| format!("{uri}: no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{uri}: {e}"))?;
        let status = response.status();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| format!("{uri}: the body did not arrive within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{uri}: {e}"))?
            .to_bytes();
        // Notices and identity proofs are small; anything longer is not one.
        let limit = blendnet_proto::wire::MAX_PROOF_PART_BYTES;
        let body = String::from_utf8_lossy(&body[..body.len().min(limit)]).into_owned();
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::HeaderMap;
    use axum::routing::{get, put};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A metadata server with AWS's and GCP's routes, strict about their headers; `notice`
    /// turns on the interruption.
    async fn fake(notice: Arc<AtomicBool>, rebalance: bool) -> String {
        let n1 = notice.clone();
        let n2 = notice.clone();
        let app = Router::new()
            .route(
                "/latest/api/token",
                put(|headers: HeaderMap| async move {
                    match headers.get("X-aws-ec2-metadata-token-ttl-seconds") {
                        Some(_) => (StatusCode::OK, "tok-1".to_owned()),
                        None => (StatusCode::BAD_REQUEST, "no ttl".to_owned()),
                    }
                }),
            )
            .route(
                "/latest/meta-data/spot/instance-action",
                get(move |headers: HeaderMap| async move {
                    if headers
                        .get("X-aws-ec2-metadata-token")
                        .map(|v| v.as_bytes())
                        != Some(b"tok-1")
                    {
                        return (StatusCode::UNAUTHORIZED, String::new());
                    }
                    if n1.load(Ordering::SeqCst) {
                        (
                            StatusCode::OK,
                            r#"{"action":"terminate","time":"2026-11-26T12:00:00Z"}"#.to_owned(),
                        )
                    } else {
                        (StatusCode::NOT_FOUND, String::new())
                    }
                }),
            )
            .route(
                "/latest/meta-data/events/recommendations/rebalance",
                get(move || async move {
                    if rebalance {
                        (
                            StatusCode::OK,
                            r#"{"noticeTime":"2026-11-26T11:50:00Z"}"#.to_owned(),
                        )
                    } else {
                        (StatusCode::NOT_FOUND, String::new())
                    }
                }),
            )
            .route(
                "/computeMetadata/v1/instance/preempted",
                get(move |headers: HeaderMap| async move {
                    if headers.get("Metadata-Flavor").map(|v| v.as_bytes()) != Some(b"Google") {
                        return (StatusCode::FORBIDDEN, "missing Metadata-Flavor".to_owned());
                    }
                    let v = if n2.load(Ordering::SeqCst) {
                        "TRUE"
                    } else {
                        "FALSE"
                    };
                    (StatusCode::OK, v.to_owned())
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    async fn notice_after_flip(cloud: Cloud) -> (Notice, Duration) {
        let flag = Arc::new(AtomicBool::new(false));
        let root = fake(flag.clone(), false).await;
        let watcher = Watcher::at(cloud, &root);
        let watch = tokio::spawn(async move { watcher.notice(Duration::from_millis(50)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!watch.is_finished(), "a notice before there was one");
        let flipped = tokio::time::Instant::now();
        flag.store(true, Ordering::SeqCst);
        let notice = tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("no notice within 5 s")
            .unwrap();
        (notice, flipped.elapsed())
    }

    #[tokio::test]
    async fn an_aws_interruption_notice_is_seen_through_imdsv2() {
        let (notice, after) = notice_after_flip(Cloud::Aws).await;
        assert_eq!(notice.kind, "spot/instance-action");
        assert!(notice.detail.contains("terminate"), "{notice:?}");
        assert!(after < Duration::from_secs(1), "{after:?}");
    }

    #[tokio::test]
    async fn a_gcp_preemption_is_seen_with_the_metadata_flavor_header() {
        let (notice, after) = notice_after_flip(Cloud::Gcp).await;
        assert_eq!(notice.kind, "preempted");
        assert!(after < Duration::from_secs(1), "{after:?}");
    }

    #[tokio::test]
    async fn rebalance_advice_is_a_notice_and_an_unreachable_server_is_none() {
        let root = fake(Arc::new(AtomicBool::new(false)), true).await;
        let notice = tokio::time::timeout(
            Duration::from_secs(5),
            Watcher::at(Cloud::Aws, &root).notice(Duration::from_millis(50)),
        )
        .await
        .unwrap();
        assert_eq!(notice.kind, "rebalance");
        // Nothing listens here: no notice is made up from silence.
        let nowhere = Watcher::at(Cloud::Gcp, "http://127.0.0.1:9");
        assert!(
            tokio::time::timeout(
                Duration::from_millis(500),
                nowhere.notice(Duration::from_millis(50))
            )
            .await
            .is_err()
        );
        assert!("azure".parse::<Cloud>().unwrap_err().contains("azure"));
    }
}
