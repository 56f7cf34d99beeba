//! The mesh end to end on the simulator: the real control plane binaries
//! (`weft-identity`, `weft-destination`) on the host, `weft-node-proxy` on
//! every node, real eBPF redirection, real TLS between the node proxies.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use support::capture::{Capture, contains};
use support::mesh_cluster::{MeshCluster, PATIENCE, wait_until};
use support::{
    DEMO_CLUSTER, assert_not_counted, echo_through, http_get, metric, promtool_accepts, wait_metric,
};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ECHO: &str = "spiffe://cluster.local/ns/demo/sa/echo";

/// The cluster above with the mesh, plus `extra` files.
fn up(extra: &[(&str, &str)]) -> MeshCluster {
    let mut files = vec![("c.yaml", DEMO_CLUSTER)];
    files.extend_from_slice(extra);
    MeshCluster::up(&files, |_| {})
}

const MB4: usize = 4 << 20;
const SECRET: &str = "WEFT-SECRET-PAYLOAD-0123456789";
const VISIBLE: &str = "WEFT-OUTSIDE-THE-MESH-PAYLOAD";

#[test]
fn enrolled_pods_talk_over_mutual_tls_with_their_own_identities() {
    let mc = up(&[]);
    let cluster = mc.cluster();
    let state = cluster.state().clone();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    let echo_local_ip = cluster.pod("demo/echo-local").ip.to_string();
    let outsider_ip = cluster.pod("plain/outsider").ip.to_string();
    let vip = state.services[0].cluster_ip.unwrap().to_string();

    let mut capture = Capture::fabric(&state.fabric.netns);
    // A control for the capture: plaintext to a pod outside the mesh is
    // visible on the same wire.
    echo_through(
        cluster,
        "demo/client",
        &outsider_ip,
        9000,
        64 << 10,
        Some(VISIBLE),
    );
    // Cross-node by pod IP, by ClusterIP and by Service name, 4 MiB each way.
    for (host, port) in [
        (echo_ip.as_str(), 9000),
        (vip.as_str(), 80),
        ("echo.demo", 80),
    ] {
        let r = echo_through(cluster, "demo/client", host, port, MB4, Some(SECRET));
        assert_eq!(r["received"], MB4);
    }
    // tcpdump writes packets as it dequeues them: wait until the file has
    // both flows before stopping it (a stop drops what is still queued).
    capture.wait_for(|pcap, c| {
        contains(pcap, VISIBLE.as_bytes()) && c.payload_bytes("tcp src port 15008") >= 3 * MB4
    });
    let pcap = capture.stop();
    assert!(
        capture.payload_bytes("tcp dst port 15008") >= 3 * MB4,
        "the cross-node connections' 12 MiB went to the HBONE port"
    );
    assert!(
        contains(&pcap, VISIBLE.as_bytes()),
        "the capture sees plaintext when there is plaintext"
    );
    assert!(
        !contains(&pcap, SECRET.as_bytes()),
        "mesh traffic crossed the fabric in plaintext"
    );

    // Same node.
    echo_through(cluster, "demo/client", &echo_local_ip, 9000, MB4, None);

    // The destination proxy saw the client's identity, verified by mTLS.
    let node_a = mc.node_ip("node-a");
    let node_b = mc.node_ip("node-b");
    let dst = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_namespace", "demo"),
        ("source_principal", CLIENT),
        ("destination_workload", "echo"),
        ("destination_principal", ECHO),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_metric(node_b, "weft_tcp_connections_closed_total", &dst, 3.0);
    assert_eq!(
        metric(node_b, "weft_tcp_connections_opened_total", &dst),
        Some(3.0)
    );
    assert_eq!(
        metric(node_b, "weft_tcp_received_bytes_total", &dst),
        Some((3 * MB4) as f64)
    );
    assert_eq!(
        metric(node_b, "weft_tcp_sent_bytes_total", &dst),
        Some((3 * MB4) as f64)
    );
    // Source side: two by Service (with its name), one by pod IP.
    let src = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_principal", CLIENT),
        ("destination_workload", "echo"),
        ("destination_principal", ECHO),
        ("connection_security_policy", "mutual_tls"),
    ];
    let mut by_service = src.to_vec();
    by_service.push(("destination_service", "echo.demo.svc.cluster.local"));
    wait_metric(
        node_a,
        "weft_tcp_connections_closed_total",
        &by_service,
        2.0,
    );
    let mut by_ip = src.to_vec();
    by_ip.push(("destination_service", ""));
    wait_metric(node_a, "weft_tcp_connections_closed_total", &by_ip, 1.0);
    // Same node: node A reports both ends, still mutual TLS.
    let local = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("destination_workload", "echo-local"),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_metric(node_a, "weft_tcp_connections_closed_total", &local, 1.0);
    // Outside the mesh: plain, and said so.
    // (non-enrolled pods of other nodes are not in a node's view: no name)
    let plain = [
        ("reporter", "source"),
        ("source_principal", CLIENT),
        ("destination_principal", ""),
        ("connection_security_policy", "none"),
    ];
    wait_metric(node_a, "weft_tcp_connections_closed_total", &plain, 1.0);

    mc.down();
}

