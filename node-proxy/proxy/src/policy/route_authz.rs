//! Route-level authorization on the inbound side: when the Server of a
//! local pod's port has HTTPRoutes, every request is decided by
//! [`InboundRoutes::authorize`] (403 / PERMISSION_DENIED when no policy of
//! the matched route admits the client, 404 / NOT_FOUND when no route
//! matches), and counted in `weft_inbound_authz_*` with the reasons
//! `route_authorized` and `route_denied`.
//!
//! The connection itself was admitted at L4 ([`super::authz`]), possibly
//! only because a route-level policy admits the client
//! (`routes_only`): such a connection must be HTTP, else it is refused,
//! since no request could be checked.

use super::authz::ConnectionAccess;
use crate::state::PodInfo;
use crate::state::Snapshot;
use crate::telemetry::{AuthzLabels, AuthzMetrics, AuthzReason};
use std::net::IpAddr;
use std::sync::Arc;
use weft_cert_manager::SpiffeId;
use weft_destination_api::routing::{Request, RouteDecision};

/// What an inbound connection's requests are decided with.
#[derive(Clone, Debug)]
pub struct RouteAccess {
    /// The verified identity (HBONE), `None` on 15006.
    pub client: Option<Arc<SpiffeId>>,
    pub client_ip: IpAddr,
    /// The pod's port the client dialled.
    pub port: u16,
    /// Whether the connection is admitted at L4 for routes only *now*
    /// (requests the routes do not decide, when the Server has no routes
    /// any more, are then refused), and how it is served. Kept current by
    /// policy changes: a copy taken at admission would refuse requests the
    /// policy has since allowed, or pass ones it no longer allows.
    pub connection: ConnectionAccess,
}

/// Route-level authorization over the current snapshot's compiled inbound
/// routes.
#[derive(Default)]
pub struct InboundRouting;

/// One request's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// No routes: the connection's admission stands.
    Pass,
    /// Allowed on this route (the `route` metric label).
    Allowed { route: String },
    /// 403 on this route (empty: refused because the connection was
    /// admitted for routes only and the Server has none now).
    Denied { route: String },
    /// 404.
    NotFound,
}

impl InboundRouting {
    /// Decides one request against `snapshot` (no routes without a control
    /// plane), and counts the decision in `metrics`.
    pub fn decide(
        &self,
        snapshot: &Snapshot,
        metrics: &AuthzMetrics,
        pod: &PodInfo,
        access: &RouteAccess,
        req: &Request<'_>,
    ) -> RequestVerdict {
        if snapshot.policy_view().is_none() {
            return RequestVerdict::Pass;
        }
        let found = pod
            .workload_uid
            .as_deref()
            .and_then(|uid| snapshot.inbound_routes(uid, access.port));
        let Some((server, routes)) = found else {
            if access.connection.routes_only() {
                // Fail closed: admitted for routes that are gone.
                self.count(metrics, pod, "", "", AuthzReason::RouteDenied, false);
                return RequestVerdict::Denied {
                    route: String::new(),
                };
            }
            return RequestVerdict::Pass;
        };
        match routes.authorize(req, access.client.as_deref(), access.client_ip) {
            // Not reached with routes (compiled only when there are some).
            RouteDecision::NoRoutes => RequestVerdict::Pass,
            RouteDecision::Allowed { route, policy } => {
                self.count(
                    metrics,
                    pod,
                    server,
                    &policy,
                    AuthzReason::RouteAuthorized,
                    true,
                );
                RequestVerdict::Allowed { route }
            }
            RouteDecision::Denied { route } => {
                // No policy admitted it: the route that refused is named.
                self.count(
                    metrics,
                    pod,
                    server,
                    &route,
                    AuthzReason::RouteDenied,
                    false,
                );
                RequestVerdict::Denied { route }
            }
            RouteDecision::NotFound => RequestVerdict::NotFound,
        }
    }

    fn count(
        &self,
        metrics: &AuthzMetrics,
        pod: &PodInfo,
        server: &str,
        policy: &str,
        reason: AuthzReason,
        allowed: bool,
    ) {
        let labels = AuthzLabels {
            destination_workload: pod.name.clone(),
            destination_namespace: pod.namespace.clone(),
            server: server.to_string(),
            policy: policy.to_string(),
            reason: reason.as_label().to_string(),
        };
        metrics.count(&labels, allowed);
    }
}
