//! Kubernetes mode: which pods run on a node (the pods API), behind the same
//! trait as local mode. Who is calling is `weft_node_auth::kubernetes`
//! (TokenReview, audience `weft-identity`).

use crate::workloads::{Placement, WorkloadDirectory, WorkloadsError};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use weft_identity_api::SpiffeId;

/// Pods on a node from the API: one filtered list per Certify (a node asks
/// once per identity per refresh, hours apart; no cache to go stale).
pub struct KubeWorkloads {
    client: Client,
}

impl KubeWorkloads {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl WorkloadDirectory for KubeWorkloads {
    fn placement<'a>(
        &'a self,
        node: &'a str,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Placement, WorkloadsError>> {
        Box::pin(async move {
            let pods = Api::<Pod>::namespaced(self.client.clone(), identity.namespace())
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .map_err(|e| WorkloadsError::Api(e.to_string()))?;
            let running = pods.items.iter().filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                // Finished pods keep their node but no longer run anything.
                !matches!(phase, Some("Succeeded") | Some("Failed"))
            });
            for pod in running {
                let account = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default");
                if account == identity.service_account() {
                    return Ok(Placement::OnNode {
                        pod: format!(
                            "{}/{}",
                            identity.namespace(),
                            pod.metadata.name.as_deref().unwrap_or("?")
                        ),
                    });
                }
            }
            Ok(Placement::NotOnNode(format!(
                "no running pod of namespace {} on this node uses it",
                identity.namespace()
            )))
        })
    }
}
