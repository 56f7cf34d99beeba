//! HBONE: how node proxies carry a pod's TCP connection to another node.
//!
//! Each connection becomes one HTTP/2 `CONNECT` stream (`:authority` =
//! `podIP:port`) on a TLS 1.3 mutual-TLS connection to the destination pod's
//! `podIP:15008`. This is the protocol Istio's ztunnel speaks, so the wire
//! format is one operators can already inspect; unlike a TLS connection per
//! TCP connection, many streams share one handshake.
//!
//! - [`stream`]: one CONNECT stream as `AsyncRead + AsyncWrite`;
//! - [`server`]: accepting streams on 15008;
//! - [`pool`]: client connections, reused per source pod and destination.

pub mod pool;
pub mod server;
pub mod stream;

pub use pool::{HbonePool, PoolConfig};
pub use server::{HboneRequest, connect_target, serve_connection};
pub use stream::H2Stream;

/// The port every enrolled pod's HBONE listener is on.
pub const HBONE_PORT: u16 = 15008;

/// CONNECT request header in which the source node proxy tells the
/// destination what the stream carries (`http/1.1`, `h2` or `opaque`, as
/// its protocol detection found), so the destination does not detect again
/// (a server-speaks-first protocol would otherwise wait out the detection
/// timeout twice). Absent from older proxies: the destination detects.
pub const PROTOCOL_HEADER: &str = "weft-protocol";

/// Header of a node proxy's own answer saying that nothing of the request
/// (or tunnel) reached the application: the destination proxy could not
/// connect to it (refused, unreachable, the pod is gone). Its value is the
/// reason (`connect-failed`). On a CONNECT refusal, and on a response to a
/// request carried inside a tunnel; the source proxy, which trusts it only
/// from an authenticated peer proxy, sends the request to another endpoint
/// whatever its method, and strips the header. A destination proxy strips
/// it from the application's responses, so an application cannot forge it.
pub const UNPROCESSED_HEADER: &str = "weft-unprocessed";

/// ALPN protocol of a connection to `podIP:15008` that carries HTTP/2
/// requests themselves rather than CONNECT tunnels: a source node proxy
/// that has already taken its client's HTTP/2 (or gRPC) apart sends each
/// request as one stream on such a connection, instead of an HTTP/2
/// connection inside a CONNECT stream inside the HBONE connection (one
/// framing and one task hand-off fewer on each node). Same mutual TLS as
/// HBONE. A destination that does not offer it (an older proxy) fails the
/// handshake with `no_application_protocol`, and the source tunnels.
pub const REQUESTS_ALPN: &[u8] = b"weft-requests-h2";

/// ALPN protocol of an HBONE (CONNECT) connection.
pub const HBONE_ALPN: &[u8] = b"h2";

/// Header naming a request's target (`podIP:port`) on a
/// [`REQUESTS_ALPN`] connection: the CONNECT authority of a tunnel. Set by
/// the source proxy, trusted only from an authenticated peer proxy, and
/// removed before the application sees the request.
pub const TARGET_HEADER: &str = "weft-target";

/// The [`UNPROCESSED_HEADER`] reason: the application could not be
/// connected to.
pub const CONNECT_FAILED: &str = "connect-failed";

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(
        "cannot reach the destination node proxy at {addr}: {source} (maybe a NetworkPolicy is blocking port 15008)"
    )]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {addr} failed: {source}")]
    H2 {
        addr: std::net::SocketAddr,
        source: h2::Error,
        /// The peer certainly did not process the stream (it was not
        /// sent, or h2 says the peer did not take it). Otherwise the
        /// destination may have decided it, and delivered what was sent
        /// with it ([`HbonePool::open_sending`]).
        unprocessed: bool,
    },
    #[error("the destination node proxy refused the tunnel to {target}: HTTP {status}{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Refused {
        target: std::net::SocketAddr,
        status: http::StatusCode,
        /// [`UNPROCESSED_HEADER`]'s value, if the refusal carried it.
        reason: Option<String>,
    },
}
