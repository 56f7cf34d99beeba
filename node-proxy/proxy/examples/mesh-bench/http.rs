//! The HTTP latency part of the mesh benchmark: a tiny HTTP/1.1 server and
//! an open-loop load generator, both run inside pods by re-executing this
//! example (`mesh-bench http-server PORT`, `mesh-bench http-load …`).
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
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

/// `http-server PORT`: answers every request with 200 and 64 bytes.
pub fn server(port: u16) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = match TcpListener::bind(("0.0.0.0", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("http-server: cannot listen on port {port}: {e}");
                std::process::exit(1)
            }
        };
        println!("listening on 0.0.0.0:{port}");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(&[b'x'; 64]),
                    )))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// What one load run measured (printed as one JSON line).
#[derive(Debug)]
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

/// `http-load HOST:PORT RATE SECONDS CONNECTIONS`: prints one JSON line.
pub fn load(target: &str, rate: f64, seconds: f64, connections: usize) -> LoadResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run_load(target.to_string(), rate, seconds, connections))
}

async fn run_load(target: String, rate: f64, seconds: f64, connections: usize) -> LoadResult {
    let total = (rate * seconds).round() as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    // Due times, sent as they fall due (unbounded: a backlog is latency).
    let (due_tx, due_rx) = mpsc::unbounded_channel::<Instant>();
    let due_rx = Arc::new(Mutex::new(due_rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<Duration>>();
    // Connections first, so their set-up is not in the latencies.
    let mut workers = Vec::new();
    for _ in 0..connections {
        let sender = connect(&target).await;
        let (due_rx, done_tx, target) = (due_rx.clone(), done_tx.clone(), target.clone());
        workers.push(tokio::spawn(async move {
            let mut sender = sender;
            loop {
                let Some(due) = due_rx.lock().await.recv().await else {
                    return;
                };
                let ok = match &mut sender {
                    Some(s) => request(s, &target).await,
                    None => false,
                };
                if !ok {
                    // Reconnect for the next one; this one is an error.
                    sender = connect(&target).await;
                }
                let _ = done_tx.send(ok.then(|| due.elapsed()));
            }
        }));
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

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(target: &str) -> Option<Sender> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
        .await
        .ok()?
        .ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// One GET; true when a 200 and its whole body arrived within 5 s.
async fn request(sender: &mut Sender, target: &str) -> bool {
    let exchange = async {
        sender.ready().await.ok()?;
        let req = hyper::Request::get("/")
            .header(hyper::header::HOST, target)
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let ok = resp.status() == hyper::StatusCode::OK;
        resp.into_body().collect().await.ok()?;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), exchange).await,
        Ok(Some(true))
    )
}
