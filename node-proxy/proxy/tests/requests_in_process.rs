//! HTTP/2 requests between node proxies without a tunnel, in process: two
//! node proxies on loopback, the real CA, a client pod speaking HTTP/2
//! through node-a's outbound side to a Service whose pod is on node-b.
//!
//! - Each request crosses as one stream of a mutual-TLS connection of its
//!   own kind (no HBONE tunnel is made), reaches the application without
//!   the proxies' `weft-target` header (whatever the client put there),
//!   and is counted on both sides with the client's verified identity.
//! - A client the destination's policy refuses gets PERMISSION_DENIED on
//!   its first call; the application sees nothing.
//! - A policy change that revokes the client closes its connection: a
//!   call in flight ends, the next one is refused.
//! - A destination proxy of the version before (tunnels only) still gets
//!   the requests, in a tunnel.

mod in_process;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use in_process::{InProcessMesh, MeshPod, metric, pod_yaml, serve_app, streamed, text};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.37.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: web-http, namespace: demo}
spec:
  podSelector: {matchLabels: {app: web}}
  port: 8080
  accessPolicy: deny
---
apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: clients, namespace: demo}
spec: {identities: ["spiffe://cluster.local/ns/demo/sa/client"]}
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-for-clients, namespace: demo}
spec:
  targetRef: {group: policy.weft.io, kind: Server, name: web-http}
  requiredAuthenticationRefs:
    - {group: policy.weft.io, kind: MeshTLSAuthentication, name: clients}
"#;

const WEB_VIP: &str = "10.96.37.1:80";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const PATIENCE: Duration = Duration::from_secs(30);

struct Cluster {
    mesh: InProcessMesh,
    /// The manifests the mesh was started with.
    yaml: String,
    client: MeshPod,
    stranger: MeshPod,
    /// The `weft-target` header of every request the application saw
    /// (`None`: absent).
    seen: Arc<Mutex<Vec<Option<String>>>>,
    /// The held-back rest of streamed responses.
    _held: Arc<Mutex<Vec<tokio::sync::mpsc::Sender<Bytes>>>>,
}

