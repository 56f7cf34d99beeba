//! `cargo xtask bench mesh`: the mesh against a direct path, in one run, on
//! the simulator (two nodes, the real control plane and node proxies).
//!
//! The same pair of pods exists twice: in an enrolled namespace (through
//! both node proxies, HBONE over mTLS) and in a namespace outside the mesh
//! (direct). For each path:
//! - single-connection throughput: `iperf3 -t 4`, 3 runs, median;
//! - connection set-up: 300 sequential new connections, each a 64-byte
//!   round trip (`conn_rtt.py`): connections/s, latency p50/p99 and the
//!   node proxies' CPU per connection; the same through two plain TCP
//!   relays, one per node (`relays.rs`): the floor of any proxy per node;
//! - HTTP/1.1 and gRPC latency at a fixed request rate, open loop
//!   (`http.rs`): p50/p99 per round, rounds alternating direct, the mesh
//!   with L7 (HTTP detected: request-level proxying and metrics) and the
//!   mesh at L4 only (the same server on a port the pod declares opaque),
//!   and direct's client and server through two plain TCP relays and (for
//!   gRPC) two plain HTTP/2 relays (`relays.rs`): the latency floors;
//! - requests per CPU second of the node proxies, closed loop, L7 and L4;
//!   and gRPC calls per CPU second of two plain TCP relays against two
//!   plain HTTP/2 relays (`relays.rs`), the floor of the L7/L4 ratio;
//!   `WEFT_BENCH_PART=grpc-floor` runs the relays' part alone;
//! - the node proxies' RSS idle, after the runs, and (a second cluster)
//!   with 100 enrolled pods on one node against a node with none;
//! - applications as they are found (`stacks.rs`, a third cluster): real
//!   Python, Node.js, Go and gRPC servers, sequential requests, p50/p99.
//!   `WEFT_BENCH_PART=stacks` runs only that part; `WEFT_BENCH_BINARIES=DIR`
//!   takes the mesh's programs from DIR (to compare two builds);
//! - requests failed when a replica dies (`failover.rs`), and during a
//!   rollout of both node proxies (`rollout.rs`), each next to a window
//!   without; `WEFT_BENCH_PART=failover|rollout` runs one alone;
//! - single-connection throughput and the node proxies' CPU per GB, direct
//!   against the mesh's default and L4-only paths, rounds alternating
//!   (`throughput.rs`); `WEFT_BENCH_PART=throughput` runs it alone;
//! - `WEFT_BENCH_PART=connections` (`connections.rs`, not in the full
//!   run): 10,000 concurrent connections through the node proxies, each
//!   echoing periodically: errors, echo latency against direct, RSS per
//!   connection;
//! - `WEFT_BENCH_PART=latency`: only the HTTP/1.1 and gRPC open-loop
//!   rounds above; `WEFT_BENCH_PART=new-connections`: only the new
//!   connections' rounds;
//! - `WEFT_BENCH_PART=memory` (`memory.rs`, not in the full run): RSS with
//!   0, 1 and 100 enrolled pods and a CPU spot check, median of 3, for this
//!   build and others given in `WEFT_BENCH_MEMORY_BUILDS`.
//!
//! Needs root, the release binaries next to this example's directory
//! (`cargo build --release --bins`), and iperf3.
//!
//! Profiling: with `WEFT_BENCH_PROFILE=h1|grpc` (and `WEFT_BENCH_PORT=8090`
//! for the L4 path), the program only brings the cluster up, prints the
//! node proxies' pids and runs the closed loop for about 30 s, e.g. while
//! `perf record -g -p PID,PID` looks at where their CPU goes. With
//! `WEFT_BENCH_PROFILE_RATE=N` it runs an open loop of N requests a second
//! on one connection for 10 s instead (each request alone, as a quiet
//! client's: where a request's latency goes) and prints its result; then,
//! after printing their pids and 2 s to attach, the same through two plain
//! relays of the same layer (HTTP/2 for gRPC on 8080, TCP otherwise).

mod connections;
mod failover;
mod http;
mod memory;
mod relays;
mod rollout;
mod stacks;
mod throughput;

use std::time::{Duration, Instant};
use weft_sim::TestCluster;
use weft_sim::mesh::{Component, Mesh, MeshBinaries};

