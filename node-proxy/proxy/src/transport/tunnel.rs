//! HBONE tunnels from a local pod: which pooled connection a stream goes
//! on, and how such a connection is made.

use super::pod::LocalPod;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weft_cert_manager::{CertManager, SpiffeId};
use weft_hbone::HboneError;
use weft_hbone::pool::{Connected, Connector};

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

/// TCP from the source pod, then TLS 1.3 with the source pod's certificate,
/// requiring the destination workload's exact identity.
pub fn tunnel_connector(certs: CertManager) -> Connector<TunnelKey> {
    Arc::new(move |key: TunnelKey| {
        let certs = certs.clone();
        Box::pin(async move {
            let addr = key.tunnel;
            let tls_err = |e: String| HboneError::Tls {
                addr,
                source: std::io::Error::other(e),
            };
            let config = tokio::time::timeout(
                CERT_WAIT,
                certs.client_config(&key.source, key.destination.clone()),
            )
            .await
            .map_err(|_| tls_err(format!("no certificate for {} yet", key.source)))?
            .map_err(|e| tls_err(e.to_string()))?;
            let tcp = key
                .pod
                .connect(addr)
                .await
                .map_err(|source| HboneError::Connect { addr, source })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|source| HboneError::Tls { addr, source })?;
            // The destination's identity holds until its certificate
            // expires: the pool puts no new stream on it after that.
            let expires = weft_cert_manager::peer_not_after(tls.get_ref().1);
            Ok(Connected::new(Box::new(tls)).expiring_at(expires))
        })
    })
}

/// Retires every pooled tunnel when the trust bundle changes (an anchor
/// added or retired): connections verified under the old bundle carry no
/// new stream, so every new one is verified under the current bundle.
/// Ends when the pool or the bundle's sender is gone.
pub fn retire_tunnels_on_bundle_change(
    pool: std::sync::Weak<weft_hbone::HbonePool<TunnelKey>>,
    mut bundle: weft_cert_manager::verify::BundleWatch,
) {
    tokio::spawn(async move {
        bundle.borrow_and_update();
        while bundle.changed().await.is_ok() {
            let Some(pool) = pool.upgrade() else { return };
            let retired = pool.retire_all();
            tracing::info!(
                retired,
                "trust bundle changed: HBONE connections are made again under it"
            );
        }
    });
}
