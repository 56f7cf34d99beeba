//! Picking a Service endpoint for a new connection or request.
//!
//! Power of two choices over a peak-sensitive EWMA of latency (connect
//! latency at L4, response latency at L7), as Linkerd and Finagle do: pick
//! two endpoints at random, take the one with the lower cost, where cost is
//! the latency estimate times one more than the connections or requests in
//! flight. Two random candidates avoid the herding that "always the best"
//! causes when every proxy sees the same best endpoint; the in-flight factor
//! spreads load before the latency estimate catches up. kube-proxy, by
//! contrast, picks uniformly and keeps sending to a slow or dead endpoint.
//!
//! Circuit breaking: an endpoint is *ejected* (skipped) for a backoff that
//! doubles with each ejection in a row (1 s … 30 s)
//! - at once when connecting to it fails ([`Balancer::failed`]): nothing
//!   reached it, it is most likely gone, and at L4 every attempt costs a
//!   client a failed connection;
//! - after `failures_to_eject` (5) failed responses in a row (5xx, a reset
//!   mid-request: [`Balancer::request_failed`]): one error is often the
//!   request's fault, not the endpoint's, so a single one must not shift a
//!   whole Service's load.
//!
//! When the ejection ends, one request (or connection) is let through as a
//! probe while the others still avoid the endpoint; its success re-admits
//! the endpoint (and resets the backoff), its failure ejects it again for
//! twice as long. When every endpoint is ejected, the one whose ejection
//! ends first is tried anyway: refusing outright would turn a blip into an
//! outage.

use rand::Rng;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct BalancerConfig {
    /// How quickly old latency observations fade (time constant).
    pub decay: Duration,
    /// Latency assumed for an endpoint never measured: low, so new endpoints
    /// get traffic and a measurement.
    pub default_latency: Duration,
    pub failure_backoff: Duration,
    pub max_failure_backoff: Duration,
    /// Failed responses in a row that eject an endpoint.
    pub failures_to_eject: u32,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_latency: Duration::from_millis(1),
            failure_backoff: Duration::from_secs(1),
            max_failure_backoff: Duration::from_secs(30),
            failures_to_eject: 5,
        }
    }
}

#[derive(Clone, Debug)]
struct Stats {
    /// Latency estimate in seconds.
    ewma: f64,
    updated: Instant,
    in_flight: usize,
    consecutive_failures: u32,
    /// Ejections in a row (the backoff doubles with each).
    ejections: u32,
    backoff_until: Option<Instant>,
    /// The ejection ended and one probe is in flight: the others keep
    /// avoiding the endpoint until it answers.
    probing: bool,
    /// When the endpoint was last ejected: a failure of a request picked
    /// before then belongs to the episode that ejected it and changes
    /// nothing (one ejection per failure episode).
    ejected_at: Option<Instant>,
}

/// Per-endpoint state, shared by every connection of the node proxy.
pub struct Balancer<K> {
    config: BalancerConfig,
    stats: Mutex<HashMap<K, Stats>>,
}

/// What `/config_dump` shows for one endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointState {
    pub latency_ewma: Duration,
    pub in_flight: usize,
    pub consecutive_failures: u32,
    pub backed_off: bool,
}

impl<K: Hash + Eq + Clone> Balancer<K> {
    pub fn new(config: BalancerConfig) -> Self {
        Self {
            config,
            stats: Mutex::default(),
        }
    }

    /// Chooses among `candidates` and counts a connection in flight to it;
    /// report the outcome with [`Balancer::connected`] or [`Balancer::failed`].
    pub fn pick(&self, candidates: &[K], rng: &mut impl Rng) -> Option<K> {
        self.pick_avoiding(candidates, &[], rng)
    }

