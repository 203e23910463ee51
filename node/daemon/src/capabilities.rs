//! What this machine offers the mesh: cores, memory, free disk, GPUs and Blender (DESIGN §7).
//!
//! [`Capabilities::detect`] is a plain blocking function (it runs `blender --version` and
//! `nvidia-smi`, each under a timeout): call it from a blocking thread. Nothing here is fatal: a
//! machine without Blender still joins the mesh (it can submit, store and merge), so a missing or
//! broken Blender is reported as a [`BlenderError`] next to the capabilities, for one log line,
//! and GPUs are best effort.
//!
//! Blender is looked for in this order, and the first place that names one is the only one
//! tried (a configured path that is wrong is reported, not silently replaced by another Blender):
//! 1. the `blender` config key or `--blender` flag;
//! 2. the `BLENDNET_BLENDER` environment variable;
//! 3. `blender` on `PATH`.
//!
//! A name without a directory (`blender-4.2`) in 1 or 2 is looked up on `PATH` too.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Environment variable naming the Blender executable when the config does not.
pub const BLENDER_ENV: &str = "BLENDNET_BLENDER";

/// How long `blender --version` may take. It normally answers in well under a second, but a
/// first start on a cold disk or a network file system can take many seconds; past this the
/// executable is not usable for rendering anyway.
pub const BLENDER_VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `nvidia-smi` may take. It can hang when the driver is wedged; GPUs are best effort,
/// so a daemon must not wait long for them.
pub const GPU_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most output read from a probed program. `--version` prints a few lines; more than this means
/// the program is not what we think it is.
const MAX_PROBE_OUTPUT: u64 = 64 * 1024;

/// Most GPUs advertised. Larger machines exist, but the list is an advertisement gossiped to
/// every peer and must stay small.
pub const MAX_GPUS: usize = 64;

/// How often a probe checks whether its program has exited.
const PROBE_POLL: Duration = Duration::from_millis(20);

/// The executable name looked up on `PATH`.
#[cfg(windows)]
const BLENDER_NAME: &str = "blender.exe";
#[cfg(not(windows))]
const BLENDER_NAME: &str = "blender";

#[cfg(windows)]
const NVIDIA_SMI_NAME: &str = "nvidia-smi.exe";
#[cfg(not(windows))]
const NVIDIA_SMI_NAME: &str = "nvidia-smi";

/// What this node can do, advertised to its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The `blendnet` version.
    pub daemon_version: String,
    /// Logical cores this process may use.
    pub cores: usize,
    /// Memory available to this process, in bytes (the cgroup limit in a container).
    pub ram_bytes: u64,
    /// Free space on the disk that holds the data directory, in bytes (0 if unknown).
    pub free_disk_bytes: u64,
    /// GPU names, as the driver reports them (NVIDIA only for now).
    pub gpus: Vec<String>,
    /// The Blender this node renders with, if any.
    pub blender: Option<BlenderInfo>,
}

/// A usable Blender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlenderInfo {
    /// The executable.
    pub path: String,
    /// Its version, like `"4.2.1"`.
    pub version: String,
    /// What its Cycles can render with; empty when Blender would not say (see the log).
    pub devices: blendnet_render::Devices,
}

