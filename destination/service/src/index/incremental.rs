//! The index kept up to date change by change: [`Incremental`] holds the
//! cluster's objects and everything derived from them, and recomputes
//! only what a change can affect. [`super::build`] (the pure function) is
//! the reference it must always agree with; `incremental_tests` checks
//! that after every step of random change sequences.
//!
//! What depends on what (each arrow: "is recomputed when this changes"):
//!
//! - a pod's workload ← the pod, its Namespace (enrollment), the owner of
//!   each address it claims (pods claiming one IP: the oldest keeps it),
//!   its ServiceAccount (a problem only);
//! - a pod's Policy ← the pod, its Namespace, the Servers,
//!   AuthorizationPolicies and HTTPRoutes of its namespace and the
//!   authentications those require (policy references never cross
//!   namespaces otherwise);
//! - a Service ← the Service, its EndpointSlices, the workloads of the pods
//!   they list (or its selector matches, without EndpointSlices), the owner
//!   of each ClusterIP it claims, its HTTPRoutes;
//! - the mesh ← the enrolled workloads (by uid) and the Services that
//!   changed; a node's own view ← the pods placed on it.
//!
//! Reverse maps (address → claimants, node → pods, uid → pods, pod →
//! EndpointSlices listing it, Service → EndpointSlices) turn a change into
//! the set of things to recompute; each recomputed thing is compared with
//! what it was and, when equal, the previous allocation is kept, so that
//! an unchanged view stays the same pointer (what the publisher and the
//! streams test). Problems are kept per origin (pod, Service, address,
//! ClusterIP, the policy objects) and replaced when their origin is
//! recomputed.
//!
//! Cost of one pod change: the pod, the Services listing it, the address
//! owners it touches, the policy context of its namespace (its Servers and
//! AuthorizationPolicies resolved again), the views of the one or two
//! nodes it was and is placed on, and, when it is enrolled, a copy of the
//! mesh's maps of pointers (the one step linear in the cluster, a few
//! milliseconds at 100 000 pods). A policy object change recomputes every
//! policy object's status and the policies of the pods of its namespace;
//! a Namespace change, every pod of that namespace.

use super::policy::Context;
use super::policy::Routes;
use super::policy::routes;
use super::policy::status::PolicyStatus;
use super::workloads as pods_to_workloads;
use super::{EndpointsFrom, Index, IndexConfig, Problem, ProblemKind, addresses, services};
use crate::model::{Kind, ObjectKey, PodInfo, SliceInfo};
use crate::store::{ClusterObjects, StoreUpdate};
use crate::views::{Changed, Lineage, LocalView, MeshView, Namespaces};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use weft_destination_api::{Policy, Route, Service, Workload};

/// Where a problem comes from: recomputing the origin replaces its problems.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    PolicyObjects,
    Pod(ObjectKey),
    PodPolicy(ObjectKey),
    Service(ObjectKey),
    Address(IpAddr),
    ClusterIp(IpAddr),
}

#[derive(Debug, Default)]
struct PodState {
    /// The addresses it claims (as listed, repeats included).
    claims: Vec<IpAddr>,
    /// Placed and not finished.
    workload: Option<Arc<Workload>>,
    policy: Option<Arc<Policy>>,
}

#[derive(Debug)]
struct ServiceState {
    claims: Vec<IpAddr>,
    service: Arc<Service>,
    /// Without EndpointSlices: the pods its selector matched.
    selected: Vec<ObjectKey>,
}

#[derive(Debug)]
struct SliceState {
    service: ObjectKey,
    pods: Vec<ObjectKey>,
}

/// What the changes applied since the last [`Incremental::refresh`]
/// touched, by key.
#[derive(Debug, Default)]
struct Dirty {
    pods: BTreeSet<ObjectKey>,
    services: BTreeSet<ObjectKey>,
    slices: BTreeSet<ObjectKey>,
    namespaces: BTreeSet<String>,
    /// Namespaces whose ServiceAccounts changed.
    accounts: BTreeSet<String>,
    /// Any policy object changed: statuses and routes are recomputed.
    policy: bool,
    /// Namespaces whose pods' policies are recomputed.
    policy_namespaces: BTreeSet<String>,
    /// Authentications that changed (their users' namespaces are added).
    authentications: BTreeSet<(Kind, ObjectKey)>,
}

