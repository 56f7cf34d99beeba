//! Helpers shared by the node proxy's simulator tests.
#![allow(dead_code)]

use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use weft_sim::TestCluster;

pub use weft_sim::mesh::http_get;

/// The value of the first series of `metric` whose labels include all of `labels`.
pub fn metric(node_ip: Ipv4Addr, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, body) = http_get(SocketAddr::new(node_ip.into(), 15020), "/metrics")?;
    series(&body, metric, labels)
}

/// The value of the first series of `metric` with `labels` in a scrape;
/// `None`: no such series.
fn series(body: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Asserts that node `node_ip`'s proxy has no series of `metric` with
/// `labels`, or only zero: "nothing was counted". The scrape itself must
/// succeed (a proxy that is down counts nothing, and must not pass).
pub fn assert_not_counted(node_ip: Ipv4Addr, metric: &str, labels: &[(&str, &str)], why: &str) {
    let (status, body) = http_get(SocketAddr::new(node_ip.into(), 15020), "/metrics")
        .unwrap_or_else(|| panic!("cannot scrape {node_ip}:15020: {why}"));
    assert_eq!(status, 200, "scrape of {node_ip}: {body}");
    assert!(
        body.contains("# TYPE weft_tcp_connections_opened"),
        "not the node proxy's metrics: {body}"
    );
    let value = series(&body, metric, labels);
    assert!(
        value.is_none_or(|v| v == 0.0),
        "{metric}{labels:?} on {node_ip} is {value:?}: {why}"
    );
}

/// The sum of every series of `metric` whose labels include all of
/// `labels` (e.g. over the endpoints of a Service); 0 when there is none.
pub fn metric_sum(node_ip: Ipv4Addr, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let Some((_, body)) = http_get(SocketAddr::new(node_ip.into(), 15020), "/metrics") else {
        return f64::NAN;
    };
    body.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls until the sum of `metric`'s matching series reaches `want`.
pub fn wait_metric_sum(node_ip: Ipv4Addr, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = f64::NAN;
    while Instant::now() < deadline {
        last = metric_sum(node_ip, name, labels);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sum of {name}{labels:?} on {node_ip}: want {want}, last seen {last}");
}

/// Polls `value` until it equals `want` (values counted as responses end).
pub fn wait_until_eq(what: &str, want: f64, mut value: impl FnMut() -> f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = f64::NAN;
    while Instant::now() < deadline {
        last = value();
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: want {want}, last seen {last}");
}

/// Polls until `metric` reaches `want` (connections are counted as they close).
pub fn wait_metric(node_ip: Ipv4Addr, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while Instant::now() < deadline {
        last = metric(node_ip, name, labels);
        if last == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name}{labels:?} on {node_ip}: want {want}, last seen {last:?}");
}

/// Runs `tcp_client.py` in `pod`: sends `bytes` (random, or `pattern`
/// repeated), half-closes, reads the echo and checks it byte for byte.
pub fn echo_through(
    cluster: &TestCluster,
    pod: &str,
    host: &str,
    port: u16,
    bytes: usize,
    pattern: Option<&str>,
) -> Value {
    let port = port.to_string();
    let bytes = bytes.to_string();
    let mut argv = vec!["./tcp_client.py", host, &port, &bytes];
    argv.extend(pattern);
    let out = cluster.exec(pod, &argv);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{pod} -> {host}:{port}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["match"], true, "{pod} -> {host}:{port}: {r}");
    r
}

/// The mesh tests' cluster: an enrolled namespace `demo` (a client on
/// node-a; echo servers on node-b and on node-a, behind the Service `echo`;
/// a pod that opts out), and a namespace `plain` outside the mesh.
pub const DEMO_CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec:
  nodeName: node-b
  serviceAccountName: echo
  containers: [{name: main, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-local, namespace: demo}
spec:
  nodeName: node-a
  serviceAccountName: echo
  containers: [{name: main, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: demo, labels: {weft.io/mesh: disabled}}
spec:
  nodeName: node-b
  containers: [{name: main, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain}
spec:
  nodeName: node-b
  containers: [{name: main, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, ports: [{port: 80, targetPort: 9000}]}
"#;

/// `promtool check metrics` accepts the node proxy's `/metrics` on `node`.
pub fn promtool_accepts(node: Ipv4Addr) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let (_, body) = http_get(SocketAddr::new(node.into(), 15020), "/metrics").unwrap();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on {node}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// tcpdump in a namespace of the cluster.
pub mod capture;
pub mod mesh_cluster;
/// `replica_load.py` in a client pod, read line by line.
pub mod replica_load;
#[allow(unused_imports)]
pub use mesh_cluster::MeshCluster;
pub mod stream;
