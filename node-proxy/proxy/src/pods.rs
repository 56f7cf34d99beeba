//! The pods this node proxy serves.
//!
//! A pod arrives through the registration protocol (the CNI plugin, or the
//! simulator, sends `add` with its network namespace). The proxy then opens
//! its listeners *inside* that namespace — 15001 for the pod's outbound
//! connections, 15006 for inbound plaintext — and only then enrolls the
//! namespace, so there is never a moment where the pod's traffic is
//! redirected to a port nobody listens on. `del` undoes it in the opposite
//! order. The listener a connection arrives on says which pod it belongs to:
//! no guessing from source addresses.

use crate::balancer::{Balancer, BalancerConfig};
use crate::hbone::pool::{Connector, Transport};
use crate::hbone::{HBONE_PORT, HboneError, HbonePool, PoolConfig};
use crate::inbound;
use crate::mesh::{self, Mesh};
use crate::metrics::TcpMetrics;
use crate::outbound;
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use weft_cert_manager::{CertManager, SpiffeId};
use weft_cni::protocol::{PodEvent, PodRef};
use weft_destination_api::address;
use weft_redirector::{INBOUND_PORT, Netns, OUTBOUND_PORT, PodEnrollment, Redirector};

/// What a registered pod should be captured as.
#[derive(Clone, Debug, Default, PartialEq)]
struct Wanted {
    identity: Option<SpiffeId>,
    ip: Option<IpAddr>,
    workload_uid: Option<String>,
}

/// Aborts the listeners of a capture that failed half-way.
struct Guard(Vec<JoinHandle<()>>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.drain(..).for_each(|h| h.abort());
    }
}

/// A pod on this node, as far as the data plane is concerned.
#[derive(Debug)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub netns: Arc<Netns>,
    /// The pod's SPIFFE identity (with a control plane; `None` standalone).
    pub identity: Option<SpiffeId>,
    /// The pod's primary address, from the destination view.
    pub ip: Option<IpAddr>,
    /// The destination view's key (uid) of the pod's workload.
    pub workload_uid: Option<String>,
}

impl LocalPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A registered pod: the proxy holds its namespace; it is *captured*
/// (listeners open, namespace enrolled) only while its workload is enrolled.
struct Registered {
    pod: PodRef,
    netns: Arc<Netns>,
    annotations: HashMap<String, String>,
    captured: Option<Captured>,
}

struct Captured {
    pod: Arc<LocalPod>,
    /// Accept loops; aborting them closes the listeners (and the kernel then
    /// drops the inbound steering entry: inbound fails closed).
    listeners: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("cannot open the network namespace of {pod}: {source}")]
    Netns {
        pod: String,
        source: Box<weft_redirector::Error>,
    },
    #[error(
        "cannot listen on {addr} inside {pod}: {source} (is another node proxy already serving this pod?)"
    )]
    Listen {
        pod: String,
        addr: SocketAddr,
        source: Box<weft_redirector::Error>,
    },
    #[error("cannot enroll {pod}: {source}")]
    Enroll {
        pod: String,
        source: Box<weft_redirector::Error>,
    },
}

/// Shared context of every connection handler.
#[derive(Clone)]
pub struct Context {
    pub tcp_metrics: TcpMetrics,
    /// The control plane's view and the certificates; `None` when the proxy
    /// runs without a control plane (every pod captured, all plaintext).
    pub mesh: Option<Mesh>,
    pub balancer: Arc<Balancer<SocketAddr>>,
    pub pool: Option<Arc<HbonePool<PoolKey>>>,
    /// Set to true at shutdown: HBONE connections send GOAWAY and finish
    /// their open streams.
    pub draining: Arc<tokio::sync::watch::Sender<bool>>,
    /// Inbound authorization: decisions, and the admitted connections a
    /// policy change may revoke.
    pub authz: Arc<crate::authz::InboundAuthz>,
    /// Golden request metrics of the HTTP connections the proxy terminates
    /// (registered by the caller, next to the TCP metrics).
    pub request_metrics: crate::l7::RequestMetrics,
    /// HTTP client connections to endpoints, for request-level proxying.
    pub upstreams: crate::l7::UpstreamPool,
    /// Compiled HTTPRoutes of the view, retry budgets per Service.
    pub routing: Arc<crate::l7::routing::OutboundRouting>,
    /// Compiled inbound routes (route-level authorization).
    pub inbound_routing: Arc<crate::l7::route_authz::InboundRouting>,
    /// How long protocol detection waits for a client's first bytes.
    pub detect_timeout: Duration,
}

