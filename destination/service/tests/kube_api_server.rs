//! The `kube` source against a real API server (`weft-sim up --kube`),
//! reading as the destination's own ServiceAccount with the RBAC of
//! daemonset/: real lists and watches of the policy CRDs, namespaces, pods
//! (run by the simulated kubelet), Services and EndpointSlices. Needs root
//! and the control plane that `cargo xtask setup` builds; fails (never
//! skips) without them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use weft_destination::index::IndexConfig;
use weft_destination::metrics::Metrics;
use weft_destination::publisher::Publisher;
use weft_destination::store::ClusterObjects;
use weft_destination::views::NodeView;
use weft_destination::{indexer, source};
use weft_sim::TestCluster;
use weft_sim::kube::{KubeBinaries, KubeState};

const WAIT: Duration = Duration::from_secs(120);

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: weft-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: example.invalid/web
        command: [python3, -m, http.server, "8080"]
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// A kubeconfig that authenticates as the destination's ServiceAccount
/// (a real token from TokenRequest), not as the admin.
fn destination_kubeconfig(
    kube: &KubeState,
    dir: &Path,
    server: Option<&str>,
) -> std::path::PathBuf {
    let token = kube
        .kubectl_ok(
            &["create", "token", "weft-destination", "-n", "weft-system"],
            None,
        )
        .unwrap();
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "sim", "cluster": {"server": server.unwrap_or(&kube.api_server), "certificate-authority": kube.ca_file}}],
        "users": [{"name": "weft-destination", "user": {"token": token.trim()}}],
        "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "weft-destination"}}],
        "current-context": "sim",
    });
    let path = dir.join("destination.kubeconfig");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

async fn wait(
    rx: &mut watch::Receiver<NodeView>,
    what: &str,
    check: impl FnMut(&NodeView) -> bool,
) {
    if tokio::time::timeout(WAIT, rx.wait_for(check))
        .await
        .is_err()
    {
        let v = rx.borrow().clone();
        let names: Vec<String> = v
            .workloads()
            .map(|(k, w)| format!("{k:?} {}", w.name))
            .collect();
        panic!("timed out waiting for {what}; the view has {names:?}");
    }
}

fn web_pods(view: &NodeView) -> Vec<String> {
    view.workloads()
        .map(|(_, w)| w.name.clone())
        .filter(|n| n.starts_with("web-"))
        .collect()
}

