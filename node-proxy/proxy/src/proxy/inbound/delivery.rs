//! Delivering an inbound connection (an HBONE stream on 15008, or a
//! plaintext connection on 15006) to the application, request by request
//! when it speaks HTTP, so the destination side reports the golden metrics
//! too (`reporter="destination"`).
//!
//! The connection to the application is already open (the caller made it
//! to decide 200/503 on the tunnel); this module decides how to use it:
//! - opaque (ports declared so, detection says so): spliced as before;
//! - HTTP/1.1 or HTTP/2: the inbound stream is served with hyper and every
//!   request goes to the application over that one connection, in the same
//!   protocol (HTTP/1.1 requests arrive one after another on a connection;
//!   HTTP/2 ones are multiplexed on it).
//!
//! Bytes are counted on both sides either way, so `weft_tcp_*` on the
//! destination side keep their meaning for the stream.

use crate::l7::app_connection::AppConnection;
use crate::l7::body::{ProxyBody, Recorded, Recorder, proxy_body};
use crate::l7::client_body::ClientBody;
use crate::l7::respond::{error_response, synthetic};
use crate::l7::upgrade::{Upgrades, wants_upgrade};
use crate::policy::route_authz::{RequestVerdict, RouteAccess};
use crate::proxy::ProxyInputs;
use crate::state::Snapshot;
use crate::state::routes::path_of;
use crate::telemetry::Peers;
use crate::telemetry::classify::{MethodClass, grpc_status, is_grpc};
use crate::telemetry::grpc::GrpcCode;
use crate::telemetry::{DetectionOutcome, Reporter, TcpLabels};
use crate::transport::LocalPod;
use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use weft_destination_api::routing::Request as RouteRequest;
use weft_hbone::{H2Stream, UNPROCESSED_HEADER};
use weft_stream::{AckOnDemand, Counted, Prefixed, Protocol};
use weft_stream::{Transferred, splice_until};

