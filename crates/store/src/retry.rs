//! Backoff: exponential, capped, with jitter so that many failing deliveries do not retry
//! in lockstep against a server that is coming back.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::{
    Attempt, AttemptOutcome, AttemptReport, Delivery, DeliveryState, Millis, RetryPolicy,
};

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`, after `attempt` failures (1-based), with
    /// `unit` in [0, 1) drawing the jitter.
    pub fn backoff_ms(&self, attempt: u32, unit: f64) -> u64 {
        let exponent = attempt.saturating_sub(1).min(63) as i32;
        let base = (self.initial_backoff_ms as f64) * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_backoff_ms as f64);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
        (capped * factor).round().max(0.0) as u64
    }

    /// Whether a delivery that has failed `attempts` times and was queued at `enqueued_at_ms`
    /// may be tried again at `next_ms`.
    pub fn allows(&self, attempts: u32, enqueued_at_ms: u64, next_ms: u64) -> bool {
        self.max_attempts.is_none_or(|max| attempts < max)
            && self
                .max_age_ms
                .is_none_or(|age| next_ms.saturating_sub(enqueued_at_ms) <= age)
    }
}

/// Where a delivery goes after an attempt, as every backend decides it: the attempt joins
/// the history; delivered and permanent failures are final; a transient failure waits its
/// backoff (or a longer Retry-After) while the policy allows, and is dead otherwise. The
/// caller stores the result and moves the key on.
pub(crate) fn settle(
    d: &mut Delivery,
    report: &AttemptReport,
    policy: &RetryPolicy,
    now: Millis,
    unit: f64,
) -> DeliveryState {
    d.attempts += 1;
    d.history.push(Attempt {
        at_ms: now,
        outcome: report.outcome,
        status: report.status,
        error_class: report.error_class.clone(),
        detail: report.detail.chars().take(512).collect(),
    });
    let next_state = match report.outcome {
        AttemptOutcome::Delivered => DeliveryState::Delivered,
        AttemptOutcome::Permanent => {
            d.dead_reason = Some(format!("permanent failure: {}", report.error_class));
            DeliveryState::Dead
        }
        AttemptOutcome::Transient => {
            let backoff = policy.backoff_ms(d.attempts, unit);
            let wait = backoff.max(report.retry_after_ms.unwrap_or(0));
            let next = now + wait;
            if policy.allows(d.attempts, d.enqueued_at_ms, next) {
                d.next_attempt_ms = next;
                DeliveryState::RetryWait
            } else {
                d.dead_reason = Some(format!(
                    "retries exhausted after {} attempts: {}",
                    d.attempts, report.error_class
                ));
                DeliveryState::Dead
            }
        }
    };
    d.state = next_state;
    d.lease_until_ms = 0;
    next_state
}

/// Numbers in [0, 1) for jitter (xorshift: no need for quality, only for spread).
#[derive(Debug)]
pub(crate) struct Jitter(AtomicU64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Jitter(AtomicU64::new(seed | 1))
    }

    pub(crate) fn unit(&self) -> f64 {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let p = RetryPolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: Some(3),
            max_age_ms: None,
            dead_holds_key: false,
        };
        assert_eq!(p.backoff_ms(1, 0.5), 100);
        assert_eq!(p.backoff_ms(2, 0.5), 200);
        assert_eq!(p.backoff_ms(10, 0.5), 1_000);
        assert_eq!(p.backoff_ms(1, 0.0), 50);
        assert_eq!(p.backoff_ms(1, 1.0), 150);
        assert!(p.allows(2, 0, 10));
        assert!(!p.allows(3, 0, 10));
        let aged = RetryPolicy {
            max_attempts: None,
            max_age_ms: Some(1_000),
            ..p
        };
        assert!(aged.allows(50, 0, 1_000));
        assert!(!aged.allows(50, 0, 1_001));
    }
}
