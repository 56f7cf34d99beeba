//! Certify over real TLS on loopback: who gets what, and every refusal with
//! its code and reason. Metrics count exactly these outcomes.

mod common;

use common::{certify, connect, csr_with, p256_csr};
use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Code;
use weft_identity::authority::LeafPolicy;
use weft_identity::testing::{LocalCa, TestPod, metric_value};
use weft_identity_api::CA_SERVER_NAME;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

fn pods() -> Vec<TestPod> {
    vec![
        TestPod::new("demo", "client-0", "client", "node-a"),
        TestPod::new("demo", "server-0", "server", "node-b"),
    ]
}

async fn start() -> LocalCa {
    let mut policy = LeafPolicy::new("cluster.local");
    policy.ttl = Duration::from_secs(3600);
    policy.clock_skew = Duration::from_secs(60);
    LocalCa::start(policy, &pods()).await.expect("CA starts")
}

enum Token {
    None,
    Node(&'static str),
    Raw(&'static str),
}

struct Case {
    name: &'static str,
    token: Token,
    identity: &'static str,
    csr: fn() -> Vec<u8>,
    code: Code,
    /// Substring the refusal message must contain (what tells the operator why).
    reason: &'static str,
}

fn ok_csr() -> Vec<u8> {
    p256_csr(CLIENT).1
}

#[tokio::test]
async fn refusals_table() {
    let ca = start().await;
    let mut client = connect(ca.addr(), &ca.anchors_pem(), "localhost").await;
    let cases = [
        Case {
            name: "no credential",
            token: Token::None,
            identity: CLIENT,
            csr: ok_csr,
            code: Code::Unauthenticated,
            reason: "no credential presented",
        },
        Case {
            name: "unknown credential",
            token: Token::Raw("not-a-node-token"),
            identity: CLIENT,
            csr: ok_csr,
            code: Code::Unauthenticated,
            reason: "not recognised",
        },
        Case {
            name: "identity of a pod on another node",
            token: Token::Node("node-b"),
            identity: CLIENT,
            csr: ok_csr,
            code: Code::PermissionDenied,
            reason: "demo/client-0 on node-a",
        },
        Case {
            name: "identity no pod uses",
            token: Token::Node("node-a"),
            identity: "spiffe://cluster.local/ns/demo/sa/nobody",
            csr: || p256_csr("spiffe://cluster.local/ns/demo/sa/nobody").1,
            code: Code::PermissionDenied,
            reason: "no pod uses this service account",
        },
        Case {
            name: "foreign trust domain",
            token: Token::Node("node-a"),
            identity: "spiffe://other.example/ns/demo/sa/client",
            csr: || p256_csr("spiffe://other.example/ns/demo/sa/client").1,
            code: Code::InvalidArgument,
            reason: "outside this CA's trust domain",
        },
        Case {
            name: "not a SPIFFE ID",
            token: Token::Node("node-a"),
            identity: "demo/client",
            csr: ok_csr,
            code: Code::InvalidArgument,
            reason: "is not a SPIFFE ID",
        },
        Case {
            name: "garbage CSR",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || b"certainly not DER".to_vec(),
            code: Code::InvalidArgument,
            reason: "not a DER PKCS#10",
        },
        Case {
            name: "empty CSR",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: Vec::new,
            code: Code::InvalidArgument,
            reason: "CSR is empty",
        },
        Case {
            name: "oversized CSR",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || vec![0x30; 8 * 1024],
            code: Code::InvalidArgument,
            reason: "the limit is 4096",
        },
        Case {
            name: "SAN is another identity",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || p256_csr(SERVER).1,
            code: Code::InvalidArgument,
            reason: "must be exactly the URI spiffe://cluster.local/ns/demo/sa/client",
        },
        Case {
            name: "extra DNS SAN",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || csr_with(&PKCS_ECDSA_P256_SHA256, &[CLIENT], &["evil.example"]).1,
            code: Code::InvalidArgument,
            reason: "DNS:evil.example",
        },
        Case {
            name: "no SAN",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || csr_with(&PKCS_ECDSA_P256_SHA256, &[], &[]).1,
            code: Code::InvalidArgument,
            reason: "has no subjectAltName",
        },
        Case {
            name: "P-384 key",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || csr_with(&PKCS_ECDSA_P384_SHA384, &[CLIENT], &[]).1,
            code: Code::InvalidArgument,
            reason: "not ECDSA P-256",
        },
        Case {
            name: "Ed25519 key",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || csr_with(&PKCS_ED25519, &[CLIENT], &[]).1,
            code: Code::InvalidArgument,
            reason: "not ECDSA P-256",
        },
        Case {
            name: "signature does not verify",
            token: Token::Node("node-a"),
            identity: CLIENT,
            csr: || {
                let mut csr = ok_csr();
                // The last bytes are the signature's S integer.
                let n = csr.len();
                csr[n - 3] ^= 0x55;
                csr
            },
            code: Code::InvalidArgument,
            reason: "signature does not verify",
        },
    ];
    for case in &cases {
        let token = match case.token {
            Token::None => None,
            Token::Node(n) => Some(ca.token(n)),
            Token::Raw(t) => Some(t.to_string()),
        };
        let err = certify(&mut client, token.as_deref(), case.identity, (case.csr)())
            .await
            .expect_err(case.name);
        assert_eq!(err.code(), case.code, "{}: {err:?}", case.name);
        assert!(
            err.message().contains(case.reason),
            "{}: message {:?} lacks {:?}",
            case.name,
            err.message(),
            case.reason
        );
    }
    // A request far beyond any CSR is not even decoded.
    let err = certify(
        &mut client,
        Some(&ca.token("node-a")),
        CLIENT,
        vec![0; 1 << 20],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // The service kept serving through all of that.
    let ok = certify(&mut client, Some(&ca.token("node-a")), CLIENT, ok_csr()).await;
    assert!(ok.is_ok(), "{ok:?}");

    let text = ca.scrape().await;
    let count = |result: &str| {
        metric_value(
            &text,
            &format!("weft_identity_certificates_issued_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("issued"), 1.0, "{text}");
    assert_eq!(count("unauthenticated"), 2.0, "{text}");
    assert_eq!(count("permission_denied"), 2.0, "{text}");
    assert_eq!(count("invalid_argument"), 11.0, "{text}");
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn issues_a_spiffe_leaf_that_chains_to_the_anchor() {
    let ca = start().await;
    // The Kubernetes Service name works as well as localhost.
    let mut client = connect(ca.addr(), &ca.anchors_pem(), CA_SERVER_NAME).await;
    let (key, csr) = p256_csr(SERVER);
    let before = SystemTime::now();
    let reply = certify(&mut client, Some(&ca.token("node-b")), SERVER, csr)
        .await
        .expect("issued");
    let (_, leaf) = X509Certificate::from_der(&reply.leaf).unwrap();

    assert_eq!(uri_sans(&leaf), vec![format!("URI:{SERVER}")]);
    assert!(leaf.subject().iter().next().is_none(), "empty subject");
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth, "{eku:?}");
    assert!(!leaf.is_ca());
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    let now = before.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(
        (now - 62..=now - 59).contains(&not_before),
        "back-dated by the skew: {not_before} vs {now}"
    );
    assert!(
        (now + 3599..=now + 3602).contains(&not_after),
        "1 h lifetime: {not_after} vs {now}"
    );
    assert_eq!(reply.valid_until, not_after);
    assert!(leaf.raw_serial()[0] & 0x80 == 0, "positive serial");
    assert!(leaf.raw_serial().len() >= 15, "random 128-bit serial");

    // The chain verifies against the trust anchor, as a peer would check it.
    let anchor_pem = ca.anchors_pem();
    let anchors: Vec<CertificateDer> =
        rustls_pki_types::pem::PemObject::pem_slice_iter(&anchor_pem)
            .collect::<Result<_, _>>()
            .unwrap();
    let anchors: Vec<_> = anchors
        .iter()
        .map(|a| webpki::anchor_from_trusted_cert(a).unwrap())
        .collect();
    let leaf_der = CertificateDer::from(reply.leaf.clone());
    let intermediates: Vec<CertificateDer> = reply
        .intermediates
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    assert_eq!(intermediates.len(), 1, "the issuer");
    webpki::EndEntityCert::try_from(&leaf_der)
        .unwrap()
        .verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .expect("chain verifies");

    // Serials are random: a second certificate has another one.
    let again = certify(
        &mut client,
        Some(&ca.token("node-b")),
        SERVER,
        p256_csr(SERVER).1,
    )
    .await
    .unwrap();
    let (_, again) = X509Certificate::from_der(&again.leaf).unwrap();
    assert_ne!(again.raw_serial(), leaf.raw_serial());
}

#[tokio::test]
async fn pods_moving_between_nodes_move_the_permission() {
    let ca = start().await;
    let mut client = connect(ca.addr(), &ca.anchors_pem(), "127.0.0.1").await;
    certify(&mut client, Some(&ca.token("node-a")), CLIENT, ok_csr())
        .await
        .expect("client pod is on node-a");
    // The pod is rescheduled to node-b: the state file changes.
    ca.set_pods(&[
        TestPod::new("demo", "client-0", "client", "node-b"),
        TestPod::new("demo", "server-0", "server", "node-b"),
    ]);
    let err = certify(&mut client, Some(&ca.token("node-a")), CLIENT, ok_csr())
        .await
        .expect_err("node-a no longer runs it");
    assert_eq!(err.code(), Code::PermissionDenied);
    certify(&mut client, Some(&ca.token("node-b")), CLIENT, ok_csr())
        .await
        .expect("node-b runs it now");
    // The state file disappears (simulator down): the CA says so, and keeps serving.
    std::fs::remove_file(ca.state_file()).unwrap();
    let err = certify(&mut client, Some(&ca.token("node-b")), CLIENT, ok_csr())
        .await
        .expect_err("no cluster state");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("weft-sim status"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn expiry_gauges_match_the_files() {
    let ca = start().await;
    let text = ca.scrape().await;
    let material = ca.running().unwrap().authority.material();
    let issuer_expiry = weft_identity::material::unix_seconds(material.issuer_not_after) as f64;
    assert_eq!(
        metric_value(&text, "weft_identity_issuer_expiry_timestamp_seconds"),
        Some(issuer_expiry),
        "{text}"
    );
    let anchor = &material.anchors[0];
    let series = format!(
        "weft_identity_trust_anchor_expiry_timestamp_seconds{{subject=\"{}\"}}",
        anchor.subject
    );
    assert_eq!(
        metric_value(&text, &series),
        Some(weft_identity::material::unix_seconds(anchor.not_after) as f64),
        "{text}"
    );
}

/// The bundle stream: current anchors first, a new message on rotation;
/// strangers get nothing.
#[tokio::test]
async fn trust_bundle_stream_follows_ca_crt() {
    use weft_identity_api::pb::WatchTrustBundleRequest;
    let ca = start().await;
    let mut client = connect(ca.addr(), &ca.anchors_pem(), "localhost").await;

    let err = client
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut request = tonic::Request::new(WatchTrustBundleRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", ca.token("node-a")).parse().unwrap(),
    );
    let mut stream = client
        .watch_trust_bundle(request)
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.trust_domain, "cluster.local");
    assert_eq!(first.anchors.len(), 1);

    let anchor2 = weft_identity::init::trust_anchor(
        "cluster.local",
        "2",
        Duration::from_secs(365 * 24 * 3600),
    )
    .unwrap();
    weft_identity::init::write_anchors(&ca.ca_dir(), &[&ca.anchor, &anchor2]).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("rotation pushed")
        .unwrap()
        .unwrap();
    assert_eq!(second.anchors.len(), 2);
    assert_eq!(
        second.anchors[0], first.anchors[0],
        "old anchor still in force"
    );
}

/// A caller that keeps failing is refused before it costs the CA anything
/// (no TokenReview, no CSR parse): after `FAILURE_BURST` failures from one
/// address, RESOURCE_EXHAUSTED with a retry hint, counted as
/// `rate_limited`. A node proxy whose token authenticated before is not
/// locked out by a neighbour failing from the same address.
#[tokio::test]
async fn a_caller_that_keeps_failing_is_refused_at_once() {
    use weft_identity::service::FAILURE_BURST;
    let ca = start().await;
    let mut client = connect(ca.addr(), &ca.anchors_pem(), "localhost").await;
    let node_a = ca.token("node-a");
    certify(&mut client, Some(&node_a), CLIENT, ok_csr())
        .await
        .expect("node-a's proxy is served");
    for i in 0..FAILURE_BURST {
        let err = certify(&mut client, Some("not-a-token"), CLIENT, ok_csr())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "failure {i}");
    }
    let limited = certify(&mut client, Some("not-a-token"), CLIENT, ok_csr())
        .await
        .unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert!(
        limited.message().contains("retry in"),
        "{}",
        limited.message()
    );
    // The known node proxy from the same address still gets certificates.
    certify(&mut client, Some(&node_a), CLIENT, ok_csr())
        .await
        .expect("a known credential is not locked out");
    let metrics = ca.scrape().await;
    assert_eq!(
        metric_value(
            &metrics,
            "weft_identity_certificates_issued_total{result=\"rate_limited\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}