    /// Like [`Balancer::pick`], avoiding the endpoints in `avoid` (those
    /// that already failed this request: a retry goes elsewhere, as Envoy's
    /// previous-hosts predicate does) while another candidate is usable
    /// (not ejected); when none is, `avoid` is ignored.
    pub fn pick_avoiding(&self, candidates: &[K], avoid: &[K], rng: &mut impl Rng) -> Option<K> {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock");
        let is_usable = |k: &K| {
            stats.get(k).is_none_or(|s| match s.backoff_until {
                None => true,
                Some(until) => until <= now && !s.probing,
            })
        };
        let fresh: Vec<&K> = candidates
            .iter()
            .filter(|k| !avoid.contains(k) && is_usable(k))
            .collect();
        let usable: Vec<&K> = if fresh.is_empty() {
            candidates.iter().filter(|k| is_usable(k)).collect()
        } else {
            fresh
        };
        let chosen = match usable.len() {
            0 => candidates
                .iter()
                .min_by_key(|k| stats.get(*k).and_then(|s| s.backoff_until))?,
            1 => usable[0],
            n => {
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let cost = |k: &K| self.cost(stats.get(k), now);
                if cost(usable[a]) <= cost(usable[b]) {
                    usable[a]
                } else {
                    usable[b]
                }
            }
        }
        .clone();
        let s = self.entry(&mut stats, &chosen, now);
        s.in_flight += 1;
        if s.backoff_until.is_some() {
            // Ejected until now (or every endpoint is): this one is the probe.
            s.probing = true;
        }
        Some(chosen)
    }

    /// The connection to `k` was established, or its response arrived,
    /// after `latency`: a success.
    pub fn connected(&self, k: &K, latency: Duration) {
        let _ = self.responded(k, latency, true);
    }

    /// A response from `k` arrived after `latency`; `ok`: not a failure
    /// (a 5xx is one: it counts towards ejection, its latency is still
    /// measured).
    pub fn responded(&self, k: &K, latency: Duration, ok: bool) -> Verdict {
        let now = Instant::now();
        let picked = now.checked_sub(latency).unwrap_or(now);
        let mut stats = self.stats.lock().expect("balancer lock");
        let decay = self.config.decay.as_secs_f64();
        let s = self.entry(&mut stats, k, now);
        s.in_flight = s.in_flight.saturating_sub(1);
        if !ok && s.same_episode(picked) {
            return Verdict::SameEpisode;
        }
        let observed = latency.as_secs_f64();
        // Peak-sensitive: a slower observation replaces the estimate at
        // once; faster ones pull it down gradually.
        if observed > s.ewma {
            s.ewma = observed;
        } else {
            let elapsed = now.saturating_duration_since(s.updated).as_secs_f64();
            let w = (-elapsed / decay).exp();
            s.ewma = s.ewma * w + observed * (1.0 - w);
        }
        s.updated = now;
        if ok {
            s.consecutive_failures = 0;
            s.ejections = 0;
            s.backoff_until = None;
            s.probing = false;
            Verdict::Counted
        } else {
            self.count_failure(s, now, false)
        }
    }

    /// Connecting to `k` failed: ejected at once.
    pub fn failed(&self, k: &K) -> Verdict {
        self.fail(k, None, true)
    }

    /// Connecting to `k`, picked at `picked`, failed (or the destination
    /// said nothing reached the application): ejected at once, unless it
    /// was ejected since `picked` (by another request of the same
    /// failure episode, which must not extend the backoff).
    pub fn failed_since(&self, k: &K, picked: Instant) -> Verdict {
        self.fail(k, Some(picked), true)
    }

    fn fail(&self, k: &K, picked: Option<Instant>, eject_now: bool) -> Verdict {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock");
        let s = self.entry(&mut stats, k, now);
        s.in_flight = s.in_flight.saturating_sub(1);
        if picked.is_some_and(|p| s.same_episode(p)) {
            return Verdict::SameEpisode;
        }
        self.count_failure(s, now, eject_now)
    }

    /// A request to `k` failed without a response (reset, timed out):
    /// counts towards ejection.
    pub fn request_failed(&self, k: &K) -> Verdict {
        self.fail(k, None, false)
    }

    /// Like [`Balancer::request_failed`] for a request picked at
    /// `picked` (see [`Balancer::failed_since`]).
    pub fn request_failed_since(&self, k: &K, picked: Instant) -> Verdict {
        self.fail(k, Some(picked), false)
    }

    fn count_failure(&self, s: &mut Stats, now: Instant, eject_now: bool) -> Verdict {
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        // A failed probe ejects again whatever the count.
        if eject_now || s.probing || s.consecutive_failures >= self.config.failures_to_eject {
            s.ejections = s.ejections.saturating_add(1);
            let backoff = self
                .config
                .failure_backoff
                .saturating_mul(1u32 << (s.ejections - 1).min(16))
                .min(self.config.max_failure_backoff);
            s.backoff_until = Some(now + backoff);
            s.ejected_at = Some(now);
            s.probing = false;
            Verdict::Ejected
        } else {
            Verdict::Counted
        }
    }

