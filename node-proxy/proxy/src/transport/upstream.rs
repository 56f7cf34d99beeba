//! The upstream of a pod's connection (or of one HTTP connection): an
//! HBONE stream to an enrolled workload, or TCP from the pod.

use super::TlsSocket;
use super::pod::LocalPod;
use super::tunnel::{RequestConnections, TunnelKey};
use crate::state::Route;
use bytes::Bytes;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use weft_hbone::{H2Stream, HboneError, HbonePool};
use weft_stream::Protocol;

/// Where a pod's connection (or, with L7, one HTTP connection) goes.
pub enum Upstream {
    Hbone(H2Stream),
    Plain(TcpStream),
    /// A mutual-TLS connection to a peer node proxy that takes HTTP/2
    /// requests as streams of their own ([`RequestConnections`]).
    Requests {
        tls: Box<tokio_rustls::client::TlsStream<TlsSocket>>,
        /// The peer's identity holds until then.
        expires: Option<std::time::SystemTime>,
    },
}

impl Upstream {
    /// Until when the connection may carry new requests: the peer's
    /// certificate expires (only for [`Upstream::Requests`]; an HBONE
    /// stream's connection is bounded by its pool).
    pub fn expires(&self) -> Option<std::time::SystemTime> {
        match self {
            Upstream::Requests { expires, .. } => *expires,
            _ => None,
        }
    }

