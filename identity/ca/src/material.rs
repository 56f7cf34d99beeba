//! The CA's signing material, read from a directory in the layout
//! cert-manager writes for a Certificate's Secret:
//!
//! - `tls.crt`: the issuer certificate, then any intermediates up to (not
//!   including) a trust anchor, PEM.
//! - `tls.key`: the issuer's private key, PEM PKCS#8 (`PRIVATE KEY`).
//! - `ca.crt`: the trust anchors in force, PEM; during a rotation it holds
//!   the old and the new anchor.
//!
//! A load either yields a consistent set (key matches certificate, every link
//! of the chain is signed by the next, the last by one of the anchors) or an
//! error; the caller keeps the previous set on error, so a half-written
//! rotation never takes the CA down.

use rcgen::{Issuer, KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, X509Certificate};

pub const ISSUER_CERT_FILE: &str = "tls.crt";
pub const ISSUER_KEY_FILE: &str = "tls.key";
pub const TRUST_ANCHORS_FILE: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error(
        "{path} is not a PKCS#8 ECDSA/Ed25519 private key ({reason}); with cert-manager set `privateKey: {{algorithm: ECDSA, encoding: PKCS8}}` on the issuer Certificate"
    )]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "{key} does not belong to the issuer certificate in {cert}: the files come from different rotations; waiting for a consistent set"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error(
        "issuer certificate {subject:?} is not a CA certificate (basicConstraints CA:TRUE is required)"
    )]
    NotCa { subject: String },
    #[error("the issuer chain in {cert} does not lead to any trust anchor in {anchors}: {reason}")]
    Untrusted {
        cert: PathBuf,
        anchors: PathBuf,
        reason: String,
    },
}

/// One consistent issuer + trust anchors set.
pub struct Material {
    pub issuer: Issuer<'static, KeyPair>,
    /// Issuer first, then intermediates; excludes the anchor.
    pub chain: Vec<CertificateDer<'static>>,
    pub issuer_not_after: SystemTime,
    pub issuer_subject: String,
    pub anchors: Vec<Anchor>,
}

pub struct Anchor {
    pub der: CertificateDer<'static>,
    pub subject: String,
    pub not_after: SystemTime,
}

impl Material {
    pub fn load(dir: &Path) -> Result<Self, MaterialError> {
        let cert_path = dir.join(ISSUER_CERT_FILE);
        let key_path = dir.join(ISSUER_KEY_FILE);
        let anchors_path = dir.join(TRUST_ANCHORS_FILE);
        let chain = read_certs(&cert_path)?;
        let anchors = read_certs(&anchors_path)?;
        let key_pem = read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| MaterialError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_parts(chain, key, anchors, &cert_path, &anchors_path, &key_path)
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
        anchor_ders: Vec<CertificateDer<'static>>,
        cert_path: &Path,
        anchors_path: &Path,
        key_path: &Path,
    ) -> Result<Self, MaterialError> {
        let bad = |path: &Path, reason: String| MaterialError::BadCertificate {
            path: path.to_path_buf(),
            reason,
        };
        let parsed_anchors = anchor_ders
            .iter()
            .map(|d| parse(d).map_err(|r| bad(anchors_path, r)))
            .collect::<Result<Vec<_>, _>>()?;
        // cert-manager may put the root into tls.crt as well: drop anything
        // that is an anchor, the chain we hand out excludes it.
        let chain: Vec<_> = chain
            .into_iter()
            .filter(|c| !anchor_ders.contains(c))
            .collect();
        if chain.is_empty() {
            return Err(MaterialError::NoCertificate {
                path: cert_path.to_path_buf(),
            });
        }
        let parsed_chain = chain
            .iter()
            .map(|d| parse(d).map_err(|r| bad(cert_path, r)))
            .collect::<Result<Vec<_>, _>>()?;
        let issuer_cert = &parsed_chain[0];
        if issuer_cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(MaterialError::KeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            });
        }
        if !issuer_cert.is_ca() {
            return Err(MaterialError::NotCa {
                subject: issuer_cert.subject().to_string(),
            });
        }
        let untrusted = |reason: String| MaterialError::Untrusted {
            cert: cert_path.to_path_buf(),
            anchors: anchors_path.to_path_buf(),
            reason,
        };
        for pair in parsed_chain.windows(2) {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .map_err(|e| {
                    untrusted(format!(
                        "{:?} is not signed by {:?}: {e}",
                        pair[0].subject().to_string(),
                        pair[1].subject().to_string()
                    ))
                })?;
        }
        let top = parsed_chain.last().expect("chain is not empty");
        if !parsed_anchors
            .iter()
            .any(|a| top.verify_signature(Some(a.public_key())).is_ok())
        {
            return Err(untrusted(format!(
                "{:?} is signed by none of the {} anchors",
                top.subject().to_string(),
                parsed_anchors.len()
            )));
        }

        let issuer_not_after = not_after(issuer_cert);
        let issuer_subject = issuer_cert.subject().to_string();
        let anchors = anchor_ders
            .iter()
            .zip(&parsed_anchors)
            .map(|(der, p)| Anchor {
                der: der.clone(),
                subject: p.subject().to_string(),
                not_after: not_after(p),
            })
            .collect();
        drop(parsed_chain);
        drop(parsed_anchors);
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| bad(cert_path, format!("cannot use as issuer: {e}")))?;
        Ok(Self {
            issuer,
            chain,
            issuer_not_after,
            issuer_subject,
            anchors,
        })
    }
}

fn read_string(path: &Path) -> Result<String, MaterialError> {
    std::fs::read_to_string(path).map_err(|source| MaterialError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let pem = read_string(path)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MaterialError::BadCertificate {
            path: path.to_path_buf(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(MaterialError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| format!("invalid certificate: {e}"))
}

pub fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    let secs = cert.validity().not_after.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
