//! A mesh of node proxies inside the test process, on loopback: the real
//! CA (`weft_identity::testing::LocalCa`), views built by the destination
//! service's own index from ordinary manifests, real TLS and HBONE between
//! the nodes' proxies, applications as hyper servers on their pods'
//! addresses. What it leaves out is what only the simulator can show: eBPF
//! capture, network namespaces, the wire. No root needed.
//!
//! Every pod address is a loopback address (127.0.0.0/8 is all local on
//! Linux); each test file uses its own /24 so that test binaries can run at
//! once.

#![allow(dead_code)]

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_cert_manager::{
    CertManager, CertManagerConfig, CertManagerMetrics, GrpcCaClient, GrpcCaConfig,
    SharedTrustBundle, SpiffeId, TrustBundle,
};
use weft_destination::index::{self, EndpointsFrom, IndexConfig};
use weft_destination::source::manifests;
use weft_destination::store::{ClusterObjects, StoreUpdate};
use weft_destination_api::View;
use weft_destination_api::client::ConnectionState;
use weft_identity::authority::LeafPolicy;
use weft_identity::testing::{LocalCa, TestPod};
use weft_node_proxy::proxy::{ProxyInputs, inbound, outbound};
use weft_node_proxy::state::{ControlPlane, PodInfo};
use weft_node_proxy::telemetry::TcpMetrics;
use weft_node_proxy::testing::{LoopbackSockets, loopback_pod};
use weft_node_proxy::transport::{LocalPod, SocketFactory};