/// Carries `inbound` to `app` (a connection to the application at `app`'s
/// peer address) until both are done, or until `stop` completes (a policy
/// change revoked the connection: both sides are closed at once, the client
/// with a reset). Returns what crossed, like [`weft_stream::splice_until`]
/// (`a_to_b`: from the client).
// The connection's parts as `serve_inbound` decided them; a struct made
// only to carry them here would add a name and no meaning.
#[allow(clippy::too_many_arguments)]
pub async fn deliver<S: InboundStream>(
    mut inbound: S,
    mut app: TcpStream,
    labels: &TcpLabels,
    pod: &Arc<LocalPod>,
    cx: &ProxyInputs,
    snapshot: &Snapshot,
    access: RouteAccess,
    stop: impl Future<Output = ()>,
) -> (Transferred, Option<io::Error>) {
    let target = match app.peer_addr() {
        Ok(a) => a,
        Err(e) => return (Transferred::default(), Some(e)),
    };
    // On revocation the client must see a reset, not an orderly end; the
    // stream itself may be inside hyper by then, so arm it from a handle.
    let reset = inbound.reset_handle();
    let stop = async move {
        stop.await;
        if let Some(fd) = &reset {
            weft_stream::reset_on_close(fd);
        }
    };
    // Admitted only for some HTTP routes: a connection whose requests
    // cannot be checked one by one is refused (reset), never spliced.
    let refuse_opaque = |reset: Option<std::os::fd::OwnedFd>| {
        if let Some(fd) = &reset {
            weft_stream::reset_on_close(fd);
        }
        tracing::info!(target: "access", pod = %pod.key(), port = access.port, src = %access.client_ip, "inbound connection refused: authorized for HTTP routes only, and it is not HTTP");
        let labels = crate::telemetry::AuthzLabels {
            destination_workload: pod.name.clone(),
            destination_namespace: pod.namespace.clone(),
            server: String::new(),
            policy: String::new(),
            reason: crate::telemetry::AuthzReason::RoutesOnlyOpaque
                .as_label()
                .into(),
        };
        cx.authz.metrics().count(&labels, false);
        let e = io::Error::new(
            io::ErrorKind::PermissionDenied,
            "authorized for HTTP routes only, and the connection is not HTTP",
        );
        (Transferred::default(), Some(e))
    };
    // Recording "spliced" is what lets a later policy change that makes
    // the client routes-only close the connection (see
    // `authz::ConnectionAccess`).
    // Decided on the snapshot the connection was admitted with.
    let opaque = snapshot.is_local_opaque(&pod.key(), pod.workload_uid.as_deref(), target.port());
    if opaque {
        cx.tcp_metrics
            .detected(Reporter::Destination, DetectionOutcome::DeclaredOpaque);
        if !access.connection.serve_opaque() {
            return refuse_opaque(inbound.reset_handle());
        }
        return splice_until(&mut inbound, &mut AckOnDemand::every_read(&mut app), stop).await;
    }
    // The source proxy already detected (and said so in the tunnel): trust
    // it, an authenticated peer; otherwise (plaintext, older proxies) look.
    let (found, prefix) = match inbound.declared_protocol() {
        Some(p) => (p, BytesMut::new()),
        None => {
            let detected = weft_stream::detect(&mut inbound, cx.detect_timeout).await;
            cx.tcp_metrics
                .detected(Reporter::Destination, DetectionOutcome::of(&detected));
            (detected.protocol, detected.prefix)
        }
    };
    // The detection bytes are replayed by the prefix, and counted as they
    // are read again below.
    if found == Protocol::Opaque && !access.connection.serve_opaque() {
        return refuse_opaque(inbound.reset_handle());
    }
    let mut inbound = Prefixed::new(prefix, inbound);
    match found {
        Protocol::Opaque => {
            splice_until(&mut inbound, &mut AckOnDemand::every_read(&mut app), stop).await
        }
        http => {
            access.connection.serve_http();
            let from_client = Arc::new(AtomicU64::new(0));
            let to_client = Arc::new(AtomicU64::new(0));
            let inbound = Counted::new(inbound, from_client.clone());
            // When the application closes its connection (an HTTP/2
            // GOAWAY, an HTTP/1.1 close), the next request opens a new one:
            // this inbound connection goes on. (Finishing it instead, so
            // that the client side opens a new one, raced with the requests
            // the source proxy had sent meanwhile: they failed with a 502.)
            let guard = RouteGuard {
                pod: pod.clone(),
                access,
            };
            let peers = labels.peers.clone();
            let serving = async {
                match Delivery::open(app, to_client.clone(), http, target, peers, cx, guard).await {
                    Ok(delivery) => serve(inbound, delivery).await,
                    Err(e) => Some(io::Error::other(e)),
                }
            };
            // Dropping the server connection closes both sides.
            let err = tokio::select! {
                err = serving => err,
                () = stop => Some(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed by the proxy: no longer allowed by policy",
                )),
            };
            let moved = Transferred {
                a_to_b: from_client.load(Ordering::Relaxed),
                b_to_a: to_client.load(Ordering::Relaxed),
            };
            (moved, err)
        }
    }
}

/// What [`deliver`] needs of an inbound connection besides its bytes.
pub trait InboundStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// What the peer says the stream carries, before any byte is read.
    fn declared_protocol(&self) -> Option<Protocol>;
    /// A second handle on the socket, to make its close a reset (TCP); none
    /// where dropping the stream unfinished already resets it (HBONE).
    fn reset_handle(&self) -> Option<std::os::fd::OwnedFd>;
}

impl InboundStream for TcpStream {
    /// A plaintext client says nothing.
    fn declared_protocol(&self) -> Option<Protocol> {
        None
    }

    fn reset_handle(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned().ok()
    }
}

/// A plaintext client connection, acknowledged at once (a client may
/// write a request in pieces).
impl InboundStream for AckOnDemand<TcpStream> {
    fn declared_protocol(&self) -> Option<Protocol> {
        self.get_ref().declared_protocol()
    }

    fn reset_handle(&self) -> Option<std::os::fd::OwnedFd> {
        self.get_ref().reset_handle()
    }
}

impl InboundStream for H2Stream {
    fn declared_protocol(&self) -> Option<Protocol> {
        self.protocol().and_then(Protocol::from_token)
    }

    /// An unfinished stream that is dropped sends RST_STREAM.
    fn reset_handle(&self) -> Option<std::os::fd::OwnedFd> {
        None
    }
}

/// The local pod a connection is delivered to, and who connected: what each
/// of its requests is decided with.
#[derive(Clone, Debug)]
pub(super) struct RouteGuard {
    pub(super) pod: Arc<LocalPod>,
    pub(super) access: RouteAccess,
}

