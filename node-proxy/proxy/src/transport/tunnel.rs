//! HBONE tunnels from a local pod: which pooled connection a stream goes
//! on, and how such a connection is made.

use super::TlsSocket;
use super::pod::LocalPod;
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tokio_rustls::client::TlsStream;
use weft_cert_manager::TrustBundle;
use weft_cert_manager::{CertManager, SpiffeId};
use weft_hbone::HboneError;
use weft_hbone::pool::{Connected, Connector};
use weft_hbone::{HbonePool, PoolConfig};

/// HBONE connections are pooled per source pod (connections leave from the
/// pod's own IP), source identity, destination identity and address.
#[derive(Clone, Debug)]
pub struct TunnelKey {
    pub pod: Arc<LocalPod>,
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub tunnel: SocketAddr,
}

impl TunnelKey {
    fn parts(&self) -> (&str, &SpiffeId, &SpiffeId, SocketAddr) {
        (&self.pod.uid, &self.source, &self.destination, self.tunnel)
    }
}

impl PartialEq for TunnelKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for TunnelKey {}

impl std::hash::Hash for TunnelKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

/// How long an HBONE connection waits for the source pod's first
/// certificate before failing (the CA is slow or unreachable).
const CERT_WAIT: Duration = Duration::from_secs(10);

/// The pool of HBONE tunnels of a node proxy: connections made by
/// [`tunnel_connector`], each tagged with the trust bundle it was verified
/// under, and retired when the bundle changes (an anchor added or retired):
/// every new stream then goes on a connection verified under the current
/// bundle. A connection made under the new bundle before the change was
/// seen here is kept. Needs a Tokio runtime.
pub fn tunnel_pool(certs: CertManager) -> Arc<HbonePool<TunnelKey>> {
    let mut bundle = certs.trust_bundle();
    let epochs = Arc::new(BundleEpochs {
        current: Mutex::new((0, bundle.borrow_and_update().clone())),
    });
    let pool = Arc::new(HbonePool::new(
        PoolConfig::default(),
        connector(certs, Some(epochs.clone())),
    ));
    let weak = Arc::downgrade(&pool);
    tokio::spawn(async move {
        while bundle.changed().await.is_ok() {
            let now = bundle.borrow_and_update().clone();
            let epoch = epochs.advance(now);
            let Some(pool) = weak.upgrade() else { return };
            let retired = pool.retire_before(epoch);
            tracing::info!(
                retired,
                "trust bundle changed: HBONE connections are made again under it"
            );
        }
    });
    pool
}

/// Counts the trust bundles a pool's connections were verified under.
struct BundleEpochs {
    /// The latest epoch and its bundle.
    current: Mutex<(u64, Arc<TrustBundle>)>,
}

impl BundleEpochs {
    /// The epoch a handshake starting now is verified under: the current
    /// one, or the next if the bundle changed and the follower has not
    /// counted it yet (so that it does not retire a connection made under
    /// the new bundle).
    fn for_handshake(&self, now: &Arc<TrustBundle>) -> u64 {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&current.1, now) || *current.1 == **now {
            current.0
        } else {
            current.0 + 1
        }
    }

    /// Counts a new bundle; returns its epoch.
    fn advance(&self, now: Arc<TrustBundle>) -> u64 {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.0 += 1;
        current.1 = now;
        current.0
    }
}

/// TCP from the source pod, then TLS 1.3 with the source pod's certificate,
/// requiring the destination workload's exact identity.
pub fn tunnel_connector(certs: CertManager) -> Connector<TunnelKey> {
    connector(certs, None)
}

fn connector(certs: CertManager, epochs: Option<Arc<BundleEpochs>>) -> Connector<TunnelKey> {
    Arc::new(move |key: TunnelKey| {
        let certs = certs.clone();
        // Read before the handshake: verified under this bundle or a newer one.
        let epoch = epochs.as_ref().map_or(0, |e| {
            let now = certs.trust_bundle().borrow().clone();
            e.for_handshake(&now)
        });
        Box::pin(async move {
            let (tls, expires) = handshake(&certs, &key, weft_hbone::HBONE_ALPN).await?;
            Ok(Connected::new(Box::new(tls))
                .expiring_at(expires)
                .under_bundle(epoch))
        })
    })
}

