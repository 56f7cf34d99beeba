//! HTTPRoutes resolved into what the node proxies act on: outbound routes
//! on their parent Services (matching, weighted backends, timeouts,
//! retries) and inbound routes on their parent Servers (the targets of
//! route-level AuthorizationPolicies). docs/routes.md.
//!
//! As with the other policy kinds, a route that does not resolve is left out
//! whole and reported (`Accepted: False` with the reason): for an outbound
//! route that means the Service is balanced as if it had no route; for an
//! inbound route, that its AuthorizationPolicies grant nothing.

mod duration;
#[cfg(test)]
mod tests;

use super::resolve::{Failure, core, ours};
use super::status::Ineffective;
use crate::model::ObjectKey;
use crate::policy_model::HttpRouteObject;
use crate::store::ClusterObjects;
use std::collections::BTreeMap;
use weft_destination_api::{
    HeaderMatch, PathMatch, PathMatchKind, RouteBackend, RouteMatch, RouteRetry, RouteRule,
};
use weft_policy_api::{HTTPBackendRef, HTTPRouteMatch, HTTPRouteRule, ParentRef};

/// One HTTPRoute that makes sense.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedRoute {
    /// Parent Services and the port each applies to (0: every port).
    pub services: Vec<(ObjectKey, u16)>,
    /// Parent Servers (inbound routes).
    pub servers: Vec<ObjectKey>,
    pub rules: Vec<RouteRule>,
    /// Orders routes of one parent (the older first, as Gateway API breaks
    /// ties).
    pub created: String,
}

/// Every HTTPRoute, resolved or with the reason it is not in effect.
pub fn resolve(objects: &ClusterObjects) -> BTreeMap<ObjectKey, Result<ResolvedRoute, Failure>> {
    objects
        .http_routes
        .iter()
        .map(|(key, object)| (key.clone(), route(object, objects)))
        .collect()
}

/// The outbound routes of each Service, oldest first.
pub fn by_service(
    routes: &BTreeMap<ObjectKey, Result<ResolvedRoute, Failure>>,
) -> BTreeMap<ObjectKey, Vec<weft_destination_api::Route>> {
    let mut valid: Vec<(&ObjectKey, &ResolvedRoute)> = routes
        .iter()
        .filter_map(|(k, r)| Some((k, r.as_ref().ok()?)))
        .collect();
    valid.sort_by(|a, b| (&a.1.created, a.0).cmp(&(&b.1.created, b.0)));
    let mut out: BTreeMap<ObjectKey, Vec<weft_destination_api::Route>> = BTreeMap::new();
    for (key, route) in valid {
        for (service, port) in &route.services {
            out.entry(service.clone())
                .or_default()
                .push(weft_destination_api::Route {
                    name: key.to_string(),
                    port: (*port).into(),
                    rules: route.rules.clone(),
                });
        }
    }
    out
}

fn invalid(why: String) -> Failure {
    (Ineffective::Invalid, why)
}

fn route(object: &HttpRouteObject, objects: &ClusterObjects) -> Result<ResolvedRoute, Failure> {
    let ns = &object.key.namespace;
    if object.spec.parent_refs.is_empty() {
        return Err(invalid(
            "parentRefs is empty: name the Service (outbound) or Server (inbound) it applies to"
                .into(),
        ));
    }
    let mut resolved = ResolvedRoute {
        services: Vec::new(),
        servers: Vec::new(),
        rules: Vec::new(),
        created: object.created.clone(),
    };
    for parent in &object.spec.parent_refs {
        parent_ref(parent, ns, objects, &mut resolved)?;
    }
    for (i, rule) in object.spec.rules.iter().enumerate() {
        let name = rule.name.clone().unwrap_or_else(|| i.to_string());
        resolved.rules.push(route_rule(
            rule,
            &format!("{}/{name}", object.key.name),
            ns,
            objects,
        )?);
    }
    if resolved.rules.is_empty() {
        // Gateway API: a route without rules matches nothing. Say so rather
        // than silently answering every request 404.
        return Err(invalid(
            "rules is empty: the route would match no request".into(),
        ));
    }
    Ok(resolved)
}

