//! What the index produces and the server sends.
//!
//! Every node with at least one enrolled pod needs the same picture of the
//! mesh (every enrolled workload, every Service), so that part is built once
//! and shared ([`MeshView`], behind an `Arc`); what differs per node is only
//! its own pods ([`LocalView`]). A [`NodeView`] is the pair, and responses on
//! the wire are computed from two NodeViews: a snapshot from nothing, or a
//! delta from what the subscriber last received.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::iter::Peekable;
use std::sync::{Arc, Weak};
use std::time::Instant;
use weft_destination_api::{NamespaceSet, Policy, Service, WatchResponse, Workload};

pub type Workloads = BTreeMap<String, Arc<Workload>>;
pub type Services = BTreeMap<String, Arc<Service>>;
pub type Policies = BTreeMap<String, Arc<Policy>>;
/// The namespaces in the mesh: the same for every node.
pub type Namespaces = Arc<BTreeSet<String>>;

/// What every node with enrolled pods receives.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    /// Enrolled workloads, by uid.
    pub workloads: Workloads,
    /// Every Service, by `namespace/name`.
    pub services: Services,
    /// What changed since the previous meshes (when known): a delta from
    /// one of them then looks only at those keys, not at the whole maps.
    pub lineage: Lineage,
}

impl PartialEq for MeshView {
    fn eq(&self, other: &Self) -> bool {
        self.workloads == other.workloads && self.services == other.services
    }
}

/// The keys that differ between two consecutive meshes.
#[derive(Debug, Default)]
pub struct Changed {
    pub workloads: BTreeSet<String>,
    pub services: BTreeSet<String>,
}

/// A mesh's last [`Lineage::DEPTH`] predecessors, each with what changed
/// after it. Predecessors are held weakly (the mesh does not keep them
/// alive) and only compared by address, which their weak references keep
/// from being reused: memory per mesh is bounded by `DEPTH` change sets,
/// shared with the meshes that follow.
#[derive(Clone, Debug, Default)]
pub struct Lineage {
    /// Oldest first.
    steps: VecDeque<(Weak<MeshView>, Arc<Changed>)>,
}

impl Lineage {
    pub const DEPTH: usize = 16;

    /// The lineage of the mesh that follows `parent`, differing by `changed`.
    pub fn after(parent: &Arc<MeshView>, changed: Changed) -> Self {
        let mut steps = parent.lineage.steps.clone();
        steps.push_back((Arc::downgrade(parent), Arc::new(changed)));
        while steps.len() > Self::DEPTH {
            steps.pop_front();
        }
        Self { steps }
    }

    /// The keys that may differ from `ancestor`, if it is a recent one.
    fn since(&self, ancestor: &Arc<MeshView>) -> Option<(BTreeSet<&String>, BTreeSet<&String>)> {
        let from = self
            .steps
            .iter()
            .rposition(|(m, _)| std::ptr::eq(m.as_ptr(), Arc::as_ptr(ancestor)))?;
        let mut workloads = BTreeSet::new();
        let mut services = BTreeSet::new();
        for (_, changed) in self.steps.iter().skip(from) {
            workloads.extend(changed.workloads.iter());
            services.extend(changed.services.iter());
        }
        Some((workloads, services))
    }
}

/// One node's own pods, enrolled or not (a proxy must know when one of its
/// pods leaves the mesh).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalView {
    pub workloads: Workloads,
    /// The inbound policy of each of those pods, by `namespace/name`.
    pub policies: Policies,
    /// A node without enrolled pods has no clients in the mesh and needs no
    /// picture of it: its view is only its own pods.
    pub has_enrolled: bool,
}

/// The view of one node at one version.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// 0: nothing indexed yet.
    pub version: u64,
    /// When the index published this version (for push lag).
    pub published: Instant,
    pub mesh: Option<Arc<MeshView>>,
    pub local: Arc<LocalView>,
    /// Every node gets them, with or without pods: a node proxy decides
    /// with them whether a pod it does not know yet will be in the mesh.
    pub enrolled_namespaces: Namespaces,
}

