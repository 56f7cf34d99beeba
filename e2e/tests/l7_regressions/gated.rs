//! A client connection whose incoming bytes the test can hold back.
//!
//! While the gate is closed, what the server sends is read from the socket
//! (so the server is never blocked) and its HTTP/2 frame headers are
//! counted, but nothing is handed to the client: the HTTP/2 client keeps
//! believing its streams are open, and the DATA it sends meanwhile reach
//! the server after the server reset those streams, exactly like DATA that
//! crossed a RST_STREAM on the wire.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// What the server sent so far (frames of the server-to-client direction).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// DATA or HEADERS frames with END_STREAM: the server finished a
    /// response.
    pub responses_ended: usize,
    /// RST_STREAM frames with NO_ERROR or CANCEL: the server ended a stream
    /// it had answered, or gave up on it.
    pub resets_after_answer: usize,
    /// RST_STREAM frames with STREAM_CLOSED: the server reset a stream
    /// because of a frame it received on a stream it had already closed and
    /// forgotten (h2 counts each against `max_local_error_reset_streams`).
    pub resets_stream_closed: usize,
    /// The error code of a GOAWAY, if one came.
    pub goaway: Option<u32>,
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const NO_ERROR: u32 = 0x0;
const STREAM_CLOSED: u32 = 0x5;
const CANCEL: u32 = 0x8;

#[derive(Default)]
struct State {
    open: bool,
    /// Read from the socket, not handed to the client yet.
    held: Vec<u8>,
    eof: bool,
    /// Bytes not yet parsed into whole frames.
    unparsed: Vec<u8>,
    seen: Seen,
    reader: Option<Waker>,
}

impl State {
    fn parse(&mut self, bytes: &[u8]) {
        self.unparsed.extend_from_slice(bytes);
        let mut at = 0;
        while self.unparsed.len() - at >= 9 {
            let h = &self.unparsed[at..at + 9];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let kind = h[3];
            let flags = h[4];
            if self.unparsed.len() - at < 9 + len {
                break;
            }
            let payload = &self.unparsed[at + 9..at + 9 + len];
            let code = |offset: usize| {
                payload
                    .get(offset..offset + 4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            };
            if matches!(kind, DATA | HEADERS) && flags & END_STREAM != 0 {
                self.seen.responses_ended += 1;
            }
            match (kind, code(0)) {
                (RST_STREAM, Some(NO_ERROR | CANCEL)) => self.seen.resets_after_answer += 1,
                (RST_STREAM, Some(STREAM_CLOSED)) => self.seen.resets_stream_closed += 1,
                (GOAWAY, _) => self.seen.goaway = code(4),
                _ => {}
            }
            at += 9 + len;
        }
        self.unparsed.drain(..at);
    }
}

/// The test's handle on a [`Gated`] connection.
#[derive(Clone, Default)]
pub struct Gate {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl Gate {
    pub fn close(&self) {
        self.state.lock().unwrap().open = false;
    }

    /// Hands what was held back to the client, and everything after it.
    pub fn open(&self) {
        let mut state = self.state.lock().unwrap();
        state.open = true;
        if let Some(w) = state.reader.take() {
            w.wake();
        }
    }

    pub fn seen(&self) -> Seen {
        self.state.lock().unwrap().seen.clone()
    }

    /// Waits until `done` holds for what the server sent; `Err` with the
    /// last state after `within`.
    pub async fn wait(&self, within: Duration, done: impl Fn(&Seen) -> bool) -> Result<(), Seen> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            let seen = self.seen();
            if done(&seen) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(self.seen());
            }
        }
    }
}

/// A connection whose reads pass through a [`Gate`] (writes go straight
/// through).
pub struct Gated<T> {
    inner: T,
    gate: Gate,
}

impl<T> Gated<T> {
    /// Open at first.
    pub fn new(inner: T) -> (Self, Gate) {
        let gate = Gate::default();
        gate.open();
        (
            Self {
                inner,
                gate: gate.clone(),
            },
            gate,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gated<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut chunk = [0u8; 16384];
        loop {
            {
                let mut state = this.gate.state.lock().unwrap();
                if state.open && !state.held.is_empty() {
                    let n = state.held.len().min(buf.remaining());
                    buf.put_slice(&state.held[..n]);
                    state.held.drain(..n);
                    return Poll::Ready(Ok(()));
                }
                if state.open && state.eof {
                    return Poll::Ready(Ok(()));
                }
                if state.eof {
                    state.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let mut state = this.gate.state.lock().unwrap();
                    if read.filled().is_empty() {
                        state.eof = true;
                    } else {
                        state.parse(read.filled());
                        state.held.extend_from_slice(read.filled());
                    }
                    drop(state);
                    this.gate.changed.notify_waiters();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // The socket wakes this task when more arrives; the gate
                    // wakes it when it opens (unless it opened just now).
                    let mut state = this.gate.state.lock().unwrap();
                    if state.open && !state.held.is_empty() {
                        continue;
                    }
                    state.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gated<T> {
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
