//! A pod's outbound HTTP connection, served request by request.
//!
//! hyper terminates the client's connection in the protocol detection found
//! (HTTP/1.1 with keep-alive, chunked bodies and upgrades; HTTP/2 with
//! streaming and trailers). Each request is then routed on its own with the
//! destination view, so requests on one keep-alive or HTTP/2 connection to a
//! Service VIP are spread over its endpoints by the balancer (P2C over
//! peak-EWMA of response latency, requests in flight as load), and sent on
//! a pooled connection to the chosen endpoint ([`crate::l7::upstream`]).
//!
//! Failures the proxy sees itself become responses: 503 when the endpoint
//! cannot be reached, 502 when it failed mid-request, 403 when the
//! destination's inbound policy refused this client; for a gRPC request,
//! a trailers-only response with `grpc-status` 14 (UNAVAILABLE) or 7
//! (PERMISSION_DENIED), which gRPC clients understand (and may retry),
//! instead of an HTTP error they would report as an internal error.

use crate::l7::body::{ProxyBody, Recorded, Recorder, proxy_body};
use crate::l7::client_body::ClientBody;
use crate::l7::connection_tasks::ConnectionTasks;
use crate::l7::deadline::Deadline;
use crate::l7::grpc_peek::{self, Peeked};
use crate::l7::replay::ReplayBody;
use crate::l7::respond::{error_response, synthetic};
use crate::l7::upgrade::{Upgrades, wants_upgrade};
use crate::l7::upstream::{UpstreamError, UpstreamKey};
use crate::l7::{LOCAL_ERROR_RESET_LIMIT, note_reset_flood, serve_until_drained};
use crate::policy::retry::{MAX_REPLAY_BODY, Outcome as RetryOutcome, should_retry};
use crate::proxy::ProxyInputs;
use crate::state::routes::{Plan, path_of, pick_backend, vip_of};
use crate::state::{self, Route};
use crate::telemetry::classify::{MethodClass, grpc_server_failed, grpc_status, is_grpc};
use crate::telemetry::grpc::GrpcCode;
use crate::telemetry::{Peers, Reporter};
use crate::transport::LocalPod;
use crate::transport::{ConnectError, Upstream, open_requests_upstream, open_upstream};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use weft_balance::{Balancer, Verdict};
use weft_destination_api::routing::Request as RouteRequest;
use weft_hbone::UNPROCESSED_HEADER;
use weft_stream::Acker;
use weft_stream::Protocol;

/// What the last attempt of a request leaves for its response.
#[derive(Default)]
struct LastAttempt {
    /// The route taken (for the metrics' peers).
    route: Option<Route>,
    /// When its backend request timeout ends, and the timeout.
    backend_deadline: Option<(Instant, Duration)>,
    /// Attempts sent to another endpoint because nothing reached the
    /// application.
    failovers: u32,
    /// Endpoints that failed this request: the next attempt avoids them.
    failed: Vec<SocketAddr>,
}

/// Endpoints a request is sent to after the first when nothing reached the
/// application, at most (each one is ejected on the way).
const MAX_FAILOVERS: u32 = 3;

/// One client connection's fixed facts.
struct Connection {
    dst: SocketAddr,
    pod: Arc<LocalPod>,
    cx: ProxyInputs,
    protocol: Protocol,
    /// Connections handed over after a 101: they outlive the HTTP one.
    upgrades: Upgrades,
    /// Acknowledges the client's socket (see `serve`).
    acker: Acker,
    /// The metrics' peers of the last route taken, for the next request
    /// that takes the same one (most do).
    peers: std::sync::Mutex<Option<RoutePeers>>,
}

/// The metrics' peers of one route: what they are made of, and them.
struct RoutePeers {
    /// Held, so that no other record can take its address while compared.
    workload: Option<Arc<weft_destination_api::Workload>>,
    service: Option<String>,
    mutual_tls: bool,
    peers: Arc<Peers>,
}

impl RoutePeers {
    fn of(
        route: &Route,
    ) -> (
        Option<&Arc<weft_destination_api::Workload>>,
        Option<&str>,
        bool,
    ) {
        (
            route.workload(),
            route.service(),
            matches!(route, Route::Hbone { .. }),
        )
    }

