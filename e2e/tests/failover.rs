//! No request lost when a replica dies (issue #20) on the simulator: real
//! processes, real eBPF capture, real mTLS between the node proxies.
//! Bounded GET and POST load from a client pod through a Service with
//! three replicas on two nodes; after warm-up one replica's process is
//! SIGKILLed (or closes its port and its connections while the pod lives
//! on): no request fails but a POST the replica had already read when it
//! died (which may have been processed: never resent), each one reached
//! exactly one replica, and the source node proxy ejected the dead
//! endpoint for a connect failure (its metrics say so).

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::replica_load::Load;
use support::{MeshCluster, metric_sum};

const WEB: &str = "web.demo.svc.cluster.local";

const THREADS: usize = 4;
const PER_THREAD: usize = 100;
const WARM: usize = 60;

/// `got <id>` lines of a replica's log: the ids that reached it.
fn delivered(mc: &MeshCluster, pod: &str) -> Vec<String> {
    let state = mc.cluster().state();
    let log = &state.pod(pod).expect("pod").containers[0].log;
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log:?}: {e}"));
    text.lines()
        .filter_map(|l| l.strip_prefix("got "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// How a replica dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// SIGKILL to its process.
    Killed,
    /// SIGUSR1: it closes its port and its connections, the pod lives on.
    PortClosed,
}

fn a_replica_dies_under_load(death: Death) {
    let mc = MeshCluster::up(&[("c.yaml", weft_sim::testing::THREE_REPLICAS)], |_| {});
    let node_a = mc.node_ip("node-a");
    let load = Load::start(
        mc.cluster().state(),
        "demo/client",
        &[
            "web.demo",
            &THREADS.to_string(),
            &PER_THREAD.to_string(),
            &WARM.to_string(),
        ],
    );
    let mut lines = load.read_until("warm", Duration::from_secs(120));
    // Warm: the HBONE connections to node-b and the destination proxies'
    // connections to the applications are open.
    let warm_served = |lines: &[String], who: &str| {
        lines
            .iter()
            .any(|l| l.starts_with("result ") && l.ends_with(&format!(" 200 {who}")))
    };
    for who in ["web-1", "web-2", "web-3"] {
        assert!(
            warm_served(&lines, who),
            "{who} answered nothing during warm-up: {lines:?}"
        );
    }
    let pid = mc
        .cluster()
        .state()
        .pod("demo/web-1")
        .expect("web-1")
        .containers[0]
        .pid
        .expect("web-1 runs") as i32;
    let signal = match death {
        Death::Killed => libc::SIGKILL,
        Death::PortClosed => libc::SIGUSR1,
    };
    // SAFETY: a plain kill(2) to the process this simulator started.
    assert_eq!(
        unsafe { libc::kill(pid, signal) },
        0,
        "signal web-1 ({pid})"
    );
    lines.extend(load.read_until("end", Duration::from_secs(300)));

    // No request failed, and none was answered by web-1 after... any time:
    // every answer names a replica.
    let results: Vec<Vec<&str>> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("result "))
        .map(|l| l.split(' ').collect())
        .collect();
    assert_eq!(results.len(), THREADS * PER_THREAD, "{lines:?}");
    // A POST the replica had already read (into its own buffers) when it
    // was killed or shut its connections may have been processed: it
    // cannot be resent, and fails with 502
    // (RFC 9110 §9.2.2; Envoy and Linkerd fail it too). At most one per
    // client thread can be there at the kill. Everything else succeeds:
    // every GET, and every POST that had not reached the dying process.
    let failed: Vec<_> = results.iter().filter(|r| r[2] != "200").collect();
    let in_the_dead_process = |r: &&Vec<&str>| r[1] == "POST" && r[2] == "502";
    eprintln!(
        "{death:?}: {} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
    if failed.iter().any(|r| !in_the_dead_process(r)) || failed.len() > THREADS {
        let logs = mc.cluster().state().state_dir.join("logs");
        let mut why = String::new();
        for node in ["node-a", "node-b"] {
            let log = logs.join(format!("weft-node-proxy.{node}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            for l in text.lines().filter(|l| l.contains("failed")) {
                why.push_str(&format!("{node}: {l}\n"));
            }
        }
        panic!("{death:?}: failed requests: {failed:?}\n{why}");
    }
    let posts = results.iter().filter(|r| r[1] == "POST").count();
    assert_eq!(posts, THREADS * PER_THREAD / 2);

    // The source node proxy tried the dead endpoint (else the test shows
    // nothing), sent those requests elsewhere, and ejected it at once.
    let failovers = metric_sum(
        node_a,
        "weft_request_failovers_total",
        &[("destination_service", WEB)],
    );
    let ejections = metric_sum(
        node_a,
        "weft_endpoint_ejections_total",
        &[("destination_service", WEB), ("reason", "connect_failure")],
    );
    assert!(
        failovers >= 1.0,
        "{death:?}: nothing was sent to web-1 after it died"
    );
    assert!(ejections >= 1.0, "{death:?}: web-1 was never ejected");
    let failed_responses = metric_sum(
        node_a,
        "weft_endpoint_ejections_total",
        &[("destination_service", WEB), ("reason", "failed_responses")],
    );
    assert_eq!(
        failed_responses, 0.0,
        "{death:?}: ejected for failed responses, not at its first connect failure"
    );

    // No request was delivered twice: the replicas' own counts (their
    // logs are copied by the simulator: wait until every answer is there).
    let mut reached: HashMap<String, Vec<&str>> = HashMap::new();
    let complete = |reached: &HashMap<String, Vec<&str>>| {
        results
            .iter()
            .filter(|r| r[2] == "200")
            .all(|r| reached.contains_key(r[0]))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        reached.clear();
        for who in ["web-1", "web-2", "web-3"] {
            for id in delivered(&mc, &format!("demo/{who}")) {
                reached.entry(id).or_default().push(who);
            }
        }
        if complete(&reached) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = results
                .iter()
                .filter(|r| r[2] == "200" && !reached.contains_key(r[0]))
                .collect();
            panic!("{death:?}: answered but in no replica's log: {missing:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut resent_gets = 0;
    for r in &results {
        let id = r[0];
        if r[2] != "200" {
            // It may have reached web-1 (and died with it), nobody else.
            let elsewhere = reached
                .get(id)
                .is_some_and(|w| w.iter().any(|w| *w != "web-1"));
            assert!(
                !elsewhere,
                "{death:?}: failed request {id} reached {:?}",
                reached.get(id)
            );
            continue;
        }
        match reached.get(id).map(Vec::as_slice) {
            Some([one]) => assert_eq!(*one, r[3], "{id} answered by {} but reached {one}", r[3]),
            // A GET the dying replica had read but not answered is sent
            // again (an idempotent method: RFC 9110 §9.2.2); a POST never.
            Some([first, second]) if r[1] == "GET" && *first == "web-1" => {
                assert_eq!(*second, r[3], "{death:?}: {id}");
                resent_gets += 1;
            }
            other => panic!(
                "{death:?}: request {id} ({}, answered by {}) reached {other:?}",
                r[1], r[3]
            ),
        }
    }
    eprintln!("{death:?}: {resent_gets} GETs reached web-1 as it died and were sent again");
    if let Death::PortClosed = death {
        // The pod lived on: its process still runs.
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "web-1 still runs");
    }
    drop(load);
    mc.down();
}

#[test]
fn a_replica_killed_under_load_fails_no_request_it_had_not_read() {
    a_replica_dies_under_load(Death::Killed);
}

#[test]
fn a_replica_whose_port_closes_under_load_fails_no_request_it_had_not_read() {
    a_replica_dies_under_load(Death::PortClosed);
}

/// A Service whose replicas differ: picky-1 answers 503 at once, picky-2
/// 200 after 20 ms (so by latency alone the balancer prefers picky-1, for
/// a retry too); its route retries once. And two Services over the same
/// two banner servers, each with an endpoint of its own where nothing
/// listens (echo-1, talk-1): `echo` on a port declared opaque, `talk` on
/// one whose protocol the proxy detects.
const PICKY: &str = r#"
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
metadata: {name: picky-1, namespace: demo, labels: {app: picky}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./replica.py, "8080", picky-1, "503"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: picky-2, namespace: demo, labels: {app: picky}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./replica.py, "8080", picky-2, slow], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: picky, namespace: demo}
spec: {selector: {app: picky}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: picky-retry, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: picky, port: 80}]
  rules:
    - retry: {attempts: 1, backoff: 1ms}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2, namespace: demo, labels: {app: echo, talk: "yes"}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./banner.py, serve, "2500", echo-2], ports: [{containerPort: 2500}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-3, namespace: demo, labels: {app: echo, talk: "yes"}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: main, command: [./banner.py, serve, "2500", echo-3], ports: [{containerPort: 2500}]}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, ports: [{port: 2500, targetPort: 2500, appProtocol: tcp}]}
