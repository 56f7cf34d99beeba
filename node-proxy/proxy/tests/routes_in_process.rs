//! HTTPRoutes in the node proxy, in process (no root, no simulator): a
//! weighted split, a request timeout, 404 for a request no rule matches,
//! retries hiding a flaky endpoint, and the retry budget; through two
//! in-process node proxies joined by real HBONE over mutual TLS, with the
//! views the destination service's index builds from these manifests.
//! `e2e/tests/routes.rs` keeps what needs the simulator (curl in a captured
//! pod, gRPC from a real client, the balancer on the wire).

mod in_process;

use bytes::Bytes;
use http_body_util::BodyExt;
use in_process::{
    InProcessMesh, get, get_on, metric, pod_yaml, post_chunked, serve_app, streamed, text,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.31.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-canary, namespace: demo}
spec: {clusterIP: 10.96.31.2, selector: {app: web-canary}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: flaky, namespace: demo}
spec: {clusterIP: 10.96.31.3, selector: {app: flaky}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: demo}
spec: {clusterIP: 10.96.31.4, selector: {app: broken}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: web-split, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
    - name: hello
      matches: [{path: {type: PathPrefix, value: /hello}}]
      backendRefs:
        - {name: web, port: 80, weight: 90}
        - {name: web-canary, port: 80, weight: 10}
    - name: slow
      matches: [{path: {type: PathPrefix, value: /delay}}]
      timeouts: {request: 300ms}
    - name: stall
      matches: [{path: {type: PathPrefix, value: /stall}}]
      timeouts: {request: 300ms}
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: flaky-retry, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: flaky, port: 80}]
  rules:
    - retry: {attempts: 2, backoff: 5ms}
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: broken-retry, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: broken, port: 80}]
  rules:
    - retry: {attempts: 2, backoff: 1ms}
"#;

const WEB: &str = "web.demo.svc.cluster.local";
const CANARY: &str = "web-canary.demo.svc.cluster.local";
const FLAKY: &str = "flaky.demo.svc.cluster.local";
const BROKEN: &str = "broken.demo.svc.cluster.local";

/// An application like the simulator's `http_server.py`: `/hello`,
/// `/delay/<ms>`, `/status/<code>`, and `/flaky` failing every second
/// request it receives. Counts what it answered.
async fn app(ip: &str, name: &'static str) -> Arc<AtomicUsize> {
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    serve_app(addr, move |req: http::Request<hyper::body::Incoming>| {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let path = req.uri().path().trim_matches('/').to_string();
            let parts: Vec<&str> = path.split('/').collect();
            match parts.as_slice() {
                ["hello"] => text(200, format!("hello from {name}")),
                ["delay", ms] => {
                    let ms: u64 = ms.parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    text(200, format!("{name} waited {ms} ms"))
                }
                ["status", code] => text(code.parse().unwrap_or(400), Bytes::new()),
                // A POST's body is read first (as the simulator's Python
                // server does) and comes back: each client gets its own.
                ["flaky"] if req.method() == http::Method::POST => {
                    match req.into_body().collect().await {
                        Ok(_) if n % 2 == 1 => text(500, "flaky failed"),
                        Ok(body) => text(200, body.to_bytes()),
                        Err(e) => text(400, e.to_string()),
                    }
                }
                ["flaky"] if n % 2 == 1 => text(500, "flaky failed"),
                ["flaky"] => text(200, "flaky ok"),
                // Headers and a first chunk at once, then nothing for 60 s.
                ["stall"] => {
                    let (response, rest) = streamed("start\n");
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(rest);
                    });
                    response
                }
                _ => text(404, Bytes::new()),
            }
        }
    })
    .await;
    served
}

