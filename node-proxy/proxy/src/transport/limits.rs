//! Bounds on the connections the proxy carries, per local pod and for the
//! whole node: one pod (a loop, a flood, a leak) must not take the file
//! descriptors and memory every other pod of the node needs. A connection
//! over a bound is refused at once; the refusal is counted
//! (`weft_connections_refused_total{reason}`) and logged (at most once per
//! pod per interval at `warn`, so that a flood does not flood the log).

use crate::telemetry::{LimitReason, TcpMetrics};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Defaults: far above what one pod needs (an idle application holds
/// tens), below what would exhaust a node proxy's file descriptors (two per
/// connection).
pub const DEFAULT_PER_POD: usize = 16_384;
pub const DEFAULT_PER_NODE: usize = 65_536;
const WARN_EVERY: Duration = Duration::from_secs(10);

pub struct ConnectionLimits {
    per_pod: usize,
    per_node: usize,
    node: AtomicUsize,
    pods: Mutex<HashMap<String, PodCount>>,
    metrics: TcpMetrics,
}

struct PodCount {
    open: usize,
    warned: Option<Instant>,
}

/// One counted connection; dropping it gives the place back.
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    pod: String,
}

impl ConnectionLimits {
    pub fn new(per_pod: usize, per_node: usize, metrics: TcpMetrics) -> Arc<Self> {
        Arc::new(Self {
            per_pod,
            per_node,
            node: AtomicUsize::new(0),
            pods: Mutex::default(),
            metrics,
        })
    }

    /// A place for one more connection of `pod` (`namespace/name`), or
    /// the bound that refuses it (counted and logged here).
    pub fn admit(self: &Arc<Self>, pod: &str) -> Result<ConnectionPermit, LimitReason> {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let count = pods.entry(pod.to_string()).or_insert(PodCount {
            open: 0,
            warned: None,
        });
        let refused = if count.open >= self.per_pod {
            Some((LimitReason::PodLimit, self.per_pod))
        } else if self.node.load(Ordering::Relaxed) >= self.per_node {
            Some((LimitReason::NodeLimit, self.per_node))
        } else {
            None
        };
        if let Some((reason, bound)) = refused {
            self.metrics.refused(reason);
            let now = Instant::now();
            if count.warned.is_none_or(|at| now - at >= WARN_EVERY) {
                count.warned = Some(now);
                tracing::warn!(
                    pod,
                    bound,
                    reason = reason.as_str(),
                    "connection refused: the proxy carries {bound} connections already ({}); \
                     is the pod looping or flooding? see weft_connections_refused_total",
                    reason.as_str()
                );
            }
            if count.open == 0 {
                pods.remove(pod);
            }
            return Err(reason);
        }
        count.open += 1;
        self.node.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionPermit {
            limits: self.clone(),
            pod: pod.to_string(),
        })
    }

    /// Connections counted now, for the node and for `pod`.
    pub fn open(&self, pod: &str) -> (usize, usize) {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        (
            self.node.load(Ordering::Relaxed),
            pods.get(pod).map_or(0, |c| c.open),
        )
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut pods = self.limits.pods.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = pods.get_mut(&self.pod) {
            count.open = count.open.saturating_sub(1);
            if count.open == 0 {
                pods.remove(&self.pod);
            }
        }
        self.limits.node.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_refuses_what_is_over_it_and_gives_places_back() {
        let metrics = TcpMetrics::default();
        let limits = ConnectionLimits::new(2, 3, metrics.clone());
        let a1 = limits.admit("demo/a").unwrap();
        let _a2 = limits.admit("demo/a").unwrap();
        // The pod's bound, while the node has room.
        assert_eq!(limits.admit("demo/a").err(), Some(LimitReason::PodLimit));
        let _b1 = limits.admit("demo/b").unwrap();
        // The node's bound, while pod b has room.
        assert_eq!(limits.admit("demo/b").err(), Some(LimitReason::NodeLimit));
        assert_eq!(limits.open("demo/a"), (3, 2));
        drop(a1);
        assert_eq!(limits.open("demo/a"), (2, 1));
        let _b2 = limits.admit("demo/b").unwrap();
        assert_eq!(limits.open("demo/b"), (3, 2));
        assert_eq!(metrics.refused_count(LimitReason::PodLimit), 1);
        assert_eq!(metrics.refused_count(LimitReason::NodeLimit), 1);
    }

    #[test]
    fn a_pod_whose_connections_are_gone_leaves_no_entry() {
        let limits = ConnectionLimits::new(1, 10, TcpMetrics::default());
        drop(limits.admit("demo/a").unwrap());
        assert!(limits.pods.lock().unwrap().is_empty());
        let _b = limits.admit("demo/b").unwrap();
        assert_eq!(limits.admit("demo/b").err(), Some(LimitReason::PodLimit));
        assert_eq!(limits.pods.lock().unwrap().len(), 1);
    }
}
