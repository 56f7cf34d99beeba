//! The destination service's API, shared by the control plane and the node
//! proxy: the protobuf messages and gRPC stubs (`proto/destination.proto`),
//! the view a proxy assembles from the stream ([`View`]), and a client that
//! keeps that view up to date across reconnects ([`client`]), and the
//! inbound authorization decision the proxy takes from a pod's [`Policy`]
//! ([`policy::authorize`]).
//!
//! Keys: a workload is keyed by its pod uid, a Service and a Policy by
//! `namespace/name` ([`service_key`]).

pub mod address;
pub mod client;
pub mod policy;
pub mod routing;
mod view;

pub use view::{ApplyError, View};

/// Generated protobuf types and gRPC stubs (package `weft.destination.v1`).
pub mod proto {
    tonic::include_proto!("weft.destination.v1");
}

pub use policy::{Decision, Reason, authorize};
pub use proto::{
    Authorization, DefaultPolicy, Endpoint, HeaderMatch, InboundRoute, NamedPort, NamespaceSet,
    Network, PathMatch, PathMatchKind, Policy, PolicyServer, PortRange, Requirement, Route,
    RouteBackend, RouteMatch, RouteRetry, RouteRule, Service, ServicePort, TunnelProtocol,
    WatchRequest, WatchResponse, Workload,
};

/// The trust domain identities use when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The SPIFFE identity of a service account (design.md: identity format).
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The key of a Service (and of a Policy) in views and removal lists.
pub fn service_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl Service {
    pub fn key(&self) -> String {
        service_key(&self.namespace, &self.name)
    }
}

impl Policy {
    pub fn key(&self) -> String {
        service_key(&self.namespace, &self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_format_matches_design() {
        assert_eq!(
            spiffe_id(DEFAULT_TRUST_DOMAIN, "demo", "client"),
            "spiffe://cluster.local/ns/demo/sa/client"
        );
    }
}
