//! Learning a gRPC call's status before the response goes to the client,
//! so that a route's retry can act on it.
//!
//! A gRPC failure is an HTTP 200 whose status comes in the trailers. A
//! call that fails before sending any message (the usual case: UNAVAILABLE,
//! RESOURCE_EXHAUSTED) has it in the headers ("trailers-only"), or as the
//! first frame right after them. A call that streams messages first cannot
//! be retried anyway: the client has seen part of an answer. So the proxy
//! waits for the first frame, and for a second one only if it is already
//! there; Linkerd's proxy peeks the same way. Envoy looks at the headers
//! only, which misses servers that send the trailers in a frame of their
//! own.
//!
//! Only done when the request's route retries: waiting for the first frame
//! holds back the response headers until the first message (or the status)
//! arrives, which a streaming client would otherwise see earlier.

use super::body::{BodyError, BoxError, ProxyBody};
use crate::telemetry::classify::grpc_status;
use bytes::Bytes;
use futures::FutureExt;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What the peek learned of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peeked {
    /// The `grpc-status` of a call that ended with no more than one message.
    Status(u32),
    /// Messages are streaming (or the response has no status yet).
    Streaming,
    /// The response body failed before its first frame.
    Failed,
}

/// Reads `response` as far as the peek goes and returns it whole (the
/// frames read are sent first), with what was learned.
pub async fn peek<B>(response: Response<B>) -> (Response<ProxyBody>, Peeked)
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if let Some(code) = grpc_status(response.headers()) {
        return (response.map(super::body::proxy_body), Peeked::Status(code));
    }
    let (parts, mut body) = response.into_parts();
    let mut read = VecDeque::new();
    let mut peeked = Peeked::Streaming;
    let mut ended = body.is_end_stream();
    // At most two frames: a message, and the trailers if they are there.
    for wait in [true, false] {
        if ended {
            break;
        }
        let frame = if wait {
            Some(body.frame().await)
        } else {
            body.frame().now_or_never()
        };
        match frame {
            None => break,
            Some(None) => ended = true,
            Some(Some(Err(e))) => {
                if read.is_empty() {
                    peeked = Peeked::Failed;
                }
                read.push_back(Err(BodyError::new(e)));
                ended = true;
            }
            Some(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    peeked = Peeked::Status(code);
                }
                ended = frame.is_trailers() || body.is_end_stream();
                read.push_back(Ok(frame));
            }
        }
    }
    let body = Replayed {
        read,
        rest: (!ended).then_some(body),
    };
    (Response::from_parts(parts, body.boxed()), peeked)
}

/// The frames the peek read, then the rest of the body.
struct Replayed<B> {
    read: VecDeque<Result<Frame<Bytes>, BodyError>>,
    rest: Option<B>,
}

impl<B> Body for Replayed<B>
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
        if let Some(frame) = this.read.pop_front() {
            return Poll::Ready(Some(frame));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        Pin::new(rest)
            .poll_frame(cx)
            .map(|f| f.map(|f| f.map_err(BodyError::new)))
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref().map(|d| d.len() as u64))
            .sum();
        let mut hint = match &self.rest {
            Some(rest) => rest.size_hint(),
            None => SizeHint::with_exact(0),
        };
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + read);
        }
        hint.set_lower(hint.lower() + read);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn status(code: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", code.parse().unwrap());
        h
    }

    fn response(
        frames: Vec<Result<Frame<Bytes>, std::io::Error>>,
        pending_after: bool,
    ) -> Response<ProxyBody> {
        let stream = futures::stream::iter(frames);
        let body = if pending_after {
            StreamBody::new(stream.chain(futures::stream::pending()))
                .map_err(BodyError::new)
                .boxed()
        } else {
            StreamBody::new(stream).map_err(BodyError::new).boxed()
        };
        Response::new(body)
    }

    use futures::StreamExt;

    #[tokio::test]
    async fn a_trailers_only_response_is_known_from_its_headers() {
        let mut r = response(vec![], true);
        r.headers_mut().extend(status("14"));
        let (r, peeked) = peek(r).await;
        assert_eq!(peeked, Peeked::Status(14));
        assert_eq!(r.headers()["grpc-status"], "14");
    }

    #[tokio::test]
    async fn trailers_in_a_frame_of_their_own_or_after_one_message_are_seen() {
        let (r, peeked) = peek(response(vec![Ok(Frame::trailers(status("8")))], false)).await;
        assert_eq!(peeked, Peeked::Status(8));
        let collected = r.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&status("8")), "passed on");

        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01a"))),
            Ok(Frame::trailers(status("0"))),
        ];
        let (r, peeked) = peek(response(frames, false)).await;
        assert_eq!(peeked, Peeked::Status(0));
        let collected = r.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&status("0")));
        assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x01a"[..]);
    }

    #[tokio::test]
    async fn a_stream_is_not_waited_for_beyond_its_first_message() {
        let frames = vec![Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01a")))];
        let (r, peeked) = peek(response(frames, true)).await;
        assert_eq!(peeked, Peeked::Streaming);
        let mut body = r.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), &b"\0\0\0\0\x01a"[..]);
        assert!(body.frame().now_or_never().is_none(), "the rest streams on");
    }

    #[tokio::test]
    async fn a_body_that_fails_at_once_is_a_failed_response() {
        let frames = vec![Err(std::io::Error::other("reset"))];
        let (r, peeked) = peek(response(frames, false)).await;
        assert_eq!(peeked, Peeked::Failed);
        assert!(
            r.into_body().collect().await.is_err(),
            "the error is passed on"
        );
    }
}
