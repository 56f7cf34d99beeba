//! The node's view as a proxy holds it: the objects of the last snapshot with
//! every later delta applied, plus lookups by address (what the proxy asks
//! when a pod connects somewhere).

use crate::{Policy, Service, WatchResponse, Workload, address};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub struct View {
    /// The control plane run this view came from (empty: nothing received).
    pub epoch: String,
    pub version: u64,
    /// Shared, so that what a connection or a request keeps of its peer
    /// (its route, its metrics labels) costs a reference count, not a copy
    /// of the record with all its labels.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    pub services: BTreeMap<String, Service>,
    pub policies: BTreeMap<String, Policy>,
    /// The namespaces in the mesh; `None` until a response has said.
    pub enrolled_namespaces: Option<BTreeSet<String>>,
    by_address: HashMap<IpAddr, String>,
    by_vip: HashMap<IpAddr, String>,
    /// Workload uid → keys of the Services it is an endpoint of (asked per
    /// inbound connection: which Service a client reached).
    by_endpoint: HashMap<String, BTreeSet<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error(
        "delta for version {base} of epoch {epoch:?} does not apply to the held view \
         (epoch {held_epoch:?}, version {held}); a fresh snapshot is needed"
    )]
    BaseMismatch {
        epoch: String,
        base: u64,
        held_epoch: String,
        held: u64,
    },
}

impl PartialEq for View {
    /// Two views are equal when they hold the same objects at the same
    /// version (the address maps are derived from the objects).
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch
            && self.version == other.version
            && self.workloads == other.workloads
            && self.services == other.services
            && self.policies == other.policies
            && self.enrolled_namespaces == other.enrolled_namespaces
    }
}

impl View {
    /// Applies one response of the stream. A delta must start from the
    /// version held; otherwise nothing changes and the caller asks for a
    /// snapshot.
    pub fn apply(&mut self, response: WatchResponse) -> Result<(), ApplyError> {
        if response.snapshot {
            self.enrolled_namespaces = None;
            self.workloads.clear();
            self.services.clear();
            self.policies.clear();
            self.by_address.clear();
            self.by_vip.clear();
            self.by_endpoint.clear();
        } else if response.epoch != self.epoch || response.base_version != self.version {
            return Err(ApplyError::BaseMismatch {
                epoch: response.epoch,
                base: response.base_version,
                held_epoch: self.epoch.clone(),
                held: self.version,
            });
        }
        for uid in &response.removed_workloads {
            self.remove_workload(uid);
        }
        for key in &response.removed_services {
            self.remove_service(key);
        }
        for key in &response.removed_policies {
            self.policies.remove(key);
        }
        for workload in response.workloads {
            self.remove_workload(&workload.uid);
            for ip in workload.addresses.iter().filter_map(|a| address::decode(a)) {
                self.by_address.insert(ip, workload.uid.clone());
            }
            self.workloads
                .insert(workload.uid.clone(), Arc::new(workload));
        }
        for service in response.services {
            let key = service.key();
            self.remove_service(&key);
            for ip in service
                .cluster_ips
                .iter()
                .filter_map(|a| address::decode(a))
            {
                self.by_vip.insert(ip, key.clone());
            }
            for ep in service
                .endpoints
                .iter()
                .filter(|e| !e.workload_uid.is_empty())
            {
                self.by_endpoint
                    .entry(ep.workload_uid.clone())
                    .or_default()
                    .insert(key.clone());
            }
            self.services.insert(key, service);
        }
        for policy in response.policies {
            self.policies.insert(policy.key(), policy);
        }
        if let Some(namespaces) = response.enrolled_namespaces {
            self.enrolled_namespaces = Some(namespaces.names.into_iter().collect());
        }
        self.epoch = response.epoch;
        self.version = response.version;
        Ok(())
    }

