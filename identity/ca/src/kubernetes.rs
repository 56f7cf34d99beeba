//! Kubernetes mode: who is calling (TokenReview) and which pods run on that
//! node (the pods API), behind the same traits as local mode.
//!
//! A node proxy sends a projected ServiceAccount token with audience
//! `weft-identity`. The API server's TokenReview says whether it is valid and
//! for whom. Two checks matter beyond validity:
//! - The token must belong to the node proxy's own service account. Any pod
//!   can mount a token with audience `weft-identity` for *its* account; were
//!   such tokens accepted, any workload could obtain the identities of every
//!   pod on its node.
//! - The node comes from the token itself: the
//!   `authentication.kubernetes.io/node-name` extra (Kubernetes ≥ 1.30), else
//!   the pod it was issued for (`…/pod-name`, `…/pod-uid`), looked up to find
//!   its `spec.nodeName`.

use crate::workloads::{Placement, WorkloadDirectory, WorkloadsError};
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use weft_identity_api::SpiffeId;
use weft_node_auth::{AuthError, AuthenticatedNode, NodeAuthenticator};

/// The audience node proxies' projected tokens must carry.
pub const AUDIENCE: &str = "weft-identity";
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// The node proxy's service account in the shipped manifests.
pub const DEFAULT_NODE_PROXY_ACCOUNT: &str = "weft-system/weft-node-proxy";

pub struct TokenReviewAuthenticator {
    client: Client,
    /// `system:serviceaccount:<ns>:<name>` of the node proxy.
    node_proxy_user: String,
}

impl TokenReviewAuthenticator {
    /// `node_proxy_account` is `<namespace>/<name>`.
    pub fn new(client: Client, node_proxy_account: &str) -> Self {
        let (ns, name) = node_proxy_account
            .split_once('/')
            .unwrap_or(("weft-system", node_proxy_account));
        Self {
            client,
            node_proxy_user: format!("system:serviceaccount:{ns}:{name}"),
        }
    }

    async fn review(&self, token: &str) -> Result<AuthenticatedNode, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = reviewed
            .status
            .ok_or_else(|| AuthError::Unavailable("TokenReview returned no status".into()))?;
        self.node_of(status).await
    }

    async fn node_of(&self, status: TokenReviewStatus) -> Result<AuthenticatedNode, AuthError> {
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(format!(
                "token not accepted by the API server{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        // An answer that names no audience does not say the token is for
        // us: it could be any token of the account (the destination
        // service's, replayed), so it is refused, not assumed.
        if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
            return Err(AuthError::Rejected(format!(
                "token is not for audience {AUDIENCE:?}: project it with `audience: {AUDIENCE}`"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.node_proxy_user {
            return Err(AuthError::Rejected(format!(
                "{username:?} is not the node proxy's service account ({}); only node proxies may ask for certificates",
                self.node_proxy_user
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        if let Some(node) = first(NODE_NAME_EXTRA) {
            return Ok(AuthenticatedNode { node });
        }
        let Some(pod_name) = first(POD_NAME_EXTRA) else {
            return Err(AuthError::Rejected(
                "token is not bound to a pod or node: mount a projected service account token, not a Secret-based one".into(),
            ));
        };
        // username = system:serviceaccount:<ns>:<name>; the pod is in <ns>.
        let namespace = username.split(':').nth(2).unwrap_or_default();
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|e| {
                AuthError::Unavailable(format!("cannot look up pod {namespace}/{pod_name}: {e}"))
            })?
            .ok_or_else(|| {
                AuthError::Rejected(format!(
                    "the token's pod {namespace}/{pod_name} no longer exists"
                ))
            })?;
        if let Some(uid) = first(POD_UID_EXTRA)
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(AuthError::Rejected(format!(
                "the token was issued to an earlier pod named {namespace}/{pod_name}"
            )));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .map(|node| AuthenticatedNode { node })
            .ok_or_else(|| {
                AuthError::Rejected(format!(
                    "pod {namespace}/{pod_name} is not scheduled to a node"
                ))
            })
    }
}

impl NodeAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(
        &'a self,
        bearer: &'a str,
    ) -> BoxFuture<'a, Result<AuthenticatedNode, AuthError>> {
        Box::pin(self.review(bearer))
    }
}

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
