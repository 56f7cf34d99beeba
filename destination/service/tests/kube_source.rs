//! The kube source against kube's mock HTTP service: list and watch
//! responses shaped as the API server sends them, including a watch that
//! expires with 410 Gone and must be followed by a re-list.

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tower_test::mock::{self, SendResponse};
use weft_destination::index::IndexConfig;
use weft_destination::metrics::Metrics;
use weft_destination::publisher::Publisher;
use weft_destination::store::ClusterObjects;
use weft_destination::views::NodeView;
use weft_destination::{indexer, source};

const WAIT: Duration = Duration::from_secs(15);

fn pod(name: &str, uid: &str, ip: &str, rv: &str) -> Value {
    // List items come without kind/apiVersion, as from the API server.
    json!({
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "resourceVersion": rv,
                     "creationTimestamp": "2026-11-20T09:13:02Z", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                 "containers": [{"name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn list(kind: &str, api_version: &str, rv: &str, items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": kind, "apiVersion": api_version,
        "metadata": {"resourceVersion": rv}, "items": items
    }))
    .unwrap()
}

fn event(kind: &str, object: Value) -> String {
    format!("{}\n", json!({"type": kind, "object": object}))
}

fn with_kind(mut object: Value, kind: &str) -> Value {
    object["kind"] = json!(kind);
    object["apiVersion"] = json!("v1");
    object
}

/// What the fake API server found wrong in the requests it got. It does
/// not panic on a wrong request (a panic in its task would only kill the
/// fake and surface later as an unrelated timeout, or not at all): it
/// answers 400 with the reason, records it, and the test reports the
/// record when a wait times out and when it joins the fake at the end.
type Violations = Arc<Mutex<Vec<String>>>;

/// Plays the API server: answers each request by resource and by how many
/// times that resource was listed/watched. Watches with nothing scripted
/// stay open (their responders are kept). Returns when the client is gone
/// or `stop` fires.
async fn api_server(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    violations: Violations,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut held: Vec<SendResponse<Response<Body>>> = Vec::new();
    loop {
        let (request, send) = tokio::select! {
            next = handle.next_request() => match next {
                Some(next) => next,
                None => return,
            },
            _ = &mut stop => return,
        };
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let is_watch = query.contains("watch=true");
        let refuse = |send: SendResponse<Response<Body>>, reason: String| {
            violations.lock().unwrap().push(reason.clone());
            send.send_response(
                Response::builder()
                    .status(400)
                    .body(Body::from(reason.into_bytes()))
                    .unwrap(),
            );
        };
        // Finished pods are filtered out by the API server.
        if path == "/api/v1/pods"
            && !query
                .contains("fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed")
        {
            refuse(
                send,
                format!("pods requested without the phase field selector: {query}"),
            );
            continue;
        }
        let call = {
            let mut calls = calls.lock().unwrap();
            let n = calls
                .entry(format!(
                    "{} {path}",
                    if is_watch { "watch" } else { "list" }
                ))
                .or_default();
            *n += 1;
            *n
        };
        let body: Option<Vec<u8>> = match (path.as_str(), is_watch, call) {
            ("/api/v1/namespaces", false, _) => Some(list(
                "NamespaceList",
                "v1",
                "50",
                vec![
                    json!({"metadata": {"name": "shop", "uid": "ns-shop", "resourceVersion": "50",
                                          "labels": {"weft.io/mesh": "enabled"}}}),
                ],
            )),
            ("/api/v1/pods", false, 1) => Some(list(
                "PodList",
                "v1",
                "100",
                vec![
                    pod("web-1", "uid-web-1", "10.244.0.5", "90"),
                    // Not what an API server sends, but what a broken
                    // aggregated API or a future schema might: no uid.
                    {
                        let mut p = pod("no-uid", "", "10.244.0.9", "91");
                        p["metadata"].as_object_mut().unwrap().remove("uid");
                        p
                    },
                ],
            )),
            // The watch from 100: one more pod, then the resource version
            // expires (the watch was too slow / etcd compacted).
            ("/api/v1/pods", true, 1) if !query.contains("resourceVersion=100") => {
                refuse(
                    send,
                    format!(
                        "the first pod watch must resume from the list's resourceVersion 100: {query}"
                    ),
                );
                continue;
            }
            ("/api/v1/pods", true, 1) => {
                let mut body = event(
                    "ADDED",
                    with_kind(pod("web-2", "uid-web-2", "10.244.0.6", "101"), "Pod"),
                );
                body.push_str(&event(
                    "ERROR",
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "too old resource version: 101 (180)", "reason": "Expired", "code": 410}),
                ));
                Some(body.into_bytes())
            }
            // The re-list: web-1 was deleted while the watch was gone; the
            // deletion event was lost, only the list says so.
            ("/api/v1/pods", false, 2) => Some(list(
                "PodList",
                "v1",
                "200",
                vec![pod("web-2", "uid-web-2", "10.244.0.6", "101")],
            )),
            ("/api/v1/services", false, _) => Some(list("ServiceList", "v1", "60", vec![])),
            ("/apis/discovery.k8s.io/v1/endpointslices", false, _) => Some(list(
                "EndpointSliceList",
                "discovery.k8s.io/v1",
                "70",
                vec![],
            )),
            ("/apis/policy.weft.io/v1alpha1/servers", false, _) => Some(list(
                "ServerList",
                "policy.weft.io/v1alpha1",
                "80",
                vec![json!({
                    "metadata": {"name": "web-http", "namespace": "shop", "resourceVersion": "80"},
                    "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": "http"}
                })],
            )),
            ("/apis/policy.weft.io/v1alpha1/authorizationpolicies", false, _) => Some(list(
                "AuthorizationPolicyList",
                "policy.weft.io/v1alpha1",
                "81",
                vec![json!({
                    "metadata": {"name": "web-from-client", "namespace": "shop", "resourceVersion": "81"},
                    "spec": {"targetRef": {"group": "policy.weft.io", "kind": "Server", "name": "web-http"},
                             "requiredAuthenticationRefs": [{"kind": "ServiceAccount", "name": "client"}]}
                })],
            )),
            ("/apis/policy.weft.io/v1alpha1/meshtlsauthentications", false, _) => Some(list(
                "MeshTLSAuthenticationList",
                "policy.weft.io/v1alpha1",
                "82",
                vec![],
            )),
            ("/apis/policy.weft.io/v1alpha1/networkauthentications", false, _) => Some(list(
                "NetworkAuthenticationList",
                "policy.weft.io/v1alpha1",
                "83",
                vec![],
            )),
            ("/apis/policy.weft.io/v1alpha1/httproutes", false, _) => Some(list(
                "HTTPRouteList",
                "policy.weft.io/v1alpha1",
                "84",
                vec![],
            )),
            (_, true, _) => None,
            other => {
                refuse(send, format!("unexpected request {other:?} {query}"));
                continue;
            }
        };
        match body {
            Some(body) => send.send_response(Response::builder().body(Body::from(body)).unwrap()),
            None => held.push(send),
        }
    }
}

