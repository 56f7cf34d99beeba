//! HTTP client connections to endpoints, reused across requests.
//!
//! Requests leave in the protocol the client used (HTTP/1.1 stays HTTP/1.1,
//! HTTP/2 and gRPC stay HTTP/2), each over its own transport: an HBONE
//! stream for an enrolled endpoint, a plain TCP connection from the pod's
//! namespace otherwise. The pool is keyed by (source pod, endpoint,
//! protocol, tunnel): connections leave from the source pod's address and
//! present its identity, so two pods never share one.
//!
//! - HTTP/2: one connection per key, multiplexing every request.
//! - HTTP/1.1: a stack of idle keep-alive connections per key (bounded); a
//!   connection is put back after the response headers arrive and is taken
//!   again only once hyper says it is ready (its previous response body
//!   finished). A request that finds its pooled connection closed under it
//!   (the server timed out the idle connection at that very moment) is
//!   retried once on a new connection: hyper hands back a request it did
//!   not start to send, so nothing is sent twice.
//!
//! A reaper drops connections idle for [`IDLE_TIMEOUT`], which also frees
//! their HBONE stream slots.
//!
//! Mutual-TLS connections (to a peer node proxy, or in an HBONE tunnel) are
//! tagged with the trust generation they were made under, and
//! [`UpstreamPool::retire_mutual_tls`] takes them all out of use when the
//! trust bundle changes: no new request goes on a connection whose peer was
//! verified under a bundle that may have lost an anchor since. Requests
//! running on one finish.

use super::body::ProxyBody;
use crate::transport::{ConnectError, Upstream};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use weft_stream::Protocol;

/// How long an unused upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle HTTP/1.1 connections kept per key: enough for a burst's worth of
/// concurrency to be reused, bounded so one burst does not pin hundreds of
/// connections (and HBONE streams).
const MAX_IDLE_HTTP1: usize = 32;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct UpstreamKey {
    /// The source pod's uid.
    pub pod: String,
    pub target: SocketAddr,
    pub protocol: Protocol,
    /// Through an HBONE tunnel (true) or plain.
    pub mtls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP handshake with {target} failed: {source}")]
    Handshake {
        target: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {target} failed: {source}")]
    Request {
        target: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Nothing reached the endpoint (it may be dead): the balancer should
    /// back it off. A failed request on a working connection is not that.
    pub fn is_connect(&self) -> bool {
        !self.is_forbidden()
            && matches!(
                self,
                UpstreamError::Connect(_) | UpstreamError::Handshake { .. }
            )
    }

    /// The peer refused the request before processing it: its HTTP/2
    /// connection was closing (GOAWAY beyond the stream: RFC 9113 §6.8),
    /// it refused the stream (REFUSED_STREAM, §8.7), or the request never
    /// left. Any method may be sent again, on another connection.
    pub fn is_refused_unprocessed(&self) -> bool {
        match self {
            UpstreamError::Request { source, .. } => refused_unprocessed(source),
            _ => false,
        }
    }

    /// The destination proxy refused the tunnel with 403: its inbound
    /// policy does not allow this client. Not the endpoint's failure.
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(ConnectError::Hbone(weft_hbone::HboneError::Refused {
                status: http::StatusCode::FORBIDDEN,
                ..
            }))
        )
    }
}

