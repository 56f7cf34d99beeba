//! `cargo xtask bench destination`: how the destination service scales.
//!
//! Two synthetic clusters (`WEFT_BENCH_SCALE=10k` or `=100k` runs one):
//! 10 000 pods / 2 000 Services / 100 nodes (the shape of the earlier
//! rows), and 100 000 pods / 10 000 Services / 1 000 nodes (issue #18).
//! At each:
//!
//! 1. Build: the pure full build, and the incremental index's first build.
//! 2. One pod change (an enrolled pod's label, a different pod each run):
//!    the incremental update + publish, against the path before it (full
//!    rebuild + publish with interning), measured in the same run.
//! 3. Every node's delta: after a change, what each node's stream computes
//!    (its view, the delta from its previous one, encoded), for all nodes
//!    in turn; against the same without the mesh's lineage (whole maps
//!    compared, as before).
//! 4. Fan-out: real subscribers (each its own TLS connection on loopback,
//!    in this process); a pod changes; time until one, and all, have the
//!    delta. Fewer subscribers than nodes at 100k (see `SCALES`): step 3
//!    measures the work for all of them.
//! 5. Memory: resident set after setup, and after a churn of single-pod
//!    changes with retained generations (it must not grow with churn).
//!
//! Prints medians, p10, p90 and spread.

use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use weft_destination::index::{self, Incremental, Index, IndexConfig};
use weft_destination::metrics::Metrics;
use weft_destination::model::{Object, PodInfo};
use weft_destination::publisher::Publisher;
use weft_destination::server::{self, DestinationService, TlsFiles};
use weft_destination::store::{ClusterObjects, StoreUpdate};
use weft_destination::synthetic::{self, Shape};
use weft_destination::views::{Lineage, MeshView};
use weft_destination_api::WatchRequest;
use weft_destination_api::proto::destination_client::DestinationClient;
use weft_node_auth::LocalCredentials;

struct Scale {
    name: &'static str,
    shape: Shape,
    /// Runs of the full build (and of the old change path).
    full_runs: usize,
    /// Runs of one incremental change.
    change_runs: usize,
    /// Real subscribers in the fan-out (besides the 1-subscriber baseline).
    subscribers: usize,
    fanout_runs: usize,
    /// Single-pod changes of the churn.
    churn: usize,
}

const SCALES: [Scale; 2] = [
    Scale {
        name: "10k",
        shape: Shape::TEN_THOUSAND,
        full_runs: 15,
        change_runs: 100,
        subscribers: 100,
        fanout_runs: 20,
        churn: 2_000,
    },
    Scale {
        name: "100k",
        shape: Shape::HUNDRED_THOUSAND,
        full_runs: 5,
        change_runs: 50,
        // Each subscriber's first snapshot is ~15 MB to build, encode and
        // decode on 2 shared cores: 100 real connections, 1 000 node
        // views computed (step 3).
        subscribers: 100,
        fanout_runs: 20,
        churn: 1_000,
    },
];

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let chosen = std::env::var("WEFT_BENCH_SCALE").unwrap_or_default();
    let scales: Vec<&Scale> = SCALES
        .iter()
        .filter(|s| chosen.is_empty() || chosen == s.name)
        .collect();
    if scales.is_empty() {
        eprintln!("WEFT_BENCH_SCALE={chosen}: not a scale (10k, 100k, or unset for both)");
        std::process::exit(2);
    }
    for scale in scales {
        let shape = scale.shape;
        println!(
            "\n== destination benchmark, {}: {} pods, {} services, {} nodes, {} namespaces (half enrolled) ==",
            scale.name, shape.pods, shape.services, shape.nodes, shape.namespaces
        );
        let objects = synthetic::cluster(shape);
        let config = IndexConfig::default();
        let with_objects = rss_mib("VmRSS:");
        println!("RSS with the cluster's objects: {with_objects} MiB");
        {
            // Memory of the index, measured before anything else ran: the
            // incremental index (its own copy of the objects and what it
            // derives) with one published generation.
            let mut inc = Incremental::new(objects.clone(), IndexConfig::default());
            let publisher = Publisher::new(Arc::new(Metrics::new()));
            publisher.publish_interned(inc.refresh());
            let with_index = rss_mib("VmRSS:");
            println!(
                "RSS with the incremental index and one published generation: {with_index} MiB \
                 (+{} MiB, of which ~{with_objects} MiB its copy of the objects)",
                with_index.saturating_sub(with_objects)
            );
        }
        bench_build(scale, &objects, &config);
        bench_change(scale, &objects, &config);
        bench_snapshot(shape, &objects, &config);
        runtime.block_on(async {
            let one = fanout(scale, &objects, &config, 1).await;
            let all = fanout(scale, &objects, &config, scale.subscribers).await;
            println!(
                "fan-out ratio ({} subscribers / 1 subscriber, medians): {:.2}",
                scale.subscribers,
                median(&all).as_secs_f64() / median(&one).as_secs_f64()
            );
        });
        bench_churn(scale, objects, &config);
        println!("max RSS so far: {} MiB", rss_mib("VmHWM:"));
    }
}

