//! The HTTP latency part of the mesh benchmark: a tiny HTTP/1.1 and HTTP/2
//! server (gRPC-shaped answers for gRPC requests) and an open-loop load
//! generator, both run inside pods by re-executing this example
//! (`mesh-bench http-server PORT…`, `mesh-bench http-load …`), and a
//! closed-loop generator for the proxy's requests per CPU second
//! (`mesh-bench http-max …`).
//!
//! Open loop: request *i* is due at `start + i / rate` whatever happened to
//! the earlier ones, and its latency is measured from that due time, not
//! from when a connection was free to send it. A slow response therefore
//! shows up in the latency of every request it delayed (no coordinated
//! omission, the flaw of closed-loop tools such as wrk). `connections`
//! keep-alive connections serve the due requests; when all are busy the
//! due requests wait, and that wait is part of their latency.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

/// `http-server PORT…`: answers every request with 200 and 64 bytes, in
/// HTTP/1.1 or HTTP/2 (prior knowledge) as the client speaks; a gRPC
/// request (`content-type: application/grpc`) gets one 64-byte gRPC message
/// and the trailer `grpc-status: 0`.
pub fn server(ports: &[u16]) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for &port in ports {
            match TcpListener::bind(("0.0.0.0", port)).await {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    eprintln!("http-server: cannot listen on port {port}: {e}");
                    std::process::exit(1)
                }
            }
            println!("listening on 0.0.0.0:{port}");
        }
        let tasks: Vec<_> = listeners
            .into_iter()
            .map(|l| tokio::spawn(serve(l)))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        std::process::exit(1)
    })
}

async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let grpc = req
                    .headers()
                    .get(hyper::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                // Read the request first, as a gRPC server reads the
                // message before it answers.
                let _ = req.into_body().collect().await;
                let response = if grpc {
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    let body = Full::new(grpc_frame())
                        .with_trailers(async move { Some(Ok(trailers)) })
                        .boxed();
                    hyper::Response::builder()
                        .header(hyper::header::CONTENT_TYPE, "application/grpc")
                        .body(body)
                        .expect("a static response")
                } else {
                    hyper::Response::new(Full::new(Bytes::from_static(&[b'x'; 64])).boxed())
                };
                Ok::<_, std::convert::Infallible>(response)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One gRPC message of 64 bytes: not compressed, length, payload.
fn grpc_frame() -> Bytes {
    let mut frame = vec![0u8, 0, 0, 0, 64];
    frame.extend_from_slice(&[b'x'; 64]);
    Bytes::from(frame)
}

/// The protocol of a load run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 GETs on keep-alive connections.
    Http1,
    /// Unary gRPC calls (HTTP/2 POST, framed message, trailers) multiplexed
    /// on the connections.
    Grpc,
}

impl Proto {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "h1" => Some(Proto::Http1),
            "grpc" => Some(Proto::Grpc),
            _ => None,
        }
    }

    pub fn arg(self) -> &'static str {
        match self {
            Proto::Http1 => "h1",
            Proto::Grpc => "grpc",
        }
    }
}

/// What one load run measured (printed as one JSON line).
#[derive(Clone, Debug)]
pub struct LoadResult {
    pub sent: usize,
    pub errors: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Requests completed per second of the run.
    pub achieved_rps: f64,
}

impl LoadResult {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "sent": self.sent, "errors": self.errors, "p50_us": self.p50_us,
            "p90_us": self.p90_us, "p99_us": self.p99_us, "max_us": self.max_us,
            "achieved_rps": self.achieved_rps,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        Some(Self {
            sent: v["sent"].as_u64()? as usize,
            errors: v["errors"].as_u64()? as usize,
            p50_us: v["p50_us"].as_f64()?,
            p90_us: v["p90_us"].as_f64()?,
            p99_us: v["p99_us"].as_f64()?,
            max_us: v["max_us"].as_f64()?,
            achieved_rps: v["achieved_rps"].as_f64()?,
        })
    }
}

