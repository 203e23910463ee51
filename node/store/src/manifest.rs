//! Manifests: the list of files that make up a scene, `(relative path, blob hash, size,
//! executable)`, stored as a blob of its own and named by its hash (DESIGN §1, §5).
//!
//! A manifest comes from another peer, so its paths are untrusted. [`Manifest::validate`]
//! (run on every decode and before materializing) accepts only paths that every peer can
//! create inside a workspace and nowhere else: relative, `/`-separated, no `..`, `.` or empty
//! components, no backslash, drive prefix or NUL, bounded lengths, and no two entries that
//! collide on a case-insensitive file system (Windows, macOS) or where one file would have to
//! be the directory of another.
//!
//! Wire format: [`blendnet_proto::encode`] (bincode 2) of [`Manifest`], decoded with
//! [`blendnet_proto::decode`] under [`MAX_MANIFEST_BYTES`].

use std::collections::HashMap;

use blendnet_proto::BlobHash;
use serde::{Deserialize, Serialize};

use crate::error::ManifestError;
use crate::{MAX_COMPONENT_BYTES, MAX_MANIFEST_BYTES, MAX_MANIFEST_ENTRIES, MAX_PATH_BYTES};

/// The files of a scene, sorted by path when made by `import_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// One entry per file.
    pub entries: Vec<ManifestEntry>,
}

/// One file of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative, `/`-separated path, e.g. `textures/wood.png`.
    pub path: String,
    /// The file's content.
    pub hash: BlobHash,
    /// The file's size in bytes.
    pub size: u64,
    /// Whether the file is executable (Unix).
    pub executable: bool,
}

/// A manifest path no peer may write, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest path {path:?} {problem}")]
pub struct InvalidManifest {
    /// The offending path (cut to 300 characters).
    pub path: String,
    /// What is wrong with it.
    pub problem: PathProblem,
}

/// What is wrong with a manifest path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// The path is empty.
    #[error("is empty")]
    Empty,
    /// The path starts with `/`.
    #[error("is absolute")]
    Absolute,
    /// A component is `..`.
    #[error("climbs out with `..`")]
    ParentComponent,
    /// A component is `.`.
    #[error("has a `.` component")]
    DotComponent,
    /// Two slashes in a row, or one at the start or end.
    #[error("has an empty component")]
    EmptyComponent,
    /// A backslash, which Windows reads as a separator.
    #[error("contains a backslash")]
    Backslash,
    /// A drive prefix such as `C:`.
    #[error("starts with a drive prefix")]
    DrivePrefix,
    /// A NUL byte.
    #[error("contains a NUL byte")]
    Nul,
    /// Over [`MAX_PATH_BYTES`] or a component over [`MAX_COMPONENT_BYTES`].
    #[error("is too long")]
    TooLong,
    /// Another entry has the same path.
    #[error("appears twice")]
    Duplicate,
    /// Another entry's path differs only in case.
    #[error("differs only in case from {other:?}, which collides on Windows and macOS")]
    CaseCollision {
        /// The other path.
        other: String,
    },
    /// The path runs through another entry, which is a file.
    #[error("needs {other:?} to be a directory, but it is a file in the manifest")]
    FileAsDirectory {
        /// The other path.
        other: String,
    },
    /// The manifest has more than [`MAX_MANIFEST_ENTRIES`] entries.
    #[error("is one of more than {MAX_MANIFEST_ENTRIES} entries")]
    TooManyEntries,
}

fn invalid(path: &str, problem: PathProblem) -> InvalidManifest {
    InvalidManifest {
        path: path.chars().take(300).collect(),
        problem,
    }
}

/// Checks one path on its own.
fn check_path(path: &str) -> Result<(), PathProblem> {
    if path.is_empty() {
        return Err(PathProblem::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathProblem::TooLong);
    }
    if path.contains('\0') {
        return Err(PathProblem::Nul);
    }
    if path.contains('\\') {
        return Err(PathProblem::Backslash);
    }
    if path.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    let bytes = path.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(PathProblem::DrivePrefix);
    }
    for component in path.split('/') {
        match component {
            "" => return Err(PathProblem::EmptyComponent),
            "." => return Err(PathProblem::DotComponent),
            ".." => return Err(PathProblem::ParentComponent),
            c if c.len() > MAX_COMPONENT_BYTES => return Err(PathProblem::TooLong),
            _ => {}
        }
    }
    Ok(())
}