/// A copy of `request` to send again if a reused connection closes under
/// it: only for a request without a body whose method is idempotent
/// (`None` otherwise). Extensions are not copied (a header-case map only).
fn resendable_head(request: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    use hyper::body::Body;
    if !request.method().is_idempotent() || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version())
        .body(super::body::proxy_body(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
        .ok()?;
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// Whether hyper's error says the peer did not process the request (see
/// [`UpstreamError::is_refused_unprocessed`]).
pub fn refused_unprocessed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
    h2.is_some_and(|h2| {
        h2.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
    })
}

struct IdleH1 {
    send: http1::SendRequest<ProxyBody>,
    since: Instant,
    /// The trust generation it was made under.
    trust: u64,
}

struct SharedH2 {
    send: HttpTwo,
    last_used: Instant,
    /// No new request after this instant: the peer's identity expires.
    expires: Option<Instant>,
}

impl SharedH2 {
    fn usable(&self, now: Instant) -> bool {
        !self.send.send.is_closed() && self.expires.is_none_or(|at| now < at)
    }
}

/// A shared HTTP/2 connection, and the target its requests name, if they
/// must (a peer node proxy's connection for requests,
/// [`weft_hbone::TARGET_HEADER`]): made once per connection, not per
/// request.
#[derive(Clone)]
struct HttpTwo {
    send: http2::SendRequest<ProxyBody>,
    target: Option<http::HeaderValue>,
}

impl HttpTwo {
    /// Names the target on a connection for requests; elsewhere no
    /// client's own header of that name goes on.
    fn address(&self, request: &mut Request<ProxyBody>) {
        let headers = request.headers_mut();
        match &self.target {
            Some(target) => headers.insert(weft_hbone::TARGET_HEADER, target.clone()),
            None => headers.remove(weft_hbone::TARGET_HEADER),
        };
    }
}

#[derive(Default)]
struct Inner {
    h1: Mutex<HashMap<UpstreamKey, Vec<IdleH1>>>,
    h2: Mutex<HashMap<UpstreamKey, SharedH2>>,
    /// Counts the trust bundles seen ([`UpstreamPool::retire_mutual_tls`]).
    /// Bumped, and its connections retired, under the `h1` and `h2` locks,
    /// so a connection is pooled under the generation it was made in or
    /// not at all.
    trust: AtomicU64,
    /// One HTTP/2 connection attempt per key at a time: a burst of gRPC
    /// calls to a cold endpoint shares one connection.
    h2_connecting: Mutex<HashMap<UpstreamKey, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Clone)]
pub struct UpstreamPool {
    inner: Arc<Inner>,
}

impl Default for UpstreamPool {
    fn default() -> Self {
        Self::new()
    }
}

