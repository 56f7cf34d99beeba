//! The node proxy's own HBONE listener (15008), in process: TLS with the
//! pod's certificate from the real CA, the client's SPIFFE identity
//! verified against the mesh's trust bundle, the CONNECT target checked
//! against the pod. `hbone.rs` tests the tunnel crate alone.

mod in_process;

use in_process::{InProcessMesh, pod_yaml, serve_app, text};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_cert_manager::{SpiffeId, SpiffeServerVerifier};
use weft_hbone::{HboneError, HbonePool, PoolConfig};
use weft_node_proxy::transport::{TunnelKey, tunnel_connector};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
"#;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";
const PATIENCE: Duration = Duration::from_secs(30);

/// Pods on `127.33.<subnet>.0/24` (one subnet per test: they run at once).
async fn start(subnet: u8) -> (InProcessMesh, in_process::MeshPod) {
    let mut cluster = CLUSTER.to_string();
    let ip = |host: u8| format!("127.33.{subnet}.{host}");
    for (name, node, sa, host, app) in [
        ("client", "node-a", "client", 2, None),
        ("server-0", "node-b", "server", 3, Some("server")),
        ("other-0", "node-b", "server", 4, Some("other")),
    ] {
        cluster.push_str(&pod_yaml(
            "demo",
            name,
            node,
            sa,
            &ip(host),
            app,
            Some(8080),
        ));
    }
    let mut mesh = InProcessMesh::start(&cluster).await;
    for host in [3, 4] {
        let addr: SocketAddr = format!("{}:8080", ip(host)).parse().unwrap();
        serve_app(addr, move |_req| async move {
            text(200, format!("hello from {}", addr.ip()))
        })
        .await;
    }
    mesh.pod("node-b", "demo", "server-0");
    mesh.pod("node-b", "demo", "other-0");
    let client = mesh.pod("node-a", "demo", "client");
    (mesh, client)
}

