//! Collecting a scene for submission, on the submitter: Blender lists every file the scene needs
//! and saves a copy of it whose paths are all relative to the original's folder; the upload is
//! the copy and those files, laid out as they are on disk under the project's folder, so the
//! relative paths inside the `.blend` resolve on the render peers.
//!
//! ```text
//!  collect ── blender --factory-startup -b -Y SCENE.blend -P collect.py -- COPY.blend
//!      ◀── stdout: @blendnet {"collected": {"blend", "files", "missing", "absolute",
//!                                            "scene"}}
//!                  @blendnet {"error": {"kind", "message"}}
//!
//!  project_root: the deepest folder holding SCENE.blend and every file    /work/proj
//!  upload_list:  COPY.blend            -> shots/shot.blend                (the scene's place)
//!                /work/proj/tex/a.png  -> tex/a.png                        (each file's place)
//! ```
//!
//! The script is [`COLLECT_PY`], the add-on's `addon/blendnet/collect.py` (the add-on collects
//! with the same code); see its docstring for what counts as a needed file. Scripts in the scene
//! do not run (`-Y`): a scene's file list does not depend on its drivers, render peers load it
//! with `-Y` too, and a submitter need not trust a `.blend` it was given to list its files.
//! The original `.blend` is never written.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::oneshot::{self, RunError, ScriptRun};

/// The script Blender runs to collect a scene (`-P`).
pub const COLLECT_PY: &str = include_str!("../../../addon/blendnet/collect.py");

/// How long collecting may take: loading a big scene (and its libraries) takes up to a minute;
/// more means Blender is stuck.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest answer read: a project's file list. 100 000 files of 200-byte paths take 20 MB of
/// JSON; a larger list is not a scene a mesh renders.
pub const MAX_COLLECT_REPLY_BYTES: usize = 64 << 20;

/// What the scene needs, as the script found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    /// The scene file, absolute.
    pub blend: PathBuf,
    /// Every existing file the scene needs besides the `.blend` itself, absolute and sorted:
    /// images (every frame of a sequence, every tile of a UDIM set), movie clips, sounds, fonts,
    /// libraries (indirect ones too) and what they use, volumes, cache files, point caches,
    /// fluid caches, geometry-node bakes. Packed files are inside the `.blend`.
    pub files: Vec<PathBuf>,
    /// Paths the scene needs that are not there, as the scene names them made absolute, sorted.
    /// A sequence or UDIM set is missing only when none of its files exist.
    pub missing: Vec<PathBuf>,
    /// Paths the copy still names absolutely (those inside linked libraries, and on Windows
    /// those on another drive): a render peer looks for them at that path.
    #[serde(default)]
    pub absolute: Vec<PathBuf>,
    pub scene: SceneInfo,
}

/// The scene's render settings that decide how a job is split and delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SceneInfo {
    pub name: String,
    /// `CYCLES`, `BLENDER_EEVEE`, `BLENDER_EEVEE_NEXT`, `BLENDER_WORKBENCH`, …
    pub engine: String,
    pub frame_start: i32,
    pub frame_end: i32,
    pub frame_step: i32,
    /// Cycles' samples; `None` for other engines.
    pub samples: Option<u32>,
    /// Cycles denoises the final render (the scene and some rendered view layer ask for it).
    pub denoise: bool,
    /// The output path template (`render.filepath`), `//` made absolute against the scene's
    /// folder; it may hold `#` for the frame number.
    pub output: PathBuf,
    /// `PNG`, `OPEN_EXR_MULTILAYER`, `FFMPEG`, …
    pub file_format: String,
    pub is_movie: bool,
    /// Blender's version, like `3.4.1`.
    pub blender: String,
    /// The scene has a camera.
    pub camera: bool,
}

