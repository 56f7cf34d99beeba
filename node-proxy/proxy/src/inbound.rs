//! Inbound traffic to a local pod. 15006: plaintext connections from
//! outside the mesh, steered here by `sk_lookup`; the accepted socket's
//! local address is the address the client dialled (podIP:port).
//!
//! The proxy delivers to the application from inside the pod (a
//! proxy-marked socket to podIP:port: `sk_lookup` lets a connection whose
//! source is the pod's own address through, so it does not loop).

use crate::authz::{self, Inbound};
use crate::hbone::{HboneRequest, serve_connection};
use crate::l7::route_authz::RouteAccess;
use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::outbound::connect_from_pod;
use crate::pods::{Context, LocalPod};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};
use weft_cert_manager::{SpiffeId, peer_identity};
use weft_destination_api::View;

pub async fn serve_plaintext(listener: TcpListener, pod: Arc<LocalPod>, cx: Context) {
    crate::pods::accept_loop(listener, &pod, "inbound", |stream, peer| {
        handle_plaintext(stream, peer, pod.clone(), cx.clone())
    })
    .await
}

async fn handle_plaintext(client: TcpStream, peer: SocketAddr, pod: Arc<LocalPod>, cx: Context) {
    let started = Instant::now();
    let Ok(target) = client.local_addr() else {
        return;
    };
    let conn = Inbound {
        pod: pod.clone(),
        port: target.port(),
        client: None,
        client_ip: peer.ip().to_canonical(),
    };
    let admitted = {
        let view = cx.mesh.as_ref().map(|m| m.view.borrow());
        cx.authz.admit(view.as_deref(), conn)
    };
    let Ok(mut admission) = admitted else {
        // Refused: nothing reaches the application.
        authz::reset(client);
        return;
    };
    // The source is whatever the view knows of the peer address (a pod of
    // this node, or nothing); it has no verified identity.
    let labels = destination_labels(
        &cx,
        &pod,
        peer,
        target.port(),
        String::new(),
        SecurityPolicy::None,
    );
    let open = cx.tcp_metrics.open(labels);
    let app = match connect_from_pod(&pod, target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(target: "access", pod = %pod.key(), %peer, dst = %target, error = %e, "inbound delivery failed");
            open.close(&Default::default());
            return;
        }
    };
    // Revoked by a policy change: the client gets a reset (deliver arms it).
    let access = RouteAccess {
        client: None,
        client_ip: peer.ip().to_canonical(),
        port: target.port(),
        connection: admission.access.clone(),
    };
    // A client may write a request in pieces: ACK them at once.
    let client = crate::quickack::QuickAck::new(client);
    let (moved, err) =
        crate::l7::inbound::deliver(client, app, open.labels(), &pod, &cx, access, async {
            admission.revoked().await;
        })
        .await;
    tracing::info!(
        target: "access",
        direction = "inbound",
        src = %peer,
        dst = %pod.key(),
        port = target.port(),
        from_client = moved.a_to_b,
        to_client = moved.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        error = err.as_ref().map(|e| e.to_string()),
        "connection closed"
    );
    open.close(&moved);
}

