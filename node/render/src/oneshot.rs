//! One Blender run of a script that answers once: [`finish`](crate::finish) and
//! [`collect`](crate::collect).
//!
//! ```text
//!  run ── writes SCRIPT ── blender --factory-startup -b -Y SCENE -P SCRIPT -- ARGS...
//!      ◀── stdout: @blendnet {"<answer>": {...}}\n     the first reply line is the answer
//!               (every other line, stdout or stderr, is Blender's log: the last kept for errors)
//! ```
//!
//! Scripts embedded in the scene do not run (`-Y`). The answer counts even when Blender then
//! exits badly (a crash while quitting loses nothing); no answer is an error with Blender's
//! last lines. Memory is bounded: one reply line of at most `max_reply` bytes, and
//! [`LOG_LINES`] log lines of at most [`MAX_LOG_LINE`] bytes each.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::protocol::REPLY_PREFIX;
use crate::scratch::{Scratch, TMPDIR};

/// Lines of Blender's output shown with a failure: enough for its error and what led to it.
pub(crate) const LOG_LINES: usize = 20;

/// Longest log line kept, in bytes: Blender's own lines are short; a longer one is cut.
pub(crate) const MAX_LOG_LINE: usize = 2000;

/// A script to run on a scene.
#[derive(Debug)]
pub(crate) struct ScriptRun<'a> {
    pub(crate) blender: &'a Path,
    pub(crate) scene: &'a Path,
    /// The script's text, written to `script_path` for the run and removed after it.
    pub(crate) script: &'static str,
    pub(crate) script_path: PathBuf,
    /// The script's arguments (after `--`).
    pub(crate) args: Vec<OsString>,
    pub(crate) timeout: Duration,
    /// Longest reply line read, in bytes.
    pub(crate) max_reply: usize,
}

/// Why a run gave no answer; each caller turns it into its own error.
#[derive(Debug)]
pub(crate) enum RunError {
    Spawn(std::io::Error),
    Script(std::io::Error),
    Timeout,
    NoAnswer { log: String },
}

/// Removes the script when the run ends, however it ends.
struct Written<'a>(&'a Path);

impl Drop for Written<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Runs the script and decodes its first reply line as `R`. Cancel-safe: a dropped call kills
/// Blender and removes the script.
pub(crate) async fn run<R: DeserializeOwned>(run: ScriptRun<'_>) -> Result<R, RunError> {
    tokio::fs::write(&run.script_path, run.script)
        .await
        .map_err(RunError::Script)?;
    let _written = Written(&run.script_path);
    // Beside the script, like it left behind only if this daemon is killed.
    let scratch = match run.script_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => Scratch::new_in(dir),
        _ => Scratch::new(),
    }
    .map_err(RunError::Spawn)?;
    let mut child = Command::new(run.blender)
        .env(TMPDIR, scratch.path())
        .arg("--factory-startup")
        .arg("-b")
        .arg("-Y")
        .arg(run.scene)
        .arg("-P")
        .arg(&run.script_path)
        .arg("--")
        .args(&run.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(RunError::Spawn)?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(RunError::Spawn(std::io::Error::other(
            "Blender's output was not captured",
        )));
    };
    let answer = async {
        let ((reply, out_log), (_, err_log)) = tokio::join!(
            read_output::<R>(stdout, run.max_reply),
            read_output::<R>(stderr, MAX_LOG_LINE),
        );
        let status = child.wait().await;
        (reply, out_log, err_log, status)
    };
    let (reply, out_log, err_log, status) = tokio::time::timeout(run.timeout, answer)
        .await
        .map_err(|_| RunError::Timeout)?;
    if let Some(reply) = reply {
        return Ok(reply);
    }
    let mut lines: Vec<String> = out_log.into_iter().chain(err_log).collect();
    lines.push(match status {
        Ok(status) => format!("(Blender {status})"),
        Err(e) => format!("(Blender's exit status is unknown: {e})"),
    });
    let log = lines[lines.len().saturating_sub(LOG_LINES)..].join("\n");
    Err(RunError::NoAnswer { log })
}

/// Reads a pipe to its end: the first reply line that decodes as `R`, and the last log lines.
/// A reply line that does not decode is logged (a broken script, said so rather than ignored).
async fn read_output<R: DeserializeOwned>(
    pipe: impl AsyncRead + Unpin,
    max_line: usize,
) -> (Option<R>, VecDeque<String>) {
    let mut reader = BufReader::new(pipe);
    let mut reply = None;
    let mut log = VecDeque::with_capacity(LOG_LINES);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a longer line is cut (and then cannot be a valid reply).
        match (&mut reader)
            .take(max_line as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => return (reply, log),
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        let line = match line.strip_prefix(REPLY_PREFIX) {
            Some(json) if reply.is_none() => match serde_json::from_str(json) {
                Ok(decoded) => {
                    reply = Some(decoded);
                    continue;
                }
                Err(e) => format!("unreadable reply from the script ({e}): {line}"),
            },
            _ => line.to_owned(),
        };
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(cut(line, MAX_LOG_LINE));
    }
}

