//! A client's HTTP/2 request body that the proxy reads to its end when it
//! no longer needs it, instead of resetting the stream.
//!
//! Why: an application may answer before it has read the whole request
//! body (gRPC servers and HTTP servers refusing an upload do). The proxy
//! then drops the rest of the body, and h2 resets the client's stream
//! (`RST_STREAM(NO_ERROR)`). The client's DATA already on the way for that
//! stream reaches a stream h2 may have forgotten (it remembers the last 50
//! resets for 1 s), and each such frame is a "locally caused reset" that h2
//! counts against `max_local_error_reset_streams`, over the connection's
//! whole life. So normal proxying used to push healthy long-lived
//! connections to h2's limit (1024), which made the proxy switch the limit
//! off for trusted peers and local pods — and with it the defence against
//! clients that make a server reset streams on purpose (h2 #737, the
//! "MadeYouReset" class).
//!
//! Read to its end, the stream closes as the client ends it: no reset, no
//! late frame, nothing counted. The read is bounded ([`DRAIN_AT_MOST`]
//! bytes, [`DRAIN_FOR`]) so a client that keeps sending is reset as before;
//! while it is read the stream still counts against the connection's
//! concurrent stream limit, so a client cannot open more than that many.

use super::body::Acking;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use weft_stream::Acker;

/// At most this much of an unneeded body is read (more than the DATA a
/// client has in flight when it learns of the answer: hyper's default
/// stream window is 1 MiB).
pub const DRAIN_AT_MOST: usize = 2 << 20;
/// For at most this long.
pub const DRAIN_FOR: Duration = Duration::from_secs(5);

/// A request body from a client connection of the proxy.
pub struct ClientBody {
    /// Acknowledging the client's socket when the body's next part is not
    /// there yet (a client writing the head, then the body, with Nagle).
    inner: Option<Acking<Incoming>>,
    /// Read to its end when dropped early (HTTP/2; an HTTP/1.1 body left
    /// unread is hyper's to handle: it closes the connection).
    drain: bool,
}

impl ClientBody {
    /// `http2`: the body came on an HTTP/2 connection (only those are
    /// read to their end when dropped); `acker`: of a pod's socket (a
    /// peer proxy never waits for an ACK).
    pub fn new(inner: Incoming, http2: bool, acker: Option<Acker>) -> Self {
        Self {
            inner: Some(Acking::new(inner, acker)),
            drain: http2,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if !self.drain || body.is_end_stream() {
            return;
        }
        // Outside a runtime (never in the proxy) the body is dropped: reset.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body.into_inner()));
        }
    }
}

/// Reads `body` to its end, its error (the client reset the stream), or
/// the bounds; what is read is discarded.
async fn drain(mut body: Incoming) {
    let read_all = async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > DRAIN_AT_MOST {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, read_all).await;
}
