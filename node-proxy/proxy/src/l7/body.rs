//! Bodies as the proxy passes them on: [`Recorded`], a response body that
//! records the request's metrics when it ends; [`Acking`], a body read
//! from a peer's socket that acknowledges the peer's writes when its rest
//! is awaited.
//!
//! A request is complete only when its response is: for gRPC the status
//! usually arrives in the trailers, after a streamed body. So the metrics
//! are recorded by the body as its last frame passes (or when it is dropped
//! early: the client went away), never when the headers arrive.

use crate::telemetry::Peers;
use crate::telemetry::Reporter;
use crate::telemetry::classify::{MethodClass, classify, grpc_status};
use crate::telemetry::requests::{Outcome, RequestMetrics};
use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::time::Instant;
use weft_stream::{AckOnWait, Acker};

/// What a body in the proxy fails with: hyper's errors, and the proxy's
/// own (a request timeout ending a response, a replayed request body
/// superseded by a retry).
///
/// A type of its own rather than `Box<dyn Error + Send + Sync>` itself:
/// with the bare box, hyper's `Into<Box<dyn Error>>` bound is the identity
/// conversion, whose higher-ranked obligations rustc fails to prove in the
/// `Send` check of the async fns that serve connections ("implementation
/// of `From` is not general enough", rust-lang/rust#102211).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BodyError(BoxError);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl BodyError {
    pub fn new(e: impl Into<BoxError>) -> Self {
        Self(e.into())
    }
}

pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// Any body of bytes as a [`ProxyBody`].
pub fn proxy_body<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(BodyError::new).boxed()
}

pub struct Recorder {
    pub metrics: RequestMetrics,
    pub reporter: Reporter,
    pub peers: Arc<Peers>,
    /// The HTTPRoute rule (`<route>/<rule>`); empty: the default route.
    pub route: String,
    pub method: MethodClass,
    pub started: Instant,
    /// The request was gRPC: a missing `grpc-status` is a failure.
    pub grpc: bool,
    pub status: u16,
    /// `grpc-status` from the response headers (a trailers-only response).
    pub header_grpc_status: Option<u32>,
}

impl Recorder {
    /// Records with the trailers' gRPC status if any; `broken`: the body
    /// failed mid-way (reset, upstream gone), which is a failure whatever
    /// the status said.
    pub fn finish(self, trailer_grpc_status: Option<u32>, broken: bool) {
        let grpc_status = trailer_grpc_status.or(self.header_grpc_status);
        let mut classification = classify(self.status, self.grpc, grpc_status);
        if broken {
            classification = crate::telemetry::classify::Classification::Failure;
        }
        let outcome = Outcome {
            status: self.status,
            grpc_status,
            classification,
        };
        self.metrics.record(
            self.reporter,
            &self.peers,
            self.route,
            self.method,
            &outcome,
            self.started.elapsed(),
        );
    }
}

pub struct Recorded {
    inner: ProxyBody,
    recorder: Option<Recorder>,
    trailer_grpc_status: Option<u32>,
}

impl Recorded {
    pub fn new(inner: ProxyBody, recorder: Recorder) -> Self {
        Self {
            inner,
            recorder: Some(recorder),
            trailer_grpc_status: None,
        }
    }

    fn finish(&mut self, broken: bool) {
        if let Some(r) = self.recorder.take() {
            r.finish(self.trailer_grpc_status, broken);
        }
    }
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    this.trailer_grpc_status = grpc_status(trailers);
                }
                if this.inner.is_end_stream() {
                    this.finish(false);
                }
            }
            Some(Err(_)) => this.finish(true),
            None => this.finish(false),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // An empty body hyper never polls, or a client that left before the
        // end: recorded with what is known.
        self.finish(false);
    }
}

/// A body read from a socket wrapped in `weft_stream::AckOnDemand` (a pod's
/// client connection, the connection to the application). When its next
/// part is not there yet, what the peer wrote of the message is
/// acknowledged at once (`weft_stream::ack_on_wait`): a peer writing the
/// head, then the body, with Nagle on, waits for that ACK.
pub struct Acking<B> {
    inner: B,
    ack: AckOnWait,
}

impl<B> Acking<B> {
    /// `acker`: `None` for a peer that never waits for an ACK (another node
    /// proxy, which writes with `TCP_NODELAY`).
    pub fn new(inner: B, acker: Option<Acker>) -> Self {
        Self {
            inner,
            ack: AckOnWait::new(acker),
        }
    }

    pub fn into_inner(self) -> B {
        self.inner
    }

    /// The connection was upgraded (101): its bytes are no longer parsed,
    /// so every read is acknowledged at once from now on.
    pub fn ack_every_read(&self) {
        if let Some(acker) = self.ack.acker() {
            acker.ack_every_read();
        }
    }
}

impl<B: Body + Unpin> Body for Acking<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        this.ack.polled(&poll);
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use prometheus_client::registry::Registry;

    fn recorder(metrics: &RequestMetrics, grpc: bool) -> Recorder {
        Recorder {
            metrics: metrics.clone(),
            reporter: Reporter::Source,
            peers: Arc::default(),
            route: String::new(),
            method: MethodClass::Post,
            started: Instant::now(),
            grpc,
            status: 200,
            header_grpc_status: None,
        }
    }

    fn render(m: &RequestMetrics) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[tokio::test]
    async fn grpc_status_from_trailers_is_recorded_once_at_the_end() {
        let m = RequestMetrics::default();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01a"))),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = StreamBody::new(futures::stream::iter(frames)).boxed();
        let body = Recorded::new(inner, recorder(&m, true));
        let collected = body.collect().await.unwrap();
        assert!(collected.trailers().is_some());
        let text = render(&m);
        assert!(
            text.contains("grpc_status=\"5\",classification=\"failure\"} 1"),
            "{text}"
        );
        assert_eq!(text.matches("weft_requests_total{").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn a_body_dropped_unread_is_still_counted() {
        let m = RequestMetrics::default();
        let inner = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed();
        drop(Recorded::new(inner, recorder(&m, false)));
        let text = render(&m);
        assert!(
            text.contains("status_code=\"200\",grpc_status=\"\",classification=\"success\"} 1"),
            "{text}"
        );
    }
}
