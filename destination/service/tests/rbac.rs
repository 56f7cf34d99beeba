//! The RBAC in daemonset/ is valid Kubernetes and grants the kube source
//! exactly what it uses: list and watch of the kinds it watches, patch of
//! the status of the policy kinds (their Accepted condition), and what node
//! proxy authentication needs (create TokenReviews, get the token's pod).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use std::collections::BTreeSet;
use weft_destination::model::Kind;
use weft_destination::source::kube::KINDS;

#[test]
fn cluster_role_grants_list_and_watch_of_watched_kinds() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../daemonset/destination/rbac.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
    let sa: ServiceAccount = serde_yaml::from_value(docs[0].clone()).unwrap();
    let role: ClusterRole = serde_yaml::from_value(docs[1].clone()).unwrap();
    let binding: ClusterRoleBinding = serde_yaml::from_value(docs[2].clone()).unwrap();

    let mut granted = BTreeSet::new();
    let mut status_patch = BTreeSet::new();
    let mut authentication = BTreeSet::new();
    for rule in role.rules.unwrap() {
        let into = if rule.verbs == ["patch"] {
            &mut status_patch
        } else if rule.verbs == ["create"] || rule.verbs == ["get"] {
            &mut authentication
        } else {
            assert_eq!(rule.verbs, ["list", "watch"], "read-only but for status");
            &mut granted
        };
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.clone().unwrap() {
                into.insert((group.clone(), resource));
            }
        }
    }
    // Status only, and only of the policy kinds.
    let policy_status: BTreeSet<(String, String)> = KINDS
        .iter()
        .filter(|k| k.is_policy())
        .map(|k| {
            let plural = format!("{}s", k.as_str().to_lowercase()).replace("policys", "policies");
            ("policy.weft.io".to_string(), format!("{plural}/status"))
        })
        .collect();
    assert_eq!(status_patch, policy_status);
    let needed: BTreeSet<(String, String)> = KINDS
        .iter()
        .map(|k| match k {
            Kind::Namespace => ("", "namespaces"),
            Kind::Pod => ("", "pods"),
            Kind::Service => ("", "services"),
            Kind::EndpointSlice => ("discovery.k8s.io", "endpointslices"),
            Kind::Server => ("policy.weft.io", "servers"),
            Kind::AuthorizationPolicy => ("policy.weft.io", "authorizationpolicies"),
            Kind::MeshTLSAuthentication => ("policy.weft.io", "meshtlsauthentications"),
            Kind::NetworkAuthentication => ("policy.weft.io", "networkauthentications"),
            Kind::HTTPRoute => ("policy.weft.io", "httproutes"),
            other => panic!("no RBAC mapping for {other}"),
        })
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    assert_eq!(granted, needed);
    let authenticating: BTreeSet<(String, String)> =
        [("authentication.k8s.io", "tokenreviews"), ("", "pods")]
            .into_iter()
            .map(|(g, r)| (g.to_string(), r.to_string()))
            .collect();
    assert_eq!(authentication, authenticating);

    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);
}
