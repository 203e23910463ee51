//! The data directory: where one node keeps everything it owns on disk.
//!
//! One `blendnet` daemon owns one data directory. Several daemons on one machine (tests, or a
//! user who wants two nodes) each get their own with `--data-dir` or `BLENDNET_DATA_DIR`.
//! [`DataDir`] resolves it, creates it (mode 0700 on unix), and names every file in it, so no
//! other module builds a path by hand:
//!
//! | file | what | written by |
//! |---|---|---|
//! | `blendnet.toml` | configuration (optional) | the user |
//! | `state.redb` | roster, jobs, peers: everything the node must not lose | `state` |
//! | `api.token` | bearer token of the local HTTP API, mode 0600 | `api::publish` |
//! | `api.addr` | `IP:PORT` of the local HTTP API, written last | `api::publish` |
//! | `logs/` | daily-rotated `blendnet.<date>.log` | `logging` |
//! | `node.key` | this node's libp2p identity key, mode 0600 | the node |
//! | `mesh.key` | the mesh signing key (only on the machine that ran `init`), mode 0600 | the node |
//!
//! It also holds the two file primitives the rest of the daemon uses for files that must survive
//! a crash or must stay private: [`write_atomic`] (temporary file, fsync, rename, fsync of the
//! directory — DESIGN §11) and [`read_secret`] (refuses a key that other users can read, the way
//! `ssh` refuses a private key with loose permissions).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Environment variable that selects the data directory when `--data-dir` is not given. clap
/// reads it (`#[arg(long, env = DATA_DIR_ENV)]`); [`DataDir::resolve`] only sees the result.
pub const DATA_DIR_ENV: &str = "BLENDNET_DATA_DIR";

/// Mode for files that hold a secret (keys, the API token): owner read/write only.
pub const SECRET_MODE: u32 = 0o600;

/// Mode for files that other local users may read (the API address, which is not a secret: the
/// token guards the API).
pub const PUBLIC_MODE: u32 = 0o644;

/// Mode of a data directory this module creates: it holds keys, so only the owner may list it.
const DIR_MODE: u32 = 0o700;

/// Largest secret file [`read_secret`] reads. Keys and tokens are well under 1 KiB; a bigger
/// file is not a key, and reading it whole could exhaust memory.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// How many temporary names [`write_atomic`] tries before giving up. A collision needs another
/// writer of the same file in the same process with the same random suffix; a few tries is
/// plenty, and a bound keeps a broken file system from looping forever.
const TEMP_NAME_ATTEMPTS: u32 = 8;

/// The data directory of one node. Cheap to clone; holds only the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

/// Why the data directory could not be resolved or created.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Neither `--data-dir` nor `BLENDNET_DATA_DIR` was given and the platform has no data
    /// directory for this user (no home directory).
    #[error(
        "no data directory: this platform reports no home directory; pass --data-dir or set {DATA_DIR_ENV}"
    )]
    NoDefault,
    /// The directory could not be created.
    #[error("cannot create data directory {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// The path exists and is not a directory.
    #[error("data directory {path} exists and is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The path could not be made absolute (the current directory is gone).
    #[error("cannot make data directory {path} absolute")]
    Absolute {
        /// The path as given.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
}

impl DataDir {
    /// Resolves the data directory and creates it if missing.
    ///
    /// `explicit` is `--data-dir`, or `BLENDNET_DATA_DIR` when the flag is absent (clap reads
    /// the environment); without either, the platform data directory for `blendnet`
    /// (`~/.local/share/blendnet` on Linux, `~/Library/Application Support/blendnet` on macOS,
    /// `%APPDATA%\blendnet\data` on Windows).
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, DataDirError> {
        let path = match explicit {
            Some(path) => path,
            None => Self::platform_default().ok_or(DataDirError::NoDefault)?,
        };
        Self::open(path)
    }

    /// The platform data directory for `blendnet`, if this user has one.
    pub fn platform_default() -> Option<PathBuf> {
        directories::ProjectDirs::from("", "", "blendnet").map(|dirs| dirs.data_dir().to_owned())
    }

    /// Uses `path` as the data directory, creating it (and its parents) if missing.
    ///
    /// A directory this call creates gets mode 0700 on unix. An existing directory keeps its
    /// mode: the user chose it, and the secrets inside are 0600 on their own.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, DataDirError> {
        let path = path.into();
        let root = std::path::absolute(&path).map_err(|source| DataDirError::Absolute {
            path: path.clone(),
            source,
        })?;
        create_private_dir(&root).map_err(|source| DataDirError::Create {
            path: root.clone(),
            source,
        })?;
        if !root.is_dir() {
            return Err(DataDirError::NotADirectory { path: root });
        }
        Ok(Self { root })
    }

    /// The directory itself (absolute).
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `blendnet.toml`: the configuration file (may be absent).
    pub fn config(&self) -> PathBuf {
        self.root.join("blendnet.toml")
    }

    /// `state.redb`: the node's durable state.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.redb")
    }

    /// `api.addr`: `IP:PORT` of the running daemon's local HTTP API.
    pub fn api_addr(&self) -> PathBuf {
        self.root.join("api.addr")
    }

    /// `api.token`: the bearer token of the local HTTP API (mode 0600).
    pub fn api_token(&self) -> PathBuf {
        self.root.join("api.token")
    }

    /// `logs/`: the daily-rotated log files.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// `node.key`: this node's identity key (mode 0600).
    pub fn node_key(&self) -> PathBuf {
        self.root.join("node.key")
    }

    /// `mesh.key`: the mesh signing key, present only where the mesh was created (mode 0600).
    pub fn mesh_key(&self) -> PathBuf {
        self.root.join("mesh.key")
    }
}

