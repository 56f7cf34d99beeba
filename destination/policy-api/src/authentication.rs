//! The two authentication kinds an AuthorizationPolicy refers to.

use crate::PolicyStatus;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Satisfied by a mesh (mTLS) client whose identity matches one of
/// `identities` or `identityRefs`.
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "policy.weft.io",
    version = "v1alpha1",
    kind = "MeshTLSAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "meshtlsauthn"
)]
#[serde(rename_all = "camelCase")]
pub struct MeshTLSAuthenticationSpec {
    /// SPIFFE IDs; `*` matches any run of characters within one path
    /// segment, and `*` alone any authenticated client. At most 256
    /// characters and 8 `*` each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(max = 256), pattern(r"^[^*]*(\*[^*]*){0,8}$")))]
    pub identities: Vec<String>,
    /// `ServiceAccount` (that account's identity) or `Namespace` (every
    /// account of that namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_refs: Vec<IdentityRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    /// For a ServiceAccount; defaults to the authentication's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Satisfied by a client whose address is in one of `networks`.
#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "policy.weft.io",
    version = "v1alpha1",
    kind = "NetworkAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "netauthn"
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAuthenticationSpec {
    pub networks: Vec<Network>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// `10.0.0.0/8`, `fd00::/8`; a bare address means that one address.
    pub cidr: String,
    /// Sub-networks of `cidr` that are not included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}
