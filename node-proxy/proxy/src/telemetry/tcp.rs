//! The node proxy's Prometheus metrics (`:15020/metrics`).
//!
//! TCP metrics follow the shape operators know from Istio's
//! `istio_tcp_*` and Linkerd's `tcp_*`: one series per (reporter, source,
//! destination, security) with workload-level labels only. Pod names, IPs
//! and ports never become labels, so series count grows with the number of
//! workloads talking, not with connections or pod churn.

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::fmt::Write;

/// Which side of a connection a node proxy saw it from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        })
    }
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        })
    }
}

/// Who talked to whom: the peer labels every TCP and request series
/// carries, workload-level only. Empty strings stand for "unknown" (a
/// destination outside the mesh has no principal; a plaintext client on
/// 15006 has no identity).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Peers {
    pub source_workload: String,
    pub source_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
}

/// Labels of every TCP series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    #[prometheus(flatten)]
    pub peers: Peers,
    pub connection_security_policy: SecurityPolicy,
}

/// How a connection's protocol was decided. `timeout` is the one to watch:
/// each such connection waited the whole detection timeout before its
/// first byte moved (a server-speaks-first protocol on a port not declared
/// opaque: declare it with `weft.io/opaque-ports`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DetectionOutcome {
    /// Not detected: the port is declared opaque (or opaque by default).
    DeclaredOpaque,
    Http1,
    Http2,
    /// The first bytes are not HTTP (or the client closed first).
    Opaque,
    /// The client sent nothing (or too little) within the timeout.
    Timeout,
}

impl DetectionOutcome {
    pub fn of(detected: &weft_stream::Detected) -> Self {
        match detected.protocol {
            _ if detected.timed_out => Self::Timeout,
            weft_stream::Protocol::Http1 => Self::Http1,
            weft_stream::Protocol::Http2 => Self::Http2,
            weft_stream::Protocol::Opaque => Self::Opaque,
        }
    }
}

impl EncodeLabelValue for DetectionOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Self::DeclaredOpaque => "declared_opaque",
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Opaque => "opaque",
            Self::Timeout => "timeout",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectionLabels {
    pub reporter: Reporter,
    pub outcome: DetectionOutcome,
}

/// Which bound refused a connection (`transport::limits`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LimitReason {
    /// The local pod carries its maximum of connections.
    PodLimit,
    /// The node proxy carries its maximum of connections.
    NodeLimit,
}

impl LimitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PodLimit => "pod_limit",
            Self::NodeLimit => "node_limit",
        }
    }
}

impl EncodeLabelValue for LimitReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: LimitReason,
}

#[derive(Clone, Default)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    detections: Family<DetectionLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
}

impl TcpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        // prometheus-client appends `_total` to counters.
        registry.register(
            "weft_tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "weft_tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        // Istio's meaning, which operators already know: "sent" is the
        // response direction (towards the client), "received" the request
        // direction (from the client).
        registry.register(
            "weft_tcp_sent_bytes",
            "Bytes sent back to the client of TCP connections (response direction; counted when they close)",
            self.sent.clone(),
        );
        registry.register(
            "weft_tcp_received_bytes",
            "Bytes received from the client of TCP connections (request direction; counted when they close)",
            self.received.clone(),
        );
        registry.register(
            "weft_connections_refused",
            "Connections refused because a local pod or the node proxy carried its maximum (reason: pod_limit, node_limit)",
            self.refused.clone(),
        );
        registry.register(
            "weft_protocol_detections",
            "How the protocol of connections was decided (timeout: the connection waited the detection timeout before any byte moved)",
            self.detections.clone(),
        );
    }

    /// Counts a connection refused by a bound.
    pub fn refused(&self, reason: LimitReason) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// How many connections `reason` refused.
    pub fn refused_count(&self, reason: LimitReason) -> u64 {
        self.refused.get_or_create(&RefusedLabels { reason }).get()
    }

    /// Counts how one connection's protocol was decided.
    pub fn detected(&self, reporter: Reporter, outcome: DetectionOutcome) {
        self.detections
            .get_or_create(&DetectionLabels { reporter, outcome })
            .inc();
    }

    /// Counts a connection as opened; the returned handle counts it closed.
    pub fn open(&self, labels: TcpLabels) -> OpenConnection {
        self.opened.get_or_create(&labels).inc();
        OpenConnection {
            metrics: self.clone(),
            labels: Some(labels),
        }
    }
}

/// An open connection's entry in the metrics. Closing it records the bytes;
/// dropping it without `close` (a task that panicked) still counts the
/// close, so opened − closed is always the number really open.
pub struct OpenConnection {
    metrics: TcpMetrics,
    labels: Option<TcpLabels>,
}

impl OpenConnection {
    /// The connection's labels (the request metrics of an HTTP connection
    /// carry the same peers).
    pub fn labels(&self) -> &TcpLabels {
        self.labels
            .as_ref()
            .expect("labels are taken only when the connection closes")
    }

