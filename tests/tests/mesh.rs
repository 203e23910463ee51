//! The mesh, end to end: real `blendnet` daemons on loopback joined by invite codes.
//!
//! Each test has its own temporary data dirs and lets the daemons pick free ports, so cargo may
//! run them in parallel. The longest one reuses one three-node mesh for a sequence of checks
//! (join, foreign mesh, restart, revoke) to keep the wall time of this binary low.
//!
//! The harness builds the daemon binary first: `cargo test -p blendnet-tests` is enough.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use blendnet_tests::{
    API_TIMEOUT, Node, always_for, bool_field, e2e, eventually, find_peer, has_error_line,
    listed_peers, online_peers, snapshot_dir, str_field, string_array,
};
use serde_json::Value;

/// Members must see each other online this soon after the last one starts (the contract).
const ONLINE_WITHIN: Duration = Duration::from_secs(15);

/// A revocation must have taken effect everywhere this soon.
const REVOKED_WITHIN: Duration = Duration::from_secs(15);

/// A refused invite must make `up` exit this soon ("~15 s" in the contract, plus start-up).
const REFUSED_WITHIN: Duration = Duration::from_secs(20);

/// A bad config must make `up` exit this soon ("at once"; generous for a loaded machine).
const CONFIG_REJECTED_WITHIN: Duration = Duration::from_secs(10);

/// How long a foreign mesh's daemon is watched to check it never shows up.
const FOREIGN_WATCH: Duration = Duration::from_secs(5);

/// How often peer lists are polled: often enough to measure seconds, rarely enough that the
/// CLI processes do not load a 2-core machine.
const POLL: Duration = Duration::from_millis(250);

/// Passes when every node in `nodes` lists every other one as online (and itself as `is_self`).
fn all_see_each_other(nodes: &[(&Node, &str)]) -> Result<()> {
    for (node, id) in nodes {
        let peers = node.peers()?;
        let me = find_peer(&peers, id)
            .with_context(|| format!("node {} does not list itself ({id})", node.name()))?;
        ensure!(
            bool_field(me, "is_self")?,
            "node {} lists itself without is_self: {me}",
            node.name()
        );
        let online = online_peers(&peers)?;
        for (other, other_id) in nodes {
            if other_id != id {
                ensure!(
                    online.contains(*other_id),
                    "node {} does not list {} ({other_id}) online; its peers: {peers}",
                    node.name(),
                    other.name()
                );
            }
        }
    }
    Ok(())
}

/// Passes when `node` lists `peer_id` and shows it offline.
fn sees_offline(node: &Node, peer_id: &str) -> Result<()> {
    let peers = node.peers()?;
    let entry = find_peer(&peers, peer_id)
        .with_context(|| format!("node {} no longer lists {peer_id}: {peers}", node.name()))?;
    ensure!(
        !bool_field(entry, "online")?,
        "node {} still shows {peer_id} online: {entry}",
        node.name()
    );
    Ok(())
}

/// Passes when `node` is a member of `mesh_id`.
fn is_member_of(node: &Node, mesh_id: &str) -> Result<()> {
    let status = node.status()?;
    ensure!(
        bool_field(&status, "member")?,
        "node {} is not a member yet: {status}",
        node.name()
    );
    ensure!(
        status.get("mesh_id").and_then(Value::as_str) == Some(mesh_id),
        "node {} is in mesh {:?}, expected {mesh_id}",
        node.name(),
        status.get("mesh_id")
    );
    Ok(())
}

/// Checks the node runs pending: not a member of any mesh.
fn is_pending(node: &Node) -> Result<()> {
    let status = node.status()?;
    ensure!(
        !bool_field(&status, "member")?,
        "node {} should be pending but is a member: {status}",
        node.name()
    );
    ensure!(
        status.get("mesh_id").is_some_and(Value::is_null),
        "node {} should be pending but has a mesh id: {status}",
        node.name()
    );
    Ok(())
}