/// The index, updated in place. See the module documentation.
pub struct Incremental {
    objects: ClusterObjects,
    config: IndexConfig,
    dirty: Dirty,

    routes: Routes,
    routes_by_service: BTreeMap<ObjectKey, Vec<Route>>,
    statuses: Arc<Vec<PolicyStatus>>,
    enrolled: Namespaces,

    pods: HashMap<ObjectKey, PodState>,
    ip_claims: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    ip_owner: HashMap<IpAddr, ObjectKey>,
    node_pods: HashMap<String, BTreeSet<ObjectKey>>,
    uid_pods: HashMap<String, BTreeSet<ObjectKey>>,

    services: HashMap<ObjectKey, ServiceState>,
    vip_claims: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    vip_owner: HashMap<IpAddr, ObjectKey>,
    slices: HashMap<ObjectKey, SliceState>,
    slices_by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// EndpointSlices listing each pod (by the pod's key).
    pod_slices: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Without EndpointSlices: the Services whose selector matched each pod.
    pod_services: HashMap<ObjectKey, BTreeSet<ObjectKey>>,

    problems: BTreeMap<Origin, Vec<Problem>>,
    mesh: Arc<MeshView>,
    nodes: BTreeMap<String, Arc<LocalView>>,
}

/// Changes larger than this are not recorded in the mesh's lineage: a
/// delta after them compares whole maps (what a rebuild costs anyway).
const MAX_RECORDED_CHANGES: usize = 4096;

impl Incremental {
    /// Everything is to compute: the first [`Incremental::refresh`] is a
    /// full build.
    pub fn new(objects: ClusterObjects, config: IndexConfig) -> Self {
        let mut this = Self {
            objects: ClusterObjects::default(),
            config,
            dirty: Dirty::default(),
            routes: Routes::new(),
            routes_by_service: BTreeMap::new(),
            statuses: Arc::default(),
            enrolled: Namespaces::default(),
            pods: HashMap::new(),
            ip_claims: HashMap::new(),
            ip_owner: HashMap::new(),
            node_pods: HashMap::new(),
            uid_pods: HashMap::new(),
            services: HashMap::new(),
            vip_claims: HashMap::new(),
            vip_owner: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            pod_slices: HashMap::new(),
            pod_services: HashMap::new(),
            problems: BTreeMap::new(),
            mesh: Arc::default(),
            nodes: BTreeMap::new(),
        };
        this.mark_all(&objects);
        this.dirty.policy = true;
        this.objects = objects;
        this
    }

    pub fn objects(&self) -> &ClusterObjects {
        &self.objects
    }

    /// Applies one update to the objects; the index catches up at the next
    /// [`Incremental::refresh`].
    pub fn apply(&mut self, update: StoreUpdate) {
        match &update {
            StoreUpdate::Apply(object) => self.mark(object.kind(), &object.key()),
            StoreUpdate::Delete(kind, key) => self.mark(*kind, key),
            StoreUpdate::Replace { kinds, objects } => {
                for kind in kinds {
                    for key in self.objects.keys(*kind) {
                        self.mark(*kind, &key);
                    }
                }
                for object in objects {
                    self.mark(object.kind(), &object.key());
                }
            }
        }
        self.objects.apply(update);
    }

    fn mark_all(&mut self, objects: &ClusterObjects) {
        for kind in Kind::ALL {
            for key in objects.keys(kind) {
                self.mark(kind, &key);
            }
        }
    }

    fn mark(&mut self, kind: Kind, key: &ObjectKey) {
        let d = &mut self.dirty;
        match kind {
            Kind::Namespace => {
                d.namespaces.insert(key.name.clone());
            }
            Kind::Pod => {
                d.pods.insert(key.clone());
            }
            Kind::Service => {
                d.services.insert(key.clone());
            }
            Kind::EndpointSlice => {
                d.slices.insert(key.clone());
            }
            Kind::ServiceAccount => {
                d.accounts.insert(key.namespace.clone());
            }
            // The index does not read Nodes.
            Kind::Node => {}
            Kind::Server | Kind::AuthorizationPolicy | Kind::HTTPRoute => {
                d.policy = true;
                d.policy_namespaces.insert(key.namespace.clone());
            }
            Kind::MeshTLSAuthentication | Kind::NetworkAuthentication => {
                d.policy = true;
                d.authentications.insert((kind, key.clone()));
            }
        }
    }

