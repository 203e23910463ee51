//! The blocking client of the local HTTP API ([`crate::api`]), used by the CLI.
//!
//! [`Client::connect`] finds the daemon of a data directory through the files the daemon
//! publishes: `api.addr` (`IP:PORT`) and `api.token` (the bearer token, mode 0600). It does not
//! open a connection; each call does, with short timeouts, and a daemon that is not there
//! (no `api.addr`, or a stale one whose port refuses connections) is
//! [`ClientError::NotRunning`], which the CLI turns into "start one with `blendnet up`".
//!
//! Plain HTTP on loopback, so ureq runs without TLS and without any proxy from the environment.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    AdmitRequest, ErrorBody, FetchRequest, FetchView, InviteRequest, InviteView, JobRef, PeerRef,
    RevokeRequest, StatusView, StoreAddRequest, StoreAddView, StoreGcView, StoreGetRequest,
    StoreGetView, SubmitRequest,
};
use crate::data_dir::{self, DataDir, ReadSecretError};

/// How long to wait for the daemon to accept a connection. It is on this machine: it accepts at
/// once or not at all, and a CLI that hangs is worse than one that says why.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one whole call may take. The daemon answers from its actors' state; the slowest
/// calls (invite, admit) sign and store a certificate, well under this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on a request that waits for a transfer (`store get`): a day, so a stuck daemon still
/// ends the command; a progress bar shows the transfer is alive meanwhile.
pub const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Largest response body read. Peer lists are the largest answers, a few KiB per hundred peers.
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// Largest error body read; error messages are one line.
const MAX_ERROR_BYTES: u64 = 64 * 1024;

/// Largest `api.addr` read: one socket address and a newline.
const MAX_ADDR_FILE_BYTES: u64 = 256;

/// A client of one daemon's local API.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    addr: SocketAddr,
    authorization: String,
    data_dir: PathBuf,
}

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answers for this data directory.
    #[error("no blendnet daemon is running for data dir {data_dir}: start one with `blendnet up`")]
    NotRunning {
        /// The data directory.
        data_dir: PathBuf,
    },
    /// `api.addr` exists but does not hold a socket address.
    #[error("{path} does not hold an IP:PORT address: {reason}")]
    BadAddrFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `api.addr` could not be read.
    #[error("cannot read {path}")]
    ReadAddr {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// `api.token` is missing, unreadable or readable by others.
    #[error("cannot use the API token")]
    Token(#[source] ReadSecretError),
    /// The daemon answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's `error` message.
        message: String,
    },
    /// The daemon accepted the connection but did not answer in time.
    #[error("the blendnet daemon at {addr} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// The API address.
        addr: SocketAddr,
    },
    /// The connection failed in another way.
    #[error("cannot talk to the blendnet daemon at {addr}")]
    Transport {
        /// The API address.
        addr: SocketAddr,
        /// ureq's reason.
        source: Box<ureq::Error>,
    },
    /// The daemon's answer is not what this client expects (a daemon of another version?).
    #[error("unexpected answer from the blendnet daemon at {addr}")]
    Decode {
        /// The API address.
        addr: SocketAddr,
        /// ureq's or serde's reason.
        source: Box<ureq::Error>,
    },
}

impl Client {
    /// Finds the daemon of `data_dir` from its `api.addr` and `api.token`. Blocking (reads two
    /// small files); does not connect.
    pub fn connect(data_dir: &DataDir) -> Result<Self, ClientError> {
        let addr = read_addr(data_dir)?;
        let token = match data_dir::read_secret(&data_dir.api_token()) {
            Ok(bytes) => bytes,
            // The daemon writes the token before the address; a missing token next to an
            // address means the daemon is gone and left a stale address behind.
            Err(ReadSecretError::NotFound { .. }) => {
                return Err(ClientError::NotRunning {
                    data_dir: data_dir.path().to_owned(),
                });
            }
            Err(e) => return Err(ClientError::Token(e)),
        };
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Ok(Self {
            agent,
            addr,
            authorization: format!("Bearer {token}"),
            data_dir: data_dir.path().to_owned(),
        })
    }

