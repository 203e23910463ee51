//! The `local` provider: "instances" are processes on this machine, each in its own folder
//! under a root, started with the user data a cloud instance would get. For trying BlendNet's
//! cloud peers without a cloud, and for tests of the whole provisioning loop.
//!
//! An instance's folder holds `instance.json` (what [`Provider::list`] reports, written
//! atomically), `user-data` and `log`. The process is started as `COMMAND... --user-data
//! <folder>/user-data --data-dir <folder>/node` in a session of its own, so it outlives the
//! provisioner like a cloud machine does; a provisioner that restarts lists it again from the
//! folders. Unix only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{CloudError, Instance, InstanceState, InstanceType, LaunchSpec, Price, Provider};

/// The one instance type: the whole machine.
pub const LOCAL_TYPE: &str = "local";
/// The one zone.
pub const LOCAL_ZONE: &str = "local";

/// What `instance.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    instance: Instance,
    pid: u32,
}

/// Processes on this machine as instances.
#[derive(Debug)]
pub struct LocalProvider {
    root: PathBuf,
    command: Vec<String>,
    children: Mutex<HashMap<String, Child>>,
    counter: AtomicU64,
    per_hour: f64,
}

impl LocalProvider {
    /// Instances live in folders under `root`; each runs `command` (program and leading
    /// arguments, e.g. `["/usr/bin/blendnet", "enroll"]`).
    pub fn new(root: impl Into<PathBuf>, command: Vec<String>) -> LocalProvider {
        LocalProvider {
            root: root.into(),
            command,
            children: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            per_hour: 0.0,
        }
    }

    /// The price [`Provider::prices`] reports for the instances (US dollars per hour; 0 unless
    /// set): this machine costs nothing more to run, but a price lets the budget and the cost
    /// estimate be tried out (and tested) without a cloud.
    pub fn with_price(mut self, per_hour: f64) -> LocalProvider {
        self.per_hour = per_hour;
        self
    }

    fn folder(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn write_record(&self, record: &Record) -> Result<(), CloudError> {
        let folder = self.folder(&record.instance.id);
        let text = serde_json::to_vec_pretty(record).map_err(|e| CloudError::Io(e.to_string()))?;
        let tmp = folder.join("instance.json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, folder.join("instance.json")))
            .map_err(|e| io_error(&folder, e))
    }

    fn records(&self) -> Result<Vec<Record>, CloudError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&self.root, e)),
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join("instance.json");
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            match serde_json::from_slice::<Record>(&text) {
                Ok(mut record) => {
                    if record.instance.state.is_alive() && !self.is_running(&record) {
                        record.instance.state = InstanceState::Terminated;
                        self.write_record(&record)?;
                    }
                    records.push(record);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable local instance record")
                }
            }
        }
        records.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        Ok(records)
    }

    /// Whether the instance's process still runs (reaping it if it is our child).
    fn is_running(&self, record: &Record) -> bool {
        if let Ok(mut children) = self.children.lock()
            && let Some(child) = children.get_mut(&record.instance.id)
        {
            return match child.try_wait() {
                Ok(None) => true,
                _ => {
                    children.remove(&record.instance.id);
                    false
                }
            };
        }
        // Not our child (we restarted): alive unless gone or a zombie.
        std::fs::read_to_string(format!("/proc/{}/stat", record.pid)).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    }

    fn launch_now(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        if spec.instance_type != LOCAL_TYPE {
            return Err(CloudError::BadRequest(format!(
                "the local provider has one instance type, {LOCAL_TYPE:?}, not {:?}",
                spec.instance_type
            )));
        }
        let Some((program, args)) = self.command.split_first() else {
            return Err(CloudError::BadRequest(
                "no command to run instances with".into(),
            ));
        };
        let now = unix_now();
        let id = format!(
            "local-{now}-{}-{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::SeqCst)
        );
        let folder = self.folder(&id);
        std::fs::create_dir_all(folder.join("node")).map_err(|e| io_error(&folder, e))?;
        let user_data = folder.join("user-data");
        std::fs::write(&user_data, &spec.user_data).map_err(|e| io_error(&user_data, e))?;
        let log = std::fs::File::create(folder.join("log")).map_err(|e| io_error(&folder, e))?;
        let err = log.try_clone().map_err(|e| io_error(&folder, e))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .arg("--user-data")
            .arg(&user_data)
            .arg("--data-dir")
            .arg(folder.join("node"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt as _;
            command.process_group(0);
        }
        let child = command
            .spawn()
            .map_err(|e| CloudError::Io(format!("cannot start {program}: {e}")))?;
        let instance = Instance {
            id: id.clone(),
            instance_type: LOCAL_TYPE.into(),
            zone: LOCAL_ZONE.into(),
            state: InstanceState::Running,
            launched_at: now,
            tags: spec.tags.clone(),
        };
        self.write_record(&Record {
            instance: instance.clone(),
            pid: child.id(),
        })?;
        if let Ok(mut children) = self.children.lock() {
            children.insert(id, child);
        }
        Ok(instance)
    }

    fn terminate_now(&self, ids: &[String]) -> Result<(), CloudError> {
        let records = self.records()?;
        for id in ids {
            let Some(mut record) = records.iter().find(|r| &r.instance.id == id).cloned() else {
                return Err(CloudError::BadRequest(format!("no local instance {id}")));
            };
            if record.instance.state.is_alive() {
                // The whole process group: the daemon and the Blenders it started.
                let _ = Command::new("kill")
                    .args(["-TERM", "--", &format!("-{}", record.pid)])
                    .status();
                record.instance.state = InstanceState::Terminated;
                self.write_record(&record)?;
            }
        }
        Ok(())
    }
}

