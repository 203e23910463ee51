//! The status page (issue 10): a page in the browser that watches the mesh, its jobs and its
//! cloud instances through the same local API the CLI uses.
//!
//! Access: `blendnet web` asks the daemon (with the API token) for a one-time login link. The
//! link, opened once within [`LOGIN_TTL`], sets the session cookie [`SESSION_COOKIE`]
//! (`HttpOnly`, `SameSite=Strict`) and redirects to the page. Every page and API call then
//! needs either that cookie or the API token; without them the answer is 401 (only the
//! stylesheet is open, for the refusal pages). A request made
//! with the cookie that changes something (any method but GET and HEAD) must also carry
//! `X-Requested-With: blendnet`, which no cross-site form can send.
//!
//! Where: the page is on the API address, which is loopback and plain HTTP. The `web` config
//! key serves the same page and API on another address (another machine's browser), always
//! over TLS with the node's web certificate: a self-signed ECDSA P-256 certificate made once
//! and kept in `<data dir>/web/` (`blendnet web` prints its SHA-256 fingerprint to compare
//! with what the browser shows).
//!
//! The page itself (`node/daemon/web/`) is plain HTML, CSS and JavaScript embedded in the
//! binary: no build step, nothing fetched from elsewhere.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::data_dir;

/// The cookie that holds a page session.
pub const SESSION_COOKIE: &str = "blendnet_session";
/// How long a login link stays usable.
pub const LOGIN_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a page session lasts (the daemon's restart ends it sooner).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);
/// Login links outstanding at once; the oldest is forgotten past it.
const MAX_LOGINS: usize = 32;
/// Page sessions at once; the oldest ends past it.
const MAX_SESSIONS: usize = 256;
/// The header (and its value) a cookie-authenticated change must carry.
pub const CSRF_HEADER: &str = "x-requested-with";
pub const CSRF_VALUE: &str = "blendnet";
/// TLS handshakes in progress at once on the `web` address; more connections wait in the
/// kernel's backlog.
const MAX_HANDSHAKES: usize = 64;
/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the page's responses share: no caching, no referrer (a login link's code must not
/// leak), nothing but this origin's scripts and styles, no framing.
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'self'";

/// The embedded page.
const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

/// Who may use the API and the page: the API token, and the sessions of the page.
#[derive(Debug)]
pub struct Auth {
    token: String,
    /// Login code → when it was made.
    logins: Mutex<HashMap<String, Instant>>,
    /// Session id → when it began.
    sessions: Mutex<HashMap<String, Instant>>,
    /// Where the page is, for the login links.
    places: Places,
}

/// The addresses the page is served on.
#[derive(Debug, Clone)]
pub struct Places {
    /// The API's own address (loopback, plain HTTP).
    pub local: SocketAddr,
    /// The `web` address (TLS), with the certificate's fingerprint.
    pub remote: Option<(SocketAddr, String)>,
}

/// What a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// The API token: anything goes.
    Token,
    /// A live page session.
    Session,
}

/// `POST /v1/web/login`: a one-time link to the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginView {
    /// The link on this machine (the API's loopback address).
    pub url: String,
    /// The same link on the `web` address over TLS, when one is configured.
    #[serde(default)]
    pub remote_url: Option<String>,
    /// SHA-256 of the `web` address's certificate, as browsers show it.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Seconds the link stays usable.
    pub expires_in_secs: u64,
}

fn random_hex() -> String {
    crate::api::new_token()
}

impl Auth {
    pub fn new(token: String, places: Places) -> Auth {
        Auth {
            token,
            logins: Mutex::default(),
            sessions: Mutex::default(),
            places,
        }
    }

    /// Makes a one-time login link.
    pub fn login(&self) -> LoginView {
        let code = random_hex();
        let now = Instant::now();
        insert_bounded(&self.logins, code.clone(), now, LOGIN_TTL, MAX_LOGINS);
        let path = format!("/login?code={code}");
        let remote = self.places.remote.as_ref();
        LoginView {
            url: format!("http://{}{path}", self.places.local),
            remote_url: remote.map(|(addr, _)| format!("https://{}{path}", link_host(*addr))),
            fingerprint: remote.map(|(_, f)| f.clone()),
            expires_in_secs: LOGIN_TTL.as_secs(),
        }
    }