    /// The index as of every update applied so far.
    pub fn index(&self) -> Index {
        let mut problems: Vec<Problem> = self.problems.values().flatten().cloned().collect();
        problems.sort();
        Index {
            mesh: self.mesh.clone(),
            nodes: self.nodes.clone(),
            enrolled_namespaces: self.enrolled.clone(),
            problems,
            policy_statuses: self.statuses.clone(),
        }
    }

    /// Recomputes what the updates applied since the last call affect, and
    /// returns the index.
    pub fn refresh(&mut self) -> Index {
        let mut d = std::mem::take(&mut self.dirty);
        let mut next = Next::default();
        self.namespaces(&mut d);
        self.routes_and_statuses(&mut d);
        self.slices(&d, &mut next);
        self.pods(&mut d, &mut next);
        self.services(&d, &mut next);
        self.mesh_view(next.uids, next.changed_services);
        self.node_views(next.nodes);
        self.index()
    }

    fn namespaces(&mut self, d: &mut Dirty) {
        if d.namespaces.is_empty() && d.accounts.is_empty() {
            return;
        }
        if !d.namespaces.is_empty() {
            let enrolled: BTreeSet<String> = pods_to_workloads::enrolled_namespaces(&self.objects)
                .into_iter()
                .map(str::to_string)
                .collect();
            if *self.enrolled != enrolled {
                self.enrolled = Arc::new(enrolled);
            }
        }
        // Enrollment and the default policy of every pod of a changed
        // namespace; the ServiceAccount problem of every pod of a namespace
        // whose ServiceAccounts changed.
        let accounts = if self.objects.tracks_service_accounts {
            d.accounts.clone()
        } else {
            BTreeSet::new()
        };
        for ns in d.namespaces.iter().chain(&accounts) {
            d.pods
                .extend(in_namespace(&self.objects.pods, ns).map(|(k, _)| k.clone()));
        }
        d.policy_namespaces.extend(d.namespaces.iter().cloned());
    }

