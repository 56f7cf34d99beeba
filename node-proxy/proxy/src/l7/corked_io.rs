//! An HTTP/2 client connection's writes, held while its task is polled and
//! written together at the end of the poll (as `TCP_CORK` holds segments).
//!
//! Why: h2 opens a stream it initiates (a request) only in its
//! connection's next poll, and gives the stream no send capacity before
//! that; that poll writes and flushes the HEADERS; the request body's DATA,
//! though already in hand, waits for the capacity and goes out in a second
//! write. Every request with a body crossed the proxy as two writes, which
//! the next hop (the destination's proxy, the application) read and woke
//! up for twice. With the connection's futures all polled on one task
//! ([`super::connection_tasks`]), the end of that task's poll is the point
//! where nothing more will be written without a wake-up: writes made
//! before it are held ([`CorkedIo`]) and written at once there
//! ([`Cork::uncork`]).
//!
//! Only small writes are held (together at most [`HOLD_AT_MOST`]): a large
//! body's DATA goes through as before, without a copy.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held for the end of a poll.
pub const HOLD_AT_MOST: usize = 16 * 1024;

/// The connection's side: what hyper reads from and writes to.
pub struct CorkedIo<IO> {
    shared: Arc<Mutex<Shared<IO>>>,
}

/// The task's side: corks the connection for the length of a poll.
pub struct Cork<IO> {
    shared: Arc<Mutex<Shared<IO>>>,
}

struct Shared<IO> {
    io: IO,
    held: Vec<u8>,
    /// The task is being polled: flushes wait for its end.
    corked: bool,
    /// Writing what was held at the end of a poll failed: the connection's
    /// next read or write gets the error, so h2 closes it.
    failed: Option<io::Error>,
}

/// `io` for hyper, and the cork its connection's task is driven with.
pub fn cork<IO>(io: IO) -> (CorkedIo<IO>, Cork<IO>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        held: Vec::new(),
        corked: false,
        failed: None,
    }));
    (
        CorkedIo {
            shared: shared.clone(),
        },
        Cork { shared },
    )
}

fn lock<IO>(shared: &Mutex<Shared<IO>>) -> MutexGuard<'_, Shared<IO>> {
    // Nothing panics while holding it; a poisoned lock still has
    // consistent bytes.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl<IO: AsyncWrite + Unpin> Shared<IO> {
    fn failure(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }

    /// Writes out what is held.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Whether `len` more bytes are held rather than written now.
    fn holds(&self, len: usize) -> bool {
        self.corked && self.held.len() + len <= HOLD_AT_MOST
    }
}

impl<IO: AsyncWrite + Unpin> Cork<IO> {
    /// The task's poll begins: the connection's flushes wait for its end.
    pub fn cork(&self) {
        lock(&self.shared).corked = true;
    }

    /// The task's poll ends: writes and flushes what was held. If the
    /// socket cannot take it all now, the rest stays held and `cx` is
    /// woken when it can.
    pub fn uncork(&self, cx: &mut Context<'_>) {
        let mut shared = lock(&self.shared);
        shared.corked = false;
        if shared.held.is_empty() {
            return;
        }
        let flushed = match shared.poll_write_held(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut shared.io).poll_flush(cx),
            other => other,
        };
        if let Poll::Ready(Err(e)) = flushed {
            shared.held.clear();
            shared.failed = Some(e);
            // Polled again at once, so that h2 meets the error and ends
            // the connection rather than waiting on a read.
            cx.waker().wake_by_ref();
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for CorkedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        Pin::new(&mut shared.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CorkedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        if shared.holds(buf.len()) {
            shared.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        let len = bufs.iter().map(|b| b.len()).sum();
        if shared.holds(len) {
            for b in bufs {
                shared.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        lock(&self.shared).io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        if shared.corked && !shared.held.is_empty() {
            // Flushed by the cork at the end of the task's poll.
            return Poll::Ready(Ok(()));
        }
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.failure()?;
        ready!(shared.poll_write_held(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}
