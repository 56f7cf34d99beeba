//! Applications as they are found (issue #19): real servers of common
//! stacks, measured with sequential requests at a low rate, in the mesh and
//! outside it, in one run on a cluster of their own.
//!
//! Servers, each on an HTTP-detected port and on a port the mesh pod
//! declares opaque (`weft.io/opaque-ports`):
//! - Python `http.server`, HTTP/1.1 (`ThreadingHTTPServer`, keep-alive):
//!   writes the head and the body in two writes, Nagle on;
//! - Node.js `http` (its defaults);
//! - Go `net/http` (built by this program with `go build`, stdlib only);
//! - Python gRPC (grpcio, a unary method on raw bytes).
//!
//! Paths: `direct` (neither side enrolled), `outside->mesh` (a client
//! outside the mesh into the enrolled server: plaintext through the
//! destination proxy), `mesh L7` (both enrolled, HTTP detected), `mesh L4`
//! (the opaque port). Connection modes: `fresh` (a new connection per
//! request, as curl in a loop; connect included) and `keep-alive` (one
//! connection, a warm-up request first). Requests go one at a time,
//! [`GAP_MS`] apart; the client (`mesh-bench seq …`, this program inside
//! the client pod) sets `TCP_NODELAY` as curl does.
//!
//! Also the CPU time the two node proxies used per request on the mesh
//! paths (their CPU time before and after each run, over its requests),
//! and, closed loop on one keep-alive connection, per request at full
//! speed: the figure to compare between two builds.

use super::http::{Conn, Proto};
use super::proxies_cpu_seconds;
use std::time::{Duration, Instant};
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

/// Requests per run, runs per cell (alternating with the other paths),
/// and the pause between two requests of a run.
const REQUESTS: usize = 100;
const ROUNDS: usize = 2;
const GAP_MS: u64 = 10;

/// Python `http.server` in HTTP/1.1 mode: `end_headers()` flushes the head,
/// `wfile.write()` sends the body: two writes, no `TCP_NODELAY`.
const PY_HTTP: &str = r#"#!/usr/bin/env python3
import http.server, sys, threading
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"x" * 64
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
servers = [http.server.ThreadingHTTPServer(("0.0.0.0", int(p)), Handler) for p in sys.argv[1:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"#;

const NODE_HTTP: &str = r#"const http = require('http');
const body = Buffer.alloc(64, 'x');
for (const port of process.argv.slice(2)) {
  http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(200, {'Content-Type': 'text/plain', 'Content-Length': body.length});
      res.end(body);
    });
  }).listen(Number(port), '0.0.0.0');
}
"#;

const GO_HTTP: &str = r#"package main

import (
	"net/http"
	"os"
	"strings"
)

func main() {
	body := []byte(strings.Repeat("x", 64))
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})
	for _, port := range os.Args[2:] {
		go http.ListenAndServe(":"+port, handler)
	}
	http.ListenAndServe(":"+os.Args[1], handler)
}
"#;

/// Unary `weft.bench.Echo/Unary` on raw bytes (no generated code): 64
/// bytes back, the answer the bench's gRPC client checks.
const PY_GRPC: &str = r#"#!/usr/bin/env python3
import sys
from concurrent import futures
import grpc
def unary(request, context):
    return b"x" * 64
handler = grpc.method_handlers_generic_handler(
    "weft.bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
for port in sys.argv[1:]:
    server.add_insecure_port("0.0.0.0:" + port)
server.start()
server.wait_for_termination()
"#;

/// A server: name, protocol, HTTP-detected port (the opaque one is +1000).
struct Stack {
    name: &'static str,
    proto: Proto,
    port: u16,
}

const STACKS: [Stack; 4] = [
    Stack {
        name: "Python http.server (2 writes)",
        proto: Proto::Http1,
        port: 8081,
    },
    Stack {
        name: "Node.js http",
        proto: Proto::Http1,
        port: 8082,
    },
    Stack {
        name: "Go net/http",
        proto: Proto::Http1,
        port: 8083,
    },
    Stack {
        name: "Python gRPC (grpcio)",
        proto: Proto::Grpc,
        port: 8084,
    },
];

/// (label, client namespace, server namespace, opaque port).
const PATHS: [(&str, &str, &str, bool); 4] = [
    ("direct", "direct", "direct", false),
    ("outside->mesh", "direct", "mesh", false),
    ("mesh L7", "mesh", "mesh", false),
    ("mesh L4", "mesh", "mesh", true),
];

const MODES: [(&str, bool); 2] = [("fresh", true), ("keep-alive", false)];

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
metadata: {name: client, namespace: direct}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stacks, namespace: mesh, annotations: {weft.io/opaque-ports: "9081-9084"}}
spec:
  nodeName: node-b
  containers: CONTAINERS