fn bench_build(scale: &Scale, objects: &ClusterObjects, config: &IndexConfig) {
    // Baseline for the policy index: the same cluster without any policy
    // object, measured interleaved with the full build.
    let mut without_policy = objects.clone();
    without_policy.servers.clear();
    without_policy.authorization_policies.clear();
    let mut build = Vec::new();
    let mut bare = Vec::new();
    let mut cold = Vec::new();
    for _ in 0..scale.full_runs {
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
    }
    // Apart: its allocations would slow the builds measured above.
    let mut first = Vec::new();
    for _ in 0..scale.full_runs {
        let copy = objects.clone();
        let t = Instant::now();
        let mut inc = Incremental::new(copy, config.clone());
        drop(inc.refresh());
        first.push(t.elapsed());
        drop(inc);
    }
    report("full build (pure function)", &build);
    report(
        "full build without Servers/AuthorizationPolicies (baseline)",
        &bare,
    );
    report("publish all node views, cold", &cold);
    report("incremental index, first (full) build", &first);
}

/// An enrolled pod, spread over the cluster by `run`, with a new label.
fn changed_pod(shape: Shape, objects: &ClusterObjects, run: usize) -> PodInfo {
    let key = synthetic::pod(shape, shape.spread_enrolled_pod(run)).key;
    let mut pod = objects.pods.get(&key).expect("the pod exists").clone();
    pod.labels.insert("revision".into(), run.to_string());
    pod
}

fn bench_change(scale: &Scale, objects: &ClusterObjects, config: &IndexConfig) {
    let shape = scale.shape;
    // The incremental path, as the indexer runs it.
    let mut inc = Incremental::new(objects.clone(), config.clone());
    let publisher = Publisher::new(Arc::new(Metrics::new()));
    publisher.publish_interned(inc.refresh());
    let mut update = Vec::new();
    let mut views = Vec::new();
    let mut views_whole = Vec::new();
    let mut delta_bytes = 0;
    let epoch = publisher.epoch().to_string();
    for run in 0..scale.change_runs {
        let before = inc.index();
        let pod = changed_pod(shape, inc.objects(), run);
        let t = Instant::now();
        inc.apply(StoreUpdate::Apply(Object::Pod(pod)));
        let after = inc.refresh();
        let after_for_views = inc.index();
        let nodes = publisher.publish_interned(after);
        update.push(t.elapsed());
        assert_eq!(
            nodes, shape.nodes,
            "an enrolled pod's change reaches every node"
        );

        // What every node's stream computes for this change.
        let t = Instant::now();
        delta_bytes = every_nodes_delta(shape, &before, &after_for_views, &epoch);
        views.push(t.elapsed());
        // The same without the lineage: whole maps compared per node (slow
        // at 100k: fewer runs).
        if run >= 2 * scale.full_runs {
            continue;
        }
        let whole = Index {
            mesh: Arc::new(MeshView {
                lineage: Lineage::default(),
                ..(*after_for_views.mesh).clone()
            }),
            ..after_for_views
        };
        let t = Instant::now();
        let bytes = every_nodes_delta(shape, &before, &whole, &epoch);
        views_whole.push(t.elapsed());
        assert_eq!(bytes, delta_bytes, "the same deltas either way");
    }
    report(
        "one pod change: incremental update + publish (the indexer's work)",
        &update,
    );
    report(
        &format!(
            "one pod change: every node's delta ({} nodes: view, delta, encode)",
            shape.nodes
        ),
        &views,
    );
    report(
        "  same without the mesh's lineage (whole maps compared, baseline)",
        &views_whole,
    );
    println!(
        "  deltas of one change, all nodes: {delta_bytes} bytes encoded ({} per node)",
        delta_bytes / shape.nodes.max(1)
    );

    // Baseline: the path before the incremental index, interleaved with
    // the incremental one on a fresh pair of publishers.
    let mut objects = objects.clone();
    let old = Publisher::new(Arc::new(Metrics::new()));
    old.publish(index::build(&objects, config));
    let mut rebuild = Vec::new();
    let mut incremental = Vec::new();
    for run in 0..scale.full_runs {
        let pod = changed_pod(shape, &objects, 10_000 + run);
        objects.pods.insert(pod.key.clone(), pod.clone());
        let t = Instant::now();
        let nodes = old.publish(index::build(&objects, config));
        rebuild.push(t.elapsed());
        assert_eq!(nodes, shape.nodes);
        let t = Instant::now();
        inc.apply(StoreUpdate::Apply(Object::Pod(pod)));
        publisher.publish_interned(inc.refresh());
        incremental.push(t.elapsed());
    }
    report(
        "one pod change: full rebuild + publish with interning (before, baseline)",
        &rebuild,
    );
    report(
        "one pod change: incremental update + publish (interleaved with it)",
        &incremental,
    );
    println!(
        "  speed-up (medians): {:.1}x",
        median(&rebuild).as_secs_f64() / median(&incremental).as_secs_f64()
    );
}

