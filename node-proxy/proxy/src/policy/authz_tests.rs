use super::*;
use weft_destination_api::policy::network;
use weft_destination_api::{
    Authorization, DefaultPolicy, InboundRoute, Policy, PolicyServer, Requirement, WatchResponse,
    Workload, address,
};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

fn pod() -> Arc<PodInfo> {
    Arc::new(PodInfo {
        namespace: "demo".into(),
        name: "web".into(),
        uid: "u1".into(),
        identity: Some("spiffe://cluster.local/ns/demo/sa/web".parse().unwrap()),
        ip: Some("10.244.0.2".parse().unwrap()),
        other_ip: None,
        workload_uid: Some("u1".into()),
    })
}

fn view(version: u64, policy: Option<Policy>) -> View {
    let mut v = View::default();
    v.apply(WatchResponse {
        epoch: "e".into(),
        version,
        snapshot: true,
        workloads: vec![Workload {
            uid: "u1".into(),
            name: "web".into(),
            namespace: "demo".into(),
            addresses: vec![address::encode("10.244.0.2".parse().unwrap())],
            enrolled: true,
            ..Default::default()
        }],
        policies: policy.into_iter().collect(),
        ..Default::default()
    })
    .unwrap();
    v
}

fn policy(default: DefaultPolicy, servers: Vec<PolicyServer>) -> Policy {
    Policy {
        name: "web".into(),
        namespace: "demo".into(),
        workload_uid: "u1".into(),
        default_policy: default as i32,
        cluster_networks: vec![network("10.244.0.0".parse().unwrap(), 16, vec![])],
        servers,
        ..Default::default()
    }
}

/// A Server on 8080 whose only authorization is the client account.
fn server_for_client() -> PolicyServer {
    PolicyServer {
        name: "web-http".into(),
        port: 8080,
        access_policy: DefaultPolicy::Deny as i32,
        authorizations: vec![Authorization {
            policy: "demo/web-from-client".into(),
            requirements: vec![Requirement {
                source: "ServiceAccount demo/client".into(),
                identities: vec![CLIENT.into()],
                ..Default::default()
            }],
        }],
        ..Default::default()
    }
}

fn conn(port: u16, client: Option<&str>, ip: &str) -> Inbound {
    Inbound {
        pod: pod(),
        port,
        client: client.map(|c| Arc::new(c.parse().unwrap())),
        client_ip: ip.parse().unwrap(),
    }
}

#[test]
fn without_a_control_plane_nothing_is_enforced() {
    let v = decide(None, &conn(80, None, "192.0.2.1"));
    assert!(v.allowed);
    assert_eq!(v.reason, AuthzReason::NoControlPlane);
}

#[test]
fn a_pod_without_a_policy_in_the_view_refuses_everyone() {
    let v = decide(Some(&view(1, None)), &conn(80, Some(CLIENT), "10.244.1.2"));
    assert!(!v.allowed);
    assert_eq!(v.reason, AuthzReason::NoPolicy);
}

#[test]
fn the_verdict_names_the_default_or_the_server_and_policy() {
    let view = view(
        1,
        Some(policy(
            DefaultPolicy::ClusterAuthenticated,
            vec![server_for_client()],
        )),
    );
    let d = decide(Some(&view), &conn(9090, None, "10.244.1.2"));
    assert_eq!(
        (d.allowed, d.reason, d.server.as_str(), d.policy.as_str()),
        (false, AuthzReason::DefaultDeny, "", "cluster-authenticated")
    );
    let d = decide(Some(&view), &conn(9090, Some(CLIENT), "10.244.1.2"));
    assert_eq!((d.allowed, d.reason), (true, AuthzReason::DefaultAllow));
    let d = decide(Some(&view), &conn(8080, Some(CLIENT), "10.244.1.2"));
    assert_eq!(
        (d.allowed, d.reason, d.server.as_str(), d.policy.as_str()),
        (
            true,
            AuthzReason::Authorized,
            "web-http",
            "demo/web-from-client"
        )
    );
    let other = "spiffe://cluster.local/ns/demo/sa/other";
    let d = decide(Some(&view), &conn(8080, Some(other), "10.244.1.2"));
    assert_eq!(
        (d.allowed, d.reason, d.server.as_str(), d.policy.as_str()),
        (false, AuthzReason::DefaultDeny, "web-http", "deny")
    );
}

