//! The last step of a sliced frame, on the merger: Blender turns the merged EXR into the file
//! the artist would get from a local render (denoised if the scene asks, through the scene's
//! compositor, in its output format and color management, named as Blender names frames).
//! The script is [`FINISH_PY`]; see its docstring for how.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::protocol::REPLY_PREFIX;

/// The script Blender runs to finish a frame.
pub const FINISH_PY: &str = include_str!("finish.py");

/// How long finishing a frame may take: loading the scene, denoising and compositing a large
/// frame take seconds to a minute; more means Blender is stuck.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(600);

/// Most output kept from Blender, for the reply and an error's last lines.
const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Lines of Blender's output shown with a failure.
const LOG_LINES: usize = 20;

/// Why a frame could not be finished.
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    #[error("cannot run Blender {blender}")]
    Spawn {
        blender: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the finishing script to {path}")]
    Script {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The scene asks for denoising and this Blender has no OpenImageDenoise.
    #[error("{0}")]
    DenoiserMissing(String),
    /// The script named the problem.
    #[error("finishing the frame failed ({kind}): {message}")]
    Failed { kind: String, message: String },
    #[error("Blender did not finish the frame within {} s", FINISH_TIMEOUT.as_secs())]
    Timeout,
    #[error("Blender exited without finishing the frame; its last lines:\n{log}")]
    NoAnswer { log: String },
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Finished { output: PathBuf },
    Error { kind: String, message: String },
}

/// Finishes `frame` of `scene` from `merged` into `out_dir` (an existing directory); returns
/// the file written. Cancel-safe: a dropped call kills Blender.
pub async fn finish(
    blender: &Path,
    scene: &Path,
    merged: &Path,
    frame: i32,
    out_dir: &Path,
) -> Result<PathBuf, FinishError> {
    let script = out_dir.join(".blendnet-finish.py");
    tokio::fs::write(&script, FINISH_PY)
        .await
        .map_err(|source| FinishError::Script {
            path: script.clone(),
            source,
        })?;
    let child = Command::new(blender)
        .arg("--factory-startup")
        .arg("-b")
        .arg("-Y")
        .arg(scene)
        .arg("-P")
        .arg(&script)
        .arg("--")
        .arg(merged)
        .arg(frame.to_string())
        .arg(out_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| FinishError::Spawn {
            blender: blender.to_owned(),
            source,
        })?;
    let output = tokio::time::timeout(FINISH_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| FinishError::Timeout)?
        .map_err(|source| FinishError::Spawn {
            blender: blender.to_owned(),
            source,
        })?;
    let _ = tokio::fs::remove_file(&script).await;
    let stdout =
        String::from_utf8_lossy(&output.stdout[..output.stdout.len().min(MAX_OUTPUT_BYTES)]);
    let reply = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(REPLY_PREFIX))
        .find_map(|json| serde_json::from_str::<Reply>(json).ok());
    match reply {
        Some(Reply::Finished { output }) => Ok(output),
        Some(Reply::Error { kind, message }) if kind == "denoiser_missing" => {
            Err(FinishError::DenoiserMissing(message))
        }
        Some(Reply::Error { kind, message }) => Err(FinishError::Failed { kind, message }),
        None => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let all: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
            let log = all[all.len().saturating_sub(LOG_LINES)..].join("\n");
            Err(FinishError::NoAnswer { log })
        }
    }
}