    /// The daemon's API address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<StatusView, ClientError> {
        self.get("/v1/status")
    }

    /// `GET /v1/peers?pending=...`: a JSON array.
    pub fn peers(&self, pending: bool) -> Result<serde_json::Value, ClientError> {
        self.get(&format!("/v1/peers?pending={pending}"))
    }

    /// `POST /v1/invites`.
    pub fn invite(&self, req: &InviteRequest) -> Result<InviteView, ClientError> {
        self.post("/v1/invites", req)
    }

    /// `POST /v1/invites/bind`.
    pub fn bind_invite(&self, req: &crate::api::BindRequest) -> Result<InviteView, ClientError> {
        self.post("/v1/invites/bind", req)
    }

    /// `POST /v1/admit`.
    pub fn admit(&self, req: &AdmitRequest) -> Result<PeerRef, ClientError> {
        self.post("/v1/admit", req)
    }

    /// `POST /v1/revoke`.
    pub fn revoke(&self, req: &RevokeRequest) -> Result<PeerRef, ClientError> {
        self.post("/v1/revoke", req)
    }

    /// `POST /v1/store/add`.
    pub fn store_add(&self, req: &StoreAddRequest) -> Result<StoreAddView, ClientError> {
        self.post("/v1/store/add", req)
    }

    /// `POST /v1/store/get`: waits as long as the transfer takes (up to [`LONG_REQUEST_TIMEOUT`]).
    pub fn store_get(&self, req: &StoreGetRequest) -> Result<StoreGetView, ClientError> {
        self.post_long("/v1/store/get", req)
    }

    /// `GET /v1/store`: a JSON array.
    pub fn store_list(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/store")
    }

    /// `GET /v1/store/fetches`: a JSON array.
    pub fn store_fetches(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/store/fetches")
    }

    /// `POST /v1/store/gc`.
    pub fn store_gc(&self) -> Result<StoreGcView, ClientError> {
        self.post("/v1/store/gc", &serde_json::json!({}))
    }

    /// `GET /v1/jobs`.
    pub fn jobs(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/jobs")
    }

    /// `GET /v1/jobs/{id}`.
    pub fn job(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.get(&format!("/v1/jobs/{id}"))
    }

    /// `GET /v1/jobs/{id}/logs`.
    pub fn job_logs(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.get(&format!("/v1/jobs/{id}/logs"))
    }

    /// `POST /v1/jobs/{id}/fetch`: waits as long as the transfers take (up to
    /// [`LONG_REQUEST_TIMEOUT`]).
    pub fn job_fetch(&self, id: &str, req: &FetchRequest) -> Result<FetchView, ClientError> {
        self.post_long(&format!("/v1/jobs/{id}/fetch"), req)
    }

    /// `POST /v1/jobs`.
    pub fn submit(&self, req: &SubmitRequest) -> Result<JobRef, ClientError> {
        // Answers once a second peer holds the scene: as long as its transfer takes.
        self.post_long("/v1/jobs", req)
    }

    /// `POST /v1/cost`: answers after the daemon's probe render (seconds).
    pub fn cost(
        &self,
        req: &crate::api::CostRequest,
    ) -> Result<crate::cost_cmd::CostView, ClientError> {
        self.post_long("/v1/cost", req)
    }

    /// `POST /v1/web/login`.
    pub fn web_login(&self) -> Result<crate::web::LoginView, ClientError> {
        self.post("/v1/web/login", &serde_json::json!({}))
    }

    /// `DELETE /v1/jobs/{id}`.
    pub fn cancel(&self, id: &str) -> Result<JobRef, ClientError> {
        let response = self
            .agent
            .delete(self.url(&format!("/v1/jobs/{id}")))
            .header("Authorization", &self.authorization)
            .call();
        self.finish(response)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .agent
            .get(self.url(path))
            .header("Authorization", &self.authorization)
            .call();
        self.finish(response)
    }

    fn post<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let response = self
            .agent
            .post(self.url(path))
            .header("Authorization", &self.authorization)
            .send_json(body);
        self.finish(response)
    }

    /// A POST that may take as long as a transfer (up to [`LONG_REQUEST_TIMEOUT`]).
    fn post_long<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let response = self
            .agent
            .post(self.url(path))
            .config()
            .timeout_global(Some(LONG_REQUEST_TIMEOUT))
            .build()
            .header("Authorization", &self.authorization)
            .send_json(body);
        self.finish(response)
    }

    fn finish<T: DeserializeOwned>(
        &self,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = response.map_err(|e| self.transport(e))?;
        let status = response.status();
        if status.is_success() {
            return response
                .body_mut()
                .with_config()
                .limit(MAX_RESPONSE_BYTES)
                .read_json()
                .map_err(|e| ClientError::Decode {
                    addr: self.addr,
                    source: Box::new(e),
                });
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_BYTES)
            .lossy_utf8(true)
            .read_to_string()
            .unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => body.error,
            Err(_) if !text.trim().is_empty() => text.trim().to_owned(),
            Err(_) => status
                .canonical_reason()
                .unwrap_or("unknown error")
                .to_owned(),
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
        })
    }

    fn transport(&self, error: ureq::Error) -> ClientError {
        match error {
            ureq::Error::Io(ref e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning {
                    data_dir: self.data_dir.clone(),
                }
            }
            ureq::Error::ConnectionFailed => ClientError::NotRunning {
                data_dir: self.data_dir.clone(),
            },
            ureq::Error::Timeout(_) => ClientError::Timeout { addr: self.addr },
            error => ClientError::Transport {
                addr: self.addr,
                source: Box::new(error),
            },
        }
    }
}