    /// A pick that ended with no outcome to learn from (the request was
    /// abandoned by its client): it is only no longer in flight.
    pub fn cancelled(&self, k: &K) {
        let mut stats = self.stats.lock().expect("balancer lock");
        if let Some(s) = stats.get_mut(k) {
            s.in_flight = s.in_flight.saturating_sub(1);
            // An abandoned probe tells nothing: the next pick probes.
            s.probing = false;
        }
    }

    /// Forgets endpoints that are no longer in any Service.
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.stats
            .lock()
            .expect("balancer lock")
            .retain(|k, _| keep(k));
    }

    /// Every endpoint's state (for `/config_dump`).
    pub fn snapshot(&self) -> Vec<(K, EndpointState)> {
        let now = Instant::now();
        let stats = self.stats.lock().expect("balancer lock");
        stats
            .iter()
            .map(|(k, s)| {
                let state = EndpointState {
                    latency_ewma: Duration::from_secs_f64(s.ewma),
                    in_flight: s.in_flight,
                    consecutive_failures: s.consecutive_failures,
                    backed_off: s.backoff_until.is_some_and(|u| u > now),
                };
                (k.clone(), state)
            })
            .collect()
    }

    pub fn state(&self, k: &K) -> Option<EndpointState> {
        let now = Instant::now();
        let stats = self.stats.lock().expect("balancer lock");
        stats.get(k).map(|s| EndpointState {
            latency_ewma: Duration::from_secs_f64(s.ewma),
            in_flight: s.in_flight,
            consecutive_failures: s.consecutive_failures,
            backed_off: s.backoff_until.is_some_and(|u| u > now),
        })
    }

    fn cost(&self, stats: Option<&Stats>, now: Instant) -> f64 {
        match stats {
            None => self.config.default_latency.as_secs_f64(),
            Some(s) => {
                // Without fresh observations the estimate relaxes towards the
                // default, so one slow connect is not held against an
                // endpoint forever.
                let elapsed = now.saturating_duration_since(s.updated).as_secs_f64();
                let w = (-elapsed / self.config.decay.as_secs_f64()).exp();
                let latency = s.ewma * w + self.config.default_latency.as_secs_f64() * (1.0 - w);
                latency * (s.in_flight as f64 + 1.0)
            }
        }
    }

    fn entry<'a>(&self, stats: &'a mut HashMap<K, Stats>, k: &K, now: Instant) -> &'a mut Stats {
        stats.entry(k.clone()).or_insert_with(|| Stats {
            ewma: self.config.default_latency.as_secs_f64(),
            updated: now,
            in_flight: 0,
            consecutive_failures: 0,
            ejections: 0,
            backoff_until: None,
            probing: false,
            ejected_at: None,
        })
    }
}

impl Stats {
    /// Whether a failure of a request picked at `picked` belongs to the
    /// episode that already ejected the endpoint: it was in flight when
    /// the ejection came. (The probe is picked after the ejection ended.)
    fn same_episode(&self, picked: Instant) -> bool {
        self.ejected_at.is_some_and(|at| picked <= at)
    }
}

