//! Rate limiting with token buckets, as Firecracker's `rate_limiter` objects describe them:
//! a bandwidth bucket (bytes) and an ops bucket (requests), each of `size` tokens refilled
//! every `refill_time` milliseconds, with an optional `one_time_burst` spent first. A request
//! the buckets cannot pay for waits: its device stops taking requests from that queue until a
//! timer says the tokens are there.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket, in Firecracker's field names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

/// A `rate_limiter` object: either bucket may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<BucketConfig>,
}

impl RateLimit {
    /// A sentence for a bucket that cannot work, naming it.
    pub fn check(&self) -> Result<(), String> {
        for (name, bucket) in [("bandwidth", self.bandwidth), ("ops", self.ops)] {
            if let Some(b) = bucket
                && (b.size == 0 || b.refill_time == 0)
            {
                return Err(format!("rate_limiter {name} needs a size and a refill_time above 0"));
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct TokenBucket {
    size: u64,
    burst: u64,
    refill: Duration,
    budget: u64,
    last: Instant,
}

impl TokenBucket {
    fn new(c: BucketConfig, now: Instant) -> Self {
        TokenBucket {
            size: c.size,
            burst: c.one_time_burst,
            refill: Duration::from_millis(c.refill_time),
            budget: c.size,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let tokens = (elapsed * u128::from(self.size) / self.refill.as_nanos().max(1)) as u64;
        if tokens > 0 {
            self.budget = self.budget.saturating_add(tokens).min(self.size);
            // Only the time the added tokens stand for is used up: fractions carry over.
            let used =
                Duration::from_nanos((u128::from(tokens) * self.refill.as_nanos() / u128::from(self.size)) as u64);
            self.last += used;
            if self.budget == self.size {
                self.last = now;
            }
        }
    }

    /// Whether `n` tokens are there. A request larger than the bucket goes through once the
    /// bucket is full (it could never pass otherwise), and empties it.
    fn can_pay(&self, n: u64) -> bool {
        n <= self.burst + self.budget || (n > self.size && self.budget == self.size)
    }

    fn pay(&mut self, n: u64) {
        let from_burst = self.burst.min(n);
        self.burst -= from_burst;
        self.budget = self.budget.saturating_sub(n - from_burst);
    }

    /// How long until `n` tokens are there.
    fn wait_for(&self, n: u64) -> Duration {
        let missing = n.min(self.size).saturating_sub(self.burst + self.budget);
        let nanos = u128::from(missing) * self.refill.as_nanos() / u128::from(self.size.max(1));
        Duration::from_nanos(nanos as u64 + 1).max(Duration::from_micros(100))
    }
}

/// A byte budget for output that cannot wait (a UART write completes at once): what the
/// bucket cannot pay for now is refused, and the caller drops it.
pub struct DroppingBucket(TokenBucket);

impl DroppingBucket {
    pub fn new(config: BucketConfig) -> DroppingBucket {
        DroppingBucket(TokenBucket::new(config, Instant::now()))
    }

    /// Takes up to `n` tokens; returns how many there were.
    pub fn take(&mut self, n: u64) -> u64 {
        self.0.refill(Instant::now());
        let granted = n.min(self.0.burst + self.0.budget);
        self.0.pay(granted);
        granted
    }
}

/// A device queue's limiter: both buckets and the timer that ends a wait.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> std::io::Result<RateLimiter> {
        let now = Instant::now();
        Ok(RateLimiter {
            bandwidth: limit.bandwidth.map(|c| TokenBucket::new(c, now)),
            ops: limit.ops.map(|c| TokenBucket::new(c, now)),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// Pays for one request of `bytes`; false (and a timer armed) if it has to wait.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.refill(now);
                if !b.can_pay(n) {
                    wait = wait.max(b.wait_for(n));
                }
            }
        }
        if !wait.is_zero() {
            self.blocked = true;
            if let Err(e) = self.timer.reset(wait, None) {
                tracing::warn!("a rate limiter's timer cannot be set ({e}); the request goes through");
                self.blocked = false;
                return true;
            }
            return false;
        }
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.pay(n);
            }
        }
        true
    }

    /// A limiter for `limit`, or none without one.
    pub fn for_limit(limit: Option<RateLimit>) -> std::io::Result<Option<RateLimiter>> {
        limit.map(RateLimiter::new).transpose()
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired: requests may be tried again.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// The timer's fd, to wait on while blocked.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// The timer to wait on while `limiter` holds requests back (none without a limiter).
pub fn waiting_timer(limiter: &Option<RateLimiter>) -> Option<RawFd> {
    limiter.as_ref().filter(|l| l.is_blocked()).map(RateLimiter::timer_fd)
}

/// A limiter's timer fired: it lets requests through again.
pub fn timer_fired(limiter: &mut Option<RateLimiter>) {
    if let Some(l) = limiter.as_mut() {
        l.on_timer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropping_bucket_grants_what_it_has_and_refills_with_time() {
        let mut bucket = DroppingBucket::new(BucketConfig { size: 1000, one_time_burst: 500, refill_time: 100 });
        assert_eq!(bucket.take(1200), 1200);
        assert_eq!(bucket.take(1000), 300);
        assert_eq!(bucket.take(10), 0);
        std::thread::sleep(Duration::from_millis(50));
        let refilled = bucket.take(1000);
        assert!((400..=1000).contains(&refilled), "{refilled}");
    }

    fn bucket(size: u64, burst: u64, ms: u64) -> TokenBucket {
        TokenBucket::new(BucketConfig { size, one_time_burst: burst, refill_time: ms }, Instant::now())
    }

    #[test]
    fn a_bucket_pays_from_the_burst_then_the_budget_and_refills_over_time() {
        let mut b = bucket(100, 50, 1000);
        assert!(b.can_pay(150));
        b.pay(150);
        assert!(!b.can_pay(1), "empty");
        let wait = b.wait_for(10);
        assert!(wait >= Duration::from_millis(99) && wait <= Duration::from_millis(101), "{wait:?}");
        b.refill(b.last + Duration::from_millis(500));
        assert_eq!(b.budget, 50, "half the refill time, half the bucket");
        b.refill(b.last + Duration::from_secs(10));
        assert_eq!(b.budget, 100, "never more than the bucket");
        assert!(b.can_pay(1_000_000), "a request larger than a full bucket goes through");
    }

    #[test]
    fn a_limited_queue_waits_for_its_timer() {
        let limit =
            RateLimit { ops: Some(BucketConfig { size: 2, one_time_burst: 0, refill_time: 100 }), bandwidth: None };
        let mut r = RateLimiter::new(limit).unwrap();
        assert!(r.consume(4096) && r.consume(4096));
        assert!(!r.consume(4096), "the third waits");
        assert!(r.is_blocked());
        assert!(!r.consume(1), "still waiting, whatever the size");
        std::thread::sleep(Duration::from_millis(60));
        r.on_timer();
        assert!(r.consume(4096), "a token came back");
    }

    #[test]
    fn configurations_are_checked() {
        let zero =
            RateLimit { bandwidth: Some(BucketConfig { size: 0, one_time_burst: 0, refill_time: 1 }), ops: None };
        assert!(zero.check().unwrap_err().contains("bandwidth"));
        assert!(RateLimit::default().check().is_ok());
    }
}
