//! Which identities a node may obtain: those of the pods running on it now.
//!
//! One trait, so the service does not care where pod placement comes from:
//! [`LocalClusterDirectory`] reads the local cluster's state file
//! ([`weft_local_cluster`], local mode); a
//! Kubernetes implementation would list pods by `spec.nodeName`.

use futures::future::BoxFuture;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;
use weft_identity_api::SpiffeId;
use weft_local_cluster::{LocalClusterState, LocalPod};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A pod with this namespace and service account runs on the node.
    OnNode { pod: String },
    /// None does; the string says what was found instead, for the refusal.
    NotOnNode(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    #[error(
        "cannot read cluster state {path}: {reason} (is the simulator running? `weft-sim status`)"
    )]
    Unavailable { path: PathBuf, reason: String },
    #[error("cannot list pods from the Kubernetes API: {0}")]
    Api(String),
}

pub trait WorkloadDirectory: Send + Sync + 'static {
    /// Does a pod running on `node` use `identity`'s namespace and service account?
    fn placement<'a>(
        &'a self,
        node: &'a str,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Placement, WorkloadsError>>;
}

/// The simulator's state file (`docs/simulator.md`). Pods come and go, so the
/// file is re-read whenever its modification time or size changes; between
/// changes the parsed pods are reused (one `stat` per request).
pub struct LocalClusterDirectory {
    path: PathBuf,
    cache: Mutex<Option<Cached>>,
}

struct Cached {
    stamp: (SystemTime, u64),
    pods: Vec<LocalPod>,
}

impl LocalClusterDirectory {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache: Mutex::new(None),
        }
    }

    fn pods(&self) -> Result<Vec<LocalPod>, WorkloadsError> {
        let unavailable = |reason: String| WorkloadsError::Unavailable {
            path: self.path.clone(),
            reason,
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| unavailable(e.to_string()))?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.stamp == stamp) {
            return Ok(c.pods.clone());
        }
        let bytes = std::fs::read(&self.path).map_err(|e| unavailable(e.to_string()))?;
        let state = LocalClusterState::parse(&bytes)
            .map_err(|e| unavailable(format!("invalid JSON: {e}")))?;
        *cache = Some(Cached {
            stamp,
            pods: state.pods.clone(),
        });
        Ok(state.pods)
    }
}

impl WorkloadDirectory for LocalClusterDirectory {
    fn placement<'a>(
        &'a self,
        node: &'a str,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Placement, WorkloadsError>> {
        Box::pin(async move {
            let pods = self.pods()?;
            let matching = |p: &&LocalPod| {
                p.namespace == identity.namespace()
                    && p.service_account == identity.service_account()
            };
            if let Some(p) = pods.iter().filter(matching).find(|p| p.node == node) {
                return Ok(Placement::OnNode {
                    pod: format!("{}/{}", p.namespace, p.name),
                });
            }
            let elsewhere: Vec<String> = pods
                .iter()
                .filter(matching)
                .take(3)
                .map(|p| format!("{}/{} on {}", p.namespace, p.name, p.node))
                .collect();
            Ok(Placement::NotOnNode(if elsewhere.is_empty() {
                "no pod uses this service account".into()
            } else {
                format!("its pods run elsewhere: {}", elsewhere.join(", "))
            }))
        })
    }
}
