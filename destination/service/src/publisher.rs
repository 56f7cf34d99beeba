//! Versions the index's output and hands each node's latest view to its
//! subscribers.
//!
//! Each node has a `tokio::sync::watch` holding only its *latest* view:
//! a subscriber that reads slowly skips the versions it was too slow for
//! and its next delta is computed from what it last received (see
//! [`crate::server`]). Nothing is queued per subscriber, so memory does not
//! grow with a subscriber's backlog: at most the view it last received and
//! the current one are held for it.
//!
//! A view's version is the index generation in which that node's view last
//! changed; a rebuild that leaves a node's view as it was does not wake its
//! subscribers. The last [`HISTORY`] generations are kept so that a proxy
//! reconnecting with a recent version gets a delta instead of a snapshot.

use crate::index::Index;
use crate::index::policy::status::PolicyStatus;
use crate::metrics::Metrics;
use crate::views::NodeView;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use weft_destination_api::Workload;

/// Generations kept for resuming.
pub const HISTORY: usize = 8;

pub struct Publisher {
    epoch: String,
    state: Mutex<State>,
    ready: watch::Sender<bool>,
    statuses: watch::Sender<Arc<Vec<PolicyStatus>>>,
    pub metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    generation: u64,
    /// Oldest first; the back is the current index.
    history: VecDeque<(u64, Arc<Index>)>,
    nodes: HashMap<String, watch::Sender<NodeView>>,
}

impl Publisher {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        // A new epoch per run: versions restart, and a proxy holding a
        // version from an earlier run must not be given a delta against it.
        let epoch = format!("{:016x}", rand::random::<u64>());
        Self {
            epoch,
            state: Mutex::default(),
            ready: watch::channel(false).0,
            statuses: watch::channel(Arc::default()).0,
            metrics,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// True once the first full index has been published.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Whether each policy object is in effect, as of the latest index
    /// (changes only when some status does): what the kube status writer
    /// reports on the objects.
    pub fn policy_statuses(&self) -> watch::Receiver<Arc<Vec<PolicyStatus>>> {
        self.statuses.subscribe()
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated
        // in a way that matters more than stopping service would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a rebuilt index; returns how many nodes' views changed.
    /// Unchanged parts are first replaced by the previous generation's
    /// allocations (a walk of the whole index).
    pub fn publish(&self, mut index: Index) -> usize {
        let previous = self.lock().history.back().map(|(_, i)| i.clone());
        if let Some(previous) = previous {
            intern(&mut index, &previous);
        }
        self.publish_interned(index)
    }

    /// Publishes an index whose unchanged parts already are the previous
    /// generation's allocations (what [`crate::index::Incremental`] keeps):
    /// no walk of the index, only a pointer comparison per node.
    pub fn publish_interned(&self, index: Index) -> usize {
        self.statuses.send_if_modified(|held| {
            let changed =
                !Arc::ptr_eq(held, &index.policy_statuses) && **held != *index.policy_statuses;
            if changed {
                *held = index.policy_statuses.clone();
            }
            changed
        });
        let mut state = self.lock();
        state.generation += 1;
        let generation = state.generation;
        let index = Arc::new(index);
        let now = Instant::now();

        let mut names: Vec<String> = index.nodes.keys().cloned().collect();
        names.extend(state.nodes.keys().cloned());
        names.sort();
        names.dedup();
        let mut changed = 0;
        for node in names {
            let mut view = index.node_view(&node);
            let sender = state
                .nodes
                .entry(node.clone())
                .or_insert_with(|| watch::channel(NodeView::empty()).0);
            let current = sender.borrow();
            if current.version != 0 && current.same_content(&view) {
                continue;
            }
            drop(current);
            view.version = generation;
            view.published = now;
            sender.send_replace(view);
            changed += 1;
        }
        // Forget nodes that have no pods and nobody watching.
        state
            .nodes
            .retain(|node, tx| index.nodes.contains_key(node) || tx.receiver_count() > 0);
        state.history.push_back((generation, index));
        while state.history.len() > HISTORY {
            state.history.pop_front();
        }
        drop(state);
        self.ready.send_replace(true);
        changed
    }

    /// The latest view of `node`, as a watch.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<NodeView> {
        let mut state = self.lock();
        let current = state.history.back().map(|(g, i)| (*g, i.clone()));
        state
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| {
                // A node with no pods so far: its (empty) view as of now.
                let mut view = NodeView::empty();
                if let Some((generation, index)) = current {
                    view = index.node_view(node);
                    view.version = generation;
                }
                watch::channel(view).0
            })
            .subscribe()
    }