---
apiVersion: v1
kind: Pod
metadata: {name: stacks, namespace: direct}
spec:
  nodeName: node-b
  containers: CONTAINERS
"#;

/// `go build` of the Go server into `dir`, offline (stdlib only).
fn build_go(dir: &std::path::Path) -> String {
    std::fs::write(dir.join("main.go"), GO_HTTP).expect("writing main.go");
    let out = dir.join("go_http");
    let status = std::process::Command::new("go")
        .current_dir(dir)
        .args(["build", "-o"])
        .arg(&out)
        .arg("main.go")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .status()
        .expect("running go build (is Go installed? `cargo xtask setup`)");
    assert!(status.success(), "go build of the Go server failed");
    out.to_string_lossy().into_owned()
}

fn containers(go: &str) -> String {
    let c = |name: &str, cmd: &str, port: u16| {
        format!(
            "{{name: {name}, command: [{cmd}, \"{port}\", \"{}\"], ports: [{{containerPort: {port}}}, {{containerPort: {}}}]}}",
            port + 1000,
            port + 1000
        )
    };
    format!(
        "[{}, {}, {}, {}]",
        c("py", "./py_http.py", 8081),
        c("node", "node, ./node_http.js", 8082),
        c("go", go, 8083),
        c("grpc", "./py_grpc.py", 8084)
    )
}

/// One cell's samples (µs) and the proxies' CPU seconds over its requests.
#[derive(Default, Clone)]
struct Cell {
    lat_us: Vec<f64>,
    errors: usize,
    cpu_s: f64,
}

/// `seq HOST:PORT h1|grpc fresh|keep N GAP_MS`: sequential requests; one
/// JSON line with every latency (µs) and the error count.
pub fn seq(target: &str, proto: Proto, fresh: bool, n: usize, gap_ms: u64) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let (mut lat_us, mut errors) = (Vec::with_capacity(n), 0);
        let mut kept = None;
        if !fresh {
            // Set up, and one unmeasured request through it.
            kept = Conn::open(target, proto).await;
            if let Some(c) = &mut kept {
                c.call(target).await;
            }
        }
        for _ in 0..n {
            let started = Instant::now();
            let ok = if fresh {
                match Conn::open(target, proto).await {
                    Some(mut c) => c.call(target).await,
                    None => false,
                }
            } else {
                if kept.is_none() {
                    kept = Conn::open(target, proto).await;
                }
                match &mut kept {
                    Some(c) => c.call(target).await,
                    None => false,
                }
            };
            if ok {
                lat_us.push(started.elapsed().as_secs_f64() * 1e6);
            } else {
                errors += 1;
                kept = None;
            }
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        }
        serde_json::json!({"lat_us": lat_us, "errors": errors})
    })
}

/// Closed loop for the CPU price per request: one keep-alive connection,
/// requests back to back for [`CLOSED_SECONDS`], mesh L7.
const CLOSED_SECONDS: f64 = 3.0;
const CLOSED_ROUNDS: usize = 3;

/// The two node proxies' CPU µs per request and requests/s, closed loop
/// on one keep-alive connection from `mesh/client` to `port` (median of
/// [`CLOSED_ROUNDS`]).
fn closed_loop(cluster: &TestCluster, mesh: &Mesh, stack: &Stack) -> (f64, f64) {
    let target = format!("{}:{}", cluster.pod("mesh/stacks").ip, stack.port);
    let (mut cpu, mut rps) = (Vec::new(), Vec::new());
    for _ in 0..CLOSED_ROUNDS {
        let before = proxies_cpu_seconds(mesh);
        let (completed, seconds) =
            super::closed_loop(cluster, "mesh", &target, stack.proto, (CLOSED_SECONDS, 1));
        let used = proxies_cpu_seconds(mesh) - before;
        cpu.push(used / completed.max(1.0) * 1e6);
        rps.push(completed / seconds);
    }
    (super::median(&mut cpu), super::median(&mut rps))
}

