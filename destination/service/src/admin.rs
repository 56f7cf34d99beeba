//! The admin HTTP server: `/metrics` (Prometheus text), `/ready` (200 once
//! the first full sync has been indexed, 503 before), `/live`.

use crate::metrics::Metrics;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ready: watch::Receiver<bool>,
}

impl Admin {
    fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String, content_type: &str| {
            Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        };
        if method != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET\n".into(),
                "text/plain",
            );
        }
        match path {
            "/metrics" => text(
                StatusCode::OK,
                self.metrics.encode(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            "/ready" if *self.ready.borrow() => {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            }
            "/ready" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the first full sync of the cluster has not been indexed yet\n".into(),
                "text/plain",
            ),
            "/live" => text(StatusCode::OK, "live\n".into(), "text/plain"),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
        }
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let admin = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let response = admin.respond(req.method(), req.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_the_first_sync() {
        let (tx, ready) = watch::channel(false);
        let admin = Admin {
            metrics: Arc::new(Metrics::new()),
            ready,
        };
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            admin.respond(&Method::GET, "/live").status(),
            StatusCode::OK
        );
        tx.send_replace(true);
        assert_eq!(
            admin.respond(&Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            admin.respond(&Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        assert_eq!(
            admin.respond(&Method::POST, "/ready").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            admin.respond(&Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
    }
}
