//! Signing workload certificates with the current issuer.

use crate::csr::{self, CheckedKey, CsrError};
use crate::material::{Material, unix_seconds};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use weft_identity_api::SpiffeId;

/// How workload certificates are shaped.
#[derive(Clone, Debug)]
pub struct LeafPolicy {
    pub trust_domain: String,
    /// Lifetime of a workload certificate (capped at the issuer's expiry).
    pub ttl: Duration,
    /// How far `notBefore` is set in the past, so a peer whose clock is a
    /// little behind does not see a certificate "not yet valid".
    pub clock_skew: Duration,
}

impl LeafPolicy {
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            ttl: Duration::from_secs(24 * 3600),
            clock_skew: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("identity {0} is outside this CA's trust domain {1:?}")]
    ForeignTrustDomain(String, String),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("the issuer expired at {0:?}: rotate the issuer (files in the CA directory)")]
    IssuerExpired(SystemTime),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A signed workload certificate and the chain to hand out with it.
pub struct Signed {
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// The CA's current signing material, swapped atomically on reload; the
/// trust bundle (anchors) is published on a watch channel for streaming.
pub struct Authority {
    policy: LeafPolicy,
    material: RwLock<Arc<Material>>,
    anchors: watch::Sender<Vec<CertificateDer<'static>>>,
}

impl Authority {
    pub fn new(policy: LeafPolicy, material: Material) -> Self {
        let (anchors, _) = watch::channel(anchor_ders(&material));
        Self {
            policy,
            material: RwLock::new(Arc::new(material)),
            anchors,
        }
    }

    pub fn policy(&self) -> &LeafPolicy {
        &self.policy
    }

    pub fn material(&self) -> Arc<Material> {
        self.material
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Installs new material. Watchers of the trust bundle hear about it
    /// only if the anchors changed (an issuer rotation changes nothing for them).
    pub fn replace(&self, material: Material) {
        let anchors = anchor_ders(&material);
        *self.material.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
        self.anchors.send_if_modified(|current| {
            if *current == anchors {
                false
            } else {
                *current = anchors;
                true
            }
        });
    }

    pub fn watch_anchors(&self) -> watch::Receiver<Vec<CertificateDer<'static>>> {
        self.anchors.subscribe()
    }

    /// Checks the request and signs a workload certificate for `identity`.
    /// Authorization (may this caller have `identity`?) is the caller's job.
    pub fn certify(&self, identity: &SpiffeId, csr_der: &[u8]) -> Result<Signed, SignError> {
        if identity.trust_domain() != self.policy.trust_domain {
            return Err(SignError::ForeignTrustDomain(
                identity.to_string(),
                self.policy.trust_domain.clone(),
            ));
        }
        let key = csr::check(csr_der, identity)?;
        let material = self.material();
        let now = SystemTime::now();
        if material.issuer_not_after <= now {
            return Err(SignError::IssuerExpired(material.issuer_not_after));
        }
        let not_after = (now + self.policy.ttl).min(material.issuer_not_after);
        let not_before = now - self.policy.clock_skew;

        let mut params = CertificateParams::default();
        // SPIFFE: the identity is the URI SAN; no subject (rcgen then marks
        // the SAN extension critical, as RFC 5280 requires).
        params.distinguished_name = DistinguishedName::new();
        let uri = identity
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| SignError::Sign(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&P256Key(key), &material.issuer)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        Ok(Signed {
            leaf: cert.der().clone(),
            intermediates: material.chain.clone(),
            // Certificates carry whole seconds.
            not_after: SystemTime::UNIX_EPOCH
                + Duration::from_secs(unix_seconds(not_after).max(0) as u64),
        })
    }

    /// A serving certificate for the CA's own gRPC endpoint, from the current
    /// issuer: DNS and IP SANs, server auth. Returns (chain, PKCS#8 key).
    pub fn serving_certificate(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), SignError> {
        let material = self.material();
        let sign = |e: rcgen::Error| SignError::Sign(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(sign)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "weft-identity");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - self.policy.clock_skew).into();
        params.not_after = (now + ttl).min(material.issuer_not_after).into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &material.issuer).map_err(sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(material.chain.iter().cloned());
        Ok((chain, key.serialize_der()))
    }
}

fn anchor_ders(material: &Material) -> Vec<CertificateDer<'static>> {
    material.anchors.iter().map(|a| a.der.clone()).collect()
}

/// 128 random bits, positive (top bit clear), never zero: RFC 5280 wants
/// unique positive serials; randomness makes collisions negligible without
/// any shared counter between CA replicas.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// The checked public key of a CSR, in the form rcgen signs.
struct P256Key(CheckedKey);

impl PublicKeyData for P256Key {
    fn der_bytes(&self) -> &[u8] {
        &self.0.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}