impl Context {
    pub fn new(tcp_metrics: TcpMetrics, mesh: Option<Mesh>) -> Self {
        let pool = mesh.as_ref().map(|m| {
            Arc::new(HbonePool::new(
                PoolConfig::default(),
                connector(m.certs.clone()),
            ))
        });
        Self {
            tcp_metrics,
            mesh,
            balancer: Arc::new(Balancer::new(BalancerConfig::default())),
            pool,
            draining: Arc::new(tokio::sync::watch::Sender::new(false)),
            authz: Arc::default(),
            request_metrics: crate::l7::RequestMetrics::default(),
            upstreams: crate::l7::UpstreamPool::new(),
            routing: Arc::default(),
            inbound_routing: Arc::default(),
            detect_timeout: crate::protocol::DETECT_TIMEOUT,
        }
    }
}

/// HBONE connections are pooled per source pod (connections leave from the
/// pod's own IP), source identity, destination identity and address.
#[derive(Clone, Debug)]
pub struct PoolKey {
    pub pod: Arc<LocalPod>,
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub tunnel: SocketAddr,
}

impl PoolKey {
    fn parts(&self) -> (&str, &SpiffeId, &SpiffeId, SocketAddr) {
        (&self.pod.uid, &self.source, &self.destination, self.tunnel)
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

/// How long an HBONE connection waits for the source pod's first
/// certificate before failing (the CA is slow or unreachable).
const CERT_WAIT: Duration = Duration::from_secs(10);

/// TCP from inside the source pod's namespace, then TLS 1.3 with the source
/// pod's certificate, requiring the destination workload's exact identity.
fn connector(certs: CertManager) -> Connector<PoolKey> {
    Arc::new(move |key: PoolKey| {
        let certs = certs.clone();
        Box::pin(async move {
            let addr = key.tunnel;
            let tls_err = |e: String| HboneError::Tls {
                addr,
                source: std::io::Error::other(e),
            };
            let config = tokio::time::timeout(
                CERT_WAIT,
                certs.client_config(&key.source, key.destination.clone()),
            )
            .await
            .map_err(|_| tls_err(format!("no certificate for {} yet", key.source)))?
            .map_err(|e| tls_err(e.to_string()))?;
            let tcp = outbound::connect_from_pod(&key.pod, addr)
                .await
                .map_err(|source| HboneError::Connect { addr, source })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|source| HboneError::Tls { addr, source })?;
            Ok(Box::new(tls) as Box<dyn Transport>)
        })
    })
}

pub struct PodRegistry {
    redirector: Arc<Redirector>,
    context: Context,
    pods: Mutex<HashMap<String, Registered>>,
}

impl PodRegistry {
    pub fn new(redirector: Arc<Redirector>, context: Context) -> Self {
        Self {
            redirector,
            context,
            pods: Mutex::default(),
        }
    }

    /// Handles one registration event; the error is what the CNI plugin
    /// (or simulator) reports back. A pod whose workload is not enrolled
    /// (or not yet in the view) is acknowledged but not captured;
    /// [`PodRegistry::reconcile`] captures it when the view says so.
    pub fn handle(&self, event: PodEvent) -> Result<(), RegistrationError> {
        match event {
            PodEvent::Add {
                pod,
                netns,
                annotations,
                ..
            } => self.add(pod, &netns, annotations.unwrap_or_default()),
            PodEvent::Del { pod, .. } => {
                self.remove(&pod);
                Ok(())
            }
        }
    }

    fn add(
        &self,
        pod: PodRef,
        netns_path: &std::path::Path,
        annotations: HashMap<String, String>,
    ) -> Result<(), RegistrationError> {
        let key = format!("{}/{}", pod.namespace, pod.name);
        // A repeated add (the CNI plugin retried) replaces the old state.
        self.remove(&pod);
        let netns =
            Arc::new(
                Netns::open(netns_path).map_err(|source| RegistrationError::Netns {
                    pod: key.clone(),
                    source: Box::new(source),
                })?,
            );
        let mut registered = Registered {
            pod: pod.clone(),
            netns,
            annotations,
            captured: None,
        };
        let wanted = self.wanted(&registered.pod);
        if let Some(wanted) = wanted {
            registered.captured = Some(self.capture(&registered, wanted)?);
        } else {
            tracing::info!(pod = %key, "pod registered, not in the mesh");
        }
        let id = if pod.uid.is_empty() { key } else { pod.uid };
        self.pods.lock().expect("pods lock").insert(id, registered);
        Ok(())
    }

