//! The CA directory: loading, refusing inconsistent sets, following
//! rotations without a restart, leaf lifetime capped at the issuer's.

mod common;

use common::{certify, connect, p256_csr};
use std::time::{Duration, SystemTime};
use weft_identity::authority::{Authority, LeafPolicy};
use weft_identity::init;
use weft_identity::material::{Material, MaterialError};
use weft_identity::testing::{LocalCa, TestPod, metric_value};
use weft_identity_api::SpiffeId;
use x509_parser::prelude::{FromDer, X509Certificate};

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

#[test]
fn inconsistent_sets_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = init::trust_anchor("cluster.local", "1", YEAR).unwrap();
    let issuer = init::issuer(&anchor, "cluster.local", "1", YEAR).unwrap();
    let other_anchor = init::trust_anchor("cluster.local", "2", YEAR).unwrap();
    let other_issuer = init::issuer(&other_anchor, "cluster.local", "2", YEAR).unwrap();

    // Missing files.
    let err = Material::load(dir.path()).err().unwrap();
    assert!(matches!(err, MaterialError::Read { .. }), "{err}");

    // Consistent.
    init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
    Material::load(dir.path()).expect("consistent set loads");

    // Key of another issuer (a rotation caught half-way).
    std::fs::write(dir.path().join("tls.key"), other_issuer.key_pem()).unwrap();
    let err = Material::load(dir.path()).err().unwrap();
    assert!(matches!(err, MaterialError::KeyMismatch { .. }), "{err}");

    // Issuer not signed by any anchor in force.
    init::write_layout(dir.path(), &other_issuer, &[&anchor]).unwrap();
    let err = Material::load(dir.path()).err().unwrap();
    assert!(matches!(err, MaterialError::Untrusted { .. }), "{err}");
    assert!(err.to_string().contains("none of the 1 anchors"), "{err}");

    // Garbage.
    std::fs::write(dir.path().join("ca.crt"), "not PEM at all").unwrap();
    let err = Material::load(dir.path()).err().unwrap();
    assert!(matches!(err, MaterialError::NoCertificate { .. }), "{err}");

    // A SEC1 key: the message says how to fix it with cert-manager.
    init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
    std::fs::write(
        dir.path().join("tls.key"),
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIDK=\n-----END EC PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = Material::load(dir.path()).err().unwrap();
    assert!(err.to_string().contains("encoding: PKCS8"), "{err}");

    // A workload certificate (not a CA) as issuer is refused.
    init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
    let authority = Authority::new(
        LeafPolicy::new("cluster.local"),
        Material::load(dir.path()).unwrap(),
    );
    let (key, csr) = p256_csr(CLIENT);
    let leaf = authority.certify(&CLIENT.parse().unwrap(), &csr).unwrap();
    let leaf_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64(&leaf.leaf)
    );
    std::fs::write(dir.path().join("tls.crt"), leaf_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    let err = Material::load(dir.path()).err().unwrap();
    assert!(matches!(err, MaterialError::NotCa { .. }), "{err}");
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn leaf_lifetime_is_capped_at_the_issuer_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = init::trust_anchor("cluster.local", "1", YEAR).unwrap();
    // The issuer has 2 hours left; leaves would get 24 h.
    let issuer =
        init::issuer(&anchor, "cluster.local", "short", Duration::from_secs(7200)).unwrap();
    init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
    let material = Material::load(dir.path()).unwrap();
    let issuer_not_after = material.issuer_not_after;
    let authority = Authority::new(LeafPolicy::new("cluster.local"), material);
    let id: SpiffeId = CLIENT.parse().unwrap();
    let signed = authority.certify(&id, &p256_csr(CLIENT).1).unwrap();
    let (_, leaf) = X509Certificate::from_der(&signed.leaf).unwrap();
    assert_eq!(
        leaf.validity().not_after.timestamp(),
        weft_identity::material::unix_seconds(issuer_not_after)
    );
    assert!(signed.not_after < SystemTime::now() + Duration::from_secs(7201));
}

fn issuer_of(leaf: &[u8]) -> String {
    let (_, leaf) = X509Certificate::from_der(leaf).unwrap();
    leaf.issuer().to_string()
}

/// cert-manager replaces the issuer: the CA signs with the new one without a
/// restart; a broken set on disk leaves the CA issuing with the last good one.
#[tokio::test]
async fn follows_issuer_rotation_and_survives_bad_files() {
    let ca = LocalCa::start(
        LeafPolicy::new("cluster.local"),
        &[TestPod::new("demo", "c", "client", "node-a")],
    )
    .await
    .unwrap();
    let token = ca.token("node-a");
    let mut client = connect(ca.addr(), &ca.anchors_pem(), "localhost").await;
    let first = certify(&mut client, Some(&token), CLIENT, p256_csr(CLIENT).1)
        .await
        .unwrap();
    assert!(issuer_of(&first.leaf).contains("Weft issuer cluster.local 1"));

    let issuer2 = init::issuer(&ca.anchor, "cluster.local", "2", YEAR).unwrap();
    init::write_layout(&ca.ca_dir(), &issuer2, &[&ca.anchor]).unwrap();
    let mut rotated = false;
    for _ in 0..100 {
        let reply = certify(&mut client, Some(&token), CLIENT, p256_csr(CLIENT).1)
            .await
            .unwrap();
        if issuer_of(&reply.leaf).contains("Weft issuer cluster.local 2") {
            assert_eq!(reply.intermediates[0], pem_der(&issuer2.cert_pem));
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the CA never switched to the new issuer");

    // A key from elsewhere lands on disk: refused, old issuer (2) kept.
    let stray = init::issuer(&ca.anchor, "cluster.local", "3", YEAR).unwrap();
    std::fs::write(ca.ca_dir().join("tls.key"), stray.key_pem()).unwrap();
    let mut errors = 0.0;
    for _ in 0..100 {
        errors = metric_value(
            &ca.scrape().await,
            "weft_identity_material_reloads_total{result=\"error\"}",
        )
        .unwrap_or(0.0);
        if errors > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(errors > 0.0, "the bad set was never looked at");
    let reply = certify(&mut client, Some(&token), CLIENT, p256_csr(CLIENT).1)
        .await
        .expect("still issuing");
    assert!(issuer_of(&reply.leaf).contains("Weft issuer cluster.local 2"));
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn init_command_writes_a_loadable_ca() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ca");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_weft-identity"))
        .args(["init", "--trust-domain", "cluster.local", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let material = Material::load(&out).expect("init output loads");
    assert_eq!(material.anchors.len(), 1);
    assert!(material.issuer_not_after > SystemTime::now() + Duration::from_secs(300 * 24 * 3600));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("tls.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the issuer key is private");
}

/// The issuer key is its owner's only, also when `write_layout` finds the
/// temporary file of a crashed earlier write with a wider mode (`open` with
/// a mode does not change an existing file's).
#[test]
fn the_issuer_key_is_private_even_over_a_leftover_temporary_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let anchor = init::trust_anchor("cluster.local", "1", YEAR).unwrap();
    let issuer = init::issuer(&anchor, "cluster.local", "1", YEAR).unwrap();
    let leftover = dir.path().join("tls.tmp");
    std::fs::write(&leftover, "half a key").unwrap();
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
    init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("tls.key"), 0o600);
    assert_eq!(mode("ca.crt"), 0o644);
    Material::load(dir.path()).expect("the layout loads");
}
