//! Scenes travel once: real daemons on loopback moving blobs with `blendnet store`.
//!
//! Every file is made here from a seeded generator, so the bytes are known and each fetch is
//! compared byte for byte with what was added.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use blendnet_tests::{
    Node, blendnet_bin, e2e, eventually, kill_strays, online_peers, run_bounded, shellcheck,
    workspace,
};
use serde_json::Value;

/// Members must see each other this soon.
const ONLINE_WITHIN: Duration = Duration::from_secs(15);
/// Bound on one `store get` of the sizes used here on a loaded 2-core machine.
const GET_WITHIN: Duration = Duration::from_secs(300);
const MIB: usize = 1024 * 1024;
/// Bound on the tiny transfer benchmark (four daemons, copies and fetches of 16 MiB): about
/// 25 s here.
const BENCHMARK_WITHIN: Duration = Duration::from_secs(300);

/// Deterministic bytes (xorshift), so a failing comparison can be reproduced.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A seeder and `n` fetchers, all online.
fn mesh(n: usize) -> Result<Vec<Node>> {
    let names: Vec<String> = (0..n).map(|i| format!("fetcher{i}")).collect();
    let mut all = vec!["seeder"];
    all.extend(names.iter().map(String::as_str));
    blendnet_tests::mesh(&all, &[])
}

/// Writes `content` as `big.bin` beside `node`'s data dir and `store add`s it; returns the
/// manifest hash.
fn add_big(node: &Node, content: &[u8]) -> Result<String> {
    let path = scratch(node, "big")?.join("big.bin");
    fs::write(&path, content)?;
    Ok(node
        .cli_ok(&["store", "add", &path.display().to_string()])?
        .trim()
        .to_string())
}

/// Waits until `node` sees `peer` online.
fn wait_until_sees(node: &Node, peer: &str) -> Result<()> {
    eventually(ONLINE_WITHIN, Duration::from_millis(250), || {
        ensure!(
            online_peers(&node.peers()?)?.contains(peer),
            "{} does not see {peer} yet",
            node.name()
        );
        Ok(())
    })
}

fn store_get(node: &Node, hash: &str, out: &Path, extra: &[&str]) -> Result<Value> {
    let out_arg = out.display().to_string();
    let mut args = vec!["store", "get", hash, "--out", &out_arg, "--json"];
    args.extend_from_slice(extra);
    let text = node.cli_ok_within(&args, GET_WITHIN)?;
    serde_json::from_str(&text).with_context(|| format!("store get printed: {text}"))
}

