//! The `local` source: a directory of Kubernetes YAML (the simulator's
//! input) and, optionally, the simulator's state file, both watched.
//!
//! On any change the whole directory is re-read (manifest directories are
//! small) with a per-file cache keyed by content, so an unchanged broken
//! file is not reported again on every reload. A file that stops parsing
//! keeps serving the objects it last held: a half-saved edit must not make
//! workloads vanish. A deleted file's objects go away.
//!
//! Editors and shell redirection (`>`) rewrite a file in place: truncate,
//! then write. A read between the two sees an empty file, which parses as
//! "no objects"; taken at face value, every workload in that file would
//! vanish for a moment and, if the write that follows does not parse, for
//! good. So a file that held objects and now reads empty keeps them until
//! it has stayed empty for [`EMPTY_STABLE`]: emptying a file on purpose
//! still takes effect, on a later re-read.
//!
//! Besides filesystem events, the directory is re-read every second: the
//! state file may appear after we start (the simulator comes up later) in a
//! directory that did not exist yet, and a missed event must not leave the
//! view stale for long.

use super::manifests;
use super::{LocalClusterState, local_cluster};
use crate::indexer::SourceEvent;
use crate::metrics::Metrics;
use crate::model::{Kind, Object, Rejection};
use crate::store::StoreUpdate;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
// Tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

/// Editors write in steps (truncate, write, rename): wait this long after
/// an event for the rest before reading.
const SETTLE: Duration = Duration::from_millis(30);
const POLL: Duration = Duration::from_secs(1);
/// How long a file that held objects must read empty before it is taken
/// to hold none. Longer than any truncate-then-write gap of an editor, and
/// shorter than [`POLL`], so the periodic re-read that follows applies it.
pub const EMPTY_STABLE: Duration = Duration::from_millis(500);
/// Bounds on what is read, so that pointing at `/` cannot exhaust memory.
const MAX_FILES: usize = 10_000;
const MAX_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "manifest directory {path} cannot be read: {source}; pass an existing directory with --manifests"
    )]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch {path} for changes: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

struct FileEntry {
    hash: u64,
    /// The objects of the last version of this file that parsed.
    objects: Vec<Object>,
    /// When the file, which held objects, was first read empty (it keeps
    /// `hash` and `objects` of its last content meanwhile).
    empty_since: Option<Instant>,
}

pub struct LocalSource {
    dir: PathBuf,
    state_file: Option<PathBuf>,
    metrics: Arc<Metrics>,
    files: BTreeMap<PathBuf, FileEntry>,
    state: LocalClusterState,
    state_hash: Option<u64>,
}

impl LocalSource {
    pub fn new(dir: PathBuf, state_file: Option<PathBuf>, metrics: Arc<Metrics>) -> Self {
        Self {
            dir,
            state_file,
            metrics,
            files: BTreeMap::new(),
            state: LocalClusterState::default(),
            state_hash: None,
        }
    }

    /// Reads everything (cached by content) and returns the objects.
    pub fn load(&mut self) -> Result<Vec<Object>, LocalError> {
        let mut paths = Vec::new();
        list(&self.dir, 0, &mut paths).map_err(|source| LocalError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        paths.sort();
        let now = Instant::now();
        let mut files = BTreeMap::new();
        for path in paths {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Gone between listing and reading: the next event says so.
                Err(_) => continue,
            };
            let hash = hash(&bytes);
            let mut previous = self.files.remove(&path);
            if let Some(mut entry) = previous.take_if(|e| e.hash == hash) {
                // Rewritten with the same content: the empty spell is over.
                entry.empty_since = None;
                files.insert(path, entry);
                continue;
            }
            if bytes.iter().all(u8::is_ascii_whitespace)
                && let Some(mut entry) = previous.take_if(|e| !e.objects.is_empty())
            {
                let since = *entry.empty_since.get_or_insert(now);
                if now.duration_since(since) < EMPTY_STABLE {
                    tracing::debug!(path = %path.display(), objects = entry.objects.len(),
                        "file reads empty (being rewritten?); still serving its objects");
                    files.insert(path, entry);
                    continue;
                }
                tracing::info!(path = %path.display(), "file stayed empty; its objects are withdrawn");
                previous = Some(entry);
            }
            let origin = path.display().to_string();
            let objects = match manifests::parse(&path, &bytes) {
                Ok(parsed) => {
                    for r in &parsed.rejections {
                        self.metrics.reject(&origin, r);
                    }
                    parsed.objects
                }
                Err(reason) => {
                    let kept = previous.map(|p| p.objects).unwrap_or_default();
                    self.metrics.reject(
                        &origin,
                        &Rejection {
                            kind: "File".into(),
                            object: origin.clone(),
                            reason: format!(
                                "does not parse as YAML/JSON ({reason}); still serving the {} object(s) it held before",
                                kept.len()
                            ),
                        },
                    );
                    kept
                }
            };
            files.insert(
                path,
                FileEntry {
                    hash,
                    objects,
                    empty_since: None,
                },
            );
        }
        self.files = files;
        self.load_state();

        let mut objects: Vec<Object> = self
            .files
            .values()
            .flat_map(|f| f.objects.iter().cloned())
            .collect();
        local_cluster::complete(&self.state, &mut objects);
        Ok(objects)
    }

