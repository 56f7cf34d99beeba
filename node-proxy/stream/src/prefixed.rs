//! A stream that first yields bytes already read from it.
//!
//! Detection consumes the client's first bytes; whoever handles the
//! connection next (the splice for opaque TCP, hyper for HTTP) must see them
//! as if nothing had been read. Writes go straight to the inner stream.

use bytes::{Buf, BytesMut};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Prefixed<IO> {
    prefix: BytesMut,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: BytesMut, inner: IO) -> Self {
        Self { prefix, inner }
    }

    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// The bytes not replayed yet, taken out: reads then come from the
    /// inner stream (the caller sends them on its own).
    pub fn take_prefix(&mut self) -> bytes::Bytes {
        self.prefix.split().freeze()
    }

    /// The inner stream; replayed bytes not read yet are dropped.
    pub fn into_inner(self) -> IO {
        self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The socket under the bytes detection read first (replayed from memory:
/// re-arming `TCP_QUICKACK` after those is harmless).
impl<T: AsFd> AsFd for Prefixed<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replays_the_prefix_then_reads_on_and_writes_through() {
        let (mut peer, inner) = tokio::io::duplex(64);
        let mut s = Prefixed::new(BytesMut::from(&b"hello "[..]), inner);
        peer.write_all(b"world").await.unwrap();
        drop_write_side(&mut peer).await;
        // A small buffer takes the prefix in pieces.
        let mut first = [0u8; 4];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hell");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"o world");
        s.write_all(b"back").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"back");
    }

    async fn drop_write_side(peer: &mut tokio::io::DuplexStream) {
        peer.shutdown().await.unwrap();
    }
}
