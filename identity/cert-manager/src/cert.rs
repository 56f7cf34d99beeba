//! A workload certificate held by the node proxy: the key is generated here
//! and never leaves the process; only the CSR goes to the CA.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::crypto::ring;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weft_identity_api::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate a key or CSR: {0}")]
    Generate(String),
    #[error("the CA returned a certificate for {found}, not {expected}")]
    WrongIdentity { expected: String, found: String },
    #[error("the CA returned a certificate that does not match the key we sent")]
    WrongKey,
    #[error("the CA returned an unusable certificate: {0}")]
    Invalid(String),
}

/// A fresh P-256 key and a CSR for `identity`.
pub struct PendingKey {
    key: KeyPair,
    pub csr: Vec<u8>,
}

impl PendingKey {
    pub fn generate(identity: &SpiffeId) -> Result<Self, CertError> {
        let err = |e: rcgen::Error| CertError::Generate(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into().map_err(err)?)];
        let csr = params.serialize_request(&key).map_err(err)?;
        Ok(Self {
            key,
            csr: csr.der().to_vec(),
        })
    }

    /// Pairs the key with what the CA signed, after checking the CA signed
    /// *this* key for *this* identity.
    pub fn complete(
        self,
        identity: &SpiffeId,
        leaf: Vec<u8>,
        intermediates: Vec<Vec<u8>>,
        valid_until: i64,
    ) -> Result<WorkloadCertificate, CertError> {
        let leaf = CertificateDer::from(leaf);
        let found =
            crate::verify::spiffe_id_of(&leaf).map_err(|e| CertError::Invalid(e.to_string()))?;
        if &found != identity {
            return Err(CertError::WrongIdentity {
                expected: identity.to_string(),
                found: found.to_string(),
            });
        }
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&leaf)
            .map_err(|e| CertError::Invalid(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(CertError::WrongKey);
        }
        let serial = parsed.raw_serial_as_string();
        let not_after = parsed.validity().not_after.timestamp();
        drop(parsed);
        let valid_until =
            UNIX_EPOCH + Duration::from_secs(valid_until.min(not_after).max(0) as u64);
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let signing = ring::default_provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| CertError::Invalid(e.to_string()))?;
        let mut chain = vec![leaf];
        chain.extend(intermediates.into_iter().map(CertificateDer::from));
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            certified: Arc::new(CertifiedKey::new(chain, signing)),
            valid_until,
            serial,
        })
    }
}

/// One identity's certificate, chain and key, ready for rustls.
#[derive(Debug, Clone)]
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub valid_until: SystemTime,
    /// Hex serial, for logs and tests.
    pub serial: String,
}

impl WorkloadCertificate {
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// Time left until expiry (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.valid_until.duration_since(now).unwrap_or_default()
    }
}
