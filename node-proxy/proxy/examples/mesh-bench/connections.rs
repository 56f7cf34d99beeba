//! `WEFT_BENCH_PART=connections`: 10,000 concurrent connections through
//! one node proxy (issue #18). A client pod on node-a opens
//! [`CONNECTIONS`] TCP connections to an echo server on node-b, each
//! verified by one echo as it opens, holds them all open and sends a
//! 32-byte message on every one every [`PERIOD`] for [`ROUNDS`] rounds,
//! checking each echo. The same on the direct path (neither pod in the
//! mesh) is the baseline for the echo latency. While the connections are
//! held, both node proxies' RSS is read: the increase over their RSS
//! before, per connection, is the row.
//!
//! The client and the server are this example run in the pods
//! (`mesh-bench hold …`, `mesh-bench echo-server PORT`).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

pub const CONNECTIONS: usize = 10_000;
const ROUNDS: usize = 5;
const PERIOD: Duration = Duration::from_secs(2);
/// Connections being opened at once (a client's connection pool filling).
const OPENING_AT_ONCE: usize = 200;
const PORT: u16 = 9100;
const MESSAGE: usize = 32;
/// Longest wait for a connect or an echo before it counts as an error.
const TIMEOUT: Duration = Duration::from_secs(10);

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
spec: {nodeName: node-b, containers: [{name: echo, command: [BENCH_EXE, echo-server, "9100"], ports: [{containerPort: 9100}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: direct}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: direct}
spec: {nodeName: node-b, containers: [{name: echo, command: [BENCH_EXE, echo-server, "9100"], ports: [{containerPort: 9100}]}]}
"#;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `echo-server PORT`: writes back whatever each connection sends.
pub fn echo_server(port: u16) -> ! {
    runtime().block_on(async move {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .await
            .unwrap_or_else(|e| panic!("echo-server: port {port}: {e}"));
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::process::exit(1)
}

/// One echo on `stream`: the microseconds it took, or why it failed.
async fn echo(stream: &mut TcpStream, id: usize, round: usize) -> Result<u64, String> {
    let mut message = format!("{id}:{round}:").into_bytes();
    message.resize(MESSAGE, b'.');
    let started = Instant::now();
    let exchange = async {
        stream.write_all(&message).await?;
        let mut back = [0u8; MESSAGE];
        stream.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(Ok(back)) if back[..] == message[..] => Ok(started.elapsed().as_micros() as u64),
        Ok(Ok(_)) => Err("wrong echo".into()),
        Ok(Err(e)) => Err(e.kind().to_string()),
        Err(_) => Err("echo timed out".into()),
    }
}

/// `hold HOST:PORT N`: opens N connections (each checked by one echo),
/// prints `open <ok> <failed> <seconds>`, then echoes on every one each
/// [`PERIOD`] for [`ROUNDS`] rounds and prints `done <json>`.
pub fn hold(target: &str, n: usize) {
    let target = target.to_string();
    runtime().block_on(async move {
        let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
        let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for id in 0..n {
            let (opening, target, errors) = (opening.clone(), target.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let permit = opening.acquire_owned().await.expect("semaphore");
                let connected = tokio::time::timeout(TIMEOUT, TcpStream::connect(&target)).await;
                let mut stream = match connected {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("connect: {}", e.kind()));
                        return None;
                    }
                    Err(_) => {
                        errors.lock().unwrap().push("connect timed out".into());
                        return None;
                    }
                };
                let _ = stream.set_nodelay(true);
                if let Err(e) = echo(&mut stream, id, 0).await {
                    errors.lock().unwrap().push(format!("first echo: {e}"));
                    return None;
                }
                drop(permit);
                Some(stream)
            }));
        }
        let mut streams = Vec::with_capacity(n);
        for t in tasks {
            if let Some(s) = t.await.expect("open task") {
                streams.push(s);
            }
        }
        println!(
            "open {} {} {:.2}",
            streams.len(),
            n - streams.len(),
            started.elapsed().as_secs_f64()
        );
        let held = streams.len();
        let failed = Arc::new(AtomicUsize::new(0));
        let rounds_start = Instant::now();
        let mut tasks = Vec::with_capacity(held);
        for (id, mut stream) in streams.into_iter().enumerate() {
            let (failed, errors) = (failed.clone(), errors.clone());
            // Spread over the period, as independent clients would be.
            let offset = PERIOD.mul_f64(id as f64 / held.max(1) as f64);
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(ROUNDS);
                for round in 1..=ROUNDS {
                    tokio::time::sleep_until(rounds_start + PERIOD * (round as u32 - 1) + offset)
                        .await;
                    match echo(&mut stream, id, round).await {
                        Ok(us) => latencies.push(us),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.lock().unwrap().push(format!("round {round}: {e}"));
                            break;
                        }
                    }
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.expect("echo task"));
        }
        latencies.sort_unstable();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        let errors = errors.lock().unwrap();
        let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
        for e in errors.iter() {
            *kinds.entry(e.as_str()).or_default() += 1;
        }
        println!(
            "done {}",
            serde_json::json!({
                "held": held,
                "echoes": latencies.len(),
                "failed_connections": failed.load(Ordering::Relaxed),
                "p50_us": at(0.5),
                "p99_us": at(0.99),
                "errors": kinds,
            })
        );
    });
}

