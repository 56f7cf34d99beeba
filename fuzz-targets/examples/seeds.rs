//! Writes the seeds only a real client can make into `fuzz/corpus`: the
//! HTTP/2 bytes an HBONE client sends (`hbone_connect`) and CSRs as node
//! proxies make them (`csr`). Run again when those formats change:
//! `cargo run -p weft-fuzz-targets --example seeds`.

use bytes::Bytes;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What an h2 client writes to open `targets` (with `header` and `body`),
/// then close.
async fn client_bytes(targets: &[&str], header: Option<&str>, body: &[u8]) -> Vec<u8> {
    let (client_io, mut server_io) = tokio::io::duplex(1 << 20);
    let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut open = Vec::new();
    for target in targets {
        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(*target);
        if let Some(h) = header {
            request = request.header("weft-protocol", h);
        }
        client = client.ready().await.unwrap();
        let (_response, mut send) = client
            .send_request(request.body(()).unwrap(), false)
            .unwrap();
        send.send_data(Bytes::copy_from_slice(body), true).unwrap();
        open.push((_response, send));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    conn.abort();
    drop((client, open));
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(Ok(n)) = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        server_io.read(&mut buf),
    )
    .await
    {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = corpus("hbone_connect");
    for (name, targets, header, body) in [
        (
            "connect-ipv4",
            &["10.0.0.7:8081"][..],
            Some("http/1.1"),
            &b"GET / HTTP/1.1\r\n\r\n"[..],
        ),
        (
            "connect-ipv6",
            &["[fd00::7]:8081"][..],
            Some("opaque"),
            b"ping",
        ),
        ("connect-name", &["app.demo.svc:80"][..], None, b""),
        (
            "connect-two-streams",
            &["10.0.0.7:8081", "10.0.0.8:9000"][..],
            Some("h2"),
            b"x",
        ),
    ] {
        let bytes = client_bytes(targets, header, body).await;
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    let dir = corpus("csr");
    let id = "spiffe://cluster.local/ns/demo/sa/client";
    for (name, san, alg) in [
        ("valid", id, &rcgen::PKCS_ECDSA_P256_SHA256),
        (
            "other-identity",
            "spiffe://cluster.local/ns/demo/sa/server",
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ),
        ("p384-key", id, &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519-key", id, &rcgen::PKCS_ED25519),
    ] {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        std::fs::write(dir.join(name), der).unwrap();
    }
}
