//! Helpers shared by the node proxy's simulator tests.
#![allow(dead_code)]

use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

pub use weft_sim::mesh::http_get;

/// The value of the first series of `metric` whose labels include all of `labels`.
pub fn metric(node_ip: Ipv4Addr, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, body) = http_get(SocketAddr::new(node_ip.into(), 15020), "/metrics")?;
    body.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
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

/// The mesh programs: the node proxy Cargo built for this test, the control
/// plane next to it. A workspace build (`cargo nextest run --workspace`,
/// `cargo build --bins`) has them; a run of this package alone builds them.
pub fn binaries() -> MeshBinaries {
    let proxy = Path::new(env!("CARGO_BIN_EXE_weft-node-proxy"));
    let dir = proxy.parent().unwrap();
    if let Ok(b) = MeshBinaries::in_dir(dir) {
        return b;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target_dir = dir.parent().unwrap();
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "-p",
            "weft-identity",
            "-p",
            "weft-destination",
            "--bins",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .expect("running cargo build for the control plane binaries");
    assert!(status.success(), "cargo build --bins failed");
    MeshBinaries::in_dir(dir).expect("control plane binaries after cargo build")
}

/// A simulator cluster with the mesh (control plane and node proxies); the
/// guard tears both down.
pub struct MeshCluster {
    cluster: Option<TestCluster>,
    pub mesh: Arc<Mesh>,
}

impl MeshCluster {
    /// Brings up the cluster of `files` (manifests and scripts) with the mesh.
    pub fn up(files: &[(&str, &str)]) -> Self {
        let mesh = Arc::new(Mesh::new(binaries()));
        let cluster = TestCluster::up_with(files, |o| o.node_agents = Some(mesh.clone()))
            .expect("cluster with the mesh");
        Self {
            cluster: Some(cluster),
            mesh,
        }
    }

    pub fn cluster(&self) -> &TestCluster {
        self.cluster.as_ref().unwrap()
    }

    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.cluster().state().node(node).unwrap().ip
    }

    /// Tears down and checks nothing is left behind.
    pub fn down(mut self) {
        let state = self.cluster().state().clone();
        drop(self.cluster.take());
        self.mesh.reap();
        assert_eq!(
            weft_sim::testing::leftovers(&state.name, Some(state.slot)),
            Vec::<String>::new()
        );
    }
}

impl Drop for MeshCluster {
    fn drop(&mut self) {
        drop(self.cluster.take());
        self.mesh.reap();
    }
}

/// `/config_dump` is on 127.0.0.1:15000 inside the node's namespace.
pub fn config_dump(mc: &MeshCluster, node: &str) -> serde_json::Value {
    let state = mc.cluster().state();
    let node = state.node(node).unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.netns,
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://127.0.0.1:15000/config_dump",
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("config_dump: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Whether `node`'s proxy currently captures pod `name`.
pub fn captures(mc: &MeshCluster, node: &str, name: &str) -> bool {
    config_dump(mc, node)["pods"]
        .as_array()
        .is_some_and(|pods| pods.iter().any(|p| p["name"] == name))
}

pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    // Generous: CI runs many clusters in parallel on two cores.
    let deadline = Instant::now() + Duration::from_secs(45);
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within 45s");
}
