//! The node proxy's HTTP endpoints in the node's own namespace:
//! `:15020/metrics` (Prometheus), `:15021/ready` and `/live` (kubelet
//! probes), and `127.0.0.1:15000/config_dump` (what the proxy believes: pods,
//! certificates, the destination view — for `kubectl weft` and humans).
//!
//! Plain HTTP/1.1 on purpose: these are scraped and probed by tools that
//! speak nothing else, and they carry no workload traffic.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const METRICS_PORT: u16 = 15020;
pub const HEALTH_PORT: u16 = 15021;
pub const ADMIN_PORT: u16 = 15000;

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.parse().expect("valid content type"),
    );
    r
}

fn not_found() -> Reply {
    reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

/// A listener for one of these endpoints, with SO_REUSEPORT: a rollout's
/// new proxy binds it while the old one still serves it (both run as
/// root; the kernel groups only sockets of one user), and the old one's
/// close at SIGTERM leaves the new one answering with no gap.
pub fn bind_shared(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Serves `handle` on every connection of `listener` until `shutdown`.
pub async fn serve<F>(listener: TcpListener, handle: F, shutdown: impl Future<Output = ()>)
where
    F: Fn(Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `/metrics` in the OpenMetrics text format (Prometheus reads it).
pub fn metrics_handler(
    registry: Arc<Registry>,
) -> impl Fn(Request<Incoming>) -> Reply + Send + Sync + 'static {
    move |req| {
        if req.method() != Method::GET || req.uri().path() != "/metrics" {
            return not_found();
        }
        // Prometheus asks for OpenMetrics; anything else (curl, promtool,
        // older scrapers) gets the classic text format.
        let openmetrics = req.headers().get_all(http::header::ACCEPT).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.contains("application/openmetrics-text"))
        });
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, &registry) {
            Ok(()) if openmetrics => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Ok(()) => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                openmetrics_to_text(&text),
            ),
            Err(_) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "encoding metrics failed\n",
            ),
        }
    }
}

/// OpenMetrics to the Prometheus text format (0.0.4): a counter family is
/// named without `_total` in OpenMetrics and with it in the text format;
/// `# UNIT` and `# EOF` do not exist there.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line).trim_end());
        out.push('\n');
    }
    out
}

/// `/ready` answers 200 once `ready` is true (the proxy has a destination
/// view and certificates for its pods), 503 before; `/live` answers 200
/// while the process serves at all.
pub fn health_handler(
    ready: watch::Receiver<bool>,
) -> impl Fn(Request<Incoming>) -> Reply + Send + Sync + 'static {
    move |req| match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" if *ready.borrow() => reply(StatusCode::OK, "text/plain", "ready\n"),
        "/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => not_found(),
    }
}

/// `/config_dump`: a JSON snapshot produced on each request.
pub fn admin_handler<F>(dump: F) -> impl Fn(Request<Incoming>) -> Reply + Send + Sync + 'static
where
    F: Fn() -> serde_json::Value + Send + Sync + 'static,
{
    move |req| match req.uri().path() {
        "/config_dump" => {
            let body = serde_json::to_vec_pretty(&dump()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        _ => not_found(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn openmetrics_counters_get_their_total_name_in_the_text_format() {
        let om = "# HELP a_total_things Things.\n# TYPE a_total_things counter\na_total_things_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 1\n# EOF\n";
        assert_eq!(
            super::openmetrics_to_text(om),
            "# HELP a_total_things_total Things.\n# TYPE a_total_things_total counter\na_total_things_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (
            status,
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        )
    }

    async fn start<F>(handle: F) -> std::net::SocketAddr
    where
        F: Fn(Request<Incoming>) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, handle, std::future::pending()));
        addr
    }

    #[tokio::test]
    async fn ready_follows_the_watch() {
        let (tx, rx) = watch::channel(false);
        let addr = start(health_handler(rx)).await;
        assert_eq!(get(addr, "/ready").await.0, 503);
        assert_eq!(get(addr, "/live").await.0, 200);
        tx.send(true).unwrap();
        assert_eq!(get(addr, "/ready").await, (200, "ready\n".into()));
        assert_eq!(get(addr, "/other").await.0, 404);
    }

    #[tokio::test]
    async fn metrics_and_config_dump_are_served() {
        let mut registry = Registry::default();
        let tcp = crate::telemetry::TcpMetrics::default();
        tcp.register(&mut registry);
        let _open = tcp.open(crate::telemetry::TcpLabels {
            reporter: crate::telemetry::Reporter::Destination,
            peers: crate::telemetry::Peers {
                source_workload: String::new(),
                source_namespace: String::new(),
                source_principal: String::new(),
                destination_workload: "server".into(),
                destination_namespace: "demo".into(),
                destination_principal: String::new(),
                destination_service: String::new(),
            },
            connection_security_policy: crate::telemetry::SecurityPolicy::None,
        });
        let addr = start(metrics_handler(Arc::new(registry))).await;
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        // Without `Accept: application/openmetrics-text`: the text format.
        assert!(
            body.contains("# TYPE weft_tcp_connections_opened_total counter"),
            "{body}"
        );
        assert!(
            body.contains("weft_tcp_connections_opened_total{reporter=\"destination\""),
            "{body}"
        );
        assert!(!body.contains("# EOF"), "{body}");

        let addr = start(admin_handler(
            || serde_json::json!({"pods": ["demo/client"]}),
        ))
        .await;
        let (status, body) = get(addr, "/config_dump").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["pods"][0], "demo/client");
    }
}
