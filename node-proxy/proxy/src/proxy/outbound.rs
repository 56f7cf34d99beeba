//! 15001: connections an enrolled pod makes, redirected here by the
//! `cgroup/connect` program. The original destination comes from
//! `SO_ORIGINAL_DST` on the accepted socket.
//!
//! The destination view decides where it goes ([`crate::state::route`]): an
//! enrolled workload (directly or behind a Service VIP) gets an HBONE
//! stream, from the source pod's namespace, presenting the source pod's
//! certificate and requiring the destination workload's identity. Anything
//! else is connected directly from the pod's own namespace (a proxy-marked
//! socket, so it is not redirected again): it still leaves from the pod's IP.
//!
//! Before that, the first bytes decide how ([`crate::protocol`]): HTTP/1
//! and HTTP/2 are served request by request ([`requests`]);
//! anything else, and ports declared opaque, are spliced as TCP here, the
//! bytes detection read sent with the opening of the upstream (behind the
//! HBONE CONNECT, without waiting for its answer).

mod requests;

use crate::proxy::ProxyInputs;
use crate::state::{self, Route};
use crate::telemetry::{DetectionOutcome, Peers, Reporter, SecurityPolicy, TcpLabels};
use crate::transport::{LocalPod, open_upstream_sending};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};
use weft_stream::splice;
use weft_stream::{AckOnDemand, Prefixed, Protocol};

pub async fn serve(listener: TcpListener, pod: Arc<LocalPod>, cx: ProxyInputs) {
    let drain = cx.drain.clone();
    crate::transport::accept_loop(listener, &pod, "outbound", &drain, |stream, peer| {
        handle(stream, peer, pod.clone(), cx.clone())
    })
    .await
}

async fn handle(mut client: TcpStream, peer: SocketAddr, pod: Arc<LocalPod>, cx: ProxyInputs) {
    let started = Instant::now();
    // Counted against the pod's and the node's bounds while it lasts.
    let Ok(_permit) = cx.limits.admit(&pod.key()) else {
        weft_stream::reset(client);
        return;
    };
    let dst = match pod.sockets.original_dst(&client) {
        Ok(t) => t,
        Err(e) => {
            // Someone connected to 15001 directly: there is nowhere to go.
            tracing::warn!(pod = %pod.key(), %peer, error = %e, "no original destination");
            return;
        }
    };
    // One look at the control plane's state for the whole connection.
    let snapshot = cx.snapshot();
    // HTTP is proxied request by request (without a control plane every
    // connection is opaque: the snapshot says so).
    let mut client = if snapshot.is_opaque(dst) {
        cx.tcp_metrics
            .detected(Reporter::Source, DetectionOutcome::DeclaredOpaque);
        Prefixed::new(BytesMut::new(), client)
    } else {
        let detected = weft_stream::detect(&mut client, cx.detect_timeout).await;
        cx.tcp_metrics
            .detected(Reporter::Source, DetectionOutcome::of(&detected));
        match detected.protocol {
            Protocol::Http1 | Protocol::Http2 => {
                // A client may write a request in pieces: its bodies
                // acknowledge them when the rest is awaited.
                let client = AckOnDemand::new(client);
                let acker = client.acker();
                let client = Prefixed::new(detected.prefix, client);
                requests::serve(client, acker, detected.protocol, dst, pod, cx).await;
                return;
            }
            Protocol::Opaque => {
                if detected.timed_out {
                    tracing::debug!(pod = %pod.key(), %dst, "the client sent nothing within the detection timeout: opaque TCP");
                }
                Prefixed::new(detected.prefix, client)
            }
        }
    };
    // A Service endpoint that cannot be connected to (refused, the pod is
    // gone, its proxy says the application is not there) is ejected and
    // another one is tried before the client's connection is answered: no
    // byte was exchanged yet.
    let mut failed: Vec<SocketAddr> = Vec::new();
    // What detection read goes with the opening (behind an HBONE CONNECT,
    // not a round trip between the nodes after it); kept here so that an
    // endpoint that refuses is followed by another that gets them too.
    let first = client.take_prefix();
    let (route, mut upstream, open) = loop {
        let picked = tokio::time::Instant::now();
        let (route, balanced) =
            state::route(&snapshot.view, dst, &cx.balancer, &failed, &mut rand::rng());
        let target = route.target();
        let open = cx.tcp_metrics.open(labels(&pod, &route));
        let connected = open_upstream_sending(
            &route,
            &pod,
            cx.tunnels.as_deref(),
            Protocol::Opaque,
            first.clone(),
        )
        .await;
        let e = match connected {
            Ok(u) => {
                if balanced {
                    cx.balancer.connected(&target, started.elapsed());
                }
                break (route, u, open);
            }
            Err(e) => e,
        };
        let service = route.service().unwrap_or_default().to_string();
        if balanced && cx.balancer.failed_since(&target, picked) == weft_balance::Verdict::Ejected {
            cx.request_metrics.ejected(&service, true);
        }
        tracing::info!(target: "access", pod = %pod.key(), dst = %dst, via = %target, error = %e, "outbound connect failed");
        open.close(&Default::default());
        failed.push(target);
        // Another endpoint, unless the destination's policy refused (the
        // answer would be the same) or none is left.
        let forbidden = matches!(
            &e,
            crate::transport::ConnectError::Hbone(weft_hbone::HboneError::Refused {
                status: http::StatusCode::FORBIDDEN,
                ..
            })
        );
        // Nor when the client's first bytes may have reached this one's
        // application: another would get them a second time.
        let delivered = !first.is_empty() && e.may_have_delivered();
        let another = balanced
            && !forbidden
            && !delivered
            && failed.len() <= MAX_FAILOVERS
            && has_another_endpoint(&snapshot.view, dst, &failed);
        if another {
            cx.request_metrics.failed_over(&service, "opaque");
            continue;
        }
        // As the pod would have seen it without the mesh (refused, or
        // the destination's policy denied it): a reset, not an orderly
        // end that looks like an empty answer.
        weft_stream::reset(client.into_inner());
        return;
    };
    let target = route.target();
    // A client may write in pieces here too: ACK them at once.
    let mut acked = AckOnDemand::every_read(&mut client);
    let (mut moved, err) = splice(&mut acked, &mut upstream).await;
    drop(acked); // gives `client` back (reset below on an error)
    moved.a_to_b += first.len() as u64;
    tracing::info!(
        target: "access",
        direction = "outbound",
        src = %pod.key(),
        src_identity = pod.identity.as_ref().map(|i| i.to_string()),
        dst = %dst,
        via = %target,
        dst_identity = match &route { Route::Hbone { identity, .. } => Some(identity.to_string()), _ => None },
        service = route.service(),
        mtls = matches!(route, Route::Hbone { .. }),
        from_client = moved.a_to_b,
        to_client = moved.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        error = err.as_ref().map(|e| e.to_string()),
        "connection closed"
    );
    open.close(&moved);
    if err.is_some() {
        // The far side failed or was reset (a policy change there revoked
        // the connection): pass the reset on rather than a clean close.
        weft_stream::reset(client.into_inner());
    }
}