/// A client certificate for the *client's* SPIFFE identity, signed by a CA
/// the mesh does not trust.
fn foreign_client_certificate() -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![SanType::URI(CLIENT.try_into().unwrap())];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Connects to `host:15008` with TLS 1.3 (optionally a client certificate),
/// sends the HTTP/2 preface and reads: prints `refused: <reason>` when the
/// server aborts, `accepted` when it answers.
const TLS_PROBE: &str = r#"#!/usr/bin/env python3
import socket, ssl, sys
host, cert = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["h2"])
if cert:
    ctx.load_cert_chain(cert, sys.argv[3])
try:
    with socket.create_connection((host, 15008), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            data = s.recv(1024)
            print("accepted" if data else "refused: eof")
except (ssl.SSLError, OSError) as e:
    print("refused:", e)
"#;

#[test]
fn mesh_boundaries_and_foreign_certificates() {
    let (cert, key) = foreign_client_certificate();
    let mc = up(&[
        ("tls_probe.py", TLS_PROBE),
        ("foreign.crt", &cert),
        ("foreign.key", &key),
    ]);
    let cluster = mc.cluster();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    let echo_local_ip = cluster.pod("demo/echo-local").ip.to_string();
    let opted_out_ip = cluster.pod("demo/opted-out").ip.to_string();

    // Outside the mesh → enrolled pods (same node and across), plaintext
    // inbound capture delivers it.
    echo_through(cluster, "plain/outsider", &echo_ip, 9000, 1 << 20, None);
    echo_through(
        cluster,
        "plain/outsider",
        &echo_local_ip,
        9000,
        1 << 20,
        None,
    );
    // Enrolled → a pod that opted out: plain.
    echo_through(cluster, "demo/client", &opted_out_ip, 9000, 1 << 20, None);
    let node_a = mc.node_ip("node-a");
    wait_metric(
        node_a,
        "weft_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("source_principal", CLIENT),
            ("connection_security_policy", "none"),
        ],
        1.0,
    );
    // Plaintext into the mesh: the destination knows who it is, the source
    // has no identity (the outsider runs on node B: not in node A's view).
    let inbound_plain = [
        ("reporter", "destination"),
        ("source_principal", ""),
        ("destination_workload", "echo-local"),
        ("destination_principal", ECHO),
        ("connection_security_policy", "none"),
    ];
    wait_metric(
        node_a,
        "weft_tcp_connections_closed_total",
        &inbound_plain,
        1.0,
    );
    wait_metric(
        node_a,
        "weft_tcp_received_bytes_total",
        &inbound_plain,
        (1 << 20) as f64,
    );
    // Same node: node B's view has the outsider (its own pod).
    let node_b = mc.node_ip("node-b");
    wait_metric(
        node_b,
        "weft_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "outsider"),
            ("source_namespace", "plain"),
            ("source_principal", ""),
            ("destination_workload", "echo"),
            ("destination_principal", ECHO),
            ("connection_security_policy", "none"),
        ],
        1.0,
    );

    // A certificate from another CA, even one naming a mesh identity, and no
    // certificate at all, are refused by the pod's HBONE listener.
    let foreign = cluster.exec_ok(
        "plain/outsider",
        &["./tls_probe.py", &echo_ip, "foreign.crt", "foreign.key"],
    );
    assert!(
        foreign.contains("refused")
            && (foreign.to_lowercase().contains("unknown_ca")
                || foreign.to_lowercase().contains("unknown ca")),
        "foreign CA: {foreign}"
    );
    let anonymous = cluster.exec_ok("plain/outsider", &["./tls_probe.py", &echo_ip]);
    assert!(
        anonymous.contains("refused") && anonymous.to_lowercase().contains("certificate"),
        "no certificate: {anonymous}"
    );
    // And nothing reached the application through them.

    assert_not_counted(
        node_b,
        "weft_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
        ],
        "nothing reached the application through a refused tunnel",
    );

    // The config dump of node B shows the echo pod with its identity and a
    // certificate for it.
    let dump = mc.config_dump("node-b");
    let pods = dump["pods"].as_array().unwrap();
    assert!(
        pods.iter()
            .any(|p| p["name"] == "echo" && p["identity"] == ECHO),
        "{dump}"
    );
    assert!(
        !pods
            .iter()
            .any(|p| p["name"] == "opted-out" || p["name"] == "outsider"),
        "pods outside the mesh are not captured: {dump}"
    );
    assert!(
        dump["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["identity"] == ECHO && c["expires_in_seconds"].as_u64().unwrap() > 3600),
        "{dump}"
    );
    assert_eq!(
        http_get(std::net::SocketAddr::new(node_b.into(), 15021), "/ready").map(|r| r.0),
        Some(200)
    );

    mc.down();
}

