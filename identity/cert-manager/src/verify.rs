//! rustls certificate verifiers for mesh connections: chain to the *current*
//! trust bundle, then check the peer's SPIFFE identity.
//!
//! - Client side ([`SpiffeServerVerifier`]): the server must be exactly the
//!   identity the client expects to reach (the destination workload's).
//! - Server side ([`SpiffeClientVerifier`]): any identity of our trust domain
//!   is authenticated; *which* may connect is policy's decision, so the
//!   identity is handed on ([`peer_identity`]).
//!
//! Names in the TLS sense (SNI, DNS SANs) play no part: mesh certificates
//! carry one URI SAN, which is the identity.

use crate::bundle::TrustBundle;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::Arc;
use tokio::sync::watch;
use weft_identity_api::SpiffeId;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Where the verifiers read the bundle from at each handshake.
pub type BundleWatch = watch::Receiver<Arc<TrustBundle>>;

fn algorithms() -> WebPkiSupportedAlgorithms {
    ring::default_provider().signature_verification_algorithms
}

/// Verifies `end_entity` (+ `intermediates`) against `bundle` for `usage`
/// and returns the SPIFFE ID in its URI SAN.
pub fn verify_chain(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    })?;
    cert.verify_for_usage(
        algorithms().all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    let id = spiffe_id_of(end_entity)?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(identity_error(format!(
            "peer {id} is not in trust domain {:?}",
            bundle.trust_domain()
        )));
    }
    Ok(id)
}

/// The SPIFFE ID of a certificate: its one URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?
        .ok_or_else(|| identity_error("peer certificate has no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri
            .parse()
            .map_err(|e| identity_error(format!("peer URI SAN: {e}"))),
        _ => Err(identity_error(format!(
            "peer certificate must carry exactly one URI SAN, has {}",
            uris.len()
        ))),
    }
}

/// The authenticated SPIFFE ID of the peer of a finished handshake (for
/// policy on the server side). `None` if the peer sent no certificate.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let certs = conn.peer_certificates()?;
    spiffe_id_of(certs.first()?).ok()
}

/// When the peer's certificate of a finished handshake expires: what
/// bounds the connection (no new streams after it). `None` if the peer
/// sent none or it does not parse (the handshake verified it, so this does
/// not happen).
pub fn peer_not_after(conn: &rustls::CommonState) -> Option<std::time::SystemTime> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

fn identity_error(message: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        IdentityMismatch(message),
    ))))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct IdentityMismatch(String);

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// Client side: the server must present `expected`, chained to the bundle.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: BundleWatch,
    expected: SpiffeId,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: BundleWatch, expected: SpiffeId) -> Self {
        Self { bundle, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bundle = self.bundle.borrow().clone();
        let id = verify_chain(
            &bundle,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if id != self.expected {
            return Err(identity_error(format!(
                "server is {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: any client of the bundle's trust domain, certificate required.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: BundleWatch,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: BundleWatch) -> Self {
        Self { bundle }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every client has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let bundle = self.bundle.borrow().clone();
        verify_chain(
            &bundle,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Client side of the connection to the CA itself: the CA's serving
/// certificate must chain to the bundle and name `server_name` (DNS or IP).
#[derive(Debug)]
pub struct CaServerVerifier {
    bundle: BundleWatch,
}

impl CaServerVerifier {
    pub fn new(bundle: BundleWatch) -> Self {
        Self { bundle }
    }
}

impl ServerCertVerifier for CaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bundle = self.bundle.borrow().clone();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        cert.verify_for_usage(
            algorithms().all,
            bundle.anchors(),
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        cert.verify_is_valid_for_subject_name(server_name)
            .map_err(webpki_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};
    use std::time::Duration;
    use weft_identity::authority::{Authority, LeafPolicy};
    use weft_identity::init;
    use weft_identity::material::Material;

    const ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

    fn self_signed(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn spiffe_id_needs_exactly_one_uri_san() {
        assert_eq!(
            spiffe_id_of(&self_signed(vec![uri(ID)]))
                .unwrap()
                .to_string(),
            ID
        );
        for sans in [
            vec![],
            vec![SanType::DnsName("client.demo".try_into().unwrap())],
            vec![uri(ID), uri("spiffe://cluster.local/ns/demo/sa/other")],
            vec![uri("https://example.com/")],
        ] {
            assert!(
                spiffe_id_of(&self_signed(sans.clone())).is_err(),
                "{sans:?}"
            );
        }
        assert!(spiffe_id_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }

    /// A leaf from a real issuer: valid now, expired later, and refused by a
    /// bundle of another trust domain even though the anchor is the same.
    #[test]
    fn chain_time_and_trust_domain_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let year = Duration::from_secs(365 * 24 * 3600);
        let anchor = init::trust_anchor("cluster.local", "1", year).unwrap();
        let issuer = init::issuer(&anchor, "cluster.local", "1", year).unwrap();
        init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
        let mut policy = LeafPolicy::new("cluster.local");
        policy.ttl = Duration::from_secs(3600);
        let authority = Authority::new(policy, Material::load(dir.path()).unwrap());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri(ID)];
        let csr = params.serialize_request(&key).unwrap();
        let signed = authority.certify(&ID.parse().unwrap(), csr.der()).unwrap();

        let bundle = TrustBundle::from_pem("cluster.local", anchor.cert_pem.as_bytes()).unwrap();
        let now = UnixTime::now();
        let usage = webpki::KeyUsage::client_auth;
        assert_eq!(
            verify_chain(&bundle, &signed.leaf, &signed.intermediates, now, usage())
                .unwrap()
                .to_string(),
            ID
        );
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 7200));
        assert!(matches!(
            verify_chain(&bundle, &signed.leaf, &signed.intermediates, later, usage()),
            Err(Error::InvalidCertificate(CertificateError::Expired))
        ));
        // Without the issuer in the chain, the leaf does not reach the anchor.
        assert!(matches!(
            verify_chain(&bundle, &signed.leaf, &[], now, usage()),
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        ));
        let other = TrustBundle::from_pem("other.local", anchor.cert_pem.as_bytes()).unwrap();
        let err =
            verify_chain(&other, &signed.leaf, &signed.intermediates, now, usage()).unwrap_err();
        assert!(err.to_string().contains("not in trust domain"), "{err}");
    }
}
