//! A two-node mesh on loopback for the rotation tests: a real CA
//! (`weft_identity::testing::LocalCa`), one CertManager per node talking to it
//! over gRPC/TLS, and a TLS echo server/client pair using the manager's
//! rustls configs, counting every failed handshake.

#![allow(dead_code)]

use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_cert_manager::metrics::RefreshLabels;
use weft_cert_manager::{
    CertManager, CertManagerConfig, CertManagerMetrics, GrpcCaClient, GrpcCaConfig,
    SharedTrustBundle, SpiffeId, TrustBundle, peer_identity,
};
use weft_identity::authority::LeafPolicy;
use weft_identity::testing::{LocalCa, TestPod};

pub const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
pub const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

pub fn client_id() -> SpiffeId {
    CLIENT.parse().unwrap()
}

pub fn server_id() -> SpiffeId {
    SERVER.parse().unwrap()
}

pub async fn start_ca(ttl: Duration) -> LocalCa {
    let mut policy = LeafPolicy::new("cluster.local");
    policy.ttl = ttl;
    policy.clock_skew = Duration::from_secs(1);
    LocalCa::start(
        policy,
        &[
            TestPod::new("demo", "client-0", "client", "node-a"),
            TestPod::new("demo", "server-0", "server", "node-b"),
        ],
    )
    .await
    .expect("CA starts")
}

/// One node proxy's identity side.
pub struct Node {
    pub manager: CertManager,
    pub metrics: CertManagerMetrics,
    pub registry: Registry,
}

impl Node {
    pub fn new(ca: &LocalCa, node: &str) -> Self {
        Self::with_refresh_window(ca, node, CertManagerConfig::default().refresh_window)
    }

    pub fn with_refresh_window(ca: &LocalCa, node: &str, refresh_window: (f64, f64)) -> Self {
        let bundle = SharedTrustBundle::new(
            TrustBundle::from_pem("cluster.local", &ca.anchors_pem()).unwrap(),
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
        .unwrap();
        let mut registry = Registry::default();
        let metrics = CertManagerMetrics::register(&mut registry);
        let config = CertManagerConfig {
            refresh_window,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            ..CertManagerConfig::default()
        };
        let manager = CertManager::new(Arc::new(client), bundle, config, metrics.clone());
        manager.start_trust_bundle_watch();
        Self {
            manager,
            metrics,
            registry,
        }
    }

    pub fn refreshes(&self, identity: &str, result: &'static str) -> u64 {
        self.metrics
            .refreshes
            .get_or_create(&RefreshLabels {
                identity: identity.into(),
                result,
            })
            .get()
    }

    /// DER of the issuer of the certificate now held for `identity`.
    pub fn issuer_of(&self, identity: &SpiffeId) -> Option<Vec<u8>> {
        let cert = self.manager.current_certificate(identity)?;
        cert.chain().get(1).map(|c| c.to_vec())
    }

    pub fn anchors(&self) -> usize {
        self.manager.trust_bundle().borrow().certificates().len()
    }
}

/// What the traffic saw.
#[derive(Default)]
pub struct Observed {
    pub ok: AtomicUsize,
    pub failed: AtomicUsize,
    pub server_failed: AtomicUsize,
    pub errors: Mutex<Vec<String>>,
    /// Serials of the certificates each side presented.
    pub client_serials: Mutex<BTreeSet<Vec<u8>>>,
    pub server_serials: Mutex<BTreeSet<Vec<u8>>>,
    /// Issuers (DER) of the client certificates the server saw.
    pub client_issuers: Mutex<BTreeSet<Vec<u8>>>,
}

impl Observed {
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    pub fn assert_clean(&self) {
        let errors = self.errors.lock().unwrap();
        assert_eq!(
            self.failed.load(Ordering::SeqCst) + self.server_failed.load(Ordering::SeqCst),
            0,
            "failed handshakes/exchanges: {errors:?}"
        );
        assert!(self.ok.load(Ordering::SeqCst) > 0, "no traffic at all");
    }
}

fn serial(cert: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(cert).unwrap();
    c.raw_serial().to_vec()
}

/// An mTLS echo server for `server_id` on node-b: it answers with the
/// client's authenticated identity.
pub async fn start_server(
    node: &Node,
    observed: Arc<Observed>,
) -> (std::net::SocketAddr, JoinHandle<()>) {
    let config = node.manager.server_config(&server_id()).await.unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let observed = observed.clone();
            tokio::spawn(async move {
                let result = async {
                    let mut tls = acceptor
                        .accept(tcp)
                        .await
                        .map_err(|e| format!("server handshake: {e}"))?;
                    let (_, conn) = tls.get_ref();
                    let peer = peer_identity(conn).ok_or("no peer identity")?;
                    let certs = conn.peer_certificates().ok_or("no peer certs")?;
                    observed
                        .client_serials
                        .lock()
                        .unwrap()
                        .insert(serial(&certs[0]));
                    if let Some(issuer) = certs.get(1) {
                        observed
                            .client_issuers
                            .lock()
                            .unwrap()
                            .insert(issuer.to_vec());
                    }
                    let mut line = String::new();
                    BufReader::new(&mut tls)
                        .read_line(&mut line)
                        .await
                        .map_err(|e| e.to_string())?;
                    tls.write_all(format!("hello {peer}\n").as_bytes())
                        .await
                        .map_err(|e| e.to_string())?;
                    tls.shutdown().await.map_err(|e| e.to_string())?;
                    Ok::<_, String>(())
                }
                .await;
                if let Err(e) = result {
                    observed.server_failed.fetch_add(1, Ordering::SeqCst);
                    observed.errors.lock().unwrap().push(e);
                }
            });
        }
    });
    (addr, task)
}