/// A `--kube` cluster with the policy CRDs, `manifests`, and the RBAC of
/// daemonset/ applied.
async fn kube_cluster(manifests: &'static str) -> (TestCluster, KubeState) {
    let binaries = KubeBinaries::from_cache().unwrap_or_else(|e| panic!("{e}"));
    // The policy CRDs and the workloads, applied by `up`; then the RBAC.
    let mut files: Vec<(String, String)> = std::fs::read_dir(repo("crds"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.push(("workloads.yaml".into(), manifests.into()));
    let cluster = tokio::task::spawn_blocking(move || {
        let borrowed: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        TestCluster::up_with(&borrowed, |o| o.kube = Some(binaries)).expect("--kube cluster up")
    })
    .await
    .unwrap();
    let kube = cluster.state().kube.clone().unwrap();
    let rbac = repo("daemonset/destination");
    kube.kubectl_ok(&["apply", "-k", rbac.to_str().unwrap()], None)
        .unwrap();
    (cluster, kube)
}

/// A client as the destination service's ServiceAccount, to `server`
/// (default: the API server).
async fn destination_client(kube: &KubeState, dir: &Path, server: Option<&str>) -> kube::Client {
    let kubeconfig = destination_kubeconfig(kube, dir, server);
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_source_lists_and_watches_a_real_api_server_with_its_own_rbac() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cluster, kube) = kube_cluster(SHOP).await;
    let dir = tempfile::tempdir().unwrap();
    let client = destination_client(&kube, dir.path(), None).await;

    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(metrics.clone()));
    let (tx, rx) = mpsc::channel(64);
    let source = tokio::spawn(source::kube::run(client, tx, metrics.clone()));
    let indexer = tokio::spawn(indexer::run(
        ClusterObjects::default(),
        IndexConfig::default(),
        rx,
        publisher.clone(),
    ));
    let mut ready = publisher.ready();
    let mut view = publisher.subscribe("node-a");
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .expect("ready: every kind listed, with the destination's own RBAC")
        .unwrap();

    // The Deployment's two pods, enrolled by their namespace's label, with
    // the identity of their ServiceAccount and the IPs the kubelet gave them.
    wait(&mut view, "both web pods", |v| web_pods(v).len() == 2).await;
    {
        let v = view.borrow().clone();
        for (_, w) in v.workloads().filter(|(_, w)| w.name.starts_with("web-")) {
            assert!(w.enrolled, "{}", w.name);
            assert_eq!(w.identity, "spiffe://cluster.local/ns/shop/sa/web");
        }
    }

    // Watches: a scale-up and a deletion reach the view.
    let k = kube.clone();
    tokio::task::spawn_blocking(move || {
        k.kubectl_ok(
            &["scale", "deployment", "web", "-n", "shop", "--replicas=3"],
            None,
        )
        .unwrap()
    })
    .await
    .unwrap();
    wait(&mut view, "the third web pod", |v| web_pods(v).len() == 3).await;
    let k = kube.clone();
    tokio::task::spawn_blocking(move || {
        k.kubectl_ok(
            &["delete", "deployment", "web", "-n", "shop", "--wait=false"],
            None,
        )
        .unwrap()
    })
    .await
    .unwrap();
    if tokio::time::timeout(WAIT, view.wait_for(|v| web_pods(v).is_empty()))
        .await
        .is_err()
    {
        let pods = kube.kubectl_ok(&["get", "pods", "-A", "-o", "wide"], None);
        let log =
            std::fs::read_to_string(cluster.state().state_dir.join("logs/kubelet.node-a.log"));
        panic!(
            "web pods still in the view: {:?}; the API server has {pods:?}; kubelet: {log:?}",
            web_pods(&view.borrow())
        );
    }
    assert_eq!(metrics.rejected("Pod"), 0);

    for t in [source, indexer] {
        t.abort();
    }
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

/// A TCP relay between the destination's client and the API server that
/// the test can freeze (nothing passes either way; connections stay open)
/// and cut (every connection closed).
struct Relay {
    addr: std::net::SocketAddr,
    frozen: watch::Sender<bool>,
    generation: watch::Sender<u64>,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind((upstream.ip(), 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, frozen_rx) = watch::channel(false);
        let (generation, generation_rx) = watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (frozen, mut cut) = (frozen_rx.clone(), generation_rx.clone());
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let born = *cut.borrow();
                    let gate = Gate {
                        frozen,
                        generation: cut.clone(),
                        born,
                    };
                    tokio::select! {
                        biased;
                        _ = cut.changed() => {}
                        _ = pipe(cr, sw, gate.clone()) => {}
                        _ = pipe(sr, cw, gate) => {}
                    }
                });
            }
        });
        Self {
            addr,
            frozen,
            generation,
        }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

/// When a connection of the relay may pass bytes: not while frozen, and
/// never again once cut (bytes held across a cut are dropped, not sent
/// when the relay thaws).
#[derive(Clone)]
struct Gate {
    frozen: watch::Receiver<bool>,
    generation: watch::Receiver<u64>,
    born: u64,
}

/// Copies `from` to `to`, holding what it read while the gate is frozen.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: Gate,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.frozen.wait_for(|f| !*f).await.is_err()
            // The relay is cut before it thaws: a connection that saw the
            // thaw has seen the cut too.
            || *gate.generation.borrow() != gate.born
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}

/// The API server's address (`https://IP:PORT` in the kube state).
fn api_address(kube: &KubeState) -> std::net::SocketAddr {
    kube.api_server
        .trim_start_matches("https://")
        .parse()
        .unwrap()
}

