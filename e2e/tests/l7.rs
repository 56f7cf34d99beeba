//! Request-level proxying (#8) on the simulator: real clients written by
//! others (curl, h2load, grpcio) through the node proxies, real eBPF and
//! mTLS; responses checked, and the golden metrics counting exactly what
//! was sent.

mod support;

use std::net::Ipv4Addr;
use support::{MeshCluster, metric_sum, promtool_accepts, wait_metric, wait_metric_sum};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const WEB: &str = "web.demo.svc.cluster.local";
const GRPC: &str = "grpc.demo.svc.cluster.local";

/// Two HTTP/1.1 servers and two gRPC servers behind Services, one of each
/// on the client's node and across; two server-speaks-first servers, one
/// on a port declared opaque.
const CLUSTER: &str = r#"
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
  containers: [{name: main, command: [./http_server.py, "8080", web-1], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: main, command: [./http_server.py, "8080", web-2], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: grpc-1, namespace: demo, labels: {app: grpc}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./grpc_echo.py, serve, "50051", grpc-1], ports: [{containerPort: 50051}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: grpc-2, namespace: demo, labels: {app: grpc}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: main, command: [./grpc_echo.py, serve, "50051", grpc-2], ports: [{containerPort: 50051}]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: demo}
spec: {selector: {app: grpc}, ports: [{port: 50051, targetPort: 50051, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: banner, namespace: demo}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./banner.py, serve, "2500", banner], ports: [{containerPort: 2500}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: banner-opaque, namespace: demo, annotations: {weft.io/opaque-ports: "2600"}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./banner.py, serve, "2600", banner-opaque], ports: [{containerPort: 2600}]}]
"#;

/// One unary gRPC request to weft.test.Echo/Echo with the message "hello"
/// (5-byte gRPC frame header + payload), the body h2load sends.
const GRPC_HELLO_FRAME: &str = "\0\0\0\0\u{5}hello";

/// Asks web.demo to switch to the raw "weft-echo" protocol (as a WebSocket
/// handshake would), then sends bytes that only the upgraded connection
/// carries; prints JSON {"status", "echo"}.
const UPGRADE_CLIENT: &str = r#"#!/usr/bin/env python3
import json, socket
with socket.create_connection(("web.demo", 80), timeout=20) as s:
    s.sendall(b"GET /upgrade HTTP/1.1\r\nHost: web.demo\r\nConnection: Upgrade\r\nUpgrade: weft-echo\r\n\r\n")
    f = s.makefile("rb")
    status = f.readline().decode().strip()
    while f.readline() not in (b"\r\n", b""):
        pass
    s.sendall(b"raw bytes after the upgrade\n")
    echo = f.readline().decode().strip()
print(json.dumps({"status": status, "echo": echo}))
"#;

fn up() -> MeshCluster {
    MeshCluster::up(
        &[
            ("c.yaml", CLUSTER),
            ("hello.grpc", GRPC_HELLO_FRAME),
            ("upgrade_client.py", UPGRADE_CLIENT),
        ],
        |_| {},
    )
}

/// Source-side request series of the client towards `service`, plus `more`.
fn requests<'a>(service: &'a str, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut labels = vec![
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_namespace", "demo"),
        ("source_principal", CLIENT),
        ("destination_service", service),
        ("route", "default"),
    ];
    labels.extend_from_slice(more);
    labels
}

