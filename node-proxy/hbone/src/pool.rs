//! Client side: HBONE connections to other node proxies, reused.
//!
//! A TLS handshake costs far more than an HTTP/2 stream, so connections are
//! kept and multiplexed: one per key until it carries `max_streams` streams,
//! then another. The key is chosen by the caller; the node proxy uses
//! (source pod, destination identity, destination address). It is per
//! source *pod* rather than per source identity because connections are
//! made from inside the source pod's network namespace so that traffic
//! leaves from the pod's own IP: sharing one between two pods of the same
//! service account would put one pod's address on the other's traffic.
//!
//! Idle connections (no stream for `idle_timeout`) are closed by a reaper;
//! a connection whose peer went away is dropped on the next lookup.
//!
//! A connection carries no new stream once the peer's certificate has
//! expired (its identity no longer holds), nor after [`HbonePool::retire_all`]
//! (the trust bundle changed: connections are made again under the new
//! one). Streams already open on it finish; when the last one ends, the
//! connection is closed (GOAWAY).

use crate::HboneError;
use crate::server::{CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::stream::H2Stream;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, StatusCode};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// A byte stream an HBONE connection runs over (in production, TLS over TCP).
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// Opens the transport for a key (TCP connect from the right namespace, TLS
/// handshake with the right certificates and peer identity check).
pub type Connector<K> =
    Arc<dyn Fn(K) -> BoxFuture<'static, Result<Connected, HboneError>> + Send + Sync>;

/// A transport the connector opened, and until when the peer's identity
/// holds (its certificate's `notAfter`; `None`: unbounded, for tests).
pub struct Connected {
    pub io: Box<dyn Transport>,
    pub peer_expires: Option<std::time::SystemTime>,
    /// Which trust bundle the peer was verified under, as the connector
    /// counts them ([`HbonePool::retire_before`]).
    pub bundle_epoch: u64,
}

impl Connected {
    pub fn new(io: Box<dyn Transport>) -> Self {
        Self {
            io,
            peer_expires: None,
            bundle_epoch: 0,
        }
    }

    pub fn expiring_at(mut self, at: Option<std::time::SystemTime>) -> Self {
        self.peer_expires = at;
        self
    }

