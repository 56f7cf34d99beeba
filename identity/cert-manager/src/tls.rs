//! rustls configuration for mesh connections on behalf of one local identity.
//!
//! A config is built once per identity (server side) or per (identity,
//! expected peer) (client side) and stays valid across rotations: the
//! resolver reads the identity's current certificate and the verifier the
//! current trust bundle at every handshake.

use crate::cert::WorkloadCertificate;
use crate::manager::{CertManager, CertManagerError};
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use std::sync::Arc;
use tokio::sync::watch;
use weft_identity_api::SpiffeId;

/// Serves the current certificate of one local identity (rustls calls it on
/// every handshake). Which identity a connection belongs to is decided by the
/// proxy — by the pod whose listener accepted it — and expressed by choosing
/// this identity's config.
#[derive(Debug)]
pub struct IdentityResolver {
    cert: watch::Receiver<Option<WorkloadCertificate>>,
}

impl IdentityResolver {
    pub fn new(cert: watch::Receiver<Option<WorkloadCertificate>>) -> Self {
        Self { cert }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.cert.borrow().as_ref().map(|c| c.certified.clone())
    }
}

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl CertManager {
    /// Server side of mesh mTLS for `identity` (e.g. the HBONE listener of a
    /// local pod): presents the identity's certificate, requires a client
    /// certificate from the trust domain. Read the client's identity after
    /// the handshake with [`crate::peer_identity`]. Waits for the first
    /// certificate. TLS 1.3 only; ALPN `h2`.
    pub async fn server_config(
        &self,
        identity: &SpiffeId,
    ) -> Result<ServerConfig, CertManagerError> {
        self.certificate(identity).await?;
        let resolver = Arc::new(IdentityResolver::new(self.watch_certificate(identity)));
        let verifier = Arc::new(SpiffeClientVerifier::new(self.trust_bundle()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session skips certificates, so a
        // client whose certificate rotated, or whose anchor was retired,
        // would still be admitted under its old identity. HBONE pools
        // connections, so full handshakes are rare enough to afford.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// Client side of mesh mTLS from local `identity` to a peer that must be
    /// exactly `expected_server`. Waits for the first certificate.
    pub async fn client_config(
        &self,
        identity: &SpiffeId,
        expected_server: SpiffeId,
    ) -> Result<ClientConfig, CertManagerError> {
        self.certificate(identity).await?;
        let resolver = Arc::new(IdentityResolver::new(self.watch_certificate(identity)));
        let verifier = Arc::new(SpiffeServerVerifier::new(
            self.trust_bundle(),
            expected_server,
        ));
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec()];
        // See server_config: every connection verifies the peer afresh.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }
}
