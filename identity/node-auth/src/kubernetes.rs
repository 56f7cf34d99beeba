//! On Kubernetes: a node proxy's projected ServiceAccount token, checked by
//! TokenReview, bound to a node through the token's node claim.
//!
//! Each control plane service has its own audience ([`IDENTITY_AUDIENCE`],
//! [`DESTINATION_AUDIENCE`]) and the node proxy mounts one token per
//! service, so whoever impersonates one service cannot replay the token it
//! received to the other. Two checks matter beyond validity and audience:
//! - The token must belong to the node proxy's own service account. Any pod
//!   can mount a token with audience `weft-identity` for *its* account; were
//!   such tokens accepted, any workload could obtain the identities of every
//!   pod on its node.
//! - The node comes from the token itself: the
//!   `authentication.kubernetes.io/node-name` extra (Kubernetes ≥ 1.30), else
//!   the pod it was issued for (`…/pod-name`, `…/pod-uid`), looked up to find
//!   its `spec.nodeName`.

use crate::{AuthError, AuthenticatedNode, NodeAuthenticator};
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};

/// The audience of the token a node proxy sends to the identity CA.
pub const IDENTITY_AUDIENCE: &str = "weft-identity";
/// The audience of the token a node proxy sends to the destination service.
pub const DESTINATION_AUDIENCE: &str = "weft-destination";
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// The node proxy's service account in the shipped manifests.
pub const DEFAULT_NODE_PROXY_ACCOUNT: &str = "weft-system/weft-node-proxy";

pub struct TokenReviewAuthenticator {
    client: Client,
    /// `system:serviceaccount:<ns>:<name>` of the node proxy.
    node_proxy_user: String,
    /// The audience this service's tokens carry, and no other service's.
    audience: &'static str,
}

impl TokenReviewAuthenticator {
    /// `node_proxy_account` is `<namespace>/<name>`; `audience` is the
    /// service's own ([`IDENTITY_AUDIENCE`], [`DESTINATION_AUDIENCE`]).
    pub fn new(client: Client, node_proxy_account: &str, audience: &'static str) -> Self {
        let (ns, name) = node_proxy_account
            .split_once('/')
            .unwrap_or(("weft-system", node_proxy_account));
        Self {
            client,
            node_proxy_user: format!("system:serviceaccount:{ns}:{name}"),
            audience,
        }
    }

    async fn review(&self, token: &str) -> Result<AuthenticatedNode, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.to_string()]),
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
        // us: it could be any token of the account (the other control
        // plane service's, replayed), so it is refused, not assumed.
        let audience = self.audience;
        if !status.audiences.iter().flatten().any(|a| a == audience) {
            return Err(AuthError::Rejected(format!(
                "token is not for audience {audience:?}: project it with `audience: {audience}`"
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