impl RouteGuard {
    fn decide(&self, cx: &ProxyInputs, req: &RouteRequest<'_>) -> RequestVerdict {
        cx.inbound_routing.decide(
            &cx.snapshot(),
            cx.authz.metrics(),
            &self.pod,
            &self.access,
            req,
        )
    }
}

pub(super) struct Delivery {
    app: AppConnection,
    target: SocketAddr,
    peers: Arc<Peers>,
    cx: ProxyInputs,
    protocol: Protocol,
    /// Route-level authorization of each request.
    guard: RouteGuard,
    /// Connections handed over after a 101: delivery lasts until they end
    /// (and a revocation ends them too: dropping this aborts them).
    upgrades: Upgrades,
}

async fn serve<S>(inbound: S, delivery: Arc<Delivery>) -> Option<io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (cx, protocol, target) = (&delivery.cx, delivery.protocol, delivery.target);
    let serving = delivery.clone();
    let http2 = protocol == Protocol::Http2;
    let service = service_fn(move |request: Request<Incoming>| {
        let delivery = serving.clone();
        // A peer proxy's tunnel, or a plaintext client whose every read is
        // acknowledged (`AckOnDemand::every_read`): no acker.
        let request = request.map(|b| ClientBody::new(b, http2, None));
        async move { Ok::<_, Infallible>(delivery.forward(request).await) }
    });
    let io = TokioIo::new(inbound);
    let result = match protocol {
        Protocol::Http2 => {
            // Each stream runs on this task (`l7::connection_tasks`).
            let (exec, started) = crate::l7::connection_tasks::ConnectionTasks::new();
            let conn = http2::Builder::new(exec)
                .max_local_error_reset_streams(crate::l7::LOCAL_ERROR_RESET_LIMIT)
                .serve_connection(io, service);
            let result = started
                .drive(crate::l7::serve_until_drained(conn, &cx.drain, |c| {
                    c.graceful_shutdown()
                }))
                .await;
            crate::l7::note_reset_flood(
                &result,
                &cx.request_metrics,
                Reporter::Destination,
                || format!("client {} of {target}", delivery.guard.access.client_ip),
            );
            result
        }
        _ => {
            let conn = http1::Builder::new()
                .preserve_header_case(true)
                .serve_connection(io, service)
                .with_upgrades();
            crate::l7::serve_until_drained(conn, &cx.drain, |c| c.graceful_shutdown()).await
        }
    };
    delivery.upgrades.finish().await;
    result.err().map(io::Error::other)
}

impl Delivery {
    /// Delivery of requests to the application at `target`, over `app`
    /// (already connected from the pod) and the connections opened after
    /// it; `to_client` counts the application's bytes.
    pub(super) async fn open(
        app: TcpStream,
        to_client: Arc<AtomicU64>,
        protocol: Protocol,
        target: SocketAddr,
        peers: Peers,
        cx: &ProxyInputs,
        guard: RouteGuard,
    ) -> Result<Arc<Self>, crate::l7::upstream::UpstreamError> {
        let app = AppConnection::open(app, guard.pod.clone(), protocol, to_client).await?;
        Ok(Arc::new(Delivery {
            app,
            target,
            peers: Arc::new(peers),
            cx: cx.clone(),
            protocol,
            guard,
            upgrades: Upgrades::default(),
        }))
    }

