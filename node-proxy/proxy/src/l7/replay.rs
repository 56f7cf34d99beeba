//! A request body that can be sent again: what the first attempt forwards
//! is kept (up to [`MAX_REPLAY_BODY`], trailers included), so a retry can
//! replay it, then go on reading from the client where the first attempt
//! stopped.
//!
//! Why not buffer the whole body before the first attempt, as a simple
//! retry filter does: a gRPC call's body has no Content-Length, and a
//! client-streaming or bidirectional call may wait for the server's first
//! message before it sends the rest. Holding the request until its end
//! would deadlock those, and would add a full body's latency to every
//! request. Linkerd's `ReplayBody` takes the same approach; Envoy buffers
//! too, up to its `per_request_buffer_limit`.
//!
//! One attempt reads at a time. [`Replay::next`] starts the next
//! attempt and makes the previous one's body fail (it may still be polled by
//! hyper, sending a request whose answer is no longer wanted), so the two
//! never compete for the client's bytes.

use super::body::{BodyError, BoxError};
use crate::policy::retry::MAX_REPLAY_BODY;
use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Which attempt this body belongs to; a newer one supersedes it.
    attempt: u64,
    /// Data frames already sent by this attempt.
    cursor: usize,
    trailers_sent: bool,
}

struct Shared<B> {
    /// The client's body; `None` once it has ended.
    source: Option<B>,
    /// The data frames read from the client so far, while they fit.
    kept: Vec<Bytes>,
    kept_len: usize,
    /// Data frames read from the client (more than `kept` after overflow).
    read: usize,
    trailers: Option<HeaderMap>,
    /// More than [`MAX_REPLAY_BODY`] was read: `kept` was dropped and
    /// the request can no longer be replayed.
    overflowed: bool,
    /// Reading the client's body failed.
    failed: bool,
    /// The newest attempt.
    attempt: u64,
}

/// Why an attempt's body ends with an error (the attempt is abandoned).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the request was retried: this attempt's body is superseded")]
    Superseded,
    #[error("the request body is larger than {MAX_REPLAY_BODY} bytes and was not kept for a retry")]
    NotKept,
}

/// What starts the next attempt of a request.
pub struct Replay<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes>,
{
    /// The first attempt's body, and the handle for the next ones.
    pub fn new(source: B) -> (Self, Replay<B>) {
        let ended = source.is_end_stream();
        let shared = Arc::new(Mutex::new(Shared {
            source: (!ended).then_some(source),
            kept: Vec::new(),
            kept_len: 0,
            read: 0,
            trailers: None,
            overflowed: false,
            failed: false,
            attempt: 0,
        }));
        let first = Self {
            shared: shared.clone(),
            attempt: 0,
            cursor: 0,
            trailers_sent: false,
        };
        (first, Replay { shared })
    }
}

impl<B> Replay<B> {
    /// The body for the next attempt, or `None` when the request cannot be
    /// sent again (more than [`MAX_REPLAY_BODY`] read, or the client's body
    /// failed). Supersedes every earlier attempt's body.
    pub fn next(&self) -> Option<ReplayBody<B>> {
        let mut shared = self.shared.lock().expect("replay body lock");
        if shared.overflowed || shared.failed {
            return None;
        }
        shared.attempt += 1;
        Some(ReplayBody {
            shared: self.shared.clone(),
            attempt: shared.attempt,
            cursor: 0,
            trailers_sent: false,
        })
    }

    /// Whether a retry could still replay the body read so far.
    pub fn is_replayable(&self) -> bool {
        let shared = self.shared.lock().expect("replay body lock");
        !shared.overflowed && !shared.failed
    }
}

impl<B> Shared<B> {
    fn keep(&mut self, data: &Bytes) {
        self.read += 1;
        if self.overflowed {
            return;
        }
        if self.kept_len + data.len() > MAX_REPLAY_BODY {
            self.overflowed = true;
            self.kept = Vec::new();
            self.kept_len = 0;
            return;
        }
        self.kept_len += data.len();
        self.kept.push(data.clone());
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().expect("replay body lock");
        if this.attempt != shared.attempt {
            return Poll::Ready(Some(Err(BodyError::new(ReplayError::Superseded))));
        }
        // What an earlier attempt read first.
        if let Some(data) = shared.kept.get(this.cursor) {
            this.cursor += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if this.cursor < shared.read {
            // Only after an overflow, which `replay` refuses: defensive.
            return Poll::Ready(Some(Err(BodyError::new(ReplayError::NotKept))));
        }
        let Some(source) = shared.source.as_mut() else {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                shared.failed = true;
                shared.source = None;
                Poll::Ready(Some(Err(BodyError::new(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        shared.keep(&data);
                        this.cursor += 1;
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            shared.trailers = Some(trailers.clone());
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                if shared.source.as_ref().is_some_and(Body::is_end_stream) {
                    shared.source = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().expect("replay body lock");
        self.attempt == shared.attempt
            && self.cursor >= shared.kept.len()
            && self.cursor >= shared.read
            && shared.source.is_none()
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().expect("replay body lock");
        let kept: u64 = shared
            .kept
            .iter()
            .skip(self.cursor)
            .map(|b| b.len() as u64)
            .sum();
        let mut hint = match &shared.source {
            Some(source) => source.size_hint(),
            None => SizeHint::with_exact(0),
        };
        // Upper first: `set_lower` insists on lower <= upper.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + kept);
        }
        hint.set_lower(hint.lower() + kept);
        hint
    }
}

#[cfg(test)]
#[path = "replay_tests.rs"]
mod tests;
