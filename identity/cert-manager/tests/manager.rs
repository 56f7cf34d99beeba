//! The CertManager state machine under paused tokio time, with an in-process
//! CA (the real signing code, no network) whose availability the test
//! controls.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use weft_cert_manager::metrics::RefreshLabels;
use weft_cert_manager::{
    CaClient, CaError, CertManager, CertManagerConfig, CertManagerMetrics, CertifyReply,
    SharedTrustBundle, SpiffeId, TrustBundle,
};
use weft_identity::authority::{Authority, LeafPolicy};
use weft_identity::init;
use weft_identity::material::Material;

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

struct FakeCa {
    authority: Authority,
    anchors_pem: String,
    up: AtomicBool,
    /// How long each Certify takes (tokio time).
    delay: Mutex<Duration>,
    calls: Mutex<Vec<(SpiffeId, Instant, bool)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    bundles: tokio::sync::watch::Sender<Option<TrustBundle>>,
    _dir: tempfile::TempDir,
}

impl FakeCa {
    fn new(ttl: Duration) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let anchor = init::trust_anchor("cluster.local", "1", YEAR).unwrap();
        let issuer = init::issuer(&anchor, "cluster.local", "1", YEAR).unwrap();
        init::write_layout(dir.path(), &issuer, &[&anchor]).unwrap();
        let mut policy = LeafPolicy::new("cluster.local");
        policy.ttl = ttl;
        Arc::new(Self {
            authority: Authority::new(policy, Material::load(dir.path()).unwrap()),
            anchors_pem: anchor.cert_pem.clone(),
            up: AtomicBool::new(true),
            delay: Mutex::new(Duration::ZERO),
            calls: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            bundles: tokio::sync::watch::Sender::new(None),
            _dir: dir,
        })
    }

    fn calls_for(&self, id: &SpiffeId) -> Vec<(Instant, bool)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _, _)| i == id)
            .map(|(_, t, ok)| (*t, *ok))
            .collect()
    }
}

/// The manager's handle on the shared fake.
struct Ca(Arc<FakeCa>);

impl std::ops::Deref for Ca {
    type Target = FakeCa;
    fn deref(&self) -> &FakeCa {
        &self.0
    }
}

impl CaClient for Ca {
    fn certify<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, Result<CertifyReply, CaError>> {
        Box::pin(async move {
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(n, Ordering::SeqCst);
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let up = self.up.load(Ordering::SeqCst);
            self.calls
                .lock()
                .unwrap()
                .push((identity.clone(), Instant::now(), up));
            if !up {
                return Err(CaError::Unavailable("connection refused".into()));
            }
            let signed = self
                .authority
                .certify(identity, &csr)
                .map_err(|e| CaError::Refused {
                    code: "InvalidArgument".into(),
                    message: e.to_string(),
                })?;
            Ok(CertifyReply {
                leaf: signed.leaf.to_vec(),
                intermediates: signed.intermediates.iter().map(|c| c.to_vec()).collect(),
                valid_until: weft_identity::material::unix_seconds(signed.not_after),
            })
        })
    }

    fn watch_trust_bundle(
        &self,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<TrustBundle, CaError>>, CaError>> {
        Box::pin(async move {
            use futures::StreamExt;
            // The current bundle (if any), then every change.
            let stream = tokio_stream::wrappers::WatchStream::new(self.bundles.subscribe())
                .filter_map(|b| async move { b.map(Ok) });
            Ok(Box::pin(stream) as BoxStream<'static, _>)
        })
    }
}

struct Setup {
    ca: Arc<FakeCa>,
    manager: CertManager,
    metrics: CertManagerMetrics,
    registry: Registry,
}

fn setup(ttl: Duration, config: CertManagerConfig) -> Setup {
    let ca = FakeCa::new(ttl);
    let bundle = SharedTrustBundle::new(
        TrustBundle::from_pem("cluster.local", ca.anchors_pem.as_bytes()).unwrap(),
    );
    let mut registry = Registry::default();
    let metrics = CertManagerMetrics::register(&mut registry);
    let manager = CertManager::new(Arc::new(Ca(ca.clone())), bundle, config, metrics.clone());
    Setup {
        ca,
        manager,
        metrics,
        registry,
    }
}

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
        .parse()
        .unwrap()
}

fn config() -> CertManagerConfig {
    CertManagerConfig {
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
        ..CertManagerConfig::default()
    }
}

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}

