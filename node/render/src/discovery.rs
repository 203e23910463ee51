//! Finding Blender and the machine's GPUs (DESIGN §7).
//!
//! [`find_blender`] and [`gpus`] are plain blocking functions (they run `blender --version`,
//! Blender's device probe and `nvidia-smi`, each under a timeout): call them from a blocking
//! thread. Nothing here is fatal to a daemon: a machine without Blender still joins the mesh
//! (it can submit, store and merge), so a missing or broken Blender is a [`BlenderError`] for
//! one log line, and GPUs are best effort.
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

use crate::Devices;
use crate::scratch::{Scratch, TMPDIR};

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

/// A usable Blender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlenderInfo {
    /// The executable.
    pub path: String,
    /// Its version, like `"4.2.1"`.
    pub version: String,
    /// What its Cycles can render with; empty when Blender would not say (see the log).
    pub devices: Devices,
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

/// Finds Blender (explicit path, then `env` — the value of `BLENDNET_BLENDER` — then `blender`
/// on `path_var`) and reads its version. Each run of Blender gets a temporary folder made in
/// `scratch` (a folder the caller owns and clears: a process killed meanwhile leaves it there).
pub fn find_blender(
    explicit: Option<&Path>,
    env: Option<&OsStr>,
    path_var: Option<&OsStr>,
    scratch: &Path,
) -> Result<BlenderInfo, BlenderError> {
    let path = locate_blender(explicit, env, path_var)?;
    let version = blender_version(&path, BLENDER_VERSION_TIMEOUT, scratch)?;
    let devices = blender_devices(&path, scratch).unwrap_or_else(|problem| {
        tracing::warn!(path = %path.display(), %problem, "Blender did not list its devices");
        Devices::default()
    });
    Ok(BlenderInfo {
        path: path.display().to_string(),
        version,
        devices,
    })
}

/// Asks Blender which devices its Cycles can use (about a second: Blender starts headless).
fn blender_devices(path: &Path, scratch: &Path) -> Result<Devices, String> {
    let args = crate::devices::probe_args();
    match probe(path, &args, BLENDER_VERSION_TIMEOUT, scratch) {
        Ok((status, output)) if status.success() => crate::devices::parse(&output),
        Ok((status, _)) => Err(format!("the device probe failed ({status})")),
        Err(ProbeError::Spawn(e)) => Err(e.to_string()),
        Err(ProbeError::Timeout) => Err(format!(
            "the device probe did not finish within {BLENDER_VERSION_TIMEOUT:?}"
        )),
    }
}

/// Where Blender is (explicit path, then `env`, then `blender` on `path_var`), without running
/// it.
pub fn locate_blender(
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
fn blender_version(path: &Path, timeout: Duration, scratch: &Path) -> Result<String, BlenderError> {
    let (status, output) = probe(path, &["--version"], timeout, scratch).map_err(|e| match e {
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

/// GPU names from `nvidia-smi`, if it is on `path_var` (a `PATH` value) and answers;
/// otherwise none. Its temporary folder is made in `scratch`, as for [`find_blender`].
pub fn gpus(path_var: &OsStr, scratch: &Path) -> Vec<String> {
    let Some(smi) = find_on_path(OsStr::new(NVIDIA_SMI_NAME), path_var) else {
        return Vec::new();
    };
    match probe(
        &smi,
        &["--query-gpu=name", "--format=csv,noheader"],
        GPU_QUERY_TIMEOUT,
        scratch,
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
/// (bounded, lossily decoded) stdout; kills it after `timeout`. Its `TMPDIR` is a new folder in
/// `scratch`, removed when it is done.
fn probe(
    program: &Path,
    args: &[&str],
    timeout: Duration,
    scratch: &Path,
) -> Result<(ExitStatus, String), ProbeError> {
    let deadline = Instant::now() + timeout;
    let scratch = Scratch::new_in(scratch).map_err(ProbeError::Spawn)?;
    let mut child = Command::new(program)
        .env(TMPDIR, scratch.path())
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
    fn missing_explicit_path_is_none_with_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("blender");
        let err = find_blender(Some(&missing), None, None, tmp.path()).unwrap_err();
        assert!(matches!(err, BlenderError::Missing { .. }));
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn nothing_configured_and_empty_path_is_not_installed() {
        let tmp = tempfile::tempdir().unwrap();
        let err = find_blender(None, None, Some(tmp.path().as_os_str()), tmp.path()).unwrap_err();
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
            let info = retry(|| find_blender(Some(&fake), None, None, tmp.path())).unwrap();
            assert_eq!(info.version, "4.2.1");
            assert_eq!(info.path, fake.display().to_string());
        }

        #[test]
        fn each_probe_runs_in_its_own_folder_in_scratch_and_removes_it() {
            let tmp = tempfile::tempdir().unwrap();
            let scratch = tmp.path().join("scratch");
            std::fs::create_dir(&scratch).unwrap();
            let seen = tmp.path().join("seen");
            let fake = script(
                tmp.path(),
                "blender",
                &format!("echo \"$TMPDIR\" >> '{}'\n{FAKE}", seen.display()),
            );
            retry(|| find_blender(Some(&fake), None, None, &scratch)).unwrap();
            let seen = std::fs::read_to_string(&seen).unwrap();
            let folders: Vec<&str> = seen.lines().collect();
            // `--version` and the device probe.
            assert_eq!(folders.len(), 2, "{seen}");
            for folder in folders {
                assert_eq!(
                    Path::new(folder).parent(),
                    Some(scratch.as_path()),
                    "{seen}"
                );
            }
            assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
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

            let info = retry(|| {
                find_blender(
                    Some(&explicit),
                    Some(env.as_os_str()),
                    Some(path_var),
                    tmp.path(),
                )
            })
            .unwrap();
            assert_eq!(info.version, "3.6.0");
            let info =
                retry(|| find_blender(None, Some(env.as_os_str()), Some(path_var), tmp.path()))
                    .unwrap();
            assert_eq!(info.version, "4.0.0");
            let info = retry(|| find_blender(None, None, Some(path_var), tmp.path())).unwrap();
            assert_eq!(info.version, "4.1.0");
            // A bare name in the config is looked up on PATH.
            let info = retry(|| {
                find_blender(Some(Path::new("blender")), None, Some(path_var), tmp.path())
            })
            .unwrap();
            assert_eq!(info.version, "4.1.0");
        }

        #[test]
        fn not_blender_is_unknown_version() {
            let tmp = tempfile::tempdir().unwrap();
            let fake = script(tmp.path(), "python", "echo 'Python 3.12.1'");
            let err = retry(|| find_blender(Some(&fake), None, None, tmp.path())).unwrap_err();
            assert!(
                matches!(err, BlenderError::UnknownVersion { ref first_line, .. } if first_line == "Python 3.12.1"),
                "{err:?}"
            );
        }

        #[test]
        fn failing_blender_is_failed() {
            let tmp = tempfile::tempdir().unwrap();
            let fake = script(tmp.path(), "broken", "echo 'Blender 4.2.1'\nexit 3");
            let err = retry(|| find_blender(Some(&fake), None, None, tmp.path())).unwrap_err();
            assert!(matches!(err, BlenderError::Failed { .. }), "{err:?}");
        }

        #[test]
        fn hanging_blender_times_out() {
            let tmp = tempfile::tempdir().unwrap();
            let fake = script(tmp.path(), "hang", "exec sleep 30");
            let started = Instant::now();
            let err = retry(|| blender_version(&fake, Duration::from_millis(300), tmp.path()))
                .unwrap_err();
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
                found = gpus(tmp.path().as_os_str(), tmp.path());
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
