//! Retries: which failed requests may be tried again, and the budget that
//! keeps retries from multiplying load on a backend that is already
//! failing.
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
use weft_destination_api::RouteRetry;

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

/// What went wrong with one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this status.
    Status(u16),
    /// A gRPC request ended with this `grpc-status` (known from a
    /// trailers-only response, or trailers that came with the first frame).
    Grpc(u32),
    /// No connection (refused, reset before a response, timed out
    /// connecting): the request was never processed, so any method may be
    /// retried.
    ConnectFailed,
    /// The connection failed after the request was sent: it may have been
    /// processed.
    ResponseFailed,
}

/// The largest request body kept for replay. A larger body is streamed
/// without a copy and its request is not retried (Linkerd caps at 64 KiB
/// too): buffering big uploads per request would cost memory on every
/// request to save a few.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// gRPC statuses retried when a route lists none: CANCELLED (1),
/// DEADLINE_EXCEEDED (4), RESOURCE_EXHAUSTED (8) and UNAVAILABLE (14), the
/// transient ones (Envoy's and App Mesh's set). INTERNAL (13) is left out:
/// it usually means a bug that the next attempt hits again.
pub const DEFAULT_GRPC_CODES: [u32; 4] = [1, 4, 8, 14];

/// Whether a failed attempt is retried (before asking the budget), after
/// `retries_made` retries of this request. `body_replayable`: the whole
/// body is buffered (or there is none).
pub fn should_retry(
    policy: &RouteRetry,
    method: &http::Method,
    body_replayable: bool,
    retries_made: u32,
    outcome: Outcome,
) -> bool {
    if retries_made >= policy.attempts || !body_replayable {
        return false;
    }
    match outcome {
        Outcome::ConnectFailed => true,
        // A route's `retry` declares its requests retryable; still, a
        // request that may have been processed is replayed only when the
        // method is idempotent (RFC 9110 §9.2.2) unless the status says it
        // was not processed (the codes the operator listed).
        Outcome::ResponseFailed => method_is_idempotent(method),
        Outcome::Status(code) => {
            if policy.codes.is_empty() {
                (500..600).contains(&code)
            } else {
                policy.codes.contains(&u32::from(code))
            }
        }
        // Like a listed HTTP status: the route declared it retryable,
        // whatever the method (gRPC calls are all POSTs).
        Outcome::Grpc(code) => {
            if policy.grpc_codes.is_empty() {
                DEFAULT_GRPC_CODES.contains(&code)
            } else {
                policy.grpc_codes.contains(&code)
            }
        }
    }
}

/// RFC 9110 §9.2.2: a request that may be sent again with the same effect.
pub fn method_is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

#[cfg(test)]
mod tests;