    fn routes_and_statuses(&mut self, d: &mut Dirty) {
        // Routes check that their Services exist and have the ports named.
        let services_matter = !d.services.is_empty()
            && (!self.objects.http_routes.is_empty() || !self.routes.is_empty());
        if !(d.policy || services_matter) {
            return;
        }
        let routes = routes::resolve(&self.objects);
        let mut changed = false;
        let keys: BTreeSet<&ObjectKey> = routes.keys().chain(self.routes.keys()).collect();
        for key in keys {
            let (old, new) = (self.routes.get(key), routes.get(key));
            if old == new {
                continue;
            }
            changed = true;
            // Parents are in the route's namespace.
            d.policy_namespaces.insert(key.namespace.clone());
            for r in [old, new]
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_ref().ok())
            {
                d.services.extend(r.services.iter().map(|(s, _)| s.clone()));
            }
        }
        if changed {
            self.routes_by_service = routes::by_service(&routes);
        }
        self.routes = routes;
        if !(d.policy || changed) {
            return;
        }
        // The namespaces of the AuthorizationPolicies requiring an
        // authentication that changed.
        if !d.authentications.is_empty() {
            for (key, object) in &self.objects.authorization_policies {
                let uses = object.spec.required_authentication_refs.iter().any(|r| {
                    let kind = match r.kind.as_str() {
                        "MeshTLSAuthentication" => Kind::MeshTLSAuthentication,
                        "NetworkAuthentication" => Kind::NetworkAuthentication,
                        _ => return false,
                    };
                    let target =
                        ObjectKey::new(r.namespace.as_deref().unwrap_or(&key.namespace), &r.name);
                    d.authentications.contains(&(kind, target))
                });
                if uses {
                    d.policy_namespaces.insert(key.namespace.clone());
                }
            }
        }
        let mut statuses = Vec::new();
        let mut problems = Vec::new();
        Context::new(
            &self.objects,
            &self.config,
            &self.routes,
            None,
            Some((&mut statuses, &mut problems)),
        );
        if *self.statuses != statuses {
            self.statuses = Arc::new(statuses);
        }
        set_problems(&mut self.problems, Origin::PolicyObjects, problems);
    }

    fn slices(&mut self, d: &Dirty, next: &mut Next) {
        for key in &d.slices {
            if let Some(old) = self.slices.remove(key) {
                remove_from(&mut self.slices_by_service, &old.service, key);
                for pod in &old.pods {
                    remove_from(&mut self.pod_slices, pod, key);
                }
                next.services.insert(old.service);
            }
            let Some(slice) = self.objects.slices.get(key) else {
                continue;
            };
            let service = ObjectKey::new(&key.namespace, &slice.service);
            let pods: Vec<ObjectKey> = slice
                .endpoints
                .iter()
                .filter_map(|e| e.pod.as_ref())
                .map(|name| ObjectKey::new(&key.namespace, name))
                .collect();
            self.slices_by_service
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
            for pod in &pods {
                self.pod_slices
                    .entry(pod.clone())
                    .or_default()
                    .insert(key.clone());
            }
            next.services.insert(service.clone());
            self.slices
                .insert(key.clone(), SliceState { service, pods });
        }
    }

    fn pods(&mut self, d: &mut Dirty, next: &mut Next) {
        // Address claims first: who owns an address can change for pods
        // that did not change themselves.
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for key in &d.pods {
            let claims = match self.objects.pods.get(key) {
                Some(pod) if addresses::claims(pod) => pod.ips.clone(),
                _ => Vec::new(),
            };
            let state = self.pods.entry(key.clone()).or_default();
            for ip in &state.claims {
                touched.insert(*ip);
                remove_from(&mut self.ip_claims, ip, key);
            }
            for ip in &claims {
                touched.insert(*ip);
                self.ip_claims.entry(*ip).or_default().insert(key.clone());
            }
            state.claims = claims;
        }
        let pods = &self.objects.pods;
        let owners_changed = reassign_owners(
            touched,
            &self.ip_claims,
            &mut self.ip_owner,
            &mut self.problems,
            |k, ip| pods.get(k).map(|pod| (&pod.created, count(&pod.ips, ip))),
            |ip, winner, loser| Problem {
                kind: ProblemKind::DuplicateAddress,
                object: format!("Pod {loser}"),
                detail: format!(
                    "claims {ip}, which Pod {winner} (created earlier) holds; served without that address"
                ),
            },
            Origin::Address,
        );
        d.pods.extend(owners_changed);

        // Workloads.
        let enrolled: HashSet<&str> = self.enrolled.iter().map(String::as_str).collect();
        let mut policy_pods: BTreeSet<ObjectKey> = BTreeSet::new();
        for key in &d.pods {
            let mut problems = Vec::new();
            let pod = self.objects.pods.get(key);
            let workload = pod.and_then(|pod| {
                let owns = |ip: &IpAddr| self.ip_owner.get(ip) == Some(key);
                pods_to_workloads::workload(
                    &self.objects,
                    &self.config,
                    pod,
                    &enrolled,
                    &owns,
                    &mut problems,
                )
            });
            set_problems(&mut self.problems, Origin::Pod(key.clone()), problems);
            let state = self.pods.entry(key.clone()).or_default();
            let old = state.workload.clone();
            // Equal: the previous allocation is kept.
            let same = old == workload;
            let workload = if same { old.clone() } else { workload };
            state.workload = workload.clone();
            if workload.is_some() {
                policy_pods.insert(key.clone());
            }
            // Services listing or selecting the pod: its existence, labels
            // and workload are what they read.
            match self.config.endpoints {
                EndpointsFrom::EndpointSlices => {
                    for slice in self.pod_slices.get(key).into_iter().flatten() {
                        if let Some(s) = self.slices.get(slice) {
                            next.services.insert(s.service.clone());
                        }
                    }
                }
                EndpointsFrom::Selectors => {
                    next.services
                        .extend(self.pod_services.get(key).into_iter().flatten().cloned());
                    if let Some(pod) = pod {
                        for (svc_key, svc) in in_namespace(&self.objects.services, &key.namespace) {
                            if selects(svc, pod) {
                                next.services.insert(svc_key.clone());
                            }
                        }
                    }
                }
            }
            if same {
                continue;
            }
            for w in [&old, &workload].into_iter().flatten() {
                next.nodes.insert(w.node.clone());
                next.uids.insert(w.uid.clone());
            }
            if let Some(o) = &old {
                remove_from(&mut self.node_pods, &o.node, key);
                remove_from(&mut self.uid_pods, &o.uid, key);
            }
            if let Some(n) = &workload {
                self.node_pods
                    .entry(n.node.clone())
                    .or_default()
                    .insert(key.clone());
                self.uid_pods
                    .entry(n.uid.clone())
                    .or_default()
                    .insert(key.clone());
            }
        }

        // Policies: the pods that changed, and every placed pod of the
        // namespaces whose policy objects changed.
        for ns in &d.policy_namespaces {
            for (key, _) in in_namespace(&self.objects.pods, ns) {
                if self.pods.get(key).is_some_and(|s| s.workload.is_some()) {
                    policy_pods.insert(key.clone());
                }
            }
        }
        // Pods no longer placed: no policy (their node's view changed with
        // their workload).
        for key in d.pods.iter().filter(|k| !policy_pods.contains(*k)) {
            if let Some(state) = self.pods.get_mut(key) {
                state.policy = None;
            }
            self.problems.remove(&Origin::PodPolicy(key.clone()));
        }
        let mut computed: Vec<(ObjectKey, Arc<Policy>, Vec<Problem>)> = Vec::new();
        let mut by_namespace: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
        for key in &policy_pods {
            if let Some(pod) = self.objects.pods.get(key) {
                by_namespace.entry(&key.namespace).or_default().push(pod);
            }
        }
        for (ns, pods) in by_namespace {
            let context = Context::new(&self.objects, &self.config, &self.routes, Some(ns), None);
            for pod in pods {
                let mut problems = Vec::new();
                let policy = context.pod_policy(pod, &mut problems);
                computed.push((pod.key.clone(), policy, problems));
            }
        }
        for (key, policy, problems) in computed {
            set_problems(&mut self.problems, Origin::PodPolicy(key.clone()), problems);
            let Some(state) = self.pods.get_mut(&key) else {
                continue;
            };
            match &state.policy {
                Some(old) if **old == *policy => {}
                _ => {
                    state.policy = Some(policy);
                    if let Some(w) = &state.workload {
                        next.nodes.insert(w.node.clone());
                    }
                }
            }
        }
        // Forget pods that are gone.
        for key in &d.pods {
            let gone = !self.objects.pods.contains_key(key)
                && self
                    .pods
                    .get(key)
                    .is_some_and(|s| s.claims.is_empty() && s.workload.is_none());
            if gone {
                self.pods.remove(key);
            }
        }
    }

    fn services(&mut self, d: &Dirty, next: &mut Next) {
        let mut dirty: BTreeSet<ObjectKey> = d.services.clone();
        dirty.append(&mut next.services);
        // ClusterIP claims.
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for key in &dirty {
            let claims = self
                .objects
                .services
                .get(key)
                .map(|s| s.cluster_ips.clone())
                .unwrap_or_default();
            let old = self
                .services
                .get(key)
                .map(|s| s.claims.as_slice())
                .unwrap_or(&[]);
            for ip in old {
                touched.insert(*ip);
                remove_from(&mut self.vip_claims, ip, key);
            }
            for ip in &claims {
                touched.insert(*ip);
                self.vip_claims.entry(*ip).or_default().insert(key.clone());
            }
        }
        let services = &self.objects.services;
        let owners_changed = reassign_owners(
            touched,
            &self.vip_claims,
            &mut self.vip_owner,
            &mut self.problems,
            |k, ip| {
                services
                    .get(k)
                    .map(|svc| (&svc.created, count(&svc.cluster_ips, ip)))
            },
            |ip, winner, loser| Problem {
                kind: ProblemKind::DuplicateClusterIp,
                object: format!("Service {loser}"),
                detail: format!(
                    "claims ClusterIP {ip}, which Service {winner} (created earlier) holds; served without it"
                ),
            },
            Origin::ClusterIp,
        );
        dirty.extend(owners_changed);

        for key in dirty {
            let old = self.services.remove(&key);
            if let Some(old) = &old {
                for pod in &old.selected {
                    remove_from(&mut self.pod_services, pod, &key);
                }
            }
            let Some(svc) = self.objects.services.get(&key) else {
                self.problems.remove(&Origin::Service(key.clone()));
                if let Some(old) = old {
                    next.changed_services.insert(old.service.key(), None);
                }
                continue;
            };
            let slices: Vec<&SliceInfo> = match self.config.endpoints {
                EndpointsFrom::EndpointSlices => self
                    .slices_by_service
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| self.objects.slices.get(k))
                    .collect(),
                EndpointsFrom::Selectors => Vec::new(),
            };
            let selected: Vec<ObjectKey> = match self.config.endpoints {
                EndpointsFrom::Selectors => in_namespace(&self.objects.pods, &key.namespace)
                    .filter(|(_, pod)| selects(svc, pod))
                    .map(|(k, _)| k.clone())
                    .collect(),
                EndpointsFrom::EndpointSlices => Vec::new(),
            };
            let mut problems = Vec::new();
            let pods = &self.pods;
            let placed = |k: &ObjectKey| pods.get(k).and_then(|s| s.workload.clone());
            let vip_owner = &self.vip_owner;
            let owns = |ip: &IpAddr| vip_owner.get(ip) == Some(&key);
            let service = services::service(
                &self.objects,
                &self.config,
                svc,
                &slices,
                &placed,
                &owns,
                self.routes_by_service
                    .get(&key)
                    .cloned()
                    .unwrap_or_default(),
                &mut problems,
            );
            set_problems(&mut self.problems, Origin::Service(key.clone()), problems);
            for pod in &selected {
                self.pod_services
                    .entry(pod.clone())
                    .or_default()
                    .insert(key.clone());
            }
            let service = match &old {
                Some(o) if *o.service == *service => o.service.clone(),
                _ => {
                    next.changed_services
                        .insert(service.key(), Some(service.clone()));
                    service
                }
            };
            self.services.insert(
                key,
                ServiceState {
                    claims: svc.cluster_ips.clone(),
                    service,
                    selected,
                },
            );
        }
    }

    fn mesh_view(
        &mut self,
        uids: BTreeSet<String>,
        services: BTreeMap<String, Option<Arc<Service>>>,
    ) {
        let mut workloads: Vec<(String, Option<Arc<Workload>>)> = Vec::new();
        for uid in uids {
            // As the full build: the last enrolled pod (by key) of a uid.
            let winner = self.uid_pods.get(&uid).and_then(|keys| {
                keys.iter()
                    .rev()
                    .filter_map(|k| self.pods.get(k)?.workload.clone())
                    .find(|w| w.enrolled)
            });
            if !same_arc(self.mesh.workloads.get(&uid), winner.as_ref()) {
                workloads.push((uid, winner));
            }
        }
        let mut changed_services: Vec<(String, Option<Arc<Service>>)> = Vec::new();
        for (key, new) in services {
            if !same_arc(self.mesh.services.get(&key), new.as_ref()) {
                changed_services.push((key, new));
            }
        }
        if workloads.is_empty() && changed_services.is_empty() {
            return;
        }
        let mut mesh = MeshView {
            workloads: self.mesh.workloads.clone(),
            services: self.mesh.services.clone(),
            lineage: Lineage::default(),
        };
        let mut changed = Changed::default();
        for (uid, w) in workloads {
            match w {
                Some(w) => mesh.workloads.insert(uid.clone(), w),
                None => mesh.workloads.remove(&uid),
            };
            changed.workloads.insert(uid);
        }
        for (key, s) in changed_services {
            match s {
                Some(s) => mesh.services.insert(key.clone(), s),
                None => mesh.services.remove(&key),
            };
            changed.services.insert(key);
        }
        if changed.workloads.len() + changed.services.len() <= MAX_RECORDED_CHANGES {
            mesh.lineage = Lineage::after(&self.mesh, changed);
        }
        self.mesh = Arc::new(mesh);
    }

    fn node_views(&mut self, nodes: BTreeSet<String>) {
        for node in nodes {
            let Some(keys) = self.node_pods.get(&node).filter(|k| !k.is_empty()) else {
                self.node_pods.remove(&node);
                self.nodes.remove(&node);
                continue;
            };
            let mut local = LocalView::default();
            for key in keys {
                let Some(state) = self.pods.get(key) else {
                    continue;
                };
                let Some(w) = &state.workload else {
                    continue;
                };
                local.workloads.insert(w.uid.clone(), w.clone());
                if let Some(p) = &state.policy {
                    local.policies.insert(key.to_string(), p.clone());
                }
                if w.enrolled {
                    local.has_enrolled = true;
                }
            }
            match self.nodes.get(&node) {
                Some(old) if same_local(old, &local) => {}
                _ => {
                    self.nodes.insert(node, Arc::new(local));
                }
            }
        }
    }
}