/// A tunnel pool of node-a's proxy, as the client pod's, and the key of a
/// tunnel to server-0's listener (`127.33.<subnet>.3:15008`).
fn client_tunnels(
    mesh: &InProcessMesh,
    client: &in_process::MeshPod,
    subnet: u8,
) -> (HbonePool<TunnelKey>, SocketAddr, TunnelKey) {
    let certs = mesh
        .node("node-a")
        .inputs
        .control_plane
        .as_ref()
        .unwrap()
        .certs
        .clone();
    let pool = HbonePool::new(PoolConfig::default(), tunnel_connector(certs));
    let tunnel: SocketAddr = format!("127.33.{subnet}.3:15008").parse().unwrap();
    let key = TunnelKey {
        pod: client.pod.clone(),
        source: CLIENT.parse().unwrap(),
        destination: SERVER.parse().unwrap(),
        tunnel,
    };
    (pool, tunnel, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_reaches_only_its_own_pod() {
    let (mesh, client) = start(1).await;
    let (pool, tunnel, key) = client_tunnels(&mesh, &client, 1);
    // To the pod behind the listener: a stream to its application.
    let mut stream = tokio::time::timeout(
        PATIENCE,
        pool.open_with(
            key.clone(),
            tunnel,
            "127.33.1.3:8080".parse().unwrap(),
            None,
        ),
    )
    .await
    .expect("answered")
    .expect("a stream to the pod's own port");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.ends_with("hello from 127.33.1.3"), "{answer}");

    // Through server-0's listener to another pod of the node (same
    // identity, so TLS alone would pass): refused with 403, and nothing
    // reaches that pod.
    let refused = tokio::time::timeout(
        PATIENCE,
        pool.open_with(key, tunnel, "127.33.1.4:8080".parse().unwrap(), None),
    )
    .await
    .expect("answered");
    match refused {
        Err(HboneError::Refused { status, .. }) => assert_eq!(status, 403),
        other => panic!("want a 403 refusal, got {:?}", other.map(|_| "a stream")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_gets_no_tunnel() {
    let (mesh, _client) = start(2).await;
    let certs = mesh
        .node("node-a")
        .inputs
        .control_plane
        .as_ref()
        .unwrap()
        .certs
        .clone();
    // The server is verified as a mesh client would (its SPIFFE ID under
    // the mesh's bundle), but the client presents no certificate.
    let server: SpiffeId = SERVER.parse().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            certs.trust_bundle(),
            server,
        )))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect("127.33.2.3:15008")
        .await
        .unwrap();
    let outcome = tokio::time::timeout(PATIENCE, async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("127.33.2.3".try_into().unwrap(), tcp)
            .await?;
        // TLS 1.3: the server judges the client's (missing) certificate
        // after the client's side of the handshake; its answer is an alert.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    })
    .await
    .expect("the listener answers at once");
    let e = outcome.expect_err("no tunnel without a client certificate");
    assert!(
        e.to_string().contains("CertificateRequired"),
        "refused for the missing certificate: {e}"
    );
}

/// #15: a tunnel to a port of the proxy itself (15006, 15008, 15001, …)
/// would make the destination proxy connect to itself, again and again,
/// and one to 15008 would launder the client's address: refused with 403
/// before anything is connected or counted; the pod's own port still
/// answers (the positive control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_the_proxys_own_ports_is_refused() {
    let (mesh, client) = start(3).await;
    let (pool, tunnel, key) = client_tunnels(&mesh, &client, 3);
    for port in weft_node_proxy::proxy::PROXY_PORTS {
        let target: SocketAddr = format!("127.33.3.3:{port}").parse().unwrap();
        let refused =
            tokio::time::timeout(PATIENCE, pool.open_with(key.clone(), tunnel, target, None))
                .await
                .expect("answered");
        match refused {
            Err(HboneError::Refused { status, .. }) => assert_eq!(status, 403, "{target}"),
            other => panic!(
                "{target}: want a 403 refusal, got {:?}",
                other.map(|_| "a stream")
            ),
        }
    }
    let opened = || {
        in_process::metric(
            &mesh.node("node-b").metrics(),
            "weft_tcp_connections_opened_total",
            &[("reporter", "destination")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(opened(), 0.0, "nothing was connected for the refusals");
    let mut stream = tokio::time::timeout(
        PATIENCE,
        pool.open_with(key, tunnel, "127.33.3.3:8080".parse().unwrap(), None),
    )
    .await
    .expect("answered")
    .expect("a stream to the pod's own port");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.ends_with("hello from 127.33.3.3"), "{answer}");
    assert_eq!(opened(), 1.0);
}

/// #15: a pooled tunnel does not outlive the trust bundle it was verified
/// under. When the CA adds (or retires) an anchor, the source proxy takes
/// its tunnels out of use and the destination proxy sends GOAWAY on them
/// (either alone passes this test; with neither it fails); the next
/// connection makes a new tunnel, verified under the new bundle, and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_made_again_when_the_trust_bundle_changes() {
    let (mesh, client) = start(4).await;
    let node_a = &mesh.node("node-a").inputs;
    let pool = node_a.tunnels.clone().expect("a tunnel pool");
    let (via, _) = client.outbound_to("127.33.4.3:8080".parse().unwrap());
    let hello = || async {
        let mut tcp = tokio::net::TcpStream::connect(via).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = tcp.read_to_string(&mut answer).await;
        answer
    };
    assert!(hello().await.ends_with("hello from 127.33.4.3"));
    assert_eq!(pool.connections(), 1);

    // The CA's bundle gains an anchor, as the first step of a rotation,
    // and both proxies learn it (a tunnel made before the destination
    // learnt it would be sent a GOAWAY once it does, and be made again).
    mesh.add_trust_anchor().await;
    // Retired by the proxy's bundle follower (a task of its own).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while pool.connections() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old tunnel is retired"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hello().await.ends_with("hello from 127.33.4.3"));
    assert_eq!(pool.connections(), 1, "a new tunnel, under the new bundle");
}
