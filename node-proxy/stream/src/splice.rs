//! Joining two byte streams (the pod's socket and the tunnel or upstream
//! socket), with half-close and byte counts.
//!
//! EOF on one side becomes `shutdown()` on the other (half-close), so a
//! client that sends a request and then half-closes still gets its whole
//! response; the first error ends both directions. Metrics must count the
//! bytes of failed connections too, so each side is wrapped in a counter.
//!
//! The copy is `tokio::io::copy_bidirectional`'s, with a buffer per
//! direction that grows: it starts at [`BUFFER_MIN`] and doubles, up to
//! [`BUFFER_MAX`], each time a read fills it. A request-sized connection
//! keeps a small buffer; a bulk transfer gets large chunks, and on an HBONE
//! stream each chunk is one DATA frame and one write into TLS: with
//! tokio's fixed 8 KiB, the tunnel's cost per byte was mostly cost per
//! chunk (docs/benchmarks.md, issue #18).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A direction's first buffer (tokio's `copy` uses 8 KiB throughout).
pub const BUFFER_MIN: usize = 16 * 1024;
/// The largest a direction's buffer grows to.
pub const BUFFER_MAX: usize = 256 * 1024;

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
        result = copy_bidirectional(&mut a, &mut b) => result.err(),
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

/// Both directions until both have ended (each writer shut down after its
/// reader's EOF), or the first error.
async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    std::future::poll_fn(|cx| {
        let ab = a_to_b.poll(cx, &mut *a, &mut *b)?;
        let ba = b_to_a.poll(cx, &mut *b, &mut *a)?;
        if ab.is_ready() && ba.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction of a copy: a growing buffer, what of it is still to be
/// written, and whether the reader ended.
#[derive(Default)]
struct Direction {
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    shut_down: bool,
}

impl Direction {
    /// Copies until `from`'s EOF, then shuts `to` down (half-close).
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.shut_down {
                return Poll::Ready(Ok(()));
            }
            if self.pos == self.cap && !self.read_done {
                if self.buf.is_empty() {
                    self.buf = vec![0; BUFFER_MIN];
                } else if self.cap == self.buf.len() && self.buf.len() < BUFFER_MAX {
                    // The last read filled the buffer: more is coming.
                    self.buf.resize(self.buf.len() * 2, 0);
                }
                let mut read = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        self.pos = 0;
                        self.cap = read.filled().len();
                        self.read_done = self.cap == 0;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read now: what was written goes out.
                        if self.need_flush {
                            std::task::ready!(Pin::new(&mut *to).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = std::task::ready!(
                    Pin::new(&mut *to).poll_write(cx, &self.buf[self.pos..self.cap])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.read_done {
                std::task::ready!(Pin::new(&mut *to).poll_flush(cx))?;
                std::task::ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.shut_down = true;
                // The buffer is not needed while the other way goes on.
                self.buf = Vec::new();
            }
        }
    }
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
    async fn a_bulk_transfer_crosses_intact_both_ways_as_the_buffers_grow() {
        let (mut a, mut client) = pair().await;
        let (mut server, mut b) = pair().await;
        let proxy = tokio::spawn(async move { splice(&mut a, &mut b).await });
        // Several times the largest buffer, in a pattern that shows a
        // reordered or repeated chunk.
        let data: Vec<u8> = (0..3 * BUFFER_MAX + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let up = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "client to server intact");
        server.write_all(&got).await.unwrap();
        drop(server);
        let back = writer.await.unwrap();
        assert!(back == data, "server to client intact");
        let (moved, err) = proxy.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(moved.a_to_b, data.len() as u64);
        assert_eq!(moved.b_to_a, data.len() as u64);
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
