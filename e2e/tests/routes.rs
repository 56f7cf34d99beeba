//! HTTPRoutes in the node proxy on the simulator, with real gRPC clients
//! (grpcio) in captured pods, real eBPF and mTLS: retries by gRPC status,
//! a request timeout over a gRPC stream, ejection on gRPC failures, the
//! balancer's latency-aware choice, route-level authorization of gRPC
//! methods. The weighted split, request timeouts, 404 for an unmatched
//! path, retries with streamed bodies, the retry budget and route-level
//! authorization of HTTP requests are tested in process
//! (`routes_in_process.rs`, `authz_in_process.rs`).

mod support;

use support::{MeshCluster, metric_sum, wait_metric_sum};

const GRPC_FLAKY: &str = "grpc-flaky.demo.svc.cluster.local";

/// `ewma` has a fast and a slow pod; `grpc-flaky` fails every other
/// `flaky:` call;
/// `grpc-pair` has a good pod and one answering UNAVAILABLE to every call.
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
metadata: {name: ewma-fast, namespace: demo, labels: {app: ewma}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./http_server.py, "8080", ewma-fast, "0"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: ewma-slow, namespace: demo, labels: {app: ewma}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./http_server.py, "8080", ewma-slow, "50"], ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: ewma, namespace: demo}
spec: {selector: {app: ewma}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: grpc-flaky-1, namespace: demo, labels: {app: grpc-flaky}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./grpc_echo.py, serve, "50051", grpc-flaky-1], ports: [{containerPort: 50051}]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-flaky, namespace: demo}
spec: {selector: {app: grpc-flaky}, ports: [{port: 50051, targetPort: 50051, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: grpc-flaky, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: grpc-flaky, port: 50051}]
  rules:
    - name: echo
      matches: [{path: {type: Exact, value: /weft.test.Echo/Echo}}]
      retry: {attempts: 2, backoff: 5ms}
    - name: stream
      matches: [{path: {type: Exact, value: /weft.test.Echo/Stream}}]
      timeouts: {request: 1s}
---
apiVersion: v1
kind: Pod
metadata: {name: grpc-good, namespace: demo, labels: {app: grpc-pair}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./grpc_echo.py, serve, "50051", grpc-good], ports: [{containerPort: 50051}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: grpc-down, namespace: demo, labels: {app: grpc-pair, role: down}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: main, command: [./grpc_echo.py, serve, "50051", grpc-down, "14"], ports: [{containerPort: 50051}]}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-pair, namespace: demo}
spec: {selector: {app: grpc-pair}, ports: [{port: 50051, targetPort: 50051, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc-down, namespace: demo}
spec: {selector: {role: down}, ports: [{port: 50051, targetPort: 50051, appProtocol: kubernetes.io/h2c}]}
"#;

fn up() -> MeshCluster {
    MeshCluster::up(&[("c.yaml", CLUSTER)], |_| {})
}

/// One curl in the client pod, one keep-alive connection, `urls` in order:
/// each response's (status, body).
fn curl_many(mc: &MeshCluster, urls: &[String]) -> Vec<(u16, String)> {
    let mut argv = vec![
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "120",
        "-w",
        "\n=%{http_code}\n",
    ];
    argv.extend(urls.iter().map(String::as_str));
    let out = mc.cluster().exec("demo/client", &argv);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut responses = Vec::new();
    let mut body = String::new();
    for line in stdout.lines() {
        if let Some(code) = line.strip_prefix('=') {
            body.pop();
            responses.push((code.parse().unwrap(), std::mem::take(&mut body)));
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    assert_eq!(
        responses.len(),
        urls.len(),
        "one response per URL: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    responses
}

fn repeat(url: &str, n: usize) -> Vec<String> {
    vec![url.to_string(); n]
}

#[test]
fn retries_follow_the_grpc_status() {
    let mc = up();
    let node_a = mc.node_ip("node-a");

    // Streamed HTTP/1.1 bodies replayed by retries, and the 64 KiB cap,
    // are tested in process (`routes_in_process.rs`).
    // gRPC: the status is in the trailers (a trailers-only response here)
    // of an HTTP 200. UNAVAILABLE is retried by default: every call of
    // this client fails once at the server (calls 0, 2, 4, ...) and succeeds
    // on its retry. grpcio sends no Content-Length: streamed bodies again.
    let grpc_labels = [
        ("destination_service", GRPC_FLAKY),
        ("route", "grpc-flaky/echo"),
    ];
    const CALLS: usize = 10;
    let calls = vec!["flaky:14"; CALLS];
    let mut args = vec!["call", "grpc-flaky.demo:50051"];
    args.extend(&calls);
    let results = grpc(&mc, "demo/client", &args);
    let ok = results
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == "grpc-flaky-1:flaky:14")
        .count();
    assert_eq!(ok, CALLS, "{results}");
    let retries = metric_sum(node_a, "weft_request_retries_total", &grpc_labels);
    assert_eq!(retries, CALLS as f64, "one retry per call");
    wait_metric_sum(
        node_a,
        "weft_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service", GRPC_FLAKY),
            ("route", "grpc-flaky/echo"),
            ("grpc_status", "0"),
            ("classification", "success"),
        ],
        CALLS as f64,
    );
    // INTERNAL is not in the default set: half of these fail, unretried.
    let calls = vec!["flaky:13"; CALLS];
    let mut args = vec!["call", "grpc-flaky.demo:50051"];
    args.extend(&calls);
    let results = grpc(&mc, "demo/client", &args);
    let internal = results
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["code"] == "INTERNAL")
        .count();
    assert_eq!(internal, CALLS / 2, "{results}");
    assert_eq!(
        metric_sum(node_a, "weft_request_retries_total", &grpc_labels),
        retries
    );
    mc.down();
}

#[test]
fn the_request_timeout_covers_a_grpc_stream() {
    let mc = up();
    let node_a = mc.node_ip("node-a");

    // An HTTP body cut by the request timeout is tested in process
    // (`routes_in_process.rs`).
    // A gRPC stream of 4 messages, one every 400 ms, under a 1 s request
    // timeout: the client keeps the messages that came in time and gets
    // DEADLINE_EXCEEDED as the call's status.
    let results = grpc(
        &mc,
        "demo/client",
        &["stream", "grpc-flaky.demo:50051", "4@400"],
    );
    let results = results.as_array().unwrap();
    eprintln!("stream under a 1 s timeout: {results:?}");
    let messages = results.iter().filter(|r| r.get("ok").is_some()).count();
    assert!((1..4).contains(&messages), "{results:?}");
    assert_eq!(
        results.last().unwrap()["code"],
        "DEADLINE_EXCEEDED",
        "{results:?}"
    );
    wait_metric_sum(
        node_a,
        "weft_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service", GRPC_FLAKY),
            ("route", "grpc-flaky/stream"),
            ("grpc_status", "4"),
            ("classification", "failure"),
        ],
        1.0,
    );
    mc.down();
}

