//! The status writer against kube's mock HTTP service: each policy object's
//! Accepted condition is patched on its status subresource, once per change.

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tower_test::mock;
use weft_destination::index::policy::status::{Ineffective, PolicyStatus};
use weft_destination::model::{Kind, ObjectKey};
use weft_destination::source::kube_status;

const WAIT: Duration = Duration::from_secs(10);

/// Answers every PATCH with the object and reports (method, path, body).
async fn api_server(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    seen: mpsc::UnboundedSender<(String, String, Value)>,
) {
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let _ = seen.send((method, path.clone(), body));
        let kind = if path.contains("/servers/") {
            "Server"
        } else {
            "AuthorizationPolicy"
        };
        let name = path.split('/').rev().nth(1).unwrap_or_default();
        let object = json!({"apiVersion": "policy.weft.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "shop"},
            "spec": if kind == "Server" { json!({"podSelector": {}, "port": 80}) }
                    else { json!({"targetRef": {"kind": "Server", "name": "x"}, "requiredAuthenticationRefs": []}) }});
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&object).unwrap()))
                .unwrap(),
        );
    }
}

fn status(kind: Kind, name: &str, ineffective: Option<(Ineffective, &str)>) -> PolicyStatus {
    PolicyStatus {
        kind,
        key: ObjectKey::new("shop", name),
        ineffective: ineffective.map(|(r, m)| (r, m.to_string())),
        generation: Some(4),
    }
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<(String, String, Value)>,
) -> (String, String, Value) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a request")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_conditions_once_per_change() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = tokio::spawn(api_server(handle, seen_tx));
    let client = kube::Client::new(service, "default");

    let (tx, rx) = watch::channel(Arc::new(vec![
        status(Kind::Server, "web-http", None),
        status(
            Kind::AuthorizationPolicy,
            "missing-target",
            Some((
                Ineffective::DanglingReference,
                "targetRef: Server shop/nope does not exist",
            )),
        ),
    ]));
    let writer = tokio::spawn(kube_status::run(client, rx));

    let mut requests = [next(&mut seen).await, next(&mut seen).await];
    requests.sort_by(|a, b| a.1.cmp(&b.1));
    let (method, path, body) = &requests[0];
    assert_eq!(method, "PATCH");
    assert_eq!(
        path,
        "/apis/policy.weft.io/v1alpha1/namespaces/shop/authorizationpolicies/missing-target/status"
    );
    let c = &body["status"]["conditions"][0];
    assert_eq!(c["type"], "Accepted");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "DanglingReference");
    assert_eq!(c["observedGeneration"], 4);
    assert!(c["message"].as_str().unwrap().contains("shop/nope"));
    let (_, path, body) = &requests[1];
    assert_eq!(
        path,
        "/apis/policy.weft.io/v1alpha1/namespaces/shop/servers/web-http/status"
    );
    assert_eq!(body["status"]["conditions"][0]["status"], "True");

    // The policy is fixed: only it is written again.
    tx.send(Arc::new(vec![
        status(Kind::Server, "web-http", None),
        status(Kind::AuthorizationPolicy, "missing-target", None),
    ]))
    .unwrap();
    let (_, path, body) = next(&mut seen).await;
    assert!(
        path.ends_with("/authorizationpolicies/missing-target/status"),
        "{path}"
    );
    assert_eq!(body["status"]["conditions"][0]["status"], "True");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), seen.recv())
            .await
            .is_err(),
        "an unchanged status was written again"
    );

    writer.abort();
    server.abort();
}
