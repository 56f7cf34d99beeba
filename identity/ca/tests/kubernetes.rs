//! Kubernetes mode against kube's mock HTTP service: TokenReview and pod
//! responses shaped as the API server sends them. The last test runs the real
//! CA over TLS with both Kubernetes implementations plugged in.

mod common;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower_test::mock;
use weft_identity::authority::LeafPolicy;
use weft_identity::init;
use weft_identity::kubernetes::KubeWorkloads;
use weft_identity::server::{self, ServeConfig};
use weft_identity::serving::default_server_names;
use weft_identity::workloads::{Placement, WorkloadDirectory};
use weft_identity_api::SpiffeId;
use weft_node_auth::kubernetes::{
    self as node_auth_kube, IDENTITY_AUDIENCE, TokenReviewAuthenticator,
};
use weft_node_auth::{AuthError, NodeAuthenticator};

const PROXY_USER: &str = "system:serviceaccount:weft-system:weft-node-proxy";

/// What the fake API server knows: token → TokenReview status.
fn review_status(token: &str) -> Value {
    match token {
        "proxy-on-node-a" => json!({
            "authenticated": true, "audiences": ["weft-identity"],
            "user": {"username": PROXY_USER, "uid": "u1", "groups": ["system:serviceaccounts"],
                     "extra": {"authentication.kubernetes.io/node-name": ["node-a"],
                               "authentication.kubernetes.io/pod-name": ["weft-node-proxy-x1"]}}
        }),
        // An older cluster: no node-name extra, only the pod.
        "proxy-pod-bound" => json!({
            "authenticated": true, "audiences": ["weft-identity"],
            "user": {"username": PROXY_USER,
                     "extra": {"authentication.kubernetes.io/pod-name": ["weft-node-proxy-b7"],
                               "authentication.kubernetes.io/pod-uid": ["uid-b7"]}}
        }),
        "proxy-stale-pod" => json!({
            "authenticated": true, "audiences": ["weft-identity"],
            "user": {"username": PROXY_USER,
                     "extra": {"authentication.kubernetes.io/pod-name": ["weft-node-proxy-b7"],
                               "authentication.kubernetes.io/pod-uid": ["uid-of-a-deleted-pod"]}}
        }),
        // A workload that mounted a token with our audience for its own account.
        "workload-token" => json!({
            "authenticated": true, "audiences": ["weft-identity"],
            "user": {"username": "system:serviceaccount:demo:client",
                     "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}
        }),
        "legacy-secret-token" => json!({
            "authenticated": true, "audiences": ["weft-identity"], "user": {"username": PROXY_USER}
        }),
        // An API server that answers without saying which audiences the
        // token is good for: it may be a token for anything.
        "proxy-no-audiences" => json!({
            "authenticated": true,
            "user": {"username": PROXY_USER,
                     "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}
        }),
        // The node proxy's token for the destination service, replayed.
        "proxy-destination-token" => json!({
            "authenticated": true, "audiences": ["weft-destination"],
            "user": {"username": PROXY_USER,
                     "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}
        }),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    }
}

fn pod(name: &str, sa: &str, node: &str, phase: &str, uid: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "demo", "uid": uid, "resourceVersion": "7"},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": phase}
    })
}

fn all_pods() -> Vec<Value> {
    vec![
        pod("client-0", "client", "node-a", "Running", "uid-c0"),
        pod("job-0", "batch", "node-a", "Succeeded", "uid-j0"),
        pod("server-0", "server", "node-b", "Running", "uid-s0"),
    ]
}

