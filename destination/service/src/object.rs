//! What every object the index reads is: its [`Kind`], its [`ObjectKey`],
//! and the [`Rejection`] that says why one was refused. Shared by the
//! workload model (`model`) and the policy model (`policy_model`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    ServiceAccount,
    Node,
    // policy.weft.io/v1alpha1
    Server,
    AuthorizationPolicy,
    MeshTLSAuthentication,
    NetworkAuthentication,
    HTTPRoute,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::ServiceAccount,
        Kind::Node,
        Kind::Server,
        Kind::AuthorizationPolicy,
        Kind::MeshTLSAuthentication,
        Kind::NetworkAuthentication,
        Kind::HTTPRoute,
    ];

    /// The kinds of the policy API group (`policy.weft.io`).
    pub fn is_policy(self) -> bool {
        matches!(
            self,
            Kind::Server
                | Kind::AuthorizationPolicy
                | Kind::MeshTLSAuthentication
                | Kind::NetworkAuthentication
                | Kind::HTTPRoute
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Node => "Node",
            Kind::Server => "Server",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::MeshTLSAuthentication => "MeshTLSAuthentication",
            Kind::NetworkAuthentication => "NetworkAuthentication",
            Kind::HTTPRoute => "HTTPRoute",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` (namespace empty for cluster-scoped objects).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Why an object was refused. The message names what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {reason}")]
pub struct Rejection {
    pub kind: String,
    /// `namespace/name`, or what is known of it (`<unnamed>`).
    pub object: String,
    pub reason: String,
}

impl Rejection {
    pub(crate) fn new(kind: Kind, meta: &ObjectMeta, reason: impl Into<String>) -> Self {
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        let object = match meta.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
            _ => name.to_string(),
        };
        Self {
            kind: kind.to_string(),
            object,
            reason: reason.into(),
        }
    }
}
