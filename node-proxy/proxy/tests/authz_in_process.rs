//! Route-level authorization in the destination node proxy, in process (no
//! root): each request on an admitted connection is decided by the
//! Server's routes and their AuthorizationPolicies, with the client's
//! verified identity from HBONE; a client admitted for routes only cannot
//! get an opaque splice. The gRPC half (a real grpcio client) stays on the
//! simulator (`e2e/tests/routes.rs`).

mod in_process;

use bytes::Bytes;
use in_process::{InProcessMesh, get, metric, pod_yaml, serve_app, text};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: demo}
spec: {clusterIP: 10.96.32.1, selector: {app: vault}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: vault-http, namespace: demo}
spec:
  podSelector: {matchLabels: {app: vault}}
  port: 8080
  accessPolicy: deny
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: status, namespace: demo}
spec:
  parentRefs: [{group: policy.weft.io, kind: Server, name: vault-http}]
  rules: [{matches: [{path: {type: PathPrefix, value: /status}}]}]
---
apiVersion: policy.weft.io/v1alpha1
kind: HTTPRoute
metadata: {name: hello, namespace: demo}
spec:
  parentRefs: [{group: policy.weft.io, kind: Server, name: vault-http}]
  rules: [{matches: [{path: {type: PathPrefix, value: /hello}}]}]
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: status-for-admin, namespace: demo}
spec:
  targetRef: {group: policy.weft.io, kind: HTTPRoute, name: status}
  requiredAuthenticationRefs: [{kind: ServiceAccount, name: admin}]
---
apiVersion: policy.weft.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: any-mesh-client, namespace: demo}
spec: {identities: ["*"]}
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: hello-for-all, namespace: demo}
spec:
  targetRef: {group: policy.weft.io, kind: HTTPRoute, name: hello}
  requiredAuthenticationRefs:
    - {group: policy.weft.io, kind: MeshTLSAuthentication, name: any-mesh-client}
"#;

const VAULT: &str = "10.96.32.1:80";

/// `CLUSTER` with its pods on `127.32.<subnet>.0/24`: `client` and `admin`
/// on node-a, `vault-1` (the application, on 8080) on node-b.
fn cluster(subnet: u8) -> String {
    let mut cluster = CLUSTER.to_string();
    let ip = |host: u8| format!("127.32.{subnet}.{host}");
    for (name, node, sa, host, app, port) in [
        ("client", "node-a", "client", 2, None, None),
        ("admin", "node-a", "admin", 3, None, None),
        ("vault-1", "node-b", "vault", 4, Some("vault"), Some(8080)),
    ] {
        cluster.push_str(&pod_yaml("demo", name, node, sa, &ip(host), app, port));
    }
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_level_authorization_decides_each_request() {
    let mut mesh = InProcessMesh::start(&cluster(1)).await;
    serve_app(
        "127.32.1.4:8080".parse().unwrap(),
        |req: http::Request<_>| async move {
            let path = req.uri().path().trim_matches('/').to_string();
            match path.split('/').collect::<Vec<_>>().as_slice() {
                ["hello"] => text(200, "hello from vault-1"),
                ["status", code] => text(
                    code.parse().unwrap_or(400),
                    format!("status {code} from vault-1"),
                ),
                _ => text(200, Bytes::from_static(b"anything else")),
            }
        },
    )
    .await;
    mesh.pod("node-b", "demo", "vault-1");
    let admin = mesh.pod("node-a", "demo", "admin");
    let client = mesh.pod("node-a", "demo", "client");
    let (as_admin, _) = admin.outbound_to(VAULT.parse().unwrap());
    let (as_client, _) = client.outbound_to(VAULT.parse().unwrap());

    // admin: authorized on `status` (by its policy) and on `hello`.
    let r = get(as_admin, "vault.demo", "/status/200").await;
    assert_eq!((r.0, r.1.as_str()), (200, "status 200 from vault-1"));
    let r = get(as_admin, "vault.demo", "/hello").await;
    assert_eq!((r.0, r.1.as_str()), (200, "hello from vault-1"));
    // client: nothing on the Server authorizes it (accessPolicy deny), but
    // the `hello` route does: the connection is admitted, `hello` answers,
    // and `status` is refused per request by the destination proxy.
    let r = get(as_client, "vault.demo", "/hello").await;
    assert_eq!((r.0, r.1.as_str()), (200, "hello from vault-1"));
    let (code, body) = get(as_client, "vault.demo", "/status/200").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("demo/status"), "refused by the route: {body}");
    // A path no route of the Server matches: 404 (the application would
    // have answered 200).
    let (code, body) = get(as_admin, "vault.demo", "/delay/1").await;
    assert_eq!(code, 404, "{body}");

    // The client is admitted for routes only: a connection that is not
    // HTTP could not be checked request by request, so the destination
    // proxy refuses it instead of splicing it to the application.
    let mut opaque = tokio::net::TcpStream::connect(as_client).await.unwrap();
    opaque
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0x00])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), opaque.read(&mut buf))
        .await
        .expect("the proxy ends the connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "no byte of the application comes back: {read:?}"
    );

    // Counted per request with the route's policy (allowed) or the route
    // that refused (denied); the opaque connection as routes_only_opaque.
    let b = mesh.node("node-b").metrics();
    let authz = |which: &str, labels: &[(&str, &str)]| {
        metric(&b, &format!("weft_inbound_authz_{which}_total"), labels).unwrap_or(0.0)
    };
    assert_eq!(
        authz(
            "denied",
            &[
                ("reason", "route_denied"),
                ("policy", "demo/status"),
                ("server", "vault-http")
            ]
        ),
        1.0
    );
    assert_eq!(
        authz(
            "allowed",
            &[
                ("reason", "route_authorized"),
                ("policy", "demo/status-for-admin")
            ]
        ),
        1.0
    );
    assert_eq!(
        authz(
            "allowed",
            &[
                ("reason", "route_authorized"),
                ("policy", "demo/hello-for-all")
            ]
        ),
        2.0
    );
    assert_eq!(
        authz(
            "denied",
            &[
                ("reason", "routes_only_opaque"),
                ("destination_workload", "vault-1")
            ]
        ),
        1.0
    );
    // The client's connections were admitted at L4 for routes only.
    assert!(authz("allowed", &[("reason", "routes_only")]) >= 1.0, "{b}");
    // The destination side's request metrics carry the route.
    assert_eq!(
        metric(
            &b,
            "weft_requests_total",
            &[
                ("reporter", "destination"),
                ("route", "demo/status"),
                ("status_code", "403")
            ]
        ),
        Some(1.0)
    );
}

