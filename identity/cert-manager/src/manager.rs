//! [`CertManager`]: one workload certificate per identity in use on the node.
//!
//! Each identity has a worker task that fetches its certificate (a fresh key
//! every time), publishes it on a watch channel the TLS resolvers read at
//! handshake time, and sleeps until a jittered point between 50 % and 70 % of
//! the lifetime to fetch the next one. Jitter spreads a node's (and a
//! cluster's) refreshes so a CA restart does not turn into a thundering herd.
//! On failure it retries with exponential backoff and keeps the current
//! certificate in service until it expires: a CA outage shorter than ~30 % of
//! a certificate's lifetime is invisible to traffic.
//!
//! Time is tokio time, so the schedule is testable with paused time.

use crate::bundle::TrustBundle;
use crate::cert::{PendingKey, WorkloadCertificate};
use crate::client::{CaClient, CaError};
use crate::metrics::CertManagerMetrics;
use crate::verify::BundleWatch;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use weft_identity_api::SpiffeId;

#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// At most this many Certify calls in flight (a node with many pods
    /// starting at once must not flood the CA).
    pub max_concurrent_requests: usize,
    /// Refresh at a uniformly random fraction of the lifetime in this range.
    pub refresh_window: (f64, f64),
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// One Certify call, including waiting for a request slot.
    pub request_timeout: Duration,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 8,
            refresh_window: (0.5, 0.7),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertManagerError {
    #[error("identity {0} was dropped (its last pod left) before a certificate arrived")]
    Dropped(String),
}

/// The trust bundle every verifier reads, shared between the manager (which
/// updates it from the CA's stream) and the CA client (which verifies the CA
/// with it). Create it first, from the anchors the proxy is deployed with.
#[derive(Clone)]
pub struct SharedTrustBundle(Arc<watch::Sender<Arc<TrustBundle>>>);

impl SharedTrustBundle {
    pub fn new(initial: TrustBundle) -> Self {
        Self(Arc::new(watch::Sender::new(Arc::new(initial))))
    }

    pub fn watch(&self) -> BundleWatch {
        self.0.subscribe()
    }

    pub fn current(&self) -> Arc<TrustBundle> {
        self.0.borrow().clone()
    }

    /// Installs `bundle` if it differs; returns whether it did.
    pub fn replace(&self, bundle: TrustBundle) -> bool {
        self.0.send_if_modified(|current| {
            if **current == bundle {
                false
            } else {
                *current = Arc::new(bundle);
                true
            }
        })
    }
}

/// Cheap to clone; all clones share the identities. Workers stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<dyn CaClient>,
    config: CertManagerConfig,
    limiter: Semaphore,
    bundle: SharedTrustBundle,
    identities: Mutex<HashMap<SpiffeId, Slot>>,
    metrics: CertManagerMetrics,
    bundle_task: Mutex<Option<AbortHandle>>,
    generations: std::sync::atomic::AtomicU64,
    /// Bumped whenever any identity's certificate is published or
    /// withdrawn: what readiness follows, instead of polling.
    changes: watch::Sender<u64>,
}

struct Slot {
    /// Tells this slot's worker from an earlier one for the same identity
    /// (dropped and re-added): only the current worker may publish or release.
    generation: u64,
    /// Pods on this node using the identity; 0 for an identity fetched on
    /// first use without a registered pod (kept for one certificate lifetime).
    pods: usize,
    cert: watch::Receiver<Option<WorkloadCertificate>>,
    worker: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let identities = self.identities.get_mut().unwrap_or_else(|e| e.into_inner());
        for slot in identities.values() {
            slot.worker.abort();
        }
        if let Some(task) = self
            .bundle_task
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
        {
            task.abort();
        }
    }
}

