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
fn destination_kubeconfig(kube: &KubeState, dir: &Path) -> std::path::PathBuf {
    let token = kube
        .kubectl_ok(
            &["create", "token", "weft-destination", "-n", "weft-system"],
            None,
        )
        .unwrap();
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "sim", "cluster": {"server": kube.api_server, "certificate-authority": kube.ca_file}}],
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_source_lists_and_watches_a_real_api_server_with_its_own_rbac() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    files.push(("shop.yaml".into(), SHOP.into()));
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
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = destination_kubeconfig(&kube, dir.path());
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();

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
        let log = std::fs::read_to_string(cluster.state().state_dir.join("logs/kubelet.log"));
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