/// `http-load HOST:PORT PROTO RATE SECONDS CONNECTIONS`: prints one JSON
/// line.
pub fn load(target: &str, proto: Proto, rate: f64, seconds: f64, connections: usize) -> LoadResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run_load(
        target.to_string(),
        proto,
        rate,
        seconds,
        connections,
    ))
}

async fn run_load(
    target: String,
    proto: Proto,
    rate: f64,
    seconds: f64,
    connections: usize,
) -> LoadResult {
    let total = (rate * seconds).round() as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    // Due times, sent as they fall due (unbounded: a backlog is latency).
    let (due_tx, mut due_rx) = mpsc::unbounded_channel::<Instant>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<Duration>>();
    // Connections first, so their set-up is not in the latencies.
    let mut workers = Vec::new();
    match proto {
        Proto::Http1 => {
            // One request at a time per keep-alive connection: when all are
            // busy, due requests wait, and that wait is latency.
            let due_rx = Arc::new(Mutex::new(due_rx));
            for _ in 0..connections {
                let mut conn = Conn::open(&target, proto).await;
                let (due_rx, done_tx, target) = (due_rx.clone(), done_tx.clone(), target.clone());
                workers.push(tokio::spawn(async move {
                    loop {
                        let Some(due) = due_rx.lock().await.recv().await else {
                            return;
                        };
                        let ok = match &mut conn {
                            Some(c) => c.call(&target).await,
                            None => false,
                        };
                        if !ok {
                            // Reconnect for the next one; this one is an error.
                            conn = Conn::open(&target, proto).await;
                        }
                        let _ = done_tx.send(ok.then(|| due.elapsed()));
                    }
                }));
            }
        }
        Proto::Grpc => {
            // HTTP/2 multiplexes: every due call starts at once on the next
            // connection, as a gRPC channel does.
            let mut conns = Vec::new();
            for _ in 0..connections {
                conns.extend(Conn::open(&target, proto).await);
            }
            let (done_tx, target) = (done_tx.clone(), target.clone());
            workers.push(tokio::spawn(async move {
                let mut i = 0;
                while let Some(due) = due_rx.recv().await {
                    let Some(conn) = conns.get(i % conns.len().max(1)).cloned() else {
                        let _ = done_tx.send(None);
                        continue;
                    };
                    i += 1;
                    let (done_tx, target) = (done_tx.clone(), target.clone());
                    tokio::spawn(async move {
                        let mut conn = conn;
                        let ok = conn.call(&target).await;
                        let _ = done_tx.send(ok.then(|| due.elapsed()));
                    });
                }
            }));
        }
    }
    drop(done_tx);
    let start = Instant::now() + Duration::from_millis(50);
    // The schedule runs on a thread of its own: tokio's timer has a 1 ms
    // resolution, and every request released late would carry that
    // lateness in its latency (measured from the due time).
    let schedule_start = start.into_std();
    std::thread::spawn(move || {
        for i in 0..total {
            let due = schedule_start + period * i as u32;
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            if due_tx.send(Instant::from_std(due)).is_err() {
                return;
            }
        }
    });
    // Bounded in time: the run plus a grace period for the stragglers.
    let give_up = start + Duration::from_secs_f64(seconds) + Duration::from_secs(10);
    let mut latencies_us = Vec::with_capacity(total);
    let mut errors = 0;
    while latencies_us.len() + errors < total {
        match tokio::time::timeout_at(give_up, done_rx.recv()).await {
            Ok(Some(Some(l))) => latencies_us.push(l.as_secs_f64() * 1e6),
            Ok(Some(None)) => errors += 1,
            Ok(None) | Err(_) => break,
        }
    }
    let finished = Instant::now();
    for w in workers {
        w.abort();
    }
    errors += total - latencies_us.len() - errors;
    latencies_us.sort_by(|a, b| a.partial_cmp(b).expect("latency"));
    let pick = |p: f64| {
        if latencies_us.is_empty() {
            f64::NAN
        } else {
            latencies_us[((latencies_us.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    LoadResult {
        sent: total,
        errors,
        p50_us: pick(0.50),
        p90_us: pick(0.90),
        p99_us: pick(0.99),
        max_us: pick(1.0),
        achieved_rps: latencies_us.len() as f64 / (finished - start).as_secs_f64(),
    }
}

/// `http-max HOST:PORT PROTO SECONDS CONCURRENCY`: as many requests as
/// `CONCURRENCY` callers can make back to back for `SECONDS` (closed loop:
/// for throughput, not latency). Prints `{"completed", "errors",
/// "seconds"}`.
pub fn max(target: &str, proto: Proto, seconds: f64, concurrency: usize) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        // HTTP/1.1: a connection per caller; gRPC: two shared connections.
        let conns = match proto {
            Proto::Http1 => concurrency,
            Proto::Grpc => 2,
        };
        let mut opened = Vec::new();
        for _ in 0..conns {
            opened.extend(Conn::open(target, proto).await);
        }
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(seconds);
        let mut callers = Vec::new();
        for i in 0..concurrency {
            let Some(conn) = opened.get(i % opened.len().max(1)).cloned() else {
                break;
            };
            let target = target.to_string();
            callers.push(tokio::spawn(async move {
                let (mut conn, mut ok, mut failed) = (conn, 0u64, 0u64);
                while Instant::now() < end {
                    if conn.call(&target).await {
                        ok += 1;
                    } else {
                        failed += 1;
                        match Conn::open(&target, proto).await {
                            Some(c) => conn = c,
                            None => break,
                        }
                    }
                }
                (ok, failed)
            }));
        }
        let (mut completed, mut errors) = (0, 0);
        for c in callers {
            if let Ok((ok, failed)) = c.await {
                completed += ok;
                errors += failed;
            }
        }
        serde_json::json!({
            "completed": completed, "errors": errors,
            "seconds": start.elapsed().as_secs_f64(),
        })
    })
}

/// One client connection.
#[derive(Clone)]
pub(super) enum Conn {
    Http1(Arc<Mutex<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>>),
    Grpc(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    pub(super) async fn open(target: &str, proto: Proto) -> Option<Self> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
            .await
            .ok()?
            .ok()?;
        stream.set_nodelay(true).ok()?;
        let io = TokioIo::new(stream);
        Some(match proto {
            Proto::Http1 => {
                let (sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
                tokio::spawn(conn);
                Conn::Http1(Arc::new(Mutex::new(sender)))
            }
            Proto::Grpc => {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .ok()?;
                tokio::spawn(conn);
                Conn::Grpc(sender)
            }
        })
    }

    /// One request; true when it succeeded (200 and the whole body; for
    /// gRPC also `grpc-status: 0` in the trailers) within 5 s.
    pub(super) async fn call(&mut self, target: &str) -> bool {
        let exchange = async {
            match self {
                Conn::Http1(sender) => {
                    let mut sender = sender.lock().await;
                    sender.ready().await.ok()?;
                    let req = hyper::Request::get("/")
                        .header(hyper::header::HOST, target)
                        .body(Empty::<Bytes>::new())
                        .ok()?;
                    let resp = sender.send_request(req).await.ok()?;
                    let ok = resp.status() == hyper::StatusCode::OK;
                    resp.into_body().collect().await.ok()?;
                    Some(ok)
                }
                Conn::Grpc(sender) => {
                    sender.ready().await.ok()?;
                    let req =
                        hyper::Request::post(format!("http://{target}/weft.bench.Echo/Unary"))
                            .header(hyper::header::CONTENT_TYPE, "application/grpc")
                            .header("te", "trailers")
                            .body(Full::new(grpc_frame()))
                            .ok()?;
                    let resp = sender.send_request(req).await.ok()?;
                    let ok = resp.status() == hyper::StatusCode::OK;
                    let collected = resp.into_body().collect().await.ok()?;
                    let status = collected
                        .trailers()
                        .and_then(|t| t.get("grpc-status"))
                        .map(|v| v.as_bytes() == b"0");
                    Some(ok && status == Some(true) && collected.to_bytes().len() == 69)
                }
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), exchange).await,
            Ok(Some(true))
        )
    }
}
