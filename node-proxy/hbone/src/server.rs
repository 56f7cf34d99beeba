//! Accepting HBONE streams on one (already TLS-authenticated) connection.
//!
//! What a stream may reach is not decided here: every CONNECT is handed to
//! the caller as an [`HboneRequest`], which accepts it (200, then bytes) or
//! rejects it with a status. The inbound proxy decides from the target and
//! the peer's verified identity (and, with the policy issue, authorization).

use crate::stream::H2Stream;
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Response, StatusCode};
use std::future::Future;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite};

/// HTTP/2 settings shared by both ends: windows large enough that one
/// stream can fill a fast link (the 64 KiB default caps a stream at about
/// 64 KiB per round trip), and a stream limit per connection.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// The largest DATA frame a peer may send us (HTTP/2's default is 16 KiB).
/// Every frame the sender writes is a write into TLS (h2 flushes after each
/// frame larger than a few hundred bytes) and a system call; and a 16 KiB
/// payload plus its 9-byte header made two TLS records, one of 9 bytes.
/// 256 KiB less the header: a full frame is 16 full records.
pub(crate) const MAX_FRAME_SIZE: u32 = 256 * 1024 - 9;

/// One CONNECT stream waiting for the proxy's decision.
pub struct HboneRequest {
    pub target: SocketAddr,
    /// What the source proxy says the stream carries
    /// ([`super::PROTOCOL_HEADER`]), if it said.
    pub protocol: Option<String>,
    respond: SendResponse<Bytes>,
    body: RecvStream,
}

impl HboneRequest {
    /// Answers 200 and returns the stream to splice with the application.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(H2Stream::new(send, self.body).with_protocol(self.protocol))
    }

    /// The next DATA of the stream before it is answered (tests look at
    /// what arrives ahead of the answer).
    #[cfg(test)]
    pub(crate) async fn data_before_answer(&mut self) -> Option<Bytes> {
        let data = self.body.data().await?.ok()?;
        let _ = self.body.flow_control().release_capacity(data.len());
        Some(data)
    }

    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let mut response = Response::new(());
        *response.status_mut() = status;
        let _ = self.respond.send_response(response, true);
    }

    /// Answers 503 saying that the application could not be reached: no
    /// byte of the stream reached it ([`super::UNPROCESSED_HEADER`]).
    pub fn reject_unprocessed(mut self) {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response.headers_mut().insert(
            super::UNPROCESSED_HEADER,
            http::HeaderValue::from_static(super::CONNECT_FAILED),
        );
        let _ = self.respond.send_response(response, true);
    }
}

/// Serves every stream of one connection: each valid CONNECT is passed to
/// `handle` on its own task. Returns when the peer closes the connection, or
/// after `shutdown` completes and the open streams have finished (the peer
/// gets a GOAWAY and opens new streams elsewhere).
pub async fn serve_connection<IO, F, Fut>(
    io: IO,
    handle: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(HboneRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_frame_size(MAX_FRAME_SIZE)
        .handshake::<_, Bytes>(io)
        .await?;
    tokio::pin!(shutdown);
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut shutdown, if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { return Ok(()) };
        let (request, mut respond) = next?;
        let status = |s: StatusCode| {
            let mut r = Response::new(());
            *r.status_mut() = s;
            r
        };
        if request.method() != Method::CONNECT {
            let _ = respond.send_response(status(StatusCode::METHOD_NOT_ALLOWED), true);
            continue;
        }
        let Some(target) = connect_target(request.uri()) else {
            let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
            continue;
        };
        let protocol = request
            .headers()
            .get(super::PROTOCOL_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = request.into_body();
        tokio::spawn(handle(HboneRequest {
            target,
            protocol,
            respond,
            body,
        }));
    }
}

/// The `ip:port` a CONNECT request's URI names. HBONE targets are always
/// an address; names are resolved by the sending proxy, never here.
pub fn connect_target(uri: &http::Uri) -> Option<SocketAddr> {
    uri.authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
}