#[test]
fn http1_requests_over_keep_alive_are_proxied_and_counted() {
    let mc = up();
    let cluster = mc.cluster();
    let node_a = mc.node_ip("node-a");

    // One curl, one keep-alive connection, 16 requests: 10 hellos, 3
    // induced 500s, a chunked response, 2 slow POSTs (300 ms server delay).
    let mut argv = vec![
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "30",
        "-w",
        "\n=%{http_code} %{num_connects}\n",
    ];
    let hello = "http://web.demo/hello";
    let fail = "http://web.demo/status/500";
    argv.extend([hello; 10]);
    argv.extend([fail; 3]);
    argv.push("http://web.demo/chunked/5");
    let out = cluster.exec_ok("demo/client", &argv);
    // Each response: its body, then "=CODE CONNECTS".
    let mut bodies = Vec::new();
    let mut statuses = Vec::new();
    let mut connects = 0;
    let mut body = String::new();
    for line in out.lines() {
        if let Some(meta) = line.strip_prefix('=') {
            let (code, n) = meta.split_once(' ').unwrap();
            statuses.push(code.to_string());
            connects += n.parse::<u32>().unwrap();
            // The newline before "=" is the write-out's, not the body's.
            body.pop();
            bodies.push(std::mem::take(&mut body));
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    assert_eq!(statuses.len(), 14, "{out}");
    assert_eq!(connects, 1, "one keep-alive connection for all: {out}");
    for (i, b) in bodies.iter().enumerate().take(10) {
        assert_eq!(statuses[i], "200", "{out}");
        assert!(b.starts_with("hello from web-"), "{b:?}");
    }
    for i in 10..13 {
        assert_eq!(statuses[i], "500", "{out}");
        assert!(bodies[i].starts_with("status 500 from web-"), "{out}");
    }
    assert_eq!(statuses[13], "200");
    assert_eq!(
        bodies[13],
        (0..5).map(|i| format!("chunk-{i}\n")).collect::<String>()
    );

    // A chunked request body, echoed back whole.
    let echoed = cluster.exec_ok(
        "demo/client",
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "30",
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "a chunked request body",
            "http://web.demo/echo",
        ],
    );
    assert_eq!(echoed, "a chunked request body");

    // Two requests the server answers after 300 ms.
    let slow = cluster.exec_ok(
        "demo/client",
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "30",
            "-X",
            "POST",
            "http://web.demo/delay/300",
            "http://web.demo/delay/300",
        ],
    );
    assert!(slow.contains("delayed 300 ms"), "{slow}");

    // An upgrade (the WebSocket handshake's shape) passes through both
    // proxies, and the upgraded connection carries raw bytes both ways.
    let up = cluster.exec_ok("demo/client", &["./upgrade_client.py"]);
    let up: serde_json::Value = serde_json::from_str(up.trim()).unwrap();
    assert!(
        up["status"].as_str().unwrap().starts_with("HTTP/1.1 101"),
        "{up}"
    );
    assert_eq!(up["echo"], "raw bytes after the upgrade", "{up}");

    // HTTP/1.1 load: h2load --h1, 200 requests over 4 keep-alive
    // connections, 4 concurrent.
    let load = cluster.exec_ok(
        "demo/client",
        &[
            "h2load",
            "--h1",
            "-n",
            "200",
            "-c",
            "4",
            "http://web.demo/hello",
        ],
    );
    assert!(
        load.contains("200 succeeded, 0 failed, 0 errored") && load.contains("200 2xx"),
        "h2load --h1: {load}"
    );

    // The source proxy counted exactly these, by method class, status and
    // classification, with the client's verified identity and the
    // Service's name (summed over the two endpoints).
    let get_ok = requests(
        WEB,
        &[
            ("method", "GET"),
            ("status_code", "200"),
            ("grpc_status", ""),
            ("classification", "success"),
        ],
    );
    wait_metric_sum(node_a, "weft_requests_total", &get_ok, 211.0);
    // Per request, not per connection: both endpoints served some.
    for endpoint in ["web-1", "web-2"] {
        let mut l = get_ok.clone();
        l.push(("destination_workload", endpoint));
        assert!(
            metric_sum(node_a, "weft_requests_total", &l) >= 1.0,
            "{endpoint} got no request"
        );
    }
    let get_500 = requests(
        WEB,
        &[
            ("method", "GET"),
            ("status_code", "500"),
            ("classification", "failure"),
        ],
    );
    wait_metric_sum(node_a, "weft_requests_total", &get_500, 3.0);
    wait_metric_sum(
        node_a,
        "weft_requests_total",
        &requests(WEB, &[("method", "PUT"), ("status_code", "200")]),
        1.0,
    );
    let post = requests(WEB, &[("method", "POST"), ("status_code", "200")]);
    wait_metric_sum(node_a, "weft_requests_total", &post, 2.0);
    wait_metric_sum(
        node_a,
        "weft_requests_total",
        &requests(
            WEB,
            &[
                ("method", "GET"),
                ("status_code", "101"),
                ("classification", "success"),
            ],
        ),
        1.0,
    );
    assert_eq!(
        metric_sum(node_a, "weft_requests_total", &requests(WEB, &[])),
        218.0,
        "nothing else was counted"
    );
    // Every series names a destination workload and its identity (mTLS).
    assert_eq!(
        metric_sum(
            node_a,
            "weft_requests_total",
            &requests(
                WEB,
                &[(
                    "destination_principal",
                    "spiffe://cluster.local/ns/demo/sa/web"
                )]
            )
        ),
        218.0
    );
    // The 300 ms delay is measured: above the 250 ms bound (a lower bound
    // a slow machine cannot break), and in a finite bucket.
    let bucket = |le: &str| {
        let mut l = post.clone();
        l.push(("le", le));
        metric_sum(node_a, "weft_request_duration_seconds_bucket", &l)
    };
    assert_eq!(bucket("0.25"), 0.0);
    assert_eq!(bucket("10.0"), 2.0);
    assert_eq!(
        metric_sum(node_a, "weft_request_duration_seconds_count", &post),
        2.0
    );
    // Terminated HTTP connections are not TCP series (as in Istio).
    assert_eq!(
        metric_sum(
            node_a,
            "weft_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_service", WEB)]
        ),
        0.0
    );
    // The destination side (web-1 on node B, web-2 on node A) saw the same
    // requests, with the client's verified identity.
    let node_b = mc.node_ip("node-b");
    let dst = |more: &[(&'static str, &'static str)]| {
        let mut l = vec![
            ("reporter", "destination"),
            ("source_workload", "client"),
            ("source_principal", CLIENT),
            ("destination_service", WEB),
        ];
        l.extend_from_slice(more);
        move |node| metric_sum(node, "weft_requests_total", &l)
    };
    let both = |f: &dyn Fn(Ipv4Addr) -> f64| f(node_a) + f(node_b);
    support::wait_until_eq("destination-side requests", 218.0, || both(&dst(&[])));
    assert_eq!(
        both(&dst(&[
            ("method", "GET"),
            ("status_code", "500"),
            ("classification", "failure")
        ])),
        3.0
    );
    assert_eq!(
        both(&dst(&[("method", "POST"), ("status_code", "200")])),
        2.0
    );
    promtool_accepts(node_a);

    mc.down();
}