    /// The view `node` had at `version` of this epoch, if still known.
    pub fn view_at(&self, node: &str, epoch: &str, version: u64) -> Option<NodeView> {
        if epoch != self.epoch || version == 0 {
            return None;
        }
        let state = self.lock();
        let (_, index) = state.history.iter().find(|(g, _)| *g == version)?;
        let mut view = index.node_view(node);
        view.version = version;
        Some(view)
    }
}

/// Reuses the previous generation's allocations for everything unchanged:
/// history then costs little memory, and "unchanged" becomes a pointer
/// comparison for the publisher and every stream.
fn intern(index: &mut Index, previous: &Index) {
    // An enrolled workload is one allocation shared by the mesh and its
    // node's local view: decide about it once (keyed by that allocation,
    // kept alive by the local view until it is replaced there).
    let mut decided: HashMap<*const Workload, Option<Arc<Workload>>> = HashMap::new();
    let mesh = Arc::make_mut(&mut index.mesh);
    let same_workloads = intern_map(
        &mut mesh.workloads,
        &previous.mesh.workloads,
        Some(&mut decided),
    );
    let same_services = intern_map(&mut mesh.services, &previous.mesh.services, None);
    if same_workloads && same_services {
        index.mesh = previous.mesh.clone();
    }
    if index.enrolled_namespaces == previous.enrolled_namespaces {
        index.enrolled_namespaces = previous.enrolled_namespaces.clone();
    }
    for (node, local) in index.nodes.iter_mut() {
        let Some(old) = previous.nodes.get(node) else {
            continue;
        };
        let l = Arc::make_mut(local);
        let same = intern_map(&mut l.workloads, &old.workloads, Some(&mut decided));
        let same_policies = intern_map(&mut l.policies, &old.policies, None);
        if same && same_policies && l.has_enrolled == old.has_enrolled {
            *local = old.clone();
        }
    }
}

