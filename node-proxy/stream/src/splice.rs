//! Joining two byte streams (the pod's socket and the tunnel or upstream
//! socket), with half-close and byte counts.
//!
//! `tokio::io::copy_bidirectional` does the copying and the half-close (EOF
//! on one side becomes `shutdown()` on the other, so a client that sends a
//! request and then half-closes still gets its whole response). It loses
//! the byte counts when a side fails, though, and metrics must count the
//! bytes of failed connections too; so each side is wrapped in a counter.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What crossed a spliced connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from `a` (and written towards `b`).
    pub a_to_b: u64,
    /// Bytes read from `b` (and written towards `a`).
    pub b_to_a: u64,
}

/// Copies both ways until both directions have ended. Returns the bytes
/// moved, and the first error if one side failed (reset, broken pipe).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> (Transferred, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_until(a, b, std::future::pending()).await
}

/// [`splice`], cut short when `stop` completes (a policy change revoked the
/// connection): then the error is `ConnectionAborted` and the caller closes
/// both sides. The bytes moved until then are still counted.
pub async fn splice_until<A, B>(
    a: &mut A,
    b: &mut B,
    stop: impl std::future::Future<Output = ()>,
) -> (Transferred, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (from_a, from_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut a = Counted::new(a, from_a.clone());
    let mut b = Counted::new(b, from_b.clone());
    let error = tokio::select! {
        result = tokio::io::copy_bidirectional(&mut a, &mut b) => result.err(),
        () = stop => Some(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by the proxy: no longer allowed by policy",
        )),
    };
    let moved = Transferred {
        a_to_b: from_a.load(Ordering::Relaxed),
        b_to_a: from_b.load(Ordering::Relaxed),
    };
    (moved, error)
}

/// Owns (or borrows: `&mut T` is a stream too) a stream and counts the
/// bytes read from it into a shared counter, which the caller can read while
/// the stream is in use and after it failed.
pub struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, read: Arc<AtomicU64>) -> Self {
        Self { inner, read }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            self.read
                .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A real TCP pair: (accepted side, connecting side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, c)
    }

    #[tokio::test]
    async fn counts_bytes_and_keeps_half_close() {
        // client <-> (a) proxy (b) <-> server
        let (mut a, mut client) = pair().await;
        let (mut server, mut b) = pair().await;
        let proxy = tokio::spawn(async move { splice(&mut a, &mut b).await });

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap(); // half-close: no more requests
        let mut req = Vec::new();
        server.read_to_end(&mut req).await.unwrap(); // EOF reached the server
        assert_eq!(req, b"request");
        const RESPONSE: &[u8] = b"a longer response, sent after the client's EOF";
        server.write_all(RESPONSE).await.unwrap();
        drop(server);
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        assert_eq!(resp, RESPONSE);

        let (moved, err) = proxy.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            moved,
            Transferred {
                a_to_b: 7,
                b_to_a: RESPONSE.len() as u64
            }
        );
    }

    #[tokio::test]
    async fn counts_bytes_of_a_reset_connection() {
        let (mut a, mut client) = pair().await;
        let (mut server, mut b) = pair().await;
        let proxy = tokio::spawn(async move { splice(&mut a, &mut b).await });
        client.write_all(&[7u8; 5000]).await.unwrap();
        // The server has everything the client sent (so the count is
        // known), then aborts: SO_LINGER 0 makes close send a RST.
        let mut got = vec![0u8; 5000];
        server.read_exact(&mut got).await.unwrap();
        crate::reset(server);
        let (moved, err) = tokio::time::timeout(std::time::Duration::from_secs(5), proxy)
            .await
            .unwrap()
            .unwrap();
        assert!(err.is_some(), "a reset is reported");
        assert_eq!(moved.a_to_b, 5000);
    }
}