fn parent_ref(
    parent: &ParentRef,
    ns: &str,
    objects: &ClusterObjects,
    out: &mut ResolvedRoute,
) -> Result<(), Failure> {
    let parent_ns = parent.namespace.as_deref().unwrap_or(ns);
    if parent_ns != ns {
        // Linkerd's "consumer routes" (a route in the client's namespace
        // for another namespace's Service) are not supported yet.
        return Err(invalid(format!(
            "parentRefs: {} in namespace {parent_ns:?} is not in the route's namespace {ns:?}; \
             create the route next to its parent",
            parent.name
        )));
    }
    let key = ObjectKey::new(ns, &parent.name);
    match parent.kind.as_deref().unwrap_or("Service") {
        "Service" if core(&parent.group) => {
            let Some(service) = objects.services.get(&key) else {
                return Err((
                    Ineffective::DanglingReference,
                    format!("parentRefs: Service {key} does not exist"),
                ));
            };
            let port = parent.port.unwrap_or(0);
            if port != 0 && !service.ports.iter().any(|p| p.port == port) {
                return Err(invalid(format!(
                    "parentRefs: Service {key} has no port {port}"
                )));
            }
            out.services.push((key, port));
        }
        "Server" if ours(&parent.group) => {
            if !objects.servers.contains_key(&key) {
                return Err((
                    Ineffective::DanglingReference,
                    format!("parentRefs: Server {key} does not exist"),
                ));
            }
            out.servers.push(key);
        }
        kind => {
            return Err((
                Ineffective::UnsupportedKind,
                format!(
                    "parentRefs: kind {kind:?} (group {:?}) is not supported; use Service or Server",
                    parent.group.as_deref().unwrap_or("")
                ),
            ));
        }
    }
    Ok(())
}

/// The most retries one request may make whatever a route says: beyond a
/// few, retries multiply load on a failing backend (the proxy's retry
/// budget bounds the total as well).
const MAX_ATTEMPTS: u32 = 10;