async fn wait(
    rx: &mut watch::Receiver<NodeView>,
    violations: &Violations,
    what: &str,
    check: impl FnMut(&NodeView) -> bool,
) {
    tokio::time::timeout(WAIT, rx.wait_for(check))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}; the fake API server refused: {:?}",
                violations.lock().unwrap()
            )
        })
        .unwrap();
}

fn names(view: &NodeView) -> Vec<String> {
    view.workloads().map(|(_, w)| w.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_watches_and_relists_after_410_gone() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let violations = Violations::default();
    let (stop_server, stop) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(api_server(handle, calls.clone(), violations.clone(), stop));
    let client = kube::Client::new(service, "default");

    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(metrics.clone()));
    let (tx, rx) = mpsc::channel(64);
    let source = tokio::spawn(source::kube::run(client, tx, metrics.clone()));
    let indexer = tokio::spawn(indexer::run(
        ClusterObjects::default(),
        IndexConfig::default(),
        rx,
        publisher.clone(),
    ));
    let mut ready = publisher.ready();
    let mut view = publisher.subscribe("node-a");

    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "not ready after every kind is listed; the fake API server refused: {:?}",
                violations.lock().unwrap()
            )
        })
        .unwrap();
    // web-2 arrives on the watch, before the 410: both pods seen together.
    wait(&mut view, &violations, "the watched pod", |v| {
        names(v) == ["web-1", "web-2"]
    })
    .await;
    // After 410 Gone the source re-lists: web-1, deleted meanwhile, goes.
    wait(&mut view, &violations, "the re-list", |v| {
        names(v) == ["web-2"]
    })
    .await;
    assert_eq!(metrics.expired_watches("Pod"), 1);
    let v = view.borrow().clone();
    let w = v.workloads().next().unwrap().1;
    assert!(w.enrolled);
    assert_eq!(w.identity, "spiffe://cluster.local/ns/shop/sa/web");
    // The policy CRDs were watched too: the Server closes web-2's named
    // port `http` (8080) to all but the client ServiceAccount.
    let policy = &v.local.policies["shop/web-2"];
    assert_eq!(policy.servers.len(), 1);
    assert_eq!(policy.servers[0].port, 8080);
    assert_eq!(
        policy.servers[0].authorizations[0].policy,
        "shop/web-from-client"
    );
    let client: weft_identity_api::SpiffeId =
        "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
    let other: weft_identity_api::SpiffeId =
        "spiffe://cluster.local/ns/shop/sa/other".parse().unwrap();
    let from: std::net::IpAddr = "10.244.0.7".parse().unwrap();
    assert!(weft_destination_api::authorize(policy, 8080, Some(&client), from).allowed);
    assert!(!weft_destination_api::authorize(policy, 8080, Some(&other), from).allowed);
    assert_eq!(calls.lock().unwrap()["list /api/v1/pods"], 2);
    assert_eq!(calls.lock().unwrap()["list /api/v1/namespaces"], 1);
    // The pod without a uid was refused (once: at the first list; the
    // re-list no longer has it), and did not stop the others.
    assert_eq!(metrics.rejected("Pod"), 1);
    let text = metrics.encode();
    assert!(
        text.contains("weft_destination_indexed_objects{kind=\"Pod\"} 1"),
        "{text}"
    );

    for t in [source, indexer] {
        t.abort();
    }
    // Join the fake: a panic in it (a bug in the script) fails the test,
    // and so does any request it had to refuse, even one made after the
    // view above was already right.
    let _ = stop_server.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("the fake API server stops")
        .expect("the fake API server did not panic");
    assert_eq!(
        *violations.lock().unwrap(),
        Vec::<String>::new(),
        "requests the fake API server refused"
    );
}