impl NodeView {
    pub fn empty() -> Self {
        Self {
            version: 0,
            published: Instant::now(),
            mesh: None,
            local: Arc::default(),
            enrolled_namespaces: Namespaces::default(),
        }
    }

    pub fn new(mesh: &Arc<MeshView>, local: Arc<LocalView>, namespaces: &Namespaces) -> Self {
        Self {
            version: 0,
            published: Instant::now(),
            mesh: local.has_enrolled.then(|| mesh.clone()),
            local,
            enrolled_namespaces: namespaces.clone(),
        }
    }

    /// Same objects (versions aside), by identity: the publisher interns
    /// every generation against the previous one, so unchanged parts are the
    /// same allocation. A deep comparison here would cost a walk of the
    /// whole mesh per subscriber per update; a false "different" only costs
    /// an empty delta.
    pub fn same_content(&self, other: &NodeView) -> bool {
        let mesh_same = match (&self.mesh, &other.mesh) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        mesh_same
            && Arc::ptr_eq(&self.local, &other.local)
            && Arc::ptr_eq(&self.enrolled_namespaces, &other.enrolled_namespaces)
    }

    fn namespace_set(&self) -> NamespaceSet {
        NamespaceSet {
            names: self.enrolled_namespaces.iter().cloned().collect(),
        }
    }

    /// Every workload in the view, in uid order: the node's own pods and,
    /// with enrolled pods, the mesh's.
    pub fn workloads(&self) -> impl Iterator<Item = (&String, &Arc<Workload>)> {
        let mesh = self.mesh.iter().flat_map(|m| m.workloads.iter());
        Union {
            a: self.local.workloads.iter().peekable(),
            b: mesh.peekable(),
        }
    }

    /// One workload of the view (the node's own copy first, as in
    /// [`NodeView::workloads`]).
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.local
            .workloads
            .get(uid)
            .or_else(|| self.mesh.as_ref()?.workloads.get(uid))
    }

    pub fn services(&self) -> impl Iterator<Item = (&String, &Arc<Service>)> {
        self.mesh.iter().flat_map(|m| m.services.iter())
    }

    pub fn snapshot(&self, epoch: &str) -> WatchResponse {
        WatchResponse {
            epoch: epoch.to_string(),
            version: self.version,
            snapshot: true,
            base_version: 0,
            workloads: self.workloads().map(|(_, w)| (**w).clone()).collect(),
            services: self.services().map(|(_, s)| (**s).clone()).collect(),
            policies: self
                .local
                .policies
                .values()
                .map(|p| (**p).clone())
                .collect(),
            enrolled_namespaces: Some(self.namespace_set()),
            ..Default::default()
        }
    }

    /// What turns `old` (the subscriber's view) into `self`.
    pub fn delta_from(&self, old: &NodeView, epoch: &str) -> WatchResponse {
        let mut response = WatchResponse {
            epoch: epoch.to_string(),
            version: self.version,
            snapshot: false,
            base_version: old.version,
            ..Default::default()
        };
        if self.same_content(old) {
            return response;
        }
        // When the mesh's lineage knows what changed since the old one,
        // only those keys (and the node's own, few) are compared.
        let changed = match (&old.mesh, &self.mesh) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => Some(Default::default()),
            (Some(a), Some(b)) => b.lineage.since(a),
            _ => None,
        };
        match changed {
            Some((mut workloads, services)) => {
                if !Arc::ptr_eq(&old.local, &self.local) {
                    workloads.extend(old.local.workloads.keys());
                    workloads.extend(self.local.workloads.keys());
                }
                for uid in workloads {
                    match (old.workload(uid), self.workload(uid)) {
                        (Some(o), Some(n)) if Arc::ptr_eq(o, n) || o == n => {}
                        (_, Some(n)) => response.workloads.push((**n).clone()),
                        (Some(_), None) => response.removed_workloads.push(uid.clone()),
                        (None, None) => {}
                    }
                }
                let lookup = |v: &'_ NodeView, k: &String| {
                    v.mesh.as_ref().and_then(|m| m.services.get(k).cloned())
                };
                for key in services {
                    match (lookup(old, key), lookup(self, key)) {
                        (Some(o), Some(n)) if Arc::ptr_eq(&o, &n) || o == n => {}
                        (_, Some(n)) => response.services.push((*n).clone()),
                        (Some(_), None) => response.removed_services.push(key.clone()),
                        (None, None) => {}
                    }
                }
            }
            None => {
                diff(old.workloads(), self.workloads(), |change| match change {
                    Change::Upsert(w) => response.workloads.push((**w).clone()),
                    Change::Remove(uid) => response.removed_workloads.push(uid.clone()),
                });
                diff(old.services(), self.services(), |change| match change {
                    Change::Upsert(s) => response.services.push((**s).clone()),
                    Change::Remove(key) => response.removed_services.push(key.clone()),
                });
            }
        }
        diff(
            old.local.policies.iter(),
            self.local.policies.iter(),
            |change| match change {
                Change::Upsert(p) => response.policies.push((**p).clone()),
                Change::Remove(key) => response.removed_policies.push(key.clone()),
            },
        );
        if self.enrolled_namespaces != old.enrolled_namespaces {
            response.enrolled_namespaces = Some(self.namespace_set());
        }
        response
    }
}

