//! HTTP machinery shared by both directions of request-level (L7)
//! proxying of HTTP/1.1, HTTP/2 and gRPC: bodies that record metrics, keep
//! a copy for retries or enforce deadlines, pooled client connections to
//! endpoints and to the local application, upgrades, and the proxy's own
//! error responses.
//!
//! - [`upstream`]: pooled HTTP client connections per endpoint;
//! - [`app_connection`]: the connection to the local application, opened
//!   again when the application closed it;
//! - [`respond`]: the one mapping from a proxy error to the HTTP or gRPC
//!   response the client gets;
//! - [`replay`]: request bodies kept (up to 64 KiB) so a retry can resend
//!   them, streamed ones and trailers included;
//! - [`grpc_peek`]: a gRPC call's status learnt before a retry decision;
//! - [`deadline`]: the request timeout applied to the response body;
//! - [`upgrade`]: HTTP/1.1 upgrades spliced after a 101, tracked;
//! - [`body`]: the response body that records metrics when it ends;
//! - [`connection_tasks`]: what hyper starts for an HTTP/2 connection, run
//!   on the connection's task;
//! - [`corked_io`]: an HTTP/2 client connection's writes held to the end of
//!   its task's poll, so that a request's HEADERS and DATA leave together;
//! - [`path`]: the one normal spelling of a request's path.
//!
//! Layering: above `transport`, `policy`, `telemetry` and `state`; below
//! `proxy`. Serving a pod's connection (what is routed where, who may send
//! what) is `proxy::inbound` and `proxy::outbound`.

pub mod app_connection;
pub mod body;
pub mod client_body;
pub mod connection_tasks;
pub mod corked_io;
pub mod deadline;
pub mod grpc_peek;
pub mod path;
pub mod replay;
pub mod respond;
pub mod upgrade;
pub mod upstream;

pub use upstream::UpstreamPool;

use crate::transport::Drain;
use std::future::Future;
use std::pin::Pin;

/// How many streams a client of an HTTP/2 connection the proxy serves may
/// make it reset (h2 counts, over the connection's life, the streams it
/// resets because of what the peer sent) before the connection is closed
/// with GOAWAY (ENHANCE_YOUR_CALM): h2's default, the defence against
/// clients that make a server reset streams while their requests go on
/// working (h2 #737, "MadeYouReset"). Normal proxying does not produce such
/// resets: a request body the proxy no longer needs is read to its end
/// ([`client_body`]). The same for every client: pods, peer node proxies,
/// clients outside the mesh.
pub const LOCAL_ERROR_RESET_LIMIT: Option<usize> = Some(1024);

/// Counts and logs an HTTP/2 server connection that ended because its
/// client made the proxy reset too many streams; `who` names the client
/// for the log.
pub fn note_reset_flood(
    result: &Result<(), hyper::Error>,
    metrics: &crate::telemetry::RequestMetrics,
    reporter: crate::telemetry::Reporter,
    who: impl FnOnce() -> String,
) {
    let Err(e) = result else { return };
    if !is_reset_flood(e) {
        return;
    }
    metrics.reset_flood(reporter);
    tracing::warn!(
        client = %who(),
        limit = LOCAL_ERROR_RESET_LIMIT.unwrap_or_default(),
        "closed an HTTP/2 connection whose client made the proxy reset too many streams \
         (protocol errors on its streams); see weft_http2_reset_floods_total"
    );
}

/// Whether a connection error is h2's GOAWAY for too many locally caused
/// resets.
fn is_reset_flood(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away()
                && h2.is_library()
                && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = err.source();
    }
    false
}

/// Drives an HTTP server connection; when the proxy starts draining
/// (SIGTERM), asks it to finish gracefully (`shutdown`: hyper's
/// `graceful_shutdown`, i.e. GOAWAY for HTTP/2, `Connection: close` after
/// the request in flight for HTTP/1.1) and waits for that.
pub async fn serve_until_drained<C: Future>(
    conn: C,
    drain: &Drain,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    let mut draining = drain.watch();
    serve_until(conn, draining.signaled(), shutdown).await
}

/// Drives an HTTP server connection; once `stop` completes, asks it to
/// finish gracefully (`shutdown`, as [`serve_until_drained`]) and waits
/// for that.
pub async fn serve_until<C: Future>(
    conn: C,
    stop: impl Future<Output = ()>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        out = conn.as_mut() => return out,
        () = stop => {}
    }
    shutdown(conn.as_mut());
    conn.await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hyper_util::rt::TokioIo;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn draining_ends_an_idle_keep_alive_connection() {
        let (mut client, server_io) = tokio::io::duplex(4096);
        let drain = Drain::default();
        let service = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), service);
        let server = serve_until_drained(conn, &drain, |c| c.graceful_shutdown());
        let client = async {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"ok") {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed before the response");
                seen.extend_from_slice(&buf[..n]);
            }
            // Kept alive until the proxy drains; then closed.
            drain.start();
            let n = client.read(&mut buf).await.unwrap();
            assert_eq!(n, 0, "EOF after the drain");
        };
        let (served, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(server, client)
        })
        .await
        .expect("the connection ended after the drain");
        served.unwrap();
    }
}