    /// Made of the same as `route`'s: the same workload record (the view
    /// replaces a record whole when anything in it changes), service and
    /// security.
    fn matches(&self, route: &Route) -> bool {
        let (workload, service, mutual_tls) = Self::of(route);
        let same_workload = match (&self.workload, workload) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same_workload && self.service.as_deref() == service && self.mutual_tls == mutual_tls
    }
}

impl Connection {
    /// The source-side metrics' peers of `route`: the last request's when
    /// it took the same route, so that a request builds no label strings
    /// and its series is found by the `Arc`'s address.
    fn peers(&self, route: &Route) -> Arc<Peers> {
        let mut last = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = last.as_ref().filter(|c| c.matches(route)) {
            return cached.peers.clone();
        }
        let peers = Arc::new(super::source_peers(&self.pod, route));
        let (workload, service, mutual_tls) = RoutePeers::of(route);
        *last = Some(RoutePeers {
            workload: workload.cloned(),
            service: service.map(str::to_string),
            mutual_tls,
            peers: peers.clone(),
        });
        peers
    }
}

/// Serves the client connection `io` (its first bytes already replayed by
/// the caller) until the client closes it. `acker` acknowledges what the
/// client wrote when a request body's next part is awaited, and every read
/// once the connection is upgraded (a client may write in pieces).
pub async fn serve<IO>(
    io: IO,
    acker: Acker,
    protocol: Protocol,
    dst: SocketAddr,
    pod: Arc<LocalPod>,
    cx: ProxyInputs,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let key = pod.key();
    let drain = cx.drain.clone();
    let metrics = cx.request_metrics.clone();
    let conn = Arc::new(Connection {
        dst,
        pod,
        cx,
        protocol,
        upgrades: Upgrades::default(),
        acker,
        peers: Default::default(),
    });
    let serving = conn.clone();
    let http2 = protocol == Protocol::Http2;
    let service = service_fn(move |request: Request<Incoming>| {
        let conn = serving.clone();
        let acker = conn.acker.clone();
        let request = request.map(|b| ClientBody::new(b, http2, Some(acker)));
        async move { Ok::<_, Infallible>(conn.forward(request).await) }
    });
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http2 => {
            // Each stream runs on this task (`l7::connection_tasks`).
            let (exec, started) = ConnectionTasks::new();
            let conn = http2::Builder::new(exec)
                .max_local_error_reset_streams(LOCAL_ERROR_RESET_LIMIT)
                .serve_connection(io, service);
            let result = started
                .drive(serve_until_drained(conn, &drain, |c| c.graceful_shutdown()))
                .await;
            note_reset_flood(&result, &metrics, Reporter::Source, || format!("pod {key}"));
            result
        }
        _ => {
            let conn = http1::Builder::new()
                .preserve_header_case(true)
                .serve_connection(io, service)
                .with_upgrades();
            serve_until_drained(conn, &drain, |c| c.graceful_shutdown()).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(pod = %key, %dst, error = %e, "client HTTP connection ended with an error");
    }
    // Still open (and counted for the drain) while an upgraded connection is.
    conn.upgrades.finish().await;
}

/// The Service a request's client dialled (by its VIP), if any.
#[derive(Clone, Copy)]
struct Dialled<'a> {
    hostname: Option<&'a str>,
    /// `namespace/name`: the key of its retry budget.
    key: Option<&'a str>,
}

