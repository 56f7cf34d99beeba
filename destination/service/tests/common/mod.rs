//! Test support: certificates, node credentials, a served Publisher.

#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::oneshot;
use weft_destination::index::{self, EndpointsFrom, IndexConfig};
use weft_destination::metrics::Metrics;
use weft_destination::model;
use weft_destination::publisher::Publisher;
use weft_destination::server::{self, DestinationService, TlsFiles};
use weft_destination::store::{ClusterObjects, StoreUpdate};
use weft_node_auth::LocalCredentials;

pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA and a server certificate for `localhost` signed by it.
pub fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weft test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

pub struct Credentials {
    pub dir: tempfile::TempDir,
}

impl Credentials {
    pub fn new(nodes: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for node in nodes {
            std::fs::write(dir.path().join(format!("{node}.token")), token(node)).unwrap();
        }
        Self { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

pub fn token(node: &str) -> String {
    format!("secret-token-of-{node}")
}

/// A running server. Dropping it shuts the server down.
pub struct Served {
    pub addr: SocketAddr,
    pub publisher: Arc<Publisher>,
    pub metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    pub async fn start(pki: &Pki, creds: &Credentials) -> Self {
        Self::start_on(pki, creds, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(pki: &Pki, creds: &Credentials, addr: SocketAddr) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Arc::new(Metrics::new());
        let publisher = Arc::new(Publisher::new(metrics.clone()));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = DestinationService::new(
            publisher.clone(),
            Arc::new(LocalCredentials::new(creds.path())),
        );
        let tls = TlsFiles {
            cert_pem: pki.cert_pem.clone().into_bytes(),
            key_pem: pki.key_pem.clone().into_bytes(),
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            server::serve(listener, tls, service, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            publisher,
            metrics,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn publish(&self, cluster: &Cluster) {
        self.publisher.publish(cluster.index());
    }

    /// Stops serving and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.task)
            .await
            .expect("graceful shutdown ends open streams")
            .unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Objects as JSON, indexed as the kube source would (EndpointSlices).
pub struct Cluster {
    pub objects: ClusterObjects,
    pub endpoints: EndpointsFrom,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            objects: ClusterObjects::default(),
            endpoints: EndpointsFrom::Selectors,
        }
    }
}

impl Cluster {
    pub fn apply(&mut self, value: Value) -> &mut Self {
        let object = model::from_value(value).unwrap().unwrap();
        self.objects.apply(StoreUpdate::Apply(object));
        self
    }

    pub fn index(&self) -> index::Index {
        index::build(
            &self.objects,
            &IndexConfig {
                endpoints: self.endpoints,
                ..IndexConfig::default()
            },
        )
    }
}

pub fn namespace(name: &str, enrolled: bool) -> Value {
    let mut labels = serde_json::Map::new();
    if enrolled {
        labels.insert("weft.io/mesh".into(), "enabled".into());
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels}})
}

pub fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": name,
                 "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

pub fn service(ns: &str, name: &str, vip: &str, selector: Value) -> Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "selector": selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
}
