//! Checks a workload's certificate signing request before anything is signed.
//!
//! The CA never copies fields from a CSR into a certificate: it takes the
//! public key (after checking the CSR is signed by its private key, so the
//! caller holds it) and builds everything else itself. The checks below exist
//! to refuse requests that show a confused or malicious caller, with a reason
//! the operator can act on.

use weft_identity_api::{MAX_CSR_BYTES, SpiffeId};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// Why a CSR was refused. Every variant maps to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is empty")]
    Empty,
    #[error("CSR is {0} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge(usize),
    #[error("CSR is not a DER PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR has {0} bytes after the request")]
    TrailingData(usize),
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    #[error("CSR key is not ECDSA P-256 (the only key type Weft signs)")]
    UnsupportedKey,
    #[error("CSR has no subjectAltName: it must carry exactly the URI {0}")]
    NoSan(String),
    #[error("CSR subjectAltName must be exactly the URI {expected}; found {found}")]
    SanMismatch { expected: String, found: String },
}

/// The public key of a CSR that passed every check: an uncompressed P-256
/// point (65 bytes), the only thing taken from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedKey {
    pub point: Vec<u8>,
}

/// Checks `der` is a well-formed, self-signed P-256 CSR whose only SAN is the
/// URI of `identity`.
pub fn check(der: &[u8], identity: &SpiffeId) -> Result<CheckedKey, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData(rest.len()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let point = spki.subject_public_key.data.as_ref();
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve != Some(OID_EC_P256)
        || point.len() != 65
        || point[0] != 0x04
    {
        return Err(CsrError::UnsupportedKey);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let expected = identity.uri();
    let mut names = Vec::new();
    let mut san_seen = false;
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                san_seen = true;
                names.extend(san.general_names.iter().map(describe));
            }
        }
    }
    if !san_seen || names.is_empty() {
        return Err(CsrError::NoSan(expected));
    }
    if names.len() != 1 || names[0] != format!("URI:{expected}") {
        return Err(CsrError::SanMismatch {
            expected,
            found: names.join(", "),
        });
    }
    Ok(CheckedKey {
        point: point.to_vec(),
    })
}

/// A SAN entry as an operator would read it in an error message.
fn describe(name: &GeneralName<'_>) -> String {
    let s = match name {
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        other => format!("{other:?}"),
    };
    // Bounded: the name comes from the caller and ends up in a log line.
    s.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    fn id() -> SpiffeId {
        "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap()
    }

    fn valid_csr() -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id().uri().try_into().unwrap())];
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_a_valid_request() {
        let key = check(&valid_csr(), &id()).unwrap();
        assert_eq!(key.point.len(), 65);
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut csr = valid_csr();
        csr.extend_from_slice(b"xx");
        assert_eq!(check(&csr, &id()), Err(CsrError::TrailingData(2)));
    }

    /// Arbitrary bytes, truncations and bit flips of a valid CSR: every input
    /// gets an answer and none panics; a mutation is accepted only where it
    /// cannot change what is signed. Bounded: a few thousand inputs, well
    /// under a second.
    #[test]
    fn fuzzed_input_never_panics() {
        let valid = valid_csr();
        let identity = id();
        let mut accepted = 0;
        for i in 0..4000u32 {
            let input: Vec<u8> = match i % 4 {
                0 => {
                    let len = rand::random_range(0..600);
                    (0..len).map(|_| rand::random()).collect()
                }
                1 => valid[..rand::random_range(0..valid.len())].to_vec(),
                2 => {
                    let mut m = valid.clone();
                    for _ in 0..rand::random_range(1..4) {
                        let at = rand::random_range(0..m.len());
                        m[at] ^= 1 << rand::random_range(0..8);
                    }
                    m
                }
                _ => {
                    // DER-looking garbage: a SEQUENCE header with random content.
                    let mut m = vec![0x30, 0x82, 0x01, 0x00];
                    m.extend((0..256).map(|_| rand::random::<u8>()));
                    m
                }
            };
            let result = std::panic::catch_unwind(|| check(&input, &identity));
            let result = result.unwrap_or_else(|_| panic!("panicked on input {input:02x?}"));
            if result.is_ok() {
                accepted += 1;
                // A flip can land in an unchecked field (e.g. the subject
                // tag's length is re-encoded identically); it must then still
                // carry a valid signature, which only an unchanged TBS has.
                assert!(input.len() == valid.len(), "accepted {input:02x?}");
            }
        }
        assert!(accepted < 50, "{accepted} mutated requests accepted");
    }
}