impl Connection {
    async fn forward(&self, mut request: Request<ClientBody>) -> Response<ProxyBody> {
        let started = Instant::now();
        let cx = &self.cx;
        let method = MethodClass::of(request.method());
        let grpc = is_grpc(request.headers());
        // Before routes see it, and as it is forwarded.
        let bad_path = crate::l7::path::normalize(&mut request).err();
        let (plan, hostname, dialled_key) = {
            let snapshot = cx.snapshot();
            let req = RouteRequest {
                method: request.method(),
                path: path_of(request.uri()),
                headers: request.headers(),
            };
            // The Service the client dialled (by its VIP), looked up once.
            let dialled = snapshot.view.service_by_vip(self.dst.ip());
            let hostname = dialled.map(|s| s.hostname.clone());
            let key = dialled.map(|s| weft_destination_api::service_key(&s.namespace, &s.name));
            (cx.routing.plan(&snapshot, self.dst, &req), hostname, key)
        };
        let dialled = Dialled {
            hostname: hostname.as_deref(),
            key: dialled_key.as_deref(),
        };
        let client_upgrade = (self.protocol == Protocol::Http1 && wants_upgrade(&request))
            .then(|| hyper::upgrade::on(&mut request));
        let reusable = client_upgrade.is_none();
        let mut last = LastAttempt::default();
        let request_timeout = plan
            .rule()
            .map(|r| Duration::from_millis(r.request_timeout_ms))
            .filter(|t| !t.is_zero())
            .map(|t| (started + t, t));
        let result = if let Some(e) = bad_path {
            Err(Failure::BadPath(e))
        } else if plan == Plan::NotFound {
            Err(Failure::NotFound)
        } else if let Some((deadline, timeout)) = request_timeout {
            // Gateway API `timeouts.request`: the whole request, retries
            // and backoff included; the response body is held to the same
            // deadline below.
            let attempts = self.attempts(&plan, dialled, request, reusable, grpc, &mut last);
            match tokio::time::timeout_at(deadline, attempts).await {
                Ok(result) => result,
                Err(_) => Err(Failure::Timeout(timeout.as_millis() as u64)),
            }
        } else {
            self.attempts(&plan, dialled, request, reusable, grpc, &mut last)
                .await
        };
        let route = last.route.unwrap_or(Route::Plain {
            target: self.dst,
            workload: None,
            service: hostname,
        });
        let target = route.target();
        let mut recorder = Recorder {
            metrics: cx.request_metrics.clone(),
            reporter: Reporter::Source,
            peers: self.peers(&route),
            route: plan.label().to_string(),
            method,
            started,
            grpc,
            status: 0,
            header_grpc_status: None,
        };
        let response = match result {
            Ok(mut response) => {
                if let Some(client_upgrade) = client_upgrade
                    && response.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    self.acker.ack_every_read();
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    self.upgrades
                        .spawn(client_upgrade, upstream_upgrade, target);
                    response
                } else {
                    // The body ends by the request's deadline, or by the
                    // last attempt's backend deadline if that comes first.
                    let deadline = [request_timeout, last.backend_deadline]
                        .into_iter()
                        .flatten()
                        .min_by_key(|(at, _)| *at);
                    match deadline {
                        Some((at, timeout)) => {
                            response.map(|b| Deadline::new(b, at, timeout, grpc).boxed())
                        }
                        None => response,
                    }
                }
            }
            Err(e) => {
                tracing::info!(target: "access", direction = "outbound", src = %self.pod.key(), dst = %self.dst, via = %target, error = %e, "request failed");
                e.response(grpc)
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
            route = plan.label(),
            method = method.as_str(),
            status = recorder.status,
            failovers = last.failovers,
            headers_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response.map(|b| Recorded::new(b, recorder).boxed())
    }

    /// Sends the request, retrying per the rule's `retry` while its body
    /// can be replayed, and sending it to another endpoint whatever the
    /// rule says when nothing of it reached the application (the endpoint
    /// could not be connected to, its destination proxy said so, or a
    /// draining peer refused the stream). `dialled`: the Service the client
    /// dialled, for the retry counters and budget; `grpc`: a gRPC request, whose
    /// status decides a retry.
    async fn attempts(
        &self,
        plan: &Plan,
        dialled: Dialled<'_>,
        request: Request<ClientBody>,
        reusable: bool,
        grpc: bool,
        last: &mut LastAttempt,
    ) -> Result<Response<ProxyBody>, Failure> {
        let rule = plan.rule();
        let backend_timeout = rule
            .map(|r| Duration::from_millis(r.backend_request_timeout_ms))
            .filter(|t| !t.is_zero());
        if !reusable {
            // An upgrade takes the connection over: never replayed.
            let request = request.map(proxy_body);
            return self
                .attempt(plan, request, reusable, backend_timeout, false, last)
                .await
                .0;
        }
        let policy = rule.and_then(|r| r.retry.as_ref());
        // The budget of the rule's Service, else of the dialled one; none
        // for a destination that is not a Service (nowhere else to go).
        let (budget_key, label) = match plan {
            Plan::Rule { service, label, .. } => (Some(service.clone()), label.as_str()),
            _ => (dialled.key.map(str::to_string), plan.label()),
        };
        let budget = budget_key.as_deref().map(|k| self.cx.routing.budget(k));
        if let Some(budget) = &budget {
            budget.request();
        }
        // The body is kept as the first attempt forwards it (up to 64 KiB,
        // trailers included), streamed or not, so a retry can send it again
        // without holding the request back until its end.
        let (parts, body) = request.into_parts();
        let (mut body, replay) = ReplayBody::new(body);
        let metrics = &self.cx.request_metrics;
        let destination = dialled
            .hostname
            .or(budget_key.as_deref())
            .unwrap_or_default();
        let mut retries = 0u32;
        loop {
            let request = with_body(&parts, proxy_body(body));
            let peek = grpc && policy.is_some();
            let (result, outcome) = self
                .attempt(plan, request, reusable, backend_timeout, peek, last)
                .await;
            let Some(outcome) = outcome else {
                return result;
            };
            let replayable = replay.is_replayable();
            let target = last.route.as_ref().map(Route::target);
            // Nothing reached the application: another endpoint, whatever
            // the method and the rule (bounded; within the budget).
            let unprocessed =
                matches!(outcome, RetryOutcome::ConnectFailed | RetryOutcome::Refused);
            let failover =
                unprocessed && replayable && last.failovers < MAX_FAILOVERS && budget.is_some();
            let retry = !failover
                && policy
                    .is_some_and(|p| should_retry(p, &parts.method, replayable, retries, outcome));
            if !failover && !retry {
                return result;
            }
            let Some(budget) = &budget else {
                return result;
            };
            if !budget.try_retry() {
                metrics.budget_exhausted(destination, label);
                return result;
            }
            let Some(next) = replay.next() else {
                return result;
            };
            if let Some(target) = target {
                last.failed.push(target);
            }
            if let Ok(response) = result {
                drain(response).await;
            }
            body = next;
            if failover {
                last.failovers += 1;
                metrics.failed_over(destination, label);
                tracing::info!(target: "access", direction = "outbound", src = %self.pod.key(), dst = %self.dst, via = ?target, outcome = ?outcome, "nothing reached the application: sent to another endpoint");
            } else {
                metrics.retried(destination, label);
                retries += 1;
                if let Some(policy) = policy {
                    tokio::time::sleep(backoff(policy.backoff_ms, retries)).await;
                }
            }
        }
    }

    /// One attempt: picks the endpoint and sends. The outcome is what a
    /// retry decision looks at (`None`: nothing to retry, e.g. a refusal
    /// by the destination's policy). `peek_grpc`: learn a gRPC call's
    /// status before returning (only when it may be retried).
    async fn attempt(
        &self,
        plan: &Plan,
        request: Request<ProxyBody>,
        reusable: bool,
        timeout: Option<Duration>,
        peek_grpc: bool,
        last: &mut LastAttempt,
    ) -> (Result<Response<ProxyBody>, Failure>, Option<RetryOutcome>) {
        let cx = &self.cx;
        let picked = Instant::now();
        let (route, balanced) = match self.resolve(plan, &last.failed) {
            Ok(r) => r,
            Err(e) => return (Err(e), None),
        };
        let route = &*last.route.insert(route);
        let target = route.target();
        let service = route.service().unwrap_or_default();
        let mut pick = balanced.then(|| Pick {
            balancer: cx.balancer.clone(),
            target,
            picked,
            reported: false,
        });
        let ejected = |verdict: Verdict, connect: bool| {
            if verdict == Verdict::Ejected {
                cx.request_metrics.ejected(service, connect);
            }
        };
        let key = UpstreamKey {
            pod: self.pod.uid.clone(),
            target,
            protocol: self.protocol,
            mtls: matches!(route, Route::Hbone { .. }),
        };
        let sent = Instant::now();
        // The balancer's latency is the time to the response headers, not
        // to the end of a peek.
        let mut latency = Duration::ZERO;
        let send = async {
            let response = cx
                .upstreams
                .send(&key, || self.open_upstream(route), request, reusable)
                .await?;
            latency = sent.elapsed();
            Ok::<_, Failure>(if peek_grpc {
                let (response, peeked) = grpc_peek::peek(response).await;
                (response, Some(peeked))
            } else {
                (response.map(proxy_body), None)
            })
        };
        // Gateway API `timeouts.backendRequest`: each attempt, its
        // response body included (see `forward`).
        last.backend_deadline = timeout.map(|t| (sent + t, t));
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r,
                Err(_) => Err(Failure::BackendTimeout(t.as_millis() as u64)),
            },
            None => send.await,
        };
        let (mut result, peeked) = match result {
            Ok((response, peeked)) => (Ok(response), peeked),
            Err(e) => (Err(e), None),
        };
        // The destination proxy (an authenticated peer: only over HBONE)
        // says that nothing reached the application.
        let unprocessed = matches!(route, Route::Hbone { .. })
            && result
                .as_mut()
                .is_ok_and(|r| r.headers_mut().remove(UNPROCESSED_HEADER).is_some());
        let outcome = match &result {
            Ok(_) if unprocessed => {
                if let Some(p) = pick.as_mut() {
                    ejected(p.failed(), true);
                }
                Some(RetryOutcome::ConnectFailed)
            }
            Ok(response) => {
                let status = response.status().as_u16();
                // A gRPC failure is an HTTP 200: its status, when known
                // by now (trailers-only, or peeked), counts too.
                let grpc_code = match peeked {
                    Some(Peeked::Status(code)) => Some(code),
                    _ => grpc_status(response.headers()),
                };
                let server_failed = status >= 500 || grpc_code.is_some_and(grpc_server_failed);
                if let Some(p) = pick.as_mut() {
                    ejected(p.responded(latency, !server_failed), false);
                }
                match peeked {
                    Some(Peeked::Status(code)) if code != 0 => Some(RetryOutcome::Grpc(code)),
                    Some(Peeked::Failed) => Some(RetryOutcome::ResponseFailed),
                    _ => Some(RetryOutcome::Status(status)),
                }
            }
            Err(Failure::Upstream(e)) if e.is_forbidden() => None,
            Err(Failure::Upstream(e)) if e.is_connect() => {
                if let Some(p) = pick.as_mut() {
                    ejected(p.failed(), true);
                }
                Some(RetryOutcome::ConnectFailed)
            }
            // A draining peer refused the stream unprocessed: not the
            // endpoint's failure (the pick is only cancelled).
            Err(Failure::Upstream(e)) if e.is_refused_unprocessed() => Some(RetryOutcome::Refused),
            Err(Failure::Upstream(_) | Failure::BackendTimeout(_)) => {
                if let Some(p) = pick.as_mut() {
                    ejected(p.request_failed(), false);
                }
                Some(RetryOutcome::ResponseFailed)
            }
            Err(_) => None,
        };
        (result, outcome)
    }

    /// The transport of a connection for this client's requests to
    /// `route`: HTTP/2 requests go as streams of their own where the peer
    /// proxy takes them (no tunnel inside); the rest as usual.
    async fn open_upstream(&self, route: &Route) -> Result<Upstream, ConnectError> {
        let (pod, cx) = (&self.pod, &self.cx);
        let tunnels = cx.tunnels.as_deref();
        match self.protocol {
            Protocol::Http2 => {
                open_requests_upstream(route, pod, tunnels, cx.requests.as_deref()).await
            }
            _ => open_upstream(route, pod, tunnels, self.protocol).await,
        }
    }

    /// Where this attempt goes: a backend of the rule by weight (else the
    /// dialled Service), then one of its endpoints by the balancer.
    fn resolve(&self, plan: &Plan, avoid: &[SocketAddr]) -> Result<(Route, bool), Failure> {
        let cx = &self.cx;
        let snapshot = cx.snapshot();
        let view = &snapshot.view;
        let mut rng = rand::rng();
        let Plan::Rule { rule, service, .. } = plan else {
            return Ok(state::route(view, self.dst, &cx.balancer, avoid, &mut rng));
        };
        let dialled_port = self.dst.port();
        let (key, port) = match pick_backend(rule, &mut rng) {
            Some(b) => (
                b.service.as_str(),
                u16::try_from(b.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .unwrap_or(dialled_port),
            ),
            None => (service.as_str(), dialled_port),
        };
        let Some(svc) = view.services.get(key) else {
            return Err(Failure::UnknownBackend(key.to_string()));
        };
        let dialled = if key == service {
            self.dst
        } else {
            vip_of(svc, port, self.dst).unwrap_or(self.dst)
        };
        Ok(state::route_to_service(
            view,
            svc,
            port,
            dialled,
            &cx.balancer,
            avoid,
            &mut rng,
        ))
    }
}