#[test]
fn audit_allows_and_says_so() {
    let view = view(1, Some(policy(DefaultPolicy::Audit, vec![])));
    let d = decide(Some(&view), &conn(80, None, "192.0.2.1"));
    assert_eq!(
        (d.allowed, d.reason, d.policy.as_str()),
        (true, AuthzReason::Audit, "audit")
    );
}

#[tokio::test]
async fn a_policy_change_revokes_exactly_the_connections_it_no_longer_allows() {
    let authz = Arc::new(InboundAuthz::default());
    let before = view(1, Some(policy(DefaultPolicy::AllUnauthenticated, vec![])));
    let mut plain = authz
        .admit(Some(&before), conn(80, None, "10.244.1.3"))
        .expect("allowed before");
    let mut mesh = authz
        .admit(Some(&before), conn(80, Some(CLIENT), "10.244.1.2"))
        .expect("allowed before");
    assert_eq!(authz.open_connections(), 2);

    // Now only mesh clients: the plaintext connection must go, the other stays.
    let after = view(2, Some(policy(DefaultPolicy::AllAuthenticated, vec![])));
    assert_eq!(authz.revalidate(Some(&after)), 1);
    let verdict = plain.revoked().await;
    assert_eq!(
        (verdict.allowed, verdict.reason),
        (false, AuthzReason::DefaultDeny)
    );
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(50), mesh.revoked())
            .await
            .is_err(),
        "the mesh client is still allowed"
    );
    // A second look at the same view revokes nothing more.
    assert_eq!(authz.revalidate(Some(&after)), 0);

    let labels = AuthzLabels {
        destination_workload: "web".into(),
        destination_namespace: "demo".into(),
        server: String::new(),
        policy: "all-unauthenticated".into(),
        reason: "default_allow".into(),
    };
    assert_eq!(authz.metrics().allowed(&labels), 2);
    drop(plain);
    drop(mesh);
    assert_eq!(authz.open_connections(), 0);
}

#[test]
fn a_refused_connection_is_counted_and_not_kept() {
    let authz = Arc::new(InboundAuthz::default());
    let v = view(1, Some(policy(DefaultPolicy::Deny, vec![])));
    let verdict = authz
        .admit(Some(&v), conn(80, Some(CLIENT), "10.244.1.2"))
        .err()
        .expect("deny refuses");
    assert_eq!(verdict.policy, "deny");
    assert_eq!(authz.open_connections(), 0);
    let labels = AuthzLabels {
        destination_workload: "web".into(),
        destination_namespace: "demo".into(),
        server: String::new(),
        policy: "deny".into(),
        reason: "default_deny".into(),
    };
    assert_eq!(authz.metrics().denied(&labels), 1);
}

/// The Server on 8080 with one HTTPRoute; the client is authorized on the
/// whole Server (`server_wide`) or only on the route.
fn server_with_a_route(server_wide: bool) -> PolicyServer {
    let client_only = |policy: &str| Authorization {
        policy: policy.into(),
        requirements: vec![Requirement {
            source: "ServiceAccount demo/client".into(),
            identities: vec![CLIENT.into()],
            ..Default::default()
        }],
    };
    let mut server = server_for_client();
    if !server_wide {
        server.authorizations.clear();
    }
    server.routes = vec![InboundRoute {
        name: "demo/hello".into(),
        matches: vec![],
        authorizations: vec![client_only("demo/hello-for-client")],
    }];
    server
}

fn routes_view(version: u64, server_wide: bool) -> View {
    view(
        version,
        Some(policy(
            DefaultPolicy::Deny,
            vec![server_with_a_route(server_wide)],
        )),
    )
}

