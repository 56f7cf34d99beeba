//! Outbound HTTPRoute routing (docs/routes.md): which rule a request to a
//! Service takes, which backend Service of the rule serves it, and the
//! retry budget of each destination Service.
//!
//! Matching itself is [`weft_destination_api::routing`]; this module keeps
//! the compiled routes per view (compiling builds regular expressions, which
//! must not happen per request) and does the weighted backend choice.

use super::snapshot::Snapshot;
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use weft_balance::{BudgetConfig, RetryBudget};
use weft_destination_api::routing::{Request, Selected};
use weft_destination_api::{RouteBackend, RouteRule, Service, address, service_key};

/// The route label of a request to a destination without HTTPRoutes.
pub const DEFAULT_ROUTE: &str = "default";

/// The route label of a request no HTTPRoute rule matched (answered 404).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// What one request to a Service does, decided once before any attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Not a Service with routes: the destination as dialled.
    Default,
    /// A rule of an HTTPRoute of `service` (the dialled Service's key).
    Rule {
        /// The `route` metric label: `<route>/<rule>`.
        label: String,
        /// Shared with the compiled routes: not copied per request.
        rule: Arc<RouteRule>,
        service: String,
    },
    /// The Service has routes and none matches: 404.
    NotFound,
}

impl Plan {
    pub fn rule(&self) -> Option<&RouteRule> {
        match self {
            Plan::Rule { rule, .. } => Some(rule),
            _ => None,
        }
    }

    /// The `route` label of the request's metrics.
    pub fn label(&self) -> &str {
        match self {
            Plan::Default => DEFAULT_ROUTE,
            Plan::Rule { label, .. } => label,
            Plan::NotFound => UNMATCHED_ROUTE,
        }
    }
}

/// Outbound routing over the current snapshot's compiled routes, and the
/// retry budgets (which outlive views).
#[derive(Default)]
pub struct OutboundRouting {
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
}

impl OutboundRouting {
    /// The plan for a request to `dst` (a Service VIP, or anything else).
    pub fn plan(&self, snapshot: &Snapshot, dst: SocketAddr, req: &Request<'_>) -> Plan {
        let Some(svc) = snapshot.view.service_by_vip(dst.ip()) else {
            return Plan::Default;
        };
        if svc.routes.is_empty() {
            return Plan::Default;
        }
        let key = service_key(&svc.namespace, &svc.name);
        let port = dst.port();
        let Some(routes) = snapshot.outbound_routes(&key, port) else {
            // Routes, but none for this port of the Service.
            return Plan::Default;
        };
        match routes.select(req) {
            Selected::NoRoutes => Plan::Default,
            Selected::NotFound => Plan::NotFound,
            Selected::Rule { route, rule } => Plan::Rule {
                label: if rule.name.is_empty() {
                    route.to_string()
                } else {
                    rule.name.clone()
                },
                rule: rule.clone(),
                service: key,
            },
        }
    }

    /// The retry budget of a destination Service (by key), shared by every
    /// pod of this node: retries are bounded per Service, whoever sends them.
    pub fn budget(&self, service: &str) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().expect("retry budgets lock");
        budgets
            .entry(service.to_string())
            .or_insert_with(|| Arc::new(RetryBudget::new(BudgetConfig::default())))
            .clone()
    }
}

/// A backend of `rule` by weight; `None`: the rule names no backend with
/// weight (the parent Service itself serves it).
pub fn pick_backend<'a>(rule: &'a RouteRule, rng: &mut impl Rng) -> Option<&'a RouteBackend> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rng.random_range(0..total);
    for b in &rule.backends {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    None
}

/// The address a backend Service is dialled at, of the family of `like`:
/// its VIP (for the plain fallback when it has no ready endpoint).
pub fn vip_of(svc: &Service, port: u16, like: SocketAddr) -> Option<SocketAddr> {
    let ips: Vec<_> = svc
        .cluster_ips
        .iter()
        .filter_map(|a| address::decode(a))
        .collect();
    ips.iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or(ips.first())
        .map(|ip| SocketAddr::new(*ip, port))
}

/// The path of a request URI without its query, as routes match it.
pub fn path_of(uri: &http::Uri) -> &str {
    match uri.path() {
        "" => "/",
        p => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn backend(service: &str, weight: u32) -> RouteBackend {
        RouteBackend {
            service: service.into(),
            port: 0,
            weight,
        }
    }

    #[test]
    fn backends_are_picked_by_weight() {
        let rule = RouteRule {
            backends: vec![backend("demo/a", 90), backend("demo/b", 10)],
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let a = (0..10_000)
            .filter(|_| pick_backend(&rule, &mut rng).unwrap().service == "demo/a")
            .count();
        // Binomial(10 000, 0.9): sd 30, so ±150 is five sd.
        assert!((8_850..=9_150).contains(&a), "{a} of 10000 to a");
    }

    #[test]
    fn zero_weights_and_no_backends_mean_the_parent_service() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let empty = RouteRule::default();
        assert!(pick_backend(&empty, &mut rng).is_none());
        let zero = RouteRule {
            backends: vec![backend("demo/a", 0)],
            ..Default::default()
        };
        assert!(pick_backend(&zero, &mut rng).is_none());
        let one = RouteRule {
            backends: vec![backend("demo/a", 0), backend("demo/b", 1)],
            ..Default::default()
        };
        for _ in 0..100 {
            assert_eq!(pick_backend(&one, &mut rng).unwrap().service, "demo/b");
        }
    }
}
