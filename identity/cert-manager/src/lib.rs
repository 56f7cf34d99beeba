//! `weft-cert-manager`: workload certificates for the node proxy.
//!
//! - [`CertManager`] holds one certificate per identity in use on the node:
//!   fetched when a pod registers (or on first use), refreshed at a jittered
//!   50–70 % of its lifetime, retried with backoff, served until expiry while
//!   the CA is away, dropped when the identity's last pod leaves.
//! - [`CertManager::server_config`] / [`CertManager::client_config`] give
//!   rustls configs for one local identity; [`IdentityResolver`] and the
//!   verifiers in [`verify`] are the pieces, for callers who assemble their own.
//! - [`GrpcCaClient`] talks to `weft-identity`; [`CaClient`] is the seam tests
//!   and other transports plug into.
//!
//! See `docs/identity.md` for how the node proxy is meant to use it.

pub mod bundle;
pub mod cert;
pub mod client;
pub mod manager;
pub mod metrics;
pub mod tls;
pub mod verify;

pub use bundle::TrustBundle;
pub use cert::WorkloadCertificate;
pub use client::{CaClient, CaError, CertifyReply, GrpcCaClient, GrpcCaConfig};
pub use manager::{CertManager, CertManagerConfig, CertManagerError, SharedTrustBundle};
pub use metrics::CertManagerMetrics;
pub use tls::IdentityResolver;
pub use verify::{SpiffeClientVerifier, SpiffeServerVerifier, peer_identity, peer_not_after};
pub use weft_identity_api::SpiffeId;
