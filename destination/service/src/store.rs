//! The objects the index is computed from: the latest valid version of each,
//! keyed by kind and `namespace/name`. Sources change it through
//! [`StoreUpdate`]s; the index reads it.

use crate::model::{Kind, NamespaceInfo, Object, ObjectKey, PodInfo, ServiceInfo, SliceInfo};
use crate::policy_model::{
    AuthorizationObject, HttpRouteObject, MeshTlsObject, NetworkAuthnObject, ServerObject,
};
use std::collections::{BTreeMap, BTreeSet};

// Moved once from a source to the store: a box per object would cost an
// allocation each for the sake of the small `Delete`.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum StoreUpdate {
    /// Add or replace one object.
    Apply(Object),
    /// Remove one object (absent: nothing to do).
    Delete(Kind, ObjectKey),
    /// Every object of these kinds is now exactly `objects` (a re-list, or
    /// a re-read of the local manifests).
    Replace {
        kinds: Vec<Kind>,
        objects: Vec<Object>,
    },
}

#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub pods: BTreeMap<ObjectKey, PodInfo>,
    pub services: BTreeMap<ObjectKey, ServiceInfo>,
    pub slices: BTreeMap<ObjectKey, SliceInfo>,
    pub service_accounts: BTreeSet<ObjectKey>,
    pub nodes: BTreeSet<String>,
    pub servers: BTreeMap<ObjectKey, ServerObject>,
    pub authorization_policies: BTreeMap<ObjectKey, AuthorizationObject>,
    pub mesh_tls_authentications: BTreeMap<ObjectKey, MeshTlsObject>,
    pub network_authentications: BTreeMap<ObjectKey, NetworkAuthnObject>,
    pub http_routes: BTreeMap<ObjectKey, HttpRouteObject>,
    /// Whether ServiceAccounts are known at all: the local source reads
    /// them from the manifests; the kube source does not watch them (the
    /// API server refuses a pod whose ServiceAccount does not exist).
    pub tracks_service_accounts: bool,
}

impl ClusterObjects {
    pub fn apply(&mut self, update: StoreUpdate) {
        match update {
            StoreUpdate::Apply(object) => self.insert(object),
            StoreUpdate::Delete(kind, key) => self.remove(kind, &key),
            StoreUpdate::Replace { kinds, objects } => {
                for kind in kinds {
                    self.clear(kind);
                }
                for object in objects {
                    self.insert(object);
                }
            }
        }
    }

    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Namespace => self.namespaces.len(),
            Kind::Pod => self.pods.len(),
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.slices.len(),
            Kind::ServiceAccount => self.service_accounts.len(),
            Kind::Node => self.nodes.len(),
            Kind::Server => self.servers.len(),
            Kind::AuthorizationPolicy => self.authorization_policies.len(),
            Kind::MeshTLSAuthentication => self.mesh_tls_authentications.len(),
            Kind::NetworkAuthentication => self.network_authentications.len(),
            Kind::HTTPRoute => self.http_routes.len(),
        }
    }

    /// The keys of every object of `kind` (Namespaces and Nodes by name).
    pub fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        fn keys<V>(m: &BTreeMap<ObjectKey, V>) -> Vec<ObjectKey> {
            m.keys().cloned().collect()
        }
        match kind {
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjectKey::new("", n))
                .collect(),
            Kind::Pod => keys(&self.pods),
            Kind::Service => keys(&self.services),
            Kind::EndpointSlice => keys(&self.slices),
            Kind::ServiceAccount => self.service_accounts.iter().cloned().collect(),
            Kind::Node => self.nodes.iter().map(|n| ObjectKey::new("", n)).collect(),
            Kind::Server => keys(&self.servers),
            Kind::AuthorizationPolicy => keys(&self.authorization_policies),
            Kind::MeshTLSAuthentication => keys(&self.mesh_tls_authentications),
            Kind::NetworkAuthentication => keys(&self.network_authentications),
            Kind::HTTPRoute => keys(&self.http_routes),
        }
    }

    fn insert(&mut self, object: Object) {
        match object {
            Object::Namespace(ns) => {
                self.namespaces.insert(ns.name.clone(), ns);
            }
            Object::Pod(p) => {
                self.pods.insert(p.key.clone(), p);
            }
            Object::Service(s) => {
                self.services.insert(s.key.clone(), s);
            }
            Object::EndpointSlice(s) => {
                self.slices.insert(s.key.clone(), s);
            }
            Object::ServiceAccount(k) => {
                self.service_accounts.insert(k);
            }
            Object::Node(n) => {
                self.nodes.insert(n);
            }
            Object::Server(o) => {
                self.servers.insert(o.key.clone(), o);
            }
            Object::AuthorizationPolicy(o) => {
                self.authorization_policies.insert(o.key.clone(), o);
            }
            Object::MeshTLSAuthentication(o) => {
                self.mesh_tls_authentications.insert(o.key.clone(), o);
            }
            Object::NetworkAuthentication(o) => {
                self.network_authentications.insert(o.key.clone(), o);
            }
            Object::HTTPRoute(o) => {
                self.http_routes.insert(o.key.clone(), o);
            }
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Namespace => {
                self.namespaces.remove(&key.name);
            }
            Kind::Pod => {
                self.pods.remove(key);
            }
            Kind::Service => {
                self.services.remove(key);
            }
            Kind::EndpointSlice => {
                self.slices.remove(key);
            }
            Kind::ServiceAccount => {
                self.service_accounts.remove(key);
            }
            Kind::Node => {
                self.nodes.remove(&key.name);
            }
            Kind::Server => {
                self.servers.remove(key);
            }
            Kind::AuthorizationPolicy => {
                self.authorization_policies.remove(key);
            }
            Kind::MeshTLSAuthentication => {
                self.mesh_tls_authentications.remove(key);
            }
            Kind::NetworkAuthentication => {
                self.network_authentications.remove(key);
            }
            Kind::HTTPRoute => {
                self.http_routes.remove(key);
            }
        }
    }

    fn clear(&mut self, kind: Kind) {
        match kind {
            Kind::Namespace => self.namespaces.clear(),
            Kind::Pod => self.pods.clear(),
            Kind::Service => self.services.clear(),
            Kind::EndpointSlice => self.slices.clear(),
            Kind::ServiceAccount => self.service_accounts.clear(),
            Kind::Node => self.nodes.clear(),
            Kind::Server => self.servers.clear(),
            Kind::AuthorizationPolicy => self.authorization_policies.clear(),
            Kind::MeshTLSAuthentication => self.mesh_tls_authentications.clear(),
            Kind::NetworkAuthentication => self.network_authentications.clear(),
            Kind::HTTPRoute => self.http_routes.clear(),
        }
    }
}