/// Waits for a joining daemon to give up because its invite was refused, and checks that it
/// said why: non-zero exit, an `error: ` line, and `reason` in its stderr.
fn expect_refused(node: &mut Node, reason: &str) -> Result<()> {
    let status = node.wait_exit(REFUSED_WITHIN)?;
    let stderr = node.stderr()?;
    ensure!(
        !status.success(),
        "node {}: `up` exited 0 with a refused invite, expected an error",
        node.name(),
    );
    ensure!(
        has_error_line(&stderr) && stderr.contains(reason),
        "node {}: `up` exited with {status} but stderr lacks an `error: ` line saying \
         {reason:?}",
        node.name(),
    );
    Ok(())
}

/// A real code with one character near the middle replaced by another character the code
/// itself uses (so it stays within the code's alphabet, and the change is not just a case
/// change): only an integrity check can catch it.
fn garble(code: &str) -> Result<String> {
    let chars: Vec<char> = code.chars().collect();
    let alphabet: BTreeSet<char> = chars
        .iter()
        .copied()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let mid = chars.len() / 2;
    let at = (mid..chars.len())
        .chain((0..mid).rev())
        .find(|&i| chars[i].is_ascii_alphanumeric())
        .with_context(|| format!("invite code {code:?} has no alphanumeric character"))?;
    let old = chars[at];
    let new = alphabet
        .iter()
        .copied()
        .find(|c| {
            !c.eq_ignore_ascii_case(&old) && c.is_ascii_lowercase() == old.is_ascii_lowercase()
        })
        .or_else(|| {
            alphabet
                .iter()
                .copied()
                .find(|c| !c.eq_ignore_ascii_case(&old))
        })
        .with_context(|| format!("invite code {code:?} uses a single character"))?;
    let mut garbled = chars;
    garbled[at] = new;
    Ok(garbled.into_iter().collect())
}

/// Join by invite, see each other online, ignore a foreign mesh, survive a restart, revoke.
#[test]
fn mesh_lifecycle_join_foreign_restart_revoke() {
    e2e(|| {
        // A founds the mesh.
        let (mut a, mesh_id) = Node::init("a")?;
        ensure!(!mesh_id.is_empty(), "init printed an empty mesh id");
        a.cli_err(&["init"])
            .context("a second `init` in the same data dir")?;
        a.up(&[])?;
        is_member_of(&a, &mesh_id)?;
        let a_id = a.peer_id()?;

        // B (default roles) and C (render only) join with their own codes.
        let mut b = Node::new("b")?;
        b.cli_ok(&["join", &a.invite(&[])?])?;
        let mut c = Node::new("c")?;
        c.cli_ok(&["join", &a.invite(&["--ttl", "10m", "--roles", "render"])?])?;
        b.start(&[])?;
        let last_started = Instant::now();
        c.start(&[])?;
        b.wait_api(API_TIMEOUT)?;
        c.wait_api(API_TIMEOUT)?;
        let b_id = b.peer_id()?;
        let c_id = c.peer_id()?;
        eventually(
            ONLINE_WITHIN.saturating_sub(last_started.elapsed()),
            POLL,
            || all_see_each_other(&[(&a, &a_id), (&b, &b_id), (&c, &c_id)]),
        )
        .context("three members joined by invite did not all see each other online in time")?;
        is_member_of(&b, &mesh_id)?;
        is_member_of(&c, &mesh_id)?;
        let c_roles = string_array(&c.status()?, "roles")?;
        ensure!(
            c_roles == ["render"],
            "C was invited with --roles render but has {c_roles:?}"
        );
        eventually(ONLINE_WITHIN, POLL, || {
            let peers = a.peers()?;
            let entry = find_peer(&peers, &c_id).context("A does not list C")?;
            let roles = string_array(entry, "roles")?;
            ensure!(
                roles == ["render"],
                "A shows C with roles {roles:?}, expected [\"render\"]"
            );
            Ok(())
        })?;
        b.cli_err(&["invite"])
            .context("B, which does not hold the mesh key, asked for an invite")?;

        // D founds another mesh and dials A: nobody may list anybody across meshes.
        let (mut d, d_mesh) = Node::init("d")?;
        ensure!(
            d_mesh != mesh_id,
            "two `init`s made the same mesh id {mesh_id}"
        );
        d.up(&["--bootstrap", &a.bootstrap_addr()?])?;
        let d_id = d.peer_id()?;
        always_for(FOREIGN_WATCH, POLL, || {
            for node in [&a, &b, &c] {
                ensure!(
                    !listed_peers(&node.peers()?)?.contains(&d_id),
                    "node {} lists D, a daemon of another mesh",
                    node.name()
                );
            }
            let foreign = listed_peers(&d.peers()?)?;
            for (name, id) in [("A", &a_id), ("B", &b_id), ("C", &c_id)] {
                ensure!(!foreign.contains(id), "D, of another mesh, lists {name}");
            }
            Ok(())
        })?;
        d.stop()?;

        // B stops cleanly, is seen offline, and comes back by itself without --bootstrap.
        b.stop()?;
        ensure!(
            !b.data_dir().join("api.addr").exists(),
            "B left api.addr behind after a clean exit"
        );
        eventually(ONLINE_WITHIN, POLL, || {
            sees_offline(&a, &b_id)?;
            sees_offline(&c, &b_id)
        })
        .context("A and C did not notice that B stopped")?;
        let restarted = Instant::now();
        b.start(&[])?;
        b.wait_api(API_TIMEOUT)?;
        ensure!(b.peer_id()? == b_id, "B's peer id changed across a restart");
        eventually(
            ONLINE_WITHIN.saturating_sub(restarted.elapsed()),
            POLL,
            || all_see_each_other(&[(&a, &a_id), (&b, &b_id), (&c, &c_id)]),
        )
        .context("B did not reconnect by itself after a restart")?;

        // A revokes C: C disappears from the members' lists and is cut off.
        a.cli_ok(&["revoke", &c_id])?;
        eventually(REVOKED_WITHIN, POLL, || {
            for node in [&a, &b] {
                ensure!(
                    !listed_peers(&node.peers()?)?.contains(&c_id),
                    "node {} still lists revoked C",
                    node.name()
                );
            }
            let online = online_peers(&c.peers()?)?;
            ensure!(online.is_empty(), "revoked C still sees {online:?} online");
            Ok(())
        })
        .context("revoking C did not take effect in time")?;
        all_see_each_other(&[(&a, &a_id), (&b, &b_id)]).context("revoking C disturbed A and B")?;

        for node in [&mut a, &mut b, &mut c] {
            node.stop()?;
        }
        Ok(())
    });
}

