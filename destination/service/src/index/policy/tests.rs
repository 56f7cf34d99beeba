//! Resolution cases the documented examples do not cover: each malformed
//! object is reported with the right reason and grants nothing.

use super::status::Ineffective;
use crate::index::{self, IndexConfig};
use crate::model::{self, Kind, ObjectKey};
use crate::source::{LocalClusterState, local_cluster};
use crate::store::{ClusterObjects, StoreUpdate};
use serde::Deserialize;
use std::net::IpAddr;
use weft_destination_api::{Policy, authorize};
use weft_identity_api::SpiffeId;

const POD: &str = "
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
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: web-http, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  port: http
";

/// Builds POD plus `extra`; returns web's policy and the statuses.
fn build(extra: &str) -> (Policy, Vec<super::status::PolicyStatus>) {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&format!("{POD}---\n{extra}")) {
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
    let index = index::build(&store, &IndexConfig::default());
    let policy = (*index.local("node-a").policies["shop/web"]).clone();
    (policy, index.policy_statuses.to_vec())
}

fn why(statuses: &[super::status::PolicyStatus], kind: Kind, name: &str) -> Option<Ineffective> {
    statuses
        .iter()
        .find(|s| s.kind == kind && s.key == ObjectKey::new("shop", name))
        .unwrap_or_else(|| panic!("no status for {kind} {name}"))
        .ineffective
        .as_ref()
        .map(|(r, _)| *r)
}

fn policy_on_server(refs: &str) -> String {
    format!(
        "apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: shop}}
spec:
  targetRef: {{kind: Server, name: web-http}}
  requiredAuthenticationRefs: {refs}
"
    )
}

fn nobody_gets_in(policy: &Policy) {
    let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    for (client, from) in [
        (Some(&id), "10.244.0.11"),
        (None, "10.244.0.11"),
        (None, "192.0.2.1"),
    ] {
        let from: IpAddr = from.parse().unwrap();
        assert!(
            !authorize(policy, 8080, client, from).allowed,
            "{client:?} from {from}"
        );
    }
}

#[test]
fn ineffective_authentications_and_targets() {
    let cases = [
        // A MeshTLSAuthentication identity that is not a SPIFFE ID.
        (
            "apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: m, namespace: shop}
spec: {identities: [client.shop.serviceaccount]}
",
            "[{kind: MeshTLSAuthentication, name: m}]",
            Some((Kind::MeshTLSAuthentication, "m", Ineffective::Invalid)),
        ),
        // An identity pattern over the limits (9 `*`): matched for every
        // connection on a shared proxy, so refused outright (#15).
        (
            "apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: m, namespace: shop}
spec: {identities: ['spiffe://cluster.local/ns/bank/sa/*a*a*a*a*a*a*a*a*a*b']}
",
            "[{kind: MeshTLSAuthentication, name: m}]",
            Some((Kind::MeshTLSAuthentication, "m", Ineffective::Invalid)),
        ),
        // identityRefs of a kind that is not supported.
        (
            "apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: m, namespace: shop}
spec: {identityRefs: [{kind: Group, name: admins}]}
",
            "[{kind: MeshTLSAuthentication, name: m}]",
            Some((
                Kind::MeshTLSAuthentication,
                "m",
                Ineffective::UnsupportedKind,
            )),
        ),
        // A MeshTLSAuthentication naming nobody.
        (
            "apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: m, namespace: shop}
spec: {}
",
            "[{kind: MeshTLSAuthentication, name: m}]",
            Some((Kind::MeshTLSAuthentication, "m", Ineffective::Invalid)),
        ),
        // An except outside its cidr.
        (
            "apiVersion: policy.weft.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: n, namespace: shop}
spec: {networks: [{cidr: 10.244.0.0/16, except: [10.0.0.0/8]}]}
",
            "[{kind: NetworkAuthentication, name: n}]",
            Some((Kind::NetworkAuthentication, "n", Ineffective::Invalid)),
        ),
        // Linkerd's group on a reference: not ours.
        (
            "",
            "[{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: m}]",
            None,
        ),
        // A reference to a MeshTLSAuthentication in another namespace that
        // does not exist there.
        (
            "apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: m, namespace: shop}
spec: {identities: ['*']}
",
            "[{kind: MeshTLSAuthentication, name: m, namespace: prod}]",
            None,
        ),
    ];
    for (authn, refs, authn_status) in cases {
        let (policy, statuses) = build(&format!("{authn}---\n{}", policy_on_server(refs)));
        assert!(
            why(&statuses, Kind::AuthorizationPolicy, "p").is_some(),
            "{refs}"
        );
        if let Some((kind, name, reason)) = authn_status {
            assert_eq!(why(&statuses, kind, name), Some(reason), "{authn}");
        }
        assert!(policy.servers[0].authorizations.is_empty());
        nobody_gets_in(&policy);
    }
}