/// A running pod's manifest (a YAML document, `---` first), with what its kubelet would report: `ip` as
/// its address, Ready. `app`: its `app` label; `port`: its container port.
pub fn pod_yaml(
    namespace: &str,
    name: &str,
    node: &str,
    service_account: &str,
    ip: &str,
    app: Option<&str>,
    port: Option<u16>,
) -> String {
    let labels = app
        .map(|a| format!(", labels: {{app: {a}}}"))
        .unwrap_or_default();
    let ports = port
        .map(|p| format!(", ports: [{{containerPort: {p}}}]"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: {namespace}, uid: u-{name}{labels}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {service_account}, containers: [{{name: main, image: app{ports}}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

/// The view node `node` gets from the destination service for `manifests`
/// (pods carry their addresses in `status.podIP`).
pub fn view_of(yaml: &str, node: &str) -> View {
    let parsed = manifests::parse(Path::new("cluster.yaml"), yaml.as_bytes()).expect("YAML");
    assert!(
        parsed.rejections.is_empty(),
        "rejected: {:?}",
        parsed.rejections
    );
    let mut objects = ClusterObjects::default();
    for o in parsed.objects {
        objects.apply(StoreUpdate::Apply(o));
    }
    let config = IndexConfig {
        endpoints: EndpointsFrom::Selectors,
        cluster_networks: vec!["127.0.0.0/8".parse().expect("CIDR")],
        ..IndexConfig::default()
    };
    let index = index::build(&objects, &config);
    assert!(
        index.problems.is_empty(),
        "index problems: {:?}",
        index.problems
    );
    let mut view = View::default();
    view.apply(index.node_view(node).snapshot("in-process"))
        .expect("a snapshot applies");
    view
}

/// The pods of `yaml` as the CA must know them (namespace, name, service
/// account, node).
fn ca_pods(yaml: &str) -> Vec<TestPod> {
    let mut pods = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = serde_yaml::Value::deserialize(doc).expect("YAML");
        if v["kind"].as_str() == Some("Pod") {
            pods.push(TestPod::new(
                v["metadata"]["namespace"].as_str().unwrap_or("default"),
                v["metadata"]["name"].as_str().expect("pod name"),
                v["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default"),
                v["spec"]["nodeName"].as_str().expect("nodeName"),
            ));
        }
    }
    pods
}

/// A cluster of in-process node proxies.
pub struct InProcessMesh {
    pub ca: LocalCa,
    nodes: HashMap<String, Node>,
    tasks: Vec<JoinHandle<()>>,
}

/// One node's proxy: its inputs and its view.
pub struct Node {
    pub inputs: ProxyInputs,
    view: watch::Sender<View>,
    pub registry: Registry,
}

impl InProcessMesh {
    pub async fn start(yaml: &str) -> Self {
        let pods = ca_pods(yaml);
        let ca = LocalCa::start(LeafPolicy::new("cluster.local"), &pods)
            .await
            .expect("the CA starts");
        let mut nodes = HashMap::new();
        let mut names: Vec<&str> = pods.iter().map(|p| p.node.as_str()).collect();
        names.sort();
        names.dedup();
        for node in names {
            nodes.insert(
                node.to_string(),
                Node::start(&ca, node, view_of(yaml, node)),
            );
        }
        Self {
            ca,
            nodes,
            tasks: Vec::new(),
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    /// The workload `namespace/name` in node `node`'s view, and its first
    /// address.
    fn workload(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
    ) -> (weft_destination_api::Workload, Option<std::net::IpAddr>) {
        let view = self.nodes[node].view.borrow().clone();
        let w = view
            .workloads
            .values()
            .find(|w| w.namespace == namespace && w.name == name)
            .unwrap_or_else(|| panic!("no workload {namespace}/{name} in {node}'s view"))
            .as_ref()
            .clone();
        let ip = w
            .addresses
            .iter()
            .find_map(|a| weft_destination_api::address::decode(a));
        (w, ip)
    }

    /// The pod `namespace/name` of node `node`, as its node proxy serves
    /// it: HBONE on `podIP:15008` for an enrolled pod, and an outbound
    /// listener per destination ([`MeshPod::outbound_to`]).
    pub fn pod(&mut self, node: &str, namespace: &str, name: &str) -> MeshPod {
        let n = &self.nodes[node];
        let (w, ip) = self.workload(node, namespace, name);
        let identity: Option<SpiffeId> = w.identity.parse().ok();
        let (pod, sockets) = loopback_pod(PodInfo {
            namespace: namespace.into(),
            name: name.into(),
            uid: w.uid.clone(),
            identity: identity.clone().filter(|_| w.enrolled),
            ip,
            other_ip: None,
            workload_uid: Some(w.uid.clone()),
        });
        if let (true, Some(identity), Some(ip)) = (w.enrolled, &identity, ip) {
            let cp = n.inputs.control_plane.as_ref().expect("a control plane");
            cp.certs.register_pod(identity);
            let listener = TcpListener::from_std(
                pod.sockets
                    .listen(SocketAddr::new(ip, weft_hbone::HBONE_PORT))
                    .expect("HBONE listener"),
            )
            .expect("tokio listener");
            self.tasks.push(tokio::spawn(inbound::serve_hbone(
                listener,
                pod.clone(),
                n.inputs.clone(),
            )));
        }
        MeshPod {
            pod,
            sockets,
            inputs: n.inputs.clone(),
        }
    }

    /// A change of the cluster: every node gets its view of `yaml`, and
    /// its proxy re-checks the connections it admitted (as `main.rs` does
    /// for each new snapshot). Returns once every node decides with it.
    pub async fn change(&self, yaml: &str) {
        for (name, node) in &self.nodes {
            let before = node.inputs.snapshot();
            let view = view_of(yaml, name);
            node.view.send_replace(view.clone());
            tokio::time::timeout(Duration::from_secs(30), async {
                while Arc::ptr_eq(&node.inputs.snapshot(), &before) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the node's snapshot follows its view");
            node.inputs.authz.revalidate(Some(&view));
        }
    }

    /// The CA's trust bundle gains an anchor, as the first step of a
    /// rotation; returns once every node proxy has the new bundle (each
    /// learns it from its own stream, at its own moment).
    pub async fn add_trust_anchor(&self) {
        let certs = |n: &Node| n.inputs.control_plane.as_ref().unwrap().certs.clone();
        let any = self.nodes.values().next().expect("a node");
        let anchors = certs(any).trust_bundle().borrow().certificates().len();
        let extra = weft_identity::init::trust_anchor(
            "cluster.local",
            "next",
            Duration::from_secs(365 * 24 * 3600),
        )
        .unwrap();
        weft_identity::init::write_anchors(&self.ca.ca_dir(), &[&self.ca.anchor, &extra]).unwrap();
        for node in self.nodes.values() {
            let mut bundle = certs(node).trust_bundle();
            tokio::time::timeout(
                Duration::from_secs(30),
                bundle.wait_for(|b| b.certificates().len() == anchors + 1),
            )
            .await
            .expect("the new bundle reaches the node proxy")
            .unwrap();
        }
    }

    /// Like [`InProcessMesh::pod`], with the HBONE listener of a node proxy
    /// from before requests without a tunnel: TLS with the pod's
    /// certificate offering only the tunnels' ALPN protocol, each CONNECT
    /// spliced to its target.
    pub fn pod_behind_an_older_proxy(&mut self, node: &str, namespace: &str, name: &str) {
        let n = &self.nodes[node];
        let (w, ip) = self.workload(node, namespace, name);
        let identity: SpiffeId = w.identity.parse().expect("an identity");
        let ip = ip.expect("an address");
        let certs = n
            .inputs
            .control_plane
            .as_ref()
            .expect("a control plane")
            .certs
            .clone();
        certs.register_pod(&identity);
        let listener = std::net::TcpListener::bind(SocketAddr::new(ip, weft_hbone::HBONE_PORT))
            .expect("HBONE listener");
        listener.set_nonblocking(true).expect("non-blocking");
        self.tasks.push(tokio::spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            let config = certs.server_config(&identity).await.expect("a certificate");
            assert_eq!(config.alpn_protocols, vec![weft_hbone::HBONE_ALPN.to_vec()]);
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = weft_hbone::serve_connection(
                        tls,
                        |request: weft_hbone::HboneRequest| async move {
                            let Ok(mut app) = tokio::net::TcpStream::connect(request.target).await
                            else {
                                request.reject_unprocessed();
                                return;
                            };
                            if let Ok(mut stream) = request.accept() {
                                let _ = tokio::io::copy_bidirectional(&mut stream, &mut app).await;
                            }
                        },
                        std::future::pending(),
                    )
                    .await;
                });
            }
        }));
    }
}

impl Drop for InProcessMesh {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Node {
    fn start(ca: &LocalCa, node: &str, view: View) -> Self {
        let bundle = SharedTrustBundle::new(
            TrustBundle::from_pem("cluster.local", &ca.anchors_pem()).expect("anchors"),
        );
        let client = GrpcCaClient::new(
            GrpcCaConfig {
                address: ca.addr().to_string(),
                server_name: "localhost".into(),
                token_file: ca.token_file(node),
                request_timeout: Duration::from_secs(5),
            },
            bundle.watch(),
        )
        .expect("CA client");
        let mut registry = Registry::default();
        let metrics = CertManagerMetrics::register(&mut registry);
        let certs = CertManager::new(
            Arc::new(client),
            bundle,
            CertManagerConfig::default(),
            metrics,
        );
        // As main.rs does: the bundle follows the CA's stream.
        certs.start_trust_bundle_watch();
        let (tx, rx) = watch::channel(view);
        let (_state_tx, state) = watch::channel(ConnectionState::Connected);
        let control_plane = ControlPlane::new(rx, state, certs, None);
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let inputs = ProxyInputs::new(tcp, Some(control_plane));
        inputs.request_metrics.register(&mut registry);
        inputs.authz.metrics().register(&mut registry);
        Self {
            inputs,
            view: tx,
            registry,
        }
    }

    /// The node's metrics as Prometheus text.
    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text
    }
}

/// A pod served by an in-process node proxy.
pub struct MeshPod {
    pub pod: Arc<LocalPod>,
    sockets: Arc<LoopbackSockets>,
    inputs: ProxyInputs,
}

impl MeshPod {
    /// The address the pod's application connects to in order to reach
    /// `dst` through its node proxy (what the eBPF redirection does on a
    /// node): a listener of the proxy's outbound side for that destination.
    pub fn outbound_to(&self, dst: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
        let std = self
            .sockets
            .listen("127.0.0.1:0".parse().unwrap())
            .expect("outbound listener");
        let addr = std.local_addr().expect("local addr");
        self.sockets.redirect(addr, dst);
        let listener = TcpListener::from_std(std).expect("tokio listener");
        let task = tokio::spawn(outbound::serve(
            listener,
            self.pod.clone(),
            self.inputs.clone(),
        ));
        (addr, task)
    }
}

/// An HTTP/1.1 and HTTP/2 application on `addr`, answering with `handle`.
pub async fn serve_app<F, Fut>(addr: SocketAddr, handle: F) -> JoinHandle<()>
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<AppBody>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await.expect("app listens");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

/// What an application answers with: whole, or streamed.
pub type AppBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A plain-text response.
pub fn text(status: u16, body: impl Into<Bytes>) -> http::Response<AppBody> {
    let mut r = http::Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
    r
}

/// A response whose body is `first`, then whatever `rest` sends (a
/// channel: a stalled or slow body).
pub fn streamed(
    first: &'static str,
) -> (http::Response<AppBody>, tokio::sync::mpsc::Sender<Bytes>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let stream = futures::stream::once(async move { Ok(Bytes::from_static(first.as_bytes())) })
        .chain(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|b| b.map(Ok))
        }))
        .map(|r: Result<Bytes, std::io::Error>| r.map(hyper::body::Frame::data));
    let body = BodyExt::boxed(http_body_util::StreamBody::new(stream));
    (http::Response::new(body), tx)
}

