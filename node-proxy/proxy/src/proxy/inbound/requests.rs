//! 15008 connections that carry HTTP/2 requests as streams of their own
//! (ALPN [`weft_hbone::REQUESTS_ALPN`]): a source node proxy that has taken
//! a pod's HTTP/2 or gRPC connection apart sends each request here as one
//! stream, naming its target (`weft-target: podIP:port`), instead of an
//! HTTP/2 connection inside a CONNECT stream of an HBONE connection. Each
//! request is then one stream on this connection, served on its task: one
//! framing and one task hand-off fewer on each node.
//!
//! A connection carries the requests of one target. The first request's
//! target goes through the checks a tunnel does (`super::admit`: this pod,
//! not a port of the proxy, the bounds, the policy, the application's
//! connect); a refusal is that request's answer (403, or 503 marked
//! unprocessed so that the source proxy sends it elsewhere) and the next
//! request is checked again. Once admitted, requests are delivered as
//! those of a tunnel are (route authorization, `reporter="destination"`
//! metrics, the application's connection opened again when it closes). A
//! policy change that revokes the client closes the connection, as a
//! tunnel is reset; drain, the client's certificate expiry and a trust
//! bundle change end it gracefully (GOAWAY).

use super::delivery::{Delivery, RouteGuard};
use super::{Admitted, ConnectionRecord, Refusal, admit};
use crate::l7::body::ProxyBody;
use crate::l7::client_body::ClientBody;
use crate::l7::connection_tasks::ConnectionTasks;
use crate::l7::respond::synthetic;
use crate::policy::Admission;
use crate::proxy::ProxyInputs;
use crate::telemetry::Reporter;
use crate::telemetry::classify::is_grpc;
use crate::telemetry::grpc::GrpcCode;
use crate::transport::{ConnectionPermit, LocalPod};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OnceCell, oneshot};
use weft_cert_manager::SpiffeId;
use weft_hbone::{TARGET_HEADER, UNPROCESSED_HEADER};
use weft_stream::{Counted, Protocol, Transferred};

/// Serves one request connection from the peer proxy at `peer`, whose
/// verified identity is `principal`, until it ends, `until` completes (it
/// then finishes gracefully) or the client's admission is revoked.
pub(super) async fn serve_requests<IO>(
    io: IO,
    peer: SocketAddr,
    principal: Arc<SpiffeId>,
    pod: Arc<LocalPod>,
    cx: ProxyInputs,
    until: impl Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let from_client = Arc::new(AtomicU64::new(0));
    let (admitted_tx, admitted_rx) = oneshot::channel();
    let connection = Arc::new(RequestConnection {
        peer,
        principal,
        pod,
        cx: cx.clone(),
        to_client: Arc::new(AtomicU64::new(0)),
        delivery: OnceCell::new(),
        admitted: Mutex::new(Some(admitted_tx)),
        held: Mutex::new(None),
    });
    let serving = connection.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let connection = serving.clone();
        async move { Ok::<_, Infallible>(connection.handle(request).await) }
    });
    // Each stream runs on this task (`l7::connection_tasks`).
    let (exec, started) = ConnectionTasks::new();
    let conn = http2::Builder::new(exec)
        .max_local_error_reset_streams(crate::l7::LOCAL_ERROR_RESET_LIMIT)
        .serve_connection(TokioIo::new(Counted::new(io, from_client.clone())), service);
    // `until` includes the drain.
    let served = started.drive(crate::l7::serve_until(conn, until, |c| {
        c.graceful_shutdown()
    }));
    let revoked = async {
        match admitted_rx.await {
            Ok(mut admission) => {
                admission.revoked().await;
            }
            // Nothing was admitted on this connection.
            Err(_) => std::future::pending().await,
        }
    };
    let error = tokio::select! {
        result = served => {
            crate::l7::note_reset_flood(&result, &cx.request_metrics, Reporter::Destination, || {
                format!("peer proxy {peer}")
            });
            result.err().map(|e| e.to_string())
        }
        () = revoked => Some("closed by the proxy: no longer allowed by policy".to_string()),
    };
    let held = connection
        .held
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some((mut record, _permit)) = held {
        record.moved = Transferred {
            a_to_b: from_client.load(Ordering::Relaxed),
            b_to_a: connection.to_client.load(Ordering::Relaxed),
        };
        record.error = error;
    }
}

