//! A gRPC client for the CA over real TLS, verifying the CA's serving
//! certificate against the trust anchors with the stock webpki verifier
//! (what any client would do), plus CSR builders for the refusal cases.

#![allow(dead_code)]

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, SignatureAlgorithm};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use weft_identity_api::pb::identity_client::IdentityClient;
use weft_identity_api::pb::{CertifyRequest, CertifyResponse};

pub async fn connect(
    addr: SocketAddr,
    anchors_pem: &[u8],
    server_name: &str,
) -> IdentityClient<Channel> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(anchors_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let connect = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        let name = name.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connect)
        .await
        .expect("TLS connection to the CA");
    IdentityClient::new(channel)
}

pub async fn certify(
    client: &mut IdentityClient<Channel>,
    token: Option<&str>,
    identity: &str,
    csr: Vec<u8>,
) -> Result<CertifyResponse, tonic::Status> {
    let mut request = tonic::Request::new(CertifyRequest {
        identity: identity.to_string(),
        csr,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    client.certify(request).await.map(|r| r.into_inner())
}

/// A CSR with these URI / DNS SANs, signed by a new key of `alg`.
pub fn csr_with(
    alg: &'static SignatureAlgorithm,
    uris: &[&str],
    dns: &[&str],
) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for u in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*u).try_into().unwrap()));
    }
    for d in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName((*d).try_into().unwrap()));
    }
    let csr = params.serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

pub fn p256_csr(uri: &str) -> (KeyPair, Vec<u8>) {
    csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &[uri], &[])
}
