//! A pod's outbound HTTP connection, served request by request.
//!
//! hyper terminates the client's connection in the protocol detection found
//! (HTTP/1.1 with keep-alive, chunked bodies and upgrades; HTTP/2 with
//! streaming and trailers). Each request is then routed on its own with the
//! destination view, so requests on one keep-alive or HTTP/2 connection to a
//! Service VIP are spread over its endpoints by the balancer (P2C over
//! peak-EWMA of response latency, requests in flight as load), and sent on
//! a pooled connection to the chosen endpoint ([`super::upstream`]).
//!
//! Failures the proxy sees itself become responses: 503 when the endpoint
//! cannot be reached, 502 when it failed mid-request, 403 when the
//! destination's inbound policy refused this client; for a gRPC request,
//! a trailers-only response with `grpc-status` 14 (UNAVAILABLE) or 7
//! (PERMISSION_DENIED), which gRPC clients understand (and may retry),
//! instead of an HTTP error they would report as an internal error.

use super::body::{ProxyBody, Recorded, Recorder};
use super::classify::{MethodClass, grpc_status, is_grpc};
use super::metrics::Peers;
use super::upgrade::{Upgrades, wants_upgrade};
use super::upstream::{UpstreamError, UpstreamKey};
use crate::balancer::Balancer;
use crate::mesh::{self, Route};
use crate::metrics::Reporter;
use crate::outbound::open_upstream;
use crate::pods::{Context, LocalPod};
use crate::protocol::Protocol;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// One client connection's fixed facts.
struct Connection {
    dst: SocketAddr,
    pod: Arc<LocalPod>,
    cx: Context,
    protocol: Protocol,
    /// Connections handed over after a 101: they outlive the HTTP one.
    upgrades: Upgrades,
}

/// Serves the client connection `io` (its first bytes already replayed by
/// the caller) until the client closes it.
pub async fn serve<IO>(io: IO, protocol: Protocol, dst: SocketAddr, pod: Arc<LocalPod>, cx: Context)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Counted for the drain at shutdown, like every proxied connection.
    let _open = cx.tcp_metrics.track();
    let key = pod.key();
    let draining = cx.draining.clone();
    let conn = Arc::new(Connection {
        dst,
        pod,
        cx,
        protocol,
        upgrades: Upgrades::default(),
    });
    let serving = conn.clone();
    let service = service_fn(move |request| {
        let conn = serving.clone();
        async move { Ok::<_, Infallible>(conn.forward(request).await) }
    });
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new()).serve_connection(io, service);
            super::serve_until_drained(conn, &draining, |c| c.graceful_shutdown()).await
        }
        _ => {
            let conn = http1::Builder::new()
                .preserve_header_case(true)
                .serve_connection(io, service)
                .with_upgrades();
            super::serve_until_drained(conn, &draining, |c| c.graceful_shutdown()).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(pod = %key, %dst, error = %e, "client HTTP connection ended with an error");
    }
    // Still open (and counted for the drain) while an upgraded connection is.
    conn.upgrades.finish().await;
}