/// HTTP latency: requests per second, seconds per round, connections, rounds
/// per path.
const HTTP_RATE: f64 = 500.0;
const HTTP_SECONDS: f64 = 5.0;
const HTTP_CONNECTIONS: usize = 4;
const HTTP_ROUNDS: usize = 5;
/// Enrolled pods on one node for the RSS measurement.
const MANY_PODS: usize = 100;

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
metadata: {name: server, namespace: mesh, annotations: {weft.io/opaque-ports: "8090"}}
spec:
  nodeName: node-b
  containers:
  - {name: iperf, command: [iperf3, -s, -p, "5201"], ports: [{containerPort: 5201}]}
  - {name: echo, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}
  - {name: http, command: [BENCH_EXE, http-server, "8080", "8090"], ports: [{containerPort: 8080}, {containerPort: 8090}]}
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
  - {name: http, command: [BENCH_EXE, http-server, "8080", "8090"], ports: [{containerPort: 8080}, {containerPort: 8090}]}
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

/// One path's throughput runs and connection rounds (one value per run).
#[derive(Default)]
struct PathResult {
    gbps: Vec<f64>,
    conn_per_s: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    /// Microseconds of CPU per connection of the processes between the
    /// client and the server (the node proxies, or the relays).
    hop_cpu_us: Vec<f64>,
}

/// Connection rounds per path: one round of 300 was at the mercy of
/// whatever else the machine did in that second (0.14× direct in one run,
/// 0.80× in the next).
const CONN_ROUNDS: usize = 3;