/// Brings up the stacks' cluster, measures every cell, prints the table.
pub fn run(binaries: MeshBinaries) {
    let go_dir = tempfile::tempdir().expect("a directory for the Go server");
    let go = build_go(go_dir.path());
    let mesh = std::sync::Arc::new(Mesh::new(binaries));
    let manifest = CLUSTER.replace("CONTAINERS", &containers(&go));
    let cluster = TestCluster::up_with(
        &[
            ("stacks.yaml", manifest.as_str()),
            ("py_http.py", PY_HTTP),
            ("node_http.js", NODE_HTTP),
            ("py_grpc.py", PY_GRPC),
        ],
        |o| {
            o.node_agents = Some(mesh.clone());
            o.ready_timeout = Duration::from_secs(90);
        },
    )
    .expect("cluster with the stacks");
    // cells[stack][mode][path]
    let mut cells = vec![vec![vec![Cell::default(); PATHS.len()]; MODES.len()]; STACKS.len()];
    for round in 0..ROUNDS {
        for (si, stack) in STACKS.iter().enumerate() {
            for (mi, (mode, fresh)) in MODES.iter().enumerate() {
                for (pi, (label, client_ns, server_ns, opaque)) in PATHS.iter().enumerate() {
                    let server = cluster.pod(&format!("{server_ns}/stacks")).ip;
                    let port = if *opaque {
                        stack.port + 1000
                    } else {
                        stack.port
                    };
                    let before = proxies_cpu_seconds(&mesh);
                    let out = cluster.exec_ok(
                        &format!("{client_ns}/client"),
                        &[
                            &super::exe(),
                            "seq",
                            &format!("{server}:{port}"),
                            stack.proto.arg(),
                            if *fresh { "fresh" } else { "keep" },
                            &REQUESTS.to_string(),
                            &GAP_MS.to_string(),
                        ],
                    );
                    let used = proxies_cpu_seconds(&mesh) - before;
                    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("seq JSON");
                    let cell = &mut cells[si][mi][pi];
                    let lat = v["lat_us"].as_array().expect("lat_us");
                    cell.lat_us.extend(lat.iter().filter_map(|x| x.as_f64()));
                    cell.errors += v["errors"].as_u64().unwrap_or(0) as usize;
                    cell.cpu_s += used;
                    eprintln!(
                        "round {round} {} {mode} {label}: p50 {:.0} us",
                        stack.name,
                        super::percentile(&mut cell.lat_us.clone(), 0.5)
                    );
                }
            }
        }
    }
    let closed: Vec<(f64, f64)> = STACKS
        .iter()
        .map(|stack| closed_loop(&cluster, &mesh, stack))
        .collect();
    drop(cluster);
    mesh.reap();

    println!(
        "applications as found: {} sequential requests per cell ({ROUNDS} runs of {REQUESTS}, {GAP_MS} ms apart, alternating paths); latency in ms, p50 / p99; \"+p50\": mesh L7 p50 minus direct p50; CPU: both node proxies, us per request",
        ROUNDS * REQUESTS
    );
    println!(
        "| server | connections | {} | mesh L7 +p50 | over 30 ms (per path) | CPU mesh L7 | CPU mesh L4 | errors |",
        PATHS.map(|p| p.0).join(" | ")
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (si, stack) in STACKS.iter().enumerate() {
        for (mi, (mode, _)) in MODES.iter().enumerate() {
            let row = &cells[si][mi];
            let p = |c: &Cell, q: f64| {
                if c.lat_us.is_empty() {
                    f64::NAN
                } else {
                    super::percentile(&mut c.lat_us.clone(), q) / 1e3
                }
            };
            let paths: Vec<String> = row
                .iter()
                .map(|c| format!("{:.2} / {:.2}", p(c, 0.5), p(c, 0.99)))
                .collect();
            let added = p(&row[2], 0.5) - p(&row[0], 0.5);
            let cpu = |c: &Cell| c.cpu_s / c.lat_us.len().max(1) as f64 * 1e6;
            let errors: usize = row.iter().map(|c| c.errors).sum();
            // A 40 ms mode shows as many requests over 30 ms; the
            // machine's noise as a few, on every path alike.
            let slow: Vec<String> = row
                .iter()
                .map(|c| c.lat_us.iter().filter(|l| **l > 30e3).count().to_string())
                .collect();
            println!(
                "| {} | {mode} | {} | {added:+.2} | {} | {:.0} | {:.0} | {errors} |",
                stack.name,
                paths.join(" | "),
                slow.join("/"),
                cpu(&row[2]),
                cpu(&row[3]),
            );
        }
    }
    println!(
        "closed loop, one keep-alive connection, {CLOSED_SECONDS}s, mesh L7 (median of {CLOSED_ROUNDS}): both node proxies' CPU per request"
    );
    println!("| server | CPU us/request | requests/s |");
    println!("|---|---:|---:|");
    for (stack, (cpu, rps)) in STACKS.iter().zip(&closed) {
        println!("| {} | {cpu:.1} | {rps:.0} |", stack.name);
    }
}