/// Why the proxy answers a request itself.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("no HTTPRoute rule of the Service matches this request")]
    NotFound,
    #[error(transparent)]
    BadPath(crate::l7::path::PathRejection),
    #[error("no response within the HTTPRoute's request timeout ({0} ms)")]
    Timeout(u64),
    #[error("no response within the HTTPRoute's backend request timeout ({0} ms)")]
    BackendTimeout(u64),
    #[error(
        "the HTTPRoute's backend Service {0} is not in the view (deleted? check the route's backendRefs)"
    )]
    UnknownBackend(String),
}

impl Failure {
    /// HTTP status and gRPC status code of the proxy's own answer.
    fn response(&self, grpc: bool) -> Response<ProxyBody> {
        let (status, code) = match self {
            Failure::Upstream(e) => return error_response(e, grpc),
            // Linkerd answers an unmatched route the same way (404 and
            // gRPC NOT_FOUND): the request names something that does not
            // exist, which is neither the server's fault nor retryable.
            Failure::NotFound => (StatusCode::NOT_FOUND, GrpcCode::NotFound),
            // A path whose meaning depends on who decodes it: never routed.
            Failure::BadPath(_) => (StatusCode::BAD_REQUEST, GrpcCode::InvalidArgument),
            Failure::Timeout(_) | Failure::BackendTimeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, GrpcCode::DeadlineExceeded)
            }
            // The Gateway API asks for a 500 when a backend is invalid.
            Failure::UnknownBackend(_) => (StatusCode::INTERNAL_SERVER_ERROR, GrpcCode::Internal),
        };
        synthetic(status, code, &self.to_string(), grpc)
    }
}

