//! The request timeout, applied to the response body too.
//!
//! Gateway API's `timeouts.request` bounds the whole exchange, "the
//! request from the client to the response being sent", which Envoy and
//! Linkerd both read as the complete response. Stopping the clock at the
//! response headers would let a backend that answers at once and then
//! stalls its body hold a client forever.
//!
//! When the time is up mid-body, a gRPC client gets trailers with
//! DEADLINE_EXCEEDED (its status, where it looks for one; the messages it
//! got stay valid), an HTTP client an error that resets its stream (HTTP/2)
//! or closes its connection (HTTP/1), since a response cut short must not
//! look complete.

use super::body::{BodyError, ProxyBody};
use crate::telemetry::grpc::GrpcCode;
use bytes::Bytes;
use http::HeaderValue;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

pub struct Deadline {
    inner: ProxyBody,
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
    grpc: bool,
    expired: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the response did not end within the HTTPRoute's request timeout ({0:?})")]
pub struct ResponseTimedOut(Duration);

impl Deadline {
    /// `inner` ends by `at` (the request's `timeout` after it started).
    pub fn new(inner: ProxyBody, at: Instant, timeout: Duration, grpc: bool) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(at)),
            timeout,
            grpc,
            expired: false,
        }
    }
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.expired = true;
        let e = ResponseTimedOut(this.timeout);
        if !this.grpc {
            return Poll::Ready(Some(Err(BodyError::new(e))));
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", GrpcCode::DeadlineExceeded.header_value());
        if let Ok(v) = HeaderValue::from_str(&super::respond::percent_encode(&e.to_string())) {
            trailers.insert("grpc-message", v);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn stalled_after_one_chunk() -> ProxyBody {
        let first = futures::stream::iter([Ok::<_, BodyError>(Frame::data(Bytes::from_static(
            b"partial",
        )))]);
        StreamBody::new(futures::StreamExt::chain(first, futures::stream::pending())).boxed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_http_body_that_stalls_past_the_deadline_fails() {
        let at = Instant::now() + Duration::from_millis(300);
        let mut body = Deadline::new(
            stalled_after_one_chunk(),
            at,
            Duration::from_millis(300),
            false,
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "partial");
        let started = Instant::now();
        let end = body.frame().await.unwrap();
        assert!(end.unwrap_err().to_string().contains("request timeout"));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_stream_past_the_deadline_ends_with_deadline_exceeded() {
        let at = Instant::now() + Duration::from_millis(300);
        let body = Deadline::new(
            stalled_after_one_chunk(),
            at,
            Duration::from_millis(300),
            true,
        );
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(trailers["grpc-status"], "4");
        assert!(
            trailers["grpc-message"]
                .to_str()
                .unwrap()
                .contains("request%20timeout")
                || trailers["grpc-message"]
                    .to_str()
                    .unwrap()
                    .contains("request timeout")
        );
        assert_eq!(collected.to_bytes(), "partial");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_in_time_is_untouched() {
        let at = Instant::now() + Duration::from_millis(300);
        let inner = http_body_util::Full::new(Bytes::from_static(b"whole"))
            .map_err(|never| match never {})
            .boxed();
        let body = Deadline::new(inner, at, Duration::from_millis(300), false);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "whole");
    }
}
