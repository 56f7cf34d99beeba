//! Turning a request and its response into bounded label values.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use std::fmt::Write;

/// The request method, reduced to the standard ones (RFC 9110 and PATCH):
/// a client may send any token as a method, and each would otherwise be a
/// new series.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MethodClass {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
    Other,
}

impl MethodClass {
    pub fn of(method: &http::Method) -> Self {
        match *method {
            http::Method::GET => Self::Get,
            http::Method::HEAD => Self::Head,
            http::Method::POST => Self::Post,
            http::Method::PUT => Self::Put,
            http::Method::DELETE => Self::Delete,
            http::Method::CONNECT => Self::Connect,
            http::Method::OPTIONS => Self::Options,
            http::Method::TRACE => Self::Trace,
            http::Method::PATCH => Self::Patch,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Connect => "CONNECT",
            Self::Options => "OPTIONS",
            Self::Trace => "TRACE",
            Self::Patch => "PATCH",
            Self::Other => "other",
        }
    }
}

impl EncodeLabelValue for MethodClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Classification {
    Success,
    Failure,
}

impl EncodeLabelValue for Classification {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Classification::Success => "success",
            Classification::Failure => "failure",
        })
    }
}

/// Whether a request is gRPC (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The `grpc-status` in a header or trailer block, if present and numeric.
/// Values outside 0..=16 are kept as numbers (bounded by u8 below), so a
/// buggy server cannot mint unbounded label values.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u8>().ok())
        .map(u32::from)
}

/// Whether a gRPC status says the server failed, as a 5xx does (gRPC's own
/// HTTP mapping: UNKNOWN, INTERNAL and DATA_LOSS are 500, UNAVAILABLE 503,
/// DEADLINE_EXCEEDED 504). What the balancer's failure accrual counts
/// against an endpoint; a caller's mistake (NOT_FOUND, INVALID_ARGUMENT,
/// PERMISSION_DENIED) or a rate limit (RESOURCE_EXHAUSTED, 429) is not the
/// endpoint being unhealthy.
pub fn grpc_server_failed(code: u32) -> bool {
    use super::grpc::GrpcCode::*;
    [Unknown, DeadlineExceeded, Internal, Unavailable, DataLoss]
        .iter()
        .any(|c| c.is(code))
}

/// Success unless the server failed: 5xx, a gRPC status other than OK, or
/// (for a gRPC request) a response that ended without any status. 4xx is
/// the client's error and counts as a success of the server, as Linkerd and
/// Istio count it.
pub fn classify(status: u16, grpc: bool, grpc_status: Option<u32>) -> Classification {
    let failed = status >= 500 || (grpc && grpc_status != Some(0));
    if failed {
        Classification::Failure
    } else {
        Classification::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_classes() {
        assert_eq!(MethodClass::of(&http::Method::GET).as_str(), "GET");
        assert_eq!(MethodClass::of(&http::Method::PATCH).as_str(), "PATCH");
        let odd = http::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(MethodClass::of(&odd).as_str(), "other");
    }

    #[test]
    fn failures_are_5xx_grpc_errors_and_missing_grpc_status() {
        assert_eq!(classify(200, false, None), Classification::Success);
        assert_eq!(classify(404, false, None), Classification::Success);
        assert_eq!(classify(500, false, None), Classification::Failure);
        assert_eq!(classify(503, false, None), Classification::Failure);
        assert_eq!(classify(200, true, Some(0)), Classification::Success);
        assert_eq!(classify(200, true, Some(13)), Classification::Failure);
        assert_eq!(classify(200, true, None), Classification::Failure);
    }

    #[test]
    fn only_server_side_grpc_statuses_count_against_an_endpoint() {
        let failed: Vec<u32> = (0..=16).filter(|c| grpc_server_failed(*c)).collect();
        assert_eq!(failed, [2, 4, 13, 14, 15]);
    }

    #[test]
    fn grpc_status_is_parsed_and_bounded() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(14));
        h.insert("grpc-status", "99999".parse().unwrap());
        assert_eq!(grpc_status(&h), None, "not a gRPC code: no label value");
        h.insert(
            http::header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert!(is_grpc(&h));
    }
}
