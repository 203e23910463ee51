//! Harness for the end-to-end tests: real `blendnet` daemons on loopback.
//!
//! What it owns: one temporary directory per [`Node`], holding the node's data dir
//! (`<root>/data`, exactly what the daemon sees) and, beside it, the captured stdout and
//! stderr of every `blendnet up` the node ran (`<root>/up.stdout`, `<root>/up.stderr`, appended
//! run after run with a banner line). The data dir therefore holds nothing the daemon did not
//! write itself, and the capture files survive restarts.
//!
//! What it promises:
//! - every wait is bounded: starting, stopping, CLI commands, HTTP requests and polling loops all
//!   take a timeout and fail with a message saying what was awaited;
//! - nothing is unwrapped: failures are `anyhow` errors with context naming the node and command;
//! - when a test fails, the last [`LOG_TAIL_LINES`] lines of each node's stderr are printed, so a CI
//!   log shows why. A node dropped while the thread panics prints its tail at once; a test that
//!   returns an error should run under [`e2e`], which prints the tails of the nodes its body
//!   dropped before reporting the error;
//! - a dropped node's daemon is killed (SIGKILL) and reaped, and its directory removed (kept and
//!   printed instead when `BLENDNET_KEEP_TMP` is set).
//!
//! The binary under test is `$BLENDNET_BIN` if set, else `target/debug/blendnet` next to the test
//! executable. Cargo does not build another package's binary for a test, so the harness runs
//! `cargo build --workspace --bins` once per test process first (a no-op when it is fresh).
//!
//! Typical use:
//!
//! ```no_run
//! use blendnet_tests::{e2e, Node};
//! e2e(|| {
//!     let (mut a, _mesh_id) = Node::init("a")?;
//!     a.up(&[])?;
//!     let peers = a.peers()?;
//!     a.stop()?;
//!     Ok(())
//! });
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use tempfile::TempDir;

pub mod webdriver;

/// How long a daemon may take from spawn to a working API. Generous because a debug build on a
/// loaded 2-core CI machine, with other tests' daemons running, can be slow to start.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a daemon may take to exit after SIGTERM. The contract says "a few seconds".
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a daemon may take to exit after SIGKILL (only the kernel is involved).
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one CLI command (`init`, `invite`, `peers`, ...) may run before it is killed.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Connect, write and whole-response limit for one raw HTTP request to a daemon's API.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest HTTP response read from a daemon's API; the API answers small JSON documents.
pub const HTTP_MAX_BYTES: usize = 4 << 20;

/// How often [`Node::wait_api`] and [`Node::wait_exit`] look at the daemon.
pub const WAIT_POLL: Duration = Duration::from_millis(100);

/// How many lines of a daemon's stderr are printed when a test fails: enough to see the last
/// lifecycle events and the error, few enough to keep a CI log readable.
pub const LOG_TAIL_LINES: usize = 80;

/// Environment variable that overrides the path of the binary under test.
pub const BIN_ENV: &str = "BLENDNET_BIN";

/// Environment variable that, when set, keeps every node's temporary directory.
pub const KEEP_TMP_ENV: &str = "BLENDNET_KEEP_TMP";

/// How the harness's line in a capture file starts, before each run of `up`.
const BANNER_START: &str = "===== harness: ";

/// The daemon reads its data dir from this variable; the harness removes it from the
/// environment of every command so that only the explicit `--data-dir` counts.
const DATA_DIR_ENV: &str = "BLENDNET_DATA_DIR";

