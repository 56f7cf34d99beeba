//! The Weft node proxy. One per node; carries every enrolled pod's TCP
//! connections over mutual TLS, each end presenting its own pod's identity.
//!
//! # Layering
//!
//! Each module is a layer; a layer imports only the layers below it, and
//! `tests/layering.rs` fails the build's tests when an import breaks that:
//!
//! ```text
//! pods, admin        the pods this proxy serves (registration, namespaces,
//!                    listeners); the admin HTTP endpoints
//!   proxy            serving connections: proxy::inbound, proxy::outbound
//!                    (never importing each other), ProxyInputs
//!     http           hyper/h2 machinery: bodies, replay, deadlines,
//!                    upstream and application connections, error responses
//!       transport    sockets from a SocketFactory, HBONE tunnels, upstreams
//!         policy     authorization, route authorization, retry decisions
//!           telemetry  metrics and their labels
//!             state  the control plane's view and pure decisions over it
//! ```
//!
//! Below them are the stand-alone crates: `weft-hbone` (the tunnel),
//! `weft-stream` (splice, protocol detection, reset) and `weft-balance`
//! (P2C peak-EWMA, retry budget). `state` and `policy` touch no socket;
//! only `pods` touches network namespaces and talks to the redirector.

pub mod admin;
pub mod l7;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod transport;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