fn route_rule(
    rule: &HTTPRouteRule,
    name: &str,
    ns: &str,
    objects: &ClusterObjects,
) -> Result<RouteRule, Failure> {
    let matches = rule
        .matches
        .iter()
        .map(route_match)
        .collect::<Result<Vec<_>, _>>()?;
    let backends = rule
        .backend_refs
        .iter()
        .map(|b| backend(b, ns, objects))
        .collect::<Result<Vec<_>, _>>()?;
    let millis = |field: &str, text: &Option<String>| -> Result<u64, Failure> {
        match text {
            None => Ok(0),
            Some(t) => duration::parse(t)
                .map(|d| d.as_millis().try_into().unwrap_or(u64::MAX))
                .map_err(|e| invalid(format!("rule {name}: {field}: {e}"))),
        }
    };
    let timeouts = rule.timeouts.clone().unwrap_or_default();
    let request = millis("timeouts.request", &timeouts.request)?;
    let backend_request = millis("timeouts.backendRequest", &timeouts.backend_request)?;
    if request != 0 && backend_request > request {
        return Err(invalid(format!(
            "rule {name}: timeouts.backendRequest is longer than timeouts.request"
        )));
    }
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            if let Some(code) = r.codes.iter().find(|c| !(100..=599).contains(*c)) {
                return Err(invalid(format!(
                    "rule {name}: retry.codes: {code} is not an HTTP status"
                )));
            }
            let attempts = r.attempts.unwrap_or(1);
            if attempts > MAX_ATTEMPTS {
                return Err(invalid(format!(
                    "rule {name}: retry.attempts {attempts} is more than {MAX_ATTEMPTS}"
                )));
            }
            let grpc_codes = r
                .grpc_codes
                .iter()
                .map(|c| {
                    grpc_code(c).ok_or_else(|| {
                        invalid(format!(
                            "rule {name}: retry.grpcCodes: {c:?} is not a gRPC status (e.g. UNAVAILABLE, RESOURCE_EXHAUSTED)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(RouteRetry {
                codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                attempts,
                backoff_ms: millis("retry.backoff", &r.backoff)?,
                grpc_codes,
            })
        }
    };
    Ok(RouteRule {
        name: name.to_string(),
        matches,
        backends,
        request_timeout_ms: request,
        backend_request_timeout_ms: backend_request,
        retry,
    })
}

/// The gRPC status named `name` (`UNAVAILABLE`, or `unavailable` as
/// Linkerd's and Envoy's retry settings write it); `OK` is not a failure,
/// so it is not a retryable status either.
fn grpc_code(name: &str) -> Option<u32> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let canonical = name.trim().to_ascii_uppercase().replace('-', "_");
    let code = CODES.iter().position(|c| *c == canonical)?;
    (code != 0).then_some(code as u32)
}

fn route_match(m: &HTTPRouteMatch) -> Result<RouteMatch, Failure> {
    let path = match &m.path {
        None => None,
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let kind = match p.match_type.as_deref().unwrap_or("PathPrefix") {
                "PathPrefix" => PathMatchKind::PathMatchPrefix,
                "Exact" => PathMatchKind::PathMatchExact,
                "RegularExpression" => PathMatchKind::PathMatchRegex,
                other => {
                    return Err(invalid(format!(
                        "path.type {other:?}: use PathPrefix, Exact or RegularExpression"
                    )));
                }
            };
            if kind == PathMatchKind::PathMatchRegex {
                regex::Regex::new(&value)
                    .map_err(|e| invalid(format!("path.value {value:?}: {e}")))?;
            } else if !value.starts_with('/') {
                return Err(invalid(format!("path.value {value:?} must start with /")));
            }
            Some(PathMatch {
                kind: kind as i32,
                value,
            })
        }
    };
    let method = m.method.clone().unwrap_or_default();
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(format!(
            "method {method:?}: an HTTP method in upper case (GET, POST, …)"
        )));
    }
    let mut headers = Vec::new();
    for h in &m.headers {
        let valid_name = !h.name.is_empty()
            && h.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid_name {
            return Err(invalid(format!(
                "headers: {:?} is not a header name",
                h.name
            )));
        }
        let regex = match h.match_type.as_deref().unwrap_or("Exact") {
            "Exact" => false,
            "RegularExpression" => {
                regex::Regex::new(&h.value)
                    .map_err(|e| invalid(format!("headers: {}: {e}", h.name)))?;
                true
            }
            other => {
                return Err(invalid(format!(
                    "headers: type {other:?}: use Exact or RegularExpression"
                )));
            }
        };
        headers.push(HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            value: h.value.clone(),
            regex,
        });
    }
    Ok(RouteMatch {
        path,
        method,
        headers,
    })
}

fn backend(
    b: &HTTPBackendRef,
    ns: &str,
    objects: &ClusterObjects,
) -> Result<RouteBackend, Failure> {
    let kind = b.kind.as_deref().unwrap_or("Service");
    if kind != "Service" || !core(&b.group) {
        return Err((
            Ineffective::UnsupportedKind,
            format!(
                "backendRefs: kind {kind:?} (group {:?}) is not supported; use Service",
                b.group.as_deref().unwrap_or("")
            ),
        ));
    }
    let key = ObjectKey::new(b.namespace.as_deref().unwrap_or(ns), &b.name);
    let Some(service) = objects.services.get(&key) else {
        return Err((
            Ineffective::DanglingReference,
            format!("backendRefs: Service {key} does not exist"),
        ));
    };
    let port = b.port.unwrap_or(0);
    if port != 0 && !service.ports.iter().any(|p| p.port == port) {
        return Err(invalid(format!(
            "backendRefs: Service {key} has no port {port}"
        )));
    }
    Ok(RouteBackend {
        service: key.to_string(),
        port: port.into(),
        weight: b.weight.unwrap_or(1),
    })
}
