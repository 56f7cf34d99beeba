//! The CA's Prometheus metrics.

use crate::material::{Material, unix_seconds};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `issued`, or why not: `unauthenticated`, `permission_denied`,
    /// `invalid_argument`, `unavailable`, `internal`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnchorLabels {
    pub subject: String,
}

#[derive(Clone, Default)]
pub struct CaMetrics {
    pub certificates: Family<ResultLabels, Counter>,
    pub issuer_expiry: Gauge,
    pub anchor_expiry: Family<AnchorLabels, Gauge>,
    pub reloads: Family<ReloadLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

impl CaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let weft = registry.sub_registry_with_prefix("weft_identity");
        weft.register(
            "certificates_issued",
            "Certify requests by result (issued, or the reason for refusal)",
            m.certificates.clone(),
        );
        weft.register(
            "issuer_expiry_timestamp_seconds",
            "notAfter of the issuer certificate in use, Unix seconds",
            m.issuer_expiry.clone(),
        );
        weft.register(
            "trust_anchor_expiry_timestamp_seconds",
            "notAfter of each trust anchor in force, Unix seconds",
            m.anchor_expiry.clone(),
        );
        weft.register(
            "material_reloads",
            "Reloads of the issuer and trust anchor files by result (ok, error: old files kept)",
            m.reloads.clone(),
        );
        m
    }

    pub fn count(&self, result: &'static str) {
        self.certificates
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Sets the expiry gauges from the material now in use; anchors no longer
    /// in force disappear from the output.
    pub fn observe_material(&self, material: &Material) {
        self.issuer_expiry
            .set(unix_seconds(material.issuer_not_after));
        self.anchor_expiry.clear();
        for anchor in &material.anchors {
            self.anchor_expiry
                .get_or_create(&AnchorLabels {
                    subject: anchor.subject.clone(),
                })
                .set(unix_seconds(anchor.not_after));
        }
    }
}
