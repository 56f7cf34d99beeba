//! Which failed requests may be tried again. The budget that bounds how
//! many retries a Service gets is `weft_balance::RetryBudget`.

use crate::telemetry::grpc::GrpcCode;
use weft_destination_api::RouteRetry;

/// What went wrong with one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this status.
    Status(u16),
    /// A gRPC request ended with this `grpc-status` (known from a
    /// trailers-only response, or trailers that came with the first frame).
    Grpc(u32),
    /// No connection (refused, reset before a response, timed out
    /// connecting): the request was never processed, so any method may be
    /// retried.
    ConnectFailed,
    /// The connection failed after the request was sent: it may have been
    /// processed.
    ResponseFailed,
    /// The peer refused the request unprocessed (a draining proxy's GOAWAY,
    /// REFUSED_STREAM): any method may be sent again, on a new connection.
    Refused,
}

/// The largest request body kept for replay. A larger body is streamed
/// without a copy and its request is not retried (Linkerd caps at 64 KiB
/// too): buffering big uploads per request would cost memory on every
/// request to save a few.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// gRPC statuses retried when a route lists none: CANCELLED (1),
/// DEADLINE_EXCEEDED (4), RESOURCE_EXHAUSTED (8) and UNAVAILABLE (14), the
/// transient ones (Envoy's and App Mesh's set). INTERNAL (13) is left out:
/// it usually means a bug that the next attempt hits again.
pub const DEFAULT_GRPC_CODES: [GrpcCode; 4] = [
    GrpcCode::Cancelled,
    GrpcCode::DeadlineExceeded,
    GrpcCode::ResourceExhausted,
    GrpcCode::Unavailable,
];

/// Whether a failed attempt is retried (before asking the budget), after
/// `retries_made` retries of this request. `body_replayable`: the whole
/// body is buffered (or there is none).
pub fn should_retry(
    policy: &RouteRetry,
    method: &http::Method,
    body_replayable: bool,
    retries_made: u32,
    outcome: Outcome,
) -> bool {
    if retries_made >= policy.attempts || !body_replayable {
        return false;
    }
    match outcome {
        Outcome::ConnectFailed | Outcome::Refused => true,
        // A route's `retry` declares its requests retryable; still, a
        // request that may have been processed is replayed only when the
        // method is idempotent (RFC 9110 §9.2.2) unless the status says it
        // was not processed (the codes the operator listed).
        Outcome::ResponseFailed => method_is_idempotent(method),
        Outcome::Status(code) => {
            if policy.codes.is_empty() {
                (500..600).contains(&code)
            } else {
                policy.codes.contains(&u32::from(code))
            }
        }
        // Like a listed HTTP status: the route declared it retryable,
        // whatever the method (gRPC calls are all POSTs).
        Outcome::Grpc(code) => {
            if policy.grpc_codes.is_empty() {
                DEFAULT_GRPC_CODES.iter().any(|c| c.is(code))
            } else {
                policy.grpc_codes.contains(&code)
            }
        }
    }
}

/// RFC 9110 §9.2.2: a request that may be sent again with the same effect.
pub fn method_is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
