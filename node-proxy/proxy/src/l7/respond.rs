//! The proxy's own answers: one mapping from what went wrong to the HTTP
//! status, or for gRPC the status code, that the client gets.

use super::body::{ProxyBody, proxy_body};
use super::upstream::UpstreamError;
use crate::telemetry::grpc::GrpcCode;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Empty;

/// The response the proxy gives itself when the endpoint failed.
pub fn error_response(e: &UpstreamError, grpc: bool) -> Response<ProxyBody> {
    // gRPC: PERMISSION_DENIED for a policy refusal, else UNAVAILABLE.
    let (status, code) = if e.is_forbidden() {
        (StatusCode::FORBIDDEN, GrpcCode::PermissionDenied)
    } else if e.is_connect() {
        (StatusCode::SERVICE_UNAVAILABLE, GrpcCode::Unavailable)
    } else {
        (StatusCode::BAD_GATEWAY, GrpcCode::Unavailable)
    };
    synthetic(status, code, &e.to_string(), grpc)
}

/// The proxy's own answer: `status` with the message as body, or for a
/// gRPC request a trailers-only response (HTTP 200, `grpc-status` `code`
/// in the headers).
pub fn synthetic(
    status: StatusCode,
    code: GrpcCode,
    message: &str,
    grpc: bool,
) -> Response<ProxyBody> {
    if grpc {
        let mut r = Response::new(proxy_body(Empty::<Bytes>::new()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", code.header_value());
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            h.insert("grpc-message", v);
        }
        return r;
    }
    let body = proxy_body(http_body_util::Full::new(Bytes::from(format!(
        "weft: {message}\n"
    ))));
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            0x20..=0x7e if b != b'%' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
