//! The `weft-destination` binary as an operator runs it (local source): TLS
//! gRPC, node credentials, /ready and /metrics, a manifest edit reaching a
//! watching proxy.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use weft_destination_api::client::{self, Backoff, ClientConfig, TokenSource};

/// Kills the service when the test ends, however it ends.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        // Its status after our kill says nothing; whether it had already
        // exited on its own does: a service that died mid-test fails the
        // test.
        let before = self.0.try_wait();
        let _ = self.0.kill();
        self.0.wait().expect("reaping weft-destination");
        if let Ok(Some(status)) = before
            && !std::thread::panicking()
        {
            panic!("weft-destination exited during the test ({status})");
        }
    }
}

/// The addresses the binary bound (it listens on port 0 and logs what the
/// kernel chose): `(grpc, admin)` from its "serving" log line.
async fn serving_addresses(log: &std::path::Path) -> (SocketAddr, SocketAddr) {
    let field = |line: &str, name: &str| -> Option<SocketAddr> {
        let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("weft-destination serving"))
        {
            let grpc = field(line, "grpc").unwrap_or_else(|| panic!("no grpc= in {line:?}"));
            let admin = field(line, "admin").unwrap_or_else(|| panic!("no admin= in {line:?}"));
            return (grpc, admin);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no \"weft-destination serving\" line within 20 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP/1.1 GET; returns (status, body).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

const MANIFESTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, uid: uid-client}
spec:
  nodeName: node-a
  containers: [{name: main}]
status: {podIP: 10.244.0.2}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_views_ready_and_metrics() {
    let pki = pki();
    let creds = Credentials::new(&["node-a"]);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("demo.yaml"), MANIFESTS).unwrap();
    std::fs::write(manifests.join("broken.yaml"), "kind: [").unwrap();
    std::fs::write(dir.path().join("cert.pem"), &pki.cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &pki.key_pem).unwrap();
    let (reader, closed_stdout) = std::io::pipe().unwrap();
    drop(reader);
    let log = tempfile::NamedTempFile::new().unwrap();

    let service = Service(
        Command::new(env!("CARGO_BIN_EXE_weft-destination"))
            .args(["--source", "local", "--manifests"])
            .arg(&manifests)
            .arg("--tls-cert")
            .arg(dir.path().join("cert.pem"))
            .arg("--tls-key")
            .arg(dir.path().join("key.pem"))
            .arg("--local-credentials")
            .arg(creds.path())
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            // Run as `weft-destination … | head` would leave it: stdout
            // a pipe nobody reads (closed before it starts). Its logs go to
            // stderr, kept to be checked at the end.
            .stdout(closed_stdout)
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );

    let (grpc, admin) = serving_addresses(log.path()).await;
    let started = Instant::now();
    let ready = loop {
        if let Some((status, _)) = get(admin, "/ready")
            && status == 200
        {
            break true;
        }
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(ready, "/ready turns 200 once the manifests are indexed");

    let mut handle = client::spawn(ClientConfig {
        endpoint: format!("https://localhost:{}", grpc.port()),
        ca_pem: pki.ca_pem.clone().into_bytes(),
        server_name: None,
        node: "node-a".into(),
        token: TokenSource::File(creds.path().join("node-a.token")),
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
    });
    let view = tokio::time::timeout(
        Duration::from_secs(10),
        handle.view.wait_for(|v| v.version > 0),
    )
    .await
    .expect("a view from the binary")
    .unwrap()
    .clone();
    let w = view
        .workload_by_address("10.244.0.2".parse().unwrap())
        .unwrap();
    assert_eq!(w.identity, "spiffe://cluster.local/ns/demo/sa/default");

    // Edit: the pod opts out; the proxy sees it.
    std::fs::write(
        manifests.join("demo.yaml"),
        MANIFESTS.replace(
            "uid: uid-client}",
            "uid: uid-client, labels: {weft.io/mesh: disabled}}",
        ),
    )
    .unwrap();
    // Generous: a file event normally brings it in milliseconds; the bound
    // only decides how long a broken build waits to fail.
    tokio::time::timeout(
        Duration::from_secs(10),
        handle
            .view
            .wait_for(|v| v.workloads.get("uid-client").is_some_and(|w| !w.enrolled)),
    )
    .await
    .expect("the edit reaches the proxy")
    .unwrap();

    let (status, metrics) = get(admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in [
        "weft_destination_subscribers 1",
        "weft_destination_rejected_objects_total{kind=\"File\"} 1",
        "weft_destination_indexed_objects{kind=\"Pod\"} 1",
        "weft_destination_updates_pushed_total{kind=\"snapshot\"} 1",
        "weft_destination_updates_pushed_total{kind=\"delta\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains("weft_destination_push_lag_seconds_count 1"),
        "{metrics}"
    );

    // Its stdout was closed all along: it served anyway, logged (to
    // stderr), and nothing complained about the pipe.
    drop(service);
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(log.contains("manifests changed"), "{log}");
    // Written to a file, not a terminal: no colour escape codes.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    assert!(
        !log.contains("Broken pipe") && !log.contains("panicked"),
        "{log}"
    );
}

#[test]
fn binary_refuses_to_start_without_node_authentication() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), &pki.cert_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), &pki.key_pem).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft-destination"))
        .args(["--source", "local", "--manifests"])
        .arg(dir.path())
        .arg("--tls-cert")
        .arg(dir.path().join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        // No Kubernetes API either (TokenReview would need it).
        .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--local-credentials"), "{err}");
}