impl UpstreamPool {
    /// Creates the pool and its idle reaper (needs a Tokio runtime).
    pub fn new() -> Self {
        let inner = Arc::new(Inner::default());
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Sends `request` to the endpoint of `key`, reusing a pooled
    /// connection or making one with `connect`. `reusable`: false for a
    /// request that takes the connection over (an HTTP/1 upgrade).
    pub async fn send<C, F>(
        &self,
        key: &UpstreamKey,
        connect: C,
        request: Request<ProxyBody>,
        reusable: bool,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        C: Fn() -> F,
        F: Future<Output = Result<Upstream, ConnectError>>,
    {
        match key.protocol {
            Protocol::Http2 => self.send_h2(key, connect, request).await,
            _ => self.send_h1(key, connect, request, reusable).await,
        }
    }

    async fn send_h1<C, F>(
        &self,
        key: &UpstreamKey,
        connect: C,
        request: Request<ProxyBody>,
        reusable: bool,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        C: Fn() -> F,
        F: Future<Output = Result<Upstream, ConnectError>>,
    {
        let target = key.target;
        let mut request = request;
        if let Some((mut send, trust)) = self.checkout_h1(key) {
            // An idle keep-alive connection may be closed by the server
            // (its idle timeout, a draining node proxy) just as the request
            // goes out: it then ends before any response, and the server
            // processed nothing. A request without a body whose method is
            // idempotent can be sent again on a fresh connection, as
            // browsers and HTTP clients do; others fail as before.
            let again = resendable_head(&request);
            match send.try_send_request(request).await {
                Ok(response) => {
                    if reusable {
                        self.checkin_h1(key, send, trust);
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Not sent at all: the connection was gone. Try a new one.
                    Some(unsent) => request = unsent,
                    None => {
                        let source = e.into_error();
                        match again {
                            Some(head) if source.is_incomplete_message() => {
                                tracing::debug!(%target, "a reused connection closed under an idempotent request: sent again on a new one");
                                request = head;
                            }
                            _ => return Err(UpstreamError::Request { target, source }),
                        }
                    }
                },
            }
        }
        let (upstream, trust) = self.connect_trusted(key, &connect).await?;
        let mut send = handshake_h1(upstream, target).await?;
        let response = send
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Request { target, source })?;
        if reusable {
            self.checkin_h1(key, send, trust);
        }
        Ok(response)
    }

    /// An idle connection for `key`, and the trust generation it was made
    /// under.
    fn checkout_h1(&self, key: &UpstreamKey) -> Option<(http1::SendRequest<ProxyBody>, u64)> {
        let mut idle = self.inner.h1.lock().expect("pool lock");
        let list = idle.get_mut(key)?;
        list.retain(|c| !c.send.is_closed());
        // Most recently returned first: the warmest connection, and the one
        // least likely to have been timed out by the server.
        let i = list.iter().rposition(|c| c.send.is_ready())?;
        let c = list.remove(i);
        Some((c.send, c.trust))
    }

    /// Pools a connection again, unless the trust bundle changed since it
    /// was made (it was in use when its generation was retired).
    fn checkin_h1(&self, key: &UpstreamKey, send: http1::SendRequest<ProxyBody>, trust: u64) {
        let mut idle = self.inner.h1.lock().expect("pool lock");
        if key.mtls && trust != self.inner.trust.load(Ordering::Acquire) {
            return;
        }
        let list = idle.entry(key.clone()).or_default();
        if list.len() < MAX_IDLE_HTTP1 {
            list.push(IdleH1 {
                send,
                since: Instant::now(),
                trust,
            });
        }
    }

    /// A new transport for `key` from `connect`, and the trust generation
    /// it was made under. A mutual-TLS one made while the trust bundle
    /// changed may have verified its peer under the old bundle: it is
    /// dropped and made again.
    async fn connect_trusted<C, F>(
        &self,
        key: &UpstreamKey,
        connect: &C,
    ) -> Result<(Upstream, u64), ConnectError>
    where
        C: Fn() -> F,
        F: Future<Output = Result<Upstream, ConnectError>>,
    {
        loop {
            let trust = self.inner.trust.load(Ordering::Acquire);
            let upstream = connect().await?;
            if !key.mtls || trust == self.inner.trust.load(Ordering::Acquire) {
                return Ok((upstream, trust));
            }
            tracing::debug!(target = %key.target, "the trust bundle changed during the handshake: connecting again");
        }
    }

    /// Takes every mutual-TLS connection out of use: the trust bundle
    /// changed, and a peer verified under the old one may no longer be
    /// trusted. Requests running on one finish; the next request to the
    /// same endpoint makes a new connection, verified under the current
    /// bundle. Returns how many pooled connections were retired.
    pub fn retire_mutual_tls(&self) -> usize {
        let mut idle = self.inner.h1.lock().expect("pool lock");
        let mut shared = self.inner.h2.lock().expect("pool lock");
        self.inner.trust.fetch_add(1, Ordering::AcqRel);
        let before = shared.len() + idle.values().map(Vec::len).sum::<usize>();
        shared.retain(|k, _| !k.mtls);
        idle.retain(|k, _| !k.mtls);
        before - shared.len() - idle.values().map(Vec::len).sum::<usize>()
    }

    async fn send_h2<C, F>(
        &self,
        key: &UpstreamKey,
        connect: C,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        C: Fn() -> F,
        F: Future<Output = Result<Upstream, ConnectError>>,
    {
        let target = key.target;
        let mut request = request;
        let mut conn = match self.shared_h2(key) {
            Some(conn) => conn,
            None => self.connect_h2(key, &connect).await?,
        };
        conn.address(&mut request);
        let mut request = match conn.send.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(mut e) => match e.take_message() {
                Some(unsent) => unsent,
                None => {
                    let source = e.into_error();
                    if refused_unprocessed(&source) {
                        // The peer is closing this connection (a draining
                        // node proxy's GOAWAY): the caller's resend must
                        // find a fresh one.
                        self.inner.h2.lock().expect("pool lock").remove(key);
                    }
                    return Err(UpstreamError::Request { target, source });
                }
            },
        };
        // The shared connection closed before taking the request: once
        // more on a fresh one.
        self.inner.h2.lock().expect("pool lock").remove(key);
        let mut conn = self.connect_h2(key, &connect).await?;
        conn.address(&mut request);
        conn.send
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Request { target, source })
    }

    fn shared_h2(&self, key: &UpstreamKey) -> Option<HttpTwo> {
        let mut shared = self.inner.h2.lock().expect("pool lock");
        let entry = shared.get_mut(key)?;
        let now = Instant::now();
        if !entry.usable(now) {
            // Requests still running on it hold clones and finish.
            shared.remove(key);
            return None;
        }
        entry.last_used = now;
        Some(entry.send.clone())
    }

    async fn connect_h2<C, F>(
        &self,
        key: &UpstreamKey,
        connect: &C,
    ) -> Result<HttpTwo, UpstreamError>
    where
        C: Fn() -> F,
        F: Future<Output = Result<Upstream, ConnectError>>,
    {
        let gate = self
            .inner
            .h2_connecting
            .lock()
            .expect("pool lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        loop {
            if let Some(send) = self.shared_h2(key) {
                return Ok(send);
            }
            let (upstream, trust) = self.connect_trusted(key, connect).await?;
            if let Some(send) = self.pool_h2(key, upstream, trust).await? {
                return Ok(send);
            }
            tracing::debug!(target = %key.target, "the trust bundle changed during the handshake: connecting again");
        }
    }

    /// Pools an HTTP/2 connection on `upstream` for `key`; `None` when
    /// the trust bundle changed since `trust` (it is dropped).
    async fn pool_h2(
        &self,
        key: &UpstreamKey,
        upstream: Upstream,
        trust: u64,
    ) -> Result<Option<HttpTwo>, UpstreamError> {
        let target = upstream.names_targets().then(|| {
            http::HeaderValue::try_from(key.target.to_string())
                .expect("an address is a valid header value")
        });
        // On the runtime's clock, as every pool's expiry.
        let expires = upstream.expires().map(|at| {
            Instant::now()
                + at.duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO)
        });
        let send = HttpTwo {
            send: handshake_h2(upstream, key.target).await?,
            target,
        };
        let mut shared = self.inner.h2.lock().expect("pool lock");
        if key.mtls && trust != self.inner.trust.load(Ordering::Acquire) {
            return Ok(None);
        }
        shared.insert(
            key.clone(),
            SharedH2 {
                send: send.clone(),
                last_used: Instant::now(),
                expires,
            },
        );
        Ok(Some(send))
    }

    /// Retires the pool's mutual-TLS connections whenever `bundle` (the
    /// trust bundle peers are verified under) changes, from a task of its
    /// own that ends with the pool. Needs a Tokio runtime.
    pub fn follow_trust_bundle<T: Send + Sync + 'static>(&self, mut bundle: watch::Receiver<T>) {
        bundle.mark_unchanged();
        let pool = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while bundle.changed().await.is_ok() {
                let Some(inner) = pool.upgrade() else { return };
                let retired = UpstreamPool { inner }.retire_mutual_tls();
                tracing::info!(
                    retired,
                    "trust bundle changed: HTTP connections to peers are made again under it"
                );
            }
        });
    }

    /// Pooled connections (idle HTTP/1.1 ones and shared HTTP/2 ones).
    pub fn connections(&self) -> usize {
        let h1: usize = self
            .inner
            .h1
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum();
        h1 + self.inner.h2.lock().expect("pool lock").len()
    }
}