#[test]
fn an_endpoint_failing_every_grpc_call_is_ejected() {
    let mc = up();
    let calls = |service: &str, message: &str, n: usize| {
        let messages = vec![message; n];
        let target = format!("{service}.demo:50051");
        let mut args = vec!["call", target.as_str()];
        args.extend(&messages);
        grpc(&mc, "demo/client", &args).as_array().unwrap().clone()
    };
    let down = format!("{}:50051", mc.cluster().pod("demo/grpc-down").ip);
    let failures_of_down = || {
        let dump = mc.config_dump("node-a");
        let ep = dump["balancer"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == down.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{down} not in {}", dump["balancer"]));
        ep["consecutive_failures"].as_u64().unwrap()
    };

    // grpc-down answers every call with UNAVAILABLE, in an HTTP 200. As
    // the only endpoint of its Service it gets every call, and the
    // balancer counts each as a failure (were the gRPC status ignored:
    // none, since every HTTP status was 200).
    const ALONE: usize = 10;
    let results = calls("grpc-down", "hi", ALONE);
    assert!(
        results.iter().all(|r| r["code"] == "UNAVAILABLE"),
        "{results:?}"
    );
    assert_eq!(failures_of_down(), ALONE as u64);

    // Next to grpc-good, whose calls take 100 ms (`sleep:100`), the fast
    // failures would win every latency comparison and draw nearly all the
    // calls. Counted as failures, they got grpc-down ejected: from the 5th
    // failure in a row each one ejected it again for twice as long, so
    // after 10 it is out for the 30 s cap, and every call goes to
    // grpc-good.
    const CALLS: usize = 30;
    let results = calls("grpc-pair", "sleep:100", CALLS);
    let good = results
        .iter()
        .filter(|r| r["ok"] == "grpc-good:sleep:100")
        .count();
    let unavailable = results
        .iter()
        .filter(|r| r["code"] == "UNAVAILABLE")
        .count();
    eprintln!("grpc-pair: {good} served by grpc-good, {unavailable} UNAVAILABLE");
    assert_eq!(good + unavailable, CALLS, "{results:?}");
    assert_eq!(unavailable, 0, "calls reached the ejected endpoint");
    mc.down();
}

#[test]
fn a_slow_endpoint_gets_a_smaller_share() {
    let mc = up();
    // ewma-slow answers /work after 50 ms, ewma-fast at once. P2C over two
    // endpoints compares both every time; once each latency is measured
    // (one request each), the slow one costs ~50 ms against a few ms and
    // loses while the requests are sequential (none in flight), except
    // when its estimate has decayed enough to be tried again. A uniform
    // pick (kube-proxy) would give it 50 %; < 30 % is far from both.
    const N: usize = 300;
    let responses = curl_many(&mc, &repeat("http://ewma.demo/work", N));
    let slow = responses
        .iter()
        .filter(|(s, b)| *s == 200 && b.ends_with("ewma-slow"))
        .count();
    let fast = responses
        .iter()
        .filter(|(s, b)| *s == 200 && b.ends_with("ewma-fast"))
        .count();
    eprintln!("ewma: slow {slow}, fast {fast} of {N}");
    assert_eq!(slow + fast, N);
    assert!(slow * 100 < N * 30, "slow endpoint got {slow} of {N}");
    mc.down();
}

/// A Server on the `vault` pods (deny by default) with two HTTPRoutes:
/// `status` (paths /status/…) for the `admin` account only, `hello` for
/// any meshed client. Clients on node-a, the server on node-b (HBONE: the
/// identity is verified).
const ROUTE_AUTHZ: &str = r#"
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
metadata: {name: admin, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: vault, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {nodeName: node-a, serviceAccountName: client, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: admin, namespace: demo}
spec: {nodeName: node-a, serviceAccountName: admin, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: any-mesh-client, namespace: demo}
spec: {identities: ["*"]}
---
apiVersion: v1
kind: Pod
metadata: {name: vault-grpc-1, namespace: demo, labels: {app: vault-grpc}}
spec:
  nodeName: node-b
  serviceAccountName: vault
  containers: [{name: main, command: [./grpc_echo.py, serve, "50051", vault-grpc-1], ports: [{containerPort: 50051}]}]
---
apiVersion: v1
kind: Service
metadata: {name: vault-grpc, namespace: demo}
spec: {selector: {app: vault-grpc}, ports: [{port: 50051, targetPort: 50051, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: vault-grpc, namespace: demo}
spec:
  podSelector: {matchLabels: {app: vault-grpc}}
  port: 50051
  accessPolicy: deny
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: policy.weft.io, kind: Server, name: vault-grpc}]
  rules: [{matches: [{path: {type: Exact, value: /weft.test.Echo/Echo}}]}]
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: stream, namespace: demo}
spec:
  parentRefs: [{group: policy.weft.io, kind: Server, name: vault-grpc}]
  rules: [{matches: [{path: {type: Exact, value: /weft.test.Echo/Stream}}]}]
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-for-admin, namespace: demo}
spec:
  targetRef: {group: policy.weft.io, kind: HTTPRoute, name: echo}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: admin}]
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: stream-for-all, namespace: demo}
spec:
  targetRef: {group: policy.weft.io, kind: HTTPRoute, name: stream}
  requiredAuthenticationRefs:
    - {group: policy.weft.io, kind: MeshTLSAuthentication, name: any-mesh-client}