/// A mutual-TLS connection from `key`'s pod to `key.tunnel`, offering the
/// one ALPN protocol `alpn`; and until when the destination's identity
/// holds (its certificate's `notAfter`).
async fn handshake(
    certs: &CertManager,
    key: &TunnelKey,
    alpn: &[u8],
) -> Result<(TlsStream<TlsSocket>, Option<SystemTime>), HboneError> {
    let addr = key.tunnel;
    let tls_err = |e: String| HboneError::Tls {
        addr,
        source: std::io::Error::other(e),
    };
    let mut config = tokio::time::timeout(
        CERT_WAIT,
        certs.client_config(&key.source, key.destination.clone()),
    )
    .await
    .map_err(|_| tls_err(format!("no certificate for {} yet", key.source)))?
    .map_err(|e| tls_err(e.to_string()))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = key
        .pod
        .connect(addr)
        .await
        .map_err(|source| HboneError::Connect { addr, source })?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::IpAddress(addr.ip().into()),
            super::tls_socket(tcp),
        )
        .await
        .map_err(|source| HboneError::Tls { addr, source })?;
    super::tune_tls(tls.get_mut().1);
    let expires = weft_cert_manager::peer_not_after(tls.get_ref().1);
    Ok((tls, expires))
}

/// Connections that carry a pod's HTTP/2 requests to a peer node proxy as
/// streams of their own ([`weft_hbone::REQUESTS_ALPN`]), and the peers
/// known not to speak it (older proxies), which get tunnels instead for a
/// while.
pub struct RequestConnections {
    certs: CertManager,
    /// Peers (`podIP:15008`) that refused the protocol, and since when.
    refused: Mutex<HashMap<SocketAddr, Instant>>,
}

/// How long a peer that refused [`weft_hbone::REQUESTS_ALPN`] is not asked
/// again: long enough not to pay a failed handshake per connection, short
/// enough that a rolled-out peer is used soon.
const REFUSED_FOR: Duration = Duration::from_secs(60);

/// A connection opened by [`RequestConnections::open`].
pub struct RequestConnection {
    pub tls: TlsStream<TlsSocket>,
    /// Until when the destination's identity holds: no request is sent on
    /// the connection after that.
    pub expires: Option<SystemTime>,
}

impl RequestConnections {
    pub fn new(certs: CertManager) -> Self {
        Self {
            certs,
            refused: Mutex::default(),
        }
    }

    /// A new connection to `key.tunnel` for requests; `Ok(None)` when the
    /// peer does not speak the protocol (the caller tunnels instead).
    pub async fn open(&self, key: &TunnelKey) -> Result<Option<RequestConnection>, HboneError> {
        let peer = key.tunnel;
        {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            match refused.get(&peer) {
                Some(since) if since.elapsed() < REFUSED_FOR => return Ok(None),
                Some(_) => {
                    refused.remove(&peer);
                }
                None => {}
            }
        }
        match handshake(&self.certs, key, weft_hbone::REQUESTS_ALPN).await {
            Ok((tls, expires)) => Ok(Some(RequestConnection { tls, expires })),
            Err(HboneError::Tls { source, .. }) if refused_protocol(&source) => {
                tracing::debug!(%peer, "the peer node proxy does not take requests without a tunnel (an older version): tunnelling");
                let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
                // Bounded by the peers this node talks to; forget old ones.
                refused.retain(|_, since| since.elapsed() < REFUSED_FOR);
                refused.insert(peer, Instant::now());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether a handshake failed because the server offers none of the ALPN
/// protocols the client asked for.
fn refused_protocol(e: &std::io::Error) -> bool {
    let alert = rustls::AlertDescription::NoApplicationProtocol;
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(e, rustls::Error::AlertReceived(a) if *a == alert)
                || matches!(e, rustls::Error::NoApplicationProtocol)
        })
}
