//! The Weft identity CA's API, shared by the CA (`weft-identity`) and the
//! certificate manager the node proxy uses (`weft-cert-manager`).
//!
//! - [`pb`]: the protobuf messages and the tonic client/server of
//!   `proto/identity.proto`.
//! - [`SpiffeId`]: the workload identity format both sides must agree on,
//!   `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

mod spiffe;

pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};

/// Generated from `proto/identity.proto` (package `weft.identity.v1`).
pub mod pb {
    tonic::include_proto!("weft.identity.v1");
}

/// The DNS name the CA's serving certificate carries on Kubernetes (the
/// `weft-identity` Service in `weft-system`); clients verify it by default.
pub const CA_SERVER_NAME: &str = "weft-identity.weft-system.svc";

/// Largest CSR the CA accepts, in bytes. A P-256 CSR with one URI SAN is about
/// 300 bytes; the limit leaves room for long names while refusing garbage early.
pub const MAX_CSR_BYTES: usize = 4096;