/// Merges two maps' iterators in key order; `a` wins where both have a key.
struct Union<'a, V, A, B>
where
    A: Iterator<Item = (&'a String, &'a V)>,
    B: Iterator<Item = (&'a String, &'a V)>,
    V: 'a,
{
    a: Peekable<A>,
    b: Peekable<B>,
}

impl<'a, V, A, B> Iterator for Union<'a, V, A, B>
where
    A: Iterator<Item = (&'a String, &'a V)>,
    B: Iterator<Item = (&'a String, &'a V)>,
{
    type Item = (&'a String, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some((ka, _)), Some((kb, _))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => self.a.next(),
                std::cmp::Ordering::Greater => self.b.next(),
                std::cmp::Ordering::Equal => {
                    self.b.next();
                    self.a.next()
                }
            },
            (Some(_), None) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

enum Change<'a, V> {
    Upsert(&'a Arc<V>),
    Remove(&'a String),
}

/// Walks two key-ordered sequences once, reporting what changed.
fn diff<'a, V: PartialEq + 'a>(
    old: impl Iterator<Item = (&'a String, &'a Arc<V>)>,
    new: impl Iterator<Item = (&'a String, &'a Arc<V>)>,
    mut out: impl FnMut(Change<'a, V>),
) {
    let mut old = old.peekable();
    let mut new = new.peekable();
    loop {
        match (old.peek(), new.peek()) {
            (Some((ko, vo)), Some((kn, vn))) => match ko.cmp(kn) {
                std::cmp::Ordering::Less => {
                    out(Change::Remove(ko));
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    out(Change::Upsert(vn));
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if !(Arc::ptr_eq(vo, vn) || vo == vn) {
                        out(Change::Upsert(vn));
                    }
                    old.next();
                    new.next();
                }
            },
            (Some((ko, _)), None) => {
                out(Change::Remove(ko));
                old.next();
            }
            (None, Some((_, vn))) => {
                out(Change::Upsert(vn));
                new.next();
            }
            (None, None) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_destination_api::View;

    fn w(uid: &str, node: &str) -> (String, Arc<Workload>) {
        (
            uid.to_string(),
            Arc::new(Workload {
                uid: uid.into(),
                node: node.into(),
                ..Default::default()
            }),
        )
    }

    fn view(
        version: u64,
        mesh: &[(String, Arc<Workload>)],
        local: &[(String, Arc<Workload>)],
    ) -> NodeView {
        NodeView {
            version,
            published: Instant::now(),
            mesh: Some(Arc::new(MeshView {
                workloads: mesh.iter().cloned().collect(),
                services: Services::new(),
                lineage: Lineage::default(),
            })),
            local: Arc::new(LocalView {
                workloads: local.iter().cloned().collect(),
                policies: Policies::new(),
                has_enrolled: true,
            }),
            enrolled_namespaces: Arc::new(["ns".to_string()].into()),
        }
    }

    #[test]
    fn enrolled_namespaces_travel_in_snapshots_and_in_deltas_when_they_change() {
        let old = view(1, &[], &[w("a", "n1")]);
        let mut client = View::default();
        assert_eq!(client.enrolled_namespaces, None);
        client.apply(old.snapshot("e")).unwrap();
        assert_eq!(client.enrolled_namespaces, Some(["ns".to_string()].into()));

        // Unchanged (another allocation, the same names): not resent.
        let mut same = view(2, &[], &[w("a", "n1"), w("b", "n1")]);
        same.enrolled_namespaces = Arc::new(["ns".to_string()].into());
        let delta = same.delta_from(&old, "e");
        assert_eq!(delta.enrolled_namespaces, None);
        client.apply(delta).unwrap();

        let mut changed = view(3, &[], &[w("a", "n1"), w("b", "n1")]);
        changed.enrolled_namespaces = Arc::new(["other".to_string()].into());
        client.apply(changed.delta_from(&same, "e")).unwrap();
        assert_eq!(
            client.enrolled_namespaces,
            Some(["other".to_string()].into())
        );
        let mut fresh = View::default();
        fresh.apply(changed.snapshot("e")).unwrap();
        assert_eq!(client, fresh);
    }

    #[test]
    fn delta_applied_to_old_snapshot_equals_new_snapshot() {
        let old = view(
            1,
            &[w("a", "n1"), w("c", "n2")],
            &[w("a", "n1"), w("z", "n1")],
        );
        let new = view(
            2,
            &[w("a", "n1"), w("b", "n2")],
            &[w("a", "n1"), w("y", "n1")],
        );
        let delta = new.delta_from(&old, "e");
        let mut removed = delta.removed_workloads.clone();
        removed.sort();
        assert_eq!(removed, ["c", "z"]);
        let mut added: Vec<_> = delta.workloads.iter().map(|w| w.uid.clone()).collect();
        added.sort();
        assert_eq!(added, ["b", "y"]);

        let mut client = View::default();
        client.apply(old.snapshot("e")).unwrap();
        client.apply(delta).unwrap();
        let mut fresh = View::default();
        fresh.apply(new.snapshot("e")).unwrap();
        assert_eq!(client, fresh);
    }

    #[test]
    fn policy_changes_travel_in_deltas() {
        let policy = |name: &str, port: u32| {
            (
                format!("ns/{name}"),
                Arc::new(Policy {
                    name: name.into(),
                    namespace: "ns".into(),
                    probe_ports: vec![port],
                    ..Default::default()
                }),
            )
        };
        let mut old = view(1, &[], &[w("a", "n1")]);
        Arc::make_mut(&mut old.local).policies =
            [policy("a", 1), policy("b", 1)].into_iter().collect();
        let mut new = view(2, &[], &[w("a", "n1")]);
        Arc::make_mut(&mut new.local).policies =
            [policy("a", 2), policy("c", 1)].into_iter().collect();
        let delta = new.delta_from(&old, "e");
        assert_eq!(delta.removed_policies, ["ns/b"]);
        let changed: Vec<_> = delta.policies.iter().map(|p| p.key()).collect();
        assert_eq!(changed, ["ns/a", "ns/c"]);

        let mut client = View::default();
        client.apply(old.snapshot("e")).unwrap();
        assert_eq!(client.policies.len(), 2);
        client.apply(delta).unwrap();
        let mut fresh = View::default();
        fresh.apply(new.snapshot("e")).unwrap();
        assert_eq!(client, fresh);
        assert_eq!(client.policies["ns/a"].probe_ports, [2]);
    }

    #[test]
    fn union_lists_shared_keys_once() {
        let v = view(
            1,
            &[w("a", "n1"), w("b", "n2")],
            &[w("a", "n1"), w("c", "n1")],
        );
        let keys: Vec<_> = v.workloads().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }
}
