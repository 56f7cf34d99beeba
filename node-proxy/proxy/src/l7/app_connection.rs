//! The destination side's HTTP connection to the local application, for
//! one inbound connection: opened again when the application closed it.
//!
//! Applications close their connections on their own: an HTTP/2 server
//! sends GOAWAY after so many requests or when it restarts, an HTTP/1.1
//! server ends a keep-alive connection. The inbound connection goes on, and
//! its next requests must not fail on the closed connection (they used to,
//! with a 502). So a request that finds the connection closed, or is
//! refused by the application unprocessed, goes to a new connection: always
//! when it was not sent yet, and when it was refused only if it has no body
//! to replay (a GET, a HEAD, …). One that was refused with a body fails, as
//! it would for a client talking to the application directly.

use super::body::{Acking, BoxError, ProxyBody, proxy_body};
use super::upstream::{UpstreamError, handshake_h1, handshake_h2};
use crate::transport::ConnectError;
use crate::transport::LocalPod;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1 as client1, http2 as client2};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use weft_stream::{AckOnDemand, Acker, Counted, Protocol};

/// hyper's handle on one application connection, and what acknowledges
/// the application's writes on it.
#[derive(Clone)]
struct Sender {
    hyper: HyperSender,
    acker: Acker,
}

#[derive(Clone)]
enum HyperSender {
    Http1(Arc<Mutex<client1::SendRequest<ProxyBody>>>),
    Http2(client2::SendRequest<ProxyBody>),
}

/// A response body from the application, acknowledging what the
/// application wrote when its rest is awaited.
pub type AppBody = Acking<Incoming>;

/// The current application connection and its generation (how many were
/// opened before it), so that requests that all found it closed replace
/// it once.
struct Current {
    generation: u64,
    sender: Sender,
}

pub struct AppConnection {
    pod: Arc<LocalPod>,
    target: SocketAddr,
    protocol: Protocol,
    /// Bytes from the application, over every connection.
    to_client: Arc<AtomicU64>,
    current: std::sync::Mutex<Current>,
    /// Held while a new connection is opened: one at a time.
    reconnecting: Mutex<()>,
}

impl AppConnection {
    /// Handshakes on `app` (already connected to `target` from the pod).
    pub async fn open(
        app: TcpStream,
        pod: Arc<LocalPod>,
        protocol: Protocol,
        to_client: Arc<AtomicU64>,
    ) -> Result<Self, UpstreamError> {
        let target = app.peer_addr().map_err(|source| {
            UpstreamError::Connect(ConnectError::Tcp {
                target: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })
        })?;
        let sender = handshake(app, target, protocol, &to_client).await?;
        Ok(Self {
            pod,
            target,
            protocol,
            to_client,
            current: std::sync::Mutex::new(Current {
                generation: 0,
                sender,
            }),
            reconnecting: Mutex::new(()),
        })
    }

    fn current(&self) -> (u64, Sender) {
        let current = self.current.lock().expect("app connection lock");
        (current.generation, current.sender.clone())
    }

    /// A new connection in place of generation `stale`, unless another
    /// request replaced it already.
    async fn replace(&self, stale: u64) -> Result<(u64, Sender), UpstreamError> {
        let _one_at_a_time = self.reconnecting.lock().await;
        let (generation, sender) = self.current();
        if generation != stale {
            return Ok((generation, sender));
        }
        let target = self.target;
        let app = self
            .pod
            .connect(target)
            .await
            .map_err(|source| UpstreamError::Connect(ConnectError::Tcp { target, source }))?;
        let sender = handshake(app, target, self.protocol, &self.to_client).await?;
        let mut current = self.current.lock().expect("app connection lock");
        current.generation += 1;
        current.sender = sender.clone();
        tracing::debug!(%target, generation = current.generation, "the application closed its connection: a new one");
        Ok((current.generation, sender))
    }

    /// Sends `request` to the application (see the module's comment).
    pub async fn send<B>(&self, request: Request<B>) -> Result<Response<AppBody>, UpstreamError>
    where
        B: Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let target = self.target;
        // Without a body, a refused request can be sent again as it was.
        let replay = request.body().is_end_stream().then(|| {
            let mut again = Request::new(());
            *again.method_mut() = request.method().clone();
            *again.uri_mut() = request.uri().clone();
            *again.version_mut() = request.version();
            *again.headers_mut() = request.headers().clone();
            *again.extensions_mut() = request.extensions().clone();
            again
        });
        let request = request.map(proxy_body);
        let (mut generation, mut sender) = self.current();
        if sender.is_closed() {
            (generation, sender) = self.replace(generation).await?;
        }
        let idempotent = crate::policy::retry::method_is_idempotent(request.method());
        let result = match sender.send(request).await {
            Ok(response) => return Ok(response),
            Err((_, Some(request))) => {
                // Not sent: the connection was closed meanwhile.
                let (_, sender) = self.replace(generation).await?;
                sender.send(request).await
            }
            Err((source, None)) if replay.is_some() && unprocessed(&source, idempotent) => {
                let again = replay
                    .expect("checked")
                    .map(|()| proxy_body(Empty::<bytes::Bytes>::new()));
                let (_, sender) = self.replace(generation).await?;
                sender.send(again).await
            }
            Err((source, None)) => return Err(UpstreamError::Request { target, source }),
        };
        result.map_err(|(source, _)| UpstreamError::Request { target, source })
    }
}