/// Exponential backoff from the route's base (`backoff_ms`, 0: 25 ms), at
/// most ten times the base.
fn backoff(base_ms: u64, retries: u32) -> Duration {
    let base = if base_ms == 0 { 25 } else { base_ms };
    let factor = 1u64 << retries.saturating_sub(1).min(3);
    Duration::from_millis(base.saturating_mul(factor).min(base.saturating_mul(10)))
}

/// Reads a failed attempt's response to its end when it is small, so its
/// connection can serve the retry: hyper closes an HTTP/1 connection whose
/// response is dropped unread, and the retry would pay a new connection
/// (a new HBONE stream and TLS-protected handshake) for it.
async fn drain(response: Response<ProxyBody>) {
    let small = response
        .body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_REPLAY_BODY as u64);
    if small {
        let body = response.into_body().collect();
        let _ = tokio::time::timeout(Duration::from_secs(1), body).await;
    }
}

/// The request of one attempt: the client's request line and headers
/// with this attempt's body.
fn with_body(parts: &http::request::Parts, body: ProxyBody) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request
}

/// An endpoint the balancer picked for one request; the outcome is
/// reported exactly once (a request the client abandoned is only taken off
/// the in-flight count).
struct Pick {
    balancer: Arc<Balancer<SocketAddr>>,
    target: SocketAddr,
    /// When it was picked: a failure of a request picked before the
    /// endpoint's ejection does not eject it again.
    picked: Instant,
    reported: bool,
}

