//! HTTPRoutes through the whole index: what lands on the Services and
//! Servers of the view, and why a route that does not resolve is left out.

use crate::index::policy::status::{Ineffective, PolicyStatus};
use crate::index::{self, Index, IndexConfig};
use crate::model::{self, Kind, ObjectKey};
use crate::source::{LocalClusterState, local_cluster};
use crate::store::{ClusterObjects, StoreUpdate};
use serde::Deserialize;
use weft_destination_api::{PathMatchKind, Route};

const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-canary, namespace: shop}
spec: {selector: {app: web-canary}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: web-http, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  port: http
";

fn build(extra: &str) -> Index {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&format!("{CLUSTER}---\n{extra}")) {
        let value = serde_json::Value::deserialize(doc).unwrap();
        if let Some(o) = model::from_value(value).unwrap() {
            objects.push(o);
        }
    }
    local_cluster::complete(&LocalClusterState::default(), &mut objects);
    let mut store = ClusterObjects::default();
    store.apply(StoreUpdate::Replace {
        kinds: Kind::ALL.to_vec(),
        objects,
    });
    index::build(&store, &IndexConfig::default())
}

fn routes_of(index: &Index, service: &str) -> Vec<Route> {
    index.mesh.services[service].routes.clone()
}

fn why(statuses: &[PolicyStatus], kind: Kind, name: &str) -> Option<Ineffective> {
    statuses
        .iter()
        .find(|s| s.kind == kind && s.key == ObjectKey::new("shop", name))
        .unwrap_or_else(|| panic!("no status for {kind} {name}"))
        .ineffective
        .as_ref()
        .map(|(reason, _)| *reason)
}

#[test]
fn a_canary_split_with_matches_timeouts_and_retries_lands_on_its_service() {
    let index = build(
        "apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: web-canary, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - name: api
      matches:
        - path: {type: PathPrefix, value: /api}
          method: GET
          headers: [{name: X-Canary, value: 'yes'}]
        - path: {type: RegularExpression, value: '/v[0-9]+/.*'}
      backendRefs:
        - {name: web, port: 80, weight: 90}
        - {name: web-canary, port: 80, weight: 10}
      timeouts: {request: 10s, backendRequest: 1500ms}
      retry: {codes: [502, 503], attempts: 2, backoff: 100ms, grpcCodes: [UNAVAILABLE, resource-exhausted]}
    - backendRefs: [{name: web}]
",
    );
    assert_eq!(
        why(&index.policy_statuses, Kind::HTTPRoute, "web-canary"),
        None
    );
    let routes = routes_of(&index, "shop/web");
    assert_eq!(routes.len(), 1);
    let route = &routes[0];
    assert_eq!((route.name.as_str(), route.port), ("shop/web-canary", 80));
    let names: Vec<&str> = route.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["web-canary/api", "web-canary/1"]);
    let api = &route.rules[0];
    let m = &api.matches[0];
    let path = m.path.as_ref().unwrap();
    assert_eq!(
        (path.kind, path.value.as_str(), m.method.as_str()),
        (PathMatchKind::PathMatchPrefix as i32, "/api", "GET")
    );
    assert_eq!(
        m.headers[0].name, "x-canary",
        "header names are lower-cased"
    );
    assert_eq!(
        api.matches[1].path.as_ref().unwrap().kind,
        PathMatchKind::PathMatchRegex as i32
    );
    let backends: Vec<(&str, u32, u32)> = api
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.port, b.weight))
        .collect();
    assert_eq!(
        backends,
        [("shop/web", 80, 90), ("shop/web-canary", 80, 10)]
    );
    assert_eq!(
        (api.request_timeout_ms, api.backend_request_timeout_ms),
        (10_000, 1_500)
    );
    let retry = api.retry.as_ref().unwrap();
    assert_eq!(
        (retry.codes.clone(), retry.attempts, retry.backoff_ms),
        (vec![502, 503], 2, 100)
    );
    // gRPC statuses by name, in either spelling.
    assert_eq!(retry.grpc_codes, [14, 8]);
    // The default weight is 1; no retry block means no retries.
    assert_eq!(route.rules[1].backends[0].weight, 1);
    assert!(route.rules[1].retry.is_none());
    // Only the parent Service carries the route.
    assert!(routes_of(&index, "shop/web-canary").is_empty());
}

