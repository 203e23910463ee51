//! Delivery: the submitting peer puts a job's finished frames into the job's output directory,
//! whoever rendered and merged them, and whether or not the command that submitted is still
//! there.
//!
//! The output directory of each job submitted here is kept in redb (`job_outputs`); so is each
//! output delivered (`job_delivered`), with the files it became. After every change to such a
//! job the board actor hands its finished outputs (merged frames of sample-split jobs, whole-frame
//! results of the others: [`blendnet_core::job::Job::outputs`]) to [`Deliveries::update`], which
//! fetches each new one from the mesh, lays it out in a staging folder and copies its files into
//! the output directory, each written to a temporary name and renamed, so a file that appears
//! there is complete. A failed delivery is tried again on the next change or anti-entropy round;
//! a restarted daemon goes on with what it had not delivered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blendnet_proto::{BlobHash, JobId};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::blobs::Blobs;
use crate::board::BoardMessage;

/// Job id → its output directory (UTF-8 path), for jobs submitted on this node with one.
const OUT_DIRS: TableDefinition<'static, &'static [u8], &'static str> =
    TableDefinition::new("job_outputs");

/// Job id ‖ output manifest hash → the files it became (JSON list of paths).
const DELIVERED: TableDefinition<'static, &'static [u8], &'static str> =
    TableDefinition::new("job_delivered");

/// What this node delivered of a job, for the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputsView {
    /// Where the frames go.
    pub dir: PathBuf,
    /// The files delivered so far, sorted.
    pub files: Vec<PathBuf>,
    /// Outputs finished on the mesh and not yet in `dir`.
    pub pending: usize,
    /// The last delivery error, if the latest try failed.
    pub error: Option<String>,
}

/// The delivery side of the board actor.
#[derive(Debug)]
pub struct Deliveries {
    database: Arc<redb::Database>,
    blobs: Blobs,
    /// `<data>/work`: staging folders go in `<job>/deliver/`.
    work_dir: PathBuf,
    tx: mpsc::Sender<BoardMessage>,
    in_flight: HashSet<(JobId, BlobHash)>,
    /// Outputs known finished per job, delivered or not.
    known: BTreeMap<JobId, HashSet<BlobHash>>,
    /// Outputs delivered per job, read from redb once: every change to a job asks.
    delivered: HashMap<JobId, HashSet<BlobHash>>,
    /// Output folders as read or set (`None`: the job has none here), likewise.
    out_dirs: HashMap<JobId, Option<PathBuf>>,
    errors: BTreeMap<JobId, String>,
}

fn key(job: &JobId, hash: &BlobHash) -> [u8; 64] {
    let mut k = [0; 64];
    k[..32].copy_from_slice(&job.0);
    k[32..].copy_from_slice(&hash.0);
    k
}

impl Deliveries {
    pub fn new(
        database: Arc<redb::Database>,
        blobs: Blobs,
        work_dir: PathBuf,
        tx: mpsc::Sender<BoardMessage>,
    ) -> Deliveries {
        Deliveries {
            database,
            blobs,
            work_dir,
            tx,
            in_flight: HashSet::new(),
            known: BTreeMap::new(),
            delivered: HashMap::new(),
            out_dirs: HashMap::new(),
            errors: BTreeMap::new(),
        }
    }

    /// Records where `job`'s frames go. Kept across restarts.
    pub fn set_out_dir(&mut self, job: &JobId, dir: &Path) -> Result<(), String> {
        self.out_dirs.insert(*job, Some(dir.to_path_buf()));
        let text = dir
            .to_str()
            .ok_or_else(|| format!("the output directory {} is not UTF-8", dir.display()))?;
        let write = || -> Result<(), redb::Error> {
            let txn = self.database.begin_write()?;
            txn.open_table(OUT_DIRS)?.insert(job.0.as_slice(), text)?;
            txn.commit()?;
            Ok(())
        };
        write().map_err(|e| format!("saving the output directory: {e}"))
    }

    /// Where `job`'s frames go, if it was submitted here with an output directory.
    pub fn out_dir(&mut self, job: &JobId) -> Option<PathBuf> {
        if let Some(dir) = self.out_dirs.get(job) {
            return dir.clone();
        }
        let dir = self.read_out_dir(job);
        self.out_dirs.insert(*job, dir.clone());
        dir
    }

    fn read_out_dir(&self, job: &JobId) -> Option<PathBuf> {
        let read = || -> Result<Option<PathBuf>, redb::Error> {
            let txn = self.database.begin_read()?;
            let table = match txn.open_table(OUT_DIRS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(table
                .get(job.0.as_slice())?
                .map(|v| PathBuf::from(v.value())))
        };
        read()
            .inspect_err(|e| tracing::error!(%job, error = %e, "cannot read the output directory"))
            .ok()
            .flatten()
    }

    /// Every job with an output directory.
    pub fn jobs(&self) -> Vec<JobId> {
        let read = || -> Result<Vec<JobId>, redb::Error> {
            let txn = self.database.begin_read()?;
            let table = match txn.open_table(OUT_DIRS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut jobs = Vec::new();
            for row in table.iter()? {
                let (k, _) = row?;
                if let Ok(id) = <[u8; 32]>::try_from(k.value()) {
                    jobs.push(JobId(id));
                }
            }
            Ok(jobs)
        };
        read()
            .inspect_err(|e| tracing::error!(error = %e, "cannot list output directories"))
            .unwrap_or_default()
    }

    /// The outputs of `job` delivered so far.
    fn delivered(&mut self, job: &JobId) -> &mut HashSet<BlobHash> {
        if !self.delivered.contains_key(job) {
            let read = || -> Result<HashSet<BlobHash>, redb::Error> {
                let txn = self.database.begin_read()?;
                let table = match txn.open_table(DELIVERED) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashSet::new()),
                    Err(e) => return Err(e.into()),
                };
                let (low, high) = (key(job, &BlobHash([0; 32])), key(job, &BlobHash([255; 32])));
                let mut hashes = HashSet::new();
                for row in table.range(low.as_slice()..=high.as_slice())? {
                    let (k, _) = row?;
                    if let Ok(hash) = <[u8; 32]>::try_from(&k.value()[32..]) {
                        hashes.insert(BlobHash(hash));
                    }
                }
                Ok(hashes)
            };
            let hashes = read()
                .inspect_err(|e| tracing::error!(%job, error = %e, "cannot read deliveries"))
                .unwrap_or_default();
            self.delivered.insert(*job, hashes);
        }
        self.delivered.entry(*job).or_default()
    }