/// An invite works once, and not after it expires; `invite` accepts the contract's TTL forms.
#[test]
fn used_and_expired_invites_are_refused() {
    e2e(|| {
        let (mut a, mesh_id) = Node::init("a")?;
        // A fixed port, so codes made before A restarts still lead to it afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("/ip4/127.0.0.1/tcp/{port}");
        a.up(&["--listen", &listen])?;
        let mut codes = BTreeSet::new();
        for ttl in ["30s", "10m", "1h", "2d"] {
            codes.insert(a.invite(&["--ttl", ttl])?);
        }
        ensure!(
            codes.len() == 4,
            "four invites gave only {} distinct codes",
            codes.len()
        );
        a.cli_err(&["invite", "--ttl", "soon"])?;

        let code = a.invite(&[])?;
        let mut b = Node::new("b")?;
        b.cli_ok(&["join", &code])?;
        b.up(&[])?;
        eventually(ONLINE_WITHIN, POLL, || is_member_of(&b, &mesh_id))
            .context("B did not become a member with a fresh invite")?;

        let mut c = Node::new("c")?;
        c.cli_ok(&["join", &code])?;
        c.start(&[])?;
        expect_refused(&mut c, "already been used")?;

        // After A restarts, the used invite is still used and an unused one still works.
        let spare = a.invite(&[])?;
        a.restart()?;
        let mut d = Node::new("d")?;
        d.cli_ok(&["join", &code])?;
        d.start(&[])?;
        expect_refused(&mut d, "already been used")
            .context("a used invite must stay used across the inviter's restart")?;
        let mut f = Node::new("f")?;
        f.cli_ok(&["join", &spare])?;
        f.up(&[])?;
        eventually(ONLINE_WITHIN, POLL, || is_member_of(&f, &mesh_id))
            .context("an invite made before the inviter restarted must still work")?;
        f.stop()?;

        let expiring = a.invite(&["--ttl", "1s"])?;
        thread::sleep(Duration::from_secs(2));
        let mut e = Node::new("e")?;
        // `join` may only check the format, or may already see the expiry; either way the
        // user must be told the code expired.
        let join = e.cli(&["join", &expiring])?;
        if join.status.success() {
            e.start(&[])?;
            expect_refused(&mut e, "expired")?;
        } else {
            let stderr = String::from_utf8_lossy(&join.stderr);
            ensure!(
                has_error_line(&stderr) && stderr.contains("expired"),
                "`join` of an expired code failed without saying it expired: {stderr}"
            );
        }

        let listed = listed_peers(&a.peers()?)?;
        ensure!(
            listed.len() == 2,
            "A lists {listed:?}, expected only B and F"
        );
        a.stop()?;
        b.stop()?;
        Ok(())
    });
}