    /// Spends a login code: a new session id if the code was live and unused.
    fn redeem(&self, code: &str) -> Option<String> {
        let now = Instant::now();
        let made = self
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(code)?;
        if now.duration_since(made) >= LOGIN_TTL {
            return None;
        }
        let session = random_hex();
        insert_bounded(
            &self.sessions,
            session.clone(),
            now,
            SESSION_TTL,
            MAX_SESSIONS,
        );
        Some(session)
    }

    /// Whether `headers` carry a live session cookie.
    fn has_session(&self, headers: &HeaderMap) -> bool {
        let now = Instant::now();
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        cookies(headers, SESSION_COOKIE).any(|id| {
            sessions.iter().any(|(s, began)| {
                crate::api::constant_time_eq(s.as_bytes(), id.as_bytes())
                    && now.duration_since(*began) < SESSION_TTL
            })
        })
    }

    /// What `headers` carry: `Ok(None)` for nothing, an error message for a wrong token.
    pub fn credential(&self, headers: &HeaderMap) -> Result<Option<Credential>, &'static str> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let given = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            return match given {
                None => Err("malformed Authorization header: expected `Bearer <token>`"),
                Some(given)
                    if crate::api::constant_time_eq(given.as_bytes(), self.token.as_bytes()) =>
                {
                    Ok(Some(Credential::Token))
                }
                Some(_) => Err(
                    "wrong API token; use the one in api.token in the daemon's data directory (it \
                     changes each time the daemon starts)",
                ),
            };
        }
        Ok(self.has_session(headers).then_some(Credential::Session))
    }
}

/// Adds `key` made at `now` to `map`, after forgetting the entries older than `ttl` and, at
/// `max` entries, the oldest.
fn insert_bounded(
    map: &Mutex<HashMap<String, Instant>>,
    key: String,
    now: Instant,
    ttl: Duration,
    max: usize,
) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.retain(|_, made| now.duration_since(*made) < ttl);
    if map.len() >= max
        && let Some(oldest) = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
    map.insert(key, now);
}

/// The host part of a link to `addr`: an unspecified address (`0.0.0.0`) becomes this
/// machine's host name.
fn link_host(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = sysinfo::System::host_name().unwrap_or_else(|| "localhost".into());
        format!("{host}:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// The values of cookie `name` in `headers`.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Headers every page response carries.
fn page_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    page_headers(&mut response);
    response
}

/// A small HTML page with a status, for refusals a person reads in the browser.
pub fn html_message(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>BlendNet: {title}</title>\
         <link rel=\"stylesheet\" href=\"/web/style.css\"></head>\
         <body class=\"message\"><main><h1>{title}</h1><p>{text}</p></main></body></html>"
    );
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    page_headers(&mut response);
    response
}

/// The refusal of a page asked for without a session.
pub fn login_required() -> Response {
    html_message(
        StatusCode::UNAUTHORIZED,
        "Log in first",
        "This page needs a login link: run <code>blendnet web</code> on the machine of the \
         daemon and open the link it prints.",
    )
}

/// `GET /`.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /web/{file}`: the page's script and style.
pub async fn file(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match name.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        _ => html_message(StatusCode::NOT_FOUND, "Not found", "No such file."),
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    code: String,
}

/// `GET /login?code=CODE`: spends the code, sets the session cookie, goes to the page.
pub async fn login(
    axum::extract::State(auth): axum::extract::State<Arc<Auth>>,
    over_tls: Option<axum::Extension<OverTls>>,
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let code = query.map(|q| q.0.code).unwrap_or_default();
    let Some(session) = auth.redeem(&code) else {
        return html_message(
            StatusCode::UNAUTHORIZED,
            "This login link does not work",
            "It was used already, or it is older than five minutes, or it was never made here. \
             Run <code>blendnet web</code> again for a new one.",
        );
    };
    // Over TLS (the `web` address) the cookie is sent back only over TLS.
    let secure = if over_tls.is_some() { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict{secure}");
    let mut response = (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/"),
            (header::SET_COOKIE, cookie.as_str()),
        ],
    )
        .into_response();
    page_headers(&mut response);
    response
}

/// Marks the requests that came over TLS (the `web` address).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// The node's web certificate and key, for the `web` address.
pub struct WebCert {
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    /// SHA-256 of the certificate, colon-separated hex pairs.
    pub fingerprint: String,
}

