//! Capped exponential backoff with full jitter, for reconnecting to the PBX.
//!
//! The ceiling starts at `initial` and doubles after every delay handed out,
//! up to `max`; each delay is drawn uniformly from `[0, ceiling]` ("full
//! jitter"), so that many callbridge instances cut off by the same PBX restart
//! do not all come back at the same instant. `reset` goes back to `initial`
//! after a connection that stayed up.
//!
//! This module must never sleep or read a clock: it only computes delays, so
//! it is tested without time passing.

use rand::Rng;
use std::time::Duration;

/// Why a backoff cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    #[error("the initial reconnect delay must be greater than zero")]
    ZeroInitial,
    #[error("the reconnect delay cap ({max:?}) is below the initial delay ({initial:?})")]
    MaxBelowInitial { initial: Duration, max: Duration },
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// A backoff whose first delay is at most `initial` and no delay ever
    /// exceeds `max`.
    pub fn try_new(initial: Duration, max: Duration) -> Result<Backoff, InvalidBackoff> {
        if initial.is_zero() {
            return Err(InvalidBackoff::ZeroInitial);
        }
        if max < initial {
            return Err(InvalidBackoff::MaxBelowInitial { initial, max });
        }
        Ok(Backoff { initial, max, ceiling: initial })
    }

    /// Upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }

    /// The cap no delay exceeds.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The next delay, drawn from `[0, ceiling]`; the ceiling then doubles
    /// (up to the cap).
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let bound = u64::try_from(self.ceiling.as_nanos()).unwrap_or(u64::MAX);
        let delay = Duration::from_nanos(rng.random_range(0..=bound));
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        delay
    }

    /// Back to the initial ceiling (after a connection that stayed up).
    pub fn reset(&mut self) {
        self.ceiling = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn rejects_invalid_bounds() {
        assert_eq!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).err(), Some(InvalidBackoff::ZeroInitial));
        assert!(matches!(
            Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)),
            Err(InvalidBackoff::MaxBelowInitial { .. })
        ));
        assert!(Backoff::try_new(Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn doubles_to_the_cap_then_resets() {
        let mut b = Backoff::try_new(Duration::from_millis(500), Duration::from_secs(30)).expect("valid");
        let mut rng = StdRng::seed_from_u64(1);
        let ceilings: Vec<u64> = (0..9)
            .map(|_| {
                let c = b.ceiling().as_millis() as u64;
                b.next_delay(&mut rng);
                c
            })
            .collect();
        assert_eq!(ceilings, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

    proptest! {
        #[test]
        fn grows_and_never_exceeds_the_cap(
            initial_ms in 1u64..5_000,
            extra_ms in 0u64..120_000,
            seed in any::<u64>(),
            steps in 1usize..200,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = initial + Duration::from_millis(extra_ms);
            let mut b = Backoff::try_new(initial, max).expect("valid bounds");
            let mut rng = StdRng::seed_from_u64(seed);
            let mut previous = Duration::ZERO;
            for step in 0..steps {
                let ceiling = b.ceiling();
                // The ceiling never shrinks, follows initial·2^step and stops at the cap.
                prop_assert!(ceiling >= previous);
                prop_assert!(ceiling <= max);
                let doubled = initial.saturating_mul(1u32.checked_shl(step.min(31) as u32).unwrap_or(u32::MAX));
                prop_assert_eq!(ceiling, doubled.min(max));
                let delay = b.next_delay(&mut rng);
                prop_assert!(delay <= ceiling);
                prop_assert!(delay <= max);
                previous = ceiling;
            }
        }

        #[test]
        fn jitter_spreads_delays(seed in any::<u64>()) {
            // Full jitter: over many draws at the cap, delays cover both
            // halves of [0, cap] (so instances do not reconnect in lockstep).
            let mut b = Backoff::try_new(Duration::from_secs(1), Duration::from_secs(1)).expect("valid");
            let mut rng = StdRng::seed_from_u64(seed);
            let delays: Vec<Duration> = (0..64).map(|_| b.next_delay(&mut rng)).collect();
            prop_assert!(delays.iter().any(|d| *d < Duration::from_millis(500)));
            prop_assert!(delays.iter().any(|d| *d >= Duration::from_millis(500)));
        }
    }
}
