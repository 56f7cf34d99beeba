//! Runs the CA: the gRPC service over TLS, the metrics endpoint, and the
//! tasks that follow the CA directory and keep the serving certificate fresh.

use crate::authority::{Authority, LeafPolicy};
use crate::material::{Material, MaterialError};
use crate::metrics::CaMetrics;
use crate::reload::Reloader;
use crate::service::IdentityService;
use crate::serving::{SERVING_TTL, ServingCert, ServingError};
use crate::workloads::WorkloadDirectory;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use weft_node_auth::NodeAuthenticator;

pub struct ServeConfig {
    pub ca_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub server_names: Vec<String>,
    pub policy: LeafPolicy,
    /// How often the CA directory is re-read even without a change event.
    pub poll: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot load the CA material: {0}")]
    Material(#[from] MaterialError),
    #[error(transparent)]
    Serving(#[from] ServingError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running CA. [`RunningCa::stop`] stops it and waits; dropping it stops
/// it without waiting.
pub struct RunningCa {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub authority: Arc<Authority>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningCa {
    /// Stops accepting, ends every open connection and stream, and waits for
    /// the tasks to finish: after this the CA is unreachable.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for mut task in std::mem::take(&mut self.tasks) {
            // Bounded: a peer that ignores GOAWAY must not hang the caller.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for RunningCa {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn spawn(
    config: ServeConfig,
    auth: Arc<dyn NodeAuthenticator>,
    workloads: Arc<dyn WorkloadDirectory>,
) -> Result<RunningCa, ServeError> {
    let material = Material::load(&config.ca_dir)?;
    let mut registry = Registry::default();
    let metrics = CaMetrics::register(&mut registry);
    metrics.observe_material(&material);
    let authority = Arc::new(Authority::new(config.policy.clone(), material));
    let serving = Arc::new(ServingCert::issue(&authority, config.server_names.clone())?);

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: config.metrics_listen,
            source,
        })?;

    let stop = CancellationToken::new();
    let changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();

    let reloader = Reloader {
        dir: config.ca_dir.clone(),
        authority: authority.clone(),
        metrics: metrics.clone(),
        changed: changed.clone(),
        poll: config.poll,
    };
    tasks.push(tokio::spawn(reloader.run(stop.clone())));
    tasks.push(tokio::spawn(renew_serving_cert(
        authority.clone(),
        serving.clone(),
        changed,
        stop.clone(),
    )));

    let service = IdentityService::new(authority.clone(), auth, workloads, metrics)
        .with_shutdown(stop.clone())
        .into_server();
    let (conns_tx, conns_rx) = mpsc::channel(64);
    tasks.push(tokio::spawn(accept_tls(
        listener,
        tls_acceptor(serving),
        conns_tx,
        stop.clone(),
    )));
    let grpc_stop = stop.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conns_rx);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled())
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));
    tasks.push(tokio::spawn(crate::http::serve_metrics(
        metrics_listener,
        Arc::new(registry),
        stop.clone(),
    )));
    tracing::info!(%addr, %metrics_addr, "weft-identity serving");
    Ok(RunningCa {
        addr,
        metrics_addr,
        authority,
        stop,
        tasks,
    })
}

fn tls_acceptor(serving: Arc<ServingCert>) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

/// Accepts TCP connections and completes TLS handshakes off the accept path
/// (a slow or hostile client must not stall everyone else).
async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    conns: mpsc::Sender<Result<TlsConn, std::io::Error>>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // gRPC exchanges are small request/response pairs: without this,
        // Nagle + delayed ACK add ~40 ms to every Certify.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let conns = conns.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
            let tls = tokio::select! {
                _ = stop.cancelled() => return,
                r = handshake => r,
            };
            match tls {
                Ok(Ok(tls)) => {
                    let _ = conns.send(Ok(TlsConn(tls))).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn renew_serving_cert(
    authority: Arc<Authority>,
    serving: Arc<ServingCert>,
    changed: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(SERVING_TTL / 2) => {}
        }
        match serving.renew(&authority) {
            Ok(()) => tracing::info!("renewed the CA's serving certificate"),
            Err(e) => tracing::error!(error = %e, "cannot renew the CA's serving certificate"),
        }
    }
}

/// A server-side TLS stream that tonic accepts as a connection.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    /// The TCP addresses: `Request::remote_addr` is what limits callers
    /// that keep failing (`failures`).
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
