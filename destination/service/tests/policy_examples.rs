//! The worked examples of docs/policy.md through the destination service:
//! manifests → index → each pod's `Policy` in its node's view →
//! `authorize`, with the decisions the document states. Plus what the
//! service reports about malformed policies (problems, conditions, metrics).

use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;
use std::sync::Arc;
use weft_destination::index::policy::networks::Cidr;
use weft_destination::index::policy::status::Ineffective;
use weft_destination::index::{self, EndpointsFrom, Index, IndexConfig, ProblemKind};
use weft_destination::model::{self, Kind, Object, ObjectKey};
use weft_destination::source::{LocalClusterState, local_cluster};
use weft_destination::store::{ClusterObjects, StoreUpdate};
use weft_destination_api::{DefaultPolicy, Policy, Reason, authorize};
use weft_identity_api::SpiffeId;
use weft_policy_api::DefaultPolicy as Default_;

const NODE_IP: &str = "10.240.0.2";

fn objects_of(names: &[&str]) -> Vec<Object> {
    let examples = weft_policy_api::examples::load();
    let mut objects = Vec::new();
    for name in names {
        let yaml = examples
            .get(*name)
            .unwrap_or_else(|| panic!("docs/policy.md has no example {name}"));
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = Value::deserialize(doc).unwrap();
            if let Some(object) = model::from_value(value).unwrap() {
                objects.push(object);
            }
        }
    }
    // Uids, as the local source gives manifests without one.
    local_cluster::complete(&LocalClusterState::default(), &mut objects);
    objects
}

fn config(default: Default_) -> IndexConfig {
    IndexConfig {
        endpoints: EndpointsFrom::Selectors,
        default_policy: default,
        cluster_networks: vec!["10.244.0.0/16".parse::<Cidr>().unwrap()],
        ..IndexConfig::default()
    }
}

fn build(names: &[&str], default: Default_) -> Index {
    let mut store = ClusterObjects::default();
    store.apply(StoreUpdate::Replace {
        kinds: Kind::ALL.to_vec(),
        objects: objects_of(names),
    });
    index::build(&store, &config(default))
}