---
apiVersion: v1
kind: Pod
metadata: {name: talk-1, namespace: demo, labels: {talk: "yes"}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Service
metadata: {name: talk, namespace: demo}
spec: {selector: {talk: "yes"}, ports: [{port: 2600, targetPort: 2500}]}
"#;

/// N connections one after another from the client pod. `banner`: to
/// `echo.demo:2500`, prints each one's first line (the banner) or its
/// error. `talk`: to `talk.demo:2600` (not declared opaque: the proxy reads
/// the first bytes to detect the protocol, and sends them with the
/// tunnel's opening), the client speaks first, ends its side, and prints
/// everything it got back.
const CONNECT: &str = r#"#!/usr/bin/env python3
import socket, sys
mode = sys.argv[2] if len(sys.argv) > 2 else "banner"
for i in range(int(sys.argv[1])):
    try:
        if mode == "talk":
            s = socket.create_connection(("talk.demo", 2600), timeout=10)
            s.sendall(b"HELO %d\r\n" % i)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                d = s.recv(4096)
                if not d:
                    break
                got += d
            print("talk", repr(got.decode()), flush=True)
            s.close()
            continue
        s = socket.create_connection(("echo.demo", 2500), timeout=10)
        f = s.makefile("rb")
        line = f.readline().decode().strip()
        print("banner", line if line else "EOF", flush=True)
        s.close()
    except OSError as e:
        print("error", type(e).__name__, e, flush=True)
"#;

#[test]
fn a_retry_after_a_503_and_an_opaque_connection_go_to_a_live_replica() {
    let mc = MeshCluster::up(&[("c.yaml", PICKY), ("connect.py", CONNECT)], |_| {});
    let node_a = mc.node_ip("node-a");
    // A retry after picky-1's 503 is answered by picky-2, every time.
    for i in 0..30 {
        let (status, body) = mc.curl("demo/client", "http://picky.demo/");
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.starts_with("picky-2"), "request {i}: {body}");
    }
    let tried = delivered(&mc, "demo/picky-1").len();
    assert!(
        tried >= 1,
        "picky-1 was never tried first: the test shows nothing"
    );
    let retries = metric_sum(
        node_a,
        "weft_request_retries_total",
        &[("destination_service", "picky.demo.svc.cluster.local")],
    );
    assert_eq!(retries, tried as f64, "one retry per 503, each answered");

    // Opaque TCP: every connection reaches a live endpoint (its banner),
    // including those whose first choice was echo-1, which refuses.
    let out = mc.cluster().exec_ok("demo/client", &["./connect.py", "30"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 30, "{out}");
    for l in &lines {
        assert!(
            *l == "banner 220 echo-2 ready" || *l == "banner 220 echo-3 ready",
            "{l}\n{out}"
        );
    }
    let failovers = metric_sum(
        node_a,
        "weft_request_failovers_total",
        &[("route", "opaque")],
    );
    assert!(
        failovers >= 1.0,
        "echo-1 was never tried: the test shows nothing"
    );

    // The client speaks first: its bytes go with the tunnel's CONNECT, and
    // when talk-1 refuses, the same bytes go to a live endpoint, once.
    let out = mc
        .cluster()
        .exec_ok("demo/client", &["./connect.py", "30", "talk"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 30, "{out}");
    for (i, l) in lines.iter().enumerate() {
        let answered_by = |name: &str| format!("talk '220 {name} ready\\r\\n250 HELO {i}\\r\\n'");
        assert!(
            *l == answered_by("echo-2") || *l == answered_by("echo-3"),
            "connection {i}: {l}\n{out}"
        );
    }
    let talk_failovers = metric_sum(
        node_a,
        "weft_request_failovers_total",
        &[("route", "opaque")],
    ) - failovers;
    assert!(
        talk_failovers >= 1.0,
        "talk-1 was never tried: the test shows nothing"
    );
    mc.down();
}