#[test]
fn targets_other_than_a_server_or_own_namespace() {
    for (target, reason) in [
        ("{kind: Namespace, name: prod}", Ineffective::Invalid),
        (
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}",
            Ineffective::UnsupportedKind,
        ),
        ("{kind: Pod, name: web}", Ineffective::UnsupportedKind),
        (
            "{group: policy.linkerd.io, kind: Server, name: web-http}",
            Ineffective::UnsupportedKind,
        ),
        ("{kind: Server, name: nope}", Ineffective::DanglingReference),
    ] {
        let (policy, statuses) = build(&format!(
            "apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: shop}}
spec:
  targetRef: {target}
  requiredAuthenticationRefs: []
"
        ));
        assert_eq!(
            why(&statuses, Kind::AuthorizationPolicy, "p"),
            Some(reason),
            "{target}"
        );
        nobody_gets_in(&policy);
    }
}

#[test]
fn valid_references_resolve() {
    // Own namespace as target, a ServiceAccount in another namespace, and a
    // MeshTLSAuthentication ServiceAccount ref: all requirements must hold.
    let (policy, statuses) = build(
        "apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: m, namespace: shop}
spec: {identityRefs: [{kind: ServiceAccount, name: client, namespace: prod}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  targetRef: {kind: Namespace, name: shop}
  requiredAuthenticationRefs:
  - {kind: MeshTLSAuthentication, name: m}
  - {kind: ServiceAccount, name: client, namespace: prod}
",
    );
    assert_eq!(why(&statuses, Kind::AuthorizationPolicy, "p"), None);
    let from: IpAddr = "10.244.0.11".parse().unwrap();
    let prod: SpiffeId = "spiffe://cluster.local/ns/prod/sa/client".parse().unwrap();
    let shop: SpiffeId = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    assert!(authorize(&policy, 8080, Some(&prod), from).allowed);
    assert!(!authorize(&policy, 8080, Some(&shop), from).allowed);
}

#[test]
fn empty_requirements_authorize_everyone_as_in_linkerd() {
    let (policy, _) = build(&policy_on_server("[]"));
    let from: IpAddr = "192.0.2.1".parse().unwrap();
    assert!(authorize(&policy, 8080, None, from).allowed);
}

#[test]
fn an_invalid_server_is_reported_and_fences_its_port_with_deny() {
    // An operator typo (`Equals`) must not leave 9090 to the default
    // policy (here all-unauthenticated): the pods the Server may have meant
    // are denied on its port until it is fixed. Where a valid Server
    // already decides (8080), it keeps deciding; a Server with no valid
    // port fences nothing.
    let (policy, statuses) = build(
        "apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: odd, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [web]}]}
  port: 9090
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: odd-on-http, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In}]}
  port: http
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: no-port, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}, matchExpressions: [{key: x, operator: Nope}]}
  port: 0
",
    );
    for name in ["odd", "odd-on-http", "no-port"] {
        assert_eq!(
            why(&statuses, Kind::Server, name),
            Some(Ineffective::Invalid),
            "{name}"
        );
    }
    assert_eq!(why(&statuses, Kind::Server, "web-http"), None);
    let servers: Vec<(&str, u32, usize)> = policy
        .servers
        .iter()
        .map(|s| (s.name.as_str(), s.port, s.authorizations.len()))
        .collect();
    assert_eq!(servers, [("web-http", 8080, 0), ("odd", 9090, 0)]);
    assert_eq!(
        policy.servers[1].access_policy,
        weft_destination_api::DefaultPolicy::Deny as i32
    );
    let from: IpAddr = "10.244.1.5".parse().unwrap();
    let d = authorize(&policy, 9090, None, from);
    assert!(!d.allowed, "{d:?}");
    assert_eq!(d.server.as_deref(), Some("odd"));
    // Other ports still follow the default.
    assert!(authorize(&policy, 9091, None, from).allowed);
}

#[test]
fn servers_select_by_expressions_and_by_every_label() {
    let (policy, _) = build(
        "apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: by-expression, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [web, api]}]}
  port: 9090
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: needs-tier, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web, tier: back}}
  port: 9091
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: other-namespace, namespace: prod}
spec:
  podSelector: {}
  port: 9092
",
    );
    let names: Vec<(&str, u32)> = policy
        .servers
        .iter()
        .map(|s| (s.name.as_str(), s.port))
        .collect();
    assert_eq!(names, [("web-http", 8080), ("by-expression", 9090)]);
}
