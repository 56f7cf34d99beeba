//! Golden request metrics: `weft_requests_total` and
//! `weft_request_duration_seconds`.
//!
//! The label set follows Istio's `istio_requests_total` (operators already
//! have dashboards for that shape) with Linkerd's `classification`. Every
//! label value comes from a bounded set: workload names and identities from
//! the view, a method *class* (the standard methods, else `other`), the
//! status code, the gRPC status, and a route name (the HTTPRoute rule from
//! the view, `default` without routes, `unmatched` for the proxy's 404).
//! Paths, hosts and header values never become labels. A server chooses
//! its statuses, so only the registered ones are labels of their own
//! ([`status_label`]): a hostile application answering every number from
//! 100 to 999, with every gRPC status, must not make the node proxy hold
//! a quarter of a million series per client for good.

use super::classify::{Classification, MethodClass};
use super::grpc::GrpcCode;
use super::tcp::{Peers, Reporter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Bucket bounds in seconds: 1 ms to 10 s in 1-2.5-5 steps, enough to tell a
/// cache hit from a database query from a timeout.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub use crate::state::routes::{DEFAULT_ROUTE, UNMATCHED_ROUTE};

fn route_label(route: &str) -> &str {
    if route.is_empty() {
        DEFAULT_ROUTE
    } else {
        route
    }
}

/// Labels of the retry counters: per destination Service and route rule,
/// both bounded (from the view).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub destination_service: String,
    pub route: String,
}

/// Labels of the ejection counter: the Service whose endpoint was ejected
/// and why (both bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub destination_service: String,
    /// `connect_failure` (nothing reached the application: ejected at
    /// once) or `failed_responses` (5xx, resets in a row).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    #[prometheus(flatten)]
    pub peers: Peers,
    /// The HTTPRoute rule (`<route>/<rule>`), [`DEFAULT_ROUTE`] without one.
    pub route: String,
    pub method: MethodClass,
    pub status_code: String,
    /// The gRPC status code as a number, empty for plain HTTP.
    pub grpc_status: String,
    pub classification: Classification,
}

/// The outcome of one request, as the metrics see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub classification: Classification,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: HistogramFamily,
    /// Each series' counter and histogram, found by one cheap lookup: the
    /// families' own lookup hashes and compares ten label strings, built
    /// for the purpose, twice per request (5% of a proxied request's CPU).
    series: Arc<RwLock<SeriesCache>>,
    retries: Family<RetryLabels, Counter>,
    budget_exhausted: Family<RetryLabels, Counter>,
    failovers: Family<RetryLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    reset_floods: Family<ReporterLabels, Counter>,
}

/// Only who reports: a counter of rare events whose details are logged.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReporterLabels {
    pub reporter: Reporter,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            series: Arc::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            failovers: Family::default(),
            ejections: Family::default(),
            reset_floods: Family::default(),
        }
    }
}

impl RequestMetrics {
    pub fn register(&self, registry: &mut Registry) {
        // prometheus-client appends `_total` to counters.
        registry.register(
            "weft_requests",
            "HTTP and gRPC requests, counted when the response ends",
            self.requests.clone(),
        );
        registry.register(
            "weft_request_duration_seconds",
            "Time from the request's arrival to the end of its response (the last byte or trailers)",
            self.durations.clone(),
        );
        registry.register(
            "weft_request_retries",
            "Retries of failed requests (each request is counted once in weft_requests_total, with its final status)",
            self.retries.clone(),
        );
        registry.register(
            "weft_retry_budget_exhausted",
            "Failed requests that a route would have retried but the destination's retry budget did not allow",
            self.budget_exhausted.clone(),
        );
        registry.register(
            "weft_request_failovers",
            "Requests (route `opaque`: TCP connections) sent to another endpoint because the destination proxy said nothing reached the application (or the endpoint could not be connected to), whatever the route's retry policy",
            self.failovers.clone(),
        );
        registry.register(
            "weft_endpoint_ejections",
            "Endpoints ejected by the balancer (one per failure episode; requests already in flight when it was ejected do not count again)",
            self.ejections.clone(),
        );
        registry.register(
            "weft_http2_reset_floods",
            "HTTP/2 client connections closed (GOAWAY ENHANCE_YOUR_CALM) because their client made the proxy reset more than 1024 of its streams (protocol errors on them); the client is in the proxy's warning log",
            self.reset_floods.clone(),
        );
    }

    /// Counts a client connection closed for making the proxy reset too
    /// many streams.
    pub fn reset_flood(&self, reporter: Reporter) {
        self.reset_floods
            .get_or_create(&ReporterLabels { reporter })
            .inc();
    }

    pub fn failed_over(&self, destination_service: &str, route: &str) {
        self.failovers
            .get_or_create(&retry_labels(destination_service, route))
            .inc();
    }

