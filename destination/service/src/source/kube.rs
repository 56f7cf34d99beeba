//! The `kube` source: one kube-rs watcher per kind (Namespaces, Pods,
//! Services, EndpointSlices, and the policy CRDs).
//!
//! No reflector stores: each object is reduced to the fields the index uses
//! (see [`crate::model`]) as it arrives, and only that is kept. A watcher's
//! (re-)list arrives as `Init`, `InitApply`…, `InitDone` and becomes one
//! `Replace` of that kind, so objects deleted while a watch was down (the
//! 410 Gone case, after which the watcher re-lists) disappear too.

use crate::indexer::SourceEvent;
use crate::metrics::Metrics;
use crate::model::{self, Kind, Object, ObjectKey, Rejection};
use crate::policy_model;
use crate::store::StoreUpdate;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use weft_policy_api as policy;

/// The kinds watched on Kubernetes (ServiceAccounts and Nodes are not: the
/// API server guarantees the former, the latter add nothing to a view).
///
/// Views are served only once every kind has been listed, the policy CRDs
/// included: serving before policies are known would apply the defaults to
/// ports a Server closes. So the CRDs (crds/) must be installed first.
pub const KINDS: [Kind; 9] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Server,
    Kind::AuthorizationPolicy,
    Kind::MeshTLSAuthentication,
    Kind::NetworkAuthentication,
    Kind::HTTPRoute,
];

/// Runs every watcher until `tx` closes. Sends `Synced` once each kind has
/// been listed once.
pub async fn run(client: Client, tx: mpsc::Sender<SourceEvent>, metrics: Arc<Metrics>) {
    let synced = Arc::new(Mutex::new(BTreeSet::new()));
    let watchers = vec![
        tokio::spawn(watch_kind(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            |o| model::namespace_info(o).map(|n| Some(Object::Namespace(n))),
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<Pod>::all(client.clone()),
            Kind::Pod,
            |o| {
                model::pod_info(o)
                    .and_then(require_uid)
                    .map(|p| Some(Object::Pod(p)))
            },
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<Service>::all(client.clone()),
            Kind::Service,
            |o| model::service_info(o).map(|s| Some(Object::Service(s))),
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            |o| model::slice_info(o).map(|s| s.map(Object::EndpointSlice)),
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<policy::Server>::all(client.clone()),
            Kind::Server,
            |o| {
                policy_model::from_resource(Kind::Server, &o.metadata, &o.spec)
                    .map(|p| Some(Object::Server(p)))
            },
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<policy::AuthorizationPolicy>::all(client.clone()),
            Kind::AuthorizationPolicy,
            |o| {
                policy_model::from_resource(Kind::AuthorizationPolicy, &o.metadata, &o.spec)
                    .map(|p| Some(Object::AuthorizationPolicy(p)))
            },
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<policy::MeshTLSAuthentication>::all(client.clone()),
            Kind::MeshTLSAuthentication,
            |o| {
                policy_model::from_resource(Kind::MeshTLSAuthentication, &o.metadata, &o.spec)
                    .map(|p| Some(Object::MeshTLSAuthentication(p)))
            },
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<policy::NetworkAuthentication>::all(client.clone()),
            Kind::NetworkAuthentication,
            |o| {
                policy_model::from_resource(Kind::NetworkAuthentication, &o.metadata, &o.spec)
                    .map(|p| Some(Object::NetworkAuthentication(p)))
            },
            tx.clone(),
            metrics.clone(),
            synced.clone(),
        )),
        tokio::spawn(watch_kind(
            Api::<policy::HTTPRoute>::all(client),
            Kind::HTTPRoute,
            |o| {
                policy_model::from_resource(Kind::HTTPRoute, &o.metadata, &o.spec)
                    .map(|p| Some(Object::HTTPRoute(p)))
            },
            tx,
            metrics,
            synced,
        )),
    ];
    for w in watchers {
        let _ = w.await;
    }
}

/// A pod from the API server always has a uid; one without cannot be
/// referred to by the data plane.
fn require_uid(pod: model::PodInfo) -> Result<model::PodInfo, Rejection> {
    if pod.uid.is_empty() {
        return Err(Rejection {
            kind: "Pod".into(),
            object: pod.key.to_string(),
            reason: "metadata.uid is missing".into(),
        });
    }
    Ok(pod)
}

type Convert<K> = fn(&K) -> Result<Option<Object>, Rejection>;

async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    convert: Convert<K>,
    tx: mpsc::Sender<SourceEvent>,
    metrics: Arc<Metrics>,
    synced: Arc<Mutex<BTreeSet<Kind>>>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let origin = format!("kube watch {kind}");
    let key = |o: &K| ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any());
    let mut listing: Vec<Object> = Vec::new();
    let mut config = watcher::Config::default();
    if kind == Kind::Pod {
        // Finished pods claim nothing (their IPs are reused): do not even
        // receive them. A pod that finishes leaves the selection and arrives
        // as a deletion.
        config = config.fields("status.phase!=Succeeded,status.phase!=Failed");
    }
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let update = match event {
            Ok(Event::Init) => {
                listing.clear();
                None
            }
            Ok(Event::InitApply(o)) => {
                match convert(&o) {
                    Ok(Some(object)) => listing.push(object),
                    Ok(None) => {}
                    Err(r) => metrics.reject(&origin, &r),
                }
                None
            }
            Ok(Event::InitDone) => {
                tracing::debug!(%kind, objects = listing.len(), "listed");
                Some(StoreUpdate::Replace {
                    kinds: vec![kind],
                    objects: std::mem::take(&mut listing),
                })
            }
            Ok(Event::Apply(o)) => match convert(&o) {
                Ok(Some(object)) => Some(StoreUpdate::Apply(object)),
                // No longer something to index (a slice that lost its
                // Service label): forget it.
                Ok(None) => Some(StoreUpdate::Delete(kind, key(&o))),
                Err(r) => {
                    // Keep the last valid version of it.
                    metrics.reject(&origin, &r);
                    None
                }
            },
            Ok(Event::Delete(o)) => Some(StoreUpdate::Delete(kind, key(&o))),
            Err(e) => {
                // The watcher re-lists on its own (with backoff), including
                // after 410 Gone.
                if let watcher::Error::WatchError(response) = &e
                    && response.code == 410
                {
                    metrics.watch_expired(&kind.to_string());
                }
                tracing::warn!(%kind, error = %e, "watch interrupted; re-listing");
                None
            }
        };
        let Some(update) = update else { continue };
        let first_sync = matches!(update, StoreUpdate::Replace { .. }) && {
            let mut done = synced.lock().unwrap_or_else(|e| e.into_inner());
            let before = done.len();
            done.insert(kind);
            before < KINDS.len() && done.len() == KINDS.len()
        };
        if tx.send(SourceEvent::Update(update)).await.is_err() {
            return;
        }
        if first_sync && tx.send(SourceEvent::Synced).await.is_err() {
            return;
        }
    }
}
