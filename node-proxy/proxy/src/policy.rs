//! Decisions about connections and requests, from the control plane's state
//! and plain values: no socket, no namespace. Tested with plain values.
//!
//! - [`authz`]: who may connect to a local pod, and the table of admitted
//!   connections a policy change re-decides;
//! - [`route_authz`]: route-level authorization of inbound requests;
//! - [`retry`]: which failed requests are retried.
//!
//! Layering: above `telemetry` and `state`; below `transport`.

pub mod authz;
pub mod retry;
pub mod route_authz;

pub use authz::{Admission, ConnectionAccess, Inbound, InboundAuthz, Verdict};
