//! Callers that keep failing are slowed down before they cost anything.
//!
//! Authenticating a caller may cost the API server a TokenReview, and a
//! refused Certify still parses a CSR: an unauthenticated or misbehaving
//! client looping on the CA must not turn it into an amplifier against the
//! API server, nor take its time from the node proxies it serves. Each
//! source address gets a bucket of failures (`burst`, refilled at `per_second`);
//! while it is empty the address's requests are refused at once with
//! RESOURCE_EXHAUSTED, before authentication. Successful requests cost
//! nothing, so a healthy node proxy is never limited.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use tokio::time::Instant;

/// How many addresses are tracked at most; beyond, the fullest buckets
/// (the least suspicious) are forgotten first.
const MAX_TRACKED: usize = 4096;

pub struct FailureLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// Digests of credentials that authenticated lately, and when.
    good: Mutex<HashMap<u64, Instant>>,
    hasher: std::hash::RandomState,
}

/// How long a credential that authenticated stays recognised.
const GOOD_FOR: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl FailureLimiter {
    pub fn new(burst: u32, per_second: f64) -> Self {
        Self {
            burst: f64::from(burst),
            per_second,
            buckets: Mutex::default(),
            good: Mutex::default(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn digest(&self, credential: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(credential)
    }

    /// Remembers a credential that authenticated (by a keyed digest).
    pub fn good(&self, credential: &[u8]) {
        if credential.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut good = self.good.lock().unwrap_or_else(|e| e.into_inner());
        if good.len() >= MAX_TRACKED {
            good.retain(|_, at| now - *at < GOOD_FOR);
        }
        if good.len() < MAX_TRACKED {
            good.insert(self.digest(credential), now);
        }
    }

    /// Whether `credential` authenticated within the last ten minutes.
    pub fn is_known_good(&self, credential: &[u8]) -> bool {
        if credential.is_empty() {
            return false;
        }
        let good = self.good.lock().unwrap_or_else(|e| e.into_inner());
        good.get(&self.digest(credential))
            .is_some_and(|at| Instant::now() - *at < GOOD_FOR)
    }

    fn refilled(&self, b: Bucket, now: Instant) -> Bucket {
        let tokens = (b.tokens + (now - b.at).as_secs_f64() * self.per_second).min(self.burst);
        Bucket { tokens, at: now }
    }

    /// `Err(wait)` while `ip` has used up its failures: how long until one
    /// more is allowed.
    pub fn check(&self, ip: IpAddr) -> Result<(), std::time::Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = buckets.get_mut(&ip) else {
            return Ok(());
        };
        *b = self.refilled(*b, now);
        if b.tokens >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - b.tokens) / self.per_second;
        Err(std::time::Duration::from_secs_f64(wait))
    }

    /// Takes one failure from `ip`'s bucket.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            let full: Vec<IpAddr> = buckets
                .iter()
                .filter(|(_, b)| self.refilled(**b, now).tokens >= self.burst)
                .map(|(ip, _)| *ip)
                .collect();
            for ip in full {
                buckets.remove(&ip);
            }
            if buckets.len() >= MAX_TRACKED {
                // Every tracked address is failing: the newcomer starts
                // limited rather than evicting one that is.
                buckets.insert(
                    ip,
                    Bucket {
                        tokens: 0.0,
                        at: now,
                    },
                );
                return;
            }
        }
        let fresh = Bucket {
            tokens: self.burst,
            at: now,
        };
        let b = buckets.entry(ip).or_insert(fresh);
        *b = self.refilled(*b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn an_address_that_keeps_failing_waits_and_others_do_not() {
        let limiter = FailureLimiter::new(3, 1.0);
        let bad: IpAddr = "10.0.0.9".parse().unwrap();
        let good: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.check(bad).is_ok());
            limiter.failed(bad);
        }
        let wait = limiter.check(bad).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limiter.check(good).is_ok(),
            "another address is not limited"
        );
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(limiter.check(bad).is_ok(), "one failure refilled");
        limiter.failed(bad);
        assert!(limiter.check(bad).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_credential_that_authenticated_is_recognised_for_a_while() {
        let limiter = FailureLimiter::new(3, 1.0);
        assert!(!limiter.is_known_good(b"Bearer node-a"));
        limiter.good(b"Bearer node-a");
        assert!(limiter.is_known_good(b"Bearer node-a"));
        assert!(!limiter.is_known_good(b"Bearer node-b"));
        assert!(!limiter.is_known_good(b""));
        tokio::time::advance(GOOD_FOR).await;
        assert!(
            !limiter.is_known_good(b"Bearer node-a"),
            "forgotten after a while"
        );
    }
}
