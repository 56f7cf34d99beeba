//! A node proxy that restarts or is rolled out loses no pod (issue #16):
//! on the simulator, with real eBPF, the real control plane and real TLS.
//!
//! - A SIGKILLed node proxy started again with the same arguments finds
//!   the pods of its node without their restart and only then reports
//!   `/ready`; meanwhile their connections are refused, never sent in
//!   plaintext.
//! - A rollout with surge (new proxy ready, then the old one drained)
//!   refuses no new connection and lets an open one finish.
//! - `down` leaves nothing behind after a killed or hung proxy.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::capture::{Capture, contains};
use support::mesh_cluster::{MeshCluster, PATIENCE, wait_until};
use support::stream::{STREAM_CLIENT, Stream};
use support::{echo_through, http_get, metric_sum};
use weft_sim::mesh::{Component, ProxyRestart};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ECHO: &str = "spiffe://cluster.local/ns/demo/sa/echo";
const SECRET: &str = "WEFT-RESTART-SECRET-0123456789";
const VISIBLE: &str = "WEFT-RESTART-OUTSIDE-THE-MESH";

/// `demo` is in the mesh (a client and an echo server `echo-a` on node-a,
/// an echo server on node-b behind the Service `echo`); `plain` is not (a client on node-a, an echo
/// server on node-b: the capture's positive control); `other` has a pod on
/// node-a that stays outside the mesh.
const CLUSTER: &str = r#"
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
metadata: {name: echo-a, namespace: demo}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers: [{name: main, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain-client, namespace: plain}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain}
spec:
  nodeName: node-b
  containers: [{name: main, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: other}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, ports: [{port: 80, targetPort: 9000}]}
"#;

/// A bounded load: one new connection after another (a ping echoed back,
/// then closed), at most every 10 ms, until the stop file exists, 300 s
/// pass or 30 000 connections were made. Writes its counts to OUT (every
/// 20 connections and at the end): `{"ok": n, "failed": {"Error": n},
/// "errors": [...first ten...], "done": bool}`.
const LOAD: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys, time

host, port, stop, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ok, failed, errors = 0, {}, []
deadline = time.time() + 300

def write(done):
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"ok": ok, "failed": failed, "errors": errors, "done": done}, f)
    os.rename(tmp, out)

n = 0
while not os.path.exists(stop) and time.time() < deadline and n < 30000:
    n += 1
    try:
        c = socket.create_connection((host, port), timeout=10)
        c.settimeout(10)
        c.sendall(b"ping\n")
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = c.recv(64)
            if not d:
                break
            got += d
        c.close()
        if got != b"ping\n":
            raise ValueError("garbled: %r" % got)
        ok += 1
    except Exception as e:
        name = type(e).__name__
        failed[name] = failed.get(name, 0) + 1
        if len(errors) < 10:
            errors.append("%.3f %s: %s" % (time.time(), name, e))
    if n % 20 == 0:
        write(False)
    time.sleep(0.01)
write(True)
"#;

fn files() -> Vec<(&'static str, &'static str)> {
    vec![
        ("c.yaml", CLUSTER),
        ("stream_client.py", STREAM_CLIENT),
        ("load.py", LOAD),
    ]
}