fn read_addr(data_dir: &DataDir) -> Result<SocketAddr, ClientError> {
    let path = data_dir.api_addr();
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClientError::NotRunning {
                data_dir: data_dir.path().to_owned(),
            });
        }
        Err(source) => return Err(ClientError::ReadAddr { path, source }),
    };
    let mut text = String::new();
    if let Err(source) = file.take(MAX_ADDR_FILE_BYTES).read_to_string(&mut text) {
        return Err(ClientError::ReadAddr { path, source });
    }
    text.trim()
        .parse()
        .map_err(|e: std::net::AddrParseError| ClientError::BadAddrFile {
            path,
            reason: format!("{:?}: {e}", text.trim()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{self, fake};

    const TOKEN: &str = "feedfacecafebeef";

    /// A fake daemon: the API server with a canned backend on its own runtime, published in a
    /// fresh data directory.
    struct Daemon {
        _tmp: tempfile::TempDir,
        dir: DataDir,
        _stop: tokio::sync::oneshot::Sender<()>,
        _runtime: tokio::runtime::Runtime,
    }

    impl Daemon {
        fn start(published_token: &str) -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let dir = DataDir::open(tmp.path().join("node")).unwrap();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let (addr, stop, _task) = runtime.block_on(fake::spawn(TOKEN));
            api::publish(&dir, addr, published_token).unwrap();
            Self {
                _tmp: tmp,
                dir,
                _stop: stop,
                _runtime: runtime,
            }
        }
    }

    #[test]
    fn calls_reach_the_backend() {
        let daemon = Daemon::start(TOKEN);
        let client = Client::connect(&daemon.dir).unwrap();

        let status = client.status().unwrap();
        assert_eq!(status.peer_id, "12D3KooWFake");
        assert_eq!(status.roles, ["submit", "render"]);

        assert_eq!(client.peers(true).unwrap()[0]["pending"], true);
        assert_eq!(client.peers(false).unwrap()[0]["pending"], false);

        let invite = client
            .invite(&InviteRequest {
                ttl_secs: 600,
                roles: vec!["render".into()],
                cert_lifetime_secs: None,
                instance: None,
            })
            .unwrap();
        assert_eq!(invite.code, "code:render");
        assert_eq!(invite.expires_at, 1_600);

        let admitted = client
            .admit(&AdmitRequest {
                fingerprint: "ABCD".into(),
            })
            .unwrap();
        assert_eq!(admitted.peer_id, "peer-ABCD");

        let revoked = client
            .revoke(&RevokeRequest {
                peer: "12D3KooWX".into(),
            })
            .unwrap();
        assert_eq!(revoked.peer_id, "12D3KooWX");
    }

    #[test]
    fn server_errors_carry_status_and_message() {
        let daemon = Daemon::start(TOKEN);
        let client = Client::connect(&daemon.dir).unwrap();
        let err = client
            .admit(&AdmitRequest {
                fingerprint: "member".into(),
            })
            .unwrap_err();
        match err {
            ClientError::Api { status, message } => {
                assert_eq!(status, 409);
                assert_eq!(message, "already a member");
            }
            other => panic!("expected Api error, got {other:?}"),
        }
    }

    #[test]
    fn wrong_token_is_401() {
        let daemon = Daemon::start("not-the-token");
        let client = Client::connect(&daemon.dir).unwrap();
        let err = client.status().unwrap_err();
        assert!(
            matches!(err, ClientError::Api { status: 401, ref message } if message.contains("wrong")),
            "{err:?}"
        );
    }

    #[test]
    fn no_addr_file_is_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let err = Client::connect(&dir).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("blendnet up"), "{msg}");
    }

    #[test]
    fn stale_addr_file_is_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        // A port that was free a moment ago and has no listener now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        api::publish(&dir, addr, TOKEN).unwrap();
        let client = Client::connect(&dir).unwrap();
        let err = client.status().unwrap_err();
        assert!(
            matches!(err, ClientError::NotRunning { ref data_dir } if data_dir == dir.path()),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_addr_file_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::write(dir.api_addr(), "localhost\n").unwrap();
        let err = Client::connect(&dir).unwrap_err();
        assert!(matches!(err, ClientError::BadAddrFile { .. }), "{err:?}");
        assert!(err.to_string().contains("api.addr"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn readable_token_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        api::publish(&dir, "127.0.0.1:1".parse().unwrap(), TOKEN).unwrap();
        std::fs::set_permissions(dir.api_token(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Client::connect(&dir).unwrap_err();
        assert!(
            matches!(err, ClientError::Token(ReadSecretError::TooOpen { .. })),
            "{err:?}"
        );
    }
}
