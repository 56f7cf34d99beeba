//! The gRPC `Destination` service over TLS.
//!
//! A `Watch` stream is a loop over the node's `watch` channel: wake on a new
//! version, diff it against what this subscriber last received, send. The
//! stream is only polled when the transport can take more (HTTP/2 flow
//! control), so a subscriber that does not read stops being polled, its
//! channel keeps only the newest view, and when it reads again it gets one
//! delta covering everything it missed.

use crate::metrics::{Metrics, PushLabel};
use crate::publisher::Publisher;
use crate::views::NodeView;
use futures::{Stream, StreamExt};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use weft_destination_api::proto::destination_server::{Destination, DestinationServer};
use weft_destination_api::{WatchRequest, WatchResponse};
use weft_node_auth::{AuthError, NodeAuthenticator, bearer_token};

pub struct DestinationService {
    publisher: Arc<Publisher>,
    auth: Arc<dyn NodeAuthenticator>,
    /// Set when the server shuts down: open streams end, so that the
    /// graceful shutdown completes and proxies reconnect elsewhere.
    closing: watch::Receiver<bool>,
    close: Arc<watch::Sender<bool>>,
}

impl DestinationService {
    pub fn new(publisher: Arc<Publisher>, auth: Arc<dyn NodeAuthenticator>) -> Self {
        let (close, closing) = watch::channel(false);
        Self {
            publisher,
            auth,
            closing,
            close: Arc::new(close),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Destination for DestinationService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let token = bearer_token(header).map_err(auth_status)?;
        let caller = self.auth.authenticate(token).await.map_err(auth_status)?;
        let WatchRequest {
            node,
            epoch,
            version,
        } = request.into_inner();
        if node.is_empty() {
            return Err(Status::invalid_argument(
                "WatchRequest.node is empty: name the node this proxy runs on",
            ));
        }
        if caller.node != node {
            tracing::warn!(caller = %caller.node, requested = %node, "refused watch of another node");
            return Err(Status::permission_denied(format!(
                "the credential of node {:?} may only watch node {:?}, not {node:?}",
                caller.node, caller.node
            )));
        }
        let rx = self.publisher.subscribe(&node);
        // Resume: the subscriber already holds `version`. Either it is the
        // current one, or a recent one still in the history.
        let base = {
            let current = rx.borrow();
            if !epoch.is_empty()
                && epoch == self.publisher.epoch()
                && version == current.version
                && version != 0
            {
                Some(current.clone())
            } else {
                None
            }
        }
        .or_else(|| self.publisher.view_at(&node, &epoch, version));
        tracing::info!(%node, resumed = base.is_some(), "node proxy watching");
        let subscriber = Subscriber {
            rx,
            last: base,
            first: true,
            closing: self.closing.clone(),
            epoch: self.publisher.epoch().to_string(),
            gauge: SubscriberGauge::new(self.publisher.metrics.clone()),
        };
        Ok(Response::new(Box::pin(subscriber.into_stream())))
    }
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

struct Subscriber {
    rx: watch::Receiver<NodeView>,
    /// What this subscriber holds: the last view sent (or its resume point).
    last: Option<NodeView>,
    first: bool,
    closing: watch::Receiver<bool>,
    epoch: String,
    gauge: SubscriberGauge,
}

impl Subscriber {
    fn into_stream(self) -> impl Stream<Item = Result<WatchResponse, Status>> + Send {
        futures::stream::unfold(self, |mut sub| async move {
            let mut closing = sub.closing.clone();
            let response = tokio::select! {
                biased;
                _ = closing.wait_for(|c| *c) => None,
                r = sub.next() => r,
            }?;
            Some((Ok(response), sub))
        })
    }

    async fn next(&mut self) -> Option<WatchResponse> {
        loop {
            if self.first {
                // Nothing is sent before the first full index.
                self.rx.wait_for(|v| v.version != 0).await.ok()?;
            } else {
                self.rx.changed().await.ok()?;
            }
            let current = self.rx.borrow_and_update().clone();
            let response = match &self.last {
                None => current.snapshot(&self.epoch),
                // The first response always goes out, even empty: it tells
                // a resuming proxy its version is still good.
                Some(last) if !self.first && last.version == current.version => continue,
                Some(last) => current.delta_from(last, &self.epoch),
            };
            let metrics = &self.gauge.0;
            // Lag is about new versions reaching proxies: a snapshot for a
            // proxy connecting now would count the version's age instead.
            if !self.first {
                metrics.observe_lag(current.published.elapsed());
            }
            self.first = false;
            metrics
                .updates_pushed
                .get_or_create(&PushLabel {
                    kind: if response.snapshot {
                        "snapshot"
                    } else {
                        "delta"
                    },
                })
                .inc();
            self.last = Some(current);
            return Some(response);
        }
    }
}

/// Counts a stream in `weft_destination_subscribers` for as long as it lives.
struct SubscriberGauge(Arc<Metrics>);

impl SubscriberGauge {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.subscribers.inc();
        Self(metrics)
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.0.subscribers.dec();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "TLS configuration refused (is --tls-cert a PEM certificate chain and --tls-key its PEM private key?): {0}"
    )]
    Tls(tonic::transport::Error),
    #[error("gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// PEM certificate chain and private key of the server.
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsFiles {
    pub fn read(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, ServeError> {
        let read = |what, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ServeError::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Self {
            cert_pem: read("TLS certificate", cert)?,
            key_pem: read("TLS key", key)?,
        })
    }
}

/// Serves `Destination` on an already bound listener until `shutdown`
/// resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
    service: DestinationService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let identity = Identity::from_pem(tls.cert_pem, tls.key_pem);
    let close = service.close.clone();
    let shutdown = async move {
        shutdown.await;
        close.send_replace(true);
    };
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .map_err(ServeError::Tls)?
        // Dead proxies (a node gone without closing) are noticed and their
        // streams dropped.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(DestinationServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
                // Deltas are small and latency matters: without this, Nagle
                // and the peer's delayed ACK hold a small write for ~40 ms.
                accepted.inspect(|stream| {
                    let _ = stream.set_nodelay(true);
                })
            }),
            shutdown,
        )
        .await
        .map_err(ServeError::Serve)
}