fn received_from(view: &Value, peer: &str) -> u64 {
    view.pointer(&format!("/received_from/{peer}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn received(view: &Value) -> u64 {
    view.get("received_from")
        .and_then(Value::as_object)
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

fn scratch(node: &Node, name: &str) -> Result<PathBuf> {
    let dir = node
        .data_dir()
        .parent()
        .context("data dir has no parent")?
        .join(name);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A scene directory travels whole: layout, bytes and the executable bit.
#[test]
fn a_directory_travels_whole_with_its_layout() {
    e2e(|| {
        let nodes = mesh(2)?;
        let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
        let scene = scratch(a, "scene")?;
        fs::create_dir_all(scene.join("textures/wood"))?;
        let files = [
            ("shot.blend", bytes(3 * MIB + 17, 1)),
            ("textures/wood/oak.png", bytes(700_000, 2)),
            ("textures/empty.txt", Vec::new()),
            ("bake.sh", b"#!/bin/sh\necho baked\n".to_vec()),
            // The same bytes under two names: one blob, fetched once, materialized twice.
            ("textures/wood/oak-copy.png", bytes(700_000, 2)),
        ];
        for (path, content) in &files {
            fs::write(scene.join(path), content)?;
        }
        fs::set_permissions(scene.join("bake.sh"), fs::Permissions::from_mode(0o755))?;
        let hash = a
            .cli_ok(&["store", "add", &scene.display().to_string()])?
            .trim()
            .to_string();
        ensure!(hash.len() == 64, "store add printed {hash:?}");
        let out = scratch(b, "out")?;
        let view = store_get(b, &hash, &out, &[])?;
        for (path, content) in &files {
            let got = fs::read(out.join(path)).with_context(|| format!("{path} missing"))?;
            ensure!(&got == content, "{path} differs after the transfer");
        }
        let mode = fs::metadata(out.join("bake.sh"))?.permissions().mode();
        ensure!(
            mode & 0o111 != 0,
            "bake.sh lost its executable bit: {mode:o}"
        );
        ensure!(
            received_from(&view, &a.peer_id()?) > 0,
            "B should have received from A: {view}"
        );
        // Listed on both sides.
        let list: Value = serde_json::from_str(&b.cli_ok(&["store", "ls", "--json"])?)?;
        ensure!(
            list.as_array()
                .is_some_and(|l| l.iter().any(|e| e["hash"] == hash.as_str())),
            "B's store does not list the manifest: {list}"
        );
        // B announced it on the `have` topic: A now knows B holds the scene too.
        let b_id = b.peer_id()?;
        eventually(Duration::from_secs(10), Duration::from_millis(250), || {
            let list: Value = serde_json::from_str(&a.cli_ok(&["store", "ls", "--json"])?)?;
            let entry = list
                .as_array()
                .and_then(|l| l.iter().find(|e| e["hash"] == hash.as_str()))
                .cloned()
                .context("A does not list the manifest")?;
            ensure!(
                entry["holders"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|p| p == b_id.as_str())),
                "A does not know yet that B holds it: {entry}"
            );
            Ok(())
        })?;
        // `--from A`: C takes everything from A, although it heard that B holds it too.
        let a_id = a.peer_id()?;
        let out = scratch(c, "out")?;
        let view = store_get(c, &hash, &out, &["--from", &a_id])?;
        let senders = view["received_from"]
            .as_object()
            .context("no received_from")?;
        ensure!(
            senders.len() == 1 && received_from(&view, &a_id) > 0,
            "--from A, yet C received from {senders:?}"
        );
        ensure!(
            fs::read(out.join("shot.blend"))? == files[0].1,
            "C's copy differs"
        );
        // Each side counts the blob bytes it exchanged with the other (the status page's
        // bytes in and out): C took from A exactly what its fetch reports; A served at least
        // that (the verified encoding carries hashes too).
        let c_id = c.peer_id()?;
        let took = received_from(&view, &a_id);
        let traffic = |node: &Node, peer: &str, field: &str| -> Result<u64> {
            let peers = node.peers()?;
            let entry = blendnet_tests::find_peer(&peers, peer)
                .with_context(|| format!("{peer} not listed: {peers}"))?;
            entry[field]
                .as_u64()
                .with_context(|| format!("no {field}: {entry}"))
        };
        ensure!(
            traffic(c, &a_id, "bytes_in")? == took,
            "C's bytes in from A differ from its fetch ({took})"
        );
        let served = traffic(a, &c_id, "bytes_out")?;
        ensure!(
            served >= took && served < took + took / 10,
            "A's bytes out to C are {served}, C took {took}"
        );
        Ok(())
    });
}

/// A fetch killed halfway (the fetching daemon dies) resumes with only the missing bytes.
#[test]
fn a_killed_fetch_resumes_with_only_the_missing_bytes() {
    e2e(|| {
        let mut nodes = mesh(1)?;
        let size = 96 * MIB;
        let content = bytes(size, 3);
        let hash = add_big(&nodes[0], &content)?;
        let a_id = nodes[0].peer_id()?;
        let (seeder, rest) = nodes.split_at_mut(1);
        let b = &mut rest[0];
        let out = scratch(b, "out")?;
        let out_arg = out.display().to_string();
        // Start the fetch in the background and kill B's daemon once part of it is verified.
        let mut get = b
            .cli_command(&["store", "get", &hash, "--out", &out_arg, "--json"])?
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let token = b.api_token()?;
        let partway = eventually(Duration::from_secs(60), Duration::from_millis(10), || {
            let response = b.api_get("/v1/store/fetches", Some(&token))?;
            let fetches: Value = serde_json::from_str(&response.body)?;
            let fetch = fetches
                .as_array()
                .and_then(|l| l.iter().find(|e| e["size"] == size as u64))
                .cloned()
                .context("the big blob's fetch has not started")?;
            let done = fetch["done_bytes"].as_u64().unwrap_or(0);
            ensure!(done > 0, "nothing verified yet");
            ensure!(
                done < size as u64 / 2,
                "already {done} bytes: too late to kill halfway"
            );
            Ok(done)
        })?;
        b.kill()?;
        let _ = get.kill();
        let _ = get.wait();
        println!("killed the fetching daemon after {partway} of {size} bytes");
        b.start_again()?;
        wait_until_sees(b, &a_id)?;
        let view = store_get(b, &hash, &out, &[])?;
        let got = fs::read(out.join("big.bin"))?;
        ensure!(got == content, "the resumed file differs");
        // The manifest (a small blob, fetched whole before the kill) counts as resumed too.
        let listed: Value = serde_json::from_str(&seeder[0].cli_ok(&["store", "ls", "--json"])?)?;
        let manifest_len = listed
            .as_array()
            .and_then(|l| l.iter().find(|e| e["hash"] == hash.as_str()))
            .and_then(|e| e["size"].as_u64())
            .context("the seeder does not list the manifest")?;
        let resumed = view["resumed"].as_u64().context("no resumed field")?;
        let fresh = received(&view);
        ensure!(
            resumed >= manifest_len + partway,
            "what was verified before the kill ({partway} bytes) must not be fetched again: {view}"
        );
        ensure!(
            fresh + resumed == size as u64 + manifest_len,
            "the second fetch moved {fresh} bytes with {resumed} already here, for {size}: {view}"
        );
        println!("resumed {resumed} bytes, fetched {fresh} more");
        Ok(())
    });
}

/// One seeder, four fetchers of a 256 MiB blob at once: every fetcher ends with the exact
/// bytes, and the seeder uploads at most 1.5 times the blob (the fetchers trade pieces).
#[test]
fn four_fetchers_share_the_load_of_one_seeder() {
    e2e(|| {
        let nodes = mesh(4)?;
        let size = 256 * MIB;
        let content = bytes(size, 4);
        let hash = add_big(&nodes[0], &content)?;
        let seeder = nodes[0].peer_id()?;
        let start = Instant::now();
        let views = std::thread::scope(|s| {
            let handles: Vec<_> = nodes[1..]
                .iter()
                .map(|n| {
                    let hash = hash.clone();
                    s.spawn(move || -> Result<(Value, PathBuf)> {
                        let out = scratch(n, "out")?;
                        Ok((store_get(n, &hash, &out, &[])?, out))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a fetch thread panicked"))?
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let elapsed = start.elapsed();
        let mut from_seeder = 0;
        for (view, out) in &views {
            ensure!(
                fs::read(out.join("big.bin"))? == content,
                "a fetcher's copy differs"
            );
            from_seeder += received_from(view, &seeder);
        }
        let factor = from_seeder as f64 / size as f64;
        println!("seeder upload factor with 4 fetchers: {factor:.2} ({elapsed:.1?})");
        ensure!(factor <= 1.5, "the seeder uploaded {factor:.2}× the blob");
        Ok(())
    });
}

/// A fetch that would overflow the store's quota fails with a message that says so, and the
/// store is left as it was.
#[test]
fn a_fetch_over_the_quota_fails_clearly() {
    e2e(|| {
        let (mut a, _) = Node::init("seeder")?;
        a.up(&[])?;
        let mut b = Node::new("small")?;
        fs::write(
            b.data_dir().join("blendnet.toml"),
            "[store]\nquota = \"4 MiB\"\n",
        )?;
        b.cli_ok(&["join", &a.invite(&[])?])?;
        b.up(&[])?;
        let a_id = a.peer_id()?;
        wait_until_sees(&b, &a_id)?;
        let hash = add_big(&a, &bytes(8 * MIB, 5))?;
        let out = scratch(&b, "out")?;
        let err = b.cli_err(&["store", "get", &hash, "--out", &out.display().to_string()])?;
        ensure!(
            err.contains("quota"),
            "the error should name the quota: {err}"
        );
        ensure!(
            !out.join("big.bin").exists(),
            "nothing may be written on failure"
        );
        let list: Value = serde_json::from_str(&b.cli_ok(&["store", "ls", "--json"])?)?;
        ensure!(
            list.as_array()
                .is_some_and(|l| l.iter().all(|e| e["size"].as_u64() < Some(MIB as u64))),
            "no part of the big blob may stay in the store: {list}"
        );
        Ok(())
    });
}

/// The transfer benchmark (`tests/bench/transfer.sh`, run by hand for its figures) works from a
/// clean checkout: with a 16 MiB blob (four pieces), one round and two fetchers, on the debug
/// binary, it exits 0 and prints both figures the issue asks for. Their values are for the
/// benchmark to report, not for a test on a loaded machine to judge; only what holds however
/// slow the machine is checked: every piece left the seeder at least once, and the two
/// fetchers took no more than two copies and their last-piece duplicates from it.
#[test]
fn the_transfer_benchmark_runs_and_prints_its_ratio_and_upload_factor() {
    e2e(|| {
        let script = workspace()?.join("tests/bench/transfer.sh");
        shellcheck(&script)?;
        // The script's own temporary folder goes under this one, so that whatever it left
        // running, were it killed on time-out, is found and killed here.
        let tmp = tempfile::tempdir()?;
        let out = run_bounded(
            Command::new("bash")
                .arg(&script)
                .args(["16", "2"])
                .env("BLENDNET_BIN", blendnet_bin()?)
                .env("ROUNDS", "1")
                .env("TMPDIR", tmp.path()),
            BENCHMARK_WITHIN,
        );
        kill_strays(tmp.path());
        let out = out?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "the benchmark failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        let figure = |label: &str| -> Result<f64> {
            let line = stdout
                .lines()
                .find(|l| l.trim_start().starts_with(label))
                .with_context(|| format!("no line starting {label:?} in:\n{stdout}"))?;
            line[line.find(':').context("no colon")? + 1..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no number after {label:?}: {line}"))
        };
        let ratio = figure("ratio mesh / TCP, medians")?;
        ensure!(
            ratio.is_finite() && ratio > 0.0,
            "the ratio should be a positive number: {ratio}\n{stdout}"
        );
        let factor = figure("seeder upload factor with 2 fetchers")?;
        ensure!(
            (1.0..=2.5).contains(&factor),
            "the seeder must upload every piece at least once and the two fetchers' copies at \
             most about twice: {factor}\n{stdout}"
        );
        ensure!(
            fs::read_dir(tmp.path())?.next().is_none(),
            "the benchmark should remove its temporary folder"
        );
        Ok(())
    });
}