/// What one refresh found changed, for the later steps.
#[derive(Default)]
struct Next {
    services: BTreeSet<ObjectKey>,
    uids: BTreeSet<String>,
    nodes: BTreeSet<String>,
    /// Services recomputed and different, by `namespace/name` (`None`:
    /// deleted).
    changed_services: BTreeMap<String, Option<Arc<Service>>>,
}

/// The same allocation, or both absent.
fn same_arc<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

fn same_local(a: &LocalView, b: &LocalView) -> bool {
    fn same<V>(a: &BTreeMap<String, Arc<V>>, b: &BTreeMap<String, Arc<V>>) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
    }
    a.has_enrolled == b.has_enrolled
        && same(&a.workloads, &b.workloads)
        && same(&a.policies, &b.policies)
}

/// Who keeps an address several objects claim: the one created first, ties
/// broken by key; every other claim is reported, as the full build does
/// (claims visited in key order, each as many times as it lists the
/// address).
fn resolve_claims<'k>(
    claimants: impl Iterator<Item = (&'k ObjectKey, &'k String, usize)>,
    problem: impl Fn(&ObjectKey, &ObjectKey) -> Problem,
    problems: &mut Vec<Problem>,
) -> Option<&'k ObjectKey> {
    let mut owner: Option<(&ObjectKey, &String)> = None;
    for (key, created, times) in claimants {
        for _ in 0..times {
            owner = Some(match owner {
                None => (key, created),
                Some(current) => {
                    let (winner, loser) = if (created, key) < (current.1, current.0) {
                        ((key, created), current)
                    } else {
                        (current, (key, created))
                    };
                    problems.push(problem(winner.0, loser.0));
                    winner
                }
            });
        }
    }
    owner.map(|(k, _)| k)
}