/// #15: a client allowed only `/hello` reaches nothing of `/status` by
/// spelling it differently. Dot segments, their encodings and repeated
/// slashes are one path (`/status/…`, refused by its route: 403); an
/// encoded `/` is ambiguous and refused outright (400). The application
/// never sees a `/status` request from that client, and a client that is
/// allowed gets the normal spelling forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_a_guarded_path_reach_no_other_route() {
    use std::sync::{Arc, Mutex};
    let mut mesh = InProcessMesh::start(&cluster(2)).await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    serve_app(
        "127.32.2.4:8080".parse().unwrap(),
        move |req: http::Request<_>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(req.uri().path().to_string());
                text(200, format!("vault-1 saw {}", req.uri().path()))
            }
        },
    )
    .await;
    mesh.pod("node-b", "demo", "vault-1");
    let admin = mesh.pod("node-a", "demo", "admin");
    let client = mesh.pod("node-a", "demo", "client");
    let (as_admin, _) = admin.outbound_to(VAULT.parse().unwrap());
    let (as_client, _) = client.outbound_to(VAULT.parse().unwrap());

    for (spelling, want) in [
        ("/hello/../status/200", 403),
        ("/hello/%2e%2e/status/200", 403),
        ("/hello/%2E%2E/status/200", 403),
        ("/hello/.%2e/status/200", 403),
        ("//status/200", 403),
        ("/hello/..%2fstatus/200", 400),
        ("/hello/%2e%2e%2fstatus/200", 400),
    ] {
        let (code, body) = get(as_client, "vault.demo", spelling).await;
        assert_eq!(code, want, "{spelling}: {body}");
    }
    // Positive controls: the client's own route answers, and the admin
    // reaches `/status` however it spells it, the application getting the
    // normal spelling.
    let (code, body) = get(as_client, "vault.demo", "/hello").await;
    assert_eq!((code, body.as_str()), (200, "vault-1 saw /hello"));
    let (code, body) = get(as_admin, "vault.demo", "/hello/%2e%2e//status/200").await;
    assert_eq!((code, body.as_str()), (200, "vault-1 saw /status/200"));
    assert_eq!(
        *seen.lock().unwrap(),
        ["/hello", "/status/200"],
        "what the application received"
    );
}

/// #15: a client authorized per route cannot turn its connection into a
/// byte stream past the routes: an `Upgrade: h2c` on an allowed route is
/// refused (403) before the application sees it, a WebSocket upgrade of an
/// allowed route is forwarded (the application decides); a late first byte
/// or an over-long request line (both opaque to detection) gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_authorized_per_route_gets_no_byte_stream_past_the_routes() {
    use std::sync::{Arc, Mutex};
    let mut mesh = InProcessMesh::start(&cluster(3)).await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    serve_app(
        "127.32.3.4:8080".parse().unwrap(),
        move |req: http::Request<_>| {
            let log = log.clone();
            async move {
                let upgrade = req
                    .headers()
                    .get("upgrade")
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .unwrap_or_default();
                log.lock().unwrap().push(upgrade);
                // Declines every upgrade: the proxy's decision is what the
                // test looks at.
                text(200, "no upgrade")
            }
        },
    )
    .await;
    mesh.pod("node-b", "demo", "vault-1");
    let client = mesh.pod("node-a", "demo", "client");
    let (as_client, _) = client.outbound_to(VAULT.parse().unwrap());

    let status_of = |upgrade: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(as_client).await.unwrap();
        let request = format!(
            "GET /hello HTTP/1.1\r\nHost: vault.demo\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed without an answer");
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        head.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    assert_eq!(status_of("h2c").await, 403);
    assert_eq!(status_of("websocket").await, 200);

    // Nor by the way it is delivered: a request whose first byte comes
    // after the detection timeout, or whose request line is longer than
    // detection reads, is not HTTP to the proxy; it would be spliced as
    // bytes, which a client authorized per route may not get.
    let unanswered = |first: Duration, request: String| async move {
        let mut tcp = tokio::net::TcpStream::connect(as_client).await.unwrap();
        // Provokes the timeout (a lower bound: a slow machine only makes
        // it more certain).
        tokio::time::sleep(first).await;
        let _ = tcp.write_all(request.as_bytes()).await;
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf))
            .await
            .expect("the proxy ends the connection");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "no byte of the application comes back: {read:?} {:?}",
            String::from_utf8_lossy(&buf)
        );
    };
    let late = "GET /status/200 HTTP/1.1\r\nHost: vault.demo\r\n\r\n".to_string();
    unanswered(weft_stream::DETECT_TIMEOUT * 2, late).await;
    let long = format!(
        "GET /hello?{} HTTP/1.1\r\nHost: vault.demo\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    unanswered(Duration::ZERO, long).await;
    assert_eq!(
        *seen.lock().unwrap(),
        ["websocket"],
        "the application saw the WebSocket upgrade only"
    );
}
