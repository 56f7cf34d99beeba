//! The CA's own TLS certificate. It is issued from the current issuer at
//! start and again whenever the issuer changes or half its lifetime has
//! passed, so clients that trust the anchors can always verify it — a CA
//! with a certificate from a rotated-away issuer would lock every node out.

use crate::authority::Authority;
use rustls::crypto::ring;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The names the serving certificate carries by default: the Kubernetes
/// Service (short and fully qualified) and loopback for local mode.
pub fn default_server_names() -> Vec<String> {
    vec![
        weft_identity_api::CA_SERVER_NAME.to_string(),
        format!("{}.cluster.local", weft_identity_api::CA_SERVER_NAME),
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
    ]
}

/// How long the CA's serving certificate lives.
pub const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub struct ServingCert {
    names: Vec<String>,
    current: RwLock<Arc<CertifiedKey>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("cannot issue the CA's serving certificate: {0}")]
    Issue(#[from] crate::authority::SignError),
    #[error("cannot use the CA's serving key: {0}")]
    Key(rustls::Error),
}

impl ServingCert {
    pub fn issue(authority: &Authority, names: Vec<String>) -> Result<Self, ServingError> {
        let key = certified_key(authority, &names)?;
        Ok(Self {
            names,
            current: RwLock::new(key),
        })
    }

    /// Replaces the certificate with a fresh one from the current issuer.
    pub fn renew(&self, authority: &Authority) -> Result<(), ServingError> {
        let key = certified_key(authority, &self.names)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn certified_key(
    authority: &Authority,
    names: &[String],
) -> Result<Arc<CertifiedKey>, ServingError> {
    let (chain, key) = authority.serving_certificate(names, SERVING_TTL)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let signing = ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(ServingError::Key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}