/// Plays the API server; records every request line (method path?query).
/// A request it must not get is answered 400 with the reason and recorded
/// in `violations` rather than asserted: a panic here would only kill the
/// fake, and the test would fail later for an unrelated reason, or pass
/// when it expected an error anyway. [`Fake::finish`] reports them.
async fn api_server(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    log: Arc<Mutex<Vec<String>>>,
    violations: Arc<Mutex<Vec<String>>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let (request, send) = tokio::select! {
            next = handle.next_request() => match next {
                Some(next) => next,
                None => return,
            },
            _ = &mut stop => return,
        };
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        log.lock().unwrap().push(format!("{method} {path}?{query}"));
        let body = request.into_body().collect_bytes().await.unwrap();
        let (status, body) = match (method.as_str(), path.as_str()) {
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
                if serde_json::from_slice::<Value>(&body)
                    .ok()
                    .map(|r| r["spec"]["audiences"].clone())
                    != Some(json!(["weft-identity"])) =>
            {
                let reason = format!(
                    "TokenReview without audiences [\"weft-identity\"]: {}",
                    String::from_utf8_lossy(&body)
                );
                violations.lock().unwrap().push(reason.clone());
                (
                    StatusCode::BAD_REQUEST,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "code": 400}),
                )
            }
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
                let review: Value = serde_json::from_slice(&body).unwrap();
                let token = review["spec"]["token"].as_str().unwrap_or("");
                if token == "api-down" {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd unavailable", "code": 500}),
                    )
                } else {
                    let mut review = review.clone();
                    review["status"] = review_status(token);
                    (StatusCode::CREATED, review)
                }
            }
            ("GET", "/api/v1/namespaces/weft-system/pods/weft-node-proxy-b7") => (
                StatusCode::OK,
                json!({"kind": "Pod", "apiVersion": "v1",
                       "metadata": {"name": "weft-node-proxy-b7", "namespace": "weft-system", "uid": "uid-b7"},
                       "spec": {"nodeName": "node-b", "containers": [{"name": "proxy"}]}}),
            ),
            ("GET", p) if p.starts_with("/api/v1/namespaces/") && p.ends_with("/pods") => {
                let ns = p.split('/').nth(4).unwrap();
                let selector = url_decode(&query);
                let node = selector
                    .split("spec.nodeName=")
                    .nth(1)
                    .map(|s| s.split('&').next().unwrap().to_string());
                let items: Vec<Value> = all_pods()
                    .into_iter()
                    .filter(|p| p["metadata"]["namespace"] == ns)
                    .filter(|p| node.as_deref().is_none_or(|n| p["spec"]["nodeName"] == n))
                    .collect();
                (
                    StatusCode::OK,
                    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"}, "items": items}),
                )
            }
            _ => (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            ),
        };
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        send.send_response(response);
    }
}

fn url_decode(s: &str) -> String {
    s.replace("%3D", "=")
        .replace("%2F", "/")
        .replace("%2C", ",")
}

/// The fake API server's task and what it saw.
struct Fake {
    log: Arc<Mutex<Vec<String>>>,
    violations: Arc<Mutex<Vec<String>>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    /// Joins the fake: a panic in it fails the test, and so does any
    /// request it had to refuse.
    async fn finish(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the fake API server stops")
            .expect("the fake API server did not panic");
        assert_eq!(
            *self.violations.lock().unwrap(),
            Vec::<String>::new(),
            "requests the fake API server refused"
        );
    }
}

fn mock_client() -> (kube::Client, Fake) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let log = Arc::new(Mutex::new(Vec::new()));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(api_server(handle, log.clone(), violations.clone(), stopped));
    (
        kube::Client::new(service, "default"),
        Fake {
            log,
            violations,
            stop,
            task,
        },
    )
}

