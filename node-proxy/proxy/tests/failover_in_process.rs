//! No request lost when a replica dies (issue #20), in process: two node
//! proxies on loopback joined by real HBONE over mutual TLS, applications
//! that can be killed (their listener and every connection closed, as the
//! kernel does when a process dies). The simulator's suite
//! (`e2e/tests/failover.rs`) does the same with real processes and SIGKILL.

mod in_process;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use in_process::{InProcessMesh, MeshPod, get, metric, pod_yaml};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.34.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {clusterIP: 10.96.34.2, selector: {app: web}, ports: [{port: 9000, targetPort: 9000, appProtocol: tcp}]}
---
apiVersion: v1
kind: Service
metadata: {name: picky, namespace: demo}
spec: {clusterIP: 10.96.34.3, selector: {app: picky}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: picky-retry, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: picky, port: 80}]
  rules:
    - retry: {attempts: 1, backoff: 1ms}
"#;

const WEB: &str = "web.demo.svc.cluster.local";
const PICKY: &str = "picky.demo.svc.cluster.local";

/// Generous: what must happen happens long before (in-process, loopback).
const PATIENCE: Duration = Duration::from_secs(30);

/// What the replicas answered: request id → the replicas that answered it.
type Answered = Arc<Mutex<HashMap<String, Vec<&'static str>>>>;

/// An HTTP/1.1 and HTTP/2 application on `addr` that records the id of
/// every request it answers (the `x-id` header) and answers with its name
/// (after `delay`); `status` other than 200 for every request. Aborting
/// the returned task closes its listener and every open connection.
async fn app(
    addr: SocketAddr,
    name: &'static str,
    status: u16,
    delay: Duration,
    answered: Answered,
) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.expect("app listens");
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let answered = answered.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let answered = answered.clone();
                    async move {
                        let id = req
                            .headers()
                            .get("x-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        tokio::time::sleep(delay).await;
                        answered
                            .lock()
                            .unwrap()
                            .entry(id.clone())
                            .or_default()
                            .push(name);
                        let len = body.map(|b| b.len()).unwrap_or(0);
                        let mut r = http::Response::new(Full::new(Bytes::from(format!(
                            "{name} {id} {len}"
                        ))));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

/// A TCP server on `addr` that writes `name` and closes.
async fn tcp_app(addr: SocketAddr, name: &'static str) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.expect("app listens");
    tokio::spawn(async move {
        loop {
            if let Ok((mut tcp, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = tcp.write_all(name.as_bytes()).await;
            }
        }
    })
}

/// One request through `via` (HTTP/1.1, a connection per request as curl
/// does): a GET, or a POST with a 1 KiB body, carrying the id `id`.
async fn send(via: SocketAddr, host: &str, id: &str, post: bool) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let builder = http::Request::builder()
        .uri("/")
        .header(http::header::HOST, host)
        .header("x-id", id);
    let req = if post {
        builder
            .method(http::Method::POST)
            .body(Full::new(Bytes::from(vec![b'x'; 1024])))
    } else {
        builder.body(Full::new(Bytes::new()))
    }
    .expect("request");
    match sender.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            (
                status,
                String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
            )
        }
        Err(e) => (0, e.to_string()),
    }
}

/// The client pod's node's counter `name` for `service` (0 when absent:
/// the registry is in this process, so "absent" is "never counted").
fn counter(mesh: &InProcessMesh, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&mesh.node("node-a").metrics(), name, labels).unwrap_or(0.0)
}

struct Cluster {
    mesh: InProcessMesh,
    client: MeshPod,
    apps: HashMap<&'static str, JoinHandle<()>>,
    answered: Answered,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for app in self.apps.values() {
            app.abort();
        }
    }
}

