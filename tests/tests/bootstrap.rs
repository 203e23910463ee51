//! The cloud bootstrap script, `bootstrap/blendnet-bootstrap.sh` (DESIGN §9), run for real as the
//! current user with `BLENDNET_ROOT` pointing into a scratch directory, against a loopback HTTP
//! server that serves a stand-in Blender tarball and a stand-in `blendnet` binary: no real
//! downloads, no systemd, nothing written outside the scratch directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use blendnet_tests::{e2e, has_error_line, run_bounded, shellcheck, workspace};
use tempfile::TempDir;

/// The script downloads two small files from loopback and unpacks one: seconds, even on a
/// loaded 2-core machine.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

const BLENDER_TARBALL: &str = "blender-4.2.0-linux-x64.tar.xz";
const BLENDER_STANDIN: &str = "#!/bin/sh\necho 'Blender 4.2.0'\n";
const BLENDNET_STANDIN: &str = "#!/bin/sh\necho 'blendnet stand-in' \"$@\"\n";
/// Where the user data lives on the "installed system" (a non-default path, so the test sees the
/// script honour BLENDNET_USER_DATA).
const USER_DATA: &str = "/srv/cloud/user-data.json";

fn script() -> Result<PathBuf> {
    Ok(workspace()?.join("bootstrap/blendnet-bootstrap.sh"))
}

fn sha256(file: &Path) -> Result<String> {
    let out = run_bounded(Command::new("sha256sum").arg(file), TOOL_TIMEOUT)?;
    ensure!(out.status.success(), "sha256sum {} failed", file.display());
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_string())
}

/// A loopback HTTP/1.1 server for a few files: `GET /NAME` answers the file or 404. Its thread
/// lives as long as the test process.
fn serve(files: BTreeMap<String, Vec<u8>>) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on loopback")?;
    let base = format!("http://{}", listener.local_addr()?);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // One request per connection; errors only affect that download (curl reports it).
            let _ = answer(stream, &files);
        }
    });
    Ok(base)
}

fn answer(stream: TcpStream, files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let mut stream = stream;
    match files.get(path.trim_start_matches('/')) {
        Some(body) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(body)?;
        }
        None => write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
    }
    stream.flush()?;
    Ok(())
}

/// One run's world: a scratch directory holding the root the script installs into, the HOME and
/// TMPDIR it runs with, and the stand-in downloads, served on loopback.
struct Fixture {
    scratch: TempDir,
    base_url: String,
    blender_sha: String,
    bin_sha: String,
    bin_bytes: Vec<u8>,
}

impl Fixture {
    fn new() -> Result<Fixture> {
        let scratch = tempfile::Builder::new()
            .prefix("blendnet-bootstrap-test.")
            .tempdir()?;
        for dir in ["root", "home", "tmp", "fixtures/blender-4.2.0-linux-x64"] {
            fs::create_dir_all(scratch.path().join(dir))?;
        }
        let fixtures = scratch.path().join("fixtures");
        let blender = fixtures.join("blender-4.2.0-linux-x64/blender");
        fs::write(&blender, BLENDER_STANDIN)?;
        fs::set_permissions(&blender, fs::Permissions::from_mode(0o755))?;
        let tarball = fixtures.join(BLENDER_TARBALL);
        let out = run_bounded(
            Command::new("tar")
                .arg("-cJf")
                .arg(&tarball)
                .arg("-C")
                .arg(&fixtures)
                .arg("blender-4.2.0-linux-x64"),
            TOOL_TIMEOUT,
        )?;
        ensure!(
            out.status.success(),
            "tar could not make the stand-in Blender tarball (is xz installed?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = fixtures.join("blendnet");
        fs::write(&bin, BLENDNET_STANDIN)?;

        // The user data the provisioner would have put there (the script only names its path).
        let user_data = scratch.path().join("root").join(&USER_DATA[1..]);
        fs::create_dir_all(user_data.parent().context("user data path has no parent")?)?;
        fs::write(
            &user_data,
            r#"{"version":1,"mesh":"m","bootstrap":["/ip4/127.0.0.1/tcp/1"],"provisioner":"p","token":"t","expires_at":0}"#,
        )?;

        let bin_bytes = fs::read(&bin)?;
        let files = BTreeMap::from([
            (BLENDER_TARBALL.to_string(), fs::read(&tarball)?),
            ("blendnet".to_string(), bin_bytes.clone()),
        ]);
        Ok(Fixture {
            base_url: serve(files)?,
            blender_sha: sha256(&tarball)?,
            bin_sha: sha256(&bin)?,
            bin_bytes,
            scratch,
        })
    }

    fn root(&self) -> PathBuf {
        self.scratch.path().join("root")
    }

    /// Runs the script with a clean environment: only PATH from this process, HOME and TMPDIR in
    /// the scratch directory, and the BLENDNET_* settings.
    fn run(&self, blender_sha: &str) -> Result<Output> {
        let mut cmd = Command::new("bash");
        cmd.arg(script()?)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.scratch.path().join("home"))
            .env("TMPDIR", self.scratch.path().join("tmp"))
            .env("LC_ALL", "C")
            .env("BLENDNET_ROOT", self.root())
            .env("BLENDNET_NO_SYSTEMD", "1")
            .env("BLENDNET_USER_DATA", USER_DATA)
            .env(
                "BLENDNET_BLENDER_URL",
                format!("{}/{BLENDER_TARBALL}", self.base_url),
            )
            .env("BLENDNET_BLENDER_SHA256", blender_sha)
            .env("BLENDNET_BIN_URL", format!("{}/blendnet", self.base_url))
            .env("BLENDNET_BIN_SHA256", &self.bin_sha)
            .env("BLENDNET_DOWNLOAD_TIMEOUT", "60");
        run_bounded(&mut cmd, SCRIPT_TIMEOUT)
    }