fn policy(index: &Index, pod: &str) -> Arc<Policy> {
    index.local("node-a").policies[pod].clone()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

#[test]
fn server_one_service_account_example() {
    let index = build(&["cluster", "server-one-sa"], Default_::AllUnauthenticated);
    assert!(index.problems.is_empty(), "{:?}", index.problems);
    let p = policy(&index, "shop/web");
    assert_eq!(p.servers.len(), 1);
    assert_eq!(p.servers[0].port, 8080, "the named port `http` resolved");
    assert_eq!(p.servers[0].proxy_protocol, "HTTP/1");
    assert_eq!(p.servers[0].access_policy, DefaultPolicy::Deny as i32);

    let d = authorize(&p, 8080, Some(&id(CLIENT)), ip("10.244.0.11"));
    assert!(d.allowed);
    assert_eq!(d.reason, Reason::Authorized);
    assert_eq!(d.server.as_deref(), Some("web-http"));
    assert_eq!(d.policy.as_deref(), Some("shop/web-from-client"));
    assert!(!authorize(&p, 8080, Some(&id(OTHER)), ip("10.244.0.12")).allowed);
    assert!(!authorize(&p, 8080, None, ip("10.244.0.12")).allowed);
    // 9090 follows the default (all-unauthenticated); the node probes 8081.
    assert!(authorize(&p, 9090, None, ip("192.0.2.10")).allowed);
    assert_eq!(authorize(&p, 8081, None, ip(NODE_IP)).reason, Reason::Probe);
}

#[test]
fn probe_ports_and_sources_come_from_the_pod() {
    let index = build(&["cluster"], Default_::Deny);
    let p = policy(&index, "shop/web");
    assert_eq!(p.probe_ports, [8081]);
    assert_eq!(
        p.probe_sources,
        [weft_destination_api::address::encode(ip(NODE_IP))]
    );
    assert!(authorize(&p, 8081, None, ip(NODE_IP)).allowed);
    assert!(
        !authorize(&p, 8080, None, ip(NODE_IP)).allowed,
        "not a probe port"
    );
    assert!(
        !authorize(&p, 8081, None, ip("10.244.0.11")).allowed,
        "not the node"
    );
}

#[test]
fn annotations_override_the_cluster_default() {
    let index = build(&["namespace-default"], Default_::AllUnauthenticated);
    assert_eq!(
        policy(&index, "payments/ledger").default_policy,
        DefaultPolicy::Deny as i32
    );
    assert_eq!(
        policy(&index, "payments/gateway").default_policy,
        DefaultPolicy::AllAuthenticated as i32
    );
    // Without annotations, the cluster default.
    let index = build(&["cluster"], Default_::ClusterAuthenticated);
    let p = policy(&index, "shop/web");
    assert_eq!(p.default_policy, DefaultPolicy::ClusterAuthenticated as i32);
    assert_eq!(p.cluster_networks.len(), 1);
}

#[test]
fn a_misspelt_annotation_means_deny_and_is_reported() {
    let mut objects = objects_of(&["cluster"]);
    for o in &mut objects {
        if let Object::Pod(p) = o {
            p.default_policy = Some("all-unauthenticate".into());
        }
    }
    let mut store = ClusterObjects::default();
    store.apply(StoreUpdate::Replace {
        kinds: Kind::ALL.to_vec(),
        objects,
    });
    let index = index::build(&store, &config(Default_::AllUnauthenticated));
    let p = policy(&index, "shop/web");
    assert_eq!(p.default_policy, DefaultPolicy::Deny as i32);
    assert!(!authorize(&p, 8080, Some(&id(CLIENT)), ip("10.244.0.11")).allowed);
    assert_eq!(index.problems.len(), 1);
    assert_eq!(index.problems[0].kind, ProblemKind::InvalidDefaultPolicy);
    assert!(index.problems[0].detail.contains("all-unauthenticate"));
}

#[test]
fn wildcard_identities_example() {
    let index = build(
        &["cluster", "mesh-tls-wildcard"],
        Default_::AllUnauthenticated,
    );
    assert!(index.problems.is_empty(), "{:?}", index.problems);
    let p = policy(&index, "shop/web");
    let from = ip("10.244.0.11");
    let allowed = |who: &str| authorize(&p, 9090, Some(&id(who)), from).allowed;
    assert!(allowed(CLIENT));
    assert!(allowed(
        "spiffe://cluster.local/ns/monitoring/sa/prometheus"
    ));
    assert!(!allowed("spiffe://cluster.local/ns/prod/sa/client"));
    assert!(!authorize(&p, 9090, None, from).allowed);
    let d = authorize(&p, 9090, Some(&id(CLIENT)), from);
    assert_eq!(d.policy.as_deref(), Some("shop/shop-internal"));
}

#[test]
fn network_except_example() {
    let index = build(&["cluster", "network-except"], Default_::Deny);
    assert!(index.problems.is_empty(), "{:?}", index.problems);
    let p = policy(&index, "shop/web");
    assert_eq!(p.servers[0].port, 9090, "the named port `metrics` resolved");
    assert!(authorize(&p, 9090, None, ip("10.244.3.7")).allowed);
    assert!(authorize(&p, 9090, Some(&id(CLIENT)), ip("10.244.3.7")).allowed);
    assert!(!authorize(&p, 9090, None, ip("10.244.9.7")).allowed);
    assert!(!authorize(&p, 9090, None, ip("192.0.2.10")).allowed);
}

#[test]
fn malformed_example_grants_nothing_and_says_why() {
    let index = build(&["cluster", "malformed"], Default_::AllUnauthenticated);
    let p = policy(&index, "shop/web");
    assert_eq!(p.servers.len(), 1);
    assert!(
        p.servers[0].authorizations.is_empty(),
        "{:?}",
        p.servers[0].authorizations
    );
    for (client, from) in [
        (Some(id(CLIENT)), "10.244.0.11"),
        (None, "10.244.0.11"),
        (None, "192.0.2.10"),
    ] {
        assert!(!authorize(&p, 8080, client.as_ref(), ip(from)).allowed);
    }

    let status = |kind: Kind, name: &str| {
        index
            .policy_statuses
            .iter()
            .find(|s| s.kind == kind && s.key == ObjectKey::new("shop", name))
            .unwrap_or_else(|| panic!("no status for {kind} {name}"))
            .clone()
    };
    let why = |kind, name| status(kind, name).ineffective.map(|(r, _)| r);
    assert_eq!(why(Kind::Server, "web-http"), None);
    assert_eq!(
        why(Kind::AuthorizationPolicy, "missing-target"),
        Some(Ineffective::DanglingReference)
    );
    assert_eq!(
        why(Kind::AuthorizationPolicy, "unknown-kind"),
        Some(Ineffective::UnsupportedKind)
    );
    assert_eq!(
        why(Kind::AuthorizationPolicy, "bad-network"),
        Some(Ineffective::Invalid)
    );
    assert_eq!(
        why(Kind::NetworkAuthentication, "bad-cidr"),
        Some(Ineffective::Invalid)
    );
    // The condition an operator reads on the object.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default());
    let c = status(Kind::AuthorizationPolicy, "missing-target").condition(Some(3), now.clone());
    assert_eq!(
        (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
        ("Accepted", "False", "DanglingReference")
    );
    assert!(
        c.message
            .contains("Server shop/no-such-server does not exist"),
        "{}",
        c.message
    );
    assert_eq!(c.observed_generation, Some(3));
    let c = status(Kind::NetworkAuthentication, "bad-cidr").condition(None, now.clone());
    assert!(c.message.contains("10.244.0.0/33"), "{}", c.message);
    let c = status(Kind::Server, "web-http").condition(None, now);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));

    let mut kinds: Vec<ProblemKind> = index.problems.iter().map(|p| p.kind).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ProblemKind::PolicyDanglingReference,
            ProblemKind::PolicyUnsupportedKind,
            ProblemKind::PolicyInvalid,
            ProblemKind::PolicyInvalid,
        ]
    );
}