    pub fn under_bundle(mut self, epoch: u64) -> Self {
        self.bundle_epoch = epoch;
        self
    }
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_streams_per_connection: usize,
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: MAX_CONCURRENT_STREAMS as usize,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

struct Conn {
    send: h2::client::SendRequest<Bytes>,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Cleared by the connection's driver task when it ends. That task must
    /// hold only this flag: a handle to the `Conn` would keep its
    /// `SendRequest` alive, and h2 closes a connection only once every
    /// `SendRequest` is gone.
    alive: Arc<AtomicBool>,
    addr: SocketAddr,
    /// No new stream from this instant (the peer's certificate expires).
    expires: Option<Instant>,
    /// The trust bundle the peer was verified under ([`Connected`]).
    bundle_epoch: u64,
}

impl Conn {
    fn usable(&self, now: Instant) -> bool {
        self.alive.load(Ordering::Relaxed) && self.expires.is_none_or(|at| now < at)
    }
}

type Slots<K> = HashMap<K, Vec<Arc<Conn>>>;

pub struct HbonePool<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    config: PoolConfig,
    connector: Connector<K>,
    conns: Mutex<Slots<K>>,
    /// One connection attempt per key at a time, so a burst of new
    /// connections to a cold destination makes one handshake, not fifty.
    connecting: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> HbonePool<K> {
    /// Creates the pool and its idle reaper (needs a Tokio runtime).
    pub fn new(config: PoolConfig, connector: Connector<K>) -> Self {
        let inner = Arc::new(Inner {
            config,
            connector,
            conns: Mutex::default(),
            connecting: Mutex::default(),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Opens a stream to `target` over a pooled connection for `key`,
    /// connecting to `addr` (the destination's `podIP:15008`) if needed.
    pub async fn open(
        &self,
        key: K,
        addr: SocketAddr,
        target: SocketAddr,
    ) -> Result<H2Stream, HboneError> {
        self.open_with(key, addr, target, None).await
    }

    /// Like [`HbonePool::open`], telling the destination what the stream
    /// carries ([`super::PROTOCOL_HEADER`]).
    pub async fn open_with(
        &self,
        key: K,
        addr: SocketAddr,
        target: SocketAddr,
        protocol: Option<&'static str>,
    ) -> Result<H2Stream, HboneError> {
        self.open_sending(key, addr, target, protocol, Bytes::new())
            .await
    }

    /// Like [`HbonePool::open_with`], sending `first` (bytes the client
    /// already wrote) right behind the CONNECT instead of after its answer:
    /// the destination proxy holds them in the stream until it has checked
    /// the client and connected to the application, and the client's first
    /// message does not wait a round trip between the nodes. A refused
    /// stream delivered none of them: the caller may send them elsewhere.
    pub async fn open_sending(
        &self,
        key: K,
        addr: SocketAddr,
        target: SocketAddr,
        protocol: Option<&'static str>,
        first: Bytes,
    ) -> Result<H2Stream, HboneError> {
        let (conn, pooled) = match self.inner.lease(&key) {
            Some(conn) => (conn, true),
            None => (self.connect(key.clone(), addr).await?, false),
        };
        match open_on(&conn, target, protocol, &first).await {
            // The peer certainly did not process the CONNECT (a draining
            // node proxy's GOAWAY, a connection already closed): once more
            // on a fresh connection, which a restarted peer accepts. Only
            // then: a CONNECT the destination may have decided would be
            // decided twice, and its first bytes maybe delivered twice.
            Err(HboneError::H2 {
                unprocessed: true, ..
            }) if pooled => {
                conn.alive.store(false, Ordering::Relaxed);
                let conn = self.connect(key, addr).await?;
                open_on(&conn, target, protocol, &first).await
            }
            other => other,
        }
    }

    /// Takes every pooled connection out of use (the trust bundle
    /// changed): new streams go on new connections, verified under the
    /// current bundle; streams open on the old ones finish, then each is
    /// closed. Returns how many were retired.
    pub fn retire_all(&self) -> usize {
        self.retire_before(u64::MAX)
    }

    /// Like [`HbonePool::retire_all`], for the connections verified under a
    /// bundle older than `epoch` only: one made under the current bundle
    /// (the change was seen late) is kept.
    pub fn retire_before(&self, epoch: u64) -> usize {
        let mut conns = self.inner.conns.lock().expect("pool lock");
        let mut retired = 0;
        // The pool's handles go; a connection lives on while a stream's
        // lease holds it, and closes (GOAWAY) when the last one drops.
        for list in conns.values_mut() {
            let before = list.len();
            list.retain(|c| c.bundle_epoch >= epoch);
            retired += before - list.len();
        }
        conns.retain(|_, list| !list.is_empty());
        retired
    }

    /// Connections currently pooled (for `/config_dump` and tests).
    pub fn connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .expect("pool lock")
            .values()
            .map(|v| v.iter().filter(|c| c.alive.load(Ordering::Relaxed)).count())
            .sum()
    }

    async fn connect(&self, key: K, addr: SocketAddr) -> Result<Arc<Conn>, HboneError> {
        let gate = self
            .inner
            .connecting
            .lock()
            .expect("pool lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        // Someone else may have connected while we waited.
        if let Some(conn) = self.inner.lease(&key) {
            return Ok(conn);
        }
        let Connected {
            io,
            peer_expires,
            bundle_epoch,
        } = (self.inner.connector)(key.clone()).await?;
        // On the runtime's clock, so paused time in tests drives it too.
        let expires = peer_expires.map(|at| {
            Instant::now()
                + at.duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO)
        });
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| HboneError::H2 {
                addr,
                source,
                unprocessed: true,
            })?;
        let conn = Arc::new(Conn {
            send,
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            alive: Arc::new(AtomicBool::new(true)),
            addr,
            expires,
            bundle_epoch,
        });
        let alive = conn.alive.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "HBONE connection ended");
            }
            alive.store(false, Ordering::Relaxed);
        });
        self.inner
            .conns
            .lock()
            .expect("pool lock")
            .entry(key)
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }
}