"#;

/// Runs the gRPC client in `pod`; returns its JSON results.
fn grpc(mc: &MeshCluster, pod: &str, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["./grpc_echo.py"];
    argv.extend_from_slice(args);
    let out = mc.cluster().exec_ok(pod, &argv);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn route_level_authorization_decides_each_grpc_method() {
    let mc = MeshCluster::up(&[("c.yaml", ROUTE_AUTHZ)], |_| {});
    let node_b = mc.node_ip("node-b");

    // HTTP requests decided per route, and the routes-only client's
    // opaque connection, are tested in process (`authz_in_process.rs`).
    // gRPC, per method: the client may stream (every mesh client may) but
    // not call Echo (admin only): PERMISSION_DENIED, from the destination
    // proxy; admin may.
    let r = grpc(&mc, "demo/client", &["call", "vault-grpc.demo:50051", "hi"]);
    assert_eq!(r[0]["code"], "PERMISSION_DENIED", "{r}");
    let r = grpc(
        &mc,
        "demo/client",
        &["stream", "vault-grpc.demo:50051", "3"],
    );
    assert_eq!(r[2]["ok"], "vault-grpc-1:2", "{r}");
    let r = grpc(&mc, "demo/admin", &["call", "vault-grpc.demo:50051", "hi"]);
    assert_eq!(r[0]["ok"], "vault-grpc-1:hi", "{r}");
    wait_metric_sum(
        node_b,
        "weft_inbound_authz_denied_total",
        &[
            ("reason", "route_denied"),
            ("policy", "demo/echo"),
            ("server", "vault-grpc"),
        ],
        1.0,
    );

    mc.down();
}
