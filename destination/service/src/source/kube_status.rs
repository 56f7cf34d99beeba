//! Writes each policy object's `Accepted` condition to the API server
//! (kube source only): an operator sees on the object itself, with
//! `kubectl describe`, whether it is in effect and why not.
//!
//! Only changes are written: the last status written per object is kept,
//! and an object whose status did not change is not patched again. A failed
//! write is retried at the next change, and every [`RETRY`] until then.

use crate::index::policy::status::PolicyStatus;
use crate::model::{Kind, ObjectKey};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use weft_policy_api as policy;

pub const RETRY: Duration = Duration::from_secs(10);

/// Runs until `statuses` closes.
pub async fn run(client: Client, mut statuses: watch::Receiver<Arc<Vec<PolicyStatus>>>) {
    let mut written: HashMap<(Kind, ObjectKey), PolicyStatus> = HashMap::new();
    loop {
        let current = statuses.borrow_and_update().clone();
        let mut failed = false;
        for status in current.iter() {
            let id = (status.kind, status.key.clone());
            if written.get(&id) == Some(status) {
                continue;
            }
            match write(&client, status).await {
                Ok(()) => {
                    written.insert(id, status.clone());
                }
                // Deleted meanwhile: nothing to report on.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    tracing::warn!(kind = %status.kind, object = %status.key, error = %e,
                        "cannot write the policy status condition; will retry");
                    failed = true;
                }
            }
        }
        // Forget objects that are gone, so a re-created one is written.
        written.retain(|(kind, key), _| current.iter().any(|s| s.kind == *kind && &s.key == key));
        let wait = async {
            if failed {
                tokio::time::sleep(RETRY).await;
                Ok(())
            } else {
                statuses.changed().await
            }
        };
        if wait.await.is_err() {
            return;
        }
    }
}

async fn write(client: &Client, status: &PolicyStatus) -> Result<(), kube::Error> {
    let now = Time(k8s_openapi::chrono::Utc::now());
    let condition = status.condition(status.generation, now);
    let body = serde_json::json!({ "status": { "conditions": [condition] } });
    let ns = &status.key.namespace;
    let name = &status.key.name;
    match status.kind {
        Kind::Server => patch::<policy::Server>(client, ns, name, &body).await,
        Kind::AuthorizationPolicy => {
            patch::<policy::AuthorizationPolicy>(client, ns, name, &body).await
        }
        Kind::MeshTLSAuthentication => {
            patch::<policy::MeshTLSAuthentication>(client, ns, name, &body).await
        }
        Kind::NetworkAuthentication => {
            patch::<policy::NetworkAuthentication>(client, ns, name, &body).await
        }
        Kind::HTTPRoute => patch::<policy::HTTPRoute>(client, ns, name, &body).await,
        _ => Ok(()),
    }
}

async fn patch<K>(
    client: &Client,
    ns: &str,
    name: &str,
    body: &serde_json::Value,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    // A merge patch replaces the whole conditions list: Accepted is the only
    // condition, and it is ours.
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .map(|_| ())
}
