//! HTTP/2 stream resets (issue #15 item 8), in process: two node proxies on
//! loopback joined by real HBONE over mutual TLS, a client pod speaking
//! HTTP/2 (the h2 crate, so that the test sees every reset) through its
//! node proxy's outbound side to an application on the other node.
//!
//! - A pod that makes the proxy reset its streams on purpose (protocol
//!   errors: a body longer than its `content-length`) loses that connection
//!   after h2's limit, counted and logged; its next connection and the
//!   node's other clients are served as before.
//! - Normal proxying never comes near that limit: when the application
//!   answers before reading the whole body, the proxies read the rest
//!   instead of resetting the client's stream (a bounded read: a client
//!   that keeps sending is reset).

mod in_process;

use bytes::Bytes;
use in_process::{InProcessMesh, MeshPod, get, metric, pod_yaml, serve_app, text};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.35.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"#;

const WEB_VIP: &str = "10.96.35.1:80";
/// h2's default, which the proxy keeps for every client.
const H2_LIMIT: usize = 1024;
/// Generous: what must happen happens long before (in-process, loopback).
const PATIENCE: Duration = Duration::from_secs(30);

struct Cluster {
    mesh: InProcessMesh,
    client: MeshPod,
    /// Requests the application saw.
    seen: Arc<AtomicUsize>,
    _app: tokio::task::JoinHandle<()>,
}

/// Pods on `127.35.<subnet>.0/24`: the client on node-a; web-1 on node-b,
/// an application that answers at once, without reading the request body.
async fn start(subnet: u8) -> Cluster {
    let ip = |host: u8| format!("127.35.{subnet}.{host}");
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
    cluster.push_str(&pod_yaml(
        "demo",
        "web-1",
        "node-b",
        "web",
        &ip(3),
        Some("web"),
        Some(8080),
    ));
    let mut mesh = InProcessMesh::start(&cluster).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let addr: SocketAddr = format!("{}:8080", ip(3)).parse().unwrap();
    let app = serve_app(addr, move |req| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            drop(req);
            text(200, "early answer")
        }
    })
    .await;
    mesh.pod("node-b", "demo", "web-1");
    let client = mesh.pod("node-a", "demo", "client");
    Cluster {
        mesh,
        client,
        seen,
        _app: app,
    }
}

