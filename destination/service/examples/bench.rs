//! `cargo xtask bench destination`: how the destination service scales.
//!
//! 1. Index: time to rebuild the index of a 10 000 pod / 2 000 Service /
//!    100 node cluster, and to publish every node's view (cold, and after a
//!    one-pod change, the steady state).
//! 2. Snapshot: encoded size of one node's view, against the whole
//!    cluster's (the baseline a naive "send everything" design would send).
//! 3. Fan-out: a pod changes; time until all 100 subscribers (each its own
//!    TLS connection on loopback) have received the delta, against the same
//!    with 1 subscriber (the baseline).
//!
//! Prints medians, percentiles and spread.

use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use weft_destination::index::{self, IndexConfig};
use weft_destination::metrics::Metrics;
use weft_destination::model::ObjectKey;
use weft_destination::publisher::Publisher;
use weft_destination::server::{self, DestinationService, TlsFiles};
use weft_destination::store::ClusterObjects;
use weft_destination::synthetic::{self, Shape};
use weft_destination_api::WatchRequest;
use weft_destination_api::proto::destination_client::DestinationClient;
use weft_node_auth::LocalCredentials;

const SHAPE: Shape = Shape {
    pods: 10_000,
    services: 2_000,
    nodes: 100,
    namespaces: 20,
};
const INDEX_RUNS: usize = 15;
const FANOUT_RUNS: usize = 20;

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "destination benchmark: {} pods, {} services, {} nodes, {} namespaces (half enrolled)",
        SHAPE.pods, SHAPE.services, SHAPE.nodes, SHAPE.namespaces
    );
    let objects = synthetic::cluster(SHAPE);
    let config = IndexConfig::default();
    bench_index(&objects, &config);
    bench_snapshot(&objects, &config);
    runtime.block_on(async {
        let one = fanout(&objects, &config, 1).await;
        let hundred = fanout(&objects, &config, 100).await;
        println!(
            "fan-out ratio (100 subscribers / 1 subscriber, medians): {:.2}",
            median(&hundred).as_secs_f64() / median(&one).as_secs_f64()
        );
    });
    println!("max RSS: {} MiB", max_rss_mib());
}

fn bench_index(objects: &ClusterObjects, config: &IndexConfig) {
    // Baseline for the policy index: the same cluster without any policy
    // object (every pod still gets its default-policy Policy), measured
    // interleaved with the full build so both see the same machine load.
    let mut without_policy = objects.clone();
    without_policy.servers.clear();
    without_policy.authorization_policies.clear();
    let mut build = Vec::new();
    let mut bare = Vec::new();
    let mut cold = Vec::new();
    let mut steady = Vec::new();
    for run in 0..INDEX_RUNS {
        let t = Instant::now();
        let built = index::build(objects, config);
        build.push(t.elapsed());
        let t = Instant::now();
        drop(index::build(&without_policy, config));
        bare.push(t.elapsed());

        let publisher = Publisher::new(Arc::new(Metrics::new()));
        let t = Instant::now();
        publisher.publish(built);
        cold.push(t.elapsed());

        // One pod changes (a label): rebuild and publish again.
        let mut changed = objects.clone();
        relabel(&mut changed, run);
        let t = Instant::now();
        let built = index::build(&changed, config);
        let nodes = publisher.publish(built);
        steady.push(t.elapsed());
        assert_eq!(
            nodes, SHAPE.nodes,
            "an enrolled pod's change reaches every node"
        );
    }
    report("index build (pure function)", &build);
    report(
        "index build without Servers/AuthorizationPolicies (baseline)",
        &bare,
    );
    println!(
        "policy objects' share: build / baseline (medians) = {:.2}",
        median(&build).as_secs_f64() / median(&bare).as_secs_f64()
    );
    report("publish all node views, cold", &cold);
    report("rebuild + publish after one pod change", &steady);
}