/// One request connection's state.
struct RequestConnection {
    peer: SocketAddr,
    principal: Arc<SpiffeId>,
    pod: Arc<LocalPod>,
    cx: ProxyInputs,
    /// Bytes from the application, over every connection to it.
    to_client: Arc<AtomicU64>,
    /// The target admitted by the first request that passed the checks,
    /// and its delivery.
    delivery: OnceCell<(SocketAddr, Arc<Delivery>)>,
    /// Hands the admission to the connection's task, which closes the
    /// connection when a policy change revokes it.
    admitted: Mutex<Option<oneshot::Sender<Admission>>>,
    /// The admitted connection's record (metrics, access log) and its
    /// place in the pod's bounds, until the connection ends.
    held: Mutex<Option<(ConnectionRecord, ConnectionPermit)>>,
}

impl RequestConnection {
    async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let grpc = is_grpc(request.headers());
        let named = request
            .headers()
            .get(TARGET_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok());
        let Some(target) = named else {
            let message =
                format!("a request on this connection must name its target ({TARGET_HEADER})");
            return synthetic(
                StatusCode::BAD_REQUEST,
                GrpcCode::InvalidArgument,
                &message,
                grpc,
            );
        };
        let (admitted, delivery) = match self.delivery.get_or_try_init(|| self.open(target)).await {
            Ok(d) => d,
            Err(refusal) => return refused(refusal, grpc),
        };
        if *admitted != target {
            // A source proxy keeps a connection per target; this is not one.
            let message = format!("this connection carries requests for {admitted}, not {target}");
            return synthetic(
                StatusCode::MISDIRECTED_REQUEST,
                GrpcCode::Internal,
                &message,
                grpc,
            );
        }
        delivery
            .forward(request.map(|body| ClientBody::new(body, true, None)))
            .await
    }

    /// The checks of a tunnel, for the connection's first target; then its
    /// delivery.
    async fn open(&self, target: SocketAddr) -> Result<(SocketAddr, Arc<Delivery>), Refusal> {
        let cx = &self.cx;
        let snapshot = cx.snapshot();
        let client = Some(self.principal.clone());
        let Admitted {
            labels,
            mut record,
            app,
            access,
            admission,
            permit,
        } = admit(target, self.peer, client, &self.pod, cx, &snapshot).await?;
        // Every request is decided by the routes: served as HTTP whatever
        // the port is declared (a port declared opaque is spliced only
        // when the bytes are a tunnel's, which these are not).
        access.connection.serve_http();
        let guard = RouteGuard {
            pod: self.pod.clone(),
            access,
        };
        let peers = labels.peers.clone();
        let to_client = self.to_client.clone();
        let delivery =
            match Delivery::open(app, to_client, Protocol::Http2, target, peers, cx, guard).await {
                Ok(d) => d,
                Err(e) => {
                    record.error = Some(format!("HTTP/2 with the application failed: {e}"));
                    return Err(Refusal::Unreachable);
                }
            };
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some((record, permit));
        if let Some(admitted) = self
            .admitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = admitted.send(admission);
        }
        Ok((target, delivery))
    }
}

/// A refused first request's answer: what the source proxy would answer
/// its client for a refused tunnel (403 or PERMISSION_DENIED), or 503
/// marked unprocessed (nothing reached the application: the source proxy
/// sends the request to another endpoint).
fn refused(refusal: Refusal, grpc: bool) -> Response<ProxyBody> {
    match refusal {
        Refusal::NotThisPod | Refusal::Denied | Refusal::ProxyPort => synthetic(
            StatusCode::FORBIDDEN,
            GrpcCode::PermissionDenied,
            "the destination refused this client or target",
            grpc,
        ),
        Refusal::Unreachable | Refusal::OverLimit => {
            let mut response = synthetic(
                StatusCode::SERVICE_UNAVAILABLE,
                GrpcCode::Unavailable,
                "the application could not be reached",
                grpc,
            );
            response.headers_mut().insert(
                UNPROCESSED_HEADER,
                http::HeaderValue::from_static(weft_hbone::CONNECT_FAILED),
            );
            response
        }
    }
}