impl Manifest {
    /// Checks that every path can be created inside a workspace on any peer, and nowhere
    /// else (see the module docs). The error names the first offending path.
    pub fn validate(&self) -> Result<(), InvalidManifest> {
        if self.entries.len() > MAX_MANIFEST_ENTRIES {
            let last = self.entries.last().map(|e| e.path.as_str()).unwrap_or("");
            return Err(invalid(last, PathProblem::TooManyEntries));
        }
        // Case-folded path → the entry's own path.
        let mut files: HashMap<String, &str> = HashMap::with_capacity(self.entries.len());
        for entry in &self.entries {
            check_path(&entry.path).map_err(|p| invalid(&entry.path, p))?;
            let folded = entry.path.to_lowercase();
            if let Some(other) = files.insert(folded, &entry.path) {
                let problem = if other == entry.path {
                    PathProblem::Duplicate
                } else {
                    PathProblem::CaseCollision {
                        other: other.to_owned(),
                    }
                };
                return Err(invalid(&entry.path, problem));
            }
        }
        for entry in &self.entries {
            let folded = entry.path.to_lowercase();
            // Every proper prefix ending before a '/' must not be a file.
            for (i, _) in folded.match_indices('/') {
                if let Some(other) = files.get(&folded[..i]) {
                    return Err(invalid(
                        &entry.path,
                        PathProblem::FileAsDirectory {
                            other: (*other).to_owned(),
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    /// The manifest's wire and storage encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        blendnet_proto::encode(self)
    }

    /// Decodes and validates a manifest from untrusted bytes, refusing more than
    /// [`MAX_MANIFEST_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let manifest: Manifest =
            blendnet_proto::decode(bytes, MAX_MANIFEST_BYTES).map_err(ManifestError::Malformed)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Total bytes of the files.
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> ManifestEntry {
        ManifestEntry {
            path: path.to_owned(),
            hash: BlobHash::of(path.as_bytes()),
            size: path.len() as u64,
            executable: false,
        }
    }

    fn manifest(paths: &[&str]) -> Manifest {
        Manifest {
            entries: paths.iter().map(|p| entry(p)).collect(),
        }
    }

    #[test]
    fn every_bad_path_is_refused_naming_it() {
        let long_component = "x".repeat(MAX_COMPONENT_BYTES + 1);
        let long_path = vec!["abc"; MAX_PATH_BYTES / 4 + 1].join("/");
        let cases: Vec<(Vec<&str>, &str, PathProblem)> = vec![
            (vec![""], "", PathProblem::Empty),
            (
                vec!["ok.txt", "/etc/passwd"],
                "/etc/passwd",
                PathProblem::Absolute,
            ),
            (
                vec!["../escape.txt"],
                "../escape.txt",
                PathProblem::ParentComponent,
            ),
            (
                vec!["a/../../escape"],
                "a/../../escape",
                PathProblem::ParentComponent,
            ),
            (vec!["a/./b"], "a/./b", PathProblem::DotComponent),
            (vec!["a//b"], "a//b", PathProblem::EmptyComponent),
            (vec!["dir/"], "dir/", PathProblem::EmptyComponent),
            (vec!["a\\..\\b"], "a\\..\\b", PathProblem::Backslash),
            (
                vec!["C:/Windows/x"],
                "C:/Windows/x",
                PathProblem::DrivePrefix,
            ),
            (vec!["c:evil"], "c:evil", PathProblem::DrivePrefix),
            (vec!["a\0b"], "a\0b", PathProblem::Nul),
            (vec![&long_component], &long_component, PathProblem::TooLong),
            (vec![&long_path], &long_path, PathProblem::TooLong),
            (
                vec!["scene.blend", "scene.blend"],
                "scene.blend",
                PathProblem::Duplicate,
            ),
            (
                vec!["tex/Wood.png", "tex/wood.png"],
                "tex/wood.png",
                PathProblem::CaseCollision {
                    other: "tex/Wood.png".into(),
                },
            ),
            (
                vec!["a", "a/b"],
                "a/b",
                PathProblem::FileAsDirectory { other: "a".into() },
            ),
            (
                vec!["x/Tex", "x/tex/b.png"],
                "x/tex/b.png",
                PathProblem::FileAsDirectory {
                    other: "x/Tex".into(),
                },
            ),
        ];
        for (paths, offending, problem) in cases {
            let err = manifest(&paths).validate().unwrap_err();
            assert_eq!(err.problem, problem, "{paths:?}");
            assert_eq!(err.path, offending.chars().take(300).collect::<String>());
            assert!(
                err.to_string().contains(&format!("{:?}", err.path)),
                "{err}"
            );
            // Decoding refuses the same manifest.
            let bytes = manifest(&paths).to_bytes();
            assert!(
                matches!(Manifest::from_bytes(&bytes), Err(ManifestError::Invalid(e)) if e == err)
            );
        }
    }

    #[test]
    fn a_valid_manifest_round_trips() {
        let mut m = manifest(&[
            "scene.blend",
            "textures/wood.png",
            "textures/metal/rust.exr",
            "a b/ünïcode.txt",
            "..hidden",
            "a.b",
        ]);
        m.entries[0].executable = true;
        m.validate().unwrap();
        let back = Manifest::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            m.total_size(),
            m.entries.iter().map(|e| e.path.len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn decoding_is_bounded() {
        assert!(matches!(
            Manifest::from_bytes(&[1, 2, 3]),
            Err(ManifestError::Malformed(_))
        ));
        let big = vec![0u8; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            Manifest::from_bytes(&big),
            Err(ManifestError::TooLarge { .. })
        ));
        let too_many = Manifest {
            entries: (0..=MAX_MANIFEST_ENTRIES)
                .map(|i| entry(&format!("f{i}")))
                .collect(),
        };
        assert!(matches!(
            too_many.validate(),
            Err(InvalidManifest {
                problem: PathProblem::TooManyEntries,
                ..
            })
        ));
    }
}