fn bench_snapshot(objects: &ClusterObjects, config: &IndexConfig) {
    let built = index::build(objects, config);
    let node = synthetic::node_name(0);
    let view = built.node_view(&node);
    let snapshot = view.snapshot("0123456789abcdef");
    let size = snapshot.encoded_len();
    // Baseline: every workload of the cluster, enrolled or not.
    let mut all = snapshot.clone();
    all.workloads = built
        .nodes
        .values()
        .flat_map(|l| l.workloads.values().map(|w| (**w).clone()))
        .collect();
    let whole = all.encoded_len();
    println!(
        "snapshot of {node}: {size} bytes ({:.1} MiB): {} workloads, {} services; \
         whole cluster would be {whole} bytes (ratio {:.2})",
        size as f64 / (1024.0 * 1024.0),
        snapshot.workloads.len(),
        snapshot.services.len(),
        size as f64 / whole as f64
    );
    let per_workload = snapshot
        .workloads
        .iter()
        .map(|w| w.encoded_len())
        .sum::<usize>()
        / snapshot.workloads.len().max(1);
    let per_service = snapshot
        .services
        .iter()
        .map(|s| s.encoded_len())
        .sum::<usize>()
        / snapshot.services.len().max(1);
    println!("  mean encoded workload {per_workload} bytes, service {per_service} bytes");
}

fn relabel(objects: &mut ClusterObjects, run: usize) {
    // Pod 0 is in ns-00 (enrolled), on node-000.
    let key: ObjectKey = synthetic::pod(SHAPE, 0).key;
    let pod = objects.pods.get_mut(&key).expect("pod 0 exists");
    pod.labels.insert("revision".into(), run.to_string());
}

async fn fanout(
    objects: &ClusterObjects,
    config: &IndexConfig,
    subscribers: usize,
) -> Vec<Duration> {
    let creds = tempfile::tempdir().expect("a temporary directory");
    for i in 0..subscribers {
        std::fs::write(
            creds
                .path()
                .join(format!("{}.token", synthetic::node_name(i))),
            format!("token-{i}"),
        )
        .expect("writing a token");
    }
    let (ca_pem, cert_pem, key_pem) = pki();
    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(metrics.clone()));
    let mut objects = objects.clone();
    publisher.publish(index::build(&objects, config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let service = DestinationService::new(
        publisher.clone(),
        Arc::new(LocalCredentials::new(creds.path())),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        listener,
        TlsFiles {
            cert_pem: cert_pem.into_bytes(),
            key_pem: key_pem.into_bytes(),
        },
        service,
        async {
            let _ = stopped.await;
        },
    ));

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let mut clients = Vec::new();
    for i in 0..subscribers {
        let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .expect("endpoint")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca_pem))
                    .domain_name("localhost"),
            )
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        let tx = tx.clone();
        clients.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(WatchRequest {
                node: synthetic::node_name(i),
                ..Default::default()
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer token-{i}").parse().expect("ascii"),
            );
            let mut stream = DestinationClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .watch(request)
                .await
                .expect("watch")
                .into_inner();
            while let Ok(Some(m)) = stream.message().await {
                let _ = tx.send((i, m.version, Instant::now()));
            }
        }));
    }
    // Everyone has the snapshot.
    let mut initial = 0;
    while initial < subscribers {
        rx.recv().await.expect("subscribers alive");
        initial += 1;
    }

    let mut times = Vec::new();
    let mut per_subscriber = Vec::new();
    for run in 0..FANOUT_RUNS {
        relabel(&mut objects, 1000 + run);
        // What the indexer does: rebuild off the async threads, publish.
        let t0 = Instant::now();
        let cfg = config.clone();
        let (returned, built) = tokio::task::spawn_blocking(move || {
            let built = index::build(&objects, &cfg);
            (objects, built)
        })
        .await
        .expect("build");
        objects = returned;
        publisher.publish(built);
        let target = publisher.generation();
        let mut have = vec![false; subscribers];
        let mut count = 0;
        let mut last = t0;
        while count < subscribers {
            let (i, version, at) = rx.recv().await.expect("subscribers alive");
            if version == target && !have[i] {
                have[i] = true;
                count += 1;
                per_subscriber.push(at - t0);
                last = last.max(at);
            }
        }
        times.push(last - t0);
    }
    report(
        &format!("change -> all {subscribers} subscriber(s) have the delta"),
        &times,
    );
    report(
        &format!("change -> one subscriber has it ({subscribers} subscribing)"),
        &per_subscriber,
    );
    let _ = stop.send(());
    for c in clients {
        c.abort();
    }
    let _ = server.await;
    times
}

fn pki() -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s[s.len() / 2]
}

fn report(what: &str, samples: &[Duration]) {
    let mut s = samples.to_vec();
    s.sort();
    let pct = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: median {:.2} ms, p10 {:.2} ms, p90 {:.2} ms, min {:.2} ms, max {:.2} ms (n={})",
        ms(pct(0.5)),
        ms(pct(0.1)),
        ms(pct(0.9)),
        ms(s[0]),
        ms(s[s.len() - 1]),
        s.len()
    );
}

fn max_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}