/// Each node's view before and after, the delta between them, encoded:
/// what every subscriber's stream does for one change. Returns the bytes.
fn every_nodes_delta(shape: Shape, before: &Index, after: &Index, epoch: &str) -> usize {
    let mut bytes = 0;
    for n in 0..shape.nodes {
        let node = synthetic::node_name(n);
        let old = before.node_view(&node);
        let new = after.node_view(&node);
        bytes += new.delta_from(&old, epoch).encoded_len();
    }
    bytes
}

fn bench_snapshot(shape: Shape, objects: &ClusterObjects, config: &IndexConfig) {
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
    let _ = shape;
}

/// Single-pod changes one after the other (labels, and moves to another
/// node), with the publisher retaining its generations: the resident set
/// before and after.
fn bench_churn(scale: &Scale, objects: ClusterObjects, config: &IndexConfig) {
    let shape = scale.shape;
    let mut inc = Incremental::new(objects, config.clone());
    let publisher = Publisher::new(Arc::new(Metrics::new()));
    publisher.publish_interned(inc.refresh());
    // Hold a view per node, as streams do.
    let receivers: Vec<_> = (0..shape.nodes)
        .map(|n| publisher.subscribe(&synthetic::node_name(n)))
        .collect();
    let warmup = scale.churn / 10;
    let mut before = 0;
    let t = Instant::now();
    for run in 0..scale.churn + warmup {
        if run == warmup {
            before = rss_mib("VmRSS:");
        }
        let mut pod = changed_pod(shape, inc.objects(), 20_000 + run);
        if run % 2 == 1 {
            pod.node = Some(synthetic::node_name((run * 31) % shape.nodes));
        }
        inc.apply(StoreUpdate::Apply(Object::Pod(pod)));
        publisher.publish_interned(inc.refresh());
    }
    let elapsed = t.elapsed();
    let after = rss_mib("VmRSS:");
    println!(
        "churn: {} single-pod changes ({:.2} ms each on average): RSS {} MiB after {} changes, {} MiB at the end ({:+} MiB)",
        scale.churn + warmup,
        elapsed.as_secs_f64() * 1000.0 / (scale.churn + warmup) as f64,
        before,
        warmup,
        after,
        after as i64 - before as i64,
    );
    drop(receivers);
}

async fn fanout(
    scale: &Scale,
    objects: &ClusterObjects,
    config: &IndexConfig,
    subscribers: usize,
) -> Vec<Duration> {
    let shape = scale.shape;
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
    let mut inc = Incremental::new(objects.clone(), config.clone());
    publisher.publish_interned(inc.refresh());

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
    let connected = Instant::now();
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
    println!(
        "  {subscribers} subscriber(s) connected with their snapshots in {:.1} s",
        connected.elapsed().as_secs_f64()
    );

    let mut times = Vec::new();
    let mut per_subscriber = Vec::new();
    for run in 0..scale.fanout_runs {
        let pod = changed_pod(shape, inc.objects(), 1_000 + run);
        // What the indexer does: update off the async threads, publish.
        let t0 = Instant::now();
        let (returned, built) = tokio::task::spawn_blocking(move || {
            inc.apply(StoreUpdate::Apply(Object::Pod(pod)));
            let built = inc.refresh();
            (inc, built)
        })
        .await
        .expect("update");
        inc = returned;
        publisher.publish_interned(built);
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

/// A line of /proc/self/status (`VmRSS:` now, `VmHWM:` the peak), in MiB.
fn rss_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}