/// Connects from `client_id` on node-a to the server, again and again,
/// until `stop` is set or `max` attempts; each exchange must prove both
/// identities.
pub fn start_client(
    connector: TlsConnector,
    addr: std::net::SocketAddr,
    observed: Arc<Observed>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for _ in 0..100_000 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let name = rustls_pki_types::ServerName::try_from("mesh.invalid").unwrap();
                let mut tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("client handshake: {e}"))?;
                let server_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .ok_or("no server cert")?[0]
                    .to_vec();
                tls.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
                let mut line = String::new();
                BufReader::new(&mut tls)
                    .read_line(&mut line)
                    .await
                    .map_err(|e| e.to_string())?;
                if line.trim() != format!("hello {CLIENT}") {
                    return Err(format!("unexpected reply {line:?}"));
                }
                observed
                    .server_serials
                    .lock()
                    .unwrap()
                    .insert(serial(&server_cert));
                Ok::<_, String>(())
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match attempt {
                Ok(()) => {
                    observed.ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    observed.failed.fetch_add(1, Ordering::SeqCst);
                    observed.errors.lock().unwrap().push(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// How long a test waits for something that should happen within seconds:
/// generous, because a deadline is only hit when the test fails anyway.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Waits (bounded) until `cond` holds; panics with `what` otherwise.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything a rotation test needs running: the CA, both nodes, server and
/// client traffic.
pub struct Mesh {
    pub ca: LocalCa,
    pub node_a: Node,
    pub node_b: Node,
    pub observed: Arc<Observed>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Leaves for [`Mesh::start`]: long enough that no delay on a loaded
/// machine lets one expire during a test (an expiry would be a failed
/// handshake the test did not mean to provoke), ...
pub const LEAF_TTL: Duration = Duration::from_secs(120);
/// ... renewed early in their life, so that they roll over every 2.4-4.8 s:
/// rotation is exercised as often as with short-lived certificates, without
/// a race against their expiry.
pub const REFRESH_WINDOW: (f64, f64) = (0.02, 0.04);

impl Mesh {
    pub async fn start() -> Self {
        let ca = start_ca(LEAF_TTL).await;
        let node_a = Node::with_refresh_window(&ca, "node-a", REFRESH_WINDOW);
        let node_b = Node::with_refresh_window(&ca, "node-b", REFRESH_WINDOW);
        node_a.manager.register_pod(&client_id());
        node_b.manager.register_pod(&server_id());
        let observed = Arc::new(Observed::default());
        let (addr, server) = start_server(&node_b, observed.clone()).await;
        let config = node_a
            .manager
            .client_config(&client_id(), server_id())
            .await
            .unwrap();
        let connector = TlsConnector::from(Arc::new(config));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Two clients at once: handshakes overlap refreshes from both sides.
        let clients = (0..2)
            .map(|_| start_client(connector.clone(), addr, observed.clone(), stop.clone()))
            .collect::<Vec<_>>();
        let mut tasks = vec![server];
        tasks.extend(clients);
        Self {
            ca,
            node_a,
            node_b,
            observed,
            stop,
            tasks,
        }
    }

    /// Stops the traffic and returns what it saw.
    pub async fn finish(mut self) -> Arc<Observed> {
        self.stop.store(true, Ordering::SeqCst);
        let server = self.tasks.remove(0);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        server.abort();
        // Let in-flight server halves finish their bookkeeping.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.ca.stop().await;
        self.observed
    }
}
