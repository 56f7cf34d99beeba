//! `WEFT_BENCH_PART=failover`: requests failed when one of three replicas
//! is killed under load, next to a baseline run without a kill (issue
//! #20; target 0). The same cluster and load as `e2e/tests/failover.rs`:
//! three replicas of a Service on two nodes, 4 clients x 100 requests
//! (GET and 2 KiB POST alternately, a new connection each, 10 ms apart)
//! from a pod on node-a; in the kill run, web-1 (node-b) gets SIGKILL
//! once 60 requests were answered. Each run on a fresh cluster.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

pub(crate) const FAILOVER_CLUSTER: &str = r#"
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
spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./replica.py, "8080", web-1], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./replica.py, "8080", web-2], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: main, command: [./replica.py, "8080", web-3], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"#;

pub(crate) const REPLICA: &str = r#"#!/usr/bin/env python3
import signal, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[2]
MODE = sys.argv[3] if len(sys.argv) > 3 else ""  # "503": always 503; "slow": 20 ms
conns = set()
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass
    def setup(self):
        super().setup()
        with lock:
            conns.add(self.connection)
    def finish(self):
        with lock:
            conns.discard(self.connection)
        super().finish()
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        # One write per line under a lock: threads must not interleave.
        with lock:
            sys.stdout.write("got %s %d\n" % (self.headers.get("x-id"), len(body)))
            sys.stdout.flush()
        out = ("%s %s\n" % (NAME, self.headers.get("x-id"))).encode()
        if MODE == "slow":
            time.sleep(0.02)
        self.send_response(503 if MODE == "503" else 200)
        self.send_header("x-served-by", NAME)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = answer
    do_POST = answer

server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
server.daemon_threads = True

def close_port(*_):
    def close():
        server.socket.close()
        with lock:
            for c in list(conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        print("closed", flush=True)
    threading.Thread(target=close).start()

signal.signal(signal.SIGUSR1, close_port)
try:
    server.serve_forever()
except (OSError, ValueError):
    pass
# The port is closed: live on, as a pod whose server stopped listening.
threading.Event().wait()
"#;

const LOAD: &str = r#"#!/usr/bin/env python3
import http.client, sys, threading, time
url_host, threads, per_thread, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lock = threading.Lock()
done = 0
def run(t):
    global done
    for i in range(per_thread):
        rid = "%d-%d" % (t, i)
        method = "GET" if i % 2 == 0 else "POST"
        body = b"x" * 2048 if method == "POST" else None
        try:
            c = http.client.HTTPConnection(url_host, 80, timeout=20)
            c.request(method, "/", body=body, headers={"x-id": rid})
            r = c.getresponse()
            r.read()
            status, served = r.status, r.getheader("x-served-by") or "-"
            c.close()
        except Exception as e:
            status, served = 0, type(e).__name__
        with lock:
            print("result", rid, method, status, served, flush=True)
            done += 1
            if done == warm:
                print("warm", flush=True)
        time.sleep(0.01)
ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print("end", flush=True)
"#;

const REQUESTS: usize = 400;

/// What one run saw: failed requests (status not 200), of them POSTs.
struct Run {
    answered: usize,
    failed: usize,
    failed_posts: usize,
}

fn run(binaries: &MeshBinaries, kill: bool) -> Run {
    let mesh = Arc::new(Mesh::new(binaries.clone()));
    let cluster = TestCluster::up_with(
        &[
            ("c.yaml", FAILOVER_CLUSTER),
            ("replica.py", REPLICA),
            ("load.py", LOAD),
        ],
        |o| {
            o.node_agents = Some(mesh.clone());
            o.ready_timeout = Duration::from_secs(60);
        },
    )
    .expect("cluster with the mesh");
    let args: Vec<String> = ["web.demo", "4", "100", "60"].map(String::from).into();
    let mut child =
        weft_sim::cluster::pod_command(cluster.state(), "demo/client", "./load.py", &args)
            .expect("command in the pod")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("load.py starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut run = Run {
        answered: 0,
        failed: 0,
        failed_posts: 0,
    };
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line == "warm" && kill {
            let pid = cluster.state().pod("demo/web-1").expect("web-1").containers[0]
                .pid
                .expect("web-1 runs");
            // SAFETY: kill(2) to a process this simulator started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let Some(result) = line.strip_prefix("result ") else {
            continue;
        };
        let fields: Vec<&str> = result.split(' ').collect();
        run.answered += 1;
        if fields.get(2) != Some(&"200") {
            run.failed += 1;
            if fields.get(1) == Some(&"POST") {
                run.failed_posts += 1;
            }
        }
    }
    let _ = child.wait();
    drop(cluster);
    mesh.reap();
    run
}

pub fn bench(binaries: MeshBinaries) {
    let baseline = run(&binaries, false);
    let killed = run(&binaries, true);
    println!(
        "failover: 3 replicas on 2 nodes, 4 clients x 100 GET/POST (2 KiB), new connection per request"
    );
    println!("{:<40} {:>8} {:>8}", "", "failed", "of");
    println!(
        "{:<40} {:>8} {:>8}",
        "baseline, no replica killed", baseline.failed, baseline.answered
    );
    println!(
        "{:<40} {:>8} {:>8}   (of them POSTs: {}; target 0)",
        "one of three replicas SIGKILLed", killed.failed, killed.answered, killed.failed_posts
    );
    if baseline.answered != REQUESTS || killed.answered != REQUESTS {
        println!("(load.py did not report every request)");
    }
}
