//! A minimal W3C WebDriver client for driving headless Chromium from the end-to-end tests.
//!
//! What it owns: one `chromedriver` process on a free loopback port (killed and reaped on
//! drop) and one browser session in it (deleted on drop). It speaks plain HTTP/1.1 over a
//! `TcpStream`, one request per connection, JSON bodies, like the harness's own [`http_get`]:
//! no HTTP client dependency.
//!
//! What it promises: every request is bounded by [`WEBDRIVER_TIMEOUT`] (a slow, loaded
//! 2-core machine included); every failure is an error naming the command and WebDriver's own
//! message; a missing Chromium or chromedriver fails with the Debian packages to install,
//! never a silent skip.
//!
//! ```no_run
//! use blendnet_tests::webdriver::Browser;
//! let browser = Browser::start()?;
//! browser.goto("http://127.0.0.1:8080/")?;
//! let title = browser.text(&browser.find("h1")?)?;
//! let png = browser.screenshot()?;
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! [`http_get`]: crate::http_get

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

/// How long one WebDriver command may take. Generous: a navigation on a loaded 2-core machine
/// that also runs Blender and daemons can take many seconds, but never this long.
pub const WEBDRIVER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long chromedriver may take to answer its status as ready after it is started.
pub const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest response read from chromedriver: full-page screenshots are a few MiB of base64.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The Chromium the tests drive: `$BLENDNET_CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub const CHROMIUM_ENV: &str = "BLENDNET_CHROMIUM";

/// The chromedriver: `$BLENDNET_CHROMEDRIVER`, else Debian's `/usr/bin/chromedriver`.
pub const CHROMEDRIVER_ENV: &str = "BLENDNET_CHROMEDRIVER";

/// The window every session starts with: the size the screenshots in the docs are taken at.
pub const WINDOW: (u32, u32) = (1280, 900);

/// WebDriver's key for an element reference in JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An element of the current page, as WebDriver names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

/// A running chromedriver and one headless Chromium session in it.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    /// chromedriver's and Chromium's `TMPDIR`: Chromium's profile and sockets, which a killed
    /// Chromium leaves behind, go with it.
    _temp: tempfile::TempDir,
}

/// A binary from `env`, else `default`; an error naming the Debian package when neither exists.
fn binary(env: &str, default: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    ensure!(
        path.is_file(),
        "the browser tests drive headless Chromium, but {} is missing: install Debian's \
         `chromium` and `chromium-driver` packages (apt-get install chromium chromium-driver), or \
         set {env} to a {package}",
        path.display()
    );
    Ok(path)
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session ([`WINDOW`] sized, no sandbox, no
    /// GPU: what works in a container).
    pub fn start() -> Result<Browser> {
        let chromium = binary(CHROMIUM_ENV, "/usr/bin/chromium", "Chromium binary")?;
        let chromedriver = binary(
            CHROMEDRIVER_ENV,
            "/usr/bin/chromedriver",
            "chromedriver binary",
        )?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let temp = tempfile::Builder::new()
            .prefix("blendnet-chromium-")
            .tempdir()
            .context("cannot make Chromium's temporary folder")?;
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .env("TMPDIR", temp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", chromedriver.display()))?;
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            _temp: temp,
        };
        browser.wait_ready()?;
        let (w, h) = WINDOW;
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--no-first-run",
                            "--hide-scrollbars",
                            "--force-device-scale-factor=1",
                            format!("--window-size={w},{h}"),
                        ],
                    },
                },
            },
        });
        let value = browser
            .request("POST", "/session", Some(&capabilities))
            .context("cannot start a Chromium session")?;
        browser.session = value["sessionId"]
            .as_str()
            .context("chromedriver answered a new session without its id")?
            .to_owned();
        Ok(browser)
    }

    /// Waits until chromedriver answers `GET /status` with `ready: true`.
    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.driver.try_wait()? {
                bail!("chromedriver exited with {status} before it was ready");
            }
            if let Ok(value) = self.request("GET", "/status", None)
                && value["ready"] == true
            {
                return Ok(());
            }
            ensure!(
                start.elapsed() < DRIVER_START_TIMEOUT,
                "chromedriver on {} was not ready within {DRIVER_START_TIMEOUT:?}",
                self.addr
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `METHOD /session/{id}{path}` with an optional JSON body; WebDriver's `value`.
    fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        self.request(method, &format!("/session/{}{path}", self.session), body)
    }

    /// One WebDriver request; returns the response's `value`, or an error with WebDriver's
    /// error code and message.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let deadline = Instant::now() + WEBDRIVER_TIMEOUT;
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to chromedriver at {}", self.addr))?;
        stream.set_write_timeout(Some(WEBDRIVER_TIMEOUT))?;
        let body = body.map(Value::to_string);
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(body) = &body {
            request.push_str(&format!(
                "Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        if let Some(body) = &body {
            request.push_str(body);
        }
        stream
            .write_all(request.as_bytes())
            .with_context(|| format!("cannot send {method} {path} to chromedriver"))?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "chromedriver did not answer {method} {path} within {WEBDRIVER_TIMEOUT:?}"
            );
            stream.set_read_timeout(Some(left))?;
            let n = stream
                .read(&mut buf)
                .with_context(|| format!("reading chromedriver's answer to {method} {path}"))?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            ensure!(
                raw.len() <= MAX_RESPONSE_BYTES,
                "chromedriver's answer to {method} {path} exceeds {MAX_RESPONSE_BYTES} bytes"
            );
            // chromedriver keeps the connection open whatever `Connection: close` says: stop
            // at the end of the message.
            if is_complete(&raw) {
                break;
            }
        }
        let (status, body) = crate::parse_http(&raw)
            .with_context(|| format!("bad HTTP answer from chromedriver to {method} {path}"))?;
        let json: Value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "chromedriver answered {method} {path} with {status} and no JSON: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        let value = json.get("value").cloned().unwrap_or(Value::Null);
        if status != 200 {
            let error = value["error"].as_str().unwrap_or("unknown error");
            let message = value["message"].as_str().unwrap_or("");
            let message = message.lines().next().unwrap_or("");
            bail!("WebDriver {method} {path}: {status} {error}: {message}");
        }
        Ok(value)
    }

    /// Opens `url` and waits for its load event.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .with_context(|| format!("opening {url}"))?;
        Ok(())
    }

    /// The URL the browser shows now.
    pub fn url(&self) -> Result<String> {
        let value = self.command("GET", "/url", None)?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// The first element matching the CSS `selector`.
    pub fn find(&self, selector: &str) -> Result<Element> {
        let value = self
            .command(
                "POST",
                "/element",
                Some(&json!({ "using": "css selector", "value": selector })),
            )
            .with_context(|| format!("finding {selector:?}"))?;
        element(&value)
    }

    /// Every element matching the CSS `selector` (none is not an error).
    pub fn find_all(&self, selector: &str) -> Result<Vec<Element>> {
        let value = self
            .command(
                "POST",
                "/elements",
                Some(&json!({ "using": "css selector", "value": selector })),
            )
            .with_context(|| format!("finding {selector:?}"))?;
        value
            .as_array()
            .context("chromedriver's elements are not an array")?
            .iter()
            .map(element)
            .collect()
    }

    /// The rendered text of `element`.
    pub fn text(&self, element: &Element) -> Result<String> {
        let value = self.command("GET", &format!("/element/{}/text", element.0), None)?;
        Ok(value.as_str().unwrap_or_default().to_owned())
    }

    /// The attribute `name` of `element` (`data-…` included), if it has it.
    pub fn attribute(&self, element: &Element, name: &str) -> Result<Option<String>> {
        let value = self.command(
            "GET",
            &format!("/element/{}/attribute/{name}", element.0),
            None,
        )?;
        Ok(value.as_str().map(str::to_owned))
    }

    /// Clicks `element` as a user would (scrolled into view, at its center).
    pub fn click(&self, element: &Element) -> Result<()> {
        self.command(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(&json!({})),
        )?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub fn execute(&self, script: &str, args: &[Value]) -> Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
        .context("running a script in the page")
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let value = self.command("GET", "/screenshot", None)?;
        png(&value)
    }

    /// A PNG of `element` alone.
    pub fn element_screenshot(&self, element: &Element) -> Result<Vec<u8>> {
        let value = self.command("GET", &format!("/element/{}/screenshot", element.0), None)?;
        png(&value)
    }

    /// A PNG of the whole page, [`WINDOW`] wide and as tall as its content (at most
    /// `max_height`): the window is resized for the shot and back after.
    pub fn page_screenshot(&self, max_height: u32) -> Result<Vec<u8>> {
        let (w, h) = WINDOW;
        let content = self
            .execute(
                "return Math.ceil(document.documentElement.scrollHeight);",
                &[],
            )?
            .as_u64()
            .unwrap_or(u64::from(h));
        let inner = self
            .execute("return window.outerHeight - window.innerHeight;", &[])?
            .as_u64()
            .unwrap_or(0);
        let height = (content + inner).clamp(u64::from(h), u64::from(max_height));
        self.set_window_size(w, height as u32)?;
        let png = self.screenshot();
        self.set_window_size(w, h)?;
        png
    }

    /// Resizes the browser window.
    pub fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        self.command(
            "POST",
            "/window/rect",
            Some(&json!({ "width": width, "height": height })),
        )?;
        Ok(())
    }

    /// Calls `f` every `poll` until it returns `Ok`, for at most `timeout`: a wait for the page.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Browser) -> Result<T>,
    ) -> Result<T> {
        crate::eventually(timeout, Duration::from_millis(250), || f(self))
            .with_context(|| format!("waiting for {what} in the browser"))
    }

    /// Waits for an element matching `selector` and returns it.
    pub fn wait_for(&self, selector: &str, timeout: Duration) -> Result<Element> {
        self.wait(selector, timeout, |b| b.find(selector))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Best effort: the process is killed next whatever the answer.
            let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// An element reference from WebDriver's JSON.
fn element(value: &Value) -> Result<Element> {
    value[ELEMENT_KEY]
        .as_str()
        .map(|id| Element(id.to_owned()))
        .ok_or_else(|| anyhow!("not an element reference: {value}"))
}

/// Whether `raw` holds a whole HTTP/1.1 response: its headers and the body its
/// `Content-Length` or chunked encoding announces.
fn is_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    for line in head.split("\r\n") {
        if let Some(length) = line.strip_prefix("content-length:") {
            return length
                .trim()
                .parse::<usize>()
                .is_ok_and(|length| body.len() >= length);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            return body.ends_with(b"\r\n0\r\n\r\n") || body == b"0\r\n\r\n";
        }
    }
    false
}

/// A screenshot as WebDriver sends it: standard base64.
fn png(value: &Value) -> Result<Vec<u8>> {
    let text = value.as_str().context("the screenshot is not a string")?;
    data_encoding::BASE64
        .decode(text.as_bytes())
        .context("the screenshot is not base64")
}
