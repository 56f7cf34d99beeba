//! The loop between sources and publisher: apply what sources report to the
//! store, bring the index up to date, publish, and report what changed in
//! the problems the index works around.
//!
//! The index is built whole once, when the sources have synced, then kept
//! up to date incrementally ([`index::Incremental`]): a change costs what
//! it affects, not the cluster. Updates that arrive while the index is
//! being updated are applied together before the next update: under churn
//! the index catches up as fast as it can, not once per event.

use crate::index::{self, Incremental, IndexConfig, Problem, ProblemKind};
use crate::metrics::{IneffectiveLabel, KindLabel, ProblemLabel};
use crate::model::Kind;
use crate::publisher::Publisher;
use crate::store::{ClusterObjects, StoreUpdate};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// What a source tells the indexer.
// Moved once through a bounded channel: a box per event would cost more
// than the unused bytes of `Synced`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum SourceEvent {
    Update(StoreUpdate),
    /// The source has delivered its first complete state: the index may be
    /// published (and `/ready` turn true).
    Synced,
}

/// Most updates applied in one batch before updating the index: bounds the
/// time an update waits under a flood.
const MAX_BATCH: usize = 10_000;

/// The index before and after the first full sync.
// One value, moved to the blocking pool and back once per update: the
// unused bytes of `Live` cost nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Stage {
    /// Objects only: nothing is indexed before the sources have synced.
    Waiting(ClusterObjects),
    Live(Box<Incremental>),
}

pub async fn run(
    objects: ClusterObjects,
    config: IndexConfig,
    mut events: mpsc::Receiver<SourceEvent>,
    publisher: Arc<Publisher>,
) {
    let mut stage = Some(Stage::Waiting(objects));
    let mut synced = false;
    let mut problems: BTreeSet<Problem> = BTreeSet::new();
    while let Some(first) = events.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match events.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut changed = false;
        for event in batch {
            match event {
                SourceEvent::Update(update) => {
                    match stage.as_mut() {
                        Some(Stage::Waiting(objects)) => objects.apply(update),
                        Some(Stage::Live(index)) => index.apply(update),
                        None => return,
                    }
                    changed = true;
                }
                SourceEvent::Synced => {
                    if !synced {
                        tracing::info!("first full sync received; serving views");
                    }
                    synced = true;
                    changed = true;
                }
            }
        }
        if !(synced && changed) {
            continue;
        }
        let started = Instant::now();
        let Some(current) = stage.take() else {
            return;
        };
        let config_for_build = config.clone();
        // The update is CPU work (the whole cluster the first time): keep it
        // off the threads that drive the streams.
        let (returned, built) = match tokio::task::spawn_blocking(move || {
            let mut live = match current {
                Stage::Waiting(objects) => Box::new(Incremental::new(objects, config_for_build)),
                Stage::Live(live) => live,
            };
            let built = live.refresh();
            (live, built)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "index update failed; the indexer stops");
                return;
            }
        };
        let objects = returned.objects();
        let metrics = publisher.metrics.clone();
        for kind in Kind::ALL {
            metrics
                .indexed_objects
                .get_or_create(&KindLabel {
                    kind: kind.to_string(),
                })
                .set(objects.count(kind) as i64);
        }
        let now: BTreeSet<Problem> = built.problems.iter().cloned().collect();
        for p in now.difference(&problems) {
            tracing::warn!(problem = p.kind.as_str(), object = %p.object, detail = %p.detail, "index problem");
        }
        for p in problems.difference(&now) {
            tracing::info!(problem = p.kind.as_str(), object = %p.object, "index problem resolved");
        }
        for kind in ProblemKind::ALL {
            metrics
                .index_problems
                .get_or_create(&ProblemLabel {
                    problem: kind.as_str(),
                })
                .set(now.iter().filter(|p| p.kind == kind).count() as i64);
        }
        problems = now;
        stage = Some(Stage::Live(returned));
        for reason in index::policy::status::Ineffective::ALL {
            let count = built
                .policy_statuses
                .iter()
                .filter(|s| s.ineffective.as_ref().is_some_and(|(r, _)| *r == reason))
                .count();
            metrics
                .ineffective_policies
                .get_or_create(&IneffectiveLabel {
                    reason: reason.label(),
                })
                .set(count as i64);
        }
        let nodes = publisher.publish_interned(built);
        metrics
            .index_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(nodes_changed = nodes, elapsed = ?started.elapsed(), "index published");
    }
}