type SendError = (hyper::Error, Option<Request<ProxyBody>>);

impl Sender {
    fn is_closed(&self) -> bool {
        match &self.hyper {
            HyperSender::Http1(send) => send.try_lock().is_ok_and(|s| s.is_closed()),
            HyperSender::Http2(send) => send.is_closed(),
        }
    }

    /// Sends on this connection; a request that was not sent comes back
    /// with the error.
    async fn send(&self, request: Request<ProxyBody>) -> Result<Response<AppBody>, SendError> {
        let response = match &self.hyper {
            HyperSender::Http2(send) => {
                let mut send = send.clone();
                send.try_send_request(request).await.map_err(split)?
            }
            HyperSender::Http1(send) => {
                // One request at a time on an HTTP/1.1 connection.
                let mut send = send.lock().await;
                if let Err(e) = send.ready().await {
                    return Err((e, Some(request)));
                }
                send.try_send_request(request).await.map_err(split)?
            }
        };
        Ok(response.map(|body| Acking::new(body, Some(self.acker.clone()))))
    }
}

fn split(mut e: hyper::client::conn::TrySendError<Request<ProxyBody>>) -> SendError {
    let request = e.take_message();
    (e.into_error(), request)
}

/// Whether the application refused the request without processing it: its
/// connection was closing (HTTP/2 GOAWAY: streams it did not take are
/// unprocessed, RFC 9113 §6.8; REFUSED_STREAM, §8.7), or the request never
/// left (canceled). An HTTP/1.1 connection that ended before a byte of the
/// response (a keep-alive connection closed while the request was sent)
/// may also have been processed: only an `idempotent` request is taken as
/// unprocessed then (RFC 9110 §9.2.2), as when the connection was reset
/// under it (an application killed with the request unread).
///
/// hyper's "channel closed" (the connection's task ended while the request
/// was handed to it, the application closing its end at that moment) is
/// the same case: the request may or may not have left, so only an
/// idempotent one goes again. Found by `e2e/tests/failover.rs` when the
/// application's port closes under load: a GET failed with 502.
fn unprocessed(e: &hyper::Error, idempotent: bool) -> bool {
    (idempotent && (e.is_incomplete_message() || is_reset(e) || e.is_closed()))
        || super::upstream::refused_unprocessed(e)
}

/// The connection was reset (the application died with bytes unread: the
/// kernel answers them with RST) before a byte of the response.
fn is_reset(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            );
        }
        source = s.source();
    }
    false
}

/// A hyper client on `app`, in `protocol`, counting what the application
/// sends.
async fn handshake(
    app: TcpStream,
    target: SocketAddr,
    protocol: Protocol,
    to_client: &Arc<AtomicU64>,
) -> Result<Sender, UpstreamError> {
    // The application may write a response in pieces: its bodies
    // acknowledge them when the rest is awaited (`AppBody`).
    let app = AckOnDemand::new(app);
    let acker = app.acker();
    let io = Counted::new(app, to_client.clone());
    let hyper = match protocol {
        Protocol::Http2 => HyperSender::Http2(handshake_h2(io, target).await?),
        _ => HyperSender::Http1(Arc::new(Mutex::new(handshake_h1(io, target).await?))),
    };
    Ok(Sender { hyper, acker })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    fn pod() -> Arc<LocalPod> {
        crate::testing::loopback_pod(crate::state::PodInfo {
            namespace: "demo".into(),
            name: "web".into(),
            uid: "u1".into(),
            ip: Some("127.0.0.1".parse().unwrap()),
            ..Default::default()
        })
        .0
    }

    /// A loopback application that closes every connection after two
    /// requests (HTTP/2: GOAWAY; HTTP/1.1: `Connection: close` on the
    /// second response). Counts its connections.
    async fn closing_app(protocol: Protocol) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let served = Arc::new(AtomicUsize::new(0));
                    let enough = Arc::new(tokio::sync::Notify::new());
                    let (n, notify) = (served.clone(), enough.clone());
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        if n.fetch_add(1, Ordering::SeqCst) == 1 {
                            notify.notify_one();
                        }
                        let body = Full::new(Bytes::from(req.uri().path().to_string()));
                        let mut response = Response::new(body);
                        if n.load(Ordering::SeqCst) >= 2 {
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let io = TokioIo::new(tcp);
                    if protocol == Protocol::Http2 {
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service);
                        let mut conn = std::pin::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => return,
                            () = enough.notified() => {}
                        }
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn requests_go_on_after_the_application_closes_its_connection() {
        for protocol in [Protocol::Http2, Protocol::Http1] {
            let (addr, accepted) = closing_app(protocol).await;
            let first = TcpStream::connect(addr).await.unwrap();
            let app = AppConnection::open(first, pod(), protocol, Arc::default())
                .await
                .unwrap();
            for i in 0..10 {
                let path = format!("/{i}");
                let request = Request::get(format!("http://{addr}{path}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = app
                    .send(request)
                    .await
                    .unwrap_or_else(|e| panic!("{protocol:?} request {i}: {e}"));
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, path, "{protocol:?}");
            }
            // The application did close them: 10 requests, 2 per connection
            // (HTTP/2 may take a third, sent before the client saw GOAWAY).
            let accepted = accepted.load(Ordering::SeqCst);
            assert!((4..=5).contains(&accepted), "{protocol:?}: {accepted}");
        }
    }
}