/// `line` cut to at most `max` bytes, at a character boundary.
fn cut(mut line: String, max: usize) -> String {
    if line.len() > max {
        let mut end = max;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Reply {
        Answer { value: u32 },
    }

    #[tokio::test]
    async fn the_first_decodable_reply_is_the_answer_and_the_rest_is_log() {
        let output = "Blender 3.4.1\n\
                      @blendnet {\"answer\": {\"value\": \n\
                      @blendnet {\"answer\": {\"value\": 7}}\n\
                      @blendnet {\"answer\": {\"value\": 8}}\n\
                      Blender quit\n";
        let (reply, log) = read_output::<Reply>(output.as_bytes(), 1 << 10).await;
        assert_eq!(reply, Some(Reply::Answer { value: 7 }));
        assert_eq!(log.len(), 4, "{log:?}");
        assert!(log[1].starts_with("unreadable reply"), "{log:?}");
        assert_eq!(log[3], "Blender quit");
    }

    #[tokio::test]
    async fn log_and_reply_lines_are_bounded() {
        let long = "x".repeat(5000);
        let many: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let output = format!("@blendnet {{\"answer\": {{\"value\": 1}}}}{long}\n{many}");
        let (reply, log) = read_output::<Reply>(output.as_bytes(), 64).await;
        assert_eq!(reply, None, "a cut reply line must not decode");
        assert_eq!(log.len(), LOG_LINES);
        assert_eq!(log.back().map(String::as_str), Some("line 99"));
        assert!(log.iter().all(|l| l.len() <= 64 + '…'.len_utf8()));
    }

    /// Runs a fake Blender (a shell script given Blender's arguments: the script is `$6`).
    #[cfg(unix)]
    async fn fake_run(
        dir: &Path,
        body: &str,
        timeout: Duration,
    ) -> (Result<Reply, RunError>, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let fake = dir.join("blender");
        std::fs::write(&fake, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script_path = dir.join(".script.py");
        for _ in 0..20 {
            let result = run::<Reply>(ScriptRun {
                blender: &fake,
                scene: Path::new("scene.blend"),
                script: "line 1\nline 2\n",
                script_path: script_path.clone(),
                args: vec!["copy.blend".into()],
                timeout,
                max_reply: 1 << 10,
            })
            .await;
            // ETXTBSY: another test thread forked while the fake was open for writing.
            match result {
                Err(RunError::Spawn(e)) if e.raw_os_error() == Some(26) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return (other, script_path),
            }
        }
        panic!("the fake Blender never started");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn an_answer_counts_even_when_blender_then_fails() {
        let dir = tempfile::tempdir().unwrap();
        let body = "echo 'Blender 3.4.1'\n\
                    echo \"@blendnet {\\\"answer\\\": {\\\"value\\\": $(wc -l < \"$6\")}}\"\n\
                    exit 3";
        let (result, script) = fake_run(dir.path(), body, Duration::from_secs(30)).await;
        // The script was there for Blender to read (2 lines), and is gone after.
        assert_eq!(result.unwrap(), Reply::Answer { value: 2 });
        assert!(!script.exists());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn no_answer_gives_blenders_last_lines_and_exit() {
        let dir = tempfile::tempdir().unwrap();
        let body = "echo \"Error: File format is not supported in file '$4'\" >&2\nexit 1";
        let (result, script) = fake_run(dir.path(), body, Duration::from_secs(30)).await;
        let Err(RunError::NoAnswer { log }) = result else {
            panic!("{result:?}");
        };
        assert!(log.contains("not supported in file 'scene.blend'"), "{log}");
        assert!(log.ends_with("(Blender exit status: 1)"), "{log}");
        assert!(!script.exists());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_hung_blender_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let body = format!("echo $$ > '{}'\nexec sleep 60", pid_file.display());
        let started = std::time::Instant::now();
        let (result, script) = fake_run(dir.path(), &body, Duration::from_millis(500)).await;
        assert!(matches!(result, Err(RunError::Timeout)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!script.exists());
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let stat = PathBuf::from(format!("/proc/{}/stat", pid.trim()));
        // Killed: gone, or a zombie until tokio reaps it.
        for _ in 0..100 {
            match std::fs::read_to_string(&stat) {
                Err(_) => return,
                Ok(s) if s.contains(") Z ") => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("the fake Blender still runs after the timeout");
    }

    #[test]
    fn cut_keeps_characters_whole() {
        assert_eq!(cut("héllo".into(), 2), "h…");
        assert_eq!(cut("hello".into(), 5), "hello");
    }
}
