//! Acknowledging at once what the proxy reads from a peer that may write
//! in pieces: no Nagle × delayed-ACK stall added by the mesh.
//!
//! The stall: a peer without `TCP_NODELAY` writes a message in two small
//! pieces (Python's `http.server` flushes the status line and headers,
//! then writes the body; a client writes a POST's head, then its body).
//! Nagle's algorithm holds the second piece until the first is
//! acknowledged. Linux acknowledges at once only in "quick" mode; once a
//! connection looks interactive (this side sent data shortly after
//! receiving some: a request on a reused keep-alive connection, a
//! response on a client's keep-alive connection) it enters "ping-pong"
//! mode and delays its ACKs (up to 40 ms, `TCP_ATO_MIN`), hoping to
//! carry them on its next data. That data never comes: the proxy is
//! waiting for the second piece. So every request on such a connection
//! took 40 ms more — and through the mesh that is every request, since
//! the destination proxy reuses its keep-alive connection to the
//! application even when each client opens a fresh one (issue #19).
//!
//! The fix: after every read that returned data, set `TCP_QUICKACK`.
//! Linux does not keep that option (it is a one-shot: the mode falls back
//! to ping-pong on the next exchange), but setting it leaves ping-pong
//! mode and sends a pending delayed ACK right away. Re-armed after each
//! read, the peer's first piece is acknowledged as soon as the proxy has
//! it, and Nagle releases the second. Chosen over changing how connections
//! to the application are reused (a connection per request would remove
//! the ping-pong state too, but costs a handshake per request, and would
//! not help a keep-alive client): this also removes the stall an
//! application has with a keep-alive client *without* the mesh.
//!
//! Cost: one `setsockopt` per read that returned data, and a pure ACK
//! segment (sent, and received by the peer) where the kernel would have
//! waited to piggyback it. That was within the noise when it was added;
//! once the rest of a request got cheaper it was the largest single cost
//! of a small request: a quarter of an opaque HTTP/1.1 request's proxy
//! CPU (docs/benchmarks.md, "An ACK only when the rest is awaited"). So
//! where the proxy parses HTTP it acknowledges only when it waits for the
//! rest of a message ([`crate::ack_on_wait`]); this per-read form stays
//! for opaque streams, where it cannot tell.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// Reads from `io` into `buf`, then, if that read returned data, re-arms
/// `TCP_QUICKACK` on the socket so what was read is acknowledged now.
pub fn poll_read<T>(io: &mut T, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>
where
    T: AsyncRead + AsFd + Unpin,
{
    let before = buf.filled().len();
    let poll = Pin::new(&mut *io).poll_read(cx, buf);
    if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
        // Best effort: a socket that refuses it (closed meanwhile) only
        // keeps the kernel's default, delayed ACKs.
        let _ = socket2::SockRef::from(&*io).set_tcp_quickack(true);
    }
    poll
}