    fn load_state(&mut self) {
        let Some(path) = &self.state_file else { return };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                if self.state_hash.take().is_some() || self.state != LocalClusterState::default() {
                    tracing::info!(path = %path.display(), error = %e,
                        "simulator state file gone; pod IPs and ClusterIPs come from the manifests only");
                }
                self.state = LocalClusterState::default();
                return;
            }
        };
        let hash = hash(&bytes);
        if self.state_hash == Some(hash) {
            return;
        }
        self.state_hash = Some(hash);
        match LocalClusterState::parse(&bytes) {
            Ok(state) => self.state = state,
            Err(e) => self.metrics.reject(
                &path.display().to_string(),
                &Rejection {
                    kind: "File".into(),
                    object: path.display().to_string(),
                    reason: format!(
                        "simulator state does not parse ({e}); keeping the last state read"
                    ),
                },
            ),
        }
    }

    /// Sends the first full state, then a new one whenever the files change.
    pub async fn run(mut self, tx: mpsc::Sender<SourceEvent>) -> Result<(), LocalError> {
        let (wake_tx, mut wake) = mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(e) if matches!(e.kind, EventKind::Access(_)) => {}
                // A full channel already holds a wake-up: nothing to add.
                Ok(_) => {
                    let _ = wake_tx.try_send(());
                }
                Err(e) => tracing::warn!(error = %e, "file watch error"),
            })
            .map_err(|source| LocalError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|source| LocalError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        let mut state_dir_watched = false;

        let mut sent = self.load()?;
        let kinds = Kind::ALL.to_vec();
        let send_all = |objects: Vec<Object>| {
            SourceEvent::Update(StoreUpdate::Replace {
                kinds: kinds.clone(),
                objects,
            })
        };
        if tx.send(send_all(sent.clone())).await.is_err()
            || tx.send(SourceEvent::Synced).await.is_err()
        {
            return Ok(());
        }
        let mut poll = tokio::time::interval(POLL);
        loop {
            // The state file's directory may only exist once the simulator
            // is up; start watching it as soon as it does.
            if !state_dir_watched
                && let Some(dir) = self.state_file.as_ref().and_then(|f| f.parent())
                && dir.is_dir()
            {
                state_dir_watched = watcher.watch(dir, RecursiveMode::NonRecursive).is_ok();
            }
            tokio::select! {
                woke = wake.recv() => {
                    if woke.is_none() { return Ok(()); }
                    tokio::time::sleep(SETTLE).await;
                    while wake.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            let objects = match self.load() {
                Ok(o) => o,
                Err(e) => {
                    // The directory itself went away: keep serving what it
                    // held; it may come back.
                    tracing::warn!(error = %e, "cannot re-read manifests; still serving the last ones");
                    continue;
                }
            };
            if objects != sent {
                tracing::info!(objects = objects.len(), "manifests changed");
                if tx.send(send_all(objects.clone())).await.is_err() {
                    return Ok(());
                }
                sent = objects;
            }
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn list(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        // Editors' swap and backup files start with a dot.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            if depth < MAX_DEPTH {
                // A subdirectory that vanished mid-walk is not an error.
                let _ = list(&path, depth + 1, out);
            }
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            && out.len() < MAX_FILES
        {
            out.push(path);
        }
    }
    Ok(())
}