/// Pods on `127.34.<subnet>.0/24`: the client and web-3 on node-a, web-1
/// and web-2 on node-b (three replicas on two nodes), and picky-1 (always
/// 503) and picky-2 (slow but fine) on node-b.
async fn start(subnet: u8) -> Cluster {
    let ip = |host: u8| format!("127.34.{subnet}.{host}");
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
    let replicas = [
        (3, "web-1", "node-b", "web"),
        (4, "web-2", "node-b", "web"),
        (5, "web-3", "node-a", "web"),
        (6, "picky-1", "node-b", "picky"),
        (7, "picky-2", "node-b", "picky"),
    ];
    for (host, name, node, app) in replicas {
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
    let answered = Answered::default();
    let mut apps = HashMap::new();
    for (host, name, node, _) in replicas {
        let addr: SocketAddr = format!("{}:8080", ip(host)).parse().unwrap();
        let (status, delay) = match name {
            "picky-1" => (503, Duration::ZERO),
            "picky-2" => (200, Duration::from_millis(20)),
            _ => (200, Duration::ZERO),
        };
        apps.insert(name, app(addr, name, status, delay, answered.clone()).await);
        mesh.pod(node, "demo", name);
    }
    let client = mesh.pod("node-a", "demo", "client");
    Cluster {
        mesh,
        client,
        apps,
        answered,
    }
}

/// Warm-up: GETs until every web replica answered some (so HBONE
/// connections to node-b and the destination's connections to the
/// applications are open: the case where a dead replica used to cost
/// several 503s).
async fn warm_up(c: &Cluster, via: SocketAddr) {
    for i in 0..500 {
        let id = format!("warm-{i}");
        let (status, body) = tokio::time::timeout(PATIENCE, send(via, "web.demo", &id, false))
            .await
            .expect("answered");
        assert_eq!(status, 200, "{body}");
        let answered = c.answered.lock().unwrap();
        let served = |name| answered.values().flatten().any(|n| *n == name);
        if ["web-1", "web-2", "web-3"].into_iter().all(served) {
            return;
        }
    }
    panic!("500 requests and not every replica answered one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_no_request_get_or_post_without_a_retry_policy() {
    let mut c = start(1).await;
    let (via, _) = c.client.outbound_to("10.96.34.1:80".parse().unwrap());
    warm_up(&c, via).await;
    // The replica the balancer prefers dies (its listener and connections
    // close): P2C over peak-EWMA would keep away from a replica with a
    // stale slow estimate for seconds, and that case shows nothing.
    let names = [
        ("127.34.1.3", "web-1"),
        ("127.34.1.4", "web-2"),
        ("127.34.1.5", "web-3"),
    ];
    let snapshot = c.mesh.node("node-a").inputs.balancer.snapshot();
    let (dead, victim) = snapshot
        .iter()
        .filter_map(|(addr, s)| {
            let name = names.iter().find(|(ip, _)| addr.ip().to_string() == *ip)?.1;
            Some((*addr, name, s.latency_ewma))
        })
        .min_by_key(|(_, _, latency)| *latency)
        .map(|(addr, name, _)| (addr, name))
        .expect("the balancer knows the replicas");
    c.apps.remove(victim).unwrap().abort();
    let failover = |c: &Cluster| {
        counter(
            &c.mesh,
            "weft_request_failovers_total",
            &[("destination_service", WEB), ("route", "default")],
        )
    };
    let ejections = |c: &Cluster| {
        counter(
            &c.mesh,
            "weft_endpoint_ejections_total",
            &[("destination_service", WEB), ("reason", "connect_failure")],
        )
    };
    // One request at a time, GET and POST, until one of them found the
    // replica dead (bounded): none fails.
    let mut sent = Vec::new();
    for i in 0..300 {
        let id = format!("seq-{i}");
        let post = i % 2 == 1;
        let (status, body) = tokio::time::timeout(PATIENCE, send(via, "web.demo", &id, post))
            .await
            .expect("answered");
        assert_eq!(status, 200, "{id} (POST: {post}): {body}");
        assert!(!body.starts_with(victim), "{body}");
        sent.push(id);
        if failover(&c) >= 1.0 {
            break;
        }
    }
    assert!(
        failover(&c) >= 1.0,
        "300 requests and none was sent to {victim}"
    );
    // Ejected at its first connect failure, not after five 503s: one
    // request at a time, each failure ejected it (each pick of it was a
    // fresh one or a probe after its ejection ended).
    assert_eq!(ejections(&c), failover(&c), "one ejection per failure");
    let state = c.mesh.node("node-a").inputs.balancer.state(&dead);
    assert_eq!(
        state.as_ref().map(|s| s.consecutive_failures),
        Some(failover(&c) as u32),
        "{state:?}"
    );
    // Then concurrent load, GET and POST: none fails either.
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..25 {
                    let id = format!("con-{t}-{i}");
                    let post = i % 2 == 0;
                    let (status, body) =
                        tokio::time::timeout(PATIENCE, send(via, "web.demo", &id, post))
                            .await
                            .expect("answered");
                    assert_eq!(status, 200, "{id} (POST: {post}): {body}");
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    for t in tasks {
        sent.extend(t.await.expect("no request failed"));
    }
    // Every request was answered by exactly one live replica, once.
    {
        let answered = c.answered.lock().unwrap();
        for id in &sent {
            match answered.get(id).map(Vec::as_slice) {
                Some([one]) => assert_ne!(*one, victim, "{id}"),
                other => panic!("{id} answered by {other:?}"),
            }
        }
    }
    // The client never saw the proxies' typed header.
    let (_, body) = get(via, "web.demo", "/").await;
    assert!(!body.contains("weft-unprocessed"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_503_is_answered_by_another_replica() {
    let c = start(2).await;
    let (via, _) = c.client.outbound_to("10.96.34.3:80".parse().unwrap());
    // picky-1 answers 503 at once, picky-2 200 after 20 ms: by latency
    // alone the balancer prefers picky-1, for the retry too. The route
    // allows one retry.
    for i in 0..40 {
        let id = format!("picky-{i}");
        let (status, body) = tokio::time::timeout(PATIENCE, send(via, "picky.demo", &id, false))
            .await
            .expect("answered");
        assert_eq!(status, 200, "{id}: {body}");
        assert!(body.starts_with("picky-2"), "{body}");
    }
    let answered = c.answered.lock().unwrap();
    let by_picky1 = answered
        .values()
        .filter(|v| v.as_slice() == ["picky-1", "picky-2"])
        .count();
    assert!(
        by_picky1 >= 1,
        "picky-1 was never tried first: the test shows nothing ({answered:?})"
    );
    let retries = counter(
        &c.mesh,
        "weft_request_retries_total",
        &[("destination_service", PICKY)],
    );
    assert_eq!(retries, by_picky1 as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_connection_to_a_refusing_endpoint_is_connected_to_another() {
    let c = start(3).await;
    // The web replicas' port 9000: web-1 does not listen (its destination
    // proxy cannot connect), web-2 and web-3 write their names.
    let mut echo = Vec::new();
    for (host, name) in [(4, "web-2"), (5, "web-3")] {
        let addr: SocketAddr = format!("127.34.3.{host}:9000").parse().unwrap();
        echo.push(tcp_app(addr, name).await);
    }
    let (via, _) = c.client.outbound_to("10.96.34.2:9000".parse().unwrap());
    let failovers = || {
        counter(
            &c.mesh,
            "weft_request_failovers_total",
            &[("route", "opaque")],
        )
    };
    for i in 0..200 {
        let mut tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
        let mut name = String::new();
        tokio::time::timeout(PATIENCE, tcp.read_to_string(&mut name))
            .await
            .expect("answered")
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(
            name == "web-2" || name == "web-3",
            "connection {i}: {name:?}"
        );
        if failovers() >= 1.0 && i >= 20 {
            break;
        }
    }
    assert!(failovers() >= 1.0, "200 connections and none tried web-1");
    for e in echo {
        e.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_destination_proxy_costs_no_request() {
    let c = start(4).await;
    let (via, _) = c.client.outbound_to("10.96.34.1:80".parse().unwrap());
    // One HTTP/2 client connection (gRPC-like), requests multiplexed: the
    // source proxy keeps an HTTP/2 connection per endpoint, inside HBONE.
    let tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let send = |id: String, post: bool| {
        let mut sender = sender.clone();
        async move {
            let builder = http::Request::builder()
                .uri("http://web.demo/")
                .header("x-id", &id);
            let req = if post {
                builder
                    .method(http::Method::POST)
                    .body(Full::new(Bytes::from(vec![b'y'; 512])))
            } else {
                builder.body(Full::new(Bytes::new()))
            }
            .expect("request");
            let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
                .await
                .expect("answered")
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    // Warm: node-b's replicas have answered over the pooled connections.
    let mut served_b = false;
    for i in 0..200 {
        let (status, body) = send(format!("warm-{i}"), false).await;
        assert_eq!(status, 200, "{body}");
        served_b |= body.starts_with("web-1") || body.starts_with("web-2");
        if served_b && i >= 20 {
            break;
        }
    }
    assert!(
        served_b,
        "node-b's replicas answered nothing: the test shows nothing"
    );
    // node-b's proxy drains (SIGTERM): GOAWAY on its HBONE and HTTP/2
    // connections, new streams refused.
    c.mesh.node("node-b").inputs.drain.start();
    for i in 0..40 {
        let (status, body) = send(format!("after-{i}"), i % 2 == 1).await;
        assert_eq!(status, 200, "after-{i} (POST: {}): {body}", i % 2 == 1);
    }
}
