//! The trust bundle: every trust anchor in force for one trust domain.
//!
//! During a trust-anchor rotation the bundle holds the old and the new
//! anchor, so certificates chaining to either verify; the verifiers read the
//! bundle *at handshake time*, so a change applies to the next handshake
//! without rebuilding any rustls config.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::TrustAnchor;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle holds no anchors")]
    Empty,
    #[error("trust anchor {index} is not a usable certificate: {reason}")]
    BadAnchor { index: usize, reason: String },
    #[error("trust bundle PEM is invalid: {0}")]
    Pem(String),
}

#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: String,
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain && self.certs == other.certs
    }
}

impl TrustBundle {
    pub fn from_der(
        trust_domain: impl Into<String>,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, c)| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadAnchor {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            certs,
            anchors,
        })
    }

    /// From a PEM file's contents (e.g. the `ca.crt` a node proxy is
    /// deployed with, to verify the CA before the first bundle arrives).
    pub fn from_pem(trust_domain: impl Into<String>, pem: &[u8]) -> Result<Self, BundleError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        Self::from_der(trust_domain, certs)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}