thread_local! {
    /// Log reports of nodes dropped on this thread while it was not panicking; [`e2e`] prints
    /// them if its body returns an error. One test runs on one thread, so this is per test.
    static DROPPED_REPORTS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Builds `blendnet` once per test process with the Cargo that runs the tests (`$CARGO`), so an
/// end-to-end test never runs a binary older than the source: `cargo test` alone does not
/// build another package's binaries. Without `$CARGO` (a test executable run by hand) it
/// builds nothing.
fn build_once() -> Result<()> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let Some(cargo) = std::env::var_os("CARGO") else {
            return Ok(());
        };
        let workspace = workspace().map_err(|e| e.to_string())?;
        let out = Command::new(cargo)
            .args(["build", "--quiet", "--workspace", "--bins"])
            .current_dir(&workspace)
            .output()
            .map_err(|e| format!("cannot run cargo to build blendnet: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`cargo build --workspace --bins` failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    result.clone().map_err(|e| anyhow::anyhow!(e))
}

/// The repository's root (the workspace this tests crate belongs to).
pub fn workspace() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("the tests crate has no parent directory")
}

/// Runs `shellcheck` on `file`; fails on any finding, or when shellcheck is missing.
pub fn shellcheck(file: &Path) -> Result<()> {
    // Seconds at most, even on a loaded 2-core machine.
    const SHELLCHECK_TIMEOUT: Duration = Duration::from_secs(60);
    let out = run_bounded(Command::new("shellcheck").arg(file), SHELLCHECK_TIMEOUT).with_context(
        || "cannot run shellcheck: install it (`apt-get install shellcheck`; .ci/run installs it)",
    )?;
    ensure!(
        out.status.success(),
        "shellcheck {} found problems:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Finds the `blendnet` binary: `$BLENDNET_BIN`, else `blendnet` in the Cargo profile directory
/// of the running test executable (`target/debug/deps/mesh-…` → `target/debug/blendnet`).
pub fn blendnet_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(BIN_ENV) {
        let bin = PathBuf::from(bin);
        ensure!(
            bin.is_file(),
            "{BIN_ENV}={} is not a file; unset it or point it at a built `blendnet`",
            bin.display()
        );
        return Ok(bin);
    }
    build_once()?;
    let exe = std::env::current_exe().context("cannot find the test executable's path")?;
    let deps = exe
        .parent()
        .with_context(|| format!("test executable {} has no parent", exe.display()))?;
    // Integration tests live in `<profile>/deps/`; be tolerant of being run from `<profile>/`.
    let profile = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    let bin = profile.join(format!("blendnet{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        bin.is_file(),
        "the blendnet binary is missing at {}: run `cargo build --workspace --bins` first \
         (or set {BIN_ENV} to a built binary)",
        bin.display()
    );
    Ok(bin)
}

/// Runs `body` as an end-to-end test: on error, prints the log tails of the nodes the body
/// dropped, then panics with the error and its chain of causes.
///
/// Tests written as `#[test] fn t() { e2e(|| { ...; Ok(()) }) }` get their daemons' logs in the
/// failure report whether they fail by `?` or by a panic.
#[track_caller]
pub fn e2e(body: impl FnOnce() -> Result<()>) {
    DROPPED_REPORTS.with(|r| r.borrow_mut().clear());
    let result = body();
    let reports = DROPPED_REPORTS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    if let Err(err) = result {
        for report in reports {
            eprintln!("{report}");
        }
        // The chain of causes, one per line; not `{err:?}`, which would add anyhow's backtrace
        // (captured under RUST_BACKTRACE=1) to the panic's own.
        let mut message = format!("end-to-end test failed: {err}");
        for cause in err.chain().skip(1) {
            message.push_str(&format!("\n  caused by: {cause}"));
        }
        panic!("{message}");
    }
}

/// Calls `f` every `poll` until it returns `Ok`, for at most `timeout` (at least one call).
/// On timeout, returns the last error, with context saying how long it was tried.
pub fn eventually<T>(
    timeout: Duration,
    poll: Duration,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match f() {
            Ok(value) => return Ok(value),
            Err(err) => {
                if start.elapsed() >= timeout {
                    return Err(err.context(format!(
                        "still failing after {:.1?} ({attempts} attempts, limit {timeout:?})",
                        start.elapsed()
                    )));
                }
            }
        }
        thread::sleep(poll.min(timeout.saturating_sub(start.elapsed())));
    }
}

/// Calls `f` every `poll` for `duration` and fails at the first error: checks that something
/// stays true (e.g. "a foreign peer is never listed") rather than becomes true.
pub fn always_for(
    duration: Duration,
    poll: Duration,
    mut f: impl FnMut() -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        f().with_context(|| format!("broke after {:.1?} of {duration:?}", start.elapsed()))?;
        if start.elapsed() >= duration {
            return Ok(());
        }
        thread::sleep(poll.min(duration.saturating_sub(start.elapsed())));
    }
}

/// Runs `cmd` with stdin closed and stdout/stderr captured, killing it after `timeout`.
///
/// Output goes to anonymous temporary files rather than pipes, so a grandchild that keeps a pipe
/// open cannot make this wait forever.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut stdout = tempfile::tempfile().context("cannot create a temporary file for stdout")?;
    let mut stderr = tempfile::tempfile().context("cannot create a temporary file for stderr")?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().context("cannot clone the stdout file")?)
        .stderr(stderr.try_clone().context("cannot clone the stderr file")?)
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let status = wait_timeout(&mut child, timeout)?;
    let status = match status {
        Some(status) => status,
        None => {
            // Kill and reap; the error below is what matters, not a failure to kill.
            let _ = child.kill();
            let _ = wait_timeout(&mut child, KILL_TIMEOUT);
            let err = read_all(&mut stderr).unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {timeout:?} and was killed; its stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
    };
    Ok(Output {
        status,
        stdout: read_all(&mut stdout).context("cannot read the captured stdout")?,
        stderr: read_all(&mut stderr).context("cannot read the captured stderr")?,
    })
}