impl std::fmt::Display for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.root.display().fmt(f)
    }
}

fn create_private_dir(path: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    #[cfg(not(unix))]
    let _ = DIR_MODE;
    builder.create(path)
}

/// Why [`write_atomic`] failed. The target file is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The path has no parent directory or no file name.
    #[error("cannot write {path}: not a file path")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Creating, writing, syncing or renaming failed.
    #[error("cannot write {path}")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
}

/// Replaces the file at `path` with `bytes`, atomically and durably.
///
/// Writes a temporary file in the same directory with permissions `mode` (unix; ignored
/// elsewhere), fsyncs it, renames it over `path`, then fsyncs the directory so the rename
/// itself survives a crash. A reader sees the old content or the new, never a mix; after a
/// crash the file holds one of the two. Use [`SECRET_MODE`] for anything secret: the file is
/// never readable by others, not even for a moment.
///
/// Blocking: call it from a blocking thread in async code.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(WriteError::NotAFile {
            path: path.to_owned(),
        });
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let io_err = |source| WriteError::Io {
        path: path.to_owned(),
        source,
    };

    let (temp_path, mut file) = create_temp(dir, name, mode).map_err(io_err)?;
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp_path, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage whether or not this succeeds.
        let _ = fs::remove_file(&temp_path);
    }
    result.map_err(io_err)
}

fn create_temp(dir: &Path, name: &std::ffi::OsStr, mode: u32) -> io::Result<(PathBuf, File)> {
    let mut last_err = None;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(
            ".{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        let temp_path = dir.join(temp_name);
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        match options.open(&temp_path) {
            Ok(file) => return Ok((temp_path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no temporary file name was free")))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    // Windows cannot open a directory as a file; NTFS journals the rename itself.
    Ok(())
}

/// Why [`read_secret`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadSecretError {
    /// The file does not exist (the caller may create it).
    #[error("{path} does not exist")]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// Group or other users have some access to the file.
    #[error(
        "{path} is accessible by other users (mode {mode:04o}); it holds a secret: run `chmod 600 {path}`"
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than any secret we write.
    #[error("{path} is larger than {MAX_SECRET_BYTES} bytes, so it is not a blendnet secret")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The path is a directory or other non-file.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Reading failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
}

/// Reads a secret file (a key, the API token), refusing one that group or others can access.
///
/// The permission check is made on the opened file, so the file checked is the file read. On
/// non-unix platforms the permission check is skipped (ACLs are not modelled).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, ReadSecretError> {
    let io_err = |source| ReadSecretError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ReadSecretError::NotFound {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(ReadSecretError::NotAFile {
            path: path.to_owned(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ReadSecretError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(ReadSecretError::TooLarge {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::new();
    // `take` bounds the read even if the file grows between the check and the read.
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(ReadSecretError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_is_created_and_names_files() {
        let tmp = tempfile::tempdir().unwrap();
        let want = tmp.path().join("a").join("node");
        let dir = DataDir::resolve(Some(want.clone())).unwrap();
        assert!(want.is_dir());
        assert_eq!(dir.path(), want);
        assert_eq!(dir.config(), want.join("blendnet.toml"));
        assert_eq!(dir.state_db(), want.join("state.redb"));
        assert_eq!(dir.api_addr(), want.join("api.addr"));
        assert_eq!(dir.api_token(), want.join("api.token"));
        assert_eq!(dir.logs(), want.join("logs"));
        assert_eq!(dir.node_key(), want.join("node.key"));
        assert_eq!(dir.mesh_key(), want.join("mesh.key"));
    }

    #[cfg(unix)]
    #[test]
    fn created_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path().join("node")).unwrap();
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(DataDir::open(&file).is_err());
    }

    #[test]
    fn no_flag_uses_platform_default() {
        // Only checks the shape: the default is the platform data dir for "blendnet".
        if let Some(path) = DataDir::platform_default() {
            assert!(path.to_string_lossy().contains("blendnet"));
        }
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f.txt");
        write_atomic(&path, b"one", PUBLIC_MODE).unwrap();
        write_atomic(&path, b"two", PUBLIC_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.txt")]);
    }

    #[test]
    fn write_atomic_into_missing_dir_fails_and_names_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("missing").join("f");
        let err = write_atomic(&path, b"x", SECRET_MODE).unwrap_err();
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[cfg(unix)]
    #[test]
    fn secret_round_trip_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("node.key");
        write_atomic(&path, b"secret", SECRET_MODE).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_secret(&path).unwrap(), b"secret");
    }

    #[cfg(unix)]
    #[test]
    fn read_secret_refuses_group_readable_file() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("mesh.key");
        fs::write(&path, b"secret").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_secret(&path).unwrap_err();
        assert!(matches!(err, ReadSecretError::TooOpen { mode: 0o640, .. }));
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
    }

    #[test]
    fn read_secret_missing_is_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let err = read_secret(&tmp.path().join("nope")).unwrap_err();
        assert!(matches!(err, ReadSecretError::NotFound { .. }));
    }

    #[test]
    fn read_secret_refuses_huge_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big");
        write_atomic(
            &path,
            &vec![0u8; MAX_SECRET_BYTES as usize + 1],
            SECRET_MODE,
        )
        .unwrap();
        assert!(matches!(
            read_secret(&path),
            Err(ReadSecretError::TooLarge { .. })
        ));
    }
}