#[tokio::test]
async fn token_review_maps_node_proxy_tokens_to_nodes() {
    let (client, fake) = mock_client();
    let auth = TokenReviewAuthenticator::new(
        client,
        node_auth_kube::DEFAULT_NODE_PROXY_ACCOUNT,
        IDENTITY_AUDIENCE,
    );

    assert_eq!(
        auth.authenticate("proxy-on-node-a").await.unwrap().node,
        "node-a"
    );
    assert_eq!(
        auth.authenticate("proxy-pod-bound").await.unwrap().node,
        "node-b",
        "node of the pod the token was issued for"
    );
    assert!(
        fake.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("GET /api/v1/namespaces/weft-system/pods/weft-node-proxy-b7"))
    );

    let refused = |token: &'static str, reason: &'static str| {
        let auth = &auth;
        async move {
            let err = auth.authenticate(token).await.unwrap_err();
            assert!(matches!(err, AuthError::Rejected(_)), "{token}: {err}");
            assert!(err.to_string().contains(reason), "{token}: {err}");
        }
    };
    refused("garbage", "invalid bearer token").await;
    refused("workload-token", "is not the node proxy's service account").await;
    refused("proxy-stale-pod", "earlier pod").await;
    refused("legacy-secret-token", "not bound to a pod or node").await;
    refused("proxy-no-audiences", "audience").await;
    refused("proxy-destination-token", "audience").await;

    let err = auth.authenticate("api-down").await.unwrap_err();
    assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    // The 500 above must be the scripted one, not the fake refusing.
    assert!(err.to_string().contains("etcd unavailable"), "{err}");
    fake.finish().await;
}

#[tokio::test]
async fn pods_on_a_node_come_from_the_api() {
    let (client, fake) = mock_client();
    let workloads = KubeWorkloads::new(client);
    let id = |sa: &str| -> SpiffeId {
        format!("spiffe://cluster.local/ns/demo/sa/{sa}")
            .parse()
            .unwrap()
    };

    assert_eq!(
        workloads.placement("node-a", &id("client")).await.unwrap(),
        Placement::OnNode {
            pod: "demo/client-0".into()
        }
    );
    assert!(matches!(
        workloads.placement("node-a", &id("server")).await.unwrap(),
        Placement::NotOnNode(_)
    ));
    // A finished Job pod on the node does not make its account eligible.
    assert!(matches!(
        workloads.placement("node-a", &id("batch")).await.unwrap(),
        Placement::NotOnNode(_)
    ));
    let requests = fake.log.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("GET /api/v1/namespaces/demo/pods?")
                && url_decode(r).contains("fieldSelector=spec.nodeName=node-a")),
        "{requests:?}"
    );
    fake.finish().await;
}

/// The CA with both Kubernetes implementations, over real TLS.
#[tokio::test]
async fn certify_in_kubernetes_mode() {
    let dir = tempfile::tempdir().unwrap();
    let year = Duration::from_secs(365 * 24 * 3600);
    let anchor = init::trust_anchor("cluster.local", "1", year).unwrap();
    let issuer = init::issuer(&anchor, "cluster.local", "1", year).unwrap();
    init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
    let (client, fake) = mock_client();
    let ca = server::spawn(
        ServeConfig {
            ca_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            server_names: default_server_names(),
            policy: LeafPolicy::new("cluster.local"),
            poll: Duration::from_secs(30),
        },
        Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            node_auth_kube::DEFAULT_NODE_PROXY_ACCOUNT,
            IDENTITY_AUDIENCE,
        )),
        Arc::new(KubeWorkloads::new(client)),
    )
    .await
    .unwrap();
    let mut grpc = common::connect(
        ca.addr,
        anchor.cert_pem.as_bytes(),
        "weft-identity.weft-system.svc",
    )
    .await;
    let client_id = "spiffe://cluster.local/ns/demo/sa/client";
    let server_id = "spiffe://cluster.local/ns/demo/sa/server";

    common::certify(
        &mut grpc,
        Some("proxy-on-node-a"),
        client_id,
        common::p256_csr(client_id).1,
    )
    .await
    .expect("node-a's proxy gets its pod's identity");
    let err = common::certify(
        &mut grpc,
        Some("proxy-on-node-a"),
        server_id,
        common::p256_csr(server_id).1,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = common::certify(
        &mut grpc,
        Some("workload-token"),
        client_id,
        common::p256_csr(client_id).1,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message()
            .contains("not the node proxy's service account"),
        "{err:?}"
    );
    let err = common::certify(
        &mut grpc,
        Some("api-down"),
        client_id,
        common::p256_csr(client_id).1,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    ca.stop().await;
    fake.finish().await;
}
