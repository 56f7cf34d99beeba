//! `weft-identity init`: a trust anchor and an issuer for local use (the
//! simulator, tests, a cluster without cert-manager). Written in the same
//! layout cert-manager produces, so `serve` cannot tell the difference.
//!
//! Keys are ECDSA P-256. The anchor is long-lived (10 years by default) and
//! only signs issuers; the issuer (1 year) signs workload certificates, so
//! rotating it never requires touching every node's trust.

use crate::material::{ISSUER_CERT_FILE, ISSUER_KEY_FILE, TRUST_ANCHORS_FILE};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A CA certificate with its key (a trust anchor or an issuer).
pub struct CaCert {
    pub cert_pem: String,
    pub key: KeyPair,
    params: CertificateParams,
}

impl CaCert {
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

fn ca_params(common_name: String, validity: Duration, path_len: Option<u8>) -> CertificateParams {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Weft");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Back-dated like workload certificates: clocks on nodes differ.
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = (now + validity).into();
    params.serial_number = Some(crate::authority::random_serial());
    params.use_authority_key_identifier_extension = true;
    params
}

/// A self-signed trust anchor for `trust_domain`. `label` distinguishes
/// anchors of successive rotations in their subject.
pub fn trust_anchor(
    trust_domain: &str,
    label: &str,
    validity: Duration,
) -> Result<CaCert, InitError> {
    let generate = |source| InitError::Generate {
        what: "trust anchor",
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let params = ca_params(
        format!("Weft trust anchor {trust_domain} {label}"),
        validity,
        None,
    );
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok(CaCert {
        cert_pem: cert.pem(),
        key,
        params,
    })
}

/// An issuer signed by `anchor`; it may sign workload certificates only.
pub fn issuer(
    anchor: &CaCert,
    trust_domain: &str,
    label: &str,
    validity: Duration,
) -> Result<CaCert, InitError> {
    let generate = |source| InitError::Generate {
        what: "issuer",
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let params = ca_params(
        format!("Weft issuer {trust_domain} {label}"),
        validity,
        Some(0),
    );
    let cert = params.signed_by(&key, &anchor.issuer()).map_err(generate)?;
    Ok(CaCert {
        cert_pem: cert.pem(),
        key,
        params,
    })
}

/// Writes `issuer` and the `anchors` bundle into `dir` in cert-manager's
/// layout. Each file is written to a temporary name and renamed, so a CA
/// watching `dir` never reads a half-written file; the key goes last-but-one
/// and the anchors first, the order in which a rotation stays verifiable.
pub fn write_layout(dir: &Path, issuer: &CaCert, anchors: &[&CaCert]) -> Result<(), InitError> {
    std::fs::create_dir_all(dir).map_err(|source| InitError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let bundle: String = anchors.iter().map(|a| a.cert_pem.as_str()).collect();
    write_atomic(&dir.join(TRUST_ANCHORS_FILE), bundle.as_bytes(), 0o644)?;
    write_atomic(
        &dir.join(ISSUER_KEY_FILE),
        issuer.key_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(
        &dir.join(ISSUER_CERT_FILE),
        issuer.cert_pem.as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Writes only the trust anchors bundle (`ca.crt`), as a rotation does.
pub fn write_anchors(dir: &Path, anchors: &[&CaCert]) -> Result<(), InitError> {
    let bundle: String = anchors.iter().map(|a| a.cert_pem.as_str()).collect();
    write_atomic(&dir.join(TRUST_ANCHORS_FILE), bundle.as_bytes(), 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InitError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| InitError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    // `mode` applies only to a file this call creates: a temporary file
    // left over by a crash keeps its own, so set it before writing the key.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
