//! `cargo xtask bench mesh`: the mesh against a direct path, in one run, on
//! the simulator (two nodes, the real control plane and node proxies).
//!
//! The same pair of pods exists twice: in an enrolled namespace (through
//! both node proxies, HBONE over mTLS) and in a namespace outside the mesh
//! (direct). For each path:
//! - single-connection throughput: `iperf3 -t 4`, 3 runs, median;
//! - connection set-up: 300 sequential new connections, each a 64-byte
//!   round trip (`conn_rtt.py`): connections/s and latency p50/p99;
//! - the node proxies' RSS at the end (VmRSS of each proxy process).
//!
//! Needs root, the release binaries next to this example's directory
//! (`cargo build --release --bins`), and iperf3.

use std::time::Duration;
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: direct}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mesh}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mesh}
spec:
  nodeName: node-b
  containers:
  - {name: iperf, command: [iperf3, -s, -p, "5201"], ports: [{containerPort: 5201}]}
  - {name: echo, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: direct}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: direct}
spec:
  nodeName: node-b
  containers:
  - {name: iperf, command: [iperf3, -s, -p, "5201"], ports: [{containerPort: 5201}]}
  - {name: echo, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}
"#;

/// N sequential connections, each: connect, send 64 bytes, read them back,
/// close. Prints JSON: total seconds and every round trip in microseconds.
const CONN_RTT: &str = r#"#!/usr/bin/env python3
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
msg = b"x" * 64
lat = []
start = time.perf_counter()
for _ in range(n):
    t = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got == msg
    lat.append((time.perf_counter() - t) * 1e6)
print(json.dumps({"seconds": time.perf_counter() - start, "lat_us": lat}))
"#;

struct PathResult {
    gbps: Vec<f64>,
    conn_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn measure(cluster: &TestCluster, ns: &str) -> PathResult {
    let server = cluster.pod(&format!("{ns}/server")).ip.to_string();
    let client = format!("{ns}/client");
    let mut gbps = Vec::new();
    for _ in 0..3 {
        let out = cluster.exec_ok(
            &client,
            &["iperf3", "-c", &server, "-p", "5201", "-t", "4", "-J"],
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
        gbps.push(
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap()
                / 1e9,
        );
    }
    let out = cluster.exec_ok(&client, &["./conn_rtt.py", &server, "9000", "300"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("conn_rtt JSON");
    let mut lat: Vec<f64> = v["lat_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    PathResult {
        gbps,
        conn_per_s: lat.len() as f64 / v["seconds"].as_f64().unwrap(),
        p50_us: percentile(&mut lat, 0.5),
        p99_us: percentile(&mut lat, 0.99),
    }
}

fn proxy_rss_mib(cluster: &TestCluster) -> Vec<(String, f64)> {
    cluster
        .state()
        .nodes
        .iter()
        .map(|n| {
            let procs = std::fs::read_to_string(n.cgroup.join("cgroup.procs")).unwrap_or_default();
            let kib: f64 = procs
                .lines()
                .filter_map(|pid| {
                    std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).ok()
                })
                .filter_map(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                })
                .sum();
            (n.name.clone(), kib / 1024.0)
        })
        .collect()
}

fn main() {
    let binaries = MeshBinaries::next_to_current_exe().unwrap_or_else(|e| {
        eprintln!("mesh-bench: {e}");
        std::process::exit(2)
    });
    let mesh = std::sync::Arc::new(Mesh::new(binaries));
    let cluster = TestCluster::up_with(&[("c.yaml", CLUSTER), ("conn_rtt.py", CONN_RTT)], |o| {
        o.node_agents = Some(mesh.clone());
        o.ready_timeout = Duration::from_secs(60);
    })
    .expect("cluster with the mesh");
    let idle = proxy_rss_mib(&cluster);
    let mut direct = measure(&cluster, "direct");
    let mut meshed = measure(&cluster, "mesh");
    let busy = proxy_rss_mib(&cluster);

    let spread = |v: &[f64]| {
        let min = v.iter().cloned().fold(f64::MAX, f64::min);
        let max = v.iter().cloned().fold(f64::MIN, f64::max);
        format!("{min:.2}-{max:.2}")
    };
    let (dg, mg) = (median(&mut direct.gbps), median(&mut meshed.gbps));
    println!(
        "mesh benchmark (simulator, 2 nodes, cross-node, {} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<28} {:>14} {:>14} {:>8}",
        "", "direct", "mesh (mTLS)", "ratio"
    );
    println!(
        "{:<28} {:>14} {:>14} {:>8.2}",
        "iperf3 Gbit/s (median of 3)",
        format!("{dg:.2} [{}]", spread(&direct.gbps)),
        format!("{mg:.2} [{}]", spread(&meshed.gbps)),
        mg / dg
    );
    println!(
        "{:<28} {:>14.0} {:>14.0} {:>8.2}",
        "new connections/s (seq.)",
        direct.conn_per_s,
        meshed.conn_per_s,
        meshed.conn_per_s / direct.conn_per_s
    );
    println!(
        "{:<28} {:>14.0} {:>14.0} {:>8.2}",
        "conn+64B RTT p50 (us)",
        direct.p50_us,
        meshed.p50_us,
        meshed.p50_us / direct.p50_us
    );
    println!(
        "{:<28} {:>14.0} {:>14.0} {:>8.2}",
        "conn+64B RTT p99 (us)",
        direct.p99_us,
        meshed.p99_us,
        meshed.p99_us / direct.p99_us
    );
    for ((node, i), (_, b)) in idle.iter().zip(&busy) {
        println!("node proxy {node} RSS: {i:.1} MiB idle, {b:.1} MiB after the runs");
    }
    drop(cluster);
    mesh.reap();
}