/// What a reported failure did to its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// This failure ejected the endpoint.
    Ejected,
    /// Counted (a success, or a failure short of ejection).
    Counted,
    /// The request was in flight when the endpoint was ejected for the
    /// same failure episode: not counted again.
    SameEpisode,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn share(
        b: &Balancer<&'static str>,
        eps: &[&'static str],
        latency: impl Fn(&str) -> Duration,
        n: usize,
    ) -> HashMap<&'static str, usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = HashMap::new();
        for _ in 0..n {
            let k = b.pick(eps, &mut rng).unwrap();
            *counts.entry(k).or_default() += 1;
            b.connected(&k, latency(k));
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_gets_a_clearly_smaller_share() {
        let b = Balancer::new(BalancerConfig::default());
        let eps = ["fast", "slow", "fast2"];
        let lat = |k: &str| {
            if k == "slow" {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(1)
            }
        };
        let counts = share(&b, &eps, lat, 3000);
        let slow = counts.get("slow").copied().unwrap_or(0);
        // Uniform would give 1000; P2C only picks it when both candidates
        // are "slow", which it never is twice: it wins no contest.
        assert!(slow < 100, "slow endpoint got {slow} of 3000: {counts:?}");
        assert!(
            counts["fast"] > 1200 && counts["fast2"] > 1200,
            "{counts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_connections_spread_load_before_latency_is_known() {
        let b: Balancer<&str> = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(1);
        let eps = ["a", "b"];
        // Ten connects in flight at once (none has completed yet).
        let picks: Vec<_> = (0..10).map(|_| b.pick(&eps, &mut rng).unwrap()).collect();
        let a = picks.iter().filter(|k| **k == "a").count();
        assert_eq!(
            a, 5,
            "two candidates, equal latency: in-flight counts alternate them: {picks:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_endpoint_is_skipped_for_a_growing_backoff() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(3);
        let eps = ["good", "bad"];
        b.failed(&"bad");
        for _ in 0..50 {
            let k = b.pick(&eps, &mut rng).unwrap();
            assert_eq!(k, "good");
            b.connected(&k, Duration::from_millis(1));
        }
        assert!(b.state(&"bad").unwrap().backed_off);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(
            !b.state(&"bad").unwrap().backed_off,
            "1 s after one failure it is tried again"
        );
        b.failed(&"bad");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(b.state(&"bad").unwrap().backed_off, "second failure: 2 s");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(!b.state(&"bad").unwrap().backed_off);
        b.connected(&"bad", Duration::from_millis(1));
        assert_eq!(b.state(&"bad").unwrap().consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_responses_eject_after_five_in_a_row_and_a_probe_readmits() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(4);
        let eps = ["good", "bad"];
        let ms = Duration::from_millis(1);
        // Four 5xx, a success, four more: never five in a row, never ejected.
        for ok in [false, false, false, false, true, false, false, false, false] {
            b.responded(&"bad", ms, ok);
            assert!(!b.state(&"bad").unwrap().backed_off);
        }
        b.request_failed(&"bad");
        let s = b.state(&"bad").unwrap();
        assert!(s.backed_off && s.consecutive_failures == 5, "{s:?}");
        for _ in 0..50 {
            let k = b.pick(&eps, &mut rng).unwrap();
            assert_eq!(k, "good", "ejected for 1 s");
            b.connected(&k, ms);
        }
        // The ejection ends: exactly one pick goes to "bad" (the probe), the
        // others avoid it while the probe is in flight.
        tokio::time::advance(Duration::from_millis(1001)).await;
        let picks: Vec<_> = (0..50).map(|_| b.pick(&eps, &mut rng).unwrap()).collect();
        assert_eq!(
            picks.iter().filter(|k| **k == "bad").count(),
            1,
            "{picks:?}"
        );
        for k in picks.iter().filter(|k| **k == "good") {
            b.connected(k, ms);
        }
        // The probe fails: ejected again, twice as long.
        b.responded(&"bad", ms, false);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(b.state(&"bad").unwrap().backed_off, "second ejection: 2 s");
        tokio::time::advance(Duration::from_millis(600)).await;
        let picks: Vec<_> = (0..20).map(|_| b.pick(&eps, &mut rng).unwrap()).collect();
        assert_eq!(
            picks.iter().filter(|k| **k == "bad").count(),
            1,
            "{picks:?}"
        );
        // This probe succeeds: re-admitted, counts reset.
        b.responded(&"bad", ms, true);
        let s = b.state(&"bad").unwrap();
        assert!(!s.backed_off && s.consecutive_failures == 0, "{s:?}");
        let picks: Vec<_> = (0..50).map(|_| b.pick(&eps, &mut rng).unwrap()).collect();
        assert!(picks.iter().filter(|k| **k == "bad").count() > 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_lets_the_next_pick_probe() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(6);
        let ms = Duration::from_millis(1);
        b.failed(&"x");
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.pick(&["x"], &mut rng), Some("x"), "the probe");
        for _ in 0..10 {
            assert_eq!(b.pick(&["x", "y"], &mut rng), Some("y"), "probe in flight");
            b.connected(&"y", ms);
        }
        // The client went away: no verdict, and the next pick may probe.
        b.cancelled(&"x");
        let probes = (0..20)
            .filter(|_| {
                let k = b.pick(&["x", "y"], &mut rng).unwrap();
                if k == "y" {
                    b.connected(&"y", ms);
                }
                k == "x"
            })
            .count();
        assert_eq!(probes, 1, "one new probe after the abandoned one");
    }

    #[tokio::test(start_paused = true)]
    async fn the_snapshot_lists_every_endpoint_seen() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(2);
        let k = b.pick(&["a"], &mut rng).unwrap();
        b.connected(&k, Duration::from_millis(7));
        b.failed(&"b");
        let mut snap = b.snapshot();
        snap.sort_by_key(|(k, _)| *k);
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].1.latency_ewma, Duration::from_millis(7));
        assert!(snap[1].1.backed_off && snap[1].1.consecutive_failures == 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_pick_is_no_longer_in_flight_and_teaches_nothing() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(11);
        let k = b.pick(&["x"], &mut rng).unwrap();
        assert_eq!(b.state(&k).unwrap().in_flight, 1);
        b.cancelled(&k);
        let s = b.state(&k).unwrap();
        assert_eq!((s.in_flight, s.consecutive_failures), (0, 0));
        assert_eq!(s.latency_ewma, BalancerConfig::default().default_latency);
    }

    #[tokio::test(start_paused = true)]
    async fn when_all_failed_the_soonest_to_recover_is_tried() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(5);
        b.failed(&"a");
        b.failed(&"a"); // 2 s
        b.failed(&"b"); // 1 s
        assert_eq!(b.pick(&["a", "b"], &mut rng), Some("b"));
        assert_eq!(b.pick(&[] as &[&str], &mut rng), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_the_endpoints_that_failed_it_while_others_are_usable() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(12);
        let ms = Duration::from_millis(1);
        // "a" is much the fastest: P2C alone would pick it nearly always.
        for (k, latency) in [("a", ms), ("b", 50 * ms), ("c", 50 * ms)] {
            let _ = b.pick(&[k], &mut rng);
            b.connected(&k, latency);
        }
        for _ in 0..200 {
            let k = b.pick_avoiding(&["a", "b", "c"], &["a"], &mut rng).unwrap();
            assert_ne!(
                k, "a",
                "a retry must not go back to the endpoint that failed it"
            );
            b.connected(&k, 50 * ms);
        }
        let k = b
            .pick_avoiding(&["a", "b", "c"], &["a", "b"], &mut rng)
            .unwrap();
        assert_eq!(k, "c", "the one left");
        b.connected(&k, 50 * ms);
        // Every candidate failed this request: fall back to all of them.
        let k = b.pick_avoiding(&["a", "b"], &["a", "b"], &mut rng);
        assert!(k.is_some(), "falls back when none is left");
        b.connected(&k.unwrap(), ms);
        // An avoided endpoint is still preferred to an ejected one.
        b.failed(&"c");
        let k = b.pick_avoiding(&["a", "c"], &["a"], &mut rng).unwrap();
        assert_eq!(
            k, "a",
            "c is ejected: the previous host is better than none"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_when_an_endpoint_is_ejected_do_not_extend_its_backoff() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(13);
        // Three requests in flight to "x" when it dies.
        let picked = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.pick(&["x"], &mut rng), Some("x"));
        }
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(b.failed_since(&"x", picked), Verdict::Ejected);
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(b.failed_since(&"x", picked), Verdict::SameEpisode);
        assert_eq!(b.request_failed_since(&"x", picked), Verdict::SameEpisode);
        let s = b.state(&"x").unwrap();
        assert_eq!((s.consecutive_failures, s.in_flight), (1, 0), "{s:?}");
        // One ejection: the probe comes 1 s after it, not 2 s.
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(!b.state(&"x").unwrap().backed_off, "ejected for 1 s only");
        // The probe (picked after the ejection) fails: a new episode,
        // twice as long.
        let probe = Instant::now();
        assert_eq!(b.pick(&["x"], &mut rng), Some("x"), "the probe");
        assert_eq!(b.failed_since(&"x", probe), Verdict::Ejected);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(b.state(&"x").unwrap().backed_off, "second episode: 2 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_spike_is_forgiven_over_time() {
        let b = Balancer::new(BalancerConfig::default());
        let mut rng = StdRng::seed_from_u64(9);
        let _ = b.pick(&["x"], &mut rng);
        b.connected(&"x", Duration::from_millis(200));
        assert_eq!(
            b.state(&"x").unwrap().latency_ewma,
            Duration::from_millis(200),
            "peaks count at once"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        let _ = b.pick(&["x"], &mut rng);
        b.connected(&"x", Duration::from_millis(1));
        let est = b.state(&"x").unwrap().latency_ewma;
        assert!(
            est < Duration::from_millis(20),
            "after 3 decay periods the estimate is near the new value: {est:?}"
        );
    }
}
