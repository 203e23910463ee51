//! The Blender add-on in headless Blender (Debian's 3.4 in CI), against a real daemon: the
//! Python side is `tests/addon/test_addon.py`; this test prepares a node, runs it, and checks
//! that the daemon the add-on started outlives Blender.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use blendnet_tests::{blender, blendnet_bin, e2e, eventually, run_bounded};

/// The whole Python side: a daemon start, a small render, the error cases.
const ADDON_TESTS_WITHIN: Duration = Duration::from_secs(600);

/// Stops, when dropped, every daemon whose command line names `data_dir`.
struct DaemonsOf(PathBuf);

impl DaemonsOf {
    fn pids(&self) -> Vec<i32> {
        let needle = self.0.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                    let args: Vec<String> = raw
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    args.iter().any(|a| a == "up") && args.contains(&needle)
                })
            })
            .collect()
    }
}

impl Drop for DaemonsOf {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = eventually(Duration::from_secs(15), Duration::from_millis(200), || {
            ensure!(self.pids().is_empty(), "still running");
            Ok(())
        });
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

#[test]
fn the_addon_starts_a_daemon_renders_a_frame_and_explains_its_errors() {
    e2e(|| {
        let work = tempfile::Builder::new()
            .prefix("blendnet-addon-")
            .tempdir()?;
        let data_dir = work.path().join("node");
        let bin = blendnet_bin()?;
        let init = run_bounded(
            Command::new(&bin)
                .args(["init", "--data-dir"])
                .arg(&data_dir),
            Duration::from_secs(30),
        )?;
        ensure!(init.status.success(), "init: {init:?}");
        let daemons = DaemonsOf(data_dir.clone());
        // The daemon started by the add-on listens on loopback only, with no LAN discovery.
        std::fs::write(
            data_dir.join("blendnet.toml"),
            "listen = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n",
        )?;

        // Blender's temporary files go here, to check that the add-on leaves none behind.
        let tmp = work.path().join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let path = std::env::join_paths(
            std::iter::once(bin.parent().context("bin dir")?.to_path_buf()).chain(
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
            ),
        )?;
        let out = run_bounded(
            Command::new(blender())
                .args(["-b", "--factory-startup", "--python-exit-code", "1", "-P"])
                .arg(root.join("tests/addon/test_addon.py"))
                .arg("--")
                .arg(root.join("addon/blendnet"))
                .arg(work.path())
                .env("PATH", path)
                .env("BLENDER_USER_SCRIPTS", work.path().join("scripts"))
                .env("BLENDER_USER_CONFIG", work.path().join("config"))
                .env("BLENDNET_DATA_DIR", &data_dir)
                .env("TMPDIR", &tmp)
                .env("BLENDNET_BLENDER", blender()),
            ADDON_TESTS_WITHIN,
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}");
        let log = std::fs::read_to_string(data_dir.join("addon-daemon.log")).unwrap_or_default();
        ensure!(
            out.status.success() && stdout.contains("ADDON TESTS PASSED"),
            "the add-on tests failed ({}):\n{stdout}\n{}\n--- the daemon's log:\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // The live preview's temporary folder went with Blender.
        let left: Vec<_> = std::fs::read_dir(&tmp)?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("blendnet-preview-"))
            .collect();
        ensure!(left.is_empty(), "the add-on left {left:?} behind");
        // Blender is gone; the daemon it started is not.
        ensure!(
            !daemons.pids().is_empty(),
            "the daemon did not outlive Blender"
        );
        let status = run_bounded(
            Command::new(&bin)
                .args(["status", "--data-dir"])
                .arg(&data_dir),
            Duration::from_secs(30),
        )?;
        ensure!(
            status.status.success(),
            "the daemon the add-on started does not answer: {status:?}"
        );
        drop(daemons);
        Ok(())
    });
}