/// Endpoints tried for one connection after the first, at most.
const MAX_FAILOVERS: usize = 2;

/// Whether the Service behind `dst` has a ready endpoint not in `failed`.
fn has_another_endpoint(
    view: &weft_destination_api::View,
    dst: SocketAddr,
    failed: &[SocketAddr],
) -> bool {
    let Some(svc) = view.service_by_vip(dst.ip()) else {
        return false;
    };
    let endpoints = state::endpoints_of(view, svc, dst.port(), dst);
    endpoints.iter().any(|e| !failed.contains(e))
}

/// Source-side TCP labels: this pod, and what the view says of the
/// destination.
fn labels(pod: &LocalPod, route: &Route) -> TcpLabels {
    let policy = match route {
        Route::Hbone { .. } => SecurityPolicy::MutualTls,
        Route::Plain { .. } => SecurityPolicy::None,
    };
    TcpLabels {
        reporter: Reporter::Source,
        peers: source_peers(pod, route),
        connection_security_policy: policy,
    }
}

/// Source-side peers: this pod, and what the view says of the endpoint.
fn source_peers(pod: &LocalPod, route: &Route) -> Peers {
    let (workload, principal) = match route {
        Route::Hbone {
            workload, identity, ..
        } => (Some(workload), identity.to_string()),
        Route::Plain { workload, .. } => (workload.as_ref(), String::new()),
    };
    Peers {
        source_workload: pod.name.clone(),
        source_namespace: pod.namespace.clone(),
        source_principal: pod
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
        destination_workload: workload.map(|w| w.name.clone()).unwrap_or_default(),
        destination_namespace: workload.map(|w| w.namespace.clone()).unwrap_or_default(),
        destination_principal: principal,
        destination_service: route.service().unwrap_or_default().to_string(),
    }
}