/// 15008 on the pod's IP: HBONE. TLS 1.3 with the pod's own certificate; a
/// client certificate is required and verified against the current trust
/// bundle; the verified identity is the connection's source principal.
pub async fn serve_hbone(listener: TcpListener, pod: Arc<LocalPod>, cx: Context) {
    let (Some(mesh), Some(identity)) = (cx.mesh.clone(), pod.identity.clone()) else {
        return;
    };
    // Built once; the resolver and verifier read the current certificate and
    // bundle at every handshake, so rotations need no rebuild. Waits for the
    // pod's first certificate (the listener queues connections meanwhile).
    let config = loop {
        match mesh.certs.server_config(&identity).await {
            Ok(c) => break Arc::new(c),
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "no certificate for the HBONE listener yet");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listening_pod = pod.clone();
    crate::pods::accept_loop(listener, &listening_pod, "hbone", move |tcp, peer| {
        let (acceptor, pod, cx) = (acceptor.clone(), pod.clone(), cx.clone());
        async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
            let Some(principal) = peer_identity(tls.get_ref().1) else {
                // The verifier requires a certificate; unreachable in practice.
                return;
            };
            let principal = Arc::new(principal);
            let mut draining = cx.draining.subscribe();
            let result = serve_connection(
                tls,
                move |request| {
                    handle_stream(request, peer, principal.clone(), pod.clone(), cx.clone())
                },
                async move {
                    let _ = draining.wait_for(|d| *d).await;
                },
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
    cx: &Context,
    pod: &LocalPod,
    peer: SocketAddr,
    port: u16,
    source_principal: String,
    security: SecurityPolicy,
) -> TcpLabels {
    let view = cx.mesh.as_ref().map(|m| m.view.borrow());
    let source = view
        .as_ref()
        .and_then(|v| v.workload_by_address(peer.ip()).cloned());
    let service = view
        .as_ref()
        .and_then(|v| service_of(v, pod.workload_uid.as_deref(), port));
    TcpLabels {
        reporter: Reporter::Destination,
        source_workload: source.as_ref().map(|w| w.name.clone()).unwrap_or_default(),
        source_namespace: source.map(|w| w.namespace).unwrap_or_default(),
        source_principal,
        destination_workload: pod.name.clone(),
        destination_namespace: pod.namespace.clone(),
        destination_principal: pod
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
        destination_service: service.unwrap_or_default(),
        connection_security_policy: security,
    }
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn handle_stream(
    request: HboneRequest,
    peer: SocketAddr,
    principal: Arc<SpiffeId>,
    pod: Arc<LocalPod>,
    cx: Context,
) {
    let started = Instant::now();
    let target = request.target;
    if Some(target.ip()) != pod.ip {
        // A tunnel to this pod's listener may only reach this pod.
        tracing::info!(target: "access", pod = %pod.key(), %peer, %target, "HBONE target is not this pod");
        request.reject(http::StatusCode::FORBIDDEN);
        return;
    }
    let conn = Inbound {
        pod: pod.clone(),
        port: target.port(),
        client: Some(principal.clone()),
        client_ip: peer.ip().to_canonical(),
    };
    let admitted = {
        let view = cx.mesh.as_ref().map(|m| m.view.borrow());
        cx.authz.admit(view.as_deref(), conn)
    };
    let Ok(mut admission) = admitted else {
        // Refused before anything reaches the application; the source proxy
        // resets its client's connection on a refused CONNECT.
        request.reject(http::StatusCode::FORBIDDEN);
        return;
    };
    let labels = destination_labels(
        &cx,
        &pod,
        peer,
        target.port(),
        principal.to_string(),
        SecurityPolicy::MutualTls,
    );
    let open = cx.tcp_metrics.open(labels);
    let app = match connect_from_pod(&pod, target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(target: "access", pod = %pod.key(), %peer, dst = %target, error = %e, "inbound delivery failed");
            request.reject(http::StatusCode::SERVICE_UNAVAILABLE);
            open.close(&Default::default());
            return;
        }
    };
    let stream = match request.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(target: "access", pod = %pod.key(), %peer, error = %e, "HBONE stream gone");
            open.close(&Default::default());
            return;
        }
    };
    // On revocation the stream is dropped unfinished: an RST_STREAM, which
    // the source proxy turns into a reset of its client's connection.
    let access = RouteAccess {
        client: Some(principal.clone()),
        client_ip: peer.ip().to_canonical(),
        port: target.port(),
        connection: admission.access.clone(),
    };
    let (moved, err) =
        crate::l7::inbound::deliver(stream, app, open.labels(), &pod, &cx, access, async {
            admission.revoked().await;
        })
        .await;
    tracing::info!(
        target: "access",
        direction = "inbound",
        src = %peer,
        src_identity = %principal,
        dst = %pod.key(),
        port = target.port(),
        mtls = true,
        from_client = moved.a_to_b,
        to_client = moved.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        error = err.as_ref().map(|e| e.to_string()),
        "connection closed"
    );
    open.close(&moved);
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
