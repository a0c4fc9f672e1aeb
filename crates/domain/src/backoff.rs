//! One backoff for every retry loop and every stored delay in gpualloc:
//! doubling from a base up to a cap, and optionally "equal jitter" (half
//! fixed, half random) so that many callers coming back do not arrive at
//! the same instant.

use std::time::Duration;

/// Doubling from `base`, never above `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// `base · 2^attempt`, at most `max` (attempt 0 waits `base`).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// [`Backoff::delay`] with equal jitter: half of it fixed, the other
    /// half scaled by `unit`, a random number in `[0, 1]` the caller draws
    /// (which keeps this pure).
    pub fn jittered(&self, attempt: u32, unit: f64) -> Duration {
        let full = self.delay(attempt);
        let half = full / 2;
        half + (full - half).mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let b = Backoff::new(100 * MS, 2_000 * MS);
        let delays: Vec<u128> = (0..8).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(
            b.delay(u32::MAX),
            2_000 * MS,
            "no overflow on a huge attempt"
        );
        let micros = Backoff::new(Duration::from_secs(30), Duration::from_secs(600));
        assert_eq!(micros.delay(20), Duration::from_secs(600));
    }

    #[test]
    fn jitter_keeps_the_upper_half() {
        let b = Backoff::new(100 * MS, 2_000 * MS);
        assert_eq!(b.jittered(3, 0.0), 400 * MS);
        assert_eq!(b.jittered(3, 1.0), 800 * MS);
        assert_eq!(b.jittered(3, 0.5), 600 * MS);
        assert_eq!(b.jittered(9, 7.0), 2_000 * MS, "a unit past 1 is clamped");
    }
}