/// A corrupted code is refused by `join` at once and changes nothing; the real one still works.
#[test]
fn garbled_invite_code_is_rejected() {
    e2e(|| {
        let (mut a, mesh_id) = Node::init("a")?;
        a.up(&[])?;
        let code = a.invite(&[])?;
        let bad = garble(&code)?;

        let mut g = Node::new("g")?;
        let before = snapshot_dir(g.data_dir())?;
        let err = g.cli_err(&["join", &bad])?;
        ensure!(
            err.contains("invite code"),
            "garbled code refused without naming it: {err}"
        );
        let after = snapshot_dir(g.data_dir())?;
        ensure!(
            before == after,
            "a refused join changed the data dir: {before:?} -> {after:?}"
        );

        g.up(&[])?;
        is_pending(&g)?;
        g.stop()?;

        // The genuine code still works, so the refusal above was about the corruption.
        g.cli_ok(&["join", &code])?;
        g.up(&[])?;
        eventually(ONLINE_WITHIN, POLL, || is_member_of(&g, &mesh_id))
            .context("the genuine code did not work after the garbled one was refused")?;
        g.stop()?;
        a.stop()?;
        Ok(())
    });
}

/// A fresh data dir runs pending; its API wants the bearer token.
#[test]
fn api_requires_the_token() {
    e2e(|| {
        let mut n = Node::new("n")?;
        n.up(&[])?;
        is_pending(&n)?;
        let token = n.api_token()?;
        let mode = fs::metadata(n.data_dir().join("api.token"))?
            .permissions()
            .mode();
        ensure!(
            mode & 0o077 == 0,
            "api.token is readable by others: mode {mode:o}"
        );

        // Same length, last character changed: a prefix or length check would not catch it.
        let mut wrong: Vec<char> = token.chars().collect();
        if let Some(last) = wrong.last_mut() {
            *last = if *last == 'x' { 'y' } else { 'x' };
        }
        let wrong: String = wrong.into_iter().collect();
        for path in ["/v1/status", "/v1/peers"] {
            for (what, bearer) in [("no token", None), ("a wrong token", Some(wrong.as_str()))] {
                let resp = n.api_get(path, bearer)?;
                ensure!(
                    resp.status == 401,
                    "GET {path} with {what} answered {}",
                    resp.status
                );
            }
            let resp = n.api_get(path, Some(&token))?;
            ensure!(
                resp.status == 200,
                "GET {path} with the token answered {}",
                resp.status
            );
            let body: Value = serde_json::from_str(&resp.body)
                .with_context(|| format!("GET {path} answered non-JSON: {}", resp.body))?;
            ensure!(!body.is_null(), "GET {path} answered null");
        }
        let status: Value = serde_json::from_str(&n.api_get("/v1/status", Some(&token))?.body)?;
        ensure!(
            str_field(&status, "peer_id")? == n.peer_id()?,
            "API and CLI disagree on the peer id"
        );
        n.stop()?;
        Ok(())
    });
}