    /// Fails unless the script left nothing in its HOME and TMPDIR: with everything else under
    /// BLENDNET_ROOT checked by the caller, it wrote nowhere else it could have.
    fn nothing_outside_root(&self) -> Result<()> {
        for dir in ["home", "tmp"] {
            let left = files_under(&self.scratch.path().join(dir))?;
            ensure!(
                left.is_empty(),
                "the script left files in its {dir} directory: {left:?}"
            );
        }
        Ok(())
    }
}

/// Every file (not directory) under `dir`, as sorted paths relative to it.
fn files_under(dir: &Path) -> Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                walk(base, &path, out)?;
            } else {
                out.push(path.strip_prefix(base)?.display().to_string());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn mode(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_script_passes_shellcheck() {
    e2e(|| shellcheck(&script()?));
}

#[test]
fn the_script_installs_blender_blendnet_and_the_units_under_its_root_and_runs_twice() {
    e2e(|| {
        let fx = Fixture::new()?;
        let root = fx.root();
        let expected_files = [
            "etc/systemd/system/blendnet-idle-poweroff.service",
            "etc/systemd/system/blendnet-idle-poweroff.timer",
            "etc/systemd/system/blendnet.service",
            "opt/blender/blender",
            "srv/cloud/user-data.json",
            "usr/local/bin/blendnet",
            "usr/local/bin/blendnet-idle-poweroff",
        ];
        for run in ["first", "second"] {
            let out = fx.run(&fx.blender_sha)?;
            ensure!(
                out.status.success(),
                "the {run} run failed:\n{}",
                show(&out)
            );
            ensure!(
                files_under(&root)? == expected_files,
                "after the {run} run the root holds {:?}, not {expected_files:?}",
                files_under(&root)?
            );
            fx.nothing_outside_root()?;

            for (file, want) in [
                ("opt/blender/blender", 0o755),
                ("usr/local/bin/blendnet", 0o755),
                ("usr/local/bin/blendnet-idle-poweroff", 0o755),
                ("etc/systemd/system/blendnet.service", 0o644),
                ("var/lib/blendnet/node", 0o700),
            ] {
                let got = mode(&root.join(file))?;
                ensure!(got == want, "{file} has mode {got:o}, not {want:o}");
            }
            ensure!(
                fs::read(root.join("usr/local/bin/blendnet"))? == fx.bin_bytes,
                "the installed blendnet is not the downloaded one"
            );
            ensure!(
                fs::read_to_string(root.join("opt/blender/blender"))? == BLENDER_STANDIN,
                "opt/blender/blender is not the tarball's blender-4.2.0-linux-x64/blender"
            );
            let unit = fs::read_to_string(root.join("etc/systemd/system/blendnet.service"))?;
            let exec = "ExecStart=/usr/local/bin/blendnet enroll --user-data /srv/cloud/user-data.json \
                        --data-dir /var/lib/blendnet/node --blender /opt/blender/blender --no-mdns";
            for line in [exec, "Restart=on-failure", "WantedBy=multi-user.target"] {
                ensure!(
                    unit.lines().any(|l| l.trim() == line),
                    "the unit has no line {line:?}:\n{unit}"
                );
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(
                stdout.contains("Blender 4.2.0"),
                "the script did not report the installed Blender's version:\n{}",
                show(&out)
            );
        }
        // The watchdog the script generates is a shell script too.
        shellcheck(&root.join("usr/local/bin/blendnet-idle-poweroff"))?;
        Ok(())
    });
}

#[test]
fn a_wrong_blender_checksum_stops_the_script_before_it_installs_anything() {
    e2e(|| {
        let fx = Fixture::new()?;
        let wrong = "0".repeat(64);
        let out = fx.run(&wrong)?;
        ensure!(
            !out.status.success(),
            "the script succeeded with a wrong Blender checksum:\n{}",
            show(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            has_error_line(&stderr),
            "no `error: ` line:\n{}",
            show(&out)
        );
        for part in [BLENDER_TARBALL, wrong.as_str(), fx.blender_sha.as_str()] {
            ensure!(
                stderr.contains(part),
                "stderr does not name {part:?}:\n{}",
                show(&out)
            );
        }
        let left = files_under(&fx.root())?;
        if left != ["srv/cloud/user-data.json"] {
            bail!("the failed run wrote under its root: {left:?}");
        }
        let mut top: Vec<String> = fs::read_dir(fx.root())?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        top.sort();
        ensure!(
            top == ["srv"],
            "the failed run created directories under its root: {top:?}"
        );
        fx.nothing_outside_root()?;
        Ok(())
    });
}