impl CertManager {
    pub fn new(
        ca: Arc<dyn CaClient>,
        bundle: SharedTrustBundle,
        config: CertManagerConfig,
        metrics: CertManagerMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                limiter: Semaphore::new(config.max_concurrent_requests.max(1)),
                config,
                bundle,
                identities: Mutex::new(HashMap::new()),
                metrics,
                bundle_task: Mutex::new(None),
                generations: std::sync::atomic::AtomicU64::new(0),
                changes: watch::Sender::new(0),
            }),
        }
    }

    /// Follows the CA's trust bundle stream (reconnecting with backoff) and
    /// installs each bundle; verifiers see it at their next handshake.
    pub fn start_trust_bundle_watch(&self) {
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(watch_bundle(weak));
        let mut slot = self
            .inner
            .bundle_task
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.replace(task.abort_handle()) {
            old.abort();
        }
    }

    /// The current trust bundle; `changed().await` on it to hear of rotations.
    pub fn trust_bundle(&self) -> BundleWatch {
        self.inner.bundle.watch()
    }

    /// A pod using `identity` arrived on this node: fetch ahead of time.
    /// Changes whenever a certificate of any identity is published or
    /// withdrawn (the value is a counter): wait on it rather than polling
    /// [`CertManager::current_certificate`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    pub fn register_pod(&self, identity: &SpiffeId) {
        self.acquire(identity, true);
    }

    /// A pod using `identity` left. When it was the last one, the identity's
    /// certificate and key are dropped and no longer refreshed.
    pub fn unregister_pod(&self, identity: &SpiffeId) {
        let mut identities = self.inner.lock();
        let Some(slot) = identities.get_mut(identity) else {
            return;
        };
        slot.pods = slot.pods.saturating_sub(1);
        if slot.pods == 0 {
            let slot = identities.remove(identity).expect("present");
            slot.worker.abort();
            self.inner.metrics.forget(&identity.to_string());
            tracing::info!(%identity, "last pod left; dropped its certificate");
        }
    }

    /// Identities currently held.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.inner.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The certificate for `identity`, waiting for the first one if needed
    /// (fetching it now if the identity was not registered).
    pub async fn certificate(
        &self,
        identity: &SpiffeId,
    ) -> Result<WorkloadCertificate, CertManagerError> {
        let mut rx = self.watch_certificate(identity);
        let cert = rx
            .wait_for(|c| c.is_some())
            .await
            .map_err(|_| CertManagerError::Dropped(identity.to_string()))?;
        Ok(cert.clone().expect("waited for Some"))
    }

    /// The certificate now in service for `identity`, if any (no waiting).
    pub fn current_certificate(&self, identity: &SpiffeId) -> Option<WorkloadCertificate> {
        self.inner
            .lock()
            .get(identity)
            .and_then(|s| s.cert.borrow().clone())
    }

    /// The channel the TLS resolvers read; starts a fetch if needed.
    pub fn watch_certificate(
        &self,
        identity: &SpiffeId,
    ) -> watch::Receiver<Option<WorkloadCertificate>> {
        self.acquire(identity, false)
    }

    fn acquire(
        &self,
        identity: &SpiffeId,
        pod: bool,
    ) -> watch::Receiver<Option<WorkloadCertificate>> {
        let mut identities = self.inner.lock();
        if let Some(slot) = identities.get_mut(identity) {
            if pod {
                slot.pods += 1;
            }
            return slot.cert.clone();
        }
        let (tx, rx) = watch::channel(None);
        let generation = self
            .inner
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let worker = tokio::spawn(run_identity(
            Arc::downgrade(&self.inner),
            identity.clone(),
            generation,
            tx,
        ));
        identities.insert(
            identity.clone(),
            Slot {
                generation,
                pods: usize::from(pod),
                cert: rx.clone(),
                worker: worker.abort_handle(),
            },
        );
        rx
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Slot>> {
        self.identities.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One Certify round trip with a fresh key, within the concurrency bound.
    async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, String> {
        let attempt = async {
            let _permit = self.limiter.acquire().await.map_err(|e| e.to_string())?;
            let pending = PendingKey::generate(identity).map_err(|e| e.to_string())?;
            let reply = self
                .ca
                .certify(identity, pending.csr.clone())
                .await
                .map_err(|e: CaError| e.to_string())?;
            pending
                .complete(identity, reply.leaf, reply.intermediates, reply.valid_until)
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(self.config.request_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err("timed out waiting for the CA".into()))
    }

    /// Drops an identity nobody registered once its certificate is due for
    /// refresh: it was fetched on first use and no pod claimed it since.
    fn release_if_unclaimed(&self, identity: &SpiffeId, generation: u64) -> bool {
        let mut identities = self.lock();
        match identities.get(identity) {
            Some(s) if s.generation != generation => true, // superseded: just stop
            Some(s) if s.pods == 0 => {
                identities.remove(identity);
                self.metrics.forget(&identity.to_string());
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Runs `f` (publish, count) only while `generation` is the identity's
    /// current worker, under the lock `unregister_pod` takes, so a worker
    /// being dropped cannot re-create metric series after they were removed.
    fn if_current(&self, identity: &SpiffeId, generation: u64, f: impl FnOnce()) -> bool {
        let identities = self.lock();
        let current = identities
            .get(identity)
            .is_some_and(|s| s.generation == generation);
        if current {
            f();
        }
        current
    }
}

fn jitter(range: (f64, f64)) -> f64 {
    let (lo, hi) = range;
    if hi > lo {
        rand::random_range(lo..hi)
    } else {
        lo
    }
}

/// The life of one identity on this node.
async fn run_identity(
    inner: Weak<Inner>,
    identity: SpiffeId,
    generation: u64,
    tx: watch::Sender<Option<WorkloadCertificate>>,
) {
    let name = identity.to_string();
    // When the certificate in service expires (tokio time).
    let mut expires: Option<Instant> = None;
    let mut backoff = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let result = strong.fetch(&identity).await;
        let config = strong.config.clone();
        let metrics = strong.metrics.clone();
        match result {
            Ok(cert) => {
                let lifetime = cert.remaining(SystemTime::now());
                let valid_until = cert.valid_until;
                let serial = cert.serial.clone();
                let published = strong.if_current(&identity, generation, || {
                    metrics.refreshed(&name, true, Some(valid_until));
                    tx.send_replace(Some(cert));
                    strong.changes.send_modify(|n| *n += 1);
                });
                drop(strong);
                if !published {
                    return;
                }
                tracing::info!(identity = %name, %serial, ?lifetime, "workload certificate issued");
                expires = Some(Instant::now() + lifetime);
                backoff = None;
                tokio::time::sleep(lifetime.mul_f64(jitter(config.refresh_window))).await;
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                if strong.release_if_unclaimed(&identity, generation) {
                    tracing::debug!(identity = %name, "no pod claimed this identity; dropped");
                    return;
                }
            }
            Err(error) => {
                let counted = strong.if_current(&identity, generation, || {
                    metrics.refreshed(&name, false, None);
                });
                drop(strong);
                if !counted {
                    return;
                }
                let delay = backoff.unwrap_or(config.backoff_initial);
                backoff = Some((delay * 2).min(config.backoff_max));
                // Full jitter on the upper half: retries of many identities
                // after one CA outage do not arrive in lockstep.
                let delay = delay.mul_f64(jitter((0.5, 1.0)));
                tracing::warn!(identity = %name, %error, retry_in = ?delay, "certificate request failed; keeping the current certificate");
                match expires {
                    Some(at) if Instant::now() + delay >= at => {
                        tokio::time::sleep_until(at).await;
                        tracing::error!(identity = %name, "certificate expired and the CA is still unreachable");
                        tx.send_replace(None);
                        if let Some(strong) = inner.upgrade() {
                            strong.changes.send_modify(|n| *n += 1);
                        }
                        expires = None;
                    }
                    _ => tokio::time::sleep(delay).await,
                }
            }
        }
    }
}

/// Keeps the shared bundle in step with the CA's stream.
async fn watch_bundle(inner: Weak<Inner>) {
    let mut backoff: Option<Duration> = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let ca = strong.ca.clone();
        let config = strong.config.clone();
        drop(strong);
        match ca.watch_trust_bundle().await {
            Ok(mut stream) => {
                while let Some(item) = stream.next().await {
                    let Some(strong) = inner.upgrade() else {
                        return;
                    };
                    match item {
                        Ok(bundle) => {
                            let expected = strong.bundle.current().trust_domain().to_string();
                            if bundle.trust_domain() != expected {
                                tracing::error!(got = bundle.trust_domain(), %expected, "CA sent a bundle for another trust domain; ignored");
                                continue;
                            }
                            backoff = None;
                            let anchors = bundle.certificates().len();
                            if strong.bundle.replace(bundle) {
                                strong.metrics.bundle_updates.inc();
                                tracing::info!(anchors, "trust bundle changed");
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "trust bundle stream failed");
                            break;
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot watch the trust bundle"),
        }
        let delay = backoff.unwrap_or(config.backoff_initial);
        backoff = Some((delay * 2).min(config.backoff_max));
        tokio::time::sleep(delay.mul_f64(jitter((0.5, 1.0)))).await;
    }
}