/// Replaces values equal to the previous map's by the previous `Arc`;
/// true when the maps are equal. `decided` remembers, per new allocation,
/// the outcome (the previous `Arc`, or `None`: changed), so that a value
/// shared by several maps is compared once.
fn intern_map<V: PartialEq>(
    new: &mut BTreeMap<String, Arc<V>>,
    old: &BTreeMap<String, Arc<V>>,
    mut decided: Option<&mut HashMap<*const V, Option<Arc<V>>>>,
) -> bool {
    let mut all_same = new.len() == old.len();
    for (key, value) in new.iter_mut() {
        let previous = old.get(key);
        let ptr = Arc::as_ptr(value);
        let known = decided.as_deref().and_then(|d| d.get(&ptr).cloned());
        let outcome = match known {
            Some(outcome) => outcome,
            None => {
                let outcome = previous.filter(|p| ***p == **value).cloned();
                if let Some(d) = decided.as_deref_mut() {
                    d.insert(ptr, outcome.clone());
                }
                outcome
            }
        };
        match outcome {
            Some(reused) if previous.is_some_and(|p| Arc::ptr_eq(p, &reused)) => *value = reused,
            Some(reused) => {
                // Equal to an allocation of the previous generation, but
                // not the one this map held under this key.
                *value = reused;
                all_same = false;
            }
            None => all_same = false,
        }
    }
    all_same
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{IndexConfig, build};
    use crate::synthetic::{self, Shape};

    const SHAPE: Shape = Shape {
        pods: 200,
        services: 40,
        nodes: 10,
        namespaces: 4,
    };

    #[test]
    fn only_nodes_whose_view_changed_get_a_new_version() {
        let config = IndexConfig::default();
        let mut objects = synthetic::cluster(SHAPE);
        let publisher = Publisher::new(Arc::new(Metrics::new()));
        assert_eq!(publisher.publish(build(&objects, &config)), SHAPE.nodes);
        let mut rx = publisher.subscribe(&synthetic::node_name(0));
        let v1 = rx.borrow_and_update().version;

        // Nothing changed: nobody is woken.
        assert_eq!(publisher.publish(build(&objects, &config)), 0);
        assert!(!rx.has_changed().unwrap());

        // A pod of a namespace outside the mesh changes: only its node.
        let pod = objects
            .pods
            .values_mut()
            .find(|p| p.key.namespace == "ns-01")
            .unwrap();
        pod.labels.insert("touched".into(), "yes".into());
        let node = pod.node.clone().unwrap();
        assert_eq!(publisher.publish(build(&objects, &config)), 1);
        let view = publisher.subscribe(&node).borrow().clone();
        assert_eq!(view.version, publisher.generation());

        // An enrolled pod changes: every node with enrolled pods.
        let pod = objects
            .pods
            .values_mut()
            .find(|p| p.key.namespace == "ns-00")
            .unwrap();
        pod.labels.insert("touched".into(), "yes".into());
        assert_eq!(publisher.publish(build(&objects, &config)), SHAPE.nodes);
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().version > v1);

        // The history serves the versions needed to resume.
        let old = publisher
            .view_at(&synthetic::node_name(0), publisher.epoch(), v1)
            .unwrap();
        assert_eq!(old.version, v1);
        assert!(
            publisher
                .view_at(&synthetic::node_name(0), "another-epoch", v1)
                .is_none()
        );
    }

    /// Many random generations: a subscriber applying every delta holds
    /// exactly what a fresh snapshot says, on every node.
    #[test]
    fn deltas_across_random_generations_match_fresh_snapshots() {
        use rand::{Rng, SeedableRng};
        use weft_destination_api::View;

        let config = IndexConfig::default();
        let mut objects = synthetic::cluster(SHAPE);
        let publisher = Publisher::new(Arc::new(Metrics::new()));
        publisher.publish(build(&objects, &config));
        let nodes: Vec<String> = (0..SHAPE.nodes).map(synthetic::node_name).collect();
        let mut rxs: Vec<_> = nodes.iter().map(|n| publisher.subscribe(n)).collect();
        let mut held: Vec<(NodeView, View)> = rxs
            .iter_mut()
            .map(|rx| {
                let v = rx.borrow_and_update().clone();
                let mut client = View::default();
                client.apply(v.snapshot(publisher.epoch())).unwrap();
                (v, client)
            })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..40 {
            for _ in 0..rng.random_range(1..5) {
                let keys: Vec<_> = objects.pods.keys().cloned().collect();
                let key = &keys[rng.random_range(0..keys.len())];
                match rng.random_range(0..5) {
                    0 => {
                        objects.pods.remove(key);
                    }
                    1 => {
                        let pod = objects.pods.get_mut(key).unwrap();
                        pod.node = Some(synthetic::node_name(rng.random_range(0..SHAPE.nodes)));
                    }
                    2 => {
                        let ns = objects
                            .namespaces
                            .values_mut()
                            .nth(rng.random_range(0..SHAPE.namespaces))
                            .unwrap();
                        if ns.labels.remove(crate::model::MESH_LABEL).is_none() {
                            ns.labels
                                .insert(crate::model::MESH_LABEL.into(), "enabled".into());
                        }
                    }
                    3 => {
                        let pod = objects.pods.get_mut(key).unwrap();
                        pod.labels
                            .insert(crate::model::MESH_LABEL.into(), "disabled".into());
                    }
                    _ => {
                        let pod = objects.pods.get_mut(key).unwrap();
                        pod.labels.insert("round".into(), round.to_string());
                    }
                }
            }
            publisher.publish(build(&objects, &config));
            // What the objects say, computed afresh without the publisher.
            let truth = build(&objects, &config);
            for ((rx, (last, client)), node) in rxs.iter_mut().zip(held.iter_mut()).zip(&nodes) {
                let current = rx.borrow_and_update().clone();
                client
                    .apply(current.delta_from(last, publisher.epoch()))
                    .unwrap();
                let mut fresh = View::default();
                fresh.apply(current.snapshot(publisher.epoch())).unwrap();
                assert_eq!(*client, fresh, "round {round}");
                let mut expected = View::default();
                expected.apply(truth.node_view(node).snapshot("e")).unwrap();
                assert_eq!(
                    client.workloads, expected.workloads,
                    "round {round}, {node}"
                );
                assert_eq!(client.services, expected.services, "round {round}, {node}");
                *last = current;
            }
        }
    }
}