/// Runs the gRPC client in the client pod; returns its JSON results.
fn grpc(cluster: &weft_sim::TestCluster, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["./grpc_echo.py"];
    argv.extend_from_slice(args);
    let out = cluster.exec_ok("demo/client", &argv);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn grpc_and_http2_are_proxied_per_request_and_server_first_protocols_do_not_stall() {
    let mc = up();
    let cluster = mc.cluster();
    let node_a = mc.node_ip("node-a");

    // Unary calls: two OK, two induced errors, one slow (300 ms).
    let r = grpc(
        cluster,
        &[
            "call",
            "grpc.demo:50051",
            "one",
            "fail:13",
            "two",
            "fail:5",
            "sleep:300",
        ],
    );
    let r = r.as_array().unwrap();
    assert!(r[0]["ok"].as_str().unwrap().ends_with(":one"), "{r:?}");
    assert_eq!(r[1]["code"], "INTERNAL");
    assert!(r[2]["ok"].as_str().unwrap().ends_with(":two"), "{r:?}");
    assert_eq!(r[3]["code"], "NOT_FOUND");
    assert!(r[4]["ok"].as_str().unwrap().ends_with(":sleep:300"));
    // Server streaming: every message arrives, then the OK status.
    let s = grpc(cluster, &["stream", "grpc.demo:50051", "20"]);
    let s = s.as_array().unwrap();
    assert_eq!(s.len(), 20, "{s:?}");
    let server = s[0]["ok"].as_str().unwrap().split(':').next().unwrap();
    for (i, m) in s.iter().enumerate() {
        assert_eq!(m["ok"], format!("{server}:{i}"));
    }

    // h2load: 200 unary gRPC calls over 2 HTTP/2 connections, 10
    // concurrent streams each.
    let out = cluster.exec_ok(
        "demo/client",
        &[
            "h2load",
            "-n",
            "200",
            "-c",
            "2",
            "-m",
            "10",
            "-d",
            "hello.grpc",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "http://grpc.demo:50051/weft.test.Echo/Echo",
        ],
    );
    assert!(
        out.contains("200 succeeded, 0 failed, 0 errored"),
        "h2load: {out}"
    );

    // Counted exactly: 2 + 1 + 1 + 200 OK calls, one INTERNAL, one
    // NOT_FOUND, all POST over HTTP/2, gRPC errors as failures.
    let ok = requests(
        GRPC,
        &[
            ("method", "POST"),
            ("status_code", "200"),
            ("grpc_status", "0"),
            ("classification", "success"),
        ],
    );
    wait_metric_sum(node_a, "weft_requests_total", &ok, 204.0);
    for code in ["13", "5"] {
        wait_metric_sum(
            node_a,
            "weft_requests_total",
            &requests(
                GRPC,
                &[("grpc_status", code), ("classification", "failure")],
            ),
            1.0,
        );
    }
    assert_eq!(
        metric_sum(node_a, "weft_requests_total", &requests(GRPC, &[])),
        206.0
    );
    // Per request, not per connection: h2load's 2 connections reached both
    // endpoints (concurrent requests in flight spread the balancer's picks).
    for endpoint in ["grpc-1", "grpc-2"] {
        let n = metric_sum(
            node_a,
            "weft_requests_total",
            &requests(GRPC, &[("destination_workload", endpoint)]),
        );
        assert!(n >= 1.0, "{endpoint} got no request");
    }
    // /config_dump shows the balancer's view of both endpoints: measured,
    // and nothing left in flight (every pick was reported back).
    let dump = mc.config_dump("node-a");
    for pod in ["demo/grpc-1", "demo/grpc-2"] {
        let addr = format!("{}:50051", cluster.pod(pod).ip);
        let ep = dump["balancer"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == addr.as_str())
            .unwrap_or_else(|| panic!("{addr} not in {}", dump["balancer"]));
        assert_eq!(ep["in_flight"], 0, "{ep}");
        assert!(ep["latency_ewma_ms"].as_f64().unwrap() > 0.0, "{ep}");
    }
    // The destination side counted the same calls (grpc-1 on node B,
    // grpc-2 on node A), failures included.
    let node_b = mc.node_ip("node-b");
    let dst = |node, more: &[(&str, &str)]| {
        let mut l = vec![
            ("reporter", "destination"),
            ("source_principal", CLIENT),
            ("destination_service", GRPC),
        ];
        l.extend_from_slice(more);
        metric_sum(node, "weft_requests_total", &l)
    };
    support::wait_until_eq("destination-side gRPC calls", 206.0, || {
        dst(node_a, &[]) + dst(node_b, &[])
    });
    for code in ["13", "5"] {
        let l = [("grpc_status", code), ("classification", "failure")];
        assert_eq!(dst(node_a, &l) + dst(node_b, &l), 1.0, "grpc_status {code}");
    }
    // The slow call is measured above 250 ms (a lower bound a slow machine
    // cannot break).
    let bucket = |le: &str| {
        let mut l = ok.clone();
        l.push(("le", le));
        metric_sum(node_a, "weft_request_duration_seconds_bucket", &l)
    };
    assert!(bucket("10.0") - bucket("0.25") >= 1.0);
    assert_eq!(bucket("10.0"), 204.0);

    // Server speaks first: the client reads the banner before sending a
    // byte. On an undeclared port detection gives up (the client sent
    // nothing) and the connection goes on as TCP; on a port the pod
    // declares opaque there is no detection at all. The source proxy counts
    // how it decided each connection (nothing else connects from node A
    // meanwhile, and the count is made before the banner can pass).
    let b1 = cluster.pod("demo/banner").ip.to_string();
    let b2 = cluster.pod("demo/banner-opaque").ip.to_string();
    let decided = |outcome: &str| {
        metric_sum(
            node_a,
            "weft_protocol_detections_total",
            &[("reporter", "source"), ("outcome", outcome)],
        )
    };
    for (ip, port, name, outcome) in [
        (&b1, "2500", "banner", "timeout"),
        (&b2, "2600", "banner-opaque", "declared_opaque"),
    ] {
        let before = (decided("timeout"), decided("declared_opaque"));
        let out = cluster.exec_ok("demo/client", &["./banner.py", "client", ip, port]);
        let after = (decided("timeout"), decided("declared_opaque"));
        let want = match outcome {
            "timeout" => (before.0 + 1.0, before.1),
            _ => (before.0, before.1 + 1.0),
        };
        assert_eq!(after, want, "{name}: (timeout, declared_opaque) counts");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["banner"], format!("220 {name} ready"), "{out}");
        assert_eq!(v["echo"], "250 HELO weft", "{out}");
        wait_metric(
            node_a,
            "weft_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("destination_workload", name),
                ("connection_security_policy", "mutual_tls"),
            ],
            1.0,
        );
    }
    promtool_accepts(node_a);

    // grpc-2 is deleted: node A's balancer forgets what it measured of it
    // with the first view without it (a new pod may get its address), and
    // keeps grpc-1's.
    let manifest = cluster.manifest_dir().join("c.yaml");
    let yaml = std::fs::read_to_string(&manifest).unwrap();
    let kept: Vec<&str> = yaml
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: grpc-2,"))
        .collect();
    assert_eq!(
        kept.len() + 1,
        yaml.split("\n---\n").count(),
        "one pod removed"
    );
    std::fs::write(&manifest, kept.join("\n---\n")).unwrap();
    let measured = |pod: &str| {
        let addr = format!("{}:50051", cluster.pod(pod).ip);
        mc.config_dump("node-a")["balancer"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["address"] == addr.as_str())
    };
    support::mesh_cluster::wait_until(
        "node A forgets grpc-2",
        support::mesh_cluster::PATIENCE,
        || !measured("demo/grpc-2"),
    );
    assert!(measured("demo/grpc-1"), "grpc-1 is still an endpoint");

    mc.down();
}
