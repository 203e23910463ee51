//! Cloud peers on this machine: instances enroll with the user data a provisioner gives them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use blendnet_tests::{Node, e2e, eventually, has_error_line, string_array};
use serde_json::json;

const ONLINE_WITHIN: Duration = Duration::from_secs(30);

#[test]
fn an_instance_enrolls_with_its_user_data_once_and_a_replayed_token_is_refused() {
    e2e(|| {
        let (mut a, mesh) = Node::init("provisioner")?;
        a.up(&[])?;
        let token = a.invite(&["--ttl", "10m", "--roles", "render"])?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let user_data = json!({
            "version": 1,
            "mesh": mesh,
            "bootstrap": [a.bootstrap_addr()?],
            "provisioner": a.peer_id()?,
            "token": token,
            "expires_at": now + 600,
        })
        .to_string();

        let mut instance = Node::new("instance")?;
        let file = instance.data_dir().with_file_name("user-data");
        std::fs::write(&file, &user_data)?;
        let mut args = Node::default_up_args();
        args.extend(["--user-data".to_string(), file.display().to_string()]);
        instance.start_command("enroll", &args)?;
        instance.wait_api(ONLINE_WITHIN)?;
        eventually(ONLINE_WITHIN, Duration::from_millis(250), || {
            let status = instance.status()?;
            ensure!(status["member"] == true, "not a member yet: {status}");
            ensure!(status["mesh_id"] == mesh.as_str(), "another mesh: {status}");
            ensure!(
                string_array(&status, "roles")? == ["render"],
                "an instance gets the render role only: {status}"
            );
            Ok(())
        })
        .context("the instance did not enroll")?;
        // Started again (a reboot), it is a member already: the spent token is not used again.
        instance.stop()?;
        instance.start_command("enroll", &args)?;
        instance.wait_api(ONLINE_WITHIN)?;
        ensure!(instance.status()?["member"] == true);

        // The same user data on another machine: the token was spent.
        let mut copy = Node::new("copy")?;
        let file = copy.data_dir().with_file_name("user-data");
        std::fs::write(&file, &user_data)?;
        let mut args = Node::default_up_args();
        args.extend(["--user-data".to_string(), file.display().to_string()]);
        copy.start_command("enroll", &args)?;
        let status = copy.wait_exit(ONLINE_WITHIN)?;
        let stderr = copy.stderr()?;
        ensure!(
            !status.success() && has_error_line(&stderr) && stderr.contains("already been used"),
            "a replayed token was not refused ({status}):\n{stderr}"
        );

        // Expired or garbled user data stops an instance before it touches its data dir.
        let late = Node::new("late")?;
        let file = late.data_dir().with_file_name("user-data");
        let mut expired: serde_json::Value = serde_json::from_str(&user_data)?;
        expired["expires_at"] = json!(now - 1);
        std::fs::write(&file, expired.to_string())?;
        let out = late.cli(&["enroll", "--user-data", &file.display().to_string()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("expired"),
            "expired user data: {stderr}"
        );
        std::fs::write(&file, "#!/bin/sh\necho not ours\n")?;
        let out = late.cli(&["enroll", "--user-data", &file.display().to_string()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("not BlendNet's"),
            "foreign user data: {stderr}"
        );
        ensure!(
            late.status().is_err(),
            "nothing may run after bad user data"
        );
        Ok(())
    });
}