/// One measured column of a [`PathResult`], for a table row.
type Column = fn(&PathResult) -> &[f64];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// iperf3 runs into `r.gbps`.
fn measure_throughput(cluster: &TestCluster, ns: &str, r: &mut PathResult) {
    let server = cluster.pod(&format!("{ns}/server")).ip.to_string();
    let client = format!("{ns}/client");
    for _ in 0..3 {
        let out = cluster.exec_ok(
            &client,
            &["iperf3", "-c", &server, "-p", "5201", "-t", "4", "-J"],
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
        r.gbps.push(
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap()
                / 1e9,
        );
    }
}

/// Sequential connections per round: 300, or `WEFT_BENCH_CONNECTIONS`
/// (longer rounds to profile the proxies under).
fn connections_per_round() -> u32 {
    std::env::var("WEFT_BENCH_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300)
}

/// One round of sequential connections from `ns/client` to `host:port`
/// into `r`.
fn measure_connections(cluster: &TestCluster, ns: &str, host: &str, port: u16, r: &mut PathResult) {
    let client = format!("{ns}/client");
    let (port, n) = (port.to_string(), connections_per_round().to_string());
    let out = cluster.exec_ok(&client, &["./conn_rtt.py", host, &port, &n]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("conn_rtt JSON");
    let mut lat: Vec<f64> = v["lat_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    r.conn_per_s
        .push(lat.len() as f64 / v["seconds"].as_f64().unwrap());
    r.p50_us.push(percentile(&mut lat, 0.5));
    r.p99_us.push(percentile(&mut lat, 0.99));
}

/// The new-connection rounds' results per path.
#[derive(Default)]
struct ConnectionPaths {
    direct: PathResult,
    meshed: PathResult,
    /// Direct's client and server through two plain relays
    /// ([`relays::Relays`]): the floor of any mesh with a proxy per node.
    relayed: PathResult,
}

/// [`CONN_ROUNDS`] rounds of new connections per path, alternating, so
/// that the machine's load drifts over all alike. The CPU the node proxies
/// (or the relays) spent in a round, per connection, goes with it: each
/// is idle in the other paths' rounds.
fn connection_rounds(cluster: &TestCluster, mesh: &Mesh, paths: &mut ConnectionPaths) {
    let server = |ns: &str| cluster.pod(&format!("{ns}/server")).ip.to_string();
    let relays = relays::Relays::start(cluster, relays::RelayKind::Tcp, 0, &server("direct"), 9000);
    let (entry, entry_port) = (relays.entry.ip().to_string(), relays.entry.port());
    let per_connection = |pids: &[u32], round: &mut dyn FnMut()| {
        let before = processes_cpu_seconds(pids);
        round();
        let spent = processes_cpu_seconds(pids) - before;
        spent * 1e6 / f64::from(connections_per_round())
    };
    for _ in 0..CONN_ROUNDS {
        measure_connections(
            cluster,
            "direct",
            &server("direct"),
            9000,
            &mut paths.direct,
        );
        let cpu = per_connection(&proxy_pids(mesh), &mut || {
            measure_connections(cluster, "mesh", &server("mesh"), 9000, &mut paths.meshed)
        });
        paths.meshed.hop_cpu_us.push(cpu);
        let cpu = per_connection(&relays.pids(), &mut || {
            measure_connections(cluster, "direct", &entry, entry_port, &mut paths.relayed)
        });
        paths.relayed.hop_cpu_us.push(cpu);
    }
}

/// The new-connection rows of the table: direct, the mesh, their ratio,
/// then the two plain relays and their ratio to direct.
fn print_connection_rows(paths: &ConnectionPaths) {
    println!(
        "connections: {CONN_ROUNDS} rounds of {} per path, alternating (median of the rounds [min-max]; two relays: plain TCP relays on both nodes, the floor of a proxy per node):",
        connections_per_round()
    );
    println!(
        "{:<28} {:>14} {:>14} {:>8} {:>14} {:>8}",
        "", "direct", "mesh", "ratio", "two relays", "ratio"
    );
    let conn_rows: [(&str, Column); 3] = [
        ("new connections/s (seq.)", |r| &r.conn_per_s),
        ("conn+64B RTT p50 (us)", |r| &r.p50_us),
        ("conn+64B RTT p99 (us)", |r| &r.p99_us),
    ];
    for (label, values) in conn_rows {
        let (d, m, f) = (
            values(&paths.direct),
            values(&paths.meshed),
            values(&paths.relayed),
        );
        let (dm, mm, fm) = (
            median(&mut d.to_vec()),
            median(&mut m.to_vec()),
            median(&mut f.to_vec()),
        );
        println!(
            "{:<28} {:>14} {:>14} {:>8.2} {:>14} {:>8.2}",
            label,
            format!("{dm:.0} [{}]", spread(d)),
            format!("{mm:.0} [{}]", spread(m)),
            mm / dm,
            format!("{fm:.0} [{}]", spread(f)),
            fm / dm
        );
    }
    let hop_cpu = |r: &PathResult| {
        let v = &r.hop_cpu_us;
        format!("{:.0} [{}]", median(&mut v.clone()), spread(v))
    };
    println!(
        "{:<28} {:>14} {:>14} {:>8} {:>14}",
        "proxies' CPU/conn (us)",
        "-",
        hop_cpu(&paths.meshed),
        "",
        hop_cpu(&paths.relayed)
    );
}

/// One path of the open-loop rounds: its label in the table, the
/// namespace whose client sends, and where to (`host:port`).
struct HttpPath {
    label: &'static str,
    ns: &'static str,
    target: String,
}

/// One path's label and its rounds' results.
type PathRuns = (&'static str, Vec<http::LoadResult>);

/// The paths the open-loop rounds compare for `proto`: direct; the mesh
/// with L7; the mesh at L4 only (its server declares 8090 opaque,
/// `weft.io/opaque-ports`, so the proxies carry it as TCP: the same hops
/// without L7); direct's client and server through two plain TCP relays
/// (`tcp`), and for gRPC through two plain HTTP/2 relays (`http2`): the
/// latency floors of a proxy per node at L4 and at L7.
fn http_paths(
    cluster: &TestCluster,
    proto: http::Proto,
    tcp: &relays::Relays,
    http2: &relays::Relays,
) -> Vec<HttpPath> {
    let server = |ns: &str| cluster.pod(&format!("{ns}/server")).ip.to_string();
    let path = |label, ns, target: String| HttpPath { label, ns, target };
    let mut paths = vec![
        path("direct", "direct", format!("{}:8080", server("direct"))),
        path("mesh L7", "mesh", format!("{}:8080", server("mesh"))),
        path("mesh L4 only", "mesh", format!("{}:8090", server("mesh"))),
        path("two TCP relays", "direct", tcp.entry.to_string()),
    ];
    if proto == http::Proto::Grpc {
        paths.push(path("two HTTP/2 relays", "direct", http2.entry.to_string()));
    }
    paths
}

/// An open-loop run from `ns/client` to `target` (`host:port`) at
/// `(requests a second, seconds, connections)`, this program re-executed
/// inside the client pod.
fn open_loop(
    cluster: &TestCluster,
    ns: &str,
    target: &str,
    proto: http::Proto,
    (rate, seconds, connections): (f64, f64, usize),
) -> http::LoadResult {
    let out = cluster.exec_ok(
        &format!("{ns}/client"),
        &[
            &exe(),
            "http-load",
            target,
            proto.arg(),
            &rate.to_string(),
            &seconds.to_string(),
            &connections.to_string(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("http-load JSON");
    http::LoadResult::from_json(&v).expect("http-load JSON fields")
}

/// Requests per CPU second of the two node proxies (client's and
/// server's), closed loop through `mesh/server:port` for a few seconds.
/// Every request crosses both proxies, so this is requests per second one
/// core could carry through a source and a destination proxy together.
fn per_cpu_second(cluster: &TestCluster, mesh: &Mesh, port: u16, proto: http::Proto) -> (f64, f64) {
    let server = cluster.pod("mesh/server").ip.to_string();
    let cpu = || proxies_cpu_seconds(mesh);
    let before = cpu();
    let target = format!("{server}:{port}");
    let load = (MAX_SECONDS, MAX_CONCURRENCY);
    let (completed, seconds) = closed_loop(cluster, "mesh", &target, proto, load);
    let used = cpu() - before;
    (completed / used, completed / seconds)
}

/// One closed-loop run from `ns/client` to `target`, `(seconds, callers)`
/// (each caller sends its next request when the last one is answered):
/// the requests completed and the seconds taken.
fn closed_loop(
    cluster: &TestCluster,
    ns: &str,
    target: &str,
    proto: http::Proto,
    (seconds, callers): (f64, usize),
) -> (f64, f64) {
    let out = cluster.exec_ok(
        &format!("{ns}/client"),
        &[
            &exe(),
            "http-max",
            target,
            proto.arg(),
            &seconds.to_string(),
            &callers.to_string(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("http-max JSON");
    let completed = v["completed"].as_f64().unwrap_or(0.0);
    let seconds = v["seconds"].as_f64().unwrap_or(f64::NAN);
    (completed, seconds)
}

/// Rounds of the gRPC floor per kind of relay.
const FLOOR_ROUNDS: usize = 3;

/// gRPC calls per relay CPU second through two plain TCP relays and two
/// plain HTTP/2 relays ([`relays`]), direct's client to direct's server,
/// closed loop as [`per_cpu_second`], [`FLOOR_ROUNDS`] rounds alternating:
/// what taking each call apart costs by itself. Returns the rows.
fn grpc_floor(cluster: &TestCluster) -> String {
    use relays::{RelayKind, Relays};
    let server = cluster.pod("direct/server").ip.to_string();
    let mut pairs = [(1, RelayKind::Tcp), (2, RelayKind::Http2)].map(|(pair, kind)| {
        let relays = Relays::start(cluster, kind, pair, &server, 8080);
        (kind, relays, Vec::new())
    });
    for _ in 0..FLOOR_ROUNDS {
        for (_, relays, per_cpu_s) in pairs.iter_mut() {
            let before = processes_cpu_seconds(&relays.pids());
            let (completed, _) = closed_loop(
                cluster,
                "direct",
                &relays.entry.to_string(),
                http::Proto::Grpc,
                (MAX_SECONDS, MAX_CONCURRENCY),
            );
            let used = processes_cpu_seconds(&relays.pids()) - before;
            per_cpu_s.push(completed / used);
        }
    }
    let mut rows = format!(
        "gRPC unary through two plain relays (no TLS, nothing but the relaying; closed loop, {MAX_CONCURRENCY} callers, {MAX_SECONDS}s, {FLOOR_ROUNDS} rounds alternating; calls per relay CPU second, median [min-max]):"
    );
    let tcp = median(&mut pairs[0].2.clone());
    for (kind, _, per_cpu_s) in &pairs {
        let m = median(&mut per_cpu_s.clone());
        rows += &format!(
            "\n  {:<14} {:>8.0} [{}] calls/CPU-s, {:.1} us per call, {:.2}x the TCP relays' CPU per call",
            format!("{kind:?} relays"),
            m,
            spread(per_cpu_s),
            1e6 / m,
            tcp / m
        );
    }
    rows
}

/// The closed loop alone, for a profiler (see the module's doc).
fn profile(cluster: &TestCluster, mesh: &Mesh, proto: http::Proto) {
    let port = std::env::var("WEFT_BENCH_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    announce_proxy_pids(mesh);
    if let Some(rate) = std::env::var("WEFT_BENCH_PROFILE_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        let server = cluster.pod("mesh/server").ip;
        let target = format!("{server}:{port}");
        let result = open_loop(cluster, "mesh", &target, proto, (rate, 10.0, 1));
        eprintln!("open loop {proto:?} port {port}, {rate}/s on one connection: {result:?}");
        // The same through the relays of the same layer, to compare.
        let kind = match (proto, port) {
            (http::Proto::Grpc, 8080) => relays::RelayKind::Http2,
            _ => relays::RelayKind::Tcp,
        };
        let server = cluster.pod("direct/server").ip.to_string();
        let relays = relays::Relays::start(cluster, kind, 5, &server, 8080);
        announce_pids("relay", &relays.pids());
        std::thread::sleep(Duration::from_secs(2));
        let target = relays.entry.to_string();
        let result = open_loop(cluster, "direct", &target, proto, (rate, 10.0, 1));
        eprintln!(
            "open loop {proto:?} through {kind:?} relays, {rate}/s on one connection: {result:?}"
        );
        return;
    }
    for _ in 0..8 {
        let (per_cpu_s, rps) = per_cpu_second(cluster, mesh, port, proto);
        eprintln!(
            "closed loop {proto:?} port {port}: {per_cpu_s:.0} req per proxy CPU second, {rps:.0} req/s"
        );
    }
}

/// Both node proxies' process IDs (to profile them from outside).
fn proxy_pids(mesh: &Mesh) -> Vec<u32> {
    ["node-a", "node-b"]
        .iter()
        .filter_map(|n| mesh.pid(&Component::NodeProxy(n.to_string())))
        .collect()
}

/// Prints both node proxies' process IDs, for a profiler to attach to.
fn announce_proxy_pids(mesh: &Mesh) {
    announce_pids("node proxy", &proxy_pids(mesh));
}

/// Prints `what pids: PID,PID` on stderr (what a profiling script waits
/// for).
fn announce_pids(what: &str, pids: &[u32]) {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    eprintln!("{what} pids: {}", pids.join(","));
}

/// `WEFT_BENCH_PART=latency`: the open-loop HTTP/1.1 and gRPC rounds
/// alone (to compare two builds quickly); medians of the rounds' p50.
fn latency_rounds(cluster: &TestCluster) {
    for (proto, paths) in PROTOS.iter().zip(latency_runs(cluster)) {
        for (i, (label, runs)) in paths.iter().enumerate() {
            let mut p50s: Vec<f64> = runs.iter().map(|r| r.p50_us).collect();
            let mut ratios = p50_ratios_per_round(&paths, i);
            println!(
                "{proto:?} {label}: p50 {:.0} us [{}]; per round, to direct's: {:.2}x [{}]",
                median(&mut p50s),
                spread(&p50s),
                median(&mut ratios),
                spread2(&ratios)
            );
        }
    }
}

/// Path `i`'s p50 over direct's (path 0) in each round: the two ran
/// seconds apart, so the machine's drift between rounds, which moves the
/// medians of the rounds, cancels out.
fn p50_ratios_per_round(paths: &[PathRuns], i: usize) -> Vec<f64> {
    paths[i]
        .1
        .iter()
        .zip(&paths[0].1)
        .map(|(r, direct)| r.p50_us / direct.p50_us)
        .collect()
}

/// The protocols of the open-loop rounds.
const PROTOS: [http::Proto; 2] = [http::Proto::Http1, http::Proto::Grpc];

/// HTTP and gRPC at a fixed rate, [`HTTP_ROUNDS`] rounds: each round goes
/// over every protocol and path ([`http_paths`]), so that the machine's
/// load drifts over all of them alike. By protocol, then path, then round.
fn latency_runs(cluster: &TestCluster) -> Vec<Vec<PathRuns>> {
    use relays::{RelayKind, Relays};
    let server = cluster.pod("direct/server").ip.to_string();
    let tcp = Relays::start(cluster, RelayKind::Tcp, 3, &server, 8080);
    let http2 = Relays::start(cluster, RelayKind::Http2, 4, &server, 8080);
    let paths: Vec<Vec<HttpPath>> = PROTOS
        .iter()
        .map(|proto| http_paths(cluster, *proto, &tcp, &http2))
        .collect();
    let mut latency: Vec<Vec<PathRuns>> = paths
        .iter()
        .map(|p| p.iter().map(|path| (path.label, Vec::new())).collect())
        .collect();
    for round in 0..HTTP_ROUNDS {
        for (pi, proto) in PROTOS.iter().enumerate() {
            for (i, path) in paths[pi].iter().enumerate() {
                let r = open_loop(
                    cluster,
                    path.ns,
                    &path.target,
                    *proto,
                    (HTTP_RATE, HTTP_SECONDS, HTTP_CONNECTIONS),
                );
                eprintln!("round {round} {proto:?} {}: {r:?}", path.label);
                latency[pi][i].1.push(r);
            }
        }
    }
    latency
}

/// Closed-loop throughput run: seconds and concurrent callers.
const MAX_SECONDS: f64 = 4.0;
const MAX_CONCURRENCY: usize = 16;

/// CPU seconds a process has used so far, to the nanosecond: its CPU-time
/// clock (`clock_getcpuclockid`), which counts every thread, those already
/// ended too (`/proc/PID/stat` counts 10 ms ticks, too coarse for a few
/// hundred requests; summing the threads' `schedstat` loses those that
/// ended).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let clock = nix::time::clock_getcpuclockid(nix::unistd::Pid::from_raw(pid as i32)).ok()?;
    let t = nix::time::clock_gettime(clock).ok()?;
    Some(t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// CPU seconds these processes have used so far ([`cpu_seconds`]).
fn processes_cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().copied().filter_map(cpu_seconds).sum()
}

/// CPU seconds both node proxies have used so far.
fn proxies_cpu_seconds(mesh: &Mesh) -> f64 {
    processes_cpu_seconds(&proxy_pids(mesh))
}

fn exe() -> String {
    std::env::current_exe()
        .expect("the benchmark's own path")
        .to_string_lossy()
        .into_owned()
}

/// VmRSS of one process, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn proxy_rss(mesh: &Mesh, node: &str) -> f64 {
    mesh.pid(&Component::NodeProxy(node.into()))
        .and_then(rss_mib)
        .unwrap_or(f64::NAN)
}

/// A second cluster: `MANY_PODS` enrolled pods on node-a, none on node-b.
/// Returns (seconds to bring it up, RSS node-a, RSS node-b, pods captured).
fn many_pods(binaries: MeshBinaries) -> (f64, f64, f64, usize) {
    let mut manifest = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: many, labels: {weft.io/mesh: enabled}}\n",
    );
    for i in 0..MANY_PODS {
        manifest.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i:03}, namespace: many}}\nspec: {{nodeName: node-a, containers: [{{name: main, command: [sleep, infinity]}}]}}\n"
        ));
    }
    // node-b exists only through a pod outside the mesh.
    manifest.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: idle, namespace: default}\nspec: {nodeName: node-b, containers: [{name: main, command: [sleep, infinity]}]}\n");
    let mesh = std::sync::Arc::new(Mesh::new(binaries));
    let started = Instant::now();
    let cluster = TestCluster::up_with(&[("many.yaml", manifest.as_str())], |o| {
        o.node_agents = Some(mesh.clone());
        o.ready_timeout = Duration::from_secs(300);
    })
    .expect("cluster with 100 enrolled pods");
    let up = started.elapsed().as_secs_f64();
    // Captured = listeners open and certificate fetched: wait (bounded)
    // until node-a's proxy serves all of them and is ready.
    let dump_pods = || memory::served_pods(&cluster, "node-a");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut captured = dump_pods();
    while captured < MANY_PODS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        captured = dump_pods();
    }
    let ready = weft_sim::mesh::http_get(
        std::net::SocketAddr::new(cluster.state().node("node-a").unwrap().ip.into(), 15021),
        "/ready",
    )
    .map(|r| r.0);
    eprintln!("many pods: cluster up in {up:.1}s, {captured} captured on node-a, /ready {ready:?}");
    let (a, b) = (proxy_rss(&mesh, "node-a"), proxy_rss(&mesh, "node-b"));
    drop(cluster);
    mesh.reap();
    (up, a, b, captured)
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    format!("{min:.0}-{max:.0}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("http-server") => {
            let ports: Vec<u16> = args[2..].iter().filter_map(|p| p.parse().ok()).collect();
            if ports.is_empty() {
                eprintln!("usage: mesh-bench http-server PORT...");
                std::process::exit(2)
            }
            http::server(&ports)
        }
        Some("relay") => {
            let usage = "usage: mesh-bench relay PORT HOST:PORT ahead|on-first-byte|http2";
            let (Some(port), Some(target), Some(mode)) = (
                args.get(2).and_then(|p| p.parse().ok()),
                args.get(3).and_then(|t| t.parse().ok()),
                args.get(4).map(String::as_str),
            ) else {
                eprintln!("{usage}");
                std::process::exit(2)
            };
            match mode {
                "ahead" | "on-first-byte" => relays::serve(port, target, mode == "ahead"),
                "http2" => relays::serve_http2(port, target),
                _ => {
                    eprintln!("{usage}");
                    std::process::exit(2)
                }
            }
        }
        Some("echo-server") => {
            let Some(port) = args.get(2).and_then(|p| p.parse().ok()) else {
                eprintln!("usage: mesh-bench echo-server PORT");
                std::process::exit(2)
            };
            connections::echo_server(port)
        }
        Some("hold") => {
            let (Some(target), Some(n)) = (args.get(2), args.get(3).and_then(|n| n.parse().ok()))
            else {
                eprintln!("usage: mesh-bench hold HOST:PORT CONNECTIONS");
                std::process::exit(2)
            };
            connections::hold(target, n);
            return;
        }
        Some("http-load") => {
            let usage = "usage: mesh-bench http-load HOST:PORT h1|grpc RATE SECONDS CONNECTIONS";
            let (Some(target), Some(proto), Some(rate), Some(seconds), Some(conns)) = (
                args.get(2),
                args.get(3).and_then(|a| http::Proto::parse(a)),
                args.get(4).and_then(|a| a.parse().ok()),
                args.get(5).and_then(|a| a.parse().ok()),
                args.get(6).and_then(|a| a.parse().ok()),
            ) else {
                eprintln!("{usage}");
                std::process::exit(2)
            };
            println!(
                "{}",
                http::load(target, proto, rate, seconds, conns).to_json()
            );
            return;
        }
        Some("http-max") => {
            let usage = "usage: mesh-bench http-max HOST:PORT h1|grpc SECONDS CONCURRENCY";
            let (Some(target), Some(proto), Some(seconds), Some(concurrency)) = (
                args.get(2),
                args.get(3).and_then(|a| http::Proto::parse(a)),
                args.get(4).and_then(|a| a.parse().ok()),
                args.get(5).and_then(|a| a.parse().ok()),
            ) else {
                eprintln!("{usage}");
                std::process::exit(2)
            };
            println!("{}", http::max(target, proto, seconds, concurrency));
            return;
        }
        Some("seq") => {
            let usage = "usage: mesh-bench seq HOST:PORT h1|grpc fresh|keep N GAP_MS";
            let (Some(target), Some(proto), Some(mode), Some(n), Some(gap)) = (
                args.get(2),
                args.get(3).and_then(|a| http::Proto::parse(a)),
                args.get(4),
                args.get(5).and_then(|a| a.parse().ok()),
                args.get(6).and_then(|a| a.parse().ok()),
            ) else {
                eprintln!("{usage}");
                std::process::exit(2)
            };
            println!("{}", stacks::seq(target, proto, mode == "fresh", n, gap));
            return;
        }
        _ => {}
    }
    let binaries = match std::env::var_os("WEFT_BENCH_BINARIES") {
        Some(dir) => MeshBinaries::in_dir(std::path::Path::new(&dir)),
        None => MeshBinaries::next_to_current_exe(),
    }
    .unwrap_or_else(|e| {
        eprintln!("mesh-bench: {e}");
        std::process::exit(2)
    });
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("stacks") {
        stacks::run(binaries);
        return;
    }
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("failover") {
        failover::bench(binaries);
        return;
    }
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("rollout") {
        rollout::bench(binaries);
        return;
    }
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("connections") {
        connections::bench(binaries);
        return;
    }
    if let Ok("throughput" | "handshake") = std::env::var("WEFT_BENCH_PART").as_deref() {
        throughput::bench(binaries);
        return;
    }
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("memory") {
        memory::bench(binaries);
        return;
    }
    let mesh = std::sync::Arc::new(Mesh::new(binaries.clone()));
    let manifest = CLUSTER.replace("BENCH_EXE", &exe());
    let cluster = TestCluster::up_with(
        &[("c.yaml", manifest.as_str()), ("conn_rtt.py", CONN_RTT)],
        |o| {
            o.node_agents = Some(mesh.clone());
            o.ready_timeout = Duration::from_secs(60);
        },
    )
    .expect("cluster with the mesh");
    if let Some(proto) = std::env::var("WEFT_BENCH_PROFILE")
        .ok()
        .and_then(|p| http::Proto::parse(&p))
    {
        profile(&cluster, &mesh, proto);
        drop(cluster);
        mesh.reap();
        return;
    }
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("grpc-floor") {
        println!("{}", grpc_floor(&cluster));
        drop(cluster);
        mesh.reap();
        return;
    }
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("latency") {
        latency_rounds(&cluster);
        drop(cluster);
        mesh.reap();
        return;
    }
    if std::env::var("WEFT_BENCH_PART").as_deref() == Ok("new-connections") {
        announce_proxy_pids(&mesh);
        let mut paths = ConnectionPaths::default();
        connection_rounds(&cluster, &mesh, &mut paths);
        print_connection_rows(&paths);
        drop(cluster);
        mesh.reap();
        return;
    }
    let idle: Vec<f64> = ["node-a", "node-b"]
        .iter()
        .map(|n| proxy_rss(&mesh, n))
        .collect();
    let mut paths = ConnectionPaths::default();
    measure_throughput(&cluster, "direct", &mut paths.direct);
    measure_throughput(&cluster, "mesh", &mut paths.meshed);
    connection_rounds(&cluster, &mesh, &mut paths);
    let latency = latency_runs(&cluster);
    // Requests per CPU second of the proxies, L7 and L4.
    let mut per_cpu = Vec::new();
    for proto in PROTOS {
        for (label, port) in [("L7", 8080), ("L4 only", 8090)] {
            let (per_cpu_s, rps) = per_cpu_second(&cluster, &mesh, port, proto);
            eprintln!(
                "closed loop {proto:?} {label}: {per_cpu_s:.0} req per proxy CPU second, {rps:.0} req/s"
            );
            per_cpu.push((proto, label, per_cpu_s, rps));
        }
    }
    let floor = grpc_floor(&cluster);
    let busy: Vec<f64> = ["node-a", "node-b"]
        .iter()
        .map(|n| proxy_rss(&mesh, n))
        .collect();
    drop(cluster);
    mesh.reap();
    let (many_up, many_rss, none_rss, captured) = many_pods(binaries.clone());

    let (direct, meshed) = (&paths.direct, &paths.meshed);
    let (dg, mg) = (
        median(&mut direct.gbps.clone()),
        median(&mut meshed.gbps.clone()),
    );
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
        format!("{dg:.2} [{}]", spread2(&direct.gbps)),
        format!("{mg:.2} [{}]", spread2(&meshed.gbps)),
        mg / dg
    );
    print_connection_rows(&paths);
    print_latency_tables(&latency);
    println!(
        "requests per CPU second of the two node proxies together (closed loop, {MAX_CONCURRENCY} callers, {MAX_SECONDS}s; each request crosses both):"
    );
    for (proto, label, per_cpu_s, rps) in &per_cpu {
        println!("  {proto:?} {label:<8} {per_cpu_s:>8.0} req/CPU-s   ({rps:.0} req/s)");
    }
    println!("{floor}");
    for ((node, i), b) in ["node-a", "node-b"].iter().zip(&idle).zip(&busy) {
        println!(
            "node proxy {node} RSS: {i:.1} MiB idle (1 enrolled pod), {b:.1} MiB after the runs"
        );
    }
    println!(
        "node proxy RSS with {captured} of {MANY_PODS} enrolled pods captured: {many_rss:.1} MiB (a node proxy with no enrolled pod in the same cluster: {none_rss:.1} MiB); that cluster came up in {many_up:.0}s"
    );
    throughput::bench(binaries.clone());
    stacks::run(binaries.clone());
    failover::bench(binaries.clone());
    rollout::bench(binaries);
}

