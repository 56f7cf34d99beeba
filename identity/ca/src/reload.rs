//! Follows the CA directory: when cert-manager (or an operator) replaces the
//! issuer or the trust anchors, the CA switches without a restart.
//!
//! Change events come from inotify (notify); a slow poll runs as well, since
//! Kubernetes Secret volumes change by swapping a symlink, and a missed event
//! must never leave an expired issuer in use. A load that fails (files from
//! different rotations, garbage) keeps the material already in use.

use crate::authority::Authority;
use crate::material::Material;
use crate::metrics::{CaMetrics, ReloadLabels};
use notify::{RecursiveMode, Watcher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub struct Reloader {
    pub dir: PathBuf,
    pub authority: Arc<Authority>,
    pub metrics: CaMetrics,
    /// Told after new material is installed (the serving certificate follows).
    pub changed: Arc<Notify>,
    pub poll: Duration,
}

impl Reloader {
    /// Runs until `stop`. Errors setting up inotify are logged and the poll
    /// alone carries on.
    pub async fn run(self, stop: CancellationToken) {
        let (tx, mut events) = mpsc::channel::<()>(16);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| w.watch(&self.dir, RecursiveMode::NonRecursive).map(|()| w));
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch CA directory; polling only");
                None
            }
        };
        let mut poll = tokio::time::interval(self.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = poll.tick() => {}
                Some(()) = events.recv() => {
                    // A rotation writes several files: let them all land, then
                    // load once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while events.try_recv().is_ok() {}
                }
            }
            self.reload_once();
        }
    }

    /// Loads the directory and installs it if it differs from what is in use.
    pub fn reload_once(&self) {
        let result = |result| ReloadLabels { result };
        match Material::load(&self.dir) {
            Ok(new) => {
                let current = self.authority.material();
                let same = new.chain == current.chain
                    && new
                        .anchors
                        .iter()
                        .map(|a| &a.der)
                        .eq(current.anchors.iter().map(|a| &a.der));
                if same {
                    return;
                }
                tracing::info!(
                    issuer = %new.issuer_subject,
                    anchors = new.anchors.len(),
                    "CA material changed; now issuing with it"
                );
                self.metrics.observe_material(&new);
                self.authority.replace(new);
                self.metrics.reloads.get_or_create(&result("ok")).inc();
                self.changed.notify_waiters();
            }
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot load CA material; still using the previous issuer and anchors");
                self.metrics.reloads.get_or_create(&result("error")).inc();
            }
        }
    }
}