    /// Whether a pod should be captured and as what: standalone, always;
    /// with a control plane, when the view has its workload enrolled.
    fn wanted(&self, pod: &PodRef) -> Option<Wanted> {
        let Some(mesh) = &self.context.mesh else {
            return Some(Wanted::default());
        };
        let view = mesh.view.borrow();
        let w = mesh::local_workload(&view, &pod.uid, &pod.namespace, &pod.name)?;
        if !w.enrolled {
            return None;
        }
        let identity = mesh::identity_of(&w)?;
        let ip = w.addresses.iter().find_map(|a| address::decode(a))?;
        Some(Wanted {
            identity: Some(identity),
            ip: Some(ip),
            workload_uid: Some(w.uid.clone()),
        })
    }

    /// Opens the pod's listeners inside its namespace, then enrolls it.
    fn capture(&self, r: &Registered, wanted: Wanted) -> Result<Captured, RegistrationError> {
        let key = format!("{}/{}", r.pod.namespace, r.pod.name);
        let netns = &r.netns;
        let local = Arc::new(LocalPod {
            namespace: r.pod.namespace.clone(),
            name: r.pod.name.clone(),
            uid: r.pod.uid.clone(),
            netns: netns.clone(),
            identity: wanted.identity.clone(),
            ip: wanted.ip,
            workload_uid: wanted.workload_uid.clone(),
        });
        let listen = |addr: SocketAddr| {
            netns
                .listen_tcp(addr)
                .and_then(|l| {
                    tokio::net::TcpListener::from_std(l).map_err(weft_redirector::Error::from)
                })
                .map_err(|source| RegistrationError::Listen {
                    pod: key.clone(),
                    addr,
                    source: Box::new(source),
                })
        };
        let mut listeners = Guard(Vec::new());
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let l = listen(SocketAddr::new(ip, OUTBOUND_PORT))?;
            listeners.0.push(tokio::spawn(outbound::serve(
                l,
                local.clone(),
                self.context.clone(),
            )));
        }
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let l = listen(SocketAddr::new(ip, INBOUND_PORT))?;
            self.redirector
                .register_inbound_listener(netns, &l)
                .map_err(|source| RegistrationError::Enroll {
                    pod: key.clone(),
                    source: Box::new(source),
                })?;
            listeners.0.push(tokio::spawn(inbound::serve_plaintext(
                l,
                local.clone(),
                self.context.clone(),
            )));
        }
        if let (Some(mesh), Some(identity), Some(ip)) =
            (&self.context.mesh, &local.identity, local.ip)
        {
            // Fetch the certificate now, not on the first connection.
            mesh.certs.register_pod(identity);
            let l = match listen(SocketAddr::new(ip, HBONE_PORT)) {
                Ok(l) => l,
                Err(e) => {
                    mesh.certs.unregister_pod(identity);
                    return Err(e);
                }
            };
            listeners.0.push(tokio::spawn(inbound::serve_hbone(
                l,
                local.clone(),
                self.context.clone(),
            )));
        }
        let enrollment = PodEnrollment {
            netns,
            pod_uid: r.pod.uid.clone(),
            annotations: r.annotations.clone(),
        };
        if let Err(source) = self.redirector.enroll(&enrollment) {
            self.release_certificate(&local);
            return Err(RegistrationError::Enroll {
                pod: key,
                source: Box::new(source),
            });
        }
        tracing::info!(pod = %key, identity = ?local.identity.as_ref().map(|i| i.to_string()), "pod enrolled");
        Ok(Captured {
            pod: local,
            listeners: std::mem::take(&mut listeners.0),
        })
    }

    fn release_certificate(&self, pod: &LocalPod) {
        if let (Some(mesh), Some(identity)) = (&self.context.mesh, &pod.identity) {
            mesh.certs.unregister_pod(identity);
        }
    }

    /// Unenrolls first (from now on the pod's connects go direct: the pod is
    /// leaving the mesh) rather than to listeners about to close.
    fn release(&self, captured: Captured) {
        if let Err(e) = self.redirector.unenroll(&captured.pod.uid) {
            tracing::warn!(pod = %captured.pod.key(), error = %e, "unenroll failed");
        }
        for h in captured.listeners {
            h.abort();
        }
        self.release_certificate(&captured.pod);
        tracing::info!(pod = %captured.pod.key(), "pod left the mesh");
    }

    fn remove(&self, pod: &PodRef) {
        let removed = {
            let mut pods = self.pods.lock().expect("pods lock");
            let id = pods
                .iter()
                // By uid when the runtime gave one: a StatefulSet pod
                // recreated under the same name may be added before the old
                // sandbox's del arrives, and that del must not remove it.
                .find(|(_, r)| {
                    if pod.uid.is_empty() {
                        r.pod.namespace == pod.namespace && r.pod.name == pod.name
                    } else {
                        r.pod.uid == pod.uid
                    }
                })
                .map(|(id, _)| id.clone());
            id.and_then(|id| pods.remove(&id))
        };
        let Some(registered) = removed else { return };
        if let Some(c) = registered.captured {
            self.release(c);
        }
        tracing::info!(pod = %format!("{}/{}", registered.pod.namespace, registered.pod.name), "pod removed");
    }

    /// Brings every registered pod in line with the view: captures pods
    /// whose workload became enrolled, releases those that left. Called
    /// whenever the view changes; enrolment follows the namespace label
    /// without restarting pods.
    pub fn reconcile(&self) {
        let mut pods = self.pods.lock().expect("pods lock");
        for r in pods.values_mut() {
            let wanted = self.wanted(&r.pod);
            let current = r.captured.as_ref().map(|c| Wanted {
                identity: c.pod.identity.clone(),
                ip: c.pod.ip,
                workload_uid: c.pod.workload_uid.clone(),
            });
            if wanted == current {
                continue;
            }
            if let Some(c) = r.captured.take() {
                self.release(c);
            }
            if let Some(w) = wanted {
                match self.capture(r, w) {
                    Ok(c) => r.captured = Some(c),
                    Err(e) => tracing::warn!(error = %e, "cannot bring a pod into the mesh"),
                }
            }
        }
    }

    /// Shutdown: closes every pod's listeners (new connections of captured
    /// pods are refused: they fail closed) and tells HBONE connections to
    /// drain; connections in flight go on.
    pub fn stop_accepting(&self) {
        let _ = self.context.draining.send(true);
        for r in self.pods.lock().expect("pods lock").values_mut() {
            for h in r.captured.iter_mut().flat_map(|c| c.listeners.drain(..)) {
                h.abort();
            }
        }
    }

    /// Whether every captured pod has a certificate.
    pub fn certificates_ready(&self) -> bool {
        let Some(mesh) = &self.context.mesh else {
            return true;
        };
        self.pods()
            .iter()
            .filter_map(|p| p.identity.as_ref())
            .all(|id| mesh.certs.current_certificate(id).is_some())
    }

    /// Pods currently served, for `/config_dump`.
    /// The per-endpoint balancer state (for `/config_dump`).
    pub fn balancer(&self) -> Arc<Balancer<SocketAddr>> {
        self.context.balancer.clone()
    }

    pub fn pods(&self) -> Vec<Arc<LocalPod>> {
        self.pods
            .lock()
            .expect("pods lock")
            .values()
            .filter_map(|r| r.captured.as_ref().map(|c| c.pod.clone()))
            .collect()
    }
}

impl Drop for PodRegistry {
    fn drop(&mut self) {
        for (_, r) in self.pods.lock().expect("pods lock").drain() {
            for h in r.captured.into_iter().flat_map(|c| c.listeners) {
                h.abort();
            }
        }
    }
}

/// Accepts on one of a pod's listeners until its task is aborted (the pod
/// leaves), handing each connection to `handle` on a task of its own. An
/// accept error (file descriptors exhausted, say) is logged and retried after
/// a pause rather than ending the listener: the pod would lose its traffic.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    pod: &LocalPod,
    what: &'static str,
    mut handle: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Forward what arrives at once: with Nagle on, small writes
                // and HTTP/2 frames wait for the peer's delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                tracing::warn!(pod = %pod.key(), listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