impl Pick {
    /// Response headers arrived after `latency` (the balancer's signal);
    /// `ok`: not a 5xx.
    fn responded(&mut self, latency: std::time::Duration, ok: bool) -> Verdict {
        self.reported = true;
        self.balancer.responded(&self.target, latency, ok)
    }

    /// Nothing reached the application.
    fn failed(&mut self) -> Verdict {
        self.reported = true;
        self.balancer.failed_since(&self.target, self.picked)
    }

    /// The request failed after reaching the endpoint (reset, timeout).
    fn request_failed(&mut self) -> Verdict {
        self.reported = true;
        self.balancer
            .request_failed_since(&self.target, self.picked)
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
        let e = UpstreamError::Connect(crate::transport::ConnectError::NoIdentity {
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
        let e = UpstreamError::Connect(crate::transport::ConnectError::Hbone(
            weft_hbone::HboneError::Refused {
                target: "10.244.1.2:8080".parse().unwrap(),
                status: StatusCode::FORBIDDEN,
                reason: None,
            },
        ));
        assert!(e.is_forbidden() && !e.is_connect());
        assert_eq!(error_response(&e, false).status(), StatusCode::FORBIDDEN);
        assert_eq!(error_response(&e, true).headers()["grpc-status"], "7");
    }
}
