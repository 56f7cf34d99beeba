//! `weft_inbound_authz_*`: every inbound decision, by destination workload,
//! the Server and policy that decided, and the reason. Like the TCP
//! metrics, no client address or pod name becomes a label: the series count
//! grows with workloads and policies, not with clients.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub destination_workload: String,
    pub destination_namespace: String,
    /// The Server selecting the port; empty when the default policy applied.
    pub server: String,
    /// The AuthorizationPolicy that allowed it, or the name of the default
    /// (`deny`, `cluster-authenticated`, …) that decided.
    pub policy: String,
    pub reason: String,
}

/// Why a connection or request was allowed or refused: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthzReason {
    /// A kubelet probe from the pod's own node to a probe port.
    Probe,
    /// An AuthorizationPolicy admitted the client.
    Authorized,
    /// The default policy (cluster, namespace or pod) allowed it.
    DefaultAllow,
    /// The default policy refused it.
    DefaultDeny,
    /// Allowed by an `audit` default, which `deny` would refuse.
    Audit,
    /// Admitted only for the Server's routes a route-level policy opens.
    RoutesOnly,
    /// Fail closed: the pod's Policy is not in the view.
    NoPolicy,
    /// Standalone proxy: nothing to enforce.
    NoControlPlane,
    /// A request allowed by a route-level policy.
    RouteAuthorized,
    /// A request refused by route-level authorization.
    RouteDenied,
    /// A routes-only client's connection that is not HTTP.
    RoutesOnlyOpaque,
}

impl AuthzReason {
    pub fn as_label(self) -> &'static str {
        match self {
            AuthzReason::Probe => "probe",
            AuthzReason::Authorized => "authorized",
            AuthzReason::DefaultAllow => "default_allow",
            AuthzReason::DefaultDeny => "default_deny",
            AuthzReason::Audit => "audit",
            AuthzReason::RoutesOnly => "routes_only",
            AuthzReason::NoPolicy => "no_policy",
            AuthzReason::NoControlPlane => "no_control_plane",
            AuthzReason::RouteAuthorized => "route_authorized",
            AuthzReason::RouteDenied => "route_denied",
            AuthzReason::RoutesOnlyOpaque => "routes_only_opaque",
        }
    }
}

impl std::fmt::Display for AuthzReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_label())
    }
}

#[derive(Clone, Default)]
pub struct AuthzMetrics {
    pub(super) allowed: Family<AuthzLabels, Counter>,
    pub(super) denied: Family<AuthzLabels, Counter>,
    pub(super) revoked: Family<AuthzLabels, Counter>,
}

impl AuthzMetrics {
    pub fn register(&self, registry: &mut Registry) {
        // prometheus-client appends `_total` to counters.
        registry.register(
            "weft_inbound_authz_allowed",
            "Inbound connections allowed by policy (reason=audit: allowed, but deny would refuse them; reason=route_authorized: requests allowed by a route-level policy)",
            self.allowed.clone(),
        );
        registry.register(
            "weft_inbound_authz_denied",
            "Inbound connections refused by policy (reset before anything reached the application; reason=route_denied: requests refused with 403 by route-level authorization)",
            self.denied.clone(),
        );
        registry.register(
            "weft_inbound_authz_revoked",
            "Open inbound connections closed because a policy change no longer allows them",
            self.revoked.clone(),
        );
    }

    /// Counts one open connection closed by a policy change.
    pub fn count_revoked(&self, labels: &AuthzLabels) {
        self.revoked.get_or_create(labels).inc();
    }

    /// Counts one decision: a connection admitted or refused, or a request
    /// decided by route-level authorization (its connection was counted
    /// when it was admitted).
    pub fn count(&self, labels: &AuthzLabels, allowed: bool) {
        let family = if allowed { &self.allowed } else { &self.denied };
        family.get_or_create(labels).inc();
    }

    /// The allowed count for one label set (tests).
    pub fn allowed(&self, labels: &AuthzLabels) -> u64 {
        self.allowed.get_or_create(labels).get()
    }

    /// The revoked count for one label set (tests).
    pub fn revoked(&self, labels: &AuthzLabels) -> u64 {
        self.revoked.get_or_create(labels).get()
    }

    /// The denied count for one label set (tests).
    pub fn denied(&self, labels: &AuthzLabels) -> u64 {
        self.denied.get_or_create(labels).get()
    }
}
