//! Kubernetes mode against a real API server (`weft-sim up --kube`): the
//! node proxy's projected token, as the simulated kubelet mounts it, goes
//! through a real TokenReview; workloads come from the real pods API.
//! Needs root and the control plane that `cargo xtask setup` builds; fails
//! (never skips) without them.

use std::time::Duration;
use weft_identity::kubernetes::KubeWorkloads;
use weft_identity::workloads::{Placement, WorkloadDirectory};
use weft_identity_api::SpiffeId;
use weft_node_auth::kubernetes::{
    DESTINATION_AUDIENCE, IDENTITY_AUDIENCE, TokenReviewAuthenticator,
};
use weft_node_auth::{AuthError, NodeAuthenticator};
use weft_sim::TestCluster;
use weft_sim::kube::KubeBinaries;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: weft-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: weft-node-proxy, namespace: weft-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: proxy, namespace: weft-system}
spec:
  nodeName: node-b
  serviceAccountName: weft-node-proxy
  containers:
  - name: main
    image: example.invalid/proxy
    command: [sleep, infinity]
    volumeMounts:
    - {name: identity-token, mountPath: /var/run/secrets/weft-identity}
    - {name: destination-token, mountPath: /var/run/secrets/weft-destination}
    - {name: other-token, mountPath: /var/run/secrets/other}
  volumes:
  - name: identity-token
    projected: {sources: [{serviceAccountToken: {audience: weft-identity, path: token}}]}
  - name: destination-token
    projected: {sources: [{serviceAccountToken: {audience: weft-destination, path: token}}]}
  - name: other-token
    projected: {sources: [{serviceAccountToken: {audience: not-weft, path: token}}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers:
  - name: main
    image: example.invalid/client
    command: [sleep, infinity]
    volumeMounts: [{name: token, mountPath: /var/run/secrets/weft-identity}]
  volumes:
  - name: token
    projected: {sources: [{serviceAccountToken: {audience: weft-identity, path: token}}]}
"#;

/// A projected token as the kubelet wrote it for `pod`'s volume `volume`.
fn token(cluster: &TestCluster, pod: &str, volume: &str) -> String {
    let uid = &cluster.pod(pod).uid;
    let path = cluster
        .state()
        .state_dir
        .join("pods")
        .join(uid)
        .join("volumes")
        .join(volume)
        .join("token");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_and_pods_come_from_the_real_api_server() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let binaries = KubeBinaries::from_cache().unwrap_or_else(|e| panic!("{e}"));
    let cluster = tokio::task::spawn_blocking(move || {
        TestCluster::up_with(&[("cluster.yaml", CLUSTER)], |o| o.kube = Some(binaries))
            .expect("--kube cluster up")
    })
    .await
    .unwrap();
    let kube = cluster.state().kube.clone().unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kube.kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let auth = TokenReviewAuthenticator::new(
        client.clone(),
        "weft-system/weft-node-proxy",
        IDENTITY_AUDIENCE,
    );
    // The destination service's, as it authenticates the same proxy.
    let destination_auth = TokenReviewAuthenticator::new(
        client.clone(),
        "weft-system/weft-node-proxy",
        DESTINATION_AUDIENCE,
    );

    // The node proxy's token: accepted, and the node is the one its pod
    // runs on (the token's node-name extra, from the real API server).
    let proxy = token(&cluster, "weft-system/proxy", "identity-token");
    let node = auth.authenticate(&proxy).await.expect("the proxy's token");
    assert_eq!(node.node, "node-b");

    // The same account's token for another audience is refused.
    let other = token(&cluster, "weft-system/proxy", "other-token");
    assert!(matches!(
        auth.authenticate(&other).await,
        Err(AuthError::Rejected(_))
    ));
    // Each control plane service takes only its own token: what one of
    // them received (or whoever impersonates it) is no good at the other.
    let for_destination = token(&cluster, "weft-system/proxy", "destination-token");
    let node = destination_auth
        .authenticate(&for_destination)
        .await
        .expect("the proxy's destination token");
    assert_eq!(node.node, "node-b");
    match auth.authenticate(&for_destination).await {
        Err(AuthError::Rejected(why)) => assert!(why.contains("weft-identity"), "{why}"),
        other => panic!("the CA took the destination's token: {other:?}"),
    }
    match destination_auth.authenticate(&proxy).await {
        Err(AuthError::Rejected(why)) => assert!(why.contains("weft-destination"), "{why}"),
        other => panic!("the destination took the CA's token: {other:?}"),
    }
    // A workload's token with our audience, for its own account: refused.
    let workload = token(&cluster, "demo/client", "token");
    match auth.authenticate(&workload).await {
        Err(AuthError::Rejected(why)) => assert!(why.contains("not the node proxy"), "{why}"),
        other => panic!("a workload token was {other:?}"),
    }
    assert!(matches!(
        auth.authenticate("not-a-token").await,
        Err(AuthError::Rejected(_))
    ));

    // Workloads on a node, from the pods API.
    let workloads = KubeWorkloads::new(client.clone());
    let client_id = SpiffeId::new("cluster.local", "demo", "client").unwrap();
    assert_eq!(
        workloads.placement("node-a", &client_id).await.unwrap(),
        Placement::OnNode {
            pod: "demo/client".into()
        }
    );
    assert!(matches!(
        workloads.placement("node-b", &client_id).await.unwrap(),
        Placement::NotOnNode(_)
    ));

    // A bound token dies with its pod: once the proxy pod is deleted, the
    // API server no longer accepts it.
    let kubectl = kube.clone();
    tokio::task::spawn_blocking(move || {
        kubectl
            .kubectl_ok(
                &["delete", "pod", "proxy", "-n", "weft-system", "--wait=true"],
                None,
            )
            .unwrap()
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match auth.authenticate(&proxy).await {
            Err(AuthError::Rejected(_)) => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the deleted pod's token still gives {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}
