//! Inbound traffic to a local pod. 15006: plaintext connections from
//! outside the mesh, steered here by `sk_lookup`; the accepted socket's
//! local address is the address the client dialled (podIP:port).
//!
//! The proxy delivers to the application from inside the pod (a
//! proxy-marked socket to podIP:port: `sk_lookup` lets a connection whose
//! source is the pod's own address through, so it does not loop).

mod delivery;
mod requests;

use crate::policy::Inbound;
use crate::policy::authz::Admission;
use crate::policy::route_authz::RouteAccess;
use crate::proxy::{PROXY_PORTS, ProxyInputs};
use crate::state::Snapshot;
use crate::telemetry::{OpenConnection, Peers, Reporter, SecurityPolicy, TcpLabels};
use crate::transport::{ConnectionPermit, LocalPod};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};
use weft_cert_manager::{SpiffeId, peer_identity, peer_not_after};
use weft_destination_api::View;
use weft_hbone::{HboneRequest, serve_connection};
use weft_stream::{AckOnDemand, Transferred};

pub async fn serve_plaintext(listener: TcpListener, pod: Arc<LocalPod>, cx: ProxyInputs) {
    let drain = cx.drain.clone();
    crate::transport::accept_loop(listener, &pod, "inbound", &drain, |stream, peer| {
        handle_plaintext(stream, peer, pod.clone(), cx.clone())
    })
    .await
}

async fn handle_plaintext(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<LocalPod>,
    cx: ProxyInputs,
) {
    let Ok(target) = client.local_addr() else {
        return;
    };
    // No verified identity: the source is whatever the view knows of the
    // peer's address (a pod of this node, or nothing).
    serve_inbound(client, target, peer, None, pod, cx).await
}

/// 15008 on the pod's IP: HBONE. TLS 1.3 with the pod's own certificate; a
/// client certificate is required and verified against the current trust
/// bundle; the verified identity is the connection's source principal.
pub async fn serve_hbone(listener: TcpListener, pod: Arc<LocalPod>, cx: ProxyInputs) {
    let (Some(mesh), Some(identity)) = (cx.control_plane.clone(), pod.identity.clone()) else {
        return;
    };
    // Built once; the resolver and verifier read the current certificate and
    // bundle at every handshake, so rotations need no rebuild. Waits for the
    // pod's first certificate (the listener queues connections meanwhile).
    let config = loop {
        match mesh.certs.server_config(&identity).await {
            Ok(mut c) => {
                // Tunnels, and requests without one (`requests`) from
                // proxies that ask for it.
                c.alpn_protocols = vec![
                    weft_hbone::REQUESTS_ALPN.to_vec(),
                    weft_hbone::HBONE_ALPN.to_vec(),
                ];
                break Arc::new(c);
            }
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "no certificate for the HBONE listener yet");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listening_pod = pod.clone();
    let drain = cx.drain.clone();
    crate::transport::accept_loop(listener, &listening_pod, "hbone", &drain, move |tcp, peer| {
        let (acceptor, pod, cx) = (acceptor.clone(), pod.clone(), cx.clone());
        let mut bundle = mesh.certs.trust_bundle();
        async move {
            let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(crate::transport::tls_socket(tcp))).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(target: "access", pod = %pod.key(), %peer, error = %e, "HBONE handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(target: "access", pod = %pod.key(), %peer, "HBONE handshake timed out");
                    return;
                }
            };
            crate::transport::tune_tls(tls.get_mut().1);
            let Some(principal) = peer_identity(tls.get_ref().1) else {
                // The verifier requires a certificate; unreachable in practice.
                return;
            };
            let principal = Arc::new(principal);
            // The connection takes no new stream (GOAWAY; open ones finish)
            // once the proxy drains, the client's certificate expires, or
            // the trust bundle changes (the client reconnects and is
            // verified under the new one).
            let expires = peer_not_after(tls.get_ref().1);
            let mut draining = cx.drain.watch();
            bundle.borrow_and_update();
            let until = async move {
                let expiry = async {
                    match expires.and_then(|at| at.duration_since(std::time::SystemTime::now()).ok()) {
                        Some(left) => tokio::time::sleep(left).await,
                        // Expired already (the clock moved since the
                        // handshake), or unknown: no stream is accepted.
                        None if expires.is_some() => {}
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = draining.signaled() => {}
                    () = expiry => tracing::info!(%peer, "the client's certificate expired: no new stream on its connection"),
                    _ = bundle.changed() => tracing::debug!(%peer, "trust bundle changed: no new stream on this connection"),
                }
            };
            if tls.get_ref().1.alpn_protocol() == Some(weft_hbone::REQUESTS_ALPN) {
                requests::serve_requests(tls, peer, principal, pod, cx, until).await;
                return;
            }
            let result = serve_connection(
                tls,
                move |request| {
                    handle_stream(request, peer, principal.clone(), pod.clone(), cx.clone())
                },
                until,
            )
            .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HBONE connection ended");
            }
        }
    })
    .await
}