    /// One request: decided by the Server's routes, sent to the
    /// application, recorded (`reporter="destination"`).
    pub(super) async fn forward(&self, mut request: Request<ClientBody>) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = MethodClass::of(request.method());
        let grpc = is_grpc(request.headers());
        let target = self.target;
        // Before route-level authorization sees it, and as the application
        // gets it: `/public/../admin` is `/admin` to both.
        let bad_path = crate::l7::path::normalize(&mut request).err();
        // Meant for this proxy only (a request connection's target): the
        // application never sees it, whoever set it.
        request.headers_mut().remove(weft_hbone::TARGET_HEADER);
        let req = RouteRequest {
            method: request.method(),
            path: path_of(request.uri()),
            headers: request.headers(),
        };
        let verdict = match bad_path {
            Some(e) => Err(e),
            None => Ok(self.guard.decide(&self.cx, &req)),
        };
        let mut route = String::new();
        let refusal = match verdict {
            Err(e) => Some((
                StatusCode::BAD_REQUEST,
                GrpcCode::InvalidArgument,
                e.to_string(),
            )),
            Ok(RequestVerdict::Pass) => None,
            Ok(RequestVerdict::Allowed { route: rule }) => {
                route = rule;
                None
            }
            Ok(RequestVerdict::Denied { route: rule }) => {
                let message = format!("route {rule:?} does not authorize this client");
                route = rule;
                Some((StatusCode::FORBIDDEN, GrpcCode::PermissionDenied, message))
            }
            Ok(RequestVerdict::NotFound) => {
                route = crate::telemetry::requests::UNMATCHED_ROUTE.to_string();
                let message = "no HTTPRoute of the Server matches this request".to_string();
                Some((StatusCode::NOT_FOUND, GrpcCode::NotFound, message))
            }
        };
        // A client authorized per route gets no byte stream past the
        // routes: an upgraded connection (h2c, or anything but a WebSocket
        // of the route it asked) would carry requests no route decides.
        let refusal = refusal.or_else(|| {
            let protocol = upgrade_protocol(&request)?;
            let routes_only = self.guard.access.connection.routes_only();
            (routes_only && !protocol.eq_ignore_ascii_case("websocket")).then(|| {
                let message = format!(
                    "an upgrade to {protocol:?} is not allowed for a client authorized per route (only websocket)"
                );
                (StatusCode::FORBIDDEN, GrpcCode::PermissionDenied, message)
            })
        });
        if let Some((status, code, message)) = refusal {
            tracing::info!(target: "access", direction = "inbound", dst = %target, src = %self.guard.access.client_ip, route = %route, status = status.as_u16(), reason = %message, "request refused");
            let response = synthetic(status, code, &message, grpc);
            let recorder = Recorder {
                metrics: self.cx.request_metrics.clone(),
                reporter: Reporter::Destination,
                peers: self.peers.clone(),
                route,
                method,
                started,
                grpc,
                status: response.status().as_u16(),
                header_grpc_status: grpc_status(response.headers()),
            };
            return response.map(|b| Recorded::new(b, recorder).boxed());
        }
        let client_upgrade = (self.protocol == Protocol::Http1 && wants_upgrade(&request))
            .then(|| hyper::upgrade::on(&mut request));
        let response = match self.app.send(request).await {
            Ok(mut response) => {
                // Only this proxy says that nothing reached the application.
                response.headers_mut().remove(UNPROCESSED_HEADER);
                if let Some(client_upgrade) = client_upgrade
                    && response.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    response.body().ack_every_read();
                    let app_upgrade = hyper::upgrade::on(&mut response);
                    self.upgrades.spawn(client_upgrade, app_upgrade, target);
                }
                response.map(proxy_body)
            }
            Err(e) => {
                // The application could not be connected to (it died, its
                // port closed) or refused the request unprocessed: the
                // source proxy, an authenticated peer, is told so and sends
                // the request elsewhere. A plaintext client gets the 503.
                let unprocessed = (e.is_connect() || e.is_refused_unprocessed())
                    && !self.peers.source_principal.is_empty();
                tracing::info!(target: "access", direction = "inbound", dst = %target, error = %e, unprocessed, "request failed");
                let mut response = error_response(&e, grpc);
                if unprocessed {
                    response.headers_mut().insert(
                        UNPROCESSED_HEADER,
                        http::HeaderValue::from_static(weft_hbone::CONNECT_FAILED),
                    );
                }
                response
            }
        };
        let recorder = Recorder {
            metrics: self.cx.request_metrics.clone(),
            reporter: Reporter::Destination,
            peers: self.peers.clone(),
            route,
            method,
            started,
            grpc,
            status: response.status().as_u16(),
            header_grpc_status: grpc_status(response.headers()),
        };
        response.map(|b| Recorded::new(b, recorder).boxed())
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade`), if it
/// asks (with `Connection: upgrade`) for one.
fn upgrade_protocol<B>(request: &Request<B>) -> Option<String> {
    if !wants_upgrade(request) {
        return None;
    }
    let value = request.headers().get(http::header::UPGRADE)?;
    Some(String::from_utf8_lossy(value.as_bytes()).trim().to_string())
}
