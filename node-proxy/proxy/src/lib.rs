//! The Weft node proxy. One per node; carries every enrolled pod's TCP
//! connections over mutual TLS, each end presenting its own pod's identity.
//!
//! - [`hbone`]: the tunnel between node proxies (HTTP/2 CONNECT over mTLS);
//! - [`balancer`]: choosing a Service endpoint per connection.

pub mod balancer;
pub mod hbone;