/// The destination side's labels for a connection from `peer` to `port` of
/// `pod`: the source is whatever the view knows of the peer's address (a
/// workload, or nothing), its principal the verified identity if any.
fn destination_labels(
    view: Option<&View>,
    pod: &LocalPod,
    peer: SocketAddr,
    port: u16,
    source_principal: String,
    security: SecurityPolicy,
) -> TcpLabels {
    let source = view.as_ref().and_then(|v| v.workload_by_address(peer.ip()));
    let service = view
        .as_ref()
        .and_then(|v| service_of(v, pod.workload_uid.as_deref(), port));
    TcpLabels {
        reporter: Reporter::Destination,
        peers: Peers {
            source_workload: source.as_ref().map(|w| w.name.clone()).unwrap_or_default(),
            source_namespace: source.map(|w| w.namespace.clone()).unwrap_or_default(),
            source_principal,
            destination_workload: pod.name.clone(),
            destination_namespace: pod.namespace.clone(),
            destination_principal: pod
                .identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default(),
            destination_service: service.unwrap_or_default(),
        },
        connection_security_policy: security,
    }
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn handle_stream(
    request: HboneRequest,
    peer: SocketAddr,
    principal: Arc<SpiffeId>,
    pod: Arc<LocalPod>,
    cx: ProxyInputs,
) {
    let target = request.target;
    serve_inbound(request, target, peer, Some(principal), pod, cx).await
}

/// Why an inbound connection gets no delivery; each arrival answers it in
/// its own way (a TCP reset, or a CONNECT status).
#[derive(Debug)]
enum Refusal {
    /// An HBONE tunnel to this pod's listener for another address.
    NotThisPod,
    /// The pod's policy does not admit the client.
    Denied,
    /// The application refused the connection (or is not there).
    Unreachable,
    /// A port of the proxy itself: delivering there would loop.
    ProxyPort,
    /// The pod or the node carries its maximum of connections.
    OverLimit,
}

/// How an inbound connection arrived: a plaintext TCP connection (15006)
/// or an HBONE CONNECT stream (15008). Answered once: refused, or accepted
/// into the stream that is delivered.
trait Arrival: Send + 'static {
    type Stream: delivery::InboundStream;
    fn refuse(self, why: Refusal);
    fn accept(self) -> std::io::Result<Self::Stream>;
}

impl Arrival for TcpStream {
    /// A client may write a request in pieces: ACK them at once.
    type Stream = AckOnDemand<TcpStream>;

    /// As a closed port or a refusing application would: a reset.
    fn refuse(self, _: Refusal) {
        weft_stream::reset(self)
    }

    fn accept(self) -> std::io::Result<AckOnDemand<TcpStream>> {
        Ok(AckOnDemand::every_read(self))
    }
}

impl Arrival for HboneRequest {
    type Stream = weft_hbone::H2Stream;

    /// The source proxy resets its client's connection on a refused
    /// CONNECT.
    fn refuse(self, why: Refusal) {
        match why {
            Refusal::NotThisPod | Refusal::Denied | Refusal::ProxyPort => {
                self.reject(http::StatusCode::FORBIDDEN)
            }
            // Typed, so the source proxy sends the connection or request
            // to another endpoint: nothing reached the application.
            Refusal::Unreachable | Refusal::OverLimit => self.reject_unprocessed(),
        }
    }

    fn accept(self) -> std::io::Result<weft_hbone::H2Stream> {
        HboneRequest::accept(self).map_err(std::io::Error::other)
    }
}

/// One inbound connection, in phases: its context; every check that can
/// fail (the target, the policy, the application's connect) before
/// anything is answered; then delivery. `client` is the verified identity
/// (HBONE), `None` for plaintext.
async fn serve_inbound<A: Arrival>(
    arrival: A,
    target: SocketAddr,
    peer: SocketAddr,
    client: Option<Arc<SpiffeId>>,
    pod: Arc<LocalPod>,
    cx: ProxyInputs,
) {
    let snapshot = cx.snapshot();
    let admitted = match admit(target, peer, client, &pod, &cx, &snapshot).await {
        Ok(a) => a,
        Err(why) => {
            arrival.refuse(why);
            return;
        }
    };
    let Admitted {
        labels,
        mut record,
        app,
        access,
        mut admission,
        permit: _permit,
    } = admitted;
    let stream = match arrival.accept() {
        Ok(s) => s,
        Err(e) => {
            record.error = Some(format!("the client went away: {e}"));
            return;
        }
    };

    // Delivery. A policy change that revokes the connection ends it with a
    // reset (plaintext) or RST_STREAM, which the source proxy turns into a
    // reset of its client's connection.
    let (moved, err) =
        delivery::deliver(stream, app, &labels, &pod, &cx, &snapshot, access, async {
            admission.revoked().await;
        })
        .await;
    record.moved = moved;
    record.error = err.map(|e| e.to_string());
}