    fn delivered_files(&self, job: &JobId, hash: &BlobHash) -> Option<Vec<PathBuf>> {
        let read = || -> Result<Option<Vec<PathBuf>>, redb::Error> {
            let txn = self.database.begin_read()?;
            let table = match txn.open_table(DELIVERED) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(table
                .get(key(job, hash).as_slice())?
                .and_then(|v| serde_json::from_str(v.value()).ok()))
        };
        read().ok().flatten()
    }

    /// Starts delivering every output of `job` not delivered yet (and not on its way).
    pub fn update(&mut self, job: JobId, outputs: impl IntoIterator<Item = BlobHash>) {
        let Some(dir) = self.out_dir(&job) else {
            return;
        };
        let outputs: Vec<BlobHash> = outputs.into_iter().collect();
        self.known.entry(job).or_default().extend(&outputs);
        for hash in outputs {
            if self.in_flight.contains(&(job, hash)) || self.delivered(&job).contains(&hash) {
                continue;
            }
            self.in_flight.insert((job, hash));
            let blobs = self.blobs.clone();
            let staging = self
                .work_dir
                .join(job.to_string())
                .join("deliver")
                .join(hash.to_string());
            let dir = dir.clone();
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let result = deliver(&blobs, hash, &staging, &dir).await;
                let _ = tokio::fs::remove_dir_all(&staging).await;
                let _ = tx.send(BoardMessage::Delivered { job, hash, result }).await;
            });
        }
    }

    /// A delivery ended: records it (or its error, to be retried).
    pub fn finished(&mut self, job: JobId, hash: BlobHash, result: Result<Vec<PathBuf>, String>) {
        self.in_flight.remove(&(job, hash));
        match result {
            Ok(files) => {
                let json = serde_json::to_string(&files).unwrap_or_else(|_| "[]".into());
                let write = || -> Result<(), redb::Error> {
                    let txn = self.database.begin_write()?;
                    txn.open_table(DELIVERED)?
                        .insert(key(&job, &hash).as_slice(), json.as_str())?;
                    txn.commit()?;
                    Ok(())
                };
                if let Err(e) = write() {
                    tracing::error!(%job, %hash, error = %e, "cannot record a delivery");
                }
                self.delivered(&job).insert(hash);
                self.errors.remove(&job);
                tracing::info!(%job, %hash, files = ?files, "frames delivered");
            }
            Err(e) => {
                tracing::warn!(%job, %hash, error = %e, "delivery failed; will try again");
                self.errors.insert(job, e);
            }
        }
    }

    /// Jobs whose latest delivery failed.
    pub fn failed_jobs(&self) -> Vec<JobId> {
        self.errors.keys().copied().collect()
    }

    /// What was delivered of `job`, if it has an output directory here.
    pub fn view(&mut self, job: &JobId) -> Option<OutputsView> {
        let dir = self.out_dir(job)?;
        let mut files = Vec::new();
        let mut pending = 0;
        for hash in self.known.get(job).into_iter().flatten() {
            match self.delivered_files(job, hash) {
                Some(f) => files.extend(f),
                None => pending += 1,
            }
        }
        files.sort();
        Some(OutputsView {
            dir,
            files,
            pending,
            error: self.errors.get(job).cloned(),
        })
    }
}

/// Fetches the output manifest `hash`, lays it out in `staging`, and copies its files into
/// `dir` (each through a temporary name, renamed when complete). Returns the files written.
pub async fn deliver(
    blobs: &Blobs,
    hash: BlobHash,
    staging: &Path,
    dir: &Path,
) -> Result<Vec<PathBuf>, String> {
    let _ = tokio::fs::remove_dir_all(staging).await;
    blobs
        .get(hash, staging.to_path_buf(), None)
        .await
        .map_err(|e| format!("fetching {hash}: {e}"))?;
    let (staging, dir) = (staging.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || copy_tree(&staging, &staging, &dir))
        .await
        .map_err(|e| e.to_string())?
}

/// Copies the files under `from` (the staging root is `root`) to the same relative paths under
/// `to`, writable by the user (the store's files are read-only).
fn copy_tree(root: &Path, from: &Path, to: &Path) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    let entries = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if kind.is_dir() {
            written.extend(copy_tree(root, &path, to)?);
            continue;
        }
        let relative = path.strip_prefix(root).map_err(|e| e.to_string())?;
        let target = to.join(relative);
        let parent = target.parent().unwrap_or(to);
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = parent.join(format!(".{name}.blendnet-part"));
        std::fs::copy(&path, &temporary).map_err(|e| format!("{}: {e}", temporary.display()))?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("{}: {e}", temporary.display()))?;
        std::fs::rename(&temporary, &target).map_err(|e| format!("{}: {e}", target.display()))?;
        written.push(target);
    }
    Ok(written)
}