#[test]
fn editing_the_namespace_label_moves_running_pods_in_and_out_of_the_mesh() {
    let mc = up(&[]);
    let cluster = mc.cluster();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    let node_b = mc.node_ip("node-b");
    let mtls = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("destination_workload", "echo"),
        ("connection_security_policy", "mutual_tls"),
    ];
    echo_through(cluster, "demo/client", &echo_ip, 9000, 1 << 20, None);
    wait_metric(node_b, "weft_tcp_connections_opened_total", &mtls, 1.0);

    // Remove the label: the destination service sees the edit, both proxies
    // release their pods (no restart), and traffic flows directly.
    let manifest = cluster.manifest_dir().join("c.yaml");
    let enrolled = std::fs::read_to_string(&manifest).unwrap();
    let label = "metadata: {name: demo, labels: {weft.io/mesh: enabled}}";
    assert!(enrolled.contains(label));
    std::fs::write(&manifest, enrolled.replace(label, "metadata: {name: demo}")).unwrap();
    wait_until("node proxies release the demo pods", PATIENCE, || {
        !mc.captures("node-a", "client") && !mc.captures("node-b", "echo")
    });
    echo_through(cluster, "demo/client", &echo_ip, 9000, 1 << 20, None);
    assert_eq!(
        metric(node_b, "weft_tcp_connections_opened_total", &mtls),
        Some(1.0),
        "outside the mesh, the connection did not go through the proxies"
    );
    assert_not_counted(
        node_b,
        "weft_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "none"),
        ],
        "nor through node B's plaintext capture",
    );

    // Put it back: the same running pods are captured again, with mTLS.
    std::fs::write(&manifest, &enrolled).unwrap();
    wait_until("node proxies capture the demo pods again", PATIENCE, || {
        mc.captures("node-a", "client")
            && mc.captures("node-b", "echo")
            && [mc.node_ip("node-a"), node_b].iter().all(|ip| {
                http_get(std::net::SocketAddr::new((*ip).into(), 15021), "/ready")
                    .is_some_and(|r| r.0 == 200)
            })
    });
    echo_through(cluster, "demo/client", &echo_ip, 9000, 1 << 20, None);
    wait_metric(node_b, "weft_tcp_connections_opened_total", &mtls, 2.0);

    mc.down();
}

/// A real Prometheus (Debian's package) on loopback, with the simulator's
/// file-SD configuration.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(config: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus (cargo xtask setup installs it)");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The result vector of an instant query.
    fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        http_get(self.addr, &format!("/api/v1/query?query={encoded}"))
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_every_node_proxy_and_promtool_accepts_the_metrics() {
    let mc = up(&[]);
    let cluster = mc.cluster();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    echo_through(cluster, "demo/client", &echo_ip, 9000, 1 << 20, None);
    let node_b = mc.node_ip("node-b");
    let mtls = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_metric(node_b, "weft_tcp_connections_closed_total", &mtls, 1.0);

    // The exposition passes promtool's lint on every node.
    for node in ["node-a", "node-b"] {
        promtool_accepts(mc.node_ip(node));
    }

    // Prometheus finds both node proxies through the simulator's file-SD
    // configuration, scrapes them, and answers a query about the traffic.
    let config = mc.mesh.state().unwrap().prometheus_config;
    let prometheus = Prometheus::start(&config);
    wait_until("Prometheus scrapes both node proxies", PATIENCE, || {
        let up = prometheus.query("up{job=\"weft-node-proxy\"}");
        up.len() == 2 && up.iter().all(|s| s["value"][1] == "1")
    });
    wait_until("Prometheus has the mTLS connection", PATIENCE, || {
        prometheus
            .query(&format!(
                "sum(weft_tcp_connections_closed_total{{reporter=\"destination\",source_principal=\"{CLIENT}\",connection_security_policy=\"mutual_tls\",node=\"node-b\"}})"
            ))
            .first()
            .is_some_and(|s| s["value"][1] == "1")
    });
    drop(prometheus);

    mc.down();
}

