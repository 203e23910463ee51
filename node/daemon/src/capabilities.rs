//! What this machine offers the mesh: cores, memory, free disk, GPUs and Blender (DESIGN §7).
//!
//! [`Capabilities::detect`] is a plain blocking function (Blender and GPU discovery run
//! programs under timeouts, see [`blendnet_render::discovery`]): call it from a blocking thread.

use std::path::{Path, PathBuf};

use blendnet_render::discovery::{BLENDER_ENV, BlenderError, BlenderInfo, find_blender, gpus};
use serde::{Deserialize, Serialize};

/// What this node can do, advertised to its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The `blendnet` version.
    pub daemon_version: String,
    /// Logical cores this process may use.
    pub cores: usize,
    /// Memory available to this process, in bytes (the cgroup limit in a container).
    pub ram_bytes: u64,
    /// Free space on the disk that holds the data directory, in bytes (0 if unknown).
    pub free_disk_bytes: u64,
    /// GPU names, as the driver reports them (NVIDIA only for now).
    pub gpus: Vec<String>,
    /// The Blender this node renders with, if any.
    pub blender: Option<BlenderInfo>,
}

impl Capabilities {
    /// Detects this machine's capabilities. `blender` is the configured executable
    /// (config key or flag); `BLENDNET_BLENDER` and `PATH` are read from the environment.
    ///
    /// Blocking: runs `blender --version` and its device probe (up to
    /// [`BLENDER_VERSION_TIMEOUT`](blendnet_render::discovery::BLENDER_VERSION_TIMEOUT) each)
    /// and `nvidia-smi` (up to
    /// [`GPU_QUERY_TIMEOUT`](blendnet_render::discovery::GPU_QUERY_TIMEOUT)). The error, if
    /// any, says why `blender` is `None`.
    pub fn detect(data_dir: &Path, blender: Option<&Path>) -> (Self, Option<BlenderError>) {
        let env = std::env::var_os(BLENDER_ENV);
        let path_var = std::env::var_os("PATH");
        let scratch = probe_scratch(data_dir);
        let found = find_blender(blender, env.as_deref(), path_var.as_deref(), &scratch);
        let (blender, error) = match found {
            Ok(info) => (Some(info), None),
            Err(e) => (None, Some(e)),
        };
        let (ram_bytes, free_disk_bytes) = memory_and_disk(data_dir);
        let capabilities = Self {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ram_bytes,
            free_disk_bytes,
            gpus: path_var
                .as_deref()
                .map(|p| gpus(p, &scratch))
                .unwrap_or_default(),
            blender,
        };
        (capabilities, error)
    }
}

/// The folder in the data directory where the probes' programs get their temporary folders
/// (Blender leaves one behind when it is killed, as it is with this daemon), emptied of what
/// a killed daemon left there. If it cannot be made, the data directory itself.
fn probe_scratch(data_dir: &Path) -> PathBuf {
    let scratch = data_dir.join(PROBE_SCRATCH);
    let _ = std::fs::remove_dir_all(&scratch);
    match std::fs::create_dir_all(&scratch) {
        Ok(()) => scratch,
        Err(error) => {
            tracing::warn!(path = %scratch.display(), %error, "cannot make the probes' folder");
            data_dir.to_owned()
        }
    }
}

/// [`probe_scratch`]'s folder, in the data directory.
const PROBE_SCRATCH: &str = "probe-tmp";

/// Total memory (the cgroup limit if lower) and free space on the disk holding `data_dir`.
fn memory_and_disk(data_dir: &Path) -> (u64, u64) {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let mut ram = system.total_memory();
    if let Some(limits) = system.cgroup_limits()
        && limits.total_memory > 0
    {
        ram = ram.min(limits.total_memory);
    }
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let free = free_space_for(
        &dir,
        disks
            .list()
            .iter()
            .map(|d| (d.mount_point(), d.available_space())),
    );
    (ram, free.unwrap_or(0))
}

/// The free space of the mount that holds `path`: the longest mount point that is a prefix.
fn free_space_for<'a>(
    path: &Path,
    mounts: impl IntoIterator<Item = (&'a Path, u64)>,
) -> Option<u64> {
    mounts
        .into_iter()
        .filter(|(mount, _)| path.starts_with(mount))
        .max_by_key(|(mount, _)| mount.components().count())
        .map(|(_, free)| free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_uses_longest_mount() {
        let mounts = [
            (Path::new("/"), 1u64),
            (Path::new("/home"), 2),
            (Path::new("/home/user/data"), 3),
            (Path::new("/ho"), 4),
        ];
        assert_eq!(free_space_for(Path::new("/home/user/x"), mounts), Some(2));
        assert_eq!(free_space_for(Path::new("/var"), mounts), Some(1));
        assert_eq!(free_space_for(Path::new("/var"), []), None);
    }

    #[test]
    fn detect_reports_machine() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("no-blender");
        // What a daemon killed during its probes left.
        let stale = tmp
            .path()
            .join(PROBE_SCRATCH)
            .join("blendnet-blender-x/blender_y");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("z"), b"left").unwrap();
        let (caps, err) = Capabilities::detect(tmp.path(), Some(&missing));
        let scratch = std::fs::read_dir(tmp.path().join(PROBE_SCRATCH)).unwrap();
        assert_eq!(scratch.count(), 0, "the probes' folder is emptied");
        assert!(caps.cores >= 1);
        assert!(caps.ram_bytes > 0);
        assert_eq!(caps.daemon_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(caps.blender, None);
        assert!(matches!(err, Some(BlenderError::Missing { .. })), "{err:?}");
    }
}
