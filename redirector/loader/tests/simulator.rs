//! End-to-end in the local cluster simulator (`weft_sim::TestCluster`): real
//! pods on two nodes, real application processes (`tcp_client.py`,
//! `tcp_echo.py`) in their pod cgroups, kube-proxy's nftables for Services,
//! and a stand-in for the node proxy that relays what the redirector hands it.

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use support::{Capture, Direction, Installed, StandInProxy};
use weft_redirector::Netns;
use weft_sim::TestCluster;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  nodeName: node-a
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec:
  nodeName: node-b
  containers:
  - name: main
    command: [./tcp_echo.py, "9000"]
    ports: [{name: echo, containerPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: echo}]
"#;

/// Runs the checking client in `pod`; returns (exit ok, report or stderr).
fn client(cluster: &TestCluster, pod: &str, host: &str, port: u16) -> (bool, Value, String) {
    let out = cluster.exec(pod, &["./tcp_client.py", host, &port.to_string(), "100000"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn enroll(installed: &Installed, cluster: &TestCluster, pod: &str) -> Netns {
    let state = cluster.pod(pod);
    let netns = Netns::open(&state.netns_path).unwrap();
    installed
        .get()
        .enroll(&weft_redirector::PodEnrollment {
            netns: &netns,
            pod_uid: state.uid.clone(),
            annotations: state.annotations.clone().into_iter().collect(),
        })
        .unwrap();
    netns
}

#[test]
fn app_connects_across_nodes_through_the_proxy_by_pod_ip_service_and_ipv6() {
    let cluster = TestCluster::up(CLUSTER).expect("cluster up");
    let installed = Installed::new();
    let client_pod = cluster.pod("demo/client");
    let echo = cluster.pod("demo/echo");
    let cluster_ip = cluster.state().services[0]
        .cluster_ip
        .expect("the echo Service has a ClusterIP");
    let ns = Netns::open(&client_pod.netns_path).unwrap();
    let proxy4 = StandInProxy::start(
        &client_pod.netns_path,
        ns.listen_tcp("127.0.0.1:15001".parse().unwrap()).unwrap(),
        Direction::Outbound,
    );
    let proxy6 = StandInProxy::start(
        &client_pod.netns_path,
        ns.listen_tcp("[::1]:15001".parse().unwrap()).unwrap(),
        Direction::Outbound,
    );
    enroll(&installed, &cluster, "demo/client");

    // By pod IP, across nodes: the bytes come back, the app saw the echo pod
    // as its peer, and the proxy was told the original destination.
    let (ok, report, err) = client(&cluster, "demo/client", &echo.ip.to_string(), 9000);
    assert!(ok, "{report} {err}");
    assert_eq!(report["match"], true);
    assert_eq!(
        report["peer"],
        echo.ip.to_string(),
        "getpeername shows the original destination"
    );
    assert_eq!(report["port"], 9000);
    // By Service ClusterIP: redirected before kube-proxy's DNAT, so the
    // proxy sees the ClusterIP (and its own marked connection is DNATed).
    let (ok, report, err) = client(&cluster, "demo/client", &cluster_ip.to_string(), 80);
    assert!(ok, "{report} {err}");
    assert_eq!(report["peer"], cluster_ip.to_string());
    let want: Vec<SocketAddr> = vec![
        SocketAddr::new(echo.ip.into(), 9000),
        SocketAddr::new(cluster_ip.into(), 80),
    ];
    assert_eq!(proxy4.served(), want);

    // IPv6 by pod address.
    let (ok, report, err) = client(&cluster, "demo/client", &echo.ipv6.to_string(), 9000);
    assert!(ok, "{report} {err}");
    assert_eq!(report["peer"], echo.ipv6.to_string());
    assert_eq!(
        proxy6.served(),
        vec![SocketAddr::new(echo.ipv6.into(), 9000)]
    );
}

#[test]
fn inbound_to_an_enrolled_pod_goes_through_15006() {
    let cluster = TestCluster::up(CLUSTER).expect("cluster up");
    let installed = Installed::new();
    let echo = cluster.pod("demo/echo");
    let ns = Netns::open(&echo.netns_path).unwrap();
    let listener = ns.listen_tcp("0.0.0.0:15006".parse().unwrap()).unwrap();
    installed
        .get()
        .register_inbound_listener(&ns, &listener)
        .unwrap();
    let inbound = StandInProxy::start(&echo.netns_path, listener, Direction::Inbound);
    enroll(&installed, &cluster, "demo/echo");

    let (ok, report, err) = client(&cluster, "demo/client", &echo.ip.to_string(), 9000);
    assert!(ok, "{report} {err}");
    assert_eq!(
        report["match"], true,
        "the app behind the proxy echoed everything"
    );
    assert_eq!(
        inbound.served(),
        vec![SocketAddr::new(echo.ip.into(), 9000)],
        "15006 saw the original port"
    );
}

#[test]
fn enrolled_pod_without_proxy_is_refused_and_sends_nothing() {
    let cluster = TestCluster::up(CLUSTER).expect("cluster up");
    let installed = Installed::new();
    let echo = cluster.pod("demo/echo");
    let echo_ns = support::TestNetnsRef::open(&echo.netns_path);
    let capture = Capture::start_in(&echo_ns.netns, "eth0");

    // Control: before enrollment the connection works and its SYN is seen.
    let (ok, _, err) = client(&cluster, "demo/client", &echo.ip.to_string(), 9000);
    assert!(ok, "{err}");
    assert!(capture.syns_to_port(9000) >= 1, "capture sees a direct SYN");

    enroll(&installed, &cluster, "demo/client");
    let (ok, _, err) = client(&cluster, "demo/client", &echo.ip.to_string(), 9000);
    assert!(!ok, "the client must fail");
    assert!(err.contains("Connection refused"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(capture.syns_to_port(9000), 0, "no SYN reached the echo pod");
}
