//! The node proxy on the simulator: real eBPF redirection, real pods, the
//! `weft-node-proxy` binary on every node, pods registered as the CNI
//! plugin would.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weft_sim::cluster::{NodeAgents, node_command};
use weft_sim::{State, TestCluster};

/// Starts `weft-node-proxy` in every node's namespace and cgroup.
#[derive(Debug, Default)]
struct NodeProxies {
    children: Mutex<Vec<Child>>,
    pin_dirs: Mutex<Vec<PathBuf>>,
}

impl NodeAgents for NodeProxies {
    fn start(&self, state: &State) -> Result<(), String> {
        for node in &state.nodes {
            let pin_dir = node.bpf_pin_dir.clone();
            let log_path = state.state_dir.join(format!("proxy-{}.log", node.name));
            let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
            let args: Vec<String> = [
                "--node",
                &node.name,
                "--agent-socket",
                node.agent_socket.to_str().unwrap(),
                "--pin-dir",
                pin_dir.to_str().unwrap(),
                "--metrics-addr",
                &format!("{}:15020", node.ip),
                "--health-addr",
                &format!("{}:15021", node.ip),
                "--uninstall-on-exit",
                "--drain-seconds",
                "1",
            ]
            .map(String::from)
            .to_vec();
            let mut cmd = node_command(
                state,
                &node.name,
                env!("CARGO_BIN_EXE_weft-node-proxy"),
                &args,
            )
            .map_err(|e| e.to_string())?;
            let child = cmd
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .map_err(|e| e.to_string())?;
            self.pin_dirs.lock().unwrap().push(pin_dir);
            let mut children = self.children.lock().unwrap();
            children.push(child);
            let ready = wait_ready(
                SocketAddr::new(node.ip.into(), 15021),
                children.last_mut().unwrap(),
            );
            if let Err(e) = ready {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("{e}; proxy log:\n{log}"));
            }
        }
        Ok(())
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn wait_ready(health: SocketAddr, proxy: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = proxy.try_wait() {
            return Err(format!("node proxy exited ({status})"));
        }
        if let Some((200, _)) = http_get(health, "/ready") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("node proxy at {health} not ready within 20s"))
}

/// The value of the first series of `metric` whose labels include all of `labels`.
fn metric(node_ip: std::net::Ipv4Addr, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

/// Polls until `metric` reaches `want` (connections are counted as they close).
fn wait_metric(node_ip: std::net::Ipv4Addr, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
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

const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {nodeName: node-a, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec:
  nodeName: node-b
  containers: [{name: main, command: [./tcp_echo.py, "9000"], ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, ports: [{port: 80, targetPort: 9000}]}
"#;

fn echo_through(cluster: &TestCluster, host: &str, port: u16, bytes: usize) -> Value {
    let out = cluster.exec(
        "demo/client",
        &[
            "./tcp_client.py",
            host,
            &port.to_string(),
            &bytes.to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{host}:{port}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn enrolled_pods_talk_through_both_node_proxies_and_metrics_count_it() {
    let proxies = std::sync::Arc::new(NodeProxies::default());
    let cluster = TestCluster::up_with(&[("c.yaml", CLUSTER)], |o| {
        o.node_agents = Some(proxies.clone())
    })
    .expect("cluster with node proxies");
    let state = cluster.state().clone();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    let vip = state.services[0].cluster_ip.unwrap().to_string();
    const N: usize = 1 << 20;
    for (host, port) in [
        (echo_ip.as_str(), 9000),
        (vip.as_str(), 80),
        ("echo.demo", 80),
    ] {
        let r = echo_through(&cluster, host, port, N);
        assert_eq!(r["match"], true, "{r}");
        assert_eq!(r["received"], N);
        assert_eq!(
            r["peer"],
            host.parse::<std::net::IpAddr>()
                .map(|ip| ip.to_string())
                .unwrap_or(vip.clone()),
            "the app sees the address it dialled"
        );
    }

    // Node A's proxy carried three outbound connections for the client ...
    let node_a = state.node("node-a").unwrap().ip;
    let src = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_namespace", "demo"),
    ];
    wait_metric(node_a, "weft_tcp_connections_closed_total", &src, 3.0);
    assert_eq!(
        metric(node_a, "weft_tcp_connections_opened_total", &src),
        Some(3.0)
    );
    assert_eq!(
        metric(node_a, "weft_tcp_received_bytes_total", &src),
        Some((3 * N) as f64)
    );
    assert_eq!(
        metric(node_a, "weft_tcp_sent_bytes_total", &src),
        Some((3 * N) as f64)
    );
    // ... and node B's proxy delivered them to the enrolled echo pod.
    let node_b = state.node("node-b").unwrap().ip;
    let dst = [
        ("reporter", "destination"),
        ("destination_workload", "echo"),
        ("destination_namespace", "demo"),
    ];
    wait_metric(node_b, "weft_tcp_connections_closed_total", &dst, 3.0);
    assert_eq!(
        metric(node_b, "weft_tcp_received_bytes_total", &dst),
        Some((3 * N) as f64)
    );

    let pin_dirs = proxies.pin_dirs.lock().unwrap().clone();
    assert!(pin_dirs.iter().all(|d| d.exists()));
    drop(cluster);
    for mut child in proxies.children.lock().unwrap().drain(..) {
        let _ = child.wait();
    }
    for d in pin_dirs {
        assert!(
            !d.exists(),
            "the node proxy left its eBPF pins at {}",
            d.display()
        );
    }
    assert_eq!(
        weft_sim::testing::leftovers(&state.name, Some(state.slot)),
        Vec::<String>::new()
    );
}
