//! The last step of a sliced frame, on the merger: Blender turns the merged EXR into the file
//! the artist would get from a local render (denoised if the scene asks, through the scene's
//! compositor, in its output format and color management, named as Blender names frames).
//! The script is [`FINISH_PY`]; see its docstring for how.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::oneshot::{self, RunError, ScriptRun};
use crate::protocol::MAX_REPLY_BYTES;

/// The script Blender runs to finish a frame.
pub const FINISH_PY: &str = include_str!("finish.py");

/// How long finishing a frame may take: loading the scene, denoising and compositing a large
/// frame take seconds to a minute; more means Blender is stuck.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(600);

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
    let run = ScriptRun {
        blender,
        scene,
        script: FINISH_PY,
        script_path: out_dir.join(".blendnet-finish.py"),
        args: vec![merged.into(), frame.to_string().into(), out_dir.into()],
        timeout: FINISH_TIMEOUT,
        max_reply: MAX_REPLY_BYTES,
    };
    let script_path = run.script_path.clone();
    match oneshot::run::<Reply>(run).await {
        Ok(Reply::Finished { output }) => Ok(output),
        Ok(Reply::Error { kind, message }) if kind == "denoiser_missing" => {
            Err(FinishError::DenoiserMissing(message))
        }
        Ok(Reply::Error { kind, message }) => Err(FinishError::Failed { kind, message }),
        Err(RunError::Spawn(source)) => Err(FinishError::Spawn {
            blender: blender.to_owned(),
            source,
        }),
        Err(RunError::Script(source)) => Err(FinishError::Script {
            path: script_path,
            source,
        }),
        Err(RunError::Timeout) => Err(FinishError::Timeout),
        Err(RunError::NoAnswer { log }) => Err(FinishError::NoAnswer { log }),
    }
}
