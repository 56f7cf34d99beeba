//! The node proxy's side of `Watch`: one task that connects over TLS with the
//! node's bearer credential, applies the stream to a [`View`] published in a
//! `tokio::sync::watch`, and reconnects with capped exponential backoff.
//!
//! When the control plane is unreachable the last view stays published: a
//! proxy keeps serving what it knew rather than dropping every destination.
//! On reconnect it resumes from its (epoch, version); the server answers with
//! a delta or, if it cannot, a snapshot.

use crate::proto::destination_client::DestinationClient;
use crate::{View, WatchRequest};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Largest response accepted: a snapshot of ~500 000 workloads.
pub const MAX_MESSAGE: usize = 256 << 20;

/// Where the bearer credential comes from. A file is re-read on every
/// connection attempt: projected ServiceAccount tokens rotate.
#[derive(Clone, Debug)]
pub enum TokenSource {
    Static(String),
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `https://host:port` of the destination service.
    pub endpoint: String,
    /// PEM of the CA that signed the server's certificate.
    pub ca_pem: Vec<u8>,
    /// The name to check in the server's certificate (default: the host of
    /// `endpoint`).
    pub server_name: Option<String>,
    /// The node this proxy runs on.
    pub node: String,
    pub token: TokenSource,
    pub backoff: Backoff,
}

/// Reconnect delays: `initial`, doubling up to `max`, with up to 20% jitter
/// so that a control plane restart is not met by every proxy at once.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// Whether the stream is up, for health reporting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    Connecting,
    /// At least one response received on the current stream.
    Connected,
    /// The last attempt failed; the view is the last one received.
    Disconnected {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid destination endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot read the node credential {path}: {source}; is the token mounted?")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to the destination service: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("destination service refused the watch: {0}")]
    Status(#[from] tonic::Status),
    #[error("the destination stream ended")]
    Ended,
}

/// A running watch. Dropping it stops the task.
pub struct WatchHandle {
    pub view: watch::Receiver<View>,
    pub state: watch::Receiver<ConnectionState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching. Must be called inside a tokio runtime.
pub fn spawn(config: ClientConfig) -> WatchHandle {
    let (view_tx, view) = watch::channel(View::default());
    let (state_tx, state) = watch::channel(ConnectionState::Connecting);
    let task = tokio::spawn(run(config, view_tx, state_tx));
    WatchHandle { view, state, task }
}

async fn run(
    config: ClientConfig,
    view: watch::Sender<View>,
    state: watch::Sender<ConnectionState>,
) {
    let mut delay = config.backoff.initial;
    loop {
        let mut received = false;
        let result = watch_once(&config, &view, &state, &mut received).await;
        let reason = match result {
            Ok(()) => ClientError::Ended.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(node = %config.node, %reason, "destination watch interrupted; keeping the last view");
        state.send_replace(ConnectionState::Disconnected { reason });
        if received {
            // The server was healthy a moment ago: retry soon.
            delay = config.backoff.initial;
        }
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(config.backoff.max);
    }
}

async fn watch_once(
    config: &ClientConfig,
    view: &watch::Sender<View>,
    state: &watch::Sender<ConnectionState>,
    received: &mut bool,
) -> Result<(), ClientError> {
    let token = match &config.token {
        TokenSource::Static(t) => t.clone(),
        TokenSource::File(path) => std::fs::read_to_string(path)
            .map_err(|source| ClientError::Token {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_string(),
    };
    let bad_endpoint = |reason: String| ClientError::Endpoint {
        endpoint: config.endpoint.clone(),
        reason,
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&config.ca_pem));
    if let Some(name) = &config.server_name {
        tls = tls.domain_name(name.clone());
    }
    let channel = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| bad_endpoint(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .map_err(|e| bad_endpoint(e.to_string()))?
        .connect()
        .await?;
    let (epoch, version) = {
        let v = view.borrow();
        (v.epoch.clone(), v.version)
    };
    let mut request = tonic::Request::new(WatchRequest {
        node: config.node.clone(),
        epoch,
        version,
    });
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| bad_endpoint("the node credential contains invalid characters".into()))?;
    request.metadata_mut().insert("authorization", bearer);
    let mut stream = DestinationClient::new(channel)
        // A snapshot grows with the mesh (docs/destination.md); tonic's 4 MiB
        // default would refuse one of a large cluster.
        .max_decoding_message_size(MAX_MESSAGE)
        .watch(request)
        .await?
        .into_inner();
    while let Some(response) = stream.message().await? {
        if !*received {
            *received = true;
            state.send_replace(ConnectionState::Connected);
        }
        let mut result = Ok(());
        view.send_if_modified(|v| {
            result = v.apply(response);
            result.is_ok()
        });
        if let Err(e) = result {
            // The held view no longer matches the server's idea of it. Keep
            // serving it, but forget the resume point so that the next
            // stream starts with a snapshot.
            tracing::warn!(error = %e, "destination delta did not apply; requesting a snapshot");
            view.send_modify(|v| v.epoch.clear());
            return Err(ClientError::Ended);
        }
    }
    Ok(())
}

fn jitter(delay: Duration) -> Duration {
    let factor = 1.0 + rand::random::<f64>() * 0.2;
    delay.mul_f64(factor)
}