/// Whether h2's error for a sent stream says that the peer did not process
/// it: a GOAWAY whose last stream ID is below the stream (h2 fails exactly
/// those streams with the GOAWAY's error; RFC 9113 §6.8), or a
/// RST_STREAM(REFUSED_STREAM) (§8.7). A stream at or below a GOAWAY's last
/// stream ID that the connection's end cuts short fails with an I/O error
/// instead, like any stream of a connection that died: the peer may have
/// processed it.
fn peer_did_not_process(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Opens a CONNECT stream to `target` on `conn` (its stream slot already
/// counted: released when the stream is dropped, or on failure), `first`
/// sent before the answer.
async fn open_on(
    conn: &Arc<Conn>,
    target: SocketAddr,
    protocol: Option<&'static str>,
    first: &Bytes,
) -> Result<H2Stream, HboneError> {
    let lease = Lease(conn.clone());
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string());
    if let Some(protocol) = protocol {
        request = request.header(super::PROTOCOL_HEADER, protocol);
    }
    let request = request
        .body(())
        .expect("CONNECT to ip:port with a token header is a valid request");
    let h2_err = |source, unprocessed| HboneError::H2 {
        addr: conn.addr,
        source,
        unprocessed,
    };
    let unprocessed = |source| h2_err(source, true);
    let maybe_processed = |source| h2_err(source, false);
    // Nothing of the stream was sent when these fail.
    let mut send = conn.send.clone().ready().await.map_err(unprocessed)?;
    let (response, mut stream) = send.send_request(request, false).map_err(unprocessed)?;
    // Queued by h2 behind the HEADERS frame (the stream's window, 4 MiB at
    // our peers, is far above what detection reads). The HEADERS may be on
    // the wire already and the stream answered and closed by the time this
    // runs (h2's connection task runs on its own): then the bytes are not
    // sent, and the answer says what the destination did.
    let sent = if first.is_empty() {
        Ok(())
    } else {
        stream.send_data(first.clone(), false)
    };
    let response = response.await.map_err(|e| {
        let unprocessed = peer_did_not_process(&e);
        h2_err(e, unprocessed)
    })?;
    if response.status() != StatusCode::OK {
        let reason = response
            .headers()
            .get(super::UNPROCESSED_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        return Err(HboneError::Refused {
            target,
            status: response.status(),
            reason,
        });
    }
    // Accepted, but the stream ended before the first bytes could go: the
    // application got none of them.
    sent.map_err(maybe_processed)?;
    Ok(H2Stream::new(stream, response.into_body()).with_lease(Box::new(lease)))
}

impl<K: Hash + Eq> Inner<K> {
    /// A live connection for `key` with a free stream slot, already counted.
    fn lease(&self, key: &K) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().expect("pool lock");
        let list = conns.get_mut(key)?;
        let now = Instant::now();
        list.retain(|c| c.usable(now));
        let max = self.config.max_streams_per_connection;
        let conn = list
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < max)?;
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Some(conn.clone())
    }
}

/// Holds a stream slot on a connection until the stream is dropped.
struct Lease(Arc<Conn>);

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self.0.idle_since.lock().expect("conn lock") = Instant::now();
        }
    }
}