/// An HTTP/1.1 client connection on `io` to `target` (an endpoint, or the
/// local application on the destination side), driven by a task of its
/// own; upgrades after a 101 are handed over.
pub async fn handshake_h1<IO>(
    io: IO,
    target: SocketAddr,
) -> Result<http1::SendRequest<ProxyBody>, UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { target, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%target, error = %e, "HTTP/1 client connection ended");
        }
    });
    Ok(send)
}

/// An HTTP/2 client connection on `io` to `target`, driven by a task of
/// its own. Its peer is another node proxy (HBONE), a workload's server or
/// the local application.
///
/// No cap on locally caused resets here: as a client, the proxy resets
/// only streams it opened itself, on behalf of its own clients (a cancelled
/// call; the server's DATA in flight for it may arrive after h2 forgot the
/// stream), so a server cannot make it do more work than its clients asked
/// for; the cap would only close, one day, a healthy connection that many
/// calls share. The servers of the proxy's client connections keep h2's
/// cap ([`super::LOCAL_ERROR_RESET_LIMIT`]).
pub async fn handshake_h2<IO>(
    io: IO,
    target: SocketAddr,
) -> Result<http2::SendRequest<ProxyBody>, UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The connection's driver and its request bodies run on the task
    // below, not one each; their writes are held to the end of each of its
    // polls, so a request's HEADERS and the body's DATA in hand leave in
    // one write (`corked_io`).
    let (exec, started) = super::connection_tasks::ConnectionTasks::new();
    let (io, cork) = super::corked_io::cork(io);
    let (send, conn) = http2::Builder::new(exec)
        .max_local_error_reset_streams(None)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { target, source })?;
    tokio::spawn(async move {
        if let Err(e) = started.drive_corked(conn, cork).await {
            tracing::debug!(%target, error = %e, "HTTP/2 client connection ended");
        }
    });
    Ok(send)
}