impl Connection {
    async fn forward(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let cx = &self.cx;
        let method = MethodClass::of(request.method());
        let grpc = is_grpc(request.headers());
        let (route, balanced) = match &cx.mesh {
            Some(mesh) => {
                let view = mesh.view.borrow();
                mesh::route(&view, self.dst, &cx.balancer, &mut rand::rng())
            }
            None => (
                Route::Plain {
                    target: self.dst,
                    workload: None,
                    service: None,
                },
                false,
            ),
        };
        let target = route.target();
        let mut pick = balanced.then(|| Pick::new(cx.balancer.clone(), target));
        let client_upgrade = (self.protocol == Protocol::Http1 && wants_upgrade(&request))
            .then(|| hyper::upgrade::on(&mut request));
        let key = UpstreamKey {
            pod: self.pod.uid.clone(),
            target,
            protocol: self.protocol,
            mtls: matches!(route, Route::Hbone { .. }),
        };
        let request = request.map(|b| b.boxed());
        let (pod, route_ref) = (&self.pod, &route);
        let result = cx
            .upstreams
            .send(
                &key,
                || open_upstream(route_ref, pod, cx, self.protocol),
                request,
                client_upgrade.is_none(),
            )
            .await;
        let mut recorder = Recorder {
            metrics: cx.request_metrics.clone(),
            reporter: Reporter::Source,
            peers: peers(&self.pod, &route),
            method,
            started,
            grpc,
            status: 0,
            header_grpc_status: None,
        };
        let response = match result {
            Ok(mut response) => {
                if let Some(p) = pick.as_mut() {
                    p.responded(started.elapsed());
                }
                if let Some(client_upgrade) = client_upgrade
                    && response.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    self.upgrades
                        .spawn(client_upgrade, upstream_upgrade, target);
                }
                response.map(|b| b.boxed())
            }
            Err(e) => {
                if let Some(p) = pick.as_mut()
                    && e.is_connect()
                {
                    p.failed();
                }
                tracing::info!(target: "access", direction = "outbound", src = %self.pod.key(), dst = %self.dst, via = %target, error = %e, "request failed");
                error_response(&e, grpc)
            }
        };
        recorder.status = response.status().as_u16();
        recorder.header_grpc_status = grpc_status(response.headers());
        tracing::debug!(
            target: "access",
            direction = "outbound",
            src = %self.pod.key(),
            dst = %self.dst,
            via = %target,
            method = method.as_str(),
            status = recorder.status,
            headers_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response.map(|b| Recorded::new(b, recorder).boxed())
    }
}

/// The response the proxy gives itself when the endpoint failed.
pub(super) fn error_response(e: &UpstreamError, grpc: bool) -> Response<ProxyBody> {
    let empty = || {
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed()
    };
    if grpc {
        // Trailers-only: HTTP 200, the status in the headers:
        // PERMISSION_DENIED for a policy refusal, else UNAVAILABLE.
        let code = if e.is_forbidden() { "7" } else { "14" };
        let mut r = Response::new(empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&e.to_string())) {
            h.insert("grpc-message", v);
        }
        return r;
    }
    let status = if e.is_forbidden() {
        StatusCode::FORBIDDEN
    } else if e.is_connect() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_GATEWAY
    };
    let body = http_body_util::Full::new(Bytes::from(format!("weft: {e}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            0x20..=0x7e if b != b'%' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Source-side peers: this pod, and what the view says of the endpoint.
fn peers(pod: &LocalPod, route: &Route) -> Peers {
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

/// An endpoint the balancer picked for one request; the outcome is
/// reported exactly once (a request the client abandoned is only taken off
/// the in-flight count).
struct Pick {
    balancer: Arc<Balancer<SocketAddr>>,
    target: SocketAddr,
    reported: bool,
}

impl Pick {
    fn new(balancer: Arc<Balancer<SocketAddr>>, target: SocketAddr) -> Self {
        Self {
            balancer,
            target,
            reported: false,
        }
    }

    /// Response headers arrived after `latency` (the balancer's signal).
    fn responded(&mut self, latency: std::time::Duration) {
        self.balancer.connected(&self.target, latency);
        self.reported = true;
    }

    fn failed(&mut self) {
        self.balancer.failed(&self.target);
        self.reported = true;
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.reported {
            self.balancer.cancelled(&self.target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_failures_are_trailers_only_unavailable() {
        let e = UpstreamError::Connect(crate::outbound::ConnectError::NoIdentity {
            pod: "demo/x".into(),
        });
        let r = error_response(&e, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("demo/x")
        );
        let r = error_response(&e, false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_policy_refusal_is_403_or_permission_denied_and_not_the_endpoints_fault() {
        let e = UpstreamError::Connect(crate::outbound::ConnectError::Hbone(
            crate::hbone::HboneError::Refused {
                target: "10.244.1.2:8080".parse().unwrap(),
                status: StatusCode::FORBIDDEN,
            },
        ));
        assert!(e.is_forbidden() && !e.is_connect());
        assert_eq!(error_response(&e, false).status(), StatusCode::FORBIDDEN);
        assert_eq!(error_response(&e, true).headers()["grpc-status"], "7");
    }
}
