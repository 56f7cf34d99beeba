//! `Server`: a port of a set of pods, and what traffic to it is allowed when
//! no authorization matches (`accessPolicy`).

use crate::PolicyStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(CustomResource, Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "policy.weft.io",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    status = "PolicyStatus",
    shortname = "srv",
    printcolumn = r#"{"name":"Port","type":"string","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Access","type":"string","jsonPath":".spec.accessPolicy"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// The pods (in the Server's namespace) this Server applies to.
    pub pod_selector: LabelSelector,
    /// A container port: its number, or its name in the pod's spec.
    pub port: IntOrString,
    /// What the application speaks on the port (a hint; L4 enforcement
    /// does not depend on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// What is allowed to this port when no AuthorizationPolicy does.
    #[serde(default)]
    pub access_policy: DefaultPolicy,
}

/// Linkerd's values, spelled the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum ProxyProtocol {
    #[serde(rename = "unknown")]
    Unknown,
    #[serde(rename = "HTTP/1")]
    Http1,
    #[serde(rename = "HTTP/2")]
    Http2,
    #[serde(rename = "gRPC")]
    Grpc,
    #[serde(rename = "opaque")]
    Opaque,
    #[serde(rename = "TLS")]
    Tls,
}

/// A default inbound policy: the cluster-wide default, the
/// `weft.io/default-inbound-policy` annotation, and a Server's
/// `accessPolicy` all take these values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    AllUnauthenticated,
    AllAuthenticated,
    ClusterAuthenticated,
    ClusterUnauthenticated,
    #[default]
    Deny,
    Audit,
}

impl DefaultPolicy {
    pub const ALL: [DefaultPolicy; 6] = [
        DefaultPolicy::AllUnauthenticated,
        DefaultPolicy::AllAuthenticated,
        DefaultPolicy::ClusterAuthenticated,
        DefaultPolicy::ClusterUnauthenticated,
        DefaultPolicy::Deny,
        DefaultPolicy::Audit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::ClusterUnauthenticated => "cluster-unauthenticated",
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::Audit => "audit",
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a default inbound policy; use one of all-unauthenticated, all-authenticated, \
     cluster-authenticated, cluster-unauthenticated, deny, audit"
)]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for DefaultPolicy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DefaultPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}