async fn reap_idle(pool: Weak<Inner>) {
    let period = IDLE_TIMEOUT / 3;
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        {
            let mut idle = pool.h1.lock().expect("pool lock");
            for list in idle.values_mut() {
                list.retain(|c| !c.send.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT);
            }
            idle.retain(|_, list| !list.is_empty());
        }
        // Dropping the pool's handle to an HTTP/2 connection closes it once
        // the requests still running on it (holding clones) finish.
        pool.h2
            .lock()
            .expect("pool lock")
            .retain(|_, c| c.usable(now) && now.duration_since(c.last_used) < IDLE_TIMEOUT);
        pool.h2_connecting
            .lock()
            .expect("pool lock")
            .retain(|_, gate| Arc::strong_count(gate) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::{TcpListener, TcpStream};

    /// A loopback HTTP server (HTTP/1.1 or h2c) that counts its connections;
    /// `keep_alive: false` closes each HTTP/1.1 connection after a response.
    async fn server(protocol: Protocol, keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let (addr, accepted, _, _) = holding_server(protocol, keep_alive).await;
        (addr, accepted)
    }

    fn key(target: SocketAddr, protocol: Protocol) -> UpstreamKey {
        UpstreamKey {
            pod: "uid".into(),
            target,
            protocol,
            mtls: false,
        }
    }

    async fn get(pool: &UpstreamPool, k: &UpstreamKey) -> Bytes {
        get_path(pool, k, "/").await
    }

    /// GET `path` of `k`'s target through `pool`: the body.
    async fn get_path(pool: &UpstreamPool, k: &UpstreamKey, path: &str) -> Bytes {
        let target = k.target;
        let connect = move || async move {
            TcpStream::connect(target)
                .await
                .map(Upstream::Plain)
                .map_err(|source| ConnectError::Tcp { target, source })
        };
        let request = Request::builder()
            .uri(format!("http://{target}{path}"))
            .body(Empty::<Bytes>::new().map_err(|n| match n {}).boxed())
            .unwrap();
        let response = pool.send(k, connect, request, true).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn sequential_http1_requests_reuse_one_keep_alive_connection() {
        let (addr, accepted) = server(Protocol::Http1, true).await;
        let pool = UpstreamPool::new();
        let k = key(addr, Protocol::Http1);
        for _ in 0..5 {
            assert_eq!(get(&pool, &k).await, "ok");
            // hyper marks the connection ready again once its dispatcher
            // task has seen the end of the body; give it its turns (the
            // test runtime is single-threaded: this is deterministic).
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        }
        assert!(
            accepted.load(Ordering::SeqCst) == 1,
            "{} connections for 5 sequential requests",
            accepted.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_without_failing_a_request() {
        let (addr, accepted) = server(Protocol::Http1, false).await;
        let pool = UpstreamPool::new();
        let k = key(addr, Protocol::Http1);
        for _ in 0..5 {
            assert_eq!(get(&pool, &k).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    /// A server whose first connection answers one request, then closes
    /// when the next request arrives, without answering it (a keep-alive
    /// close that crossed the request); later connections answer all.
    async fn closing_server() -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut answered = 0;
                    loop {
                        let mut head = Vec::new();
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => head.extend_from_slice(&buf[..k]),
                            }
                        }
                        if n == 0 && answered == 1 {
                            return; // closes under the second request
                        }
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                        answered += 1;
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn send_method(
        pool: &UpstreamPool,
        k: &UpstreamKey,
        method: http::Method,
        body: &'static [u8],
    ) -> Result<Bytes, UpstreamError> {
        let target = k.target;
        let connect = move || async move {
            TcpStream::connect(target)
                .await
                .map(Upstream::Plain)
                .map_err(|source| ConnectError::Tcp { target, source })
        };
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{target}/"))
            .body(
                http_body_util::Full::new(Bytes::from_static(body))
                    .map_err(|n| match n {})
                    .boxed(),
            )
            .unwrap();
        let response = pool.send(k, connect, request, true).await?;
        Ok(response.into_body().collect().await.unwrap().to_bytes())
    }

    async fn settle() {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_idempotent_request_a_reused_connection_closed_under_is_sent_again() {
        let (addr, accepted) = closing_server().await;
        let pool = UpstreamPool::new();
        let k = key(addr, Protocol::Http1);
        let get = http::Method::GET;
        assert_eq!(
            send_method(&pool, &k, get.clone(), b"").await.unwrap(),
            "ok"
        );
        settle().await;
        // Reuses the kept connection, which closes under it: sent again.
        assert_eq!(send_method(&pool, &k, get, b"").await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_post_a_reused_connection_closed_under_fails_as_before() {
        let (addr, accepted) = closing_server().await;
        let pool = UpstreamPool::new();
        let k = key(addr, Protocol::Http1);
        let post = http::Method::POST;
        assert_eq!(
            send_method(&pool, &k, post.clone(), b"a").await.unwrap(),
            "ok"
        );
        settle().await;
        let err = send_method(&pool, &k, post, b"b").await.unwrap_err();
        assert!(matches!(err, UpstreamError::Request { .. }), "{err}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "not sent again");
    }

    /// Like [`server`], and its `/hold` requests are answered only once
    /// `release` is notified; `arrived` hears of each when it reaches the
    /// server.
    async fn holding_server(
        protocol: Protocol,
        keep_alive: bool,
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        Arc<tokio::sync::Notify>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let held = release.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (arrived_tx, held) = (arrived_tx.clone(), held.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (arrived_tx, held) = (arrived_tx.clone(), held.clone());
                    async move {
                        let body = if req.uri().path() == "/hold" {
                            let _ = arrived_tx.send(());
                            held.notified().await;
                            "held"
                        } else {
                            "ok"
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(body.as_bytes()),
                        )))
                    }
                });
                let io = TokioIo::new(tcp);
                tokio::spawn(async move {
                    let _ = match protocol {
                        Protocol::Http2 => {
                            hyper::server::conn::http2::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(io, service)
                            .await
                        }
                        _ => {
                            hyper::server::conn::http1::Builder::new()
                                .keep_alive(keep_alive)
                                .serve_connection(io, service)
                                .await
                        }
                    };
                });
            }
        });
        (addr, accepted, arrived, release)
    }

    /// When the trust bundle changes, no new request goes on a mutual-TLS
    /// connection made before: the next one makes a new connection, while
    /// a request running on the old one finishes; a connection outside the
    /// mesh (no peer identity verified) is kept.
    #[tokio::test]
    async fn after_a_trust_bundle_change_http2_requests_take_a_new_mutual_tls_connection() {
        let (addr, accepted, mut arrived, release) = holding_server(Protocol::Http2, true).await;
        let (plain_addr, plain_accepted) = server(Protocol::Http2, true).await;
        let pool = UpstreamPool::new();
        let meshed = UpstreamKey {
            mtls: true,
            ..key(addr, Protocol::Http2)
        };
        let plain = key(plain_addr, Protocol::Http2);
        assert_eq!(get_path(&pool, &meshed, "/").await, "ok");
        assert_eq!(get_path(&pool, &plain, "/").await, "ok");
        let in_flight = tokio::spawn({
            let (pool, meshed) = (pool.clone(), meshed.clone());
            async move { get_path(&pool, &meshed, "/hold").await }
        });
        arrived.recv().await.unwrap();

        assert_eq!(pool.retire_mutual_tls(), 1, "the meshed connection only");
        assert_eq!(get_path(&pool, &meshed, "/").await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
        release.notify_one();
        assert_eq!(
            in_flight.await.unwrap(),
            "held",
            "the old one's request finishes"
        );
        assert_eq!(get_path(&pool, &plain, "/").await, "ok");
        assert_eq!(plain_accepted.load(Ordering::SeqCst), 1, "kept");
        assert_eq!(get_path(&pool, &meshed, "/").await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the new one is pooled");
    }

    /// HTTP/1.1: an idle keep-alive connection is dropped at the change,
    /// and one in use then is not pooled again after its response.
    #[tokio::test]
    async fn after_a_trust_bundle_change_http1_keep_alive_connections_are_not_reused() {
        let (addr, accepted, mut arrived, release) = holding_server(Protocol::Http1, true).await;
        let pool = UpstreamPool::new();
        let meshed = UpstreamKey {
            mtls: true,
            ..key(addr, Protocol::Http1)
        };
        assert_eq!(get_path(&pool, &meshed, "/").await, "ok");
        settle().await;
        assert_eq!(pool.retire_mutual_tls(), 1, "the idle one");
        assert_eq!(get_path(&pool, &meshed, "/").await, "ok");
        settle().await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // In use (taken out of the pool) when the bundle changes.
        let in_flight = tokio::spawn({
            let (pool, meshed) = (pool.clone(), meshed.clone());
            async move { get_path(&pool, &meshed, "/hold").await }
        });
        arrived.recv().await.unwrap();
        assert_eq!(pool.retire_mutual_tls(), 0, "nothing idle");
        release.notify_one();
        assert_eq!(in_flight.await.unwrap(), "held");
        settle().await;
        assert_eq!(pool.connections(), 0, "not pooled again");
        assert_eq!(get_path(&pool, &meshed, "/").await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "a new connection");
    }

    #[tokio::test]
    async fn concurrent_http2_requests_share_one_connection() {
        let (addr, accepted) = server(Protocol::Http2, true).await;
        let pool = UpstreamPool::new();
        let k = key(addr, Protocol::Http2);
        let all = futures::future::join_all((0..10).map(|_| get(&pool, &k))).await;
        assert!(all.iter().all(|b| b == "ok"));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.connections(), 1);
    }
}

#[cfg(test)]
mod corked_tests {
    use super::handshake_h2;
    use crate::l7::body::proxy_body;
    use crate::l7::corked_io::HOLD_AT_MOST;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::io;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, ready};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// The bytes of every write the client connection made to its socket.
    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    /// An IO that logs each write it is given.
    struct LoggedWrites<IO> {
        io: IO,
        writes: Writes,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for LoggedWrites<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<IO: AsyncWrite + Unpin> AsyncWrite for LoggedWrites<IO> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.writes.lock().unwrap().push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// The HTTP/2 frames (type, stream) a write carries, if it holds whole
    /// frames (the connection preface is skipped).
    fn frames(mut write: &[u8]) -> Vec<(u8, u32)> {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        write = write.strip_prefix(PREFACE).unwrap_or(write);
        let mut frames = Vec::new();
        while write.len() >= 9 {
            let len = u32::from_be_bytes([0, write[0], write[1], write[2]]) as usize;
            let stream = u32::from_be_bytes([write[5], write[6], write[7], write[8]]) & 0x7fff_ffff;
            frames.push((write[3], stream));
            write = &write[(9 + len).min(write.len())..];
        }
        frames
    }

    const HEADERS: u8 = 0x1;
    const DATA: u8 = 0x0;

    /// An HTTP/2 server that answers each request with its body's length.
    fn length_server(io: tokio::io::DuplexStream) {
        let service =
            hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async {
                let body = request.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(
                    body.len().to_string(),
                ))))
            });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service),
        );
    }

    async fn post(
        send: &mut hyper::client::conn::http2::SendRequest<crate::l7::body::ProxyBody>,
        body: Vec<u8>,
    ) -> String {
        let request = http::Request::post("http://app/upload")
            .body(proxy_body(Full::new(Bytes::from(body))))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    /// A request whose body is in hand leaves in one write, HEADERS and
    /// DATA together (`corked_io`; without the cork: two writes, the
    /// HEADERS flushed first); a body larger than what is held still
    /// arrives whole.
    #[tokio::test]
    async fn a_requests_headers_and_data_leave_in_one_write() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        length_server(server_io);
        let writes = Writes::default();
        let io = LoggedWrites {
            io: client_io,
            writes: writes.clone(),
        };
        let mut send = handshake_h2(io, "127.0.0.1:1".parse().unwrap())
            .await
            .unwrap();
        for stream in [1u32, 3, 5] {
            assert_eq!(post(&mut send, vec![b'x'; 100]).await, "100");
            let writes = writes.lock().unwrap();
            let carrying: Vec<Vec<(u8, u32)>> = writes
                .iter()
                .map(|w| frames(w))
                .filter(|f| {
                    f.iter()
                        .any(|(kind, id)| *id == stream && (*kind == HEADERS || *kind == DATA))
                })
                .collect();
            assert!(
                carrying.len() == 1
                    && carrying[0].contains(&(HEADERS, stream))
                    && carrying[0].contains(&(DATA, stream)),
                "stream {stream}'s HEADERS and DATA in one write: {carrying:?}"
            );
        }
        let large = HOLD_AT_MOST * 4;
        assert_eq!(post(&mut send, vec![b'y'; large]).await, large.to_string());
    }
}