/// A new connection from `pod` with `tcp_client.py`: its stderr when it
/// fails, `None` when it went through.
fn connect_error(
    mc: &MeshCluster,
    pod: &str,
    host: &str,
    port: u16,
    pattern: &str,
) -> Option<String> {
    let out = mc.cluster().exec(
        pod,
        &["./tcp_client.py", host, &port.to_string(), "4096", pattern],
    );
    (!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn proxy_log(mc: &MeshCluster, node: &str) -> PathBuf {
    let state = mc.mesh.state().expect("mesh state");
    state
        .node_proxies
        .iter()
        .find(|p| p.node == node)
        .expect("node proxy")
        .log
        .clone()
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A metric without labels, from a node proxy's `/metrics`.
fn unlabelled(node: std::net::Ipv4Addr, name: &str) -> Option<f64> {
    let (_, body) = http_get(SocketAddr::new(node.into(), 15020), "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

/// The pid of the echo server's container: the same pid after the
/// restart means the pod was not recreated.
fn echo_pid(mc: &MeshCluster) -> u32 {
    mc.cluster().pod("demo/echo").containers[0]
        .pid
        .expect("the echo container runs")
}

#[test]
fn a_killed_node_proxy_started_again_serves_its_pods_without_their_restart() {
    let files = files();
    let mc = MeshCluster::up(&files, |_| {});
    let cluster = mc.cluster();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    let outsider_ip = cluster.pod("plain/outsider").ip.to_string();
    let node_b = Component::NodeProxy("node-b".into());
    let b_ip = mc.node_ip("node-b");
    let pid = echo_pid(&mc);

    // Before: the client reaches the echo server over mTLS.
    echo_through(cluster, "demo/client", &echo_ip, 9000, 4096, None);
    assert!(mc.captures("node-b", "echo"));

    // The crash: nothing of the proxy's shutdown runs.
    mc.mesh.kill(&node_b).unwrap();
    let status = mc
        .mesh
        .wait_exit(&node_b, PATIENCE)
        .unwrap()
        .expect("the killed proxy exits");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_eq!(mc.ready_status("node-b"), None, "nothing answers /ready");

    // The gap: fail closed, nothing in plaintext. A capture on the fabric
    // sees the payload of a pod outside the mesh (positive control) and
    // never the captured client's; one in the echo pod sees a datagram sent
    // to it (positive control: UDP is never captured) and never the
    // payload of a connection to or from it.
    let mut capture = Capture::fabric(&cluster.state().fabric.netns);
    let mut in_pod = Capture::start(&cluster.pod("demo/echo").netns, "eth0", "tcp or udp");
    let datagram = |mark: &str| {
        cluster.exec_ok(
            "plain/plain-client",
            &[
                "python3",
                "-c",
                "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[2].encode(), (sys.argv[1], 9999))",
                &echo_ip,
                mark,
            ],
        );
    };
    datagram(VISIBLE);
    wait_until("the pod's capture sees the datagram", PATIENCE, || {
        in_pod.contains(VISIBLE)
    });
    echo_through(
        cluster,
        "plain/plain-client",
        &outsider_ip,
        9000,
        4096,
        Some(VISIBLE),
    );
    wait_until("the capture sees the plaintext control", PATIENCE, || {
        capture.contains(VISIBLE)
    });
    // Across nodes: node-a's proxy finds no HBONE listener for the pod.
    let err = connect_error(&mc, "demo/client", &echo_ip, 9000, SECRET)
        .expect("a connection to the unserved pod fails");
    assert!(
        err.contains("reset")
            || err.contains("refused")
            || err.contains("closed")
            || err.contains("\"match\": false"),
        "{err}"
    );
    // On node-b: inbound to the captured pod finds no 15006 listener, its
    // outbound connects find no 15001 listener: refused by the kernel.
    let err = connect_error(&mc, "plain/outsider", &echo_ip, 9000, SECRET)
        .expect("inbound to the unserved pod is refused");
    assert!(err.contains("Connection refused"), "{err}");
    let err = connect_error(&mc, "demo/echo", &outsider_ip, 9000, SECRET)
        .expect("outbound of the unserved pod is refused");
    assert!(err.contains("Connection refused"), "{err}");
    // The outsider's echo of a connection that reached it would carry the
    // payload over the fabric too; a last control after the refusals shows
    // the capture still runs.
    echo_through(
        cluster,
        "plain/plain-client",
        &outsider_ip,
        9000,
        4096,
        Some("WEFT-LAST-CONTROL"),
    );
    wait_until("the capture still runs", PATIENCE, || {
        capture.contains("WEFT-LAST-CONTROL")
    });
    datagram("WEFT-LAST-CONTROL");
    wait_until("the pod's capture still runs", PATIENCE, || {
        in_pod.contains("WEFT-LAST-CONTROL")
    });
    assert!(
        !contains(&capture.stop(), SECRET.as_bytes()),
        "the captured pods' payload crossed the fabric in plaintext while no proxy served them"
    );
    assert!(
        !contains(&in_pod.stop(), SECRET.as_bytes()),
        "a payload reached or left the echo pod in plaintext while no proxy served it"
    );

    // Meanwhile the runtime lets go of one pod's namespace (a pod deleted
    // while no proxy ran, its CNI DEL lost): the proxy kept it (positive
    // control), and must drop it at start instead of serving it.
    let kept_dir = weft_sim::mesh::node_proxy_state_dir(cluster.state(), "node-b");
    let kept = || weft_sim::sys::mounts_under(&kept_dir).len();
    assert_eq!(
        kept(),
        2,
        "node-b's proxy keeps echo's and outsider's namespaces"
    );
    let outsider_netns = cluster.pod("plain/outsider").netns.clone();
    let del = Command::new("ip")
        .args(["netns", "del", &outsider_netns])
        .output()
        .unwrap();
    assert!(del.status.success(), "{del:?}");
    // And a record is damaged (a crash mid-write on another filesystem, a
    // hand edit): reported and counted, never trusted.
    let damaged = kept_dir.join("pods").join("00.json");
    std::fs::write(&damaged, b"{\"pod\": 42").unwrap();

    // Started again with the same arguments; the pod is not recreated.
    let offset = mc.mesh.start_node_proxy("node-b").unwrap();
    let log = proxy_log(&mc, "node-b");
    let started = Instant::now();
    // `/ready` answers 200 only once the pod is served: the first
    // connection after it must go through, with no retry.
    wait_until("node-b's new proxy reports /ready", PATIENCE, || {
        mc.ready_status("node-b") == Some(200)
    });
    let ready_after = started.elapsed();
    if let Some(err) = connect_error(&mc, "demo/client", &echo_ip, 9000, "after-ready") {
        panic!(
            "the first connection after node-b's /ready answered 200 failed (ready before the pod was served): {err}\n{}",
            tail(&log)
        );
    }
    eprintln!("node-b's proxy ready {ready_after:?} after its start");
    assert!(
        std::fs::read_to_string(&log).unwrap()[offset as usize..].contains("pod found again"),
        "{}",
        tail(&log)
    );
    assert_eq!(echo_pid(&mc), pid, "the echo pod was recreated");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text[offset as usize..].contains("deleted while no proxy ran"),
        "{}",
        tail(&log)
    );
    assert_eq!(kept(), 1, "the deleted pod's namespace is still kept");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the echo server is not running any more"
    );
    // The new process (its counters start at zero) took it over mTLS, with
    // both identities.
    let labels = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("destination_principal", ECHO),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_until("node-b counts the mTLS connection", PATIENCE, || {
        metric_sum(b_ip, "weft_tcp_connections_opened_total", &labels) >= 1.0
    });
    // And by Service name, and the recovered pod's own outbound: to a pod
    // outside the mesh, and over mTLS with its own identity to node-a.
    echo_through(cluster, "demo/client", "echo.demo", 80, 4096, None);
    echo_through(cluster, "demo/echo", &outsider_ip, 9000, 4096, None);
    let echo_a_ip = cluster.pod("demo/echo-a").ip.to_string();
    echo_through(cluster, "demo/echo", &echo_a_ip, 9000, 4096, None);
    let from_echo = [
        ("reporter", "destination"),
        ("source_principal", ECHO),
        ("destination_workload", "echo-a"),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_until(
        "node-a counts the recovered pod's mTLS connection",
        PATIENCE,
        || {
            metric_sum(
                mc.node_ip("node-a"),
                "weft_tcp_connections_opened_total",
                &from_echo,
            ) >= 1.0
        },
    );
    assert_eq!(
        unlabelled(b_ip, "weft_node_proxy_pods_recovered_total"),
        Some(1.0),
        "{}",
        tail(&log)
    );
    // The damaged record is the one pod that could not be recovered.
    assert_eq!(
        metric_sum(b_ip, "weft_node_proxy_pods_unrecovered_total", &[]),
        1.0
    );
    assert_eq!(
        metric_sum(
            b_ip,
            "weft_node_proxy_pods_unrecovered_total",
            &[("reason", "unreadable_record")]
        ),
        1.0
    );
    assert!(!damaged.exists(), "the damaged record is removed");

    // A graceful restart (SIGTERM, drain, start again) finds it as well.
    mc.mesh
        .restart_node_proxy("node-b", ProxyRestart::Graceful)
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(err) = connect_error(&mc, "demo/client", &echo_ip, 9000, "after-graceful") {
        panic!("after a graceful restart: {err}\n{}", tail(&log));
    }
    assert_eq!(
        unlabelled(b_ip, "weft_node_proxy_pods_recovered_total"),
        Some(1.0)
    );

    // A crash that also loses the kept registrations (a state directory
    // that did not outlive the container): the enrolled pod is found by
    // its namespace cookie among the node's processes.
    mc.mesh.kill(&node_b).unwrap();
    mc.mesh
        .wait_exit(&node_b, PATIENCE)
        .unwrap()
        .expect("killed");
    for mount in weft_sim::sys::mounts_under(&kept_dir) {
        weft_sim::sys::unmount(&mount).unwrap();
    }
    std::fs::remove_dir_all(&kept_dir).unwrap();
    let offset = mc.mesh.start_node_proxy("node-b").unwrap();
    wait_until("node-b's proxy reports /ready again", PATIENCE, || {
        mc.ready_status("node-b") == Some(200)
    });
    if let Some(err) = connect_error(&mc, "demo/client", &echo_ip, 9000, "after-lost-state") {
        panic!("after a restart without kept state: {err}\n{}", tail(&log));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text[offset as usize..].contains("pod found by its namespace"),
        "{}",
        tail(&log)
    );
    assert_eq!(
        unlabelled(b_ip, "weft_node_proxy_pods_recovered_total"),
        Some(1.0)
    );
    mc.down();
}

/// The state a node proxy keeps for its restart (pins, kept namespaces) is
/// removed by `down` even when the proxy was killed (its shutdown never
/// ran) or hung (stopped: it never answers SIGTERM). Also drives
/// `weft-sim restart-proxy`, the kubelet's crash-and-restart, by the CLI.
#[test]
fn down_removes_what_a_killed_or_hung_node_proxy_kept() {
    let files = files();
    let mc = MeshCluster::up(&files, |_| {});
    let cluster = mc.cluster();
    let state = cluster.state().clone();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();

    // The CLI restarts node-a's proxy as a kubelet would after a crash.
    let stdout = sim(&["restart-proxy", "--name", &state.name, "node-a"]);
    // "… pid OLD … pid NEW …"
    let new_pid = nth_pid(&stdout, 2);
    assert_eq!(mc.ready_status("node-a"), Some(200));
    echo_through(cluster, "demo/client", &echo_ip, 9000, 4096, None);
    // And rolls node-b's out with surge.
    let stdout = sim(&["rollout-proxy", "--name", &state.name, "node-b"]);
    assert!(stdout.contains("drained and exited"), "{stdout}");
    let b_pid = nth_pid(&stdout, 1);
    assert_eq!(mc.ready_status("node-b"), Some(200));
    echo_through(cluster, "demo/client", &echo_ip, 9000, 4096, None);

    // Kill node-a's, hang node-b's.
    // SAFETY: kill(2) on the node proxy the CLI just started (in node-a's
    // cgroup of this test's cluster).
    assert_eq!(unsafe { libc::kill(new_pid, libc::SIGKILL) }, 0);
    // SAFETY: kill(2) on node-b's proxy, which the CLI just started.
    assert_eq!(unsafe { libc::kill(b_pid, libc::SIGSTOP) }, 0);
    wait_until("node-a's proxy is gone", PATIENCE, || {
        !Path::new(&format!("/proc/{new_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{new_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });

    // Positive control: both nodes' pins and kept namespaces are there.
    for node in ["node-a", "node-b"] {
        let pins = &state.node(node).unwrap().bpf_pin_dir;
        assert!(pins.join("maps").exists(), "no pins in {}", pins.display());
    }
    let kept = weft_sim::sys::mounts_under(&state.state_dir);
    assert!(
        kept.len() >= 2,
        "the proxies keep the captured pods' namespaces: {kept:?}"
    );
    mc.down();
}

/// A running `load.py`; ended (stop file, then kill) when dropped, also
/// when the test fails.
struct Load {
    child: Child,
    stop: PathBuf,
    counts: PathBuf,
}

impl Load {
    fn counts(&self) -> serde_json::Value {
        std::fs::read_to_string(&self.counts)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::json!({"ok": 0, "failed": {}, "errors": [], "done": false}))
    }

    fn ok(&self) -> u64 {
        self.counts()["ok"].as_u64().unwrap_or(0)
    }

    /// Stops it and returns its final counts.
    fn finish(mut self) -> serde_json::Value {
        self.stop_and_wait();
        self.counts()
    }

    fn stop_and_wait(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_and_wait();
    }
}

/// Starts `load.py` in `pod` against `host:port`; its counts go to
/// `<manifest dir>/<name>.json`.
fn start_load(mc: &MeshCluster, name: &str, pod: &str, host: &str, port: u16) -> Load {
    let dir = mc.cluster().manifest_dir();
    let counts = dir.join(format!("{name}.json"));
    let stop = dir.join(format!("{name}.stop"));
    let args = vec![
        host.to_string(),
        port.to_string(),
        path(&stop),
        path(&counts),
    ];
    let child = weft_sim::cluster::pod_command(mc.cluster().state(), pod, "./load.py", &args)
        .unwrap()
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let load = Load {
        child,
        stop,
        counts,
    };
    wait_until(&format!("the load {name} runs"), PATIENCE, || {
        load.ok() >= 40
    });
    load
}

/// A rollout with surge of both nodes' proxies, one after the other, under
/// bounded load through both: new plaintext connections from a pod outside
/// the mesh to the captured echo server on node-b, steered to 15006
/// (inbound steering handed over), and new mTLS connections of the
/// captured client on node-a through the Service (outbound 15001 handed
/// over on node-a's rollout; on node-b's, the source proxy's streams on its
/// pooled tunnel to the old proxy, refused after its GOAWAY, open again on
/// a fresh tunnel to the new one). A long-lived mTLS connection opened
/// before each rollout echoes through it and ends after the old proxy's
/// SIGTERM.
#[test]
fn a_rollout_with_surge_refuses_no_new_connection_and_lets_open_ones_finish() {
    const DRAIN: u64 = 30;
    let files = files();
    let mc = MeshCluster::up(&files, |m| m.drain_seconds = DRAIN);
    let cluster = mc.cluster();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();

    // The proxy lets queued connections move to its successor's listener.
    let sysctl = cluster.exec_ok("demo/echo", &["sysctl", "-n", "net.ipv4.tcp_migrate_req"]);
    assert_eq!(sysctl.trim(), "1", "tcp_migrate_req in a captured pod");

    let plain = start_load(&mc, "plain", "plain/plain-client", &echo_ip, 9000);
    let mesh_load = Some(start_load(&mc, "mesh", "demo/client", "echo.demo", 80));
    let mut round = 0;
    for node in ["node-b", "node-a"] {
        let load = mesh_load.as_ref().unwrap();
        let log = proxy_log(&mc, node);
        let drains = || {
            std::fs::read_to_string(&log)
                .unwrap()
                .matches("draining")
                .count()
        };
        let drains_before = drains();
        let mut open = Stream::open(cluster, "demo/client", &echo_ip, 9000);
        assert_eq!(open.round_trip("before"), "echo before");
        let before = load.ok();
        let mesh = mc.mesh.clone();
        let node_name = node.to_string();
        let rollout = std::thread::spawn(move || mesh.roll_out_node_proxy(&node_name));
        // Until the old proxy has been told to go, and a little after.
        let mut after_sigterm = 0;
        while after_sigterm < 4 {
            round += 1;
            let line = format!("during-{round}");
            assert_eq!(
                open.round_trip(&line),
                format!("echo {line}"),
                "{}",
                tail(&log)
            );
            if drains() > drains_before {
                after_sigterm += 1;
            } else if rollout.is_finished() {
                panic!("the rollout of {node} ended early: {:?}", rollout.join());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // The new proxy carries the new connections.
        wait_until("new connections after the hand-over", PATIENCE, || {
            load.ok() >= before + 40
        });
        // Ending the open connection lets the old proxy exit before its
        // deadline: it was not reset.
        let end = open.finish();
        assert_eq!(
            end,
            "done",
            "the open connection through the rollout of {node}; log:\n{}",
            tail(&log)
        );
        let status = rollout.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status.success(),
            "the old proxy of {node} exited with {status}"
        );
        assert_eq!(mc.ready_status(node), Some(200));
    }
    for (name, load) in [("plain", Some(plain)), ("mesh", mesh_load)] {
        let result = load.expect("started").finish();
        assert_eq!(result["done"], true, "{result}");
        assert_eq!(
            result["failed"],
            serde_json::json!({}),
            "new connections ({name}) failed during the rollout: {result}"
        );
        eprintln!("{name} load through the rollout: {result}");
    }
    // The new node-b proxy took mTLS connections too.
    let labels = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        metric_sum(
            mc.node_ip("node-b"),
            "weft_tcp_connections_opened_total",
            &labels
        ) >= 1.0
    );
    mc.down();
}

/// A view change while the old proxy drains is the new proxy's alone: the
/// namespace `plain` is enrolled during node-b's rollout, after the old
/// proxy's SIGTERM. The new proxy captures the outsider; the old one must
/// not (it would take the pod's inbound steering and drop it as it exits):
/// after the old proxy is gone, plaintext from outside the mesh still
/// reaches the newly captured pod through its 15006.
#[test]
fn a_view_change_during_the_old_proxys_drain_is_the_new_proxys_alone() {
    let files = files();
    let mc = MeshCluster::up(&files, |m| m.drain_seconds = 30);
    let cluster = mc.cluster();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    let outsider_ip = cluster.pod("plain/outsider").ip.to_string();
    assert!(!mc.captures("node-b", "outsider"));
    let log = proxy_log(&mc, "node-b");
    let drains = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("draining")
            .count()
    };
    let drains_before = drains();

    // The open connection keeps the old proxy draining.
    let mut open = Stream::open(cluster, "demo/client", &echo_ip, 9000);
    assert_eq!(open.round_trip("before"), "echo before");
    let mesh = mc.mesh.clone();
    let rollout = std::thread::spawn(move || mesh.roll_out_node_proxy("node-b"));
    wait_until("node-b's old proxy drains", PATIENCE, || {
        drains() > drains_before
    });

    let manifest = cluster.manifest_dir().join("c.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let plain = "metadata: {name: plain}";
    assert!(text.contains(plain));
    std::fs::write(
        &manifest,
        text.replace(
            plain,
            "metadata: {name: plain, labels: {weft.io/mesh: enabled}}",
        ),
    )
    .unwrap();
    // The new proxy (the only one answering on the admin port now) captures it.
    wait_until("node-b's new proxy captures the outsider", PATIENCE, || {
        mc.captures("node-b", "outsider") && mc.ready_status("node-b") == Some(200)
    });
    assert_eq!(open.round_trip("during"), "echo during");
    assert_eq!(open.finish(), "done");
    let status = rollout.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{status}");

    // The old proxy is gone: the outsider's inbound is still steered.
    for i in 0..5 {
        if let Some(err) = connect_error(&mc, "other/stranger", &outsider_ip, 9000, "inbound") {
            panic!(
                "inbound {i} to the pod captured during the drain: {err}\n{}",
                tail(&log)
            );
        }
    }
    let labels = [
        ("reporter", "destination"),
        ("destination_workload", "outsider"),
        ("connection_security_policy", "none"),
    ];
    wait_until("node-b counts the inbound connections", PATIENCE, || {
        metric_sum(
            mc.node_ip("node-b"),
            "weft_tcp_connections_opened_total",
            &labels,
        ) >= 5.0
    });
    mc.down();
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `weft-sim ARGS`, which must succeed; its output.
fn sim(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-sim"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "weft-sim {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The number after the `n`th "pid " in `stdout`.
fn nth_pid(stdout: &str, n: usize) -> i32 {
    stdout
        .split("pid ")
        .nth(n)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid {n} in {stdout:?}"))
}
