//! One HBONE stream as a byte stream, so the proxy splices it with
//! `tokio::io::copy_bidirectional` like any socket.
//!
//! Half-close maps onto HTTP/2 stream state: our `shutdown()` sends an empty
//! DATA frame with END_STREAM (the peer reads EOF, and can still send), and
//! the peer's END_STREAM reads as EOF here. Dropping the stream without that
//! resets it (RST_STREAM), which the other side sees as a connection reset,
//! as it would for an aborted TCP connection.

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read; its flow-control window is released as it
    /// is read, so a slow reader slows the sender down instead of growing
    /// this buffer.
    pending: Bytes,
    eof: bool,
    /// What the source proxy said the stream carries (server side).
    protocol: Option<String>,
    /// Released when the stream is dropped (a pool's stream slot).
    _lease: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            eof: false,
            protocol: None,
            _lease: None,
        }
    }

    pub(crate) fn with_protocol(mut self, protocol: Option<String>) -> Self {
        self.protocol = protocol;
        self
    }

    /// The source proxy's [`super::PROTOCOL_HEADER`] for this stream.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    pub(crate) fn with_lease(mut self, lease: Box<dyn Send + Sync>) -> Self {
        self._lease = Some(lease);
        self
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                // Ignore errors: the stream may already be closed, which
                // the next poll_data reports.
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Ask for as much window as we have bytes; write what is granted.
        self.send.reserve_capacity(buf.len());
        let granted = match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => Some(n),
            Some(Err(_)) | None => None,
        };
        if let Some(n) = granted {
            let n = n.min(buf.len());
            if self
                .send
                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                .is_ok()
            {
                return Poll::Ready(Ok(n));
            }
        }
        // The stream is gone: report why (poll_reset gives the peer's reason).
        let err = match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("HBONE stream reset: {reason}"),
            ),
            Err(e) => h2_to_io(e),
        };
        Poll::Ready(Err(err))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 frames are handed to the connection task as soon as they are
        // sent; there is nothing buffered here to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // END_STREAM on an empty DATA frame: a TCP FIN, one direction only.
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Already closed (e.g. reset by the peer): nothing left to half-close.
            Err(e) if e.is_reset() || e.is_go_away() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}

pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("is_io");
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}