async fn reap_idle<K: Hash + Eq>(pool: Weak<Inner<K>>) {
    let period = match pool.upgrade() {
        Some(p) => (p.config.idle_timeout / 2).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let timeout = pool.config.idle_timeout;
        let now = Instant::now();
        let mut conns = pool.conns.lock().expect("pool lock");
        for list in conns.values_mut() {
            // Dropping the last handle to an idle connection closes it
            // cleanly (GOAWAY, then the TLS close); an expired one closes
            // when its last stream ends.
            list.retain(|c| {
                let idle = c.streams.load(Ordering::Relaxed) == 0
                    && c.idle_since.lock().expect("conn lock").elapsed() >= timeout;
                c.usable(now) && !idle
            });
        }
        conns.retain(|_, list| !list.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HboneRequest, connect_target, serve_connection};

    /// One in-memory "TLS connection": a connector that hands it to the
    /// pool once, and the server's end.
    fn one_connection() -> (Connector<&'static str>, tokio::io::DuplexStream) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let client_io = Arc::new(Mutex::new(Some(client_io)));
        let connector: Connector<&'static str> = Arc::new(move |_key| {
            let io = client_io.lock().unwrap().take();
            Box::pin(async move { Ok(Connected::new(Box::new(io.expect("one connection")))) })
        });
        (connector, server_io)
    }

    #[tokio::test]
    async fn the_protocol_header_reaches_the_destination_stream() {
        let (connector, server_io) = one_connection();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(serve_connection(
            server_io,
            move |request: HboneRequest| {
                let seen = seen_tx.clone();
                async move {
                    let stream = request.accept().unwrap();
                    seen.send(stream.protocol().map(str::to_string)).unwrap();
                }
            },
            std::future::pending(),
        ));
        let pool = HbonePool::new(PoolConfig::default(), connector);
        let addr: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        let target: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let _a = pool.open_with("k", addr, target, Some("h2")).await.unwrap();
        assert_eq!(seen_rx.recv().await.unwrap().as_deref(), Some("h2"));
        let _b = pool.open("k", addr, target).await.unwrap();
        assert_eq!(seen_rx.recv().await.unwrap(), None, "no header: no claim");
    }

    /// `open_sending`: the client's first bytes reach the destination
    /// before it answers the CONNECT (the round trip they no longer wait
    /// for), a refusal says nothing reached the application, and an
    /// accepted stream gives the application those bytes once, then what
    /// follows, in order.
    #[tokio::test]
    async fn first_bytes_travel_with_the_connect() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (connector, server_io) = one_connection();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let refused: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        tokio::spawn(serve_connection(
            server_io,
            move |mut request: HboneRequest| {
                let seen = seen_tx.clone();
                async move {
                    if request.target == refused {
                        // Read before answering: only early data can be there.
                        let early = tokio::time::timeout(
                            Duration::from_secs(10),
                            request.data_before_answer(),
                        )
                        .await
                        .ok()
                        .flatten();
                        seen.send(early).unwrap();
                        request.reject_unprocessed();
                        return;
                    }
                    let mut stream = request.accept().unwrap();
                    let mut got = vec![0; b"hello, world".len()];
                    stream.read_exact(&mut got).await.unwrap();
                    seen.send(Some(Bytes::from(got))).unwrap();
                }
            },
            std::future::pending(),
        ));
        let pool = HbonePool::new(PoolConfig::default(), connector);
        let addr: SocketAddr = "127.0.0.1:15008".parse().unwrap();

        let Err(err) = pool
            .open_sending("k", addr, refused, None, Bytes::from_static(b"hello"))
            .await
        else {
            panic!("a refused stream opened");
        };
        assert_eq!(
            seen_rx.recv().await.unwrap().as_deref(),
            Some(&b"hello"[..]),
            "the bytes arrived before the answer"
        );
        assert!(
            matches!(&err, HboneError::Refused { status, reason: Some(r), .. }
                if *status == StatusCode::SERVICE_UNAVAILABLE && r == crate::CONNECT_FAILED),
            "{err:?}"
        );

        let target: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let mut stream = pool
            .open_sending("k", addr, target, None, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        stream.write_all(b", world").await.unwrap();
        assert_eq!(
            seen_rx.recv().await.unwrap().as_deref(),
            Some(&b"hello, world"[..])
        );
    }

    /// A connector whose every call makes a fresh in-memory connection to
    /// an echo server, its peer identity valid for `valid` from now; counts
    /// the connections made.
    type Servers = Arc<Mutex<Vec<tokio::task::JoinHandle<Result<(), h2::Error>>>>>;

    fn echo_connector(
        valid: Option<Duration>,
    ) -> (Connector<&'static str>, Arc<AtomicUsize>, Servers) {
        let made = Arc::new(AtomicUsize::new(0));
        let servers: Servers = Arc::default();
        let (counter, started) = (made.clone(), servers.clone());
        let connector: Connector<&'static str> = Arc::new(move |_key| {
            counter.fetch_add(1, Ordering::SeqCst);
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let server = tokio::spawn(serve_connection(
                server_io,
                |request: HboneRequest| async move {
                    let mut stream = request.accept().unwrap();
                    let (mut r, mut w) = tokio::io::split(&mut stream);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                },
                std::future::pending(),
            ));
            started.lock().unwrap().push(server);
            let expires = valid.map(|v| std::time::SystemTime::now() + v);
            Box::pin(async move { Ok(Connected::new(Box::new(client_io)).expiring_at(expires)) })
        });
        (connector, made, servers)
    }

    async fn echoes(stream: &mut H2Stream) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if stream.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.is_ok() && &buf == b"ping"
    }

    const ADDR: &str = "127.0.0.1:15008";
    const TARGET: &str = "127.0.0.1:9000";

    #[tokio::test(start_paused = true)]
    async fn no_new_stream_goes_on_a_connection_whose_peer_certificate_expired() {
        let (connector, made, _) = echo_connector(Some(Duration::from_secs(60)));
        let pool = HbonePool::new(PoolConfig::default(), connector);
        let (addr, target) = (ADDR.parse().unwrap(), TARGET.parse().unwrap());
        let mut first = pool.open("k", addr, target).await.unwrap();
        let mut second = pool.open("k", addr, target).await.unwrap();
        assert_eq!(made.load(Ordering::SeqCst), 1, "one connection, reused");
        tokio::time::advance(Duration::from_secs(61)).await;
        let mut third = pool.open("k", addr, target).await.unwrap();
        assert_eq!(
            made.load(Ordering::SeqCst),
            2,
            "after notAfter: a new connection"
        );
        // The streams already open on the old connection finish.
        assert!(echoes(&mut first).await && echoes(&mut second).await);
        assert!(echoes(&mut third).await);
    }

    #[tokio::test]
    async fn retired_connections_take_no_new_stream_and_close_after_their_last() {
        let (connector, made, servers) = echo_connector(None);
        let pool = HbonePool::new(PoolConfig::default(), connector);
        let (addr, target) = (ADDR.parse().unwrap(), TARGET.parse().unwrap());
        let mut old = pool.open("k", addr, target).await.unwrap();
        assert_eq!(pool.retire_all(), 1);
        assert_eq!(pool.connections(), 0);
        let mut new = pool.open("k", addr, target).await.unwrap();
        assert_eq!(
            made.load(Ordering::SeqCst),
            2,
            "a new connection after the bundle changed"
        );
        assert!(echoes(&mut old).await, "the open stream finishes");
        assert!(echoes(&mut new).await);
        assert_eq!(pool.connections(), 1);
        let old_server = servers.lock().unwrap().remove(0);
        assert!(!old_server.is_finished(), "open while its stream is");
        drop(old);
        tokio::time::timeout(Duration::from_secs(30), old_server)
            .await
            .expect("the retired connection closes after its last stream")
            .unwrap()
            .expect("cleanly");
    }

    #[tokio::test]
    async fn a_stream_refused_by_a_pooled_connection_going_away_opens_on_a_fresh_one() {
        // Two in-memory connections: the first peer answers one CONNECT,
        // then goes away (GOAWAY after stream 1, refusing the rest); the
        // second serves normally (a restarted node proxy).
        let (first_client, first_server) = tokio::io::duplex(64 * 1024);
        let (second_client, second_server) = tokio::io::duplex(64 * 1024);
        let ios = Arc::new(Mutex::new(vec![second_client, first_client]));
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let connector: Connector<&'static str> = Arc::new(move |_key| {
            counter.fetch_add(1, Ordering::SeqCst);
            let io = ios.lock().unwrap().pop();
            Box::pin(async move {
                let io = io.ok_or_else(|| HboneError::Connect {
                    addr: "127.0.0.1:15008".parse().unwrap(),
                    source: std::io::Error::other("no more connections"),
                })?;
                Ok(Connected::new(Box::new(io)))
            })
        });
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut conn: h2::server::Connection<_, Bytes> =
                h2::server::handshake(first_server).await.unwrap();
            let (_request, mut respond) = conn.accept().await.unwrap().unwrap();
            let open = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // Driven until the client has its stream, then going away.
            tokio::select! {
                _ = async { while let Some(Ok(_)) = conn.accept().await {} } => {}
                _ = go_rx => {}
            }
            conn.graceful_shutdown();
            let _ = gone_tx.send(());
            while let Some(Ok(_)) = conn.accept().await {}
            drop(open);
        });
        tokio::spawn(serve_connection(
            second_server,
            |request: HboneRequest| async move {
                let _ = request.accept();
            },
            std::future::pending(),
        ));
        let pool = HbonePool::new(PoolConfig::default(), connector);
        let addr: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        let target: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let _first = pool.open("k", addr, target).await.unwrap();
        go_tx.send(()).unwrap();
        gone_rx.await.unwrap();
        let second = pool.open("k", addr, target).await;
        assert!(second.is_ok(), "{:?}", second.err());
        assert_eq!(made.load(Ordering::SeqCst), 2, "a fresh connection for it");
    }

    /// A connector whose `n`th call (from 0) makes an in-memory connection
    /// served by `serve(n, io)`; counts the connections made.
    fn scripted_connector<F, Fut>(serve: F) -> (Connector<&'static str>, Arc<AtomicUsize>)
    where
        F: Fn(usize, tokio::io::DuplexStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let connector: Connector<&'static str> = Arc::new(move |_key| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            tokio::spawn(serve(n, server_io));
            Box::pin(async move { Ok(Connected::new(Box::new(client_io))) })
        });
        (connector, made)
    }

    type Decided = Arc<Mutex<HashMap<SocketAddr, usize>>>;

    type ServerConn = h2::server::Connection<tokio::io::DuplexStream, Bytes>;

    /// A scripted destination: its first connection answers the pool's
    /// first CONNECT with 200 (the stream kept open), then is handed to
    /// `script`; later connections accept every CONNECT. The CONNECTs each
    /// target got are counted in the returned map (by `script` too).
    fn scripted_after_first_stream<F, Fut>(
        script: F,
    ) -> (Connector<&'static str>, Arc<AtomicUsize>, Decided)
    where
        F: Fn(ServerConn, Decided) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let decided = Decided::default();
        let on_server = decided.clone();
        let (connector, made) = scripted_connector(move |n, io| {
            let (decided, script) = (on_server.clone(), script.clone());
            async move {
                if n > 0 {
                    return counting_server(io, decided, |request| {
                        let _ = request.accept();
                    })
                    .await;
                }
                let mut conn = h2::server::handshake(io).await.unwrap();
                let (_, mut respond) = conn.accept().await.unwrap().unwrap();
                let _open = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                script(conn, decided).await;
            }
        });
        (connector, made, decided)
    }

    /// Serves with [`serve_connection`], counting the CONNECTs each target
    /// got, and answering each with `answer`.
    async fn counting_server(
        io: tokio::io::DuplexStream,
        decided: Decided,
        answer: fn(HboneRequest),
    ) {
        let _ = serve_connection(
            io,
            move |request: HboneRequest| {
                *decided.lock().unwrap().entry(request.target).or_default() += 1;
                async move { answer(request) }
            },
            std::future::pending(),
        )
        .await;
    }

    /// The destination's policy refuses every connection from this client
    /// (403) without reading what the client sent. Many connections, 64 at
    /// a time, each with its first bytes behind the CONNECT on one pooled
    /// HBONE connection: the destination decides each CONNECT exactly
    /// once, and each client sees the refusal. (The source sent a CONNECT
    /// again when the destination had answered and closed the stream
    /// before the first bytes were queued: h2 refused those bytes, and that
    /// error was taken for the peer going away. A race: some in 10,000
    /// here, hence the number.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn refused_connects_with_early_data_are_each_decided_once() {
        const CONNECTS: usize = 20_000;
        const AT_ONCE: usize = 64;
        let decided = Decided::default();
        let on_server = decided.clone();
        let (connector, made) = scripted_connector(move |_, io| {
            counting_server(io, on_server.clone(), |request| {
                request.reject(StatusCode::FORBIDDEN)
            })
        });
        let pool = Arc::new(HbonePool::new(PoolConfig::default(), connector));
        let addr: SocketAddr = ADDR.parse().unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                let (pool, next) = (pool.clone(), next.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= CONNECTS {
                            return outcomes;
                        }
                        // A target per connection, to count its CONNECTs.
                        let target = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 9000));
                        let first = Bytes::from_static(b"ping\n");
                        let outcome = match pool.open_sending("k", addr, target, None, first).await
                        {
                            Err(HboneError::Refused { status, .. }) => status.to_string(),
                            Err(e) => e.to_string(),
                            Ok(_) => "opened".to_string(),
                        };
                        outcomes.push(outcome);
                    }
                })
            })
            .collect();
        let mut outcomes: HashMap<String, usize> = HashMap::new();
        for client in clients {
            for outcome in client.await.unwrap() {
                *outcomes.entry(outcome).or_default() += 1;
            }
        }
        let decided = decided.lock().unwrap();
        let twice: Vec<_> = decided.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{} of {CONNECTS} CONNECTs decided more than once (HBONE connections made: {}), e.g. {:?}",
            twice.len(),
            made.load(Ordering::SeqCst),
            &twice[..twice.len().min(3)]
        );
        assert_eq!(decided.len(), CONNECTS);
        assert_eq!(
            outcomes,
            HashMap::from([(StatusCode::FORBIDDEN.to_string(), CONNECTS)])
        );
    }

    /// How the first HBONE connection ends, in
    /// `a_connect_the_destination_may_have_decided_is_not_sent_again`,
    /// once the destination took the second CONNECT.
    #[derive(Clone, Copy, Debug)]
    enum Ending {
        /// GOAWAY with an error (what h2 sends a client it takes for
        /// abusive), its last stream ID that CONNECT's.
        ErrorGoaway,
        /// The connection just closes (the node proxy died).
        Closed,
    }

    /// The second CONNECT on a pooled connection reaches the destination,
    /// which decides it; then the connection ends before the answer. That
    /// CONNECT is reported failed, not sent again on a fresh connection:
    /// the destination saw it once (had it accepted it, the application
    /// would have got the first bytes once).
    #[tokio::test]
    async fn a_connect_the_destination_may_have_decided_is_not_sent_again() {
        for ending in [Ending::ErrorGoaway, Ending::Closed] {
            let (connector, made, decided) = scripted_after_first_stream(
                move |mut conn: ServerConn, decided: Decided| async move {
                    let (request, _respond) = conn.accept().await.unwrap().unwrap();
                    let target = connect_target(request.uri()).unwrap();
                    *decided.lock().unwrap().entry(target).or_default() += 1;
                    match ending {
                        Ending::ErrorGoaway => {
                            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                            let _ = futures::future::poll_fn(|cx| conn.poll_closed(cx)).await;
                        }
                        Ending::Closed => drop(conn),
                    }
                },
            );
            let pool = HbonePool::new(PoolConfig::default(), connector);
            let (addr, target) = (ADDR.parse().unwrap(), TARGET.parse().unwrap());
            let _first = pool.open("k", addr, target).await.unwrap();
            let second: SocketAddr = "127.0.0.1:9001".parse().unwrap();
            let result = pool
                .open_sending("k", addr, second, None, Bytes::from_static(b"hello"))
                .await;
            assert!(
                matches!(
                    result,
                    Err(HboneError::H2 {
                        unprocessed: false,
                        ..
                    })
                ),
                "{ending:?}: {:?}",
                result.map(|_| "opened")
            );
            assert_eq!(
                decided.lock().unwrap().get(&second),
                Some(&1),
                "{ending:?}: the destination decided it once"
            );
            assert_eq!(
                made.load(Ordering::SeqCst),
                1,
                "{ending:?}: no other connection"
            );
        }
    }

    /// A CONNECT the destination refused unprocessed at the HTTP/2 level
    /// (RST_STREAM REFUSED_STREAM: it took too many streams at once) goes
    /// once more, on a fresh connection, and opens there.
    #[tokio::test]
    async fn a_connect_refused_as_unprocessed_opens_on_a_fresh_connection() {
        let (connector, made, decided) =
            scripted_after_first_stream(|mut conn: ServerConn, _| async move {
                let (_, mut respond) = conn.accept().await.unwrap().unwrap();
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                while let Some(Ok(_)) = conn.accept().await {}
            });
        let pool = HbonePool::new(PoolConfig::default(), connector);
        let (addr, target) = (ADDR.parse().unwrap(), TARGET.parse().unwrap());
        let _first = pool.open("k", addr, target).await.unwrap();
        let second: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let opened = pool
            .open_sending("k", addr, second, None, Bytes::from_static(b"hello"))
            .await;
        assert!(opened.is_ok(), "{:?}", opened.err());
        assert_eq!(made.load(Ordering::SeqCst), 2, "a fresh connection for it");
        assert_eq!(decided.lock().unwrap().get(&second), Some(&1));
    }
}