#[test]
fn routes_that_do_not_resolve_are_reported_and_left_out() {
    let cases = [
        (
            "no-parent",
            "parentRefs: [{name: nope}]",
            Ineffective::DanglingReference,
        ),
        (
            "gateway-parent",
            "parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]",
            Ineffective::UnsupportedKind,
        ),
        (
            "elsewhere",
            "parentRefs: [{name: web, namespace: prod}]",
            Ineffective::Invalid,
        ),
        (
            "bad-port",
            "parentRefs: [{name: web, port: 81}]",
            Ineffective::Invalid,
        ),
        (
            "no-rules",
            "parentRefs: [{name: web}]\n  rules: []",
            Ineffective::Invalid,
        ),
        (
            "no-backend",
            "parentRefs: [{name: web}]\n  rules: [{backendRefs: [{name: ghost}]}]",
            Ineffective::DanglingReference,
        ),
        (
            "bad-duration",
            "parentRefs: [{name: web}]\n  rules: [{timeouts: {request: '10'}}]",
            Ineffective::Invalid,
        ),
        (
            "backend-longer",
            "parentRefs: [{name: web}]\n  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]",
            Ineffective::Invalid,
        ),
        (
            "bad-regex",
            "parentRefs: [{name: web}]\n  rules: [{matches: [{path: {type: RegularExpression, value: '(('}}]}]",
            Ineffective::Invalid,
        ),
        (
            "bad-path",
            "parentRefs: [{name: web}]\n  rules: [{matches: [{path: {value: api}}]}]",
            Ineffective::Invalid,
        ),
        (
            "bad-method",
            "parentRefs: [{name: web}]\n  rules: [{matches: [{method: get}]}]",
            Ineffective::Invalid,
        ),
        (
            "bad-code",
            "parentRefs: [{name: web}]\n  rules: [{retry: {codes: [700]}}]",
            Ineffective::Invalid,
        ),
        (
            "bad-grpc-code",
            "parentRefs: [{name: web}]\n  rules: [{retry: {grpcCodes: [UNAVAILABLE, SOMETIMES]}}]",
            Ineffective::Invalid,
        ),
        (
            "grpc-ok-is-not-a-failure",
            "parentRefs: [{name: web}]\n  rules: [{retry: {grpcCodes: [OK]}}]",
            Ineffective::Invalid,
        ),
        (
            "too-many-retries",
            "parentRefs: [{name: web}]\n  rules: [{retry: {attempts: 50}}]",
            Ineffective::Invalid,
        ),
    ];
    let mut yaml = String::new();
    for (name, spec, _) in &cases {
        let rules = if spec.contains("rules:") {
            ""
        } else {
            "\n  rules: [{}]"
        };
        yaml += &format!(
            "---\napiVersion: policy.weft.io/v1alpha1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  {spec}{rules}\n"
        );
    }
    let index = build(&yaml);
    for (name, _, reason) in cases {
        assert_eq!(
            why(&index.policy_statuses, Kind::HTTPRoute, name),
            Some(reason),
            "{name}"
        );
    }
    assert!(routes_of(&index, "shop/web").is_empty());
}

#[test]
fn route_level_authorization_attaches_to_the_servers_inbound_route() {
    let index = build(
        "apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: web-admin, namespace: shop}
spec:
  parentRefs: [{group: policy.weft.io, kind: Server, name: web-http}]
  rules: [{matches: [{path: {value: /admin}}]}]
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: outbound-only, namespace: shop}
spec:
  parentRefs: [{name: web}]
  rules: [{}]
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: admin-from-ops, namespace: shop}
spec:
  targetRef: {group: policy.weft.io, kind: HTTPRoute, name: web-admin}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: ops}]
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: on-outbound-route, namespace: shop}
spec:
  targetRef: {group: policy.weft.io, kind: HTTPRoute, name: outbound-only}
  requiredAuthenticationRefs: []
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: on-missing-route, namespace: shop}
spec:
  targetRef: {group: policy.weft.io, kind: HTTPRoute, name: ghost}
  requiredAuthenticationRefs: []
",
    );
    let statuses = &index.policy_statuses;
    assert_eq!(
        why(statuses, Kind::AuthorizationPolicy, "admin-from-ops"),
        None
    );
    assert_eq!(
        why(statuses, Kind::AuthorizationPolicy, "on-outbound-route"),
        Some(Ineffective::Invalid)
    );
    assert_eq!(
        why(statuses, Kind::AuthorizationPolicy, "on-missing-route"),
        Some(Ineffective::DanglingReference)
    );
    let policy = &index.local("node-a").policies["shop/web"];
    let server = &policy.servers[0];
    assert_eq!(server.name, "web-http");
    // The route's authorization is not a Server-wide one: at L4 the Server
    // still denies (the proxy decides route authorizations per request).
    assert!(server.authorizations.is_empty());
    assert_eq!(server.routes.len(), 1);
    let route = &server.routes[0];
    assert_eq!(route.name, "shop/web-admin");
    assert_eq!(route.matches[0].path.as_ref().unwrap().value, "/admin");
    let policies: Vec<&str> = route
        .authorizations
        .iter()
        .map(|a| a.policy.as_str())
        .collect();
    assert_eq!(policies, ["shop/admin-from-ops"]);
    assert_eq!(
        route.authorizations[0].requirements[0].identities,
        ["spiffe://cluster.local/ns/shop/sa/ops"]
    );
}