/// Why a scene could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("cannot run Blender {blender}")]
    Spawn {
        blender: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the collecting script to {path}")]
    Script {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The script named the problem (`scene_unreadable`, `copy_failed`, `unsupported_path`,
    /// `bad_request`, `collect_failed`).
    #[error("collecting {scene} failed ({kind}): {message}")]
    Failed {
        scene: PathBuf,
        kind: String,
        message: String,
    },
    #[error("Blender did not collect {scene} within {} s", COLLECT_TIMEOUT.as_secs())]
    Timeout { scene: PathBuf },
    /// Blender stopped before the script answered: most often a file it cannot read (not a
    /// `.blend`, damaged, or from a newer Blender), which its last lines say.
    #[error("Blender could not open or collect {scene}; its last lines:\n{log}")]
    NoAnswer { scene: PathBuf, log: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Collected(Collected),
    Error { kind: String, message: String },
}

/// Collects `scene` with `blender` and saves its copy to `copy` (in an existing folder; a file
/// there is replaced). Cancel-safe: a dropped call kills Blender.
pub async fn collect(blender: &Path, scene: &Path, copy: &Path) -> Result<Collected, CollectError> {
    let name = copy.file_name().unwrap_or_default().to_string_lossy();
    let script_path = copy.with_file_name(format!(".{name}.collect.py"));
    let run = ScriptRun {
        blender,
        scene,
        script: COLLECT_PY,
        script_path: script_path.clone(),
        args: vec![copy.into()],
        timeout: COLLECT_TIMEOUT,
        max_reply: MAX_COLLECT_REPLY_BYTES,
    };
    let scene = scene.to_owned();
    match oneshot::run::<Reply>(run).await {
        Ok(Reply::Collected(collected)) => Ok(collected),
        Ok(Reply::Error { kind, message }) => Err(CollectError::Failed {
            scene,
            kind,
            message,
        }),
        Err(RunError::Spawn(source)) => Err(CollectError::Spawn {
            blender: blender.to_owned(),
            source,
        }),
        Err(RunError::Script(source)) => Err(CollectError::Script {
            path: script_path,
            source,
        }),
        Err(RunError::Timeout) => Err(CollectError::Timeout { scene }),
        Err(RunError::NoAnswer { log }) => Err(CollectError::NoAnswer { scene, log }),
    }
}

/// The deepest folder holding the `.blend` and every collected file: the upload's root, so that
/// every path the copy names relatively stays inside the upload. On Windows, files on several
/// drives have no common folder: the root is then empty.
pub fn project_root(collected: &Collected) -> PathBuf {
    let folder = collected.blend.parent().unwrap_or(Path::new(""));
    let mut root: Vec<Component<'_>> = folder.components().collect();
    for file in &collected.files {
        let parent = file.parent().unwrap_or(Path::new(""));
        let shared = root
            .iter()
            .zip(parent.components())
            .take_while(|(a, b)| *a == b)
            .count();
        root.truncate(shared);
    }
    root.iter().collect()
}

/// What to upload: the copy at the original scene's place, and every collected file at its
/// place, each as (source on disk, path in the upload relative to [`project_root`], with `/`
/// between names). The scene comes first, then the files in [`Collected::files`]' order.
pub fn upload_list(collected: &Collected, copy: &Path) -> Vec<(PathBuf, String)> {
    let root = project_root(collected);
    std::iter::once((copy.to_owned(), relative(&collected.blend, &root)))
        .chain(
            collected
                .files
                .iter()
                .map(|file| (file.clone(), relative(file, &root))),
        )
        .collect()
}

/// `path` under `root`, names joined with `/`. A path outside `root` (on another drive than
/// the rest) keeps its names without its drive or root.
fn relative(path: &Path, root: &Path) -> String {
    let inside = path.strip_prefix(root).unwrap_or(path);
    inside
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_string_lossy()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collected(blend: &str, files: &[&str]) -> Collected {
        Collected {
            blend: blend.into(),
            files: files.iter().map(PathBuf::from).collect(),
            missing: Vec::new(),
            absolute: Vec::new(),
            scene: SceneInfo {
                name: "Scene".into(),
                engine: "CYCLES".into(),
                frame_start: 1,
                frame_end: 1,
                frame_step: 1,
                samples: Some(8),
                denoise: false,
                output: "/tmp/".into(),
                file_format: "PNG".into(),
                is_movie: false,
                blender: "3.4.1".into(),
                camera: true,
            },
        }
    }

    #[test]
    fn the_root_is_the_scenes_folder_when_everything_is_below_it() {
        let c = collected(
            "/p/shots/shot.blend",
            &["/p/shots/tex/a.png", "/p/shots/b.png"],
        );
        assert_eq!(project_root(&c), Path::new("/p/shots"));
        let alone = collected("/p/shots/shot.blend", &[]);
        assert_eq!(project_root(&alone), Path::new("/p/shots"));
    }

    #[test]
    fn the_root_climbs_to_the_deepest_common_folder() {
        let c = collected(
            "/work/proj/shots/shot.blend",
            &[
                "/work/proj/assets/props.blend",
                "/work/proj/shots/tex/a.png",
            ],
        );
        assert_eq!(project_root(&c), Path::new("/work/proj"));
        // A common name prefix is not a common folder.
        let c = collected("/work/proj/shot.blend", &["/work/project/a.png"]);
        assert_eq!(project_root(&c), Path::new("/work"));
        let c = collected("/work/shot.blend", &["/usr/share/fonts/a.ttf"]);
        assert_eq!(project_root(&c), Path::new("/"));
    }

    #[test]
    fn the_upload_keeps_the_layout_under_the_root() {
        let c = collected(
            "/work/proj/shots/shot.blend",
            &[
                "/work/proj/assets/props.blend",
                "/work/proj/shots/seq/f_0001.png",
            ],
        );
        let list = upload_list(&c, Path::new("/tmp/x/copy.blend"));
        assert_eq!(
            list,
            vec![
                (
                    PathBuf::from("/tmp/x/copy.blend"),
                    "shots/shot.blend".into()
                ),
                (
                    PathBuf::from("/work/proj/assets/props.blend"),
                    "assets/props.blend".into()
                ),
                (
                    PathBuf::from("/work/proj/shots/seq/f_0001.png"),
                    "shots/seq/f_0001.png".into()
                ),
            ]
        );
        let at_root = collected("/shot.blend", &["/tex/a.png"]);
        let list = upload_list(&at_root, Path::new("/c.blend"));
        assert_eq!(list[0].1, "shot.blend");
        assert_eq!(list[1].1, "tex/a.png");
    }

    #[test]
    fn the_reply_decodes_as_the_script_writes_it() {
        let json = r#"{"collected": {"blend": "/p/s.blend", "files": ["/p/a.png"],
            "missing": ["/p/b.png"], "absolute": [], "scene": {"name": "Scene",
            "engine": "BLENDER_EEVEE", "frame_start": 1, "frame_end": 250, "frame_step": 1,
            "samples": null, "denoise": false, "output": "/tmp/", "file_format": "PNG",
            "is_movie": false, "blender": "3.4.1", "camera": true}}}"#;
        let Ok(Reply::Collected(c)) = serde_json::from_str::<Reply>(json) else {
            panic!("the reply does not decode");
        };
        assert_eq!(c.missing, vec![PathBuf::from("/p/b.png")]);
        assert_eq!(c.scene.samples, None);
    }
}
