//! Backoff: exponential, capped, with jitter so that many failing deliveries do not retry
//! in lockstep against a server that is coming back.

use crate::types::RetryPolicy;

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