    /// Whether requests on this upstream must name their target
    /// ([`weft_hbone::TARGET_HEADER`]).
    pub fn names_targets(&self) -> bool {
        matches!(self, Upstream::Requests { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Hbone(#[from] HboneError),
    #[error("cannot connect to {target} from the pod: {source}")]
    Tcp {
        target: SocketAddr,
        source: std::io::Error,
    },
    /// Connected, but writing the client's first bytes failed: the
    /// application may have read some of them.
    #[error(
        "connected to {target} from the pod, then sending the client's first bytes failed: {source}"
    )]
    FirstBytes {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "pod {pod} has no certificate identity: an mTLS tunnel needs one (is the node proxy connected to the control plane?)"
    )]
    NoIdentity { pod: String },
}

impl ConnectError {
    /// Whether the first bytes sent with the opening
    /// ([`open_upstream_sending`]) may have reached the application: the
    /// destination proxy may have processed the CONNECT (the HBONE
    /// connection ended, or the stream was reset, before its answer), or
    /// the plain connection failed while they were written. Sending them
    /// to another endpoint then could deliver them twice.
    pub fn may_have_delivered(&self) -> bool {
        match self {
            ConnectError::Hbone(HboneError::H2 { unprocessed, .. }) => !unprocessed,
            ConnectError::FirstBytes { .. } => true,
            ConnectError::Hbone(_) | ConnectError::Tcp { .. } | ConnectError::NoIdentity { .. } => {
                false
            }
        }
    }
}

/// Opens the transport for `route`: an HBONE stream (pooled TLS connection)
/// from the pod to an enrolled workload, telling the destination that it
/// carries `protocol`; else TCP from the pod's namespace.
pub async fn open_upstream(
    route: &Route,
    pod: &Arc<LocalPod>,
    tunnels: Option<&HbonePool<TunnelKey>>,
    protocol: Protocol,
) -> Result<Upstream, ConnectError> {
    open_upstream_sending(route, pod, tunnels, protocol, Bytes::new()).await
}

/// Like [`open_upstream`], sending `first` (bytes the client already
/// wrote) as part of opening: behind the CONNECT of an HBONE stream,
/// without waiting for its answer ([`HbonePool::open_sending`]); right
/// after the connect of plain TCP. On an error, none of them reached the
/// application unless [`ConnectError::may_have_delivered`] says so.
pub async fn open_upstream_sending(
    route: &Route,
    pod: &Arc<LocalPod>,
    tunnels: Option<&HbonePool<TunnelKey>>,
    protocol: Protocol,
    first: Bytes,
) -> Result<Upstream, ConnectError> {
    let target = route.target();
    match route {
        Route::Hbone {
            tunnel, identity, ..
        } => match (tunnels, &pod.identity) {
            (Some(pool), Some(source)) => {
                let key = TunnelKey {
                    pod: pod.clone(),
                    source: source.clone(),
                    destination: identity.clone(),
                    tunnel: *tunnel,
                };
                let stream = pool
                    .open_sending(key, *tunnel, target, Some(protocol.token()), first)
                    .await?;
                Ok(Upstream::Hbone(stream))
            }
            _ => Err(ConnectError::NoIdentity { pod: pod.key() }),
        },
        Route::Plain { .. } => {
            let tcp = |source| ConnectError::Tcp { target, source };
            let mut stream = pod.connect(target).await.map_err(tcp)?;
            if !first.is_empty() {
                stream
                    .write_all(&first)
                    .await
                    .map_err(|source| ConnectError::FirstBytes { target, source })?;
            }
            Ok(Upstream::Plain(stream))
        }
    }
}

/// The upstream of a pod's HTTP/2 connection (its requests): to an
/// enrolled workload whose node proxy takes requests without a tunnel, a
/// connection of that kind; otherwise as [`open_upstream`].
pub async fn open_requests_upstream(
    route: &Route,
    pod: &Arc<LocalPod>,
    tunnels: Option<&HbonePool<TunnelKey>>,
    requests: Option<&RequestConnections>,
) -> Result<Upstream, ConnectError> {
    if let (
        Route::Hbone {
            tunnel, identity, ..
        },
        Some(requests),
        Some(source),
    ) = (route, requests, &pod.identity)
    {
        let key = TunnelKey {
            pod: pod.clone(),
            source: source.clone(),
            destination: identity.clone(),
            tunnel: *tunnel,
        };
        if let Some(c) = requests.open(&key).await? {
            return Ok(Upstream::Requests {
                tls: Box::new(c.tls),
                expires: c.expires,
            });
        }
    }
    open_upstream(route, pod, tunnels, Protocol::Http2).await
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            // A pooled connection to a server outside the mesh: its
            // responses may come in pieces too.
            Upstream::Plain(s) => weft_stream::quickack::poll_read(s, cx, buf),
            Upstream::Requests { tls, .. } => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Requests { tls, .. } => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Requests { tls, .. } => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
            // Not vectored (see is_write_vectored): the first buffer.
            other => {
                let buf = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &**b);
                Pin::new(other).poll_write(cx, buf)
            }
        }
    }

    /// TLS takes the HTTP/2 frames' pieces in one call; the others are
    /// written flat, as before.
    fn is_write_vectored(&self) -> bool {
        matches!(self, Upstream::Requests { .. })
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_flush(cx),
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Requests { tls, .. } => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Requests { tls, .. } => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the outbound proxy may do with the client's first bytes after
    /// a failed opening: send them to another endpoint only if none of
    /// them can have reached this one's application.
    #[test]
    fn the_first_bytes_go_elsewhere_only_if_they_cannot_have_been_delivered() {
        let addr: SocketAddr = "10.0.0.2:15008".parse().unwrap();
        let target: SocketAddr = "10.0.0.2:9000".parse().unwrap();
        let h2 = |unprocessed| {
            ConnectError::Hbone(HboneError::H2 {
                addr,
                source: h2::Reason::CANCEL.into(),
                unprocessed,
            })
        };
        let refused = |status| {
            ConnectError::Hbone(HboneError::Refused {
                target,
                status,
                reason: None,
            })
        };
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let cases = [
            ("tunnel ended with the CONNECT in flight", h2(false), true),
            ("CONNECT the peer did not process", h2(true), false),
            (
                "tunnel refused",
                refused(http::StatusCode::SERVICE_UNAVAILABLE),
                false,
            ),
            (
                "policy refused",
                refused(http::StatusCode::FORBIDDEN),
                false,
            ),
            (
                "no HBONE connection",
                ConnectError::Hbone(HboneError::Connect { addr, source: io() }),
                false,
            ),
            (
                "plain connect failed",
                ConnectError::Tcp {
                    target,
                    source: io(),
                },
                false,
            ),
            (
                "plain write failed",
                ConnectError::FirstBytes {
                    target,
                    source: io(),
                },
                true,
            ),
        ];
        for (case, error, delivered) in cases {
            assert_eq!(error.may_have_delivered(), delivered, "{case}: {error}");
        }
    }
}