/// Pods on `127.37.<subnet>.0/24`: `client` and `stranger` (a service
/// account the policy does not name) on node-a, `web-1` on node-b, behind
/// the current node proxy or (`older`) one that only tunnels.
async fn start(subnet: u8, older: bool) -> Cluster {
    let ip = |host: u8| format!("127.37.{subnet}.{host}");
    let mut cluster = CLUSTER.to_string();
    for (name, node, sa, host, app, port) in [
        ("client", "node-a", "client", 2, None, None),
        ("stranger", "node-a", "stranger", 3, None, None),
        ("web-1", "node-b", "web", 4, Some("web"), Some(8080)),
    ] {
        cluster.push_str(&pod_yaml("demo", name, node, sa, &ip(host), app, port));
    }
    let mut mesh = InProcessMesh::start(&cluster).await;
    let streams = Arc::new(Mutex::new(Vec::new()));
    let kept = streams.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr: SocketAddr = format!("{}:8080", ip(4)).parse().unwrap();
    serve_app(addr, move |req| {
        let (log, kept) = (log.clone(), kept.clone());
        async move {
            let target = req
                .headers()
                .get(weft_hbone::TARGET_HEADER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            log.lock().unwrap().push(target);
            if req.uri().path() == "/stream" {
                // Answers a first piece and holds the rest back.
                let (response, more) = streamed("first piece");
                kept.lock().unwrap().push(more);
                return response;
            }
            text(200, format!("{} from web-1", req.uri().path()))
        }
    })
    .await;
    if older {
        mesh.pod_behind_an_older_proxy("node-b", "demo", "web-1");
    } else {
        mesh.pod("node-b", "demo", "web-1");
    }
    let client = mesh.pod("node-a", "demo", "client");
    let stranger = mesh.pod("node-a", "demo", "stranger");
    Cluster {
        mesh,
        yaml: cluster,
        client,
        stranger,
        seen,
        _held: streams,
    }
}

/// `n` concurrent HTTP/2 requests on one connection from `pod` to the web
/// Service, each naming a bogus target of its own (a client must not
/// steer the destination); their statuses, gRPC statuses and bodies.
async fn call(pod: &MeshPod, n: usize, grpc: bool) -> Vec<(u16, Option<String>, String)> {
    let (via, _task) = pod.outbound_to(WEB_VIP.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let calls = (0..n).map(|i| {
        let mut send = send.clone();
        async move {
            let mut req = http::Request::post(format!("http://web.demo/call/{i}"))
                .header(weft_hbone::TARGET_HEADER, "127.0.0.1:22")
                .body(Empty::<Bytes>::new())
                .expect("request");
            if grpc {
                req.headers_mut()
                    .insert("content-type", "application/grpc".parse().unwrap());
            }
            let resp = send.send_request(req).await.expect("a response");
            let status = resp.status().as_u16();
            let grpc_status = resp
                .headers()
                .get("grpc-status")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = resp.into_body().collect().await.expect("whole body");
            let trailers_status = body
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
            (status, grpc_status.or(trailers_status), body)
        }
    });
    tokio::time::timeout(PATIENCE, futures::future::join_all(calls))
        .await
        .expect("answered")
}

fn node_a(c: &Cluster) -> &weft_node_proxy::proxy::ProxyInputs {
    &c.mesh.node("node-a").inputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_cross_as_streams_of_their_own_without_a_tunnel() {
    let c = start(1, false).await;
    let answers = call(&c.client, 20, false).await;
    for (i, (status, _, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "call {i}: {body}");
        assert_eq!(body, &format!("/call/{i} from web-1"));
    }
    let seen = c.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 20, "every call reached the application once");
    assert!(
        seen.iter().all(Option::is_none),
        "the application saw a weft-target header: {seen:?}"
    );
    // No tunnel was made: one connection of the requests' own kind.
    let tunnels = node_a(&c).tunnels.as_ref().expect("a tunnel pool");
    assert_eq!(tunnels.connections(), 0, "no HBONE tunnel");
    assert_eq!(node_a(&c).upstreams.connections(), 1);
    // Both proxies counted exactly these calls; the destination with the
    // client's verified identity.
    let source = metric(
        &c.mesh.node("node-a").metrics(),
        "weft_requests_total",
        &[("reporter", "source"), ("status_code", "200")],
    );
    assert_eq!(source, Some(20.0));
    let destination = metric(
        &c.mesh.node("node-b").metrics(),
        "weft_requests_total",
        &[
            ("reporter", "destination"),
            ("source_principal", CLIENT),
            ("status_code", "200"),
        ],
    );
    assert_eq!(destination, Some(20.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_policy_refuses_gets_permission_denied_and_reaches_nothing() {
    let c = start(2, false).await;
    let answers = call(&c.stranger, 3, true).await;
    for (status, grpc_status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(grpc_status.as_deref(), Some("7"), "PERMISSION_DENIED");
    }
    assert!(c.seen.lock().unwrap().is_empty(), "nothing reached web-1");
    let refused = metric(
        &c.mesh.node("node-b").metrics(),
        "weft_inbound_authz_denied_total",
        &[("destination_workload", "web-1")],
    );
    // Each call was checked (and refused) once: a refused first request
    // admits nothing, so each next one is checked again.
    assert_eq!(refused, Some(3.0));
    // The client the policy names is served on the same proxies.
    let answers = call(&c.client, 2, true).await;
    assert!(
        answers
            .iter()
            .all(|(status, g, _)| *status == 200 && g.is_none()),
        "{answers:?}"
    );
    assert_eq!(c.seen.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_proxy_that_only_tunnels_gets_the_requests_in_a_tunnel() {
    let c = start(3, true).await;
    let answers = call(&c.client, 5, false).await;
    for (i, (status, _, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "call {i}: {body}");
        assert_eq!(body, &format!("/call/{i} from web-1"));
    }
    let tunnels = node_a(&c).tunnels.as_ref().expect("a tunnel pool");
    assert_eq!(tunnels.connections(), 1, "one HBONE connection");
    let seen = c.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter().all(Option::is_none),
        "the application saw a weft-target header: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_loses_its_connection_and_its_next_call_is_refused() {
    let c = start(4, false).await;
    let (via, _task) = c.client.outbound_to(WEB_VIP.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("http://web.demo/stream")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(PATIENCE, send.send_request(req))
        .await
        .expect("answered")
        .expect("a response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("a first piece")
        .expect("a frame")
        .expect("data");
    assert_eq!(first.into_data().unwrap(), "first piece");

    // The policy now names the stranger only.
    let changed = c.yaml.replace(
        "identities: [\"spiffe://cluster.local/ns/demo/sa/client\"]",
        "identities: [\"spiffe://cluster.local/ns/demo/sa/stranger\"]",
    );
    assert_ne!(changed, c.yaml);
    c.mesh.change(&changed).await;

    // The call in flight ends with an error, not an orderly end.
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("the call in flight ends");
    assert!(
        ended.is_err(),
        "ended in order: the revocation was not seen"
    );
    let revoked = metric(
        &c.mesh.node("node-b").metrics(),
        "weft_inbound_authz_revoked_total",
        &[("destination_workload", "web-1")],
    );
    assert_eq!(revoked, Some(1.0));
    let seen_before = c.seen.lock().unwrap().len();
    let answers = call(&c.client, 1, true).await;
    assert_eq!(answers[0].1.as_deref(), Some("7"), "{answers:?}");
    assert_eq!(
        c.seen.lock().unwrap().len(),
        seen_before,
        "nothing more reached web-1"
    );
}

/// A connection for requests does not outlive the trust bundle its peer
/// was verified under: when the CA adds (or retires) an anchor, node-a
/// takes it out of use at once (not when the destination says GOAWAY, nor
/// when it has been idle for long), and the next calls go on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_for_requests_is_made_again_when_the_trust_bundle_changes() {
    let c = start(5, false).await;
    let answers = call(&c.client, 2, false).await;
    assert!(answers.iter().all(|(s, _, _)| *s == 200), "{answers:?}");
    assert_eq!(node_a(&c).upstreams.connections(), 1);

    // The CA's bundle gains an anchor, as the first step of a rotation.
    c.mesh.add_trust_anchor().await;
    // The follower retires it within moments. The destination learns the
    // bundle too and sends GOAWAY, and the pool's reaper would then drop
    // the closed connection, but not before its first pass, 10 s after the
    // pool started: this waits for less.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while node_a(&c).upstreams.connections() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection made under the old bundle is still in use"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answers = call(&c.client, 2, false).await;
    assert!(answers.iter().all(|(s, _, _)| *s == 200), "{answers:?}");
    assert_eq!(
        node_a(&c).upstreams.connections(),
        1,
        "a new one, under the new bundle"
    );
    assert_eq!(c.seen.lock().unwrap().len(), 4);
}