/// One HTTPS request with curl, trusting only the node's web certificate: the status code,
/// the response head and the body.
fn curl_tls(
    cert: &std::path::Path,
    url: &str,
    cookie: Option<&str>,
) -> Result<(u16, String, String)> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        "--include",
        "--cacert",
    ])
    .arg(cert)
    .arg(url);
    if let Some(cookie) = cookie {
        cmd.args(["--cookie", cookie]);
    }
    let out = cmd.output().context("running curl (Debian package curl)")?;
    ensure!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head}"))?;
    Ok((status, head.to_owned(), body.to_owned()))
}

/// With `--web`, the status page is also served over TLS with the node's own certificate: the
/// one-time login link works once there, its cookie is `Secure`, and nothing answers without
/// it. The link printed for this machine is the same one-time code.
#[test]
fn the_status_page_is_served_over_tls_on_the_web_address() {
    e2e(|| {
        let mut n = Node::new("n")?;
        n.up(&["--web", "127.0.0.1:0"])?;
        let printed = n.cli_ok(&["web", "--no-open"])?;
        let remote = printed
            .split_whitespace()
            .find(|w| w.starts_with("https://127.0.0.1:"))
            .with_context(|| format!("no https link in {printed}"))?
            .to_owned();
        let local = printed.lines().last().unwrap_or_default().trim().to_owned();
        ensure!(
            local.starts_with("http://127.0.0.1:") && local.contains("/login?code="),
            "the last line is not the local link: {printed}"
        );
        ensure!(
            remote.ends_with(&local[local.find("/login").unwrap_or(0)..]),
            "the two links carry different codes: {printed}"
        );
        let base = &remote[..remote.find("/login").unwrap_or(0)];
        let cert = n.data_dir().join("web").join("cert.pem");

        let (status, _, _) = curl_tls(&cert, &format!("{base}/v1/status"), None)?;
        ensure!(
            status == 401,
            "the API over TLS without a cookie answered {status}"
        );
        let (status, _, _) = curl_tls(&cert, &format!("{base}/"), None)?;
        ensure!(
            status == 401,
            "the page over TLS without a cookie answered {status}"
        );

        let (status, head, _) = curl_tls(&cert, &remote, None)?;
        ensure!(status == 303, "the login link answered {status}: {head}");
        let set_cookie = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or_else(|| l.strip_prefix("Set-Cookie: "))
            })
            .with_context(|| format!("no cookie set: {head}"))?;
        ensure!(
            set_cookie.contains("Secure") && set_cookie.contains("HttpOnly"),
            "the cookie over TLS is not Secure and HttpOnly: {set_cookie}"
        );
        let cookie = set_cookie.split(';').next().unwrap_or_default().to_owned();

        let (status, _, body) = curl_tls(&cert, &format!("{base}/v1/status"), Some(&cookie))?;
        ensure!(
            status == 200,
            "the API with the cookie answered {status}: {body}"
        );
        let view: Value = serde_json::from_str(&body)?;
        ensure!(
            str_field(&view, "peer_id")? == n.peer_id()?,
            "another node answered"
        );
        let (status, _, body) = curl_tls(&cert, &format!("{base}/"), Some(&cookie))?;
        ensure!(
            status == 200 && body.contains("<html"),
            "the page with the cookie answered {status}"
        );

        // Once only, on either address.
        let (status, _, _) = curl_tls(&cert, &remote, None)?;
        ensure!(status == 401, "a second use of the link answered {status}");
        let path = &local[local.find("/login").unwrap_or(0)..];
        let resp = n.api_get(path, None)?;
        ensure!(
            resp.status == 401,
            "the spent code on the API address answered {}",
            resp.status
        );
        n.stop()?;
        Ok(())
    });
}