#[tokio::test(start_paused = true)]
async fn refreshes_at_a_jittered_50_to_70_percent_of_lifetime() {
    let s = setup(Duration::from_secs(100), config());
    let a = id("a");
    s.manager.register_pod(&a);
    tokio::time::sleep(Duration::from_secs(1000)).await;
    let calls = s.ca.calls_for(&a);
    assert!(calls.iter().all(|(_, ok)| *ok));
    assert!(
        calls.len() >= 14 && calls.len() <= 21,
        "{} refreshes in 1000 s",
        calls.len()
    );
    let gaps: Vec<f64> = calls
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64())
        .collect();
    // Lifetime as received is 99–100 s (the CA's notAfter has whole seconds).
    for gap in &gaps {
        assert!(
            (49.0..=70.0).contains(gap),
            "refresh after {gap} s: {gaps:?}"
        );
    }
    let spread = gaps.iter().cloned().fold(f64::MIN, f64::max)
        - gaps.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 2.0, "refresh times are jittered: {gaps:?}");

    // The expiry gauge shows the certificate in service.
    let cert = s.manager.current_certificate(&a).unwrap();
    let expected = cert
        .valid_until
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let series =
        format!("weft_proxy_identity_cert_expiry_timestamp_seconds{{identity=\"{a}\"}} {expected}");
    assert!(text(&s.registry).contains(&series), "{}", text(&s.registry));
}

