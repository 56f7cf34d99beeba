//! The mesh verifiers refuse what they must, over real TLS on loopback:
//! the wrong server identity, a client without a certificate, a chain from
//! an anchor not in the bundle.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_cert_manager::{SpiffeId, peer_identity};
use weft_identity::testing::TestPod;

/// Runs one handshake; returns (client result, server result).
async fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> (Result<(), String>, Result<Option<SpiffeId>, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(tls) => Ok(peer_identity(tls.get_ref().1)),
            Err(e) => Err(e.to_string()),
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("mesh.invalid").unwrap();
    let client = match TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
    {
        Ok(mut tls) => {
            // Make the server finish its side (TLS 1.3 client auth completes
            // when the server reads the client's Finished).
            use tokio::io::AsyncWriteExt;
            let _ = tls.write_all(b"x").await;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    let server = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server side in time")
        .unwrap();
    (client, server)
}

#[tokio::test]
async fn peer_identity_is_checked_on_both_sides() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    ca.set_pods(&[
        TestPod::new("demo", "client-0", "client", "node-a"),
        TestPod::new("demo", "server-0", "server", "node-b"),
        TestPod::new("demo", "other-0", "other", "node-b"),
    ]);
    let node_a = Node::new(&ca, "node-a");
    let node_b = Node::new(&ca, "node-b");
    let other: SpiffeId = "spiffe://cluster.local/ns/demo/sa/other".parse().unwrap();

    // The right server: both sides learn the peer's identity.
    let (c, s) = handshake(
        node_a
            .manager
            .client_config(&client_id(), server_id())
            .await
            .unwrap(),
        node_b.manager.server_config(&server_id()).await.unwrap(),
    )
    .await;
    assert_eq!(c, Ok(()));
    assert_eq!(
        s,
        Ok(Some(client_id())),
        "server sees the client's SPIFFE ID"
    );

    // A server presenting another workload's identity is refused by the client.
    let (c, _) = handshake(
        node_a
            .manager
            .client_config(&client_id(), server_id())
            .await
            .unwrap(),
        node_b.manager.server_config(&other).await.unwrap(),
    )
    .await;
    let err = c.unwrap_err();
    assert!(
        err.contains(&format!("server is {other}, expected {SERVER}")),
        "{err}"
    );

    // A client without a certificate is refused by the server.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca.anchors_pem()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(weft_cert_manager::SpiffeServerVerifier::new(
        node_a.manager.trust_bundle(),
        server_id(),
    )))
    .with_no_client_auth();
    let (_, s) = handshake(
        anonymous,
        node_b.manager.server_config(&server_id()).await.unwrap(),
    )
    .await;
    let err = s.unwrap_err();
    assert!(
        err.contains("peer sent no certificates") || err.contains("NoCertificates"),
        "{err}"
    );

    // A client whose chain leads to another CA (same trust domain name) is refused.
    let rogue = start_ca(Duration::from_secs(3600)).await;
    let rogue_node = Node::new(&rogue, "node-a");
    rogue_node.manager.register_pod(&client_id());
    rogue_node.manager.certificate(&client_id()).await.unwrap();
    // It trusts the real server, but presents the rogue CA's certificate.
    let rogue_client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(weft_cert_manager::SpiffeServerVerifier::new(
        node_a.manager.trust_bundle(),
        server_id(),
    )))
    .with_client_cert_resolver(Arc::new(weft_cert_manager::IdentityResolver::new(
        rogue_node.manager.watch_certificate(&client_id()),
    )));
    let (_, s) = handshake(
        rogue_client,
        node_b.manager.server_config(&server_id()).await.unwrap(),
    )
    .await;
    // Its anchor has the same name as ours, so webpki finds a candidate
    // issuer and rejects the signature.
    let err = s.unwrap_err();
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
}