/// Why no usable Blender was found. Not fatal: the node runs without rendering.
#[derive(Debug, thiserror::Error)]
pub enum BlenderError {
    /// A configured path does not name an executable file.
    #[error("Blender executable {path} (from {from}) does not exist or is not executable")]
    Missing {
        /// The path.
        path: PathBuf,
        /// Where it was configured: `the config or --blender`, or `BLENDNET_BLENDER`.
        from: &'static str,
    },
    /// Nothing configured and no `blender` on `PATH`.
    #[error(
        "Blender not found: no `{name}` on PATH; set `blender` in blendnet.toml, pass --blender, \
         or set {BLENDER_ENV}"
    )]
    NotInstalled {
        /// The name looked for.
        name: String,
    },
    /// The executable could not be started.
    #[error("cannot run `{path} --version`")]
    Run {
        /// The executable.
        path: PathBuf,
        /// The OS's reason.
        source: std::io::Error,
    },
    /// `--version` did not finish in time.
    #[error("`{path} --version` did not finish within {timeout:?}")]
    Timeout {
        /// The executable.
        path: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// `--version` failed.
    #[error("`{path} --version` failed ({status})")]
    Failed {
        /// The executable.
        path: PathBuf,
        /// How it exited.
        status: ExitStatus,
    },
    /// `--version` printed no Blender version.
    #[error("`{path} --version` printed {first_line:?}, not a Blender version")]
    UnknownVersion {
        /// The executable.
        path: PathBuf,
        /// The first line it printed.
        first_line: String,
    },
}

impl Capabilities {
    /// Detects this machine's capabilities. `blender` is the configured executable
    /// (config key or flag); `BLENDNET_BLENDER` and `PATH` are read from the environment.
    ///
    /// Blocking: runs `blender --version` (up to [`BLENDER_VERSION_TIMEOUT`]) and `nvidia-smi`
    /// (up to [`GPU_QUERY_TIMEOUT`]). The error, if any, says why `blender` is `None`.
    pub fn detect(data_dir: &Path, blender: Option<&Path>) -> (Self, Option<BlenderError>) {
        let env = std::env::var_os(BLENDER_ENV);
        let path_var = std::env::var_os("PATH");
        let (blender, error) = match find_blender(blender, env.as_deref(), path_var.as_deref()) {
            Ok(info) => (Some(info), None),
            Err(e) => (None, Some(e)),
        };
        let (ram_bytes, free_disk_bytes) = memory_and_disk(data_dir);
        let capabilities = Self {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ram_bytes,
            free_disk_bytes,
            gpus: path_var.as_deref().map(gpus).unwrap_or_default(),
            blender,
        };
        (capabilities, error)
    }
}

/// Finds Blender (explicit path, then `env` — the value of `BLENDNET_BLENDER` — then `blender`
/// on `path_var`) and reads its version.
pub fn find_blender(
    explicit: Option<&Path>,
    env: Option<&OsStr>,
    path_var: Option<&OsStr>,
) -> Result<BlenderInfo, BlenderError> {
    let path = locate_blender(explicit, env, path_var)?;
    let version = blender_version(&path, BLENDER_VERSION_TIMEOUT)?;
    let devices = blender_devices(&path).unwrap_or_else(|problem| {
        tracing::warn!(path = %path.display(), %problem, "Blender did not list its devices");
        blendnet_render::Devices::default()
    });
    Ok(BlenderInfo {
        path: path.display().to_string(),
        version,
        devices,
    })
}

/// Asks Blender which devices its Cycles can use (about a second: Blender starts headless).
fn blender_devices(path: &Path) -> Result<blendnet_render::Devices, String> {
    let args = blendnet_render::devices::probe_args();
    match probe(path, &args, BLENDER_VERSION_TIMEOUT) {
        Ok((status, output)) if status.success() => blendnet_render::devices::parse(&output),
        Ok((status, _)) => Err(format!("the device probe failed ({status})")),
        Err(ProbeError::Spawn(e)) => Err(e.to_string()),
        Err(ProbeError::Timeout) => Err(format!(
            "the device probe did not finish within {BLENDER_VERSION_TIMEOUT:?}"
        )),
    }
}