/// `blendnet.toml` is read, and a bad value or an unknown key stops `up` naming the key.
#[test]
fn bad_config_is_rejected_naming_the_key() {
    e2e(|| {
        // Without --api, so the address must come from the file: proves the file is read.
        let no_api = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"];
        let mut ok = Node::new("config-ok")?;
        fs::write(
            ok.data_dir().join("blendnet.toml"),
            "api = \"127.0.0.1:0\"\n",
        )?;
        ok.start_raw(&no_api)?;
        ok.wait_api(API_TIMEOUT)
            .context("a valid blendnet.toml (api = \"127.0.0.1:0\") was not accepted")?;
        ok.stop()?;

        let cases = [
            (
                "bad-value",
                "api = \"not an address\"\n",
                "api",
                &no_api[..],
            ),
            ("unknown-key", "colour = 1\n", "colour", &[][..]),
        ];
        for (name, toml, key, args) in cases {
            let mut n = Node::new(name)?;
            fs::write(n.data_dir().join("blendnet.toml"), toml)?;
            if args.is_empty() {
                n.start(&[])?;
            } else {
                n.start_raw(args)?;
            }
            let started = Instant::now();
            let status = n
                .wait_exit(CONFIG_REJECTED_WITHIN)
                .with_context(|| format!("`up` kept running with blendnet.toml {toml:?}"))?;
            let stderr = n.stderr()?;
            if status.success() || !has_error_line(&stderr) || !stderr.contains(key) {
                bail!(
                    "with blendnet.toml {toml:?}, `up` exited with {status} after {:.1?}; \
                     expected non-zero and an `error: ` message naming `{key}`",
                    started.elapsed(),
                );
            }
        }
        Ok(())
    });
}

#[test]
fn garble_changes_one_character_within_the_alphabet() -> Result<()> {
    let code = "bn1-abcdefghij-klmnop";
    let bad = garble(code)?;
    assert_eq!(bad.len(), code.len());
    let diffs: Vec<(char, char)> = code
        .chars()
        .zip(bad.chars())
        .filter(|(x, y)| x != y)
        .collect();
    assert_eq!(diffs.len(), 1, "{code} -> {bad}");
    let (old, new) = diffs[0];
    assert!(
        code.contains(new) && !old.eq_ignore_ascii_case(&new),
        "{old} -> {new}"
    );
    Ok(())
}

/// A pre-shared key keeps out machines that lack it, even with a valid invite, and turns QUIC
/// off; machines that hold it join as usual.
#[test]
fn a_pre_shared_key_keeps_out_machines_without_it() {
    e2e(|| {
        let (mut a, mesh_id) = Node::init("a")?;
        let key = a.data_dir().join("swarm.key");
        fs::write(
            &key,
            "/key/swarm/psk/1.0.0/\n/base16/\n\
             0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
        )?;
        let key_arg = key.display().to_string();
        a.up(&[
            "--psk-file",
            &key_arg,
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ])?;
        let listen = string_array(&a.status()?, "listen_addrs")?;
        ensure!(
            !listen.iter().any(|l| l.contains("quic")),
            "a node with a pre-shared key must not listen on QUIC: {listen:?}"
        );

        let mut b = Node::new("b")?;
        b.cli_ok(&["join", &a.invite(&[])?])?;
        b.up(&["--psk-file", &key_arg])?;
        let mut c = Node::new("c")?;
        c.cli_ok(&["join", &a.invite(&[])?])?;
        c.up(&[])?;

        let (a_id, b_id, c_id) = (a.peer_id()?, b.peer_id()?, c.peer_id()?);
        eventually(ONLINE_WITHIN, POLL, || {
            all_see_each_other(&[(&a, &a_id), (&b, &b_id)])
        })
        .context("two holders of the pre-shared key did not meet")?;
        is_member_of(&b, &mesh_id)?;
        always_for(FOREIGN_WATCH, POLL, || {
            ensure!(
                !listed_peers(&a.peers()?)?.contains(&c_id),
                "a node without the key got into the mesh"
            );
            ensure!(
                !c.is_member()?,
                "a node without the key redeemed its invite"
            );
            Ok(())
        })
    });
}

