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
//! - [`path`]: the one normal spelling of a request's path.
//!
//! Layering: above `transport`, `policy`, `telemetry` and `state`; below
//! `proxy`. Serving a pod's connection (what is routed where, who may send
//! what) is `proxy::inbound` and `proxy::outbound`.

pub mod app_connection;
pub mod body;
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

/// How many streams an HTTP/2 connection may reset because of its peer
/// before h2 gives up on the whole connection (`None`: no limit).
///
/// h2 counts, over a connection's whole life, every stream it resets
/// because of what the peer did, and after 1024 sends GOAWAY
/// (ENHANCE_YOUR_CALM, "too_many_internal_resets") and fails every stream
/// on it: a defence against clients that make a server generate resets
/// (h2 #737). But a proxy produces such resets in normal traffic: when an
/// application answers before reading the whole request body (gRPC and
/// HTTP servers may), the proxy drops the rest of the body, and the peer's
/// DATA already in flight for that stream is an "error" to h2 (h2 #856).
/// Found by `cargo xtask bench mesh`: 38 % of gRPC calls through the mesh
/// failed at 500 calls/s once a connection had crossed the limit.
///
/// So: no limit where the peer is another node proxy (authenticated by
/// mTLS), the local application, or a local pod the proxy serves; h2's
/// default for plaintext clients from outside the mesh (15006), the only
/// untrusted peers.
pub fn local_error_reset_limit(trusted_peer: bool) -> Option<usize> {
    (!trusted_peer).then_some(1024)
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
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        out = conn.as_mut() => return out,
        () = draining.signaled() => {}
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
