//! `AuthorizationPolicy`: lets the clients that satisfy *every* one of its
//! `requiredAuthenticationRefs` reach its target.

use crate::PolicyStatus;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "policy.weft.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "authzpolicy"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// What the policy authorizes traffic to, in the policy's namespace: a
    /// `Server`, a `Namespace` (every Server in it), or an `HTTPRoute`
    /// whose parent is a Server (requests matching that route).
    pub target_ref: TargetRef,
    /// All of them must be satisfied. Kinds: `MeshTLSAuthentication`,
    /// `NetworkAuthentication`, `ServiceAccount`.
    pub required_authentication_refs: Vec<AuthenticationRef>,
}

/// A local object reference (Gateway API's `LocalPolicyTargetReference`).
/// Kinds are strings, not an enum, so that an unsupported kind reaches the
/// index and is reported there rather than silently rejected at admission.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    /// Defaults to the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}