/// What a peer can do travels with it: another member sees its Blender version and cores.
#[test]
fn capabilities_reach_the_other_members() {
    e2e(|| {
        let (mut a, _) = Node::init("a")?;
        a.up(&[])?;
        let mut b = Node::new("b")?;
        // A stand-in for Blender that answers `--version` like Blender 3.4.1 does.
        let fake = b
            .data_dir()
            .parent()
            .context("no parent")?
            .join("fake-blender");
        fs::write(
            &fake,
            "#!/bin/sh\necho 'Blender 3.4.1'\necho '\tbuild date: 2023-01-01'\n",
        )?;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755))?;
        b.cli_ok(&["join", &a.invite(&[])?])?;
        b.up(&["--blender", &fake.display().to_string()])?;
        let b_id = b.peer_id()?;
        let seen = eventually(ONLINE_WITHIN, POLL, || {
            let peers = a.peers()?;
            let entry = find_peer(&peers, &b_id).context("A does not list B yet")?;
            ensure!(
                entry.get("blender").and_then(Value::as_str) == Some("3.4.1"),
                "A does not show B's Blender yet: {entry}"
            );
            Ok(entry.clone())
        })?;
        let cores = seen
            .pointer("/capabilities/cores")
            .and_then(Value::as_u64)
            .context("no cores in B's capabilities")?;
        ensure!(cores >= 1, "B advertises {cores} cores");
        // A has no Blender configured: it says so rather than inventing one.
        let a_entry_at_b = eventually(ONLINE_WITHIN, POLL, || {
            find_peer(&b.peers()?, &a.peer_id()?)
                .cloned()
                .context("B does not list A")
        })?;
        let a_blender = a_entry_at_b.get("blender").context("no blender field")?;
        ensure!(
            a_blender.is_null() || a_blender.as_str().is_some(),
            "blender must be a string or null: {a_blender}"
        );
        Ok(())
    });
}

/// `up --init` makes a working node from nothing, logs to a file in the data dir, and a second
/// `up --init` keeps the same mesh.
#[test]
fn up_init_starts_a_mesh_of_one_and_keeps_it() {
    e2e(|| {
        let mut a = Node::new("a")?;
        a.up(&["--init"])?;
        let status = a.status()?;
        ensure!(bool_field(&status, "member")?, "not a member: {status}");
        let mesh = str_field(&status, "mesh_id")?.to_owned();
        let roles = string_array(&status, "roles")?;
        ensure!(
            roles.iter().any(|r| r == "submit") && roles.iter().any(|r| r == "render"),
            "the founder should hold every role: {roles:?}"
        );
        a.stop()?;
        let logs: Vec<_> = fs::read_dir(a.data_dir().join("logs"))
            .context("no logs directory in the data dir")?
            .filter_map(|e| e.ok())
            .collect();
        ensure!(!logs.is_empty(), "no log file was written");
        let text = fs::read_to_string(logs[0].path())?;
        ensure!(
            text.contains("local API ready"),
            "the log file lacks the start-up lines: {text}"
        );
        a.up(&["--init"])?;
        ensure!(
            str_field(&a.status()?, "mesh_id")? == mesh,
            "a second `up --init` must keep the mesh"
        );
        Ok(())
    });
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').context("odd stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// An idle daemon, once started, sleeps: no loop may spin. (A busy loop is a bug whatever the
/// machine; how little an idle node costs is measured by `tests/bench/idle.sh`.)
#[test]
fn an_idle_daemon_does_not_spin() {
    e2e(|| {
        let (mut a, _) = Node::init("a")?;
        let (mut b, _) = (Node::new("b")?, ());
        a.up(&[])?;
        b.cli_ok(&["join", &a.invite(&[])?])?;
        b.up(&[])?;
        let ids = [a.peer_id()?, b.peer_id()?];
        eventually(ONLINE_WITHIN, Duration::from_millis(250), || {
            all_see_each_other(&[(&a, &ids[0]), (&b, &ids[1])])
        })?;
        // Start-up work (Blender's version and devices) is over after a few seconds.
        thread::sleep(Duration::from_secs(5));
        let window = Duration::from_secs(5);
        for node in [&a, &b] {
            let pid = node.pid().context("not running")?;
            let before = cpu_time(pid)?;
            thread::sleep(window);
            let used = cpu_time(pid)? - before;
            ensure!(
                used < window / 10,
                "node {} used {used:?} of CPU in {window:?} while idle",
                node.name()
            );
        }
        Ok(())
    });
}
