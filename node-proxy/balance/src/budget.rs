//! The retry budget: what keeps retries from multiplying load on a
//! backend that is already failing.
//!
//! The budget is Finagle's and Linkerd's idea rather than Envoy's
//! per-request attempt count alone: retries may add at most `ratio` (20 %)
//! on top of the original requests of the last `window` (10 s), plus a
//! small floor (`min_per_second`) so that a service with little traffic can
//! still retry at all. When a backend fails every request, clients then see
//! at most 1.2× the load instead of `attempts`×, which is what turns a
//! partial outage into a full one (a "retry storm").

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per original request, over the window.
    pub ratio: f64,
    /// Retries allowed per second whatever the traffic.
    pub min_per_second: u32,
    /// How far back requests and retries are counted.
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// One budget per destination Service (per route rule, in Linkerd: the
/// same idea at a finer grain). Counts live in one-second slots, so the
/// window slides in steps of a second and memory stays constant.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    slots: Mutex<VecDeque<Slot>>,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    start: Instant,
    requests: u64,
    retries: u64,
}

const SLOT: Duration = Duration::from_secs(1);

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            slots: Mutex::new(VecDeque::new()),
        }
    }

    /// Records an original request (not a retry).
    pub fn request(&self) {
        self.with_current(|s| s.requests += 1);
    }

    /// Takes one retry from the budget: `false` when it is exhausted (the
    /// failure is then returned to the client as it is).
    pub fn try_retry(&self) -> bool {
        let mut slots = self.slots.lock().expect("retry budget lock");
        let now = Instant::now();
        Self::expire(&mut slots, now, self.config.window);
        let (requests, retries) = slots
            .iter()
            .fold((0u64, 0u64), |(q, r), s| (q + s.requests, r + s.retries));
        let floor = f64::from(self.config.min_per_second) * self.config.window.as_secs_f64();
        let allowed = floor + self.config.ratio * requests as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        Self::current(&mut slots, now).retries += 1;
        true
    }

    fn with_current(&self, f: impl FnOnce(&mut Slot)) {
        let mut slots = self.slots.lock().expect("retry budget lock");
        let now = Instant::now();
        Self::expire(&mut slots, now, self.config.window);
        f(Self::current(&mut slots, now));
    }

    fn expire(slots: &mut VecDeque<Slot>, now: Instant, window: Duration) {
        while slots
            .front()
            .is_some_and(|s| now.duration_since(s.start) >= window)
        {
            slots.pop_front();
        }
    }

    fn current(slots: &mut VecDeque<Slot>, now: Instant) -> &mut Slot {
        let fresh = slots
            .back()
            .is_none_or(|s| now.duration_since(s.start) >= SLOT);
        if fresh {
            slots.push_back(Slot {
                start: now,
                requests: 0,
                retries: 0,
            });
        }
        slots.back_mut().expect("a slot was just pushed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> RetryBudget {
        RetryBudget::new(BudgetConfig {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        })
    }

    /// Retries taken until the budget says no (bounded).
    fn drain(b: &RetryBudget) -> u32 {
        let mut n = 0;
        while n < 10_000 && b.try_retry() {
            n += 1;
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_a_few_retries_without_traffic() {
        let b = budget();
        // 1 per second over a 10 s window.
        assert_eq!(drain(&b), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_add_at_most_twenty_percent_of_the_requests() {
        let b = budget();
        for _ in 0..1000 {
            b.request();
        }
        // 10 (floor) + 20 % of 1000.
        assert_eq!(drain(&b), 210);
        // More requests earn more retries, at the same ratio.
        for _ in 0..100 {
            b.request();
        }
        assert_eq!(drain(&b), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_old_requests_and_retries() {
        let b = budget();
        for _ in 0..1000 {
            b.request();
        }
        assert_eq!(drain(&b), 210);
        tokio::time::advance(Duration::from_secs(5)).await;
        // Still within the window: nothing new.
        assert_eq!(drain(&b), 0);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Requests and retries of 11 s ago are gone: only the floor is left.
        assert_eq!(drain(&b), 10);
    }
}