/// Stops the cluster's API server (SIGKILL) and starts it again with the
/// same command line, in the same cgroup (so `down` stops it), appending to
/// its log; returns once it is ready. Its watch cache starts empty: a
/// watch from an older resource version gets 410 Gone.
fn restart_api_server(kube: &KubeState, state_dir: &Path) -> std::process::Child {
    let cert_dir = format!("--cert-dir={}", state_dir.join("kube/apiserver").display());
    let (pid, argv) = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (argv.first()?.ends_with("kube-apiserver") && argv.contains(&cert_dir))
                .then_some((pid, argv))
        })
        .expect("this cluster's kube-apiserver");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cgroup = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 path")
        .to_string();
    let cgroup_dir = weft_sim::sys::cgroup2_mount()
        .unwrap()
        .join(cgroup.trim_start_matches('/'));
    // SAFETY: kill(2) on the pid of the process found above (ours: the
    // test's cluster); no memory is shared.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Until its port refuses connections: its threads exit one by one (its
    // memory, its command line, even its main thread go before the last one
    // closes the listening socket), and a new one could not bind before.
    let api = api_address(kube);
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect_timeout(&api, Duration::from_secs(1))
        .is_ok_and(|_| std::time::Instant::now() < deadline)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(state_dir.join("logs/kube-apiserver.log"))
        .unwrap();
    let child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::fs::write(cgroup_dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while let Err(e) = kube.kubectl_ok(&["get", "--raw=/readyz"], None) {
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(state_dir.join("logs/kube-apiserver.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!("the API server did not come back: {e}; its log ends with {tail:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child
}

/// One JSON POST to etcd's gRPC gateway (plain HTTP on loopback); the
/// answer's body.
fn etcd_post(etcd: &str, path: &str, body: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let host = etcd.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{out}");
    // A chunked answer: the JSON is the first chunk.
    let json = body.find('{').map(|i| &body[i..]).unwrap_or(body);
    let end = json.rfind('}').map_or(json.len(), |i| i + 1);
    serde_json::from_str(&json[..end]).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Compacts etcd's history up to now: a watch from an older revision can
/// no longer be served (the API server answers 410 Gone).
fn compact_etcd(etcd: &str) {
    // The current revision comes with any read.
    let range = etcd_post(etcd, "/v3/kv/range", r#"{"key":"AA=="}"#);
    let revision = range["header"]["revision"].as_str().unwrap().to_string();
    etcd_post(
        etcd,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    );
}

const DOOMED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: weft-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: anchor, namespace: shop}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{name: main, image: example.invalid/anchor, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Service
metadata: {name: doomed, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: kept, namespace: shop}
spec: {ports: [{port: 80}]}
"#;

/// A real 410 Gone (an enrolled pod, so that node-a's view has the
/// Services): the destination's watches were cut off while a Service
/// was deleted, the API server restarted (its watch cache starts at the
/// current resource version) and etcd compacted; the watches resume from a
/// version neither has any more, get 410 Gone, and the source lists again:
/// the Service deleted meanwhile leaves the view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_expires_with_410_gone_is_listed_again() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // What the watchers went through, shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("weft_destination=debug,kube_runtime=debug")
        .with_test_writer()
        .try_init();
    let (cluster, kube) = kube_cluster(DOOMED).await;
    let relay = Relay::start(api_address(&kube)).await;
    let dir = tempfile::tempdir().unwrap();
    let client =
        destination_client(&kube, dir.path(), Some(&format!("https://{}", relay.addr))).await;

    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(metrics.clone()));
    let (tx, rx) = mpsc::channel(64);
    let source = tokio::spawn(source::kube::run(client, tx, metrics.clone()));
    let indexer = tokio::spawn(indexer::run(
        ClusterObjects::default(),
        IndexConfig::default(),
        rx,
        publisher.clone(),
    ));
    let mut view = publisher.subscribe("node-a");
    let services = |v: &NodeView| -> Vec<String> {
        v.services()
            .map(|(k, _)| k.clone())
            .filter(|k| k.starts_with("shop/"))
            .collect()
    };
    wait(&mut view, "both Services", |v| services(v).len() == 2).await;

    // Nothing reaches the destination from here on: the deletion's event
    // is never delivered on its watch.
    relay.freeze(true);
    let k = kube.clone();
    let state_dir = cluster.state().state_dir.clone();
    let restarted = tokio::task::spawn_blocking(move || {
        k.kubectl_ok(&["delete", "service", "doomed", "-n", "shop"], None)
            .unwrap();
        // Neither the new API server's watch cache (it starts now) nor etcd
        // (compacted) has the history the destination's watches resume from.
        let restarted = restart_api_server(&k, &state_dir);
        compact_etcd(&k.etcd);
        restarted
    })
    .await
    .unwrap();
    assert_eq!(metrics.expired_watches("Service"), 0);
    relay.cut();
    relay.freeze(false);

    wait(&mut view, "the deleted Service gone", |v| {
        services(v) == ["shop/kept"]
    })
    .await;
    assert!(
        metrics.expired_watches("Service") >= 1,
        "the Service was removed without a 410 Gone: {}",
        metrics.encode()
    );

    for t in [source, indexer] {
        t.abort();
    }
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
    let mut restarted = restarted;
    let _ = restarted.wait();
}