#[tokio::test(start_paused = true)]
async fn ca_outage_backs_off_serves_until_expiry_then_recovers() {
    let s = setup(Duration::from_secs(100), config());
    let a = id("a");
    s.manager.register_pod(&a);
    let first = s.manager.certificate(&a).await.unwrap();
    let issued_at = Instant::now();
    s.ca.up.store(false, Ordering::SeqCst);

    // Until expiry the certificate stays in service despite failures.
    tokio::time::sleep(Duration::from_secs(95)).await;
    assert_eq!(
        s.manager.current_certificate(&a).unwrap().serial,
        first.serial
    );
    // After expiry it is withdrawn (a peer would refuse it anyway).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        s.manager.current_certificate(&a).is_none(),
        "expired certificate withdrawn"
    );

    let lifetime = first
        .valid_until
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    let expired_at = issued_at + lifetime;
    let failures: Vec<Instant> =
        s.ca.calls_for(&a)
            .into_iter()
            .filter(|c| !c.1)
            .map(|c| c.0)
            .collect();
    assert!(!failures.is_empty());
    assert!(
        failures[0] - issued_at >= Duration::from_secs(49),
        "first retry only at the refresh point"
    );
    // Exponential backoff with jitter in [d/2, d], d = 1, 2, 4, 8, 8, …
    // (the wait that reaches the expiry is cut short there: the certificate
    // is withdrawn at that instant and a retry follows at once).
    for (k, w) in failures.windows(2).enumerate() {
        let gap = (w[1] - w[0]).as_secs_f64();
        let d = (1u64 << k.min(3)) as f64;
        let spans_expiry = w[0] < expired_at && w[1] + Duration::from_millis(10) >= expired_at;
        assert!(gap <= d + 0.01, "retry {k} after {gap} s");
        assert!(
            spans_expiry || gap >= d / 2.0 - 0.01,
            "retry {k} after {gap} s"
        );
    }
    let metric = |result| {
        s.metrics
            .refreshes
            .get_or_create(&RefreshLabels {
                identity: a.to_string(),
                result,
            })
            .get()
    };
    assert_eq!(metric("failure"), failures.len() as u64);
    assert_eq!(metric("success"), 1);

    // The CA returns: the next retry (≤ 8 s) succeeds.
    s.ca.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(9)).await;
    let renewed = s.manager.current_certificate(&a).expect("refresh resumed");
    assert_ne!(renewed.serial, first.serial);
    assert_eq!(metric("success"), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_are_bounded() {
    let s = setup(
        Duration::from_secs(3600),
        CertManagerConfig {
            max_concurrent_requests: 3,
            ..config()
        },
    );
    *s.ca.delay.lock().unwrap() = Duration::from_secs(1);
    let ids: Vec<_> = (0..10).map(|i| id(&format!("sa-{i}"))).collect();
    for i in &ids {
        s.manager.register_pod(i);
    }
    for i in &ids {
        s.manager.certificate(i).await.unwrap();
    }
    assert_eq!(s.ca.max_in_flight.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn identity_is_dropped_when_its_last_pod_leaves() {
    let s = setup(Duration::from_secs(100), config());
    let a = id("a");
    s.manager.register_pod(&a);
    s.manager.register_pod(&a);
    s.manager.certificate(&a).await.unwrap();
    s.manager.unregister_pod(&a);
    assert_eq!(
        s.manager.identities(),
        vec![a.clone()],
        "one pod still uses it"
    );
    s.manager.unregister_pod(&a);
    assert!(s.manager.identities().is_empty());
    assert!(s.manager.current_certificate(&a).is_none());
    assert!(
        !text(&s.registry).contains(&a.to_string()),
        "its metric series are gone"
    );
    let calls = s.ca.calls_for(&a).len();
    tokio::time::sleep(Duration::from_secs(500)).await;
    assert_eq!(s.ca.calls_for(&a).len(), calls, "no refresh after it left");
}

#[tokio::test(start_paused = true)]
async fn first_use_fetches_and_unclaimed_identities_expire_from_the_cache() {
    let s = setup(Duration::from_secs(100), config());
    let b = id("b");
    let cert = s.manager.certificate(&b).await.unwrap();
    assert_eq!(cert.identity, b);
    assert_eq!(s.manager.identities(), vec![b.clone()]);
    // No pod registered it: at its refresh point it is dropped, not renewed.
    tokio::time::sleep(Duration::from_secs(71)).await;
    assert!(s.manager.identities().is_empty());
    assert_eq!(s.ca.calls_for(&b).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn refused_requests_retry_and_other_identities_are_unaffected() {
    let s = setup(Duration::from_secs(100), config());
    // The fake CA refuses a foreign trust domain, as the real one does.
    let foreign: SpiffeId = "spiffe://other.example/ns/x/sa/y".parse().unwrap();
    let good = id("good");
    s.manager.register_pod(&foreign);
    s.manager.register_pod(&good);
    s.manager.certificate(&good).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(s.manager.current_certificate(&foreign).is_none());
    assert!(s.ca.calls_for(&foreign).len() >= 3, "retried with backoff");
}

#[tokio::test(start_paused = true)]
async fn trust_bundle_updates_reach_subscribers() {
    let s = setup(Duration::from_secs(100), config());
    let mut watch = s.manager.trust_bundle();
    s.manager.start_trust_bundle_watch();
    let anchor2 = init::trust_anchor("cluster.local", "2", YEAR).unwrap();
    let both = format!("{}{}", s.ca.anchors_pem, anchor2.cert_pem);
    // A bundle for another trust domain is ignored.
    s.ca.bundles.send_replace(Some(
        TrustBundle::from_pem("evil.example", both.as_bytes()).unwrap(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(watch.borrow_and_update().certificates().len(), 1);
    s.ca.bundles.send_replace(Some(
        TrustBundle::from_pem("cluster.local", both.as_bytes()).unwrap(),
    ));
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .expect("told of the change")
        .unwrap();
    assert_eq!(watch.borrow().certificates().len(), 2);
    assert_eq!(s.metrics.bundle_updates.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_identity_can_come_back_after_it_was_dropped() {
    let s = setup(Duration::from_secs(100), config());
    let a = id("a");
    s.manager.register_pod(&a);
    let first = s.manager.certificate(&a).await.unwrap();
    s.manager.unregister_pod(&a);
    s.manager.register_pod(&a);
    let second = s.manager.certificate(&a).await.unwrap();
    assert_ne!(first.serial, second.serial, "a fresh key and certificate");
    tokio::time::sleep(Duration::from_secs(300)).await;
    // One worker refreshes it (the dropped one is gone): ~1 fetch per 50–70 s.
    let calls = s.ca.calls_for(&a).len();
    assert!((5..=8).contains(&calls), "{calls} fetches in 300 s");
    assert!(text(&s.registry).contains(&format!("identity=\"{a}\"")));
}
