//! How the proxy gets its connections: a pod's sockets (asked of a
//! [`SocketFactory`], so that connection code runs on loopback in tests),
//! HBONE tunnels to other node proxies, and the upstream a pod's connection
//! (or one HTTP connection) is carried on.
//!
//! - [`pod`]: [`LocalPod`] (a local pod and its sockets) and [`SocketFactory`];
//! - [`upstream`]: [`Upstream`], [`open_upstream`] (and [`open_upstream_sending`], the
//!   client's first bytes with it), [`ConnectError`];
//! - [`tunnel`]: the HBONE pool's key and connector (TLS with the source
//!   pod's certificate, requiring the destination's identity);
//! - [`drain`]: shutdown, one mechanism for every connection and server;
//! - [`limits`]: bounds on the connections per pod and per node;
//! - [`accept_loop`]: serving a pod's listener.
//!
//! Layering: below `http` and `proxy`; imports `state` and `telemetry`.

pub mod drain;
pub mod limits;
pub mod pod;
pub mod threads;
pub mod tunnel;
pub mod upstream;

pub use drain::{Drain, DrainWatch};
pub use limits::{ConnectionLimits, ConnectionPermit};
pub use pod::{LocalPod, SocketFactory};
pub use threads::ConnectionThreads;
pub use tunnel::{RequestConnections, TunnelKey, tunnel_connector};
pub use upstream::{
    ConnectError, Upstream, open_requests_upstream, open_upstream, open_upstream_sending,
};

use std::net::SocketAddr;

/// Bytes read from an HBONE connection's socket at a time. rustls reads
/// 4 KiB per `read_tls` (a 16 KiB record took four `recvfrom`s), so the
/// socket is read through a buffer: one system call for several records.
/// Allocated per HBONE connection (pooled, few), not per stream.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// The socket under an HBONE connection's TLS: reads buffered
/// ([`TLS_READ_BUFFER`]); writes (vectored, from rustls) pass through.
pub type TlsSocket = tokio::io::BufReader<tokio::net::TcpStream>;

/// Ciphertext rustls may hold before the socket takes it (its default is
/// 64 KiB). tokio-rustls writes what rustls holds after each part it
/// accepts, so an HTTP/2 DATA frame of 256 KiB was four `writev`s; with
/// room for a whole frame's records it is one.
pub const TLS_WRITE_BUFFER: usize = 320 * 1024;

/// Sets an established HBONE connection's TLS buffers
/// ([`TLS_WRITE_BUFFER`]).
pub fn tune_tls<D>(tls: &mut rustls::ConnectionCommon<D>) {
    tls.set_buffer_limit(Some(TLS_WRITE_BUFFER));
}

/// Wraps a connected socket for TLS ([`TlsSocket`]).
pub fn tls_socket(tcp: tokio::net::TcpStream) -> TlsSocket {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// Accepts on one of a pod's listeners until its task is aborted (the pod
/// leaves), handing each connection to `handle` on a task of its own. An
/// accept error (file descriptors exhausted, say) is logged and retried after
/// a pause rather than ending the listener: the pod would lose its traffic.
///
/// Each connection holds a watch of `drain` until its handler is done: the
/// drain at shutdown waits for it.
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    pod: &LocalPod,
    what: &'static str,
    drain: &Drain,
    mut handle: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Forward what arrives at once: with Nagle on, small writes
                // and HTTP/2 frames wait for the peer's delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                let watch = drain.watch();
                let connection = handle(stream, peer);
                tokio::spawn(async move {
                    connection.await;
                    drop(watch);
                });
            }
            Err(e) => {
                tracing::warn!(pod = %pod.key(), listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