/// A request with a streamed body (HTTP/1.1 chunked: no Content-Length)
/// through `via`, one connection per request; the status and body.
pub async fn post_chunked(via: SocketAddr, host: &str, path: &str, body: Bytes) -> (u16, Bytes) {
    let tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    // Two pieces, so the length is not known up front.
    let half = body.len() / 2;
    let pieces = vec![body.slice(..half), body.slice(half..)];
    let stream = futures::stream::iter(
        pieces
            .into_iter()
            .map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b))),
    );
    let req = http::Request::post(path)
        .header(http::header::HOST, host)
        .body(http_body_util::StreamBody::new(stream))
        .expect("request");
    let resp = send.send_request(req).await.expect("a response");
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("whole body")
        .to_bytes();
    (status, body)
}

/// A GET through `via` (a pod's outbound listener) with HTTP/1.1, one
/// connection per request as curl does; returns the status and body.
pub async fn get(via: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(via).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    get_on(&mut send, host, path).await
}

/// A GET on an open HTTP/1.1 connection (once it is ready for the next
/// request); returns the status and body (status 0 and the error when it
/// failed).
pub async fn get_on(
    send: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
    host: &str,
    path: &str,
) -> (u16, String) {
    if let Err(e) = send.ready().await {
        return (0, e.to_string());
    }
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    match send.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            (
                status,
                String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
            )
        }
        Err(e) => (0, e.to_string()),
    }
}

/// The value of one series in Prometheus text, `None` when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .expect("a value")
        })
        .reduce(|a, b| a + b)
}