/// The open-loop tables, one per protocol: each path's p50, p99 and
/// achieved rate against direct's, its errors, and the mesh's p50 against
/// the relays' of the same layer (its floor).
fn print_latency_tables(latency: &[Vec<PathRuns>]) {
    for (proto, paths) in PROTOS.iter().zip(latency) {
        let name = match proto {
            http::Proto::Http1 => "HTTP/1.1 GET",
            http::Proto::Grpc => "gRPC unary (HTTP/2)",
        };
        println!(
            "{name}, open loop, {HTTP_RATE} req/s for {HTTP_SECONDS}s over {HTTP_CONNECTIONS} connections, {HTTP_ROUNDS} rounds per path (median of the rounds [min-max]; ratio to direct's median; p50 per round: the ratio to direct's p50 of the same round, median [min-max]):"
        );
        let header: String = paths.iter().map(|(l, _)| format!(" {l:>22}")).collect();
        println!("{:<14}{header}", "");
        let p50 = |label: &str| {
            let (_, runs) = paths.iter().find(|(l, _)| *l == label)?;
            Some(median(
                &mut runs.iter().map(|r| r.p50_us).collect::<Vec<_>>(),
            ))
        };
        let row = |what: &str, pick: fn(&http::LoadResult) -> f64| {
            let mut cells = String::new();
            let mut base = f64::NAN;
            for (i, (_, runs)) in paths.iter().enumerate() {
                let mut v: Vec<f64> = runs.iter().map(pick).collect();
                let m = median(&mut v);
                let cell = if i == 0 {
                    base = m;
                    format!("{m:.0} [{}]", spread(&v))
                } else {
                    format!("{m:.0} [{}] {:.2}x", spread(&v), m / base)
                };
                cells += &format!(" {cell:>22}");
            }
            println!("{what:<14}{cells}");
        };
        row("p50 (us)", |r| r.p50_us);
        let per_round: String = (0..paths.len())
            .map(|i| {
                let mut ratios = p50_ratios_per_round(paths, i);
                let cell = if i == 0 {
                    "-".to_string()
                } else {
                    format!("{:.2}x [{}]", median(&mut ratios), spread2(&ratios))
                };
                format!(" {cell:>22}")
            })
            .collect();
        println!("{:<14}{per_round}", "p50 per round");
        row("p99 (us)", |r| r.p99_us);
        row("achieved/s", |r| r.achieved_rps);
        let errors: Vec<String> = paths
            .iter()
            .map(|(label, runs)| {
                let e: usize = runs.iter().map(|r| r.errors).sum();
                let n: usize = runs.iter().map(|r| r.sent).sum();
                format!("{label} {e}/{n}")
            })
            .collect();
        println!("errors: {}", errors.join(", "));
        let floors = [
            ("mesh L4 only", "two TCP relays"),
            ("mesh L7", "two HTTP/2 relays"),
        ];
        let over: Vec<String> = floors
            .iter()
            .filter_map(|(mesh, floor)| {
                Some(format!("{mesh} / {floor} {:.2}x", p50(mesh)? / p50(floor)?))
            })
            .collect();
        println!("p50 over its floor: {}", over.join(", "));
    }
}

fn spread2(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::MAX, f64::min);
    let max = v.iter().cloned().fold(f64::MIN, f64::max);
    format!("{min:.2}-{max:.2}")
}
