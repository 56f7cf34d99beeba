//! The service's Prometheus metrics (prefix `weft_destination_`).

use crate::index::ProblemKind;
use crate::model::{Kind, Rejection};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabel {
    /// `snapshot` or `delta`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProblemLabel {
    pub problem: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IneffectiveLabel {
    /// `dangling_reference`, `unsupported_kind`, `invalid`.
    pub reason: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    /// Watch streams open now.
    pub subscribers: Gauge,
    pub updates_pushed: Family<PushLabel, Counter>,
    /// From the index publishing a version to a subscriber's stream handing
    /// it to the transport.
    pub push_lag: Histogram,
    pub indexed_objects: Family<KindLabel, Gauge>,
    pub rejected_objects: Family<KindLabel, Counter>,
    pub index_problems: Family<ProblemLabel, Gauge>,
    /// Policy objects not in effect now, by reason (docs/policy.md).
    pub ineffective_policies: Family<IneffectiveLabel, Gauge>,
    /// Time to rebuild the index and publish the views.
    pub index_duration: Histogram,
    /// Watches the API server ended with 410 Gone, by kind.
    pub watches_expired: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_destination");
        let subscribers = Gauge::default();
        registry.register(
            "subscribers",
            "Node proxies currently watching their view",
            subscribers.clone(),
        );
        let updates_pushed = Family::<PushLabel, Counter>::default();
        registry.register(
            "updates_pushed",
            "Responses sent on Watch streams, by kind (snapshot, delta)",
            updates_pushed.clone(),
        );
        // 100 µs .. ~26 s
        let push_lag = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            "push_lag_seconds",
            "Time from a view version being published to its being sent to a subscriber",
            push_lag.clone(),
        );
        let indexed_objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "indexed_objects",
            "Objects in the index, by kind",
            indexed_objects.clone(),
        );
        let rejected_objects = Family::<KindLabel, Counter>::default();
        registry.register(
            "rejected_objects",
            "Objects refused because they do not parse or lack required fields, by kind",
            rejected_objects.clone(),
        );
        let index_problems = Family::<ProblemLabel, Gauge>::default();
        registry.register(
            "index_problems",
            "Inconsistencies the index currently works around, by problem",
            index_problems.clone(),
        );
        let ineffective_policies = Family::<IneffectiveLabel, Gauge>::default();
        registry.register(
            "ineffective_policies",
            "Policy objects (policy.weft.io) not in effect because a reference dangles, \
             names an unsupported kind, or a value is invalid, by reason",
            ineffective_policies.clone(),
        );
        for reason in crate::index::policy::status::Ineffective::ALL {
            let _ = ineffective_policies.get_or_create(&IneffectiveLabel {
                reason: reason.label(),
            });
        }
        let index_duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            "index_duration_seconds",
            "Time to rebuild the index and publish every node's view",
            index_duration.clone(),
        );
        let watches_expired = Family::<KindLabel, Counter>::default();
        registry.register(
            "watches_expired",
            "Watches the API server ended with 410 Gone (their resource version had expired, e.g. after an API server restart or an etcd compaction): the kind is listed again, and objects deleted meanwhile leave the views",
            watches_expired.clone(),
        );
        for kind in Kind::ALL {
            // Present from the start, so a dashboard shows 0 rather than
            // nothing.
            let _ = rejected_objects.get_or_create(&KindLabel {
                kind: kind.to_string(),
            });
        }
        for problem in ProblemKind::ALL {
            let _ = index_problems.get_or_create(&ProblemLabel {
                problem: problem.as_str(),
            });
        }
        Self {
            registry,
            subscribers,
            updates_pushed,
            push_lag,
            indexed_objects,
            rejected_objects,
            index_problems,
            ineffective_policies,
            index_duration,
            watches_expired,
        }
    }

    /// Counts a watch of `kind` that ended with 410 Gone.
    pub fn watch_expired(&self, kind: &str) {
        self.watches_expired
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn expired_watches(&self, kind: &str) -> u64 {
        self.watches_expired
            .get_or_create(&KindLabel { kind: kind.into() })
            .get()
    }

    /// Logs and counts a refused object. `origin` says where it came from
    /// (a file, `kube watch`).
    pub fn reject(&self, origin: &str, rejection: &Rejection) {
        tracing::warn!(
            origin,
            kind = %rejection.kind,
            object = %rejection.object,
            reason = %rejection.reason,
            "object rejected; the rest of the cluster is still served"
        );
        self.rejected_objects
            .get_or_create(&KindLabel {
                kind: rejection.kind.clone(),
            })
            .inc();
    }

    pub fn rejected(&self, kind: &str) -> u64 {
        self.rejected_objects
            .get_or_create(&KindLabel { kind: kind.into() })
            .get()
    }

    pub fn observe_lag(&self, lag: Duration) {
        self.push_lag.observe(lag.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