/// Source-side requests of the client to `service` on `route`.
fn requests(mesh: &InProcessMesh, service: &str, route: &str, more: &[(&str, &str)]) -> f64 {
    let mut labels = vec![
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_service", service),
        ("route", route),
    ];
    labels.extend_from_slice(more);
    metric(
        &mesh.node("node-a").metrics(),
        "weft_requests_total",
        &labels,
    )
    .unwrap_or(0.0)
}

/// Generous: what must happen happens long before (in-process, loopback).
const PATIENCE: Duration = Duration::from_secs(30);

/// The cluster, with its pods on `127.31.<subnet>.0/24` (one subnet per
/// test: tests of one binary run at once), the applications running and
/// every pod served by its node's proxy; returns the client pod.
async fn start(subnet: u8) -> (InProcessMesh, in_process::MeshPod) {
    let ip = |host: u8| format!("127.31.{subnet}.{host}");
    let mut cluster = CLUSTER.to_string();
    cluster.push_str(&pod_yaml(
        "demo",
        "client",
        "node-a",
        "client",
        &ip(2),
        None,
        None,
    ));
    for (host, name, node, app) in [
        (3, "web-1", "node-b", "web"),
        (4, "web-2", "node-a", "web"),
        (5, "canary-1", "node-b", "web-canary"),
        (6, "flaky-1", "node-b", "flaky"),
        (7, "broken-1", "node-b", "broken"),
    ] {
        cluster.push_str(&pod_yaml(
            "demo",
            name,
            node,
            "web",
            &ip(host),
            Some(app),
            Some(8080),
        ));
    }
    let mut mesh = InProcessMesh::start(&cluster).await;
    for (host, name) in [
        (3, "web-1"),
        (4, "web-2"),
        (5, "canary-1"),
        (6, "flaky-1"),
        (7, "broken-1"),
    ] {
        app(&format!("127.31.{subnet}.{host}"), name).await;
    }
    for (node, pod) in [
        ("node-b", "web-1"),
        ("node-a", "web-2"),
        ("node-b", "canary-1"),
        ("node-b", "flaky-1"),
        ("node-b", "broken-1"),
    ] {
        mesh.pod(node, "demo", pod);
    }
    let client = mesh.pod("node-a", "demo", "client");
    (mesh, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_a_timeout_and_an_unmatched_path() {
    let (mesh, client) = start(1).await;
    // One outbound listener per Service VIP the client calls.
    let (via, _) = client.outbound_to("10.96.31.1:80".parse().unwrap());
    // 90/10 over 400 requests: the canary's count is Binomial(400, 0.1),
    // mean 40, sd 6; 40 ± 20 is more than three sd.
    const N: usize = 400;
    let mut canary = 0;
    for _ in 0..N {
        let (status, body) = tokio::time::timeout(PATIENCE, get(via, "web.demo", "/hello"))
            .await
            .expect("answered");
        assert_eq!(status, 200, "{body}");
        match body.as_str() {
            "hello from canary-1" => canary += 1,
            "hello from web-1" | "hello from web-2" => {}
            other => panic!("unexpected body {other:?}"),
        }
    }
    assert!(
        (20..=60).contains(&canary),
        "canary served {canary} of {N}, want 10 % ± 5 %"
    );
    // Counted once each under the rule's name, and under the Service that
    // served it.
    assert_eq!(
        requests(&mesh, WEB, "web-split/hello", &[("status_code", "200")])
            + requests(&mesh, CANARY, "web-split/hello", &[("status_code", "200")]),
        N as f64
    );
    assert_eq!(
        requests(&mesh, CANARY, "web-split/hello", &[]),
        canary as f64
    );

    // The `slow` rule's 300 ms request timeout ends a 60 s request with
    // 504 (without the timeout the request would outlast PATIENCE).
    let (status, body) = tokio::time::timeout(PATIENCE, get(via, "web.demo", "/delay/60000"))
        .await
        .expect("the proxy answers before the application");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("request timeout"), "{body}");
    // Within the limit, the same rule answers normally.
    let (status, body) = get(via, "web.demo", "/delay/10").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        requests(
            &mesh,
            WEB,
            "web-split/slow",
            &[("status_code", "504"), ("classification", "failure")]
        ),
        1.0
    );

    // The Service has routes and none matches /status: 404 from the proxy
    // (the application would have answered 500), counted as unmatched.
    let (status, body) = get(via, "web.demo", "/status/500").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no HTTPRoute rule"), "{body}");
    assert_eq!(
        requests(&mesh, WEB, "unmatched", &[("status_code", "404")]),
        1.0
    );
    // Every request crossed the nodes over mutual TLS: the destination
    // side saw the client's identity.
    let b = mesh.node("node-b").metrics();
    let seen = metric(
        &b,
        "weft_requests_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/demo/sa/client",
            ),
        ],
    )
    .unwrap_or(0.0);
    assert!(seen > 0.0, "no request reached node-b over mTLS:\n{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_flaky_endpoint_and_stop_at_the_budget() {
    let (mesh, client) = start(2).await;
    let (flaky, _) = client.outbound_to("10.96.31.3:80".parse().unwrap());
    // flaky-1 fails every other request it receives. With one client that
    // is every first attempt but the very first: 99 retries for 100
    // requests, each succeeding, within the budget thanks to its floor.
    const N: usize = 100;
    for i in 0..N {
        let (status, body) = tokio::time::timeout(PATIENCE, get(flaky, "flaky.demo", "/flaky"))
            .await
            .expect("answered");
        assert_eq!(status, 200, "request {i}: {body}");
    }
    let a = mesh.node("node-a").metrics();
    let labels = [("destination_service", FLAKY), ("route", "flaky-retry/0")];
    assert_eq!(
        metric(&a, "weft_request_retries_total", &labels),
        Some(99.0)
    );
    assert_eq!(
        requests(&mesh, FLAKY, "flaky-retry/0", &[("status_code", "200")]),
        N as f64
    );

    // broken-1 fails everything: each request would take 2 retries (800),
    // the budget allows its floor (10/s over 10 s) plus 20 % of the
    // requests in the window.
    let (broken, _) = client.outbound_to("10.96.31.4:80".parse().unwrap());
    const M: usize = 400;
    let started = std::time::Instant::now();
    for _ in 0..M {
        let (status, _) = get(broken, "broken.demo", "/status/503").await;
        assert_eq!(status, 503);
    }
    let took = started.elapsed();
    let a = mesh.node("node-a").metrics();
    let labels = [("destination_service", BROKEN), ("route", "broken-retry/0")];
    let retries = metric(&a, "weft_request_retries_total", &labels).unwrap_or(0.0);
    let exhausted = metric(&a, "weft_retry_budget_exhausted_total", &labels).unwrap_or(0.0);
    // The window is 10 s: a slower run may see the floor more than once.
    let windows = 1.0 + (took.as_secs_f64() / 10.0).floor();
    let bound = windows * (100.0 + 0.2 * M as f64);
    assert!(retries >= 100.0, "the floor allows 100 retries: {retries}");
    assert!(retries <= bound, "{retries} retries > budget {bound}");
    assert!(exhausted >= 1.0, "budget exhaustion counted: {exhausted}");
    assert_eq!(
        requests(&mesh, BROKEN, "broken-retry/0", &[("status_code", "503")]),
        M as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_streamed_bodies() {
    let (mesh, client) = start(3).await;
    let (flaky, _) = client.outbound_to("10.96.31.3:80".parse().unwrap());
    let labels = [("destination_service", FLAKY), ("route", "flaky-retry/0")];
    let retries = || {
        metric(
            &mesh.node("node-a").metrics(),
            "weft_request_retries_total",
            &labels,
        )
        .unwrap_or(0.0)
    };
    // Chunked POSTs (no Content-Length: the body is streamed through the
    // proxy) to an endpoint failing every other request. Each failure is
    // retried with the body kept by the first attempt, which the server
    // echoes: every client gets its own bytes back.
    const N: usize = 20;
    for i in 0..N {
        let payload = Bytes::from(format!("weft-replay-{i:02}/").repeat(100));
        let (status, body) = tokio::time::timeout(
            PATIENCE,
            post_chunked(flaky, "flaky.demo", "/flaky", payload.clone()),
        )
        .await
        .expect("answered");
        assert_eq!(status, 200, "POST {i}");
        assert_eq!(body, payload, "POST {i} got its own body back");
    }
    // The first request finds the server's success turn; every later one
    // fails once, then succeeds.
    assert_eq!(retries(), (N - 1) as f64);

    // A body over the 64 KiB replay cap is forwarded but not kept: its
    // failures reach the client, with no retry made.
    const BIG: usize = 6;
    let mut codes = Vec::new();
    for _ in 0..BIG {
        let big = Bytes::from(vec![b'x'; 80 * 1024]);
        codes.push(post_chunked(flaky, "flaky.demo", "/flaky", big).await.0);
    }
    assert_eq!(
        codes.iter().filter(|c| **c == 500).count(),
        BIG / 2,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == 200).count(),
        BIG / 2,
        "{codes:?}"
    );
    assert_eq!(
        retries(),
        (N - 1) as f64,
        "no retry of a body that was not kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_covers_the_response_body() {
    let (mesh, client) = start(4).await;
    let (web, _) = client.outbound_to("10.96.31.1:80".parse().unwrap());
    // The application sends its headers and a first chunk at once, then
    // stalls for 60 s. The rule's 300 ms bounds the whole response: the
    // client gets "start" and then an error (the response is cut, never
    // made to look complete), long before the application would finish.
    let tcp = tokio::net::TcpStream::connect(web).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/stall")
        .header(http::header::HOST, "web.demo")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("headers");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("a frame")
        .expect("the first chunk");
    assert_eq!(first.into_data().unwrap(), "start\n");
    let rest = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("the proxy ends the body before the application would");
    assert!(
        matches!(rest, Some(Err(_))),
        "the cut body is an error, not an end: {rest:?}"
    );
    assert_eq!(
        requests(
            &mesh,
            WEB,
            "web-split/stall",
            &[("classification", "failure")]
        ),
        1.0
    );
}

/// Requests on one keep-alive connection go to different endpoints, and
/// each is counted under the workload that answered it. The connection
/// keeps the metrics' peers of the last route for the next request that
/// takes the same one: a request that takes another must not inherit them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_connection_are_counted_under_the_workload_that_answered() {
    let (mesh, client) = start(5).await;
    let (via, _) = client.outbound_to("10.96.31.1:80".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    const N: usize = 200;
    let mut answered = std::collections::BTreeMap::<String, f64>::new();
    let mut switches = 0;
    let mut previous = String::new();
    for _ in 0..N {
        let (status, body) =
            tokio::time::timeout(PATIENCE, get_on(&mut send, "web.demo", "/hello"))
                .await
                .expect("answered");
        assert_eq!(status, 200, "{body}");
        let workload = body
            .strip_prefix("hello from ")
            .unwrap_or_else(|| panic!("unexpected body {body:?}"))
            .to_string();
        switches += usize::from(!previous.is_empty() && previous != workload);
        previous.clone_from(&workload);
        *answered.entry(workload).or_default() += 1.0;
    }
    // The 90/10 split alone moves the requests between workloads dozens
    // of times (the canary's share is Binomial(200, 0.1)).
    assert!(switches >= 5, "{switches} switches: {answered:?}");
    let text = mesh.node("node-a").metrics();
    for (workload, count) in &answered {
        let counted = metric(
            &text,
            "weft_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_workload", workload),
                ("route", "web-split/hello"),
            ],
        );
        assert_eq!(counted, Some(*count), "{workload}: {answered:?}");
    }
}
