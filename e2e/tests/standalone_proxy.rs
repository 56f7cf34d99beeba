//! The node proxy on the simulator: real eBPF redirection, real pods, the
//! `weft-node-proxy` binary on every node, pods registered as the CNI
//! plugin would.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::{echo_through, http_get, metric, wait_metric};
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
            let state_dir = weft_sim::mesh::node_proxy_state_dir(state, &node.name);
            let args: Vec<String> = [
                "--state-dir",
                state_dir.to_str().unwrap(),
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
            let proxy = support::mesh_cluster::binaries().node_proxy;
            let mut cmd = node_command(
                state,
                &node.name,
                proxy.to_str().expect("a UTF-8 path"),
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
        let r = echo_through(&cluster, "demo/client", host, port, N, None);
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