/// #15 item 9: IPv6 between meshed pods. The client reaches the echo
/// server's IPv6 address over mutual TLS (HBONE on the pod's IPv6
/// address: it listened only on the first address, so this was reset),
/// nothing crosses the fabric in plaintext, and inbound policy holds on
/// IPv6 as on IPv4: a Server that admits only the client's identity
/// refuses a plaintext client outside the mesh on both families.
#[test]
fn enrolled_pods_talk_over_ipv6_with_mutual_tls_and_policy_holds() {
    const POLICY: &str = r#"
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: echo, namespace: demo}
spec: {podSelector: {matchLabels: {app: echo}}, port: 9000, accessPolicy: deny}
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-for-client, namespace: demo}
spec:
  targetRef: {group: policy.weft.io, kind: Server, name: echo}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: client}]
"#;
    let mc = up(&[("policy.yaml", POLICY)]);
    let cluster = mc.cluster();
    let state = cluster.state().clone();
    let echo = cluster.pod("demo/echo");
    let (echo_v4, echo_v6) = (echo.ip.to_string(), echo.ipv6.to_string());

    let mut capture = Capture::fabric(&state.fabric.netns);
    let r = echo_through(cluster, "demo/client", &echo_v6, 9000, MB4, Some(SECRET));
    assert_eq!(r["received"], MB4);
    capture.wait_for(|_, c| c.payload_bytes("ip6 and tcp src port 15008") >= MB4);
    let pcap = capture.stop();
    assert!(
        capture.payload_bytes("ip6 and tcp dst port 15008") >= MB4,
        "the IPv6 connection's 4 MiB went to the HBONE port over IPv6"
    );
    assert!(
        !contains(&pcap, SECRET.as_bytes()),
        "mesh traffic crossed the fabric in plaintext"
    );
    let node_b = mc.node_ip("node-b");
    let dst = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("destination_workload", "echo"),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_metric(node_b, "weft_tcp_connections_closed_total", &dst, 1.0);

    // The outsider (plaintext, outside the mesh) is refused on both
    // families; the client, admitted, passes on IPv4 too.
    for ip in [&echo_v6, &echo_v4] {
        let out = cluster.exec("plain/outsider", &["./tcp_client.py", ip, "9000", "1024"]);
        assert!(!out.status.success(), "the outsider got through on {ip}");
    }
    echo_through(cluster, "demo/client", &echo_v4, 9000, 1024, None);
    let denied = [("reason", "default_deny"), ("destination_workload", "echo")];
    // Exactly the outsider's two: a refusal for another reason (no route
    // on IPv6, say) would leave one.
    support::wait_metric_sum(node_b, "weft_inbound_authz_denied_total", &denied, 2.0);
    mc.down();
}

/// #15 item 1 on the wire: a connection to a meshed pod's `podIP:15006`
/// from a pod outside the mesh (plaintext, steered to the proxy's inbound
/// listener), and a tunnel to `podIP:15008` from an enrolled client, are
/// refused before the proxy connects anything: the server's node counts no
/// connection for them (one plain connection used to make the proxy connect
/// to itself thousands of times). The same clients reach the application's
/// port (the positive control, counted).
#[test]
fn connections_to_the_proxys_own_ports_are_refused_and_never_amplified() {
    let mc = up(&[]);
    let cluster = mc.cluster();
    let echo_ip = cluster.pod("demo/echo").ip.to_string();
    let node_b = mc.node_ip("node-b");
    let opened = || {
        support::metric_sum(
            node_b,
            "weft_tcp_connections_opened_total",
            &[("reporter", "destination")],
        )
    };
    for (pod, port) in [("plain/outsider", "15006"), ("demo/client", "15008")] {
        let out = cluster.exec(pod, &["./tcp_client.py", &echo_ip, port, "1024"]);
        assert!(
            !out.status.success(),
            "{pod} -> {echo_ip}:{port} got through: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(opened(), 0.0, "nothing was connected for the refusals");
    echo_through(cluster, "plain/outsider", &echo_ip, 9000, 1024, None);
    echo_through(cluster, "demo/client", &echo_ip, 9000, 1024, None);
    support::wait_metric_sum(
        node_b,
        "weft_tcp_connections_opened_total",
        &[("reporter", "destination")],
        2.0,
    );
    mc.down();
}