#[test]
fn two_servers_on_one_port_the_older_applies() {
    let mut objects = objects_of(&["cluster", "server-one-sa"]);
    let mut open = objects
        .iter()
        .find_map(|o| match o {
            Object::Server(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    open.key.name = "web-open".into();
    open.spec.port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080);
    open.spec.access_policy = Default_::AllUnauthenticated;
    open.created = "2026-11-22T08:00:00Z".into();
    for o in &mut objects {
        if let Object::Server(s) = o {
            s.created = "2026-11-21T08:00:00Z".into();
        }
    }
    objects.push(Object::Server(open));
    let mut store = ClusterObjects::default();
    store.apply(StoreUpdate::Replace {
        kinds: Kind::ALL.to_vec(),
        objects,
    });
    let index = index::build(&store, &config(Default_::Deny));
    let p = policy(&index, "shop/web");
    assert_eq!(p.servers.len(), 1);
    assert_eq!(p.servers[0].name, "web-http");
    assert!(!authorize(&p, 8080, None, ip("10.244.0.12")).allowed);
    assert_eq!(index.problems.len(), 1);
    assert_eq!(index.problems[0].kind, ProblemKind::ServerConflict);
    assert_eq!(index.problems[0].object, "Server shop/web-open");
}

#[test]
fn other_groups_are_ignored_and_other_versions_refused() {
    let linkerd = serde_json::json!({"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server",
        "metadata": {"name": "s", "namespace": "shop"},
        "spec": {"podSelector": {}, "port": 80}});
    assert_eq!(model::from_value(linkerd).unwrap(), None);
    let future = serde_json::json!({"apiVersion": "policy.weft.io/v1", "kind": "Server",
        "metadata": {"name": "s", "namespace": "shop"},
        "spec": {"podSelector": {}, "port": 80}});
    let err = model::from_value(future).unwrap_err();
    assert_eq!(err.object, "shop/s");
    assert!(err.reason.contains("policy.weft.io/v1alpha1"), "{err}");
    let broken = serde_json::json!({"apiVersion": "policy.weft.io/v1alpha1", "kind": "Server",
        "metadata": {"name": "s", "namespace": "shop"},
        "spec": {"podSelector": {}, "port": 80, "accessPolicy": "open"}});
    let err = model::from_value(broken).unwrap_err();
    assert!(err.reason.contains("does not parse"), "{err}");
}
