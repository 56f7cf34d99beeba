//! Request-level (L7) proxying of HTTP/1.1, HTTP/2 and gRPC.
//!
//! When [`crate::protocol`] detection says a pod's outbound connection
//! speaks HTTP, the node proxy terminates it with hyper and forwards each
//! request on its own: routed per request (a Service's endpoints are
//! balanced per request, not per connection), carried in the client's
//! protocol over pooled upstream connections (HBONE to enrolled endpoints,
//! plain otherwise), and measured with the golden metrics.
//!
//! - [`outbound`]: serving a pod's HTTP connection, forwarding requests;
//! - [`inbound`]: delivering an inbound connection to the application,
//!   request by request when it is HTTP (destination-side metrics);
//! - [`upstream`]: pooled HTTP client connections per endpoint;
//! - [`body`]: the response body that records metrics when it ends;
//! - [`classify`], [`metrics`]: label values and the metric families.

pub mod body;
pub mod classify;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod upstream;

pub use metrics::RequestMetrics;
pub use upstream::UpstreamPool;
