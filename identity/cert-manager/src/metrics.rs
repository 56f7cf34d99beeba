//! What the node proxy exposes about its workload certificates.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub identity: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

#[derive(Clone, Default)]
pub struct CertManagerMetrics {
    pub expiry: Family<IdentityLabels, Gauge>,
    pub refreshes: Family<RefreshLabels, Counter>,
    pub bundle_updates: Counter,
}

impl CertManagerMetrics {
    /// Registers under `weft_proxy_identity_…` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("weft_proxy_identity");
        sub.register(
            "cert_expiry_timestamp_seconds",
            "notAfter of the certificate held for each local identity, Unix seconds",
            m.expiry.clone(),
        );
        sub.register(
            "cert_refreshes",
            "Certificate requests to the CA by identity and result",
            m.refreshes.clone(),
        );
        sub.register(
            "trust_bundle_updates",
            "Trust bundles received from the CA that changed the anchors in force",
            m.bundle_updates.clone(),
        );
        m
    }

    pub fn refreshed(&self, identity: &str, ok: bool, valid_until: Option<SystemTime>) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                identity: identity.to_string(),
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        if let Some(t) = valid_until {
            let secs = t
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            self.expiry
                .get_or_create(&IdentityLabels {
                    identity: identity.to_string(),
                })
                .set(secs as i64);
        }
    }

    /// The identity left the node: its series go too.
    pub fn forget(&self, identity: &str) {
        let identity = identity.to_string();
        self.expiry.remove(&IdentityLabels {
            identity: identity.clone(),
        });
        for result in ["success", "failure"] {
            self.refreshes.remove(&RefreshLabels {
                identity: identity.clone(),
                result,
            });
        }
    }
}