/// Decides again who owns each address of `touched` among the objects that
/// claim it ([`resolve_claims`]; `claimant`: an object's creation time and
/// how many times it lists the address), keeps the conflicts under
/// `origin(ip)`, and returns the objects whose ownership changed (the old
/// owner and the new one).
fn reassign_owners<'o>(
    touched: BTreeSet<IpAddr>,
    claims: &HashMap<IpAddr, BTreeSet<ObjectKey>>,
    owners: &mut HashMap<IpAddr, ObjectKey>,
    all_problems: &mut BTreeMap<Origin, Vec<Problem>>,
    claimant: impl Fn(&ObjectKey, &IpAddr) -> Option<(&'o String, usize)>,
    problem: impl Fn(IpAddr, &ObjectKey, &ObjectKey) -> Problem,
    origin: impl Fn(IpAddr) -> Origin,
) -> Vec<ObjectKey> {
    let mut changed = Vec::new();
    for ip in touched {
        let mut problems = Vec::new();
        let owner = claims
            .get(&ip)
            .and_then(|claimants| {
                resolve_claims(
                    claimants.iter().filter_map(|k| {
                        let (created, times) = claimant(k, &ip)?;
                        Some((k, created, times))
                    }),
                    |winner, loser| problem(ip, winner, loser),
                    &mut problems,
                )
            })
            .cloned();
        set_problems(all_problems, origin(ip), problems);
        let old = match &owner {
            Some(owner) => owners.insert(ip, owner.clone()),
            None => owners.remove(&ip),
        };
        if old != owner {
            changed.extend(old);
            changed.extend(owner);
        }
    }
    changed
}

fn set_problems(all: &mut BTreeMap<Origin, Vec<Problem>>, origin: Origin, problems: Vec<Problem>) {
    if problems.is_empty() {
        all.remove(&origin);
    } else {
        all.insert(origin, problems);
    }
}

fn count(ips: &[IpAddr], ip: &IpAddr) -> usize {
    ips.iter().filter(|i| *i == ip).count()
}

fn selects(svc: &crate::model::ServiceInfo, pod: &PodInfo) -> bool {
    svc.selector
        .as_ref()
        .is_some_and(|sel| sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
}

fn remove_from<K, V>(map: &mut HashMap<K, BTreeSet<V>>, key: &K, value: &V)
where
    K: std::hash::Hash + Eq,
    V: Ord,
{
    if let Some(set) = map.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

fn in_namespace<'m, V>(
    map: &'m BTreeMap<ObjectKey, V>,
    ns: &'m str,
) -> impl Iterator<Item = (&'m ObjectKey, &'m V)> + 'm {
    map.range(ObjectKey::new(ns, "")..)
        .take_while(move |(k, _)| k.namespace == ns)
}
