//! The Weft node proxy. One per node; carries every enrolled pod's TCP
//! connections over mutual TLS, each end presenting its own pod's identity.
//!
//! - [`hbone`]: the tunnel between node proxies (HTTP/2 CONNECT over mTLS);
//! - [`balancer`]: choosing a Service endpoint per connection;
//! - [`splice`]: joining two streams with half-close and byte counts;
//! - [`metrics`]: the Prometheus metrics;
//! - [`admin`]: metrics, health and admin HTTP endpoints;
//! - [`pods`]: the pods this proxy serves (registration, in-pod listeners);
//! - [`outbound`], [`inbound`]: the pods' connections;
//! - [`authz`]: who may connect to a local pod (inbound policy);
//! - [`protocol`]: detecting HTTP/1, HTTP/2 or opaque TCP on a connection;
//! - [`l7`]: request-level proxying and metrics for HTTP and gRPC;
//! - [`retry`]: which failed requests are retried, within a retry budget;
//! - [`quickack`]: acknowledging at once what is read from pods (no
//!   Nagle × delayed-ACK stall).

pub mod admin;
pub mod authz;
pub mod balancer;
pub mod hbone;
pub mod inbound;
pub mod l7;
pub mod mesh;
pub mod metrics;
pub mod outbound;
pub mod pods;
pub mod protocol;
pub mod quickack;
pub mod retry;
pub mod splice;