/// Where Blender is, without running it.
fn locate_blender(
    explicit: Option<&Path>,
    env: Option<&OsStr>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, BlenderError> {
    let configured = explicit
        .map(|p| (p.to_owned(), "the config or --blender"))
        .or_else(|| {
            env.filter(|v| !v.is_empty())
                .map(|v| (PathBuf::from(v), BLENDER_ENV))
        });
    match configured {
        Some((path, from)) => {
            let found = if is_bare_name(&path) {
                path_var.and_then(|p| find_on_path(path.as_os_str(), p))
            } else {
                is_executable(&path).then(|| path.clone())
            };
            found.ok_or(BlenderError::Missing { path, from })
        }
        None => path_var
            .and_then(|p| find_on_path(OsStr::new(BLENDER_NAME), p))
            .ok_or(BlenderError::NotInstalled {
                name: BLENDER_NAME.to_owned(),
            }),
    }
}

/// Runs `<path> --version` and parses its version.
fn blender_version(path: &Path, timeout: Duration) -> Result<String, BlenderError> {
    let (status, output) = probe(path, &["--version"], timeout).map_err(|e| match e {
        ProbeError::Spawn(source) => BlenderError::Run {
            path: path.to_owned(),
            source,
        },
        ProbeError::Timeout => BlenderError::Timeout {
            path: path.to_owned(),
            timeout,
        },
    })?;
    if !status.success() {
        return Err(BlenderError::Failed {
            path: path.to_owned(),
            status,
        });
    }
    parse_version(&output).ok_or_else(|| BlenderError::UnknownVersion {
        path: path.to_owned(),
        first_line: output.lines().next().unwrap_or("").trim().to_owned(),
    })
}

/// The version in `blender --version` output: the first line of the form `Blender X.Y[.Z] ...`
/// gives `X.Y[.Z]` (`"Blender 4.2.0 LTS"` → `"4.2.0"`). Lines before it (warnings some builds
/// print) are skipped.
pub fn parse_version(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let word = line
            .trim()
            .strip_prefix("Blender ")?
            .split_whitespace()
            .next()?;
        let end = word
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(word.len());
        let version = word[..end].trim_end_matches('.');
        let mut parts = version.split('.');
        let numeric = |p: Option<&str>| p.is_some_and(|p| !p.is_empty());
        let well_formed =
            numeric(parts.next()) && numeric(parts.next()) && parts.all(|p| !p.is_empty());
        well_formed.then(|| version.to_owned())
    })
}

/// GPU names from `nvidia-smi`, if it is on `path_var` and answers; otherwise none.
fn gpus(path_var: &OsStr) -> Vec<String> {
    let Some(smi) = find_on_path(OsStr::new(NVIDIA_SMI_NAME), path_var) else {
        return Vec::new();
    };
    match probe(
        &smi,
        &["--query-gpu=name", "--format=csv,noheader"],
        GPU_QUERY_TIMEOUT,
    ) {
        Ok((status, output)) if status.success() => parse_gpu_list(&output),
        _ => Vec::new(),
    }
}

/// One GPU name per non-empty line, at most [`MAX_GPUS`].
fn parse_gpu_list(output: &str) -> Vec<String> {
    output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(MAX_GPUS)
        .map(str::to_owned)
        .collect()
}

/// Total memory (the cgroup limit if lower) and free space on the disk holding `data_dir`.
fn memory_and_disk(data_dir: &Path) -> (u64, u64) {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let mut ram = system.total_memory();
    if let Some(limits) = system.cgroup_limits()
        && limits.total_memory > 0
    {
        ram = ram.min(limits.total_memory);
    }
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let free = free_space_for(
        &dir,
        disks
            .list()
            .iter()
            .map(|d| (d.mount_point(), d.available_space())),
    );
    (ram, free.unwrap_or(0))
}

/// The free space of the mount that holds `path`: the longest mount point that is a prefix.
fn free_space_for<'a>(
    path: &Path,
    mounts: impl IntoIterator<Item = (&'a Path, u64)>,
) -> Option<u64> {
    mounts
        .into_iter()
        .filter(|(mount, _)| path.starts_with(mount))
        .max_by_key(|(mount, _)| mount.components().count())
        .map(|(_, free)| free)
}