    /// The workload that owns a pod IP.
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_address
            .get(&ip)
            .and_then(|uid| self.workloads.get(uid))
    }

    /// The inbound policy of one of this node's workloads. `None` means the
    /// view has no policy for it: the proxy should refuse inbound
    /// connections to it (a pod's policy arrives in the same response as
    /// the pod itself, so this is never a normal state).
    pub fn policy_of(&self, workload: &Workload) -> Option<&Policy> {
        self.policies
            .get(&crate::service_key(&workload.namespace, &workload.name))
    }

    /// The Service whose ClusterIP this is.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.by_vip.get(&ip).and_then(|key| self.services.get(key))
    }

    /// The Services (in key order) with `uid` among their endpoints.
    pub fn services_of_workload<'a>(&'a self, uid: &str) -> impl Iterator<Item = &'a Service> {
        self.by_endpoint
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(key))
    }

    fn remove_workload(&mut self, uid: &str) {
        if let Some(old) = self.workloads.remove(uid) {
            for ip in old.addresses.iter().filter_map(|a| address::decode(a)) {
                // Only if the address still points here: another workload
                // may have taken it over within the same response.
                if self.by_address.get(&ip).is_some_and(|owner| owner == uid) {
                    self.by_address.remove(&ip);
                }
            }
        }
    }

    fn remove_service(&mut self, key: &str) {
        if let Some(old) = self.services.remove(key) {
            for ip in old.cluster_ips.iter().filter_map(|a| address::decode(a)) {
                if self.by_vip.get(&ip).is_some_and(|owner| owner == key) {
                    self.by_vip.remove(&ip);
                }
            }
            for ep in &old.endpoints {
                if let Some(keys) = self.by_endpoint.get_mut(&ep.workload_uid) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_endpoint.remove(&ep.workload_uid);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec![address::encode(ip.parse().unwrap())],
            ..Default::default()
        }
    }

    fn snapshot(version: u64, workloads: Vec<Workload>) -> WatchResponse {
        WatchResponse {
            epoch: "e1".into(),
            version,
            snapshot: true,
            workloads,
            ..Default::default()
        }
    }

    #[test]
    fn snapshot_then_delta_moves_an_address() {
        let mut view = View::default();
        view.apply(snapshot(3, vec![workload("a", "10.0.0.1")]))
            .unwrap();
        let ip = "10.0.0.1".parse().unwrap();
        assert_eq!(view.workload_by_address(ip).unwrap().uid, "a");

        // a leaves, b takes the same IP, in one delta.
        view.apply(WatchResponse {
            epoch: "e1".into(),
            version: 5,
            base_version: 3,
            removed_workloads: vec!["a".into()],
            workloads: vec![workload("b", "10.0.0.1")],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(view.workload_by_address(ip).unwrap().uid, "b");
        assert_eq!(view.workloads.len(), 1);
        assert_eq!(view.version, 5);
    }

    #[test]
    fn delta_from_another_base_is_refused_and_changes_nothing() {
        let mut view = View::default();
        view.apply(snapshot(3, vec![workload("a", "10.0.0.1")]))
            .unwrap();
        let before = view.clone();
        let err = view
            .apply(WatchResponse {
                epoch: "e1".into(),
                version: 9,
                base_version: 7,
                removed_workloads: vec!["a".into()],
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(
            err,
            ApplyError::BaseMismatch {
                base: 7,
                held: 3,
                ..
            }
        ));
        assert_eq!(view, before);
    }

    #[test]
    fn services_are_found_by_their_endpoint_workloads() {
        let service = |name: &str, uids: &[&str]| Service {
            name: name.into(),
            namespace: "ns".into(),
            endpoints: uids
                .iter()
                .map(|u| crate::Endpoint {
                    workload_uid: u.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let names = |view: &View, uid: &str| -> Vec<String> {
            view.services_of_workload(uid)
                .map(|s| s.name.clone())
                .collect()
        };
        let mut view = View::default();
        let mut response = snapshot(1, vec![workload("a", "10.0.0.1")]);
        response.services = vec![service("web", &["a", "b"]), service("api", &["a"])];
        view.apply(response).unwrap();
        assert_eq!(names(&view, "a"), ["api", "web"]);
        assert_eq!(names(&view, "b"), ["web"]);
        // An updated Service drops a workload; a removed one drops all.
        view.apply(WatchResponse {
            epoch: "e1".into(),
            version: 2,
            base_version: 1,
            services: vec![service("web", &["b"])],
            removed_services: vec!["ns/api".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(names(&view, "a").is_empty());
        assert_eq!(names(&view, "b"), ["web"]);
        view.apply(snapshot(3, vec![])).unwrap();
        assert!(names(&view, "b").is_empty());
    }

    #[test]
    fn policies_are_found_by_workload_and_removed_by_key() {
        let mut view = View::default();
        let mut response = snapshot(1, vec![workload("a", "10.0.0.1")]);
        response.policies = vec![Policy {
            name: "a".into(),
            namespace: "ns".into(),
            workload_uid: "a".into(),
            ..Default::default()
        }];
        view.apply(response).unwrap();
        let w = view.workloads["a"].clone();
        assert_eq!(view.policy_of(&w).unwrap().workload_uid, "a");
        view.apply(WatchResponse {
            epoch: "e1".into(),
            version: 2,
            base_version: 1,
            removed_policies: vec!["ns/a".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(view.policy_of(&w).is_none());
    }

    #[test]
    fn snapshot_replaces_everything() {
        let mut view = View::default();
        view.apply(snapshot(3, vec![workload("a", "10.0.0.1")]))
            .unwrap();
        view.apply(snapshot(4, vec![workload("b", "10.0.0.2")]))
            .unwrap();
        assert!(
            view.workload_by_address("10.0.0.1".parse().unwrap())
                .is_none()
        );
        assert_eq!(view.workloads.keys().collect::<Vec<_>>(), ["b"]);
    }
}