impl std::fmt::Debug for WebCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebCert")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl WebCert {
    /// Loads `<dir>/cert.pem` and `<dir>/key.pem`, or makes them: a self-signed certificate
    /// for `localhost`, the loopback addresses, this machine's host name and `addr`'s IP.
    pub fn load_or_create(dir: &Path, addr: SocketAddr) -> anyhow::Result<WebCert> {
        use anyhow::Context;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        if !cert_path.exists() || !key_path.exists() {
            let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
            if let Some(host) = sysinfo::System::host_name() {
                names.push(host);
            }
            if !addr.ip().is_unspecified() && !addr.ip().is_loopback() {
                names.push(addr.ip().to_string());
            }
            let key = rcgen::KeyPair::generate().context("making the web certificate's key")?;
            let mut params =
                rcgen::CertificateParams::new(names).context("naming the web certificate")?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "BlendNet node");
            let cert = params
                .self_signed(&key)
                .context("signing the web certificate")?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            data_dir::write_atomic(
                &key_path,
                key.serialize_pem().as_bytes(),
                data_dir::SECRET_MODE,
            )
            .with_context(|| format!("writing {}", key_path.display()))?;
            data_dir::write_atomic(&cert_path, cert.pem().as_bytes(), data_dir::PUBLIC_MODE)
                .with_context(|| format!("writing {}", cert_path.display()))?;
        }
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?;
        let Some(first) = chain.first() else {
            anyhow::bail!("{}: no certificate in it", cert_path.display());
        };
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, first.as_ref());
        let fingerprint = digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        Ok(WebCert {
            chain,
            key,
            fingerprint,
        })
    }
}

/// A TCP listener that hands axum TLS streams: handshakes run concurrently (bounded, each
/// with a timeout), so one slow client cannot hold up the others.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: JoinSet<Option<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("tcp", &self.tcp)
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    pub fn new(tcp: TcpListener, cert: WebCert) -> anyhow::Result<TlsListener> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(cert.chain, cert.key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshakes: JoinSet::new(),
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => {
                    match accepted {
                        Ok((stream, addr)) => {
                            let acceptor = self.acceptor.clone();
                            self.handshakes.spawn(async move {
                                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                    Ok(Ok(tls)) => Some((tls, addr)),
                                    Ok(Err(e)) => {
                                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                                        None
                                    }
                                    Err(_) => None,
                                }
                            });
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "accepting a web connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn places() -> Places {
        Places {
            local: "127.0.0.1:7742".parse().unwrap(),
            remote: None,
        }
    }

    #[test]
    fn a_login_code_older_than_its_lifetime_is_refused() {
        let auth = Auth::new("t".into(), places());
        let login = auth.login();
        let code = login.url.rsplit_once("code=").unwrap().1.to_owned();
        let made = Instant::now()
            .checked_sub(LOGIN_TTL + Duration::from_secs(1))
            .unwrap();
        auth.logins.lock().unwrap().insert(code.clone(), made);
        assert_eq!(auth.redeem(&code), None);
        // Spent: even a fresh copy of the same code is gone.
        assert_eq!(auth.redeem(&code), None);
    }

    #[test]
    fn a_session_older_than_its_lifetime_is_no_session() {
        let auth = Auth::new("t".into(), places());
        let login = auth.login();
        let code = login.url.rsplit_once("code=").unwrap().1;
        let session = auth.redeem(code).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            format!("a=b; {SESSION_COOKIE}={session}").parse().unwrap(),
        );
        assert_eq!(auth.credential(&headers), Ok(Some(Credential::Session)));
        let began = Instant::now()
            .checked_sub(SESSION_TTL + Duration::from_secs(1))
            .unwrap();
        auth.sessions.lock().unwrap().insert(session, began);
        assert_eq!(auth.credential(&headers), Ok(None));
    }

    #[test]
    fn login_links_outstanding_are_bounded() {
        let auth = Auth::new("t".into(), places());
        let first = auth.login();
        for _ in 0..MAX_LOGINS {
            auth.login();
        }
        assert_eq!(auth.logins.lock().unwrap().len(), MAX_LOGINS);
        let code = first.url.rsplit_once("code=").unwrap().1;
        assert_eq!(auth.redeem(code), None, "the oldest link was forgotten");
    }

    #[test]
    fn the_web_certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let made = WebCert::load_or_create(dir.path(), addr).unwrap();
        let again = WebCert::load_or_create(dir.path(), addr).unwrap();
        assert_eq!(made.fingerprint, again.fingerprint);
        assert_eq!(made.fingerprint.len(), 32 * 3 - 1);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
        std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
        let err = WebCert::load_or_create(dir.path(), addr).unwrap_err();
        assert!(err.to_string().contains("cert.pem"), "{err}");
    }
}
