//! The mesh on a real control plane (`weft-sim up --kube` with the mesh):
//! the CA and the destination service read the API server (TokenReview of
//! the node proxies' node-bound tokens, Pods, EndpointSlices), and the
//! simulated kubelet's chained CNI plugin registers every pod with its
//! node's proxy, as on a cluster.
//!
//! Issue #20, item 6: `kubectl delete pod` and `kubectl scale` down under
//! load lose no request. The replicas stop as applications behind a
//! Service are told to (`replica.py` with `DRAIN_SECONDS`): on SIGTERM they
//! serve on for a few seconds, then close their port, finish what is in
//! flight and exit. The EndpointSlice marks a deleted pod's endpoint
//! `terminating` at once; the mesh must have stopped sending it new
//! requests before it closes its port, and let its in-flight ones finish.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::replica_load::Load;
use support::{MeshCluster, metric_sum, wait_metric_sum};

const WEB: &str = "web.demo.svc.cluster.local";
const WEB_PRINCIPAL: &str = "spiffe://cluster.local/ns/demo/sa/web";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers: [{name: main, image: client, command: [sleep, infinity]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers:
      - name: main
        image: web
        command: [./replica.py, "8080", $(POD_NAME)]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: DRAIN_SECONDS, value: "3"}
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"#;

const THREADS: usize = 4;
/// A bound only: the load stops when the test says so.
const MOST_PER_THREAD: usize = 5000;
const WARM: usize = 60;
const LIMIT: Duration = Duration::from_secs(120);

/// The `web` pods the API server has (terminating ones included).
fn web_pods(mc: &MeshCluster) -> Vec<String> {
    mc.cluster()
        .kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "demo",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn ready_replicas(mc: &MeshCluster) -> String {
    mc.cluster().kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-n",
        "demo",
        "-o",
        "jsonpath={.status.readyReplicas}",
    ])
}

/// A replica's log, in the order it wrote it (the kubelet keeps it after
/// the pod is gone).
fn replica_log(mc: &MeshCluster, pod: &str) -> Vec<String> {
    let log = mc
        .cluster()
        .state()
        .state_dir
        .join("logs")
        .join(format!("demo.{pod}.main.log"));
    std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()))
        .lines()
        .map(String::from)
        .collect()
}

/// `result <id> <method> <status> <served-by>` lines, split.
fn results(lines: &[String]) -> Vec<Vec<&str>> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("result "))
        .map(|l| l.split(' ').collect())
        .collect()
}

/// Reads the load's output until `enough` holds for what was read (polling,
/// so the test can also check the API server in between).
fn read_while(
    load: &Load,
    lines: &mut Vec<String>,
    what: &str,
    mut enough: impl FnMut(&[String]) -> bool,
) {
    let deadline = Instant::now() + LIMIT;
    loop {
        lines.extend(load.read_now());
        if enough(lines) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_deleted_or_scaled_down_replica_loses_no_request() {
    let mc = MeshCluster::up_kube(&[("c.yaml", CLUSTER)], |_| {});
    let node_a = mc.node_ip("node-a");
    let stop = mc.cluster().manifest_dir().join("stop");
    let load = Load::start(
        mc.cluster().state(),
        "demo/client",
        &[
            "web.demo",
            &THREADS.to_string(),
            &MOST_PER_THREAD.to_string(),
            &WARM.to_string(),
            &stop.to_string_lossy(),
        ],
    );
    let mut lines = load.read_until("warm", LIMIT);
    let first = web_pods(&mc);
    assert_eq!(first.len(), 3, "{first:?}");

    // One replica deleted: the Deployment replaces it.
    let deleted = first[0].clone();
    mc.cluster()
        .kubectl_ok(&["delete", "pod", "-n", "demo", &deleted, "--wait=false"]);
    read_while(
        &load,
        &mut lines,
        "the deleted pod gone, its replacement serving",
        |lines| {
            let pods = web_pods(&mc);
            let Some(new) = pods.iter().find(|p| !first.contains(p)) else {
                return false;
            };
            !pods.contains(&deleted)
                && ready_replicas(&mc) == "3"
                && results(lines).iter().any(|r| r[3] == new)
        },
    );

    // Scaled down to one: two replicas stop at once.
    let before_scale = web_pods(&mc);
    mc.cluster()
        .kubectl_ok(&["scale", "deployment", "web", "-n", "demo", "--replicas=1"]);
    let mut survivor = String::new();
    read_while(&load, &mut lines, "two replicas gone", |_| {
        let pods = web_pods(&mc);
        if pods.len() == 1 {
            survivor = pods[0].clone();
        }
        pods.len() == 1
    });
    let served_before = lines.len();
    read_while(&load, &mut lines, "requests to the survivor", |lines| {
        results(&lines[served_before..])
            .iter()
            .filter(|r| r[3] == survivor)
            .count()
            >= 40
    });
    std::fs::write(&stop, "").expect("stop file");
    lines.extend(load.read_until("end", LIMIT));

    // Not one request failed.
    let results = results(&lines);
    let failed: Vec<_> = results.iter().filter(|r| r[2] != "200").collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );

    // Each stopped replica served before it was stopped (else this shows
    // nothing), went the graceful way, and got no request once it had
    // closed its port (nothing came on a connection kept from before
    // either): the mesh had taken it out of rotation while it served on.
    let stopped: Vec<&String> = before_scale
        .iter()
        .chain(std::iter::once(&deleted))
        .filter(|p| **p != survivor)
        .collect();
    assert_eq!(stopped.len(), 3, "{stopped:?}");
    let mut reached: HashMap<String, Vec<String>> = HashMap::new();
    for pod in stopped.iter().copied().chain(std::iter::once(&survivor)) {
        let log = replica_log(&mc, pod);
        for id in log.iter().filter_map(|l| l.strip_prefix("got ")) {
            let id = id.split(' ').next().unwrap_or_default().to_string();
            reached.entry(id).or_default().push(pod.clone());
        }
        if *pod == survivor {
            continue;
        }
        assert!(
            results.iter().any(|r| r[3] == pod),
            "{pod} answered nothing before it was stopped"
        );
        let closing = log
            .iter()
            .position(|l| l == "closing")
            .unwrap_or_else(|| panic!("{pod} did not drain on SIGTERM: {log:?}"));
        let late: Vec<_> = log[closing..]
            .iter()
            .filter(|l| l.starts_with("got "))
            .collect();
        assert!(
            late.is_empty(),
            "{pod} got requests after it closed its port: {late:?}"
        );
    }
    // Every request reached exactly the replica that answered it.
    for r in &results {
        assert_eq!(
            reached.get(r[0]).map(Vec::as_slice),
            Some(&[r[3].to_string()][..]),
            "request {} answered by {}",
            r[0],
            r[3]
        );
    }

    // All of it went through the mesh, with mutual TLS to the web
    // identity: the source proxy counted exactly these requests. And it
    // never had to fail over: no request met a closed port.
    wait_metric_sum(
        node_a,
        "weft_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service", WEB),
            ("destination_principal", WEB_PRINCIPAL),
            ("status_code", "200"),
        ],
        results.len() as f64,
    );
    for metric in [
        "weft_request_failovers_total",
        "weft_endpoint_ejections_total",
    ] {
        assert_eq!(
            metric_sum(node_a, metric, &[("destination_service", WEB)]),
            0.0,
            "{metric}: a stopped replica was sent requests after it closed its port"
        );
    }
    mc.down();
}