async fn not_revoked(admission: &mut Admission) -> bool {
    tokio::time::timeout(std::time::Duration::from_millis(50), admission.revoked())
        .await
        .is_err()
}

#[tokio::test]
async fn an_opaque_connection_is_revoked_when_its_client_becomes_routes_only() {
    let authz = Arc::new(InboundAuthz::default());
    let full = routes_view(1, true);
    let mut opaque = authz
        .admit(Some(&full), conn(8080, Some(CLIENT), "10.244.1.2"))
        .expect("authorized on the Server");
    let mut http = authz
        .admit(Some(&full), conn(8080, Some(CLIENT), "10.244.1.2"))
        .expect("authorized on the Server");
    assert!(!opaque.access.routes_only());
    assert!(opaque.access.serve_opaque(), "full access may be spliced");
    http.access.serve_http();
    assert_eq!(
        (opaque.access.served(), http.access.served()),
        (Served::Opaque, Served::Http)
    );

    // The Server-wide authorization is replaced by one on the route: still
    // allowed at L4, but for routes only. The spliced connection goes; the
    // HTTP one stays, and its next requests are decided by route.
    let routes_only = routes_view(2, false);
    assert!(decide(Some(&routes_only), &client_on_8080()).routes_only);
    assert_eq!(authz.revalidate(Some(&routes_only)), 1);
    let verdict = opaque.revoked().await;
    assert_eq!(
        (
            verdict.allowed,
            verdict.reason,
            verdict.server.as_str(),
            verdict.policy.as_str()
        ),
        (
            false,
            AuthzReason::RoutesOnlyOpaque,
            "web-http",
            "demo/hello-for-client"
        )
    );
    assert!(not_revoked(&mut http).await, "the HTTP connection stays");
    assert!(http.access.routes_only(), "and follows the change");
    // Once only: a second look revokes nothing more.
    assert_eq!(authz.revalidate(Some(&routes_only)), 0);

    let revoked = AuthzLabels {
        destination_workload: "web".into(),
        destination_namespace: "demo".into(),
        server: "web-http".into(),
        policy: "demo/hello-for-client".into(),
        reason: AuthzReason::RoutesOnlyOpaque.as_label().into(),
    };
    assert_eq!(authz.metrics().revoked(&revoked), 1);
}

fn client_on_8080() -> Inbound {
    conn(8080, Some(CLIENT), "10.244.1.2")
}

#[tokio::test]
async fn an_http_connection_follows_routes_only_and_back() {
    let authz = Arc::new(InboundAuthz::default());
    // Admitted for routes only: it may not be spliced.
    let mut http = authz
        .admit(Some(&routes_view(1, false)), client_on_8080())
        .expect("authorized on the route");
    assert!(http.access.routes_only());
    assert!(!http.access.serve_opaque(), "routes only: no splice");
    assert_eq!(http.access.served(), Served::Undecided);
    http.access.serve_http();

    // Authorized on the whole Server: its next requests are no longer
    // refused when no route decides them.
    assert_eq!(authz.revalidate(Some(&routes_view(2, true))), 0);
    assert!(!http.access.routes_only());
    // And back to routes only.
    assert_eq!(authz.revalidate(Some(&routes_view(3, false))), 0);
    assert!(http.access.routes_only());
    assert!(not_revoked(&mut http).await);
    assert_eq!(http.access.served(), Served::Http);
}

#[tokio::test]
async fn a_connection_being_detected_becomes_routes_only_and_cannot_be_spliced() {
    let authz = Arc::new(InboundAuthz::default());
    let admission = authz
        .admit(Some(&routes_view(1, true)), client_on_8080())
        .expect("authorized on the Server");
    // The policy changes while the protocol is being detected: nothing is
    // spliced yet, so nothing to revoke; the splice is refused afterwards.
    assert_eq!(authz.revalidate(Some(&routes_view(2, false))), 0);
    assert!(!admission.access.serve_opaque());
    assert_eq!(admission.access.served(), Served::Undecided);
}
