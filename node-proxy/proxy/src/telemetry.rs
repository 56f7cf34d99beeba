//! What the proxy counts and how it labels it: TCP connections
//! (`weft_tcp_*`), requests (`weft_requests_total`,
//! `weft_request_duration_seconds`), inbound authorization
//! (`weft_inbound_authz_*`), and the process.
//!
//! - [`tcp`]: connection metrics and the process collector;
//! - [`requests`]: the golden request metrics;
//! - [`authz`]: authorization decisions;
//! - [`classify`]: label values (method class, success or failure);
//! - [`grpc`]: gRPC status codes as a type.
//!
//! Layering: above `state` only; no socket.

pub mod authz;
pub mod classify;
pub mod grpc;
pub mod requests;
pub mod tcp;

pub use authz::{AuthzLabels, AuthzMetrics, AuthzReason};
pub use requests::RequestMetrics;
pub use tcp::{
    DetectionOutcome, LimitReason, OpenConnection, Peers, ProcessCollector, Reporter,
    SecurityPolicy, TcpLabels, TcpMetrics,
};
