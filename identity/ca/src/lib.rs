//! `weft-identity`: the mesh CA. Node proxies ask it for workload
//! certificates (`Certify`) and follow its trust bundle; it signs only
//! identities of pods running on the caller's node.
//!
//! One concern per module:
//! - [`csr`]: checking a certificate signing request.
//! - [`material`]: the issuer and trust anchors, from cert-manager's file layout.
//! - [`authority`]: signing workload certificates with the current issuer.
//! - [`workloads`]: which identities a node may obtain (pods on that node).
//! - [`service`]: the gRPC service (authenticate, authorize, check, sign);
//! - [`failures`]: callers that keep failing are refused before they cost anything.
//! - [`reload`]: following the CA directory through rotations.
//! - [`serving`]: the CA's own TLS certificate.
//! - [`server`]: running it all; [`http`]: `/metrics`; [`metrics`]: what is counted.
//! - [`init`]: generating a trust anchor and an issuer for local use.
//!
//! With the `testing` feature (tests and benchmarks only): `testing`, a
//! complete CA on loopback.

pub mod authority;
pub mod csr;
pub mod failures;
pub mod http;
pub mod init;
pub mod kubernetes;
pub mod material;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod service;
pub mod serving;
#[cfg(feature = "testing")]
pub mod testing;
pub mod workloads;