    /// Records a closed connection; `moved.a_to_b` is what the client sent.
    pub fn close(mut self, moved: &weft_stream::Transferred) {
        if let Some(labels) = self.labels.take() {
            self.metrics
                .sent
                .get_or_create(&labels)
                .inc_by(moved.b_to_a);
            self.metrics
                .received
                .get_or_create(&labels)
                .inc_by(moved.a_to_b);
            self.metrics.closed.get_or_create(&labels).inc();
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(labels) = self.labels.take() {
            self.metrics.closed.get_or_create(&labels).inc();
        }
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at scrape time.
#[derive(Debug)]
pub struct ProcessCollector {
    start_time_seconds: f64,
}

impl ProcessCollector {
    pub fn new() -> Self {
        Self {
            start_time_seconds: process_start_time().unwrap_or(0.0),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name (which may contain spaces).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let ticks = clock_ticks();
        // utime and stime are fields 14 and 15 of stat(5); index from state (field 3).
        let cpu = (field(11) + field(12)) / ticks;
        let rss = field(21) * page_size();
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);

        let counter = ConstCounter::new(cpu);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "CPU time used by the process",
            None,
            MetricType::Counter,
        )?)?;
        let gauge = ConstGauge::new(rss);
        gauge.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            None,
            MetricType::Gauge,
        )?)?;
        let gauge = ConstGauge::new(fds as i64);
        gauge.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            MetricType::Gauge,
        )?)?;
        let gauge = ConstGauge::new(self.start_time_seconds);
        gauge.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as f64 } else { 4096.0 }
}

fn process_start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: f64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + start_ticks / clock_ticks())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(reporter: Reporter) -> TcpLabels {
        TcpLabels {
            reporter,
            peers: Peers {
                source_workload: "client".into(),
                source_namespace: "demo".into(),
                source_principal: "spiffe://cluster.local/ns/demo/sa/client".into(),
                destination_workload: "server".into(),
                destination_namespace: "demo".into(),
                destination_principal: "spiffe://cluster.local/ns/demo/sa/server".into(),
                destination_service: "server.demo.svc.cluster.local".into(),
            },
            connection_security_policy: SecurityPolicy::MutualTls,
        }
    }

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn connections_and_bytes_are_counted_with_their_labels() {
        let mut registry = Registry::default();
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);
        let c = tcp.open(labels(Reporter::Source));
        let text = render(&registry);
        assert!(
            text.contains(
                "weft_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\""
            ),
            "{text}"
        );
        assert!(
            !text.contains("weft_tcp_connections_closed_total{"),
            "not closed yet: {text}"
        );
        c.close(&weft_stream::Transferred {
            a_to_b: 250,
            b_to_a: 1000,
        });
        let dropped = tcp.open(labels(Reporter::Source));
        drop(dropped);
        let text = render(&registry);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} missing: {text}"))
                .to_string()
        };
        assert!(line("weft_tcp_connections_opened_total").ends_with(" 2"));
        assert!(
            line("weft_tcp_connections_closed_total").ends_with(" 2"),
            "a dropped connection still counts as closed"
        );
        assert!(line("weft_tcp_sent_bytes_total").ends_with(" 1000"));
        assert!(line("weft_tcp_received_bytes_total").ends_with(" 250"));
        assert!(
            line("weft_tcp_sent_bytes_total").contains("connection_security_policy=\"mutual_tls\"")
        );
    }

    #[test]
    fn process_metrics_are_plausible() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector::new()));
        let text = render(&registry);
        let value = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name}: {text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start > now - 3600.0 && start <= now + 1.0,
            "start {start} now {now}"
        );
    }

    #[test]
    fn a_detection_that_waited_for_nothing_is_counted_as_a_timeout() {
        let detected = |protocol, timed_out| weft_stream::Detected {
            protocol,
            prefix: Default::default(),
            timed_out,
        };
        use weft_stream::Protocol;
        assert_eq!(
            DetectionOutcome::of(&detected(Protocol::Opaque, true)),
            DetectionOutcome::Timeout
        );
        assert_eq!(
            DetectionOutcome::of(&detected(Protocol::Opaque, false)),
            DetectionOutcome::Opaque
        );
        assert_eq!(
            DetectionOutcome::of(&detected(Protocol::Http2, false)),
            DetectionOutcome::Http2
        );
        let mut registry = Registry::default();
        let m = TcpMetrics::default();
        m.register(&mut registry);
        m.detected(Reporter::Source, DetectionOutcome::Timeout);
        m.detected(Reporter::Source, DetectionOutcome::Timeout);
        m.detected(Reporter::Destination, DetectionOutcome::DeclaredOpaque);
        let text = render(&registry);
        assert!(
            text.contains(
                "weft_protocol_detections_total{reporter=\"source\",outcome=\"timeout\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("weft_protocol_detections_total{reporter=\"destination\",outcome=\"declared_opaque\"} 1"),
            "{text}"
        );
    }
}
