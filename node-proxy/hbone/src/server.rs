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
use std::time::Duration;
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
        discard_until_closed(self.body);
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
        discard_until_closed(self.body);
    }
}

/// How long a refused stream waits for the client to close its side.
const REFUSED_DRAIN: Duration = Duration::from_secs(10);

/// Reads and discards what the client sends on a refused stream until the
/// client ends or resets it (the source proxy resets it as soon as it has
/// the refusal), for [`REFUSED_DRAIN`] at most.
///
/// Dropped unread, the stream would be reset at once while the client's
/// first bytes, sent right behind the CONNECT, may still be on their way.
/// h2 holds a DATA frame for a stream it reset against the connection's
/// lifetime limits meant for abusive clients: answered with
/// RST_STREAM(STREAM_CLOSED) once it forgot the stream (1024 of those),
/// ignored while it remembers it but its framing overhead taken from the
/// small-DATA budget for good (about 33 000 frames of 5 bytes). Enough
/// refused tunnels whose first bytes came late would end the HBONE
/// connection, and every tunnel on it, with GOAWAY ENHANCE_YOUR_CALM.
/// Read, the frames cost nothing.
fn discard_until_closed(mut body: RecvStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSED_DRAIN, async {
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
            }
        })
        .await;
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// An HTTP/2 frame: type, flags, stream, payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    async fn read_frame(io: &mut DuplexStream) -> (u8, u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await.expect("a frame");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        io.read_exact(&mut payload).await.expect("its payload");
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        (head[3], head[4], stream, payload)
    }

    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const PING: u8 = 6;
    const GOAWAY: u8 = 7;
    const END_STREAM: u8 = 0x1;
    const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const CANCEL: u32 = 0x8;

    /// A source proxy's CONNECTs, each refused by the destination's policy
    /// with the client's first bytes arriving only after the refusal (sent
    /// right behind the CONNECT, still on their way when the destination
    /// decided), then reset by the source as it does once it has the
    /// refusal. Written frame by frame so that the bytes are late every
    /// time. The connection refuses them all and stays up: no GOAWAY, and
    /// it still answers a PING after the last.
    #[tokio::test]
    async fn refused_tunnels_whose_first_bytes_come_late_do_not_end_the_connection() {
        // Past h2's 1024 locally reset streams and its 50 remembered ones.
        const TUNNELS: u32 = 1500;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let decided = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = decided.clone();
        let served = tokio::spawn(serve_connection(
            server,
            move |request: HboneRequest| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { request.reject(StatusCode::FORBIDDEN) }
            },
            std::future::pending(),
        ));
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        client.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        // HPACK, literal fields with a static table name: :method (2)
        // CONNECT, :authority (1) 10.0.0.1:9000.
        let mut connect = vec![0x02, 7];
        connect.extend_from_slice(b"CONNECT");
        connect.extend_from_slice(&[0x01, 13]);
        connect.extend_from_slice(b"10.0.0.1:9000");
        for i in 0..TUNNELS {
            let id = 2 * i + 1;
            client
                .write_all(&frame(HEADERS, END_HEADERS, id, &connect))
                .await
                .unwrap();
            // Until the refusal.
            loop {
                let (kind, flags, stream, payload) = read_frame(&mut client).await;
                match kind {
                    SETTINGS if flags & ACK == 0 => client
                        .write_all(&frame(SETTINGS, ACK, 0, &[]))
                        .await
                        .unwrap(),
                    GOAWAY => panic!(
                        "GOAWAY after {i} refused tunnels: {:?}",
                        String::from_utf8_lossy(&payload[8..])
                    ),
                    HEADERS if stream == id => {
                        assert_eq!(flags & END_STREAM, END_STREAM, "refused, ended");
                        break;
                    }
                    _ => {}
                }
            }
            client
                .write_all(&frame(DATA, 0, id, b"ping\n"))
                .await
                .unwrap();
            client
                .write_all(&frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()))
                .await
                .unwrap();
        }
        client.write_all(&frame(PING, 0, 0, &[7; 8])).await.unwrap();
        loop {
            let (kind, flags, _, payload) = read_frame(&mut client).await;
            match kind {
                GOAWAY => panic!(
                    "GOAWAY after the last refused tunnel: {:?}",
                    String::from_utf8_lossy(&payload[8..])
                ),
                PING if flags & ACK == ACK => break,
                _ => {}
            }
        }
        assert_eq!(
            decided.load(std::sync::atomic::Ordering::SeqCst),
            TUNNELS,
            "each decided"
        );
        assert!(!served.is_finished(), "the connection is up");
    }
}