    /// `connect`: ejected at once after a connect failure.
    pub fn ejected(&self, destination_service: &str, connect: bool) {
        let reason = if connect {
            "connect_failure"
        } else {
            "failed_responses"
        };
        self.ejections
            .get_or_create(&EjectionLabels {
                destination_service: destination_service.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn retried(&self, destination_service: &str, route: &str) {
        self.retries
            .get_or_create(&retry_labels(destination_service, route))
            .inc();
    }

    pub fn budget_exhausted(&self, destination_service: &str, route: &str) {
        self.budget_exhausted
            .get_or_create(&retry_labels(destination_service, route))
            .inc();
    }

    pub fn record(
        &self,
        reporter: Reporter,
        peers: &Arc<Peers>,
        route: String,
        method: MethodClass,
        outcome: &Outcome,
        duration: Duration,
    ) {
        let key = SeriesKey {
            reporter,
            peers: peers.clone(),
            route: if route.is_empty() {
                Cow::Borrowed(DEFAULT_ROUTE)
            } else {
                Cow::Owned(route)
            },
            method,
            status: status_label(outcome.status),
            grpc_status: outcome.grpc_status.map(grpc_status_label),
            classification: outcome.classification,
        };
        let cached = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let (count, durations) = match cached {
            Some(series) => series,
            None => {
                let labels = key.labels();
                let series = (
                    self.requests.get_or_create(&labels).clone(),
                    self.durations.get_or_create(&labels).clone(),
                );
                self.series
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, series.clone());
                series
            }
        };
        count.inc();
        durations.observe(duration.as_secs_f64());
    }
}

/// The `status_code` label of an HTTP status: the number for a status the
/// HTTP registry knows (what dashboards and alerts filter on), its class
/// (`5xx`) for any other.
fn status_label(status: u16) -> StatusLabel {
    let registered = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .is_some();
    if registered {
        StatusLabel::Code(status)
    } else {
        StatusLabel::Class((status / 100) as u8)
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum StatusLabel {
    Code(u16),
    /// The hundreds digit of an unregistered status.
    Class(u8),
}

impl std::fmt::Display for StatusLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusLabel::Code(code) => write!(f, "{code}"),
            StatusLabel::Class(class) => write!(f, "{class}xx"),
        }
    }
}

/// The `grpc_status` label of a gRPC status: the number for one of the
/// spec's codes (0 to 16), `None` (`other`) for any other.
fn grpc_status_label(code: u32) -> Option<u32> {
    (code <= GrpcCode::Unauthenticated.code()).then_some(code)
}

/// What tells one request series from another, cheap to hash and compare:
/// the peers are shared with the connection (equal `Arc`s compare by
/// pointer first), the numbers stay numbers.
#[derive(Hash, PartialEq, Eq)]
struct SeriesKey {
    reporter: Reporter,
    peers: Arc<Peers>,
    route: Cow<'static, str>,
    method: MethodClass,
    status: StatusLabel,
    /// `None`: plain HTTP; `Some(None)`: a gRPC status outside the spec.
    grpc_status: Option<Option<u32>>,
    classification: Classification,
}

/// As many entries as there are request series: bounded as the label
/// values are (see the module's comment).
type SeriesCache = HashMap<SeriesKey, (Counter, Histogram), foldhash::fast::RandomState>;

impl SeriesKey {
    fn labels(&self) -> RequestLabels {
        RequestLabels {
            reporter: self.reporter,
            peers: Peers::clone(&self.peers),
            route: self.route.to_string(),
            method: self.method,
            status_code: self.status.to_string(),
            grpc_status: match self.grpc_status {
                None => String::new(),
                Some(Some(code)) => code.to_string(),
                Some(None) => "other".to_string(),
            },
            classification: self.classification,
        }
    }
}

fn retry_labels(destination_service: &str, route: &str) -> RetryLabels {
    RetryLabels {
        destination_service: destination_service.to_string(),
        route: route_label(route).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request metrics and the registry they are registered in.
    fn registered() -> (Registry, RequestMetrics) {
        let mut registry = Registry::default();
        let m = RequestMetrics::default();
        m.register(&mut registry);
        (registry, m)
    }

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn a_request_is_counted_and_its_duration_lands_in_the_right_bucket() {
        let (registry, m) = registered();
        let peers = Arc::new(Peers {
            source_workload: "client".into(),
            destination_service: "echo.demo.svc.cluster.local".into(),
            ..Default::default()
        });
        let ok = Outcome {
            status: 200,
            grpc_status: None,
            classification: Classification::Success,
        };
        m.record(
            Reporter::Source,
            &peers,
            String::new(),
            MethodClass::Get,
            &ok,
            Duration::from_millis(30),
        );
        let text = render(&registry);
        let series = "reporter=\"source\",source_workload=\"client\",source_namespace=\"\",source_principal=\"\",destination_workload=\"\",destination_namespace=\"\",destination_principal=\"\",destination_service=\"echo.demo.svc.cluster.local\",route=\"default\",method=\"GET\",status_code=\"200\",grpc_status=\"\",classification=\"success\"";
        assert!(
            text.contains(&format!("weft_requests_total{{{series}}} 1")),
            "{text}"
        );
        // 30 ms: not under 25 ms, under 50 ms.
        assert!(
            text.contains(&format!(
                "weft_request_duration_seconds_bucket{{le=\"0.025\",{series}}} 0"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "weft_request_duration_seconds_bucket{{le=\"0.05\",{series}}} 1"
            )),
            "{text}"
        );
        assert!(text.contains("le=\"10.0\""), "{text}");
    }

    /// Series are told apart by their labels, not by which connection's
    /// peers recorded them: equal peers of another connection count into
    /// the same series, another status into its own, a gRPC status into
    /// its own.
    #[test]
    fn the_same_labels_count_into_one_series_whoever_records_them() {
        let (registry, m) = registered();
        let peers = || {
            Arc::new(Peers {
                source_workload: "client".into(),
                destination_workload: "echo".into(),
                ..Default::default()
            })
        };
        let outcome = |status, grpc_status| Outcome {
            status,
            grpc_status,
            classification: Classification::Success,
        };
        let (first, second) = (peers(), peers());
        let record = |peers, outcome: &Outcome| {
            m.record(
                Reporter::Destination,
                peers,
                "web/0".to_string(),
                MethodClass::Post,
                outcome,
                Duration::from_millis(1),
            )
        };
        record(&first, &outcome(200, None));
        record(&second, &outcome(200, None));
        record(&first, &outcome(200, None));
        record(&second, &outcome(503, None));
        record(&first, &outcome(200, Some(0)));
        let text = render(&registry);
        let count = |status: &str, grpc: &str| {
            let labels = format!(
                "reporter=\"destination\",source_workload=\"client\",source_namespace=\"\",source_principal=\"\",destination_workload=\"echo\",destination_namespace=\"\",destination_principal=\"\",destination_service=\"\",route=\"web/0\",method=\"POST\",status_code=\"{status}\",grpc_status=\"{grpc}\",classification=\"success\""
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("weft_requests_total{{{labels}}} ")))
                .map(|v| v.to_string())
        };
        assert_eq!(count("200", "").as_deref(), Some("3"), "{text}");
        assert_eq!(count("503", "").as_deref(), Some("1"), "{text}");
        assert_eq!(count("200", "0").as_deref(), Some("1"), "{text}");
        assert_eq!(text.matches("weft_requests_total{").count(), 3, "{text}");
    }

    /// A server that answers every status from 100 to 999, and every gRPC
    /// status a header can carry, makes a bounded number of series: the
    /// registered statuses each, the others by class; the spec's gRPC codes
    /// each, the others as `other`.
    #[test]
    fn a_server_cannot_make_series_without_bound() {
        let (registry, m) = registered();
        let peers = Arc::new(Peers {
            destination_workload: "hostile".into(),
            ..Default::default()
        });
        let record = |status, grpc_status| {
            let outcome = Outcome {
                status,
                grpc_status,
                classification: Classification::Failure,
            };
            m.record(
                Reporter::Source,
                &peers,
                String::new(),
                MethodClass::Post,
                &outcome,
                Duration::from_millis(1),
            );
        };
        for status in 100..=999 {
            record(status, None);
        }
        for code in 0..=255 {
            record(200, Some(code));
        }
        let text = render(&registry);
        let count = |status: &str, grpc: &str| {
            let labels = format!("status_code=\"{status}\",grpc_status=\"{grpc}\"");
            text.lines()
                .filter(|l| l.starts_with("weft_requests_total{"))
                .find(|l| l.contains(&labels))
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.to_string())
        };
        assert_eq!(count("418", "").as_deref(), Some("1"), "registered");
        assert_eq!(count("503", "").as_deref(), Some("1"), "registered");
        // 509 is not registered; 510 and 511 are.
        assert_eq!(count("509", ""), None, "{text}");
        assert_eq!(count("510", "").as_deref(), Some("1"));
        assert_eq!(
            count("5xx", "").as_deref(),
            Some("89"),
            "500-599 but 500-508, 510, 511"
        );
        assert_eq!(count("9xx", "").as_deref(), Some("100"));
        assert_eq!(count("200", "16").as_deref(), Some("1"));
        assert_eq!(count("200", "other").as_deref(), Some("239"), "17 to 255");
        let series = text.matches("weft_requests_total{").count();
        // The 62 registered statuses (the `http` crate's registry), the 9
        // classes 1xx to 9xx; with status 200, the 17 gRPC codes and `other`.
        assert_eq!(series, 62 + 9 + 17 + 1, "{text}");
    }
}