/// An inbound connection that passed every check, and what its delivery
/// needs.
struct Admitted {
    labels: TcpLabels,
    /// Its metrics and access-log line, written when this is dropped.
    record: ConnectionRecord,
    /// Connected to the target from inside the pod.
    app: TcpStream,
    access: RouteAccess,
    /// Completes `revoked()` when a policy change refuses the connection.
    admission: Admission,
    permit: ConnectionPermit,
}

/// The checks of an inbound connection to `target`, in order: a tunnel
/// reaches only this pod, never a port of the proxy; the pod's and node's
/// bounds; the policy; the application accepts a connection from inside
/// the pod. Each refusal is logged (and counted) here; the caller answers
/// it.
async fn admit(
    target: SocketAddr,
    peer: SocketAddr,
    client: Option<Arc<SpiffeId>>,
    pod: &Arc<LocalPod>,
    cx: &ProxyInputs,
    snapshot: &Snapshot,
) -> Result<Admitted, Refusal> {
    let started = Instant::now();
    let client_ip = peer.ip().to_canonical();
    let view = snapshot.policy_view();
    if client.is_some() && !pod.has_address(target.ip()) {
        // A tunnel to this pod's listener may only reach this pod.
        tracing::info!(target: "access", pod = %pod.key(), %peer, %target, "HBONE target is not this pod");
        return Err(Refusal::NotThisPod);
    }
    if PROXY_PORTS.contains(&target.port()) {
        // Plaintext to podIP:15006, or a tunnel to podIP:15008: the proxy
        // would connect to itself, again and again (and a tunnel to 15008
        // would launder the client's address for NetworkAuthentication).
        // Loopback is refused above for tunnels (only the pod's address
        // is served); a plaintext connection steered here has the pod's.
        tracing::info!(target: "access", pod = %pod.key(), %peer, %target, "refused: the target is the node proxy's own port");
        return Err(Refusal::ProxyPort);
    }
    let permit = cx
        .limits
        .admit(&pod.key())
        .map_err(|_| Refusal::OverLimit)?;
    let conn = Inbound {
        pod: pod.info.clone(),
        port: target.port(),
        client: client.clone(),
        client_ip,
    };
    // Refused (and logged and counted by the policy) before anything
    // reaches the application.
    let admission = cx.authz.admit(view, conn).map_err(|_| Refusal::Denied)?;
    let security = if client.is_some() {
        SecurityPolicy::MutualTls
    } else {
        SecurityPolicy::None
    };
    let principal = client.as_ref().map(|c| c.to_string()).unwrap_or_default();
    let labels = destination_labels(view, pod, peer, target.port(), principal, security);
    let mut record = ConnectionRecord {
        open: Some(cx.tcp_metrics.open(labels.clone())),
        started,
        pod: pod.clone(),
        peer,
        port: target.port(),
        client: client.clone(),
        moved: Transferred::default(),
        error: None,
    };
    let app = match pod.connect(target).await {
        Ok(s) => s,
        Err(e) => {
            record.error = Some(format!("cannot connect to {target} from the pod: {e}"));
            return Err(Refusal::Unreachable);
        }
    };
    let access = RouteAccess {
        client,
        client_ip,
        port: target.port(),
        connection: admission.access.clone(),
    };
    Ok(Admitted {
        labels,
        record,
        app,
        access,
        admission,
        permit,
    })
}

/// The one record of an admitted inbound connection: its TCP metrics and
/// its access-log line, written once when it ends, however it ends (also
/// when its task is dropped half-way).
struct ConnectionRecord {
    open: Option<OpenConnection>,
    started: Instant,
    pod: Arc<LocalPod>,
    peer: SocketAddr,
    port: u16,
    client: Option<Arc<SpiffeId>>,
    moved: Transferred,
    error: Option<String>,
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        tracing::info!(
            target: "access",
            direction = "inbound",
            src = %self.peer,
            src_identity = self.client.as_ref().map(|c| c.to_string()),
            dst = %self.pod.key(),
            port = self.port,
            mtls = self.client.is_some(),
            from_client = self.moved.a_to_b,
            to_client = self.moved.b_to_a,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = self.error.as_deref(),
            "connection closed"
        );
        if let Some(open) = self.open.take() {
            open.close(&self.moved);
        }
    }
}

/// The first Service (in name order) that sends `port` to this workload.
fn service_of(view: &View, workload_uid: Option<&str>, port: u16) -> Option<String> {
    let uid = workload_uid?;
    view.services_of_workload(uid)
        .find(|s| {
            s.endpoints
                .iter()
                .any(|e| e.workload_uid == uid && e.ports.values().any(|p| *p == u32::from(port)))
        })
        .map(|s| s.hostname.clone())
}