struct H2Client {
    send: h2::client::SendRequest<Bytes>,
    ping: h2::PingPong,
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

async fn h2_client(via: SocketAddr) -> H2Client {
    let tcp = TcpStream::connect(via).await.expect("connect");
    let (send, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let ping = connection.ping_pong().expect("the PING handle");
    H2Client {
        send,
        ping,
        connection: tokio::spawn(connection),
    }
}

fn upload() -> http::Request<()> {
    http::Request::post("http://web.demo/upload")
        .body(())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_makes_the_proxy_reset_its_streams_loses_that_connection_and_is_counted() {
    let c = start(1).await;
    let (via, _) = c.client.outbound_to(WEB_VIP.parse().unwrap());
    let H2Client {
        send: mut client,
        connection,
        ..
    } = h2_client(via).await;

    // Each stream announces one byte of body and sends more: a protocol
    // error that h2 answers by resetting the stream (PROTOCOL_ERROR), one
    // locally caused reset each.
    let mut sent = 0;
    let ended = tokio::time::timeout(PATIENCE, async {
        while sent < 2 * H2_LIMIT {
            let Ok(ready) = client.clone().ready().await else {
                break;
            };
            client = ready;
            let request = http::Request::post("http://web.demo/upload")
                .header(http::header::CONTENT_LENGTH, "1")
                .body(())
                .expect("request");
            let Ok((response, mut body)) = client.send_request(request, false) else {
                break;
            };
            sent += 1;
            let _ = body.send_data(Bytes::from_static(b"more than one byte"), true);
            // The proxy resets the stream when the DATA arrives; the
            // application, which answers at once, may have answered it
            // first. Either way the reset is one of those h2 counts.
            let _ = response.await;
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the streams were neither reset nor refused in time"
    );
    let error = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the connection ends")
        .expect("the connection task")
        .expect_err("the proxy closed the connection");
    assert!(
        error.is_go_away() && error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM),
        "closed by GOAWAY(ENHANCE_YOUR_CALM), not: {error:?}"
    );
    assert!(
        (H2_LIMIT..H2_LIMIT + 50).contains(&sent),
        "closed after {sent} reset streams, not at the limit ({H2_LIMIT})"
    );
    // Counted once the proxy's side of the connection has ended, which is
    // after the client read the GOAWAY: waited for, not assumed.
    let floods = || {
        metric(
            &c.mesh.node("node-a").metrics(),
            "weft_http2_reset_floods_total",
            &[("reporter", "source")],
        )
    };
    let counted = tokio::time::timeout(PATIENCE, async {
        while floods().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(counted.is_ok(), "{}", c.mesh.node("node-a").metrics());
    assert_eq!(floods(), Some(1.0), "{}", c.mesh.node("node-a").metrics());

    // The pod's next connection, and HTTP/1.1, are served as before.
    let mut client = h2_client(via).await.send;
    upload_answered(&mut client, b"a body", true).await;
    let (status, answer) = get(via, "web.demo", "/").await;
    assert_eq!((status, answer.as_str()), (200, "early answer"));
}

/// Opens an upload on `client`, sends `first` of its body (the stream stays
/// open unless `end`), and waits for the answer: 200.
async fn upload_answered(
    client: &mut h2::client::SendRequest<Bytes>,
    first: &'static [u8],
    end: bool,
) -> (http::Response<h2::RecvStream>, h2::SendStream<Bytes>) {
    *client = client.clone().ready().await.expect("client ready");
    let (response, mut body) = client.send_request(upload(), false).expect("new stream");
    body.send_data(Bytes::from_static(first), end)
        .expect("the body");
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("answered")
        .expect("a response");
    assert_eq!(response.status(), 200);
    (response, body)
}

/// Sends an upload whose body stays open, waits for the whole answer and
/// for the proxy's frames sent up to it (a PING round trip), then says
/// whether the proxy reset the stream; if it did not, finishes the body
/// with `rest`.
async fn early_answer(
    client: &mut h2::client::SendRequest<Bytes>,
    ping: &mut h2::PingPong,
    rest: Bytes,
) -> Option<h2::Reason> {
    let (response, mut body) = upload_answered(client, b"the first part", false).await;
    let mut answer = response.into_body();
    let mut bytes = Vec::new();
    while let Some(data) = answer.data().await {
        let data = data.expect("the answer's body");
        let _ = answer.flow_control().release_capacity(data.len());
        bytes.extend_from_slice(&data);
    }
    assert_eq!(bytes, b"early answer");
    // Frames arrive in order: once the PONG is here, so is any reset the
    // proxy sent after its answer.
    ping.ping(h2::Ping::opaque()).await.expect("PING answered");
    if let Some(reset) = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match body.poll_reset(cx) {
            std::task::Poll::Ready(Ok(reason)) => Some(reason),
            _ => None,
        })
    })
    .await
    {
        return Some(reset);
    }
    body.send_data(rest, true).expect("the rest of the body");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_that_answers_before_the_body_ends_costs_the_client_no_reset() {
    let c = start(2).await;
    let (via, _) = c.client.outbound_to(WEB_VIP.parse().unwrap());
    let H2Client {
        send: mut client,
        mut ping,
        connection,
    } = h2_client(via).await;

    // More than h2's limit of early answers on one connection: none resets
    // the client's stream, so none could ever count against it.
    for i in 0..H2_LIMIT + 100 {
        let reset = early_answer(&mut client, &mut ping, Bytes::from_static(b"the rest")).await;
        assert_eq!(
            reset, None,
            "request {i}: the proxy reset the client's stream"
        );
    }
    assert!(
        !connection.is_finished(),
        "the client connection is still open"
    );
    assert!(c.seen.load(Ordering::Relaxed) > H2_LIMIT);

    // Bounded: a client that goes on sending after the answer is reset once
    // the proxy has read 2 MiB of what nobody needs.
    let (_response, mut body) = upload_answered(&mut client, b"the first part", false).await;
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let reset = tokio::time::timeout(PATIENCE, async {
        for _ in 0..1024 {
            // 64 MiB at most: far beyond the bound.
            body.reserve_capacity(chunk.len());
            let capacity = std::future::poll_fn(|cx| body.poll_capacity(cx)).await;
            match capacity {
                Some(Ok(_)) => {
                    if body.send_data(chunk.clone(), false).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        std::future::poll_fn(|cx| body.poll_reset(cx)).await
    })
    .await
    .expect("the proxy stops reading in time");
    assert_eq!(reset.ok(), Some(h2::Reason::NO_ERROR));
}
