//! `WEFT_BENCH_PART=rollout`: an open-loop HTTP load through a Service
//! across nodes while both node proxies are rolled out with surge, one
//! after the other, next to the same window without a rollout, on the same
//! cluster (issue #16). The cluster is `failover`'s: three replicas of a
//! Service on two nodes, the client on node-a; the load is 200 requests/s
//! for 12 s, each request on a new connection, sent on schedule whatever
//! the previous ones do (open loop), its latency counted from when it was
//! due.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

const OPEN_LOOP: &str = r#"#!/usr/bin/env python3
import http.client, sys, threading, time
host, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lock = threading.Lock()
def one(due, i):
    try:
        c = http.client.HTTPConnection(host, 80, timeout=20)
        c.request("GET", "/", headers={"x-id": str(i)})
        r = c.getresponse()
        r.read()
        status, why = r.status, "-"
        c.close()
    except Exception as e:
        status, why = 0, type(e).__name__
    ms = (time.monotonic() - due) * 1000
    with lock:
        print("result %d %.3f %s" % (status, ms, why), flush=True)
start = time.monotonic() + 0.1
n = int(rate * seconds)
threads = []
print("start", flush=True)
for i in range(n):
    due = start + i / rate
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    t = threading.Thread(target=one, args=(due, i))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
print("end", flush=True)
"#;

const RATE: u32 = 200;
const DRAIN_SECONDS: u64 = 10;
const SECONDS: f64 = 12.0;

#[derive(Default)]
struct Window {
    sent: usize,
    failed: usize,
    latencies_ms: Vec<f64>,
    /// How the failed ones failed (status, or the client's exception).
    failures: std::collections::BTreeMap<String, usize>,
}

impl Window {
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// One window of load; `during` runs alongside it once the load started.
fn window(cluster: &TestCluster, during: impl FnOnce() + Send) -> Window {
    let args: Vec<String> = vec!["web.demo".into(), RATE.to_string(), SECONDS.to_string()];
    let mut child =
        weft_sim::cluster::pod_command(cluster.state(), "demo/client", "./open_loop.py", &args)
            .expect("command in the pod")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("open_loop.py starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut w = Window::default();
    std::thread::scope(|s| {
        let mut during = Some(during);
        let mut side = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "start"
                && let Some(f) = during.take()
            {
                side = Some(s.spawn(f));
            }
            let Some(result) = line.strip_prefix("result ") else {
                continue;
            };
            let mut fields = result.split(' ');
            let status = fields.next().unwrap_or("0");
            let ms: f64 = fields
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(f64::NAN);
            w.sent += 1;
            if status == "200" {
                w.latencies_ms.push(ms);
            } else {
                w.failed += 1;
                let why = fields.next().filter(|w| *w != "-").unwrap_or(status);
                *w.failures.entry(why.to_string()).or_default() += 1;
            }
        }
        if let Some(side) = side {
            side.join().expect("the rollout thread");
        }
    });
    let _ = child.wait();
    w
}

pub fn bench(binaries: MeshBinaries) {
    let mut mesh = Mesh::new(binaries);
    // As a DaemonSet would set it: long enough for what is in flight.
    mesh.drain_seconds = DRAIN_SECONDS;
    let mesh = Arc::new(mesh);
    let cluster = TestCluster::up_with(
        &[
            ("c.yaml", weft_sim::testing::THREE_REPLICAS),
            ("open_loop.py", OPEN_LOOP),
        ],
        |o| {
            o.node_agents = Some(mesh.clone());
            o.ready_timeout = Duration::from_secs(60);
        },
    )
    .expect("cluster with the mesh");
    // Warm: the tunnels and the pools exist, as in a running cluster.
    let _ = window(&cluster, || {});
    let baseline = window(&cluster, || {});
    let rolled = window(&cluster, || {
        // Both proxies, one after the other, a second into the window (an
        // old proxy exits as soon as its connections are done).
        std::thread::sleep(Duration::from_secs(1));
        for node in ["node-b", "node-a"] {
            match mesh.roll_out_node_proxy(node) {
                Ok(status) if status.success() => {}
                other => eprintln!("rollout of {node}: {other:?}"),
            }
        }
    });
    drop(cluster);
    mesh.reap();
    println!(
        "rollout: open-loop HTTP, {RATE} requests/s for {SECONDS} s through a Service across nodes, a new connection each; --drain-seconds {DRAIN_SECONDS}"
    );
    println!(
        "{:<44} {:>7} {:>7} {:>9} {:>9}",
        "", "sent", "failed", "p50 ms", "p99 ms"
    );
    for (name, w) in [
        ("baseline window, no rollout", &baseline),
        ("both node proxies rolled out (surge)", &rolled),
    ] {
        println!(
            "{:<44} {:>7} {:>7} {:>9.2} {:>9.2}   {:?}",
            name,
            w.sent,
            w.failed,
            w.percentile(0.5),
            w.percentile(0.99),
            w.failures
        );
    }
}