/// What one path saw.
struct PathRun {
    opened: usize,
    open_failed: usize,
    open_seconds: f64,
    done: serde_json::Value,
    /// Node proxies' RSS (MiB) before and while the connections are held.
    rss_before: [f64; 2],
    rss_held: [f64; 2],
}

fn run_path(cluster: &TestCluster, mesh: &Mesh, namespace: &str) -> PathRun {
    let server = cluster.pod(&format!("{namespace}/server")).ip;
    let rss = || ["node-a", "node-b"].map(|n| super::proxy_rss(mesh, n));
    let rss_before = rss();
    let args = vec![
        "hold".to_string(),
        format!("{server}:{PORT}"),
        CONNECTIONS.to_string(),
    ];
    let mut child = weft_sim::cluster::pod_command(
        cluster.state(),
        &format!("{namespace}/client"),
        &super::exe(),
        &args,
    )
    .expect("command in the client pod")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .expect("mesh-bench hold starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut run = PathRun {
        opened: 0,
        open_failed: 0,
        open_seconds: f64::NAN,
        done: serde_json::Value::Null,
        rss_before,
        rss_held: [f64::NAN; 2],
    };
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(open) = line.strip_prefix("open ") {
            let f: Vec<&str> = open.split(' ').collect();
            run.opened = f[0].parse().unwrap_or(0);
            run.open_failed = f[1].parse().unwrap_or(0);
            run.open_seconds = f[2].parse().unwrap_or(f64::NAN);
            // Held and echoing: the proxies carry every connection now.
            std::thread::sleep(PERIOD);
            run.rss_held = rss();
        } else if let Some(done) = line.strip_prefix("done ") {
            run.done = serde_json::from_str(done).unwrap_or_default();
        }
    }
    let _ = child.wait();
    run
}

pub fn bench(binaries: MeshBinaries) {
    let mesh = Arc::new(Mesh::new(binaries));
    let manifest = CLUSTER.replace("BENCH_EXE", &super::exe());
    let cluster = TestCluster::up_with(&[("c.yaml", manifest.as_str())], |o| {
        o.node_agents = Some(mesh.clone());
        o.ready_timeout = Duration::from_secs(60);
    })
    .expect("cluster with the mesh");
    let direct = run_path(&cluster, &mesh, "direct");
    let meshed = run_path(&cluster, &mesh, "mesh");
    drop(cluster);
    mesh.reap();

    println!(
        "\n{CONNECTIONS} concurrent connections, node-a → node-b, each echoing {MESSAGE} bytes every {PERIOD:?} for {ROUNDS} rounds"
    );
    println!("| | direct | mesh | ratio |");
    println!("|---|---:|---:|---:|");
    let field = |r: &PathRun, k: &str| r.done[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "| connections open (failed) | {} ({}) | {} ({}) | |",
        direct.opened, direct.open_failed, meshed.opened, meshed.open_failed
    );
    println!(
        "| seconds to open all ({OPENING_AT_ONCE} at once), each with a first echo | {:.2} | {:.2} | {:.2} |",
        direct.open_seconds,
        meshed.open_seconds,
        meshed.open_seconds / direct.open_seconds
    );
    println!(
        "| connections failed while held | {} | {} | |",
        field(&direct, "failed_connections"),
        field(&meshed, "failed_connections")
    );
    for (name, key) in [("echo p50 µs", "p50_us"), ("echo p99 µs", "p99_us")] {
        let (d, m) = (field(&direct, key), field(&meshed, key));
        println!("| {name} | {d:.0} | {m:.0} | {:.2} |", m / d);
    }
    for (i, node) in ["node-a (source)", "node-b (destination)"]
        .iter()
        .enumerate()
    {
        let grown = meshed.rss_held[i] - meshed.rss_before[i];
        println!(
            "| {node} proxy RSS MiB: before → held; KiB per connection | | {:.1} → {:.1}; {:.1} | |",
            meshed.rss_before[i],
            meshed.rss_held[i],
            grown * 1024.0 / meshed.opened.max(1) as f64
        );
    }
    for (name, run) in [("direct", &direct), ("mesh", &meshed)] {
        if run.done["errors"]
            .as_object()
            .is_some_and(|e| !e.is_empty())
        {
            println!("{name} errors: {}", run.done["errors"]);
        }
    }
}