fn read_all(file: &mut File) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Polls `child` until it exits or `timeout` passes; `None` means it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("cannot poll a child process")? {
            return Ok(Some(status));
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` (a name such as `TERM`) to `pid` with the shell's `kill` builtin, which every
/// Debian machine has (`/bin/kill` comes from procps, which minimal images lack).
fn send_signal(signal: &str, pid: u32) -> Result<()> {
    let out = run_bounded(
        Command::new("sh").args([
            "-c",
            "kill -s \"$1\" \"$2\"",
            "sh",
            signal,
            &pid.to_string(),
        ]),
        CLI_TIMEOUT,
    )?;
    ensure!(
        out.status.success(),
        "kill -s {signal} {pid} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// One `blendnet` node: a temporary data dir and, while it runs, the `blendnet up` process.
#[derive(Debug)]
pub struct Node {
    /// Short name used in messages ("a", "b", ...).
    name: String,
    /// Temporary root: `data/` plus the captured output of `up`.
    root: TempDir,
    /// `<root>/data`, passed as `--data-dir`.
    data: PathBuf,
    /// The running `blendnet up`, if any.
    child: Option<Child>,
    /// The arguments after `up --data-dir DIR` of the last start, for [`Node::restart`].
    up_args: Vec<String>,
    /// How many times `up` was started, for the banner in the capture files.
    runs: u32,
    /// Environment variables the daemon is started with, beyond the test's own.
    env: Vec<(String, String)>,
}

impl Node {
    /// Creates a node with a fresh, empty data dir. Nothing runs yet.
    pub fn new(name: &str) -> Result<Node> {
        let root = tempfile::Builder::new()
            .prefix(&format!("blendnet-e2e-{name}-"))
            .tempdir()
            .context("cannot create a temporary directory")?;
        let data = root.path().join("data");
        fs::create_dir(&data).with_context(|| format!("cannot create {}", data.display()))?;
        Ok(Node {
            name: name.to_owned(),
            root,
            data,
            child: None,
            up_args: Vec::new(),
            runs: 0,
            env: Vec::new(),
        })
    }

    /// Creates a node and runs `blendnet init` in it; returns the node and the mesh id (the last
    /// line `init` printed).
    pub fn init(name: &str) -> Result<(Node, String)> {
        let node = Node::new(name)?;
        let out = node.cli_ok(&["init"])?;
        let mesh_id = out
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .with_context(|| format!("node {name}: `blendnet init` printed no mesh id"))?
            .to_owned();
        Ok((node, mesh_id))
    }

    /// Sets an environment variable for the daemons this node starts from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// The node's name, as used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The data dir the daemon and the CLI are pointed at.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Where the captured stderr of `up` is appended.
    pub fn stderr_path(&self) -> PathBuf {
        self.root.path().join("up.stderr")
    }

    /// Where the captured stdout of `up` is appended.
    pub fn stdout_path(&self) -> PathBuf {
        self.root.path().join("up.stdout")
    }

    /// The arguments every test daemon gets: free loopback ports and no multicast.
    pub fn default_up_args() -> Vec<String> {
        [
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
            "--no-mdns",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Starts `blendnet up` with [`Node::default_up_args`] plus `extra`; does not wait for it.
    pub fn start(&mut self, extra: &[&str]) -> Result<()> {
        let mut args = Node::default_up_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        self.start_raw(&args)
    }

    /// Starts `blendnet up --data-dir DIR` followed by exactly `args`; does not wait for it.
    pub fn start_raw<S: AsRef<str>>(&mut self, args: &[S]) -> Result<()> {
        self.start_command("up", args)
    }

    /// Starts `blendnet COMMAND --data-dir DIR` followed by exactly `args` (a command that runs
    /// the daemon: `up`, `enroll`); does not wait for it.
    pub fn start_command<S: AsRef<str>>(&mut self, command: &str, args: &[S]) -> Result<()> {
        if let Some(child) = &self.child {
            bail!("node {}: already running as pid {}", self.name, child.id());
        }
        let args: Vec<String> = args.iter().map(|s| s.as_ref().to_owned()).collect();
        self.runs += 1;
        let banner = format!(
            "{BANNER_START}node {} run #{} at unix {}: blendnet {command} --data-dir {} {} =====\n",
            self.name,
            self.runs,
            unix_now(),
            self.data.display(),
            args.join(" ")
        );
        let stdout = append_with_banner(&self.stdout_path(), &banner)?;
        let stderr = append_with_banner(&self.stderr_path(), &banner)?;
        let bin = blendnet_bin()?;
        let child = Command::new(&bin)
            .arg(command)
            .arg("--data-dir")
            .arg(&self.data)
            .args(&args)
            .env_remove(DATA_DIR_ENV)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "node {}: cannot spawn {} {command}",
                    self.name,
                    bin.display()
                )
            })?;
        self.child = Some(child);
        self.up_args = args;
        Ok(())
    }

    /// [`Node::start`] then [`Node::wait_api`] with [`API_TIMEOUT`].
    pub fn up(&mut self, extra: &[&str]) -> Result<SocketAddr> {
        self.start(extra)?;
        self.wait_api(API_TIMEOUT)
    }

    /// Waits until the daemon's API answers `GET /v1/status` with 200 using the address in
    /// `api.addr` and the token in `api.token`; returns the address.
    ///
    /// Checking with a real request (not just the file's presence) makes a stale `api.addr`
    /// left by a killed daemon harmless. Fails early, with the log tail, if the daemon exits.
    pub fn wait_api(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let start = Instant::now();
        let mut last = String::from("api.addr not written yet");
        loop {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "node {}: `blendnet up` exited with {status} before its API was ready \
                     (waiting for: {last})",
                    self.name,
                );
            }
            match self.probe_api() {
                Ok(addr) => return Ok(addr),
                Err(err) => last = format!("{err:#}"),
            }
            if start.elapsed() >= timeout {
                bail!(
                    "node {}: API not ready after {timeout:?}: {last}",
                    self.name,
                );
            }
            thread::sleep(WAIT_POLL);
        }
    }

    fn probe_api(&self) -> Result<SocketAddr> {
        let addr = self.api_addr()?;
        let token = self.api_token()?;
        let resp = http_get(addr, "/v1/status", Some(&token))?;
        ensure!(
            resp.status == 200,
            "GET /v1/status on {addr} answered {}: {}",
            resp.status,
            resp.body
        );
        Ok(addr)
    }

    /// The address in `<data-dir>/api.addr`.
    pub fn api_addr(&self) -> Result<SocketAddr> {
        let path = self.data.join("api.addr");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} holds {text:?}, not HOST:PORT", path.display()))
    }

    /// The bearer token in `<data-dir>/api.token`.
    pub fn api_token(&self) -> Result<String> {
        let path = self.data.join("api.token");
        let token = fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned();
        ensure!(!token.is_empty(), "{} is empty", path.display());
        Ok(token)
    }

    /// `GET path` on the node's API, with `Authorization: Bearer <token>` when `token` is given.
    pub fn api_get(&self, path: &str, token: Option<&str>) -> Result<HttpResponse> {
        http_get(self.api_addr()?, path, token)
            .with_context(|| format!("node {}: GET {path}", self.name))
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether `blendnet up` is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.child.is_some() && self.try_exit_status()?.is_none())
    }

    /// The exit status if the daemon exited; the child is kept so the status can be read again.
    fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("node {}: cannot poll the daemon", self.name)),
            None => bail!("node {}: not started", self.name),
        }
    }

    /// Waits at most `timeout` for the daemon to exit by itself; returns its exit status.
    /// Used where `up` is expected to fail (refused invite, bad config).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.name.clone();
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("node {name}: not started"))?;
        match wait_timeout(child, timeout)? {
            Some(status) => {
                self.child = None;
                Ok(status)
            }
            None => bail!(
                "node {name}: `blendnet up` still running after {timeout:?}, expected it to exit",
            ),
        }
    }

    /// Stops the daemon as a user would: SIGTERM, then waits at most [`STOP_TIMEOUT`] and checks
    /// that it exited with status 0. A daemon that does not exit in time is killed, and that is
    /// an error.
    pub fn stop(&mut self) -> Result<()> {
        let name = self.name.clone();
        let mut child = self
            .child
            .take()
            .with_context(|| format!("node {name}: stop() but not running"))?;
        if let Some(status) = child.try_wait()? {
            bail!("node {name}: daemon had already exited with {status} before stop()",);
        }
        send_signal("TERM", child.id()).with_context(|| format!("node {name}: SIGTERM"))?;
        match wait_timeout(&mut child, STOP_TIMEOUT)? {
            Some(status) if status.success() => Ok(()),
            Some(status) => {
                bail!("node {name}: daemon exited with {status} after SIGTERM, expected 0",)
            }
            None => {
                let _ = child.kill();
                let _ = wait_timeout(&mut child, KILL_TIMEOUT);
                bail!("node {name}: daemon still running {STOP_TIMEOUT:?} after SIGTERM; killed it",)
            }
        }
    }

    /// Kills the daemon with SIGKILL (a crash, a power cut) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        let name = self.name.clone();
        let mut child = self
            .child
            .take()
            .with_context(|| format!("node {name}: kill() but not running"))?;
        child
            .kill()
            .with_context(|| format!("node {name}: SIGKILL"))?;
        wait_timeout(&mut child, KILL_TIMEOUT)?.with_context(|| {
            format!("node {name}: still running {KILL_TIMEOUT:?} after SIGKILL")
        })?;
        Ok(())
    }

    /// [`Node::stop`], then starts again with the same arguments and waits for the API.
    pub fn restart(&mut self) -> Result<SocketAddr> {
        self.stop()?;
        let args = self.up_args.clone();
        self.start_raw(&args)?;
        self.wait_api(API_TIMEOUT)
    }

    /// Starts `up` again with the arguments of the last start, after the daemon died or was
    /// killed, and waits for its API.
    pub fn start_again(&mut self) -> Result<SocketAddr> {
        let args = self.up_args.clone();
        self.start_raw(&args)?;
        self.wait_api(API_TIMEOUT)
    }

    /// Runs `blendnet <args[0]> --data-dir DIR <args[1..]>` (bounded by [`CLI_TIMEOUT`]),
    /// whatever its exit status.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        run_bounded(&mut self.cli_command(args)?, CLI_TIMEOUT)
            .with_context(|| format!("node {}: blendnet {}", self.name, args.join(" ")))
    }

    /// The command [`Node::cli`] runs, for callers that spawn it themselves (in the
    /// background, or with another bound).
    pub fn cli_command(&self, args: &[&str]) -> Result<Command> {
        let (sub, rest) = args
            .split_first()
            .with_context(|| format!("node {}: cli_command() needs a subcommand", self.name))?;
        let mut cmd = Command::new(blendnet_bin()?);
        cmd.arg(sub)
            .arg("--data-dir")
            .arg(&self.data)
            .args(rest)
            .env_remove(DATA_DIR_ENV);
        Ok(cmd)
    }

    /// Runs a CLI command that must succeed within `timeout`; returns its stdout.
    pub fn cli_ok_within(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let out = run_bounded(&mut self.cli_command(args)?, timeout)
            .with_context(|| format!("node {}: blendnet {}", self.name, args.join(" ")))?;
        ensure!(
            out.status.success(),
            "node {}: `blendnet {}` failed with {}: {}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        ensure!(
            out.status.success(),
            "node {}: `blendnet {}` failed with {}\nstderr:\n{}\nstdout:\n{}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end(),
        );
        String::from_utf8(out.stdout)
            .with_context(|| format!("node {}: `blendnet {}` stdout", self.name, args.join(" ")))
    }

    /// Runs a CLI command that must fail with an `error: ` line on stderr; returns its stderr.
    pub fn cli_err(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            !out.status.success(),
            "node {}: `blendnet {}` succeeded, expected a failure\nstdout:\n{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim_end(),
        );
        ensure!(
            has_error_line(&stderr),
            "node {}: `blendnet {}` failed without an `error: ` line on stderr:\n{stderr}",
            self.name,
            args.join(" "),
        );
        Ok(stderr)
    }

    /// `blendnet <args>`, which must succeed and print JSON.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let out = self.cli_ok(args)?;
        serde_json::from_str(&out).with_context(|| {
            format!(
                "node {}: `blendnet {}` printed invalid JSON:\n{out}",
                self.name,
                args.join(" ")
            )
        })
    }

    /// `blendnet status --json`, checked against the contract's fields.
    pub fn status(&self) -> Result<Value> {
        let status = self.cli_json(&["status", "--json"])?;
        check_status_fields(&status).with_context(|| format!("node {}: status", self.name))?;
        Ok(status)
    }

    /// `blendnet peers --json`, checked against the contract's fields.
    pub fn peers(&self) -> Result<Value> {
        let peers = self.cli_json(&["peers", "--json"])?;
        check_peers_fields(&peers).with_context(|| format!("node {}: peers", self.name))?;
        Ok(peers)
    }

    /// This node's peer id, from `status --json`.
    pub fn peer_id(&self) -> Result<String> {
        str_field(&self.status()?, "peer_id").map(str::to_owned)
    }

    /// Whether `status --json` says the node is a mesh member.
    pub fn is_member(&self) -> Result<bool> {
        bool_field(&self.status()?, "member")
    }

    /// An address other daemons can pass to `--bootstrap`: the first loopback entry of
    /// `listen_addrs` (the first entry if none is loopback); it must end in `/p2p/<peer id>`.
    pub fn bootstrap_addr(&self) -> Result<String> {
        let status = self.status()?;
        let addrs = string_array(&status, "listen_addrs")?;
        let addr = addrs
            .iter()
            .find(|a| a.starts_with("/ip4/127.0.0.1/"))
            .or_else(|| addrs.first())
            .with_context(|| format!("node {}: status has no listen_addrs", self.name))?;
        ensure!(
            addr.contains("/p2p/"),
            "node {}: listen address {addr} lacks /p2p/<peer id>",
            self.name
        );
        Ok(addr.clone())
    }

    /// `blendnet invite <args>`; returns the code (stdout, which must be the code alone).
    pub fn invite(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["invite"];
        full.extend_from_slice(args);
        let out = self.cli_ok(&full)?;
        let code = out.trim();
        ensure!(
            !code.is_empty() && !code.contains(char::is_whitespace),
            "node {}: `blendnet {}` printed {out:?}, expected the code alone",
            self.name,
            full.join(" ")
        );
        Ok(code.to_owned())
    }

    /// What the latest run of `blendnet up` wrote to stderr so far (without the harness banner).
    pub fn stderr(&self) -> Result<String> {
        let all = self.all_stderr()?;
        let start = all
            .rfind(BANNER_START)
            .and_then(|at| all[at..].find('\n').map(|eol| at + eol + 1))
            .unwrap_or(0);
        Ok(all[start..].to_owned())
    }

    /// Everything every run of `blendnet up` wrote to stderr, with the harness banners.
    fn all_stderr(&self) -> Result<String> {
        let path = self.stderr_path();
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The last `lines` lines of the daemon's stderr, framed for a test log.
    pub fn log_tail(&self, lines: usize) -> String {
        if self.runs == 0 {
            return format!(
                "----- node {} ({}): `up` never ran -----",
                self.name,
                self.data.display()
            );
        }
        let text = match self.all_stderr() {
            Ok(text) => text,
            Err(err) => return format!("--- node {}: no stderr captured: {err:#} ---", self.name),
        };
        let all: Vec<&str> = text.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        format!(
            "----- node {} ({}): last {} of {} stderr lines -----\n{}\n----- end of node {} -----",
            self.name,
            self.data.display(),
            tail.len(),
            all.len(),
            tail.join("\n"),
            self.name
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, KILL_TIMEOUT);
        }
        kill_strays(self.root.path());
        let mut report = self.log_tail(LOG_TAIL_LINES);
        if std::env::var_os(KEEP_TMP_ENV).is_some() {
            self.root.disable_cleanup(true);
            report.push_str(&format!("\n(kept {})", self.root.path().display()));
        }
        if thread::panicking() {
            eprintln!("{report}");
        } else {
            DROPPED_REPORTS.with(|r| r.borrow_mut().push(report));
        }
    }
}

/// Kills what a killed daemon left running under `root`: its Blender processes, and the
/// daemons of the local cloud instances it started (their command lines name paths under
/// `root`, or their environments do: the `TMPDIR` each Blender gets). Without this, a failed
/// test leaves them rendering, slowing every later test, and a start-up probe outliving its
/// daemon finds its `TMPDIR` deleted and leaves its folder in /tmp.
pub fn kill_strays(root: &Path) {
    let Some(root) = root.to_str().map(|r| format!("{r}/")) else {
        return;
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let names_root = |file: &str| {
            fs::read(entry.path().join(file))
                .is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains(&root))
        };
        if names_root("cmdline") || names_root("environ") {
            // SAFETY: kill(2) with a pid read from /proc; a process gone since is ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn append_with_banner(path: &Path, banner: &str) -> Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.write_all(banner.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether some line of `stderr` starts with `error: ` (the contract's error format).
pub fn has_error_line(stderr: &str) -> bool {
    stderr.lines().any(|l| l.starts_with("error: "))
}

/// A response from [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code, e.g. 200 or 401.
    pub status: u16,
    /// The body, decoded from chunked transfer encoding if needed, lossily as UTF-8.
    pub body: String,
}

/// One request as [`serve_http`] hands it to its handler.
#[derive(Debug)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    /// Header lines, lowercased and trimmed (`name: value`).
    pub headers: Vec<String>,
}

impl HttpRequest {
    /// Whether the request carries the header line `line` (lowercase, `name: value`).
    pub fn has(&self, line: &str) -> bool {
        self.headers.iter().any(|h| h == line)
    }

    /// Whether the request carries a header named `name` (lowercase).
    pub fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|h| h.split(':').next() == Some(name))
    }
}

/// A stand-in HTTP/1.1 server on loopback (a cloud's metadata server, say): one thread, one
/// request per connection, answered with `handler`'s status line (`"200 OK"`) and body.
/// Returns its address; it serves until the test process ends.
pub fn serve_http(
    handler: impl Fn(&HttpRequest) -> (&'static str, String) + Send + 'static,
) -> Result<SocketAddr> {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            let mut reader = std::io::BufReader::new(clone);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let mut request = HttpRequest {
                method: parts.next().unwrap_or_default().to_owned(),
                path: parts.next().unwrap_or_default().to_owned(),
                headers: Vec::new(),
            };
            loop {
                let mut header = String::new();
                match reader.read_line(&mut header) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if header.trim().is_empty() => break,
                    Ok(_) => request.headers.push(header.trim().to_ascii_lowercase()),
                }
            }
            let (status, body) = handler(&request);
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(addr)
}

/// A minimal HTTP/1.1 `GET` over a raw `TcpStream` (no client dependency), bounded by
/// [`HTTP_TIMEOUT`] as a whole and [`HTTP_MAX_BYTES`].
pub fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<HttpResponse> {
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("cannot send a request to {addr}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "no complete response from {addr} within {HTTP_TIMEOUT:?}"
        );
        stream.set_read_timeout(Some(left))?;
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the response from {addr}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        ensure!(
            raw.len() <= HTTP_MAX_BYTES,
            "response from {addr} exceeds {HTTP_MAX_BYTES} bytes"
        );
    }
    parse_response(&raw).with_context(|| format!("bad HTTP response from {addr}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let (status, body) = parse_http(raw)?;
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// An HTTP/1.1 response's status code and body (de-chunked).
pub fn parse_http(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("no status line")?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line not terminated")?;
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(body.len() >= size, "chunk of {size} bytes truncated");
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).context("chunk not terminated")?;
    }
}

/// The user data a provisioner gives a cloud instance (`blendnet_cloud::UserData`'s JSON):
/// join `inviter`'s mesh `mesh` with one-time `token`, within ten minutes. Tests add fields
/// (`identity`, `price_per_hour_micros`) to the object.
pub fn user_data(inviter: &Node, mesh: &str, token: &str) -> Result<Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    Ok(serde_json::json!({
        "version": 1,
        "mesh": mesh,
        "bootstrap": [inviter.bootstrap_addr()?],
        "provisioner": inviter.peer_id()?,
        "token": token,
        "expires_at": now + 600,
    }))
}

/// Lists every file under `dir` (recursively) with its size: compare two snapshots to check that
/// a command changed nothing.
pub fn snapshot_dir(dir: &Path) -> Result<BTreeMap<PathBuf, u64>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, u64>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let meta = entry.metadata()?;
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            if meta.is_dir() {
                out.insert(rel.join(""), 0);
                walk(root, &path, out)?;
            } else {
                out.insert(rel, meta.len());
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

// ---- reading the JSON of `status --json` and `peers --json` ----

/// `value[key]` as a string.
pub fn str_field<'a>(value: &'a Value, key: &str) -> Result<&'a str> {
    value
        .get(key)
        .and_then(Value::as_str)
        .with_context(|| format!("`{key}` is not a string in {value}"))
}

/// `value[key]` as a bool.
pub fn bool_field(value: &Value, key: &str) -> Result<bool> {
    value
        .get(key)
        .and_then(Value::as_bool)
        .with_context(|| format!("`{key}` is not a bool in {value}"))
}

/// `value[key]` as an array of strings.
pub fn string_array(value: &Value, key: &str) -> Result<Vec<String>> {
    value
        .get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("`{key}` is not an array in {value}"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("`{key}` holds a non-string {v}"))
        })
        .collect()
}

fn check_null_or(value: &Value, key: &str, what: &str, ok: fn(&Value) -> bool) -> Result<()> {
    match value.get(key) {
        Some(v) if v.is_null() || ok(v) => Ok(()),
        Some(v) => bail!("`{key}` is {v}, expected {what} or null"),
        None => bail!("`{key}` is missing in {value}"),
    }
}

/// Checks that a `status --json` object has the contract's fields with the right types.
pub fn check_status_fields(status: &Value) -> Result<()> {
    ensure!(status.is_object(), "status is not an object: {status}");
    str_field(status, "peer_id")?;
    str_field(status, "fingerprint")?;
    check_null_or(status, "mesh_id", "a string", Value::is_string)?;
    bool_field(status, "member")?;
    string_array(status, "roles")?;
    string_array(status, "listen_addrs")?;
    ensure!(
        status.get("peer_count").is_some_and(Value::is_u64),
        "`peer_count` is not a count in {status}"
    );
    str_field(status, "version")?;
    Ok(())
}

/// Checks that a `peers --json` array's elements have the contract's fields with the right types.
pub fn check_peers_fields(peers: &Value) -> Result<()> {
    let list = peers
        .as_array()
        .with_context(|| format!("peers is not an array: {peers}"))?;
    for peer in list {
        str_field(peer, "peer_id")?;
        bool_field(peer, "online")?;
        string_array(peer, "roles")?;
        string_array(peer, "addrs")?;
        check_null_or(peer, "blender", "a string", Value::is_string)?;
        check_null_or(peer, "last_seen", "unix seconds", Value::is_u64)?;
        bool_field(peer, "is_self")?;
    }
    Ok(())
}

/// The entry for `peer_id` in a `peers --json` array, if listed.
pub fn find_peer<'a>(peers: &'a Value, peer_id: &str) -> Option<&'a Value> {
    peers
        .as_array()?
        .iter()
        .find(|p| p.get("peer_id").and_then(Value::as_str) == Some(peer_id))
}

/// Peer ids of the entries other than the node itself (`is_self: false`).
pub fn listed_peers(peers: &Value) -> Result<BTreeSet<String>> {
    other_peers(peers, false)
}

/// Peer ids of the entries other than the node itself that are `online: true`.
pub fn online_peers(peers: &Value) -> Result<BTreeSet<String>> {
    other_peers(peers, true)
}

fn other_peers(peers: &Value, only_online: bool) -> Result<BTreeSet<String>> {
    let list = peers
        .as_array()
        .with_context(|| format!("peers is not an array: {peers}"))?;
    let mut out = BTreeSet::new();
    for peer in list {
        if bool_field(peer, "is_self")? {
            continue;
        }
        if only_online && !bool_field(peer, "online")? {
            continue;
        }
        out.insert(str_field(peer, "peer_id")?.to_owned());
    }
    Ok(out)
}

/// How soon the members of a [`mesh`] must all see each other online.
pub const MESH_ONLINE_WITHIN: Duration = Duration::from_secs(15);

/// A founder named `names[0]` and members named by the rest, joined by invite, each started
/// with `up_args`, and all online to each other.
pub fn mesh(names: &[&str], up_args: &[&str]) -> Result<Vec<Node>> {
    let (founder, members) = names.split_first().context("a mesh needs a founder")?;
    let (mut a, _) = Node::init(founder)?;
    a.up(up_args)?;
    let mut nodes = vec![a];
    for name in members {
        let mut node = Node::new(name)?;
        node.cli_ok(&["join", &nodes[0].invite(&[])?])?;
        node.up(up_args)?;
        nodes.push(node);
    }
    let ids: Vec<String> = nodes.iter().map(Node::peer_id).collect::<Result<_>>()?;
    eventually(MESH_ONLINE_WITHIN, Duration::from_millis(250), || {
        for (node, me) in nodes.iter().zip(&ids) {
            let online = online_peers(&node.peers()?)?;
            for id in ids.iter().filter(|id| *id != me) {
                ensure!(online.contains(id), "{} does not see {id} yet", node.name());
            }
        }
        Ok(())
    })?;
    Ok(nodes)
}

/// The Blender the tests render with: `BLENDNET_BLENDER`, else `blender` on `PATH` (Debian's
/// package in CI). Panics with what to install when there is none: these tests must not pass
/// by skipping.
pub fn blender() -> PathBuf {
    let path = std::env::var_os("BLENDNET_BLENDER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "blender".into());
    // Blender 3.4 leaves its (empty) temporary folder behind after `--version`.
    let scratch = tempfile::tempdir().expect("a temporary folder");
    let found = Command::new(&path)
        .arg("--version")
        .env("TMPDIR", scratch.path())
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "these tests render with real Blender: install it (apt-get install blender) or set \
         BLENDNET_BLENDER to its path"
    );
    path
}

/// How long one headless Blender run of the tests may take (a small render or a merge).
pub const BLENDER_RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs Blender headless with factory settings on the Python `expr`, optionally with a scene
/// loaded first; a Python error fails the run (with Blender's stderr in the error).
pub fn blender_python(scene: Option<&Path>, expr: &str) -> Result<Output> {
    blender_python_with(&blender(), scene, expr)
}

/// [`blender_python`] with another Blender (the `bpy` wheel's, say).
pub fn blender_python_with(blender: &Path, scene: Option<&Path>, expr: &str) -> Result<Output> {
    let mut cmd = Command::new(blender);
    cmd.args(["-b", "--factory-startup"]);
    if let Some(scene) = scene {
        cmd.arg(scene);
    }
    cmd.args(["--python-exit-code", "1", "--python-expr", expr]);
    let out = run_bounded(&mut cmd, BLENDER_RUN_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "Blender's Python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Merges EXRs with Blender's own `_cycles.merge`, the reference for slice merging.
pub fn cycles_merge(inputs: &[impl AsRef<Path>], output: &Path) -> Result<()> {
    let inputs: Vec<String> = inputs
        .iter()
        .map(|p| p.as_ref().to_str().map(str::to_owned))
        .collect::<Option<_>>()
        .context("an input path is not UTF-8")?;
    let expr = format!(
        "import _cycles; _cycles.merge(input={inputs:?}, output={:?})",
        output.to_str().context("the output path is not UTF-8")?
    );
    blender_python(None, &expr).context("_cycles.merge")?;
    ensure!(
        output.exists(),
        "_cycles.merge wrote no {}",
        output.display()
    );
    Ok(())
}

/// A small Cycles scene made by Blender from its factory startup file (the cube, 32×24 pixels,
/// 8 samples, denoising off, so Debian's build without OpenImageDenoise renders it), after
/// running the Python `extra` on it; saved as `dir/name.blend`.
pub fn blender_scene(dir: &Path, name: &str, extra: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.blend"));
    let script = format!(
        "import bpy\n\
         scene = bpy.context.scene\n\
         scene.render.engine = 'CYCLES'\n\
         scene.cycles.device = 'CPU'\n\
         scene.cycles.samples = 8\n\
         scene.cycles.use_denoising = False\n\
         scene.render.resolution_x = 32\n\
         scene.render.resolution_y = 24\n\
         scene.render.resolution_percentage = 100\n\
         {extra}\n\
         bpy.ops.wm.save_as_mainfile(filepath={:?})\n",
        path.to_str().context("scene path is not UTF-8")?
    );
    blender_python(None, &script).with_context(|| format!("making the scene {name}"))?;
    ensure!(path.exists(), "Blender did not save {}", path.display());
    Ok(path)
}

/// Makes an artist's scene with Blender at `path`: Cycles on the CPU, 16 samples, no adaptive
/// sampling or denoising, 64×48, PNG output to `//render/shot_`; then runs the Python `setup`
/// on it (the file is saved once before, so relative paths can be made) and saves it.
pub fn make_scene(path: &Path, setup: &str) -> Result<()> {
    fs::create_dir_all(path.parent().context("parent")?)?;
    let script = format!(
        "import bpy\n\
         bpy.ops.wm.save_as_mainfile(filepath={path:?})\n\
         scene = bpy.context.scene\n\
         scene.render.engine = 'CYCLES'\n\
         scene.cycles.device = 'CPU'\n\
         scene.cycles.samples = 16\n\
         scene.cycles.use_adaptive_sampling = False\n\
         scene.cycles.use_denoising = False\n\
         scene.render.resolution_x = 64\n\
         scene.render.resolution_y = 48\n\
         scene.render.resolution_percentage = 100\n\
         scene.render.image_settings.file_format = 'PNG'\n\
         scene.render.filepath = '//render/shot_'\n\
         {setup}\n\
         bpy.ops.wm.save_mainfile()\n",
        path = path.to_str().context("UTF-8")?
    );
    blender_python(None, &script)?;
    ensure!(path.exists(), "Blender did not save {}", path.display());
    Ok(())
}

/// Renders `frames` (`1` or `1..6`) of `scene` the way an artist does, into `dir`; returns the
/// files by frame.
pub fn local_render(scene: &Path, dir: &Path, frames: &str) -> Result<Vec<PathBuf>> {
    let out = Command::new(blender())
        .arg("-b")
        .arg(scene)
        .arg("-o")
        .arg(dir.join("local_####"))
        .args(["-f", frames])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("local_"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Blender 4.2 from the `bpy` wheel, through `tests/bpy-blender/blender`: it has
/// OpenImageDenoise, which Debian's Blender lacks. `.ci/run` installs the wheel in a venv and
/// sets `BLENDNET_BPY_PYTHON`; elsewhere `None`, and the tests that need it say they skipped.
pub fn bpy_blender() -> Option<PathBuf> {
    std::env::var_os("BLENDNET_BPY_PYTHON")?;
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("bpy-blender/blender"))
}

/// The largest difference between two images' pixels, in 1/255 steps, and how many values
/// differ (read by Blender, so any format it writes can be compared).
pub fn pixel_difference(a: &Path, b: &Path) -> (f64, usize) {
    let expr = format!(
        "import bpy\n\
         a = bpy.data.images.load({:?}); b = bpy.data.images.load({:?})\n\
         assert tuple(a.size) == tuple(b.size), (a.size[:], b.size[:])\n\
         d = [abs(x - y) for x, y in zip(a.pixels, b.pixels)]\n\
         print('DIFF', max(d) * 255, sum(1 for x in d if x > 0))",
        a.to_str().expect("UTF-8 path"),
        b.to_str().expect("UTF-8 path")
    );
    let out = blender_python(None, &expr).expect("Blender compares the images");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("DIFF "))
        .expect("Blender printed no comparison");
    let (max, count) = line.split_once(' ').expect("two numbers");
    (
        max.parse().expect("a number"),
        count.parse().expect("a count"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() -> Result<()> {
        let plain = parse_response(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\nno")?;
        assert_eq!((plain.status, plain.body.as_str()), (401, "no"));
        let chunked = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n",
        )?;
        assert_eq!((chunked.status, chunked.body.as_str()), (200, "{\"a\":1}"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        Ok(())
    }

    #[test]
    fn a_dropped_node_takes_what_it_left_running_under_its_root_along() -> Result<()> {
        let node = Node::new("strays")?;
        let scene = node.data_dir().join("scene.blend");
        // A stand-in for a Blender the daemon started: its command line names a path inside.
        let mut stray = Command::new("sh")
            .args(["-c", "sleep 600", "blender"])
            .arg(&scene)
            .spawn()?;
        let mut bystander = Command::new("sh")
            .args(["-c", "sleep 600", "other", "/tmp/not-this-node/scene.blend"])
            .spawn()?;
        drop(node);
        let status = wait_timeout(&mut stray, Duration::from_secs(5))?;
        ensure!(status.is_some(), "the stray outlived its node");
        ensure!(
            bystander.try_wait()?.is_none(),
            "a process of another path was killed"
        );
        bystander.kill()?;
        bystander.wait()?;
        Ok(())
    }

    #[test]
    fn eventually_returns_first_success_or_last_error() -> Result<()> {
        let mut n = 0;
        let got = eventually(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            if n < 3 { bail!("try {n}") } else { Ok(n) }
        })?;
        assert_eq!(got, 3);
        let err = eventually(
            Duration::from_millis(30),
            Duration::from_millis(5),
            || -> Result<()> { bail!("never") },
        )
        .err()
        .context("eventually succeeded on a closure that always fails")?;
        assert!(format!("{err:#}").contains("never"), "{err:#}");
        Ok(())
    }

    #[test]
    fn always_for_fails_at_first_error() {
        let mut n = 0;
        let res = always_for(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            if n == 3 { bail!("broken") } else { Ok(()) }
        });
        assert!(res.is_err());
        assert_eq!(n, 3);
    }

    #[test]
    fn run_bounded_kills_what_runs_too_long() -> Result<()> {
        let start = Instant::now();
        let res = run_bounded(Command::new("sleep").arg("30"), Duration::from_millis(200));
        assert!(res.is_err());
        assert!(start.elapsed() < Duration::from_secs(10));
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )?;
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        Ok(())
    }

    #[test]
    fn peer_lists_split_self_and_online() -> Result<()> {
        let peers = serde_json::json!([
            {"peer_id": "me", "online": true, "roles": [], "addrs": [], "blender": null,
             "last_seen": null, "is_self": true},
            {"peer_id": "on", "online": true, "roles": ["render"], "addrs": ["/ip4/1.2.3.4"],
             "blender": "3.4.1", "last_seen": 1700000000u64, "is_self": false},
            {"peer_id": "off", "online": false, "roles": [], "addrs": [], "blender": null,
             "last_seen": 1, "is_self": false},
        ]);
        check_peers_fields(&peers)?;
        assert_eq!(online_peers(&peers)?, BTreeSet::from(["on".to_owned()]));
        assert_eq!(listed_peers(&peers)?.len(), 2);
        assert!(find_peer(&peers, "off").is_some());
        assert!(check_peers_fields(&serde_json::json!([{"peer_id": "x"}])).is_err());
        Ok(())
    }
}