fn is_bare_name(path: &Path) -> bool {
    let mut components = path.components();
    matches!(
        (components.next(), components.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

fn find_on_path(name: &OsStr, path_var: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

#[derive(Debug)]
enum ProbeError {
    Spawn(std::io::Error),
    Timeout,
}

/// Runs `program args` with no stdin and stderr discarded, and returns its exit status and
/// (bounded, lossily decoded) stdout; kills it after `timeout`.
fn probe(
    program: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<(ExitStatus, String), ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(ProbeError::Spawn)?;
    // Read stdout on its own thread so a program that writes without exiting (or exits
    // without closing a pipe a grandchild inherited) cannot block us past the deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stdout.take(MAX_PROBE_OUTPUT).read_to_end(&mut bytes);
            let _ = tx.send(bytes);
        });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(PROBE_POLL),
            // Timed out, or waiting failed: either way the program is of no use.
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProbeError::Timeout);
            }
        }
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let bytes = rx.recv_timeout(remaining).unwrap_or_default();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_first_lines() {
        for (output, want) in [
            ("Blender 3.4.1\n\tbuild date: 2022-12-20\n", "3.4.1"),
            ("Blender 4.2.0 LTS\n", "4.2.0"),
            ("Blender 5.0.0 Alpha\n\tbuild hash: 1234\n", "5.0.0"),
            ("Blender 2.79 (sub 0)\n", "2.79"),
            (
                "Color management: using fallback mode\nBlender 4.1.1\n",
                "4.1.1",
            ),
        ] {
            assert_eq!(parse_version(output).as_deref(), Some(want), "{output:?}");
        }
        for output in ["", "blender 4.2.0", "Blender\n", "Blender x.y", "Blender 4"] {
            assert_eq!(parse_version(output), None, "{output:?}");
        }
    }

    #[test]
    fn gpu_list_is_trimmed_and_bounded() {
        assert_eq!(
            parse_gpu_list("NVIDIA H100 80GB HBM3\n\n NVIDIA A10 \n"),
            ["NVIDIA H100 80GB HBM3", "NVIDIA A10"]
        );
        let many = "GPU\n".repeat(MAX_GPUS + 5);
        assert_eq!(parse_gpu_list(&many).len(), MAX_GPUS);
    }

    #[test]
    fn free_space_uses_longest_mount() {
        let mounts = [
            (Path::new("/"), 1u64),
            (Path::new("/home"), 2),
            (Path::new("/home/user/data"), 3),
            (Path::new("/ho"), 4),
        ];
        assert_eq!(free_space_for(Path::new("/home/user/x"), mounts), Some(2));
        assert_eq!(free_space_for(Path::new("/var"), mounts), Some(1));
        assert_eq!(free_space_for(Path::new("/var"), []), None);
    }

    #[test]
    fn detect_reports_machine() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("no-blender");
        let (caps, err) = Capabilities::detect(tmp.path(), Some(&missing));
        assert!(caps.cores >= 1);
        assert!(caps.ram_bytes > 0);
        assert_eq!(caps.daemon_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(caps.blender, None);
        assert!(matches!(err, Some(BlenderError::Missing { .. })), "{err:?}");
    }

    #[test]
    fn missing_explicit_path_is_none_with_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("blender");
        let err = find_blender(Some(&missing), None, None).unwrap_err();
        assert!(matches!(err, BlenderError::Missing { .. }));
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn nothing_configured_and_empty_path_is_not_installed() {
        let tmp = tempfile::tempdir().unwrap();
        let err = find_blender(None, None, Some(tmp.path().as_os_str())).unwrap_err();
        assert!(matches!(err, BlenderError::NotInstalled { .. }), "{err:?}");
    }

    #[cfg(unix)]
    mod scripts {
        use super::*;

        /// Writes an executable shell script.
        fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        }

        /// Retries a spawn that met ETXTBSY: another test thread may have forked while the
        /// script was still open for writing (a known race when tests write executables).
        fn retry<T>(mut f: impl FnMut() -> Result<T, BlenderError>) -> Result<T, BlenderError> {
            for _ in 0..20 {
                match f() {
                    Err(BlenderError::Run { ref source, .. })
                        if source.raw_os_error() == Some(26) =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    other => return other,
                }
            }
            f()
        }

        const FAKE: &str = "echo 'Blender 4.2.1'\necho '\tbuild date: 2024-08-19'";

        #[test]
        fn fake_blender_by_explicit_path() {
            let tmp = tempfile::tempdir().unwrap();
            let fake = script(tmp.path(), "my-blender", FAKE);
            let info = retry(|| find_blender(Some(&fake), None, None)).unwrap();
            assert_eq!(info.version, "4.2.1");
            assert_eq!(info.path, fake.display().to_string());
        }

        #[test]
        fn explicit_path_wins_over_env_and_path() {
            let tmp = tempfile::tempdir().unwrap();
            let explicit = script(tmp.path(), "explicit", "echo 'Blender 3.6.0'");
            let env = script(tmp.path(), "env", "echo 'Blender 4.0.0'");
            let bin = tmp.path().join("bin");
            std::fs::create_dir(&bin).unwrap();
            script(&bin, "blender", "echo 'Blender 4.1.0'");
            let path_var = bin.as_os_str();

            let info =
                retry(|| find_blender(Some(&explicit), Some(env.as_os_str()), Some(path_var)))
                    .unwrap();
            assert_eq!(info.version, "3.6.0");
            let info = retry(|| find_blender(None, Some(env.as_os_str()), Some(path_var))).unwrap();
            assert_eq!(info.version, "4.0.0");
            let info = retry(|| find_blender(None, None, Some(path_var))).unwrap();
            assert_eq!(info.version, "4.1.0");
            // A bare name in the config is looked up on PATH.
            let info =
                retry(|| find_blender(Some(Path::new("blender")), None, Some(path_var))).unwrap();
            assert_eq!(info.version, "4.1.0");
        }

        #[test]
        fn not_blender_is_unknown_version() {
            let tmp = tempfile::tempdir().unwrap();
            let fake = script(tmp.path(), "python", "echo 'Python 3.12.1'");
            let err = retry(|| find_blender(Some(&fake), None, None)).unwrap_err();
            assert!(
                matches!(err, BlenderError::UnknownVersion { ref first_line, .. } if first_line == "Python 3.12.1"),
                "{err:?}"
            );
        }

        #[test]
        fn failing_blender_is_failed() {
            let tmp = tempfile::tempdir().unwrap();
            let fake = script(tmp.path(), "broken", "echo 'Blender 4.2.1'\nexit 3");
            let err = retry(|| find_blender(Some(&fake), None, None)).unwrap_err();
            assert!(matches!(err, BlenderError::Failed { .. }), "{err:?}");
        }

        #[test]
        fn hanging_blender_times_out() {
            let tmp = tempfile::tempdir().unwrap();
            let fake = script(tmp.path(), "hang", "exec sleep 30");
            let started = Instant::now();
            let err = retry(|| blender_version(&fake, Duration::from_millis(300))).unwrap_err();
            assert!(matches!(err, BlenderError::Timeout { .. }), "{err:?}");
            assert!(started.elapsed() < Duration::from_secs(10));
        }

        #[test]
        fn nvidia_smi_names_are_read() {
            let tmp = tempfile::tempdir().unwrap();
            script(
                tmp.path(),
                NVIDIA_SMI_NAME,
                "echo 'NVIDIA H100 80GB HBM3'\necho 'NVIDIA H100 80GB HBM3'",
            );
            let mut found = Vec::new();
            for _ in 0..20 {
                found = gpus(tmp.path().as_os_str());
                if !found.is_empty() {
                    break;
                }
                // ETXTBSY race, as in `retry`.
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(found, ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]);
        }
    }
}