impl Provider for LocalProvider {
    fn name(&self) -> &str {
        "local"
    }

    fn instance_types(&self) -> BoxFuture<'_, Result<Vec<InstanceType>, CloudError>> {
        Box::pin(async {
            Ok(vec![InstanceType {
                name: LOCAL_TYPE.into(),
                cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
                ram_bytes: 0,
                gpus: 0,
            }])
        })
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Instance, CloudError>> {
        Box::pin(async move { self.launch_now(spec) })
    }

    fn list<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, CloudError>> {
        Box::pin(async move {
            Ok(self
                .records()?
                .into_iter()
                .map(|r| r.instance)
                .filter(|i| i.tags.get(key).is_some_and(|v| v == value))
                .collect())
        })
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move { self.terminate_now(ids) })
    }

    fn prices<'a>(
        &'a self,
        instance_type: &'a str,
        spot: bool,
    ) -> BoxFuture<'a, Result<Vec<Price>, CloudError>> {
        Box::pin(async move {
            Ok(vec![Price {
                instance_type: instance_type.into(),
                zone: LOCAL_ZONE.into(),
                per_hour: self.per_hour,
                spot,
            }])
        })
    }
}

fn io_error(path: &Path, e: std::io::Error) -> CloudError {
    CloudError::Io(format!("{}: {e}", path.display()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Tags as a map, for [`LaunchSpec::tags`].
pub fn tags<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TAG_MESH, TAG_PROVISIONER};

    fn spec(mesh: &str) -> LaunchSpec {
        LaunchSpec {
            instance_type: LOCAL_TYPE.into(),
            zone: None,
            user_data: "{\"hello\":1}".into(),
            tags: tags([(TAG_MESH, mesh), (TAG_PROVISIONER, "me")]),
            spot: true,
        }
    }

    /// A stand-in for `blendnet enroll`: records its arguments, then waits to be stopped.
    fn fake_instance(dir: &Path) -> Vec<String> {
        let script = dir.join("fake-instance.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$@\" > \"$(dirname \"$2\")/args\"\nexec sleep 600\n",
        )
        .unwrap();
        vec!["/bin/sh".into(), script.display().to_string()]
    }

    #[tokio::test]
    async fn instances_start_list_by_tag_and_terminate_and_a_new_provider_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("instances");
        let provider = LocalProvider::new(&root, fake_instance(dir.path()));
        let a = provider.launch(&spec("mesh-a")).await.unwrap();
        let b = provider.launch(&spec("mesh-b")).await.unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.state, InstanceState::Running);
        // The instance got its user data and its own data dir.
        let folder = root.join(&a.id);
        assert_eq!(
            std::fs::read_to_string(folder.join("user-data")).unwrap(),
            "{\"hello\":1}"
        );
        let mut args = String::new();
        for _ in 0..100 {
            args = std::fs::read_to_string(folder.join("args")).unwrap_or_default();
            if !args.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            args.contains("--data-dir") && args.contains("/node"),
            "{args}"
        );
        let listed = provider.list(TAG_MESH, "mesh-a").await.unwrap();
        assert_eq!(
            listed.iter().map(|i| &i.id).collect::<Vec<_>>(),
            vec![&a.id]
        );

        // A provisioner that restarts lists them from their folders, running.
        let again = LocalProvider::new(&root, fake_instance(dir.path()));
        let listed = again.list(TAG_PROVISIONER, "me").await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|i| i.state == InstanceState::Running));
        again.terminate(std::slice::from_ref(&a.id)).await.unwrap();
        let states: Vec<InstanceState> = provider
            .list(TAG_PROVISIONER, "me")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.state)
            .collect();
        assert_eq!(
            states,
            vec![InstanceState::Terminated, InstanceState::Running]
        );
        // Terminating twice is no error; an unknown id is.
        again.terminate(std::slice::from_ref(&a.id)).await.unwrap();
        assert!(matches!(
            again.terminate(&["nope".into()]).await,
            Err(CloudError::BadRequest(_))
        ));
        provider
            .terminate(std::slice::from_ref(&b.id))
            .await
            .unwrap();
        // An instance whose process ended is listed as terminated.
        let c = provider.launch(&spec("mesh-c")).await.unwrap();
        let pid = serde_json::from_slice::<Record>(
            &std::fs::read(root.join(&c.id).join("instance.json")).unwrap(),
        )
        .unwrap()
        .pid;
        Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .unwrap();
        let mut state = InstanceState::Running;
        for _ in 0..100 {
            state = provider.list(TAG_MESH, "mesh-c").await.unwrap()[0].state;
            if state == InstanceState::Terminated {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(state, InstanceState::Terminated);
    }

    #[tokio::test]
    async fn a_wrong_type_or_command_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let provider = LocalProvider::new(dir.path(), fake_instance(dir.path()));
        let mut wrong = spec("m");
        wrong.instance_type = "c7a.large".into();
        let err = provider.launch(&wrong).await.unwrap_err();
        assert!(err.to_string().contains("c7a.large"), "{err}");
        let missing = LocalProvider::new(dir.path(), vec!["/nonexistent/blendnet".into()]);
        let err = missing.launch(&spec("m")).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/blendnet"), "{err}");
    }
}
