//! A complete local CA for tests of this crate and of its clients (the cert
//! manager, the node proxy): a CA directory made by [`crate::init`], node
//! credentials and a simulator-style state file in a temporary directory, and
//! the real server on loopback.

use crate::authority::LeafPolicy;
use crate::init::{self, CaCert};
use crate::server::{self, RunningCa, ServeConfig, ServeError};
use crate::serving::default_server_names;
use crate::workloads::LocalClusterDirectory;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use weft_node_auth::LocalCredentials;

/// A pod as the simulator's state file lists it.
#[derive(Clone, Debug)]
pub struct TestPod {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
}

impl TestPod {
    pub fn new(namespace: &str, name: &str, service_account: &str, node: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            node: node.into(),
        }
    }
}

pub struct LocalCa {
    root: tempfile::TempDir,
    pub policy: LeafPolicy,
    pub anchor: CaCert,
    pub issuer: CaCert,
    running: Option<RunningCa>,
    addr: Option<SocketAddr>,
}

impl LocalCa {
    /// Starts a CA for `policy` whose cluster has `pods`; every node named by
    /// a pod gets a credential file.
    pub async fn start(policy: LeafPolicy, pods: &[TestPod]) -> Result<Self, ServeError> {
        let root = tempfile::tempdir().expect("temporary directory");
        let td = policy.trust_domain.clone();
        let year = Duration::from_secs(365 * 24 * 3600);
        let anchor = init::trust_anchor(&td, "1", year).expect("anchor");
        let issuer = init::issuer(&anchor, &td, "1", year).expect("issuer");
        init::write_layout(&root.path().join("ca"), &issuer, &[&anchor]).expect("CA files");
        std::fs::create_dir_all(root.path().join("credentials")).expect("credentials dir");
        let mut ca = Self {
            root,
            policy,
            anchor,
            issuer,
            running: None,
            addr: None,
        };
        ca.set_pods(pods);
        ca.restart().await?;
        Ok(ca)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.path().join("ca")
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.path().join("state.json")
    }

    pub fn credentials_dir(&self) -> PathBuf {
        self.root.path().join("credentials")
    }

    /// The credential file of `node` (created with a random token).
    pub fn token_file(&self, node: &str) -> PathBuf {
        let path = self.credentials_dir().join(format!("{node}.token"));
        if !path.exists() {
            let token: [u8; 16] = rand::random();
            let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&path, hex).expect("write token");
        }
        path
    }

    pub fn token(&self, node: &str) -> String {
        std::fs::read_to_string(self.token_file(node)).expect("token")
    }

    /// Rewrites the state file (pods come and go).
    pub fn set_pods(&self, pods: &[TestPod]) {
        let pods: Vec<_> = pods
            .iter()
            .map(|p| {
                self.token_file(&p.node);
                serde_json::json!({
                    "namespace": p.namespace, "name": p.name, "node": p.node,
                    "service_account": p.service_account, "uid": format!("uid-{}", p.name),
                    "labels": {}, "annotations": {}, "ip": "10.244.0.2",
                })
            })
            .collect();
        let state =
            serde_json::json!({ "name": "test", "nodes": [], "pods": pods, "services": [] });
        let tmp = self.state_file().with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state).expect("json")).expect("state");
        std::fs::rename(&tmp, self.state_file()).expect("state rename");
    }

    /// The gRPC address (stable across [`Self::stop`]/[`Self::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("started")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.running.as_ref().expect("running").metrics_addr
    }

    pub fn running(&self) -> Option<&RunningCa> {
        self.running.as_ref()
    }

    pub fn anchors_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_dir().join(crate::material::TRUST_ANCHORS_FILE)).expect("ca.crt")
    }

    /// Takes the CA off the network (connections and streams end).
    pub async fn stop(&mut self) {
        if let Some(ca) = self.running.take() {
            ca.stop().await;
        }
    }

    /// Starts (again) on the same address, re-reading the CA directory.
    pub async fn restart(&mut self) -> Result<(), ServeError> {
        self.stop().await;
        let config = ServeConfig {
            ca_dir: self.ca_dir(),
            listen: self
                .addr
                .unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr")),
            metrics_listen: "127.0.0.1:0".parse().expect("addr"),
            server_names: default_server_names(),
            policy: self.policy.clone(),
            poll: Duration::from_secs(1),
        };
        let ca = server::spawn(
            config,
            Arc::new(LocalCredentials::new(self.credentials_dir())),
            Arc::new(LocalClusterDirectory::new(self.state_file())),
        )
        .await?;
        self.addr = Some(ca.addr);
        self.running = Some(ca);
        Ok(())
    }

    /// Fetches `/metrics` as text.
    pub async fn scrape(&self) -> String {
        scrape(self.metrics_addr()).await
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

/// GET /metrics over plain HTTP/1.0 on loopback.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut out))
        .await
        .expect("metrics in time")
        .expect("read");
    out
}

/// The value of one series in Prometheus text output, e.g.
/// `metric_value(&text, "weft_identity_certificates_issued_total{result=\"issued\"}")`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
