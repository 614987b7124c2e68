//! Capped exponential backoff with jitter: the one implementation behind
//! every retry in callbridge (AMI reconnects, SIP subscription retries, sink
//! deliveries).
//!
//! The ceiling of attempt `n` (0 = the first retry) is
//! `min(max, initial · 2ⁿ)`; the delay is drawn under it with a [`Jitter`]
//! that suits the caller:
//!
//! - [`Jitter::Full`], uniform in `[0, ceiling]`: many callbridge instances
//!   cut off by the same PBX restart do not all reconnect at once.
//! - [`Jitter::Equal`], uniform in `[ceiling/2, ceiling]`: subscriptions
//!   failing together spread out but still wait about as asked.
//! - [`Jitter::Wide`], uniform in `[initial/2, ceiling]`: retries of many
//!   calls spread over the whole range instead of bunching at the cap.
//!
//! This module must never sleep or read a clock: it only computes delays,
//! so it is tested without time passing.

use rand::Rng;
use std::time::Duration;

/// Why a backoff cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    #[error("the initial retry delay must be greater than zero")]
    ZeroInitial,
    #[error("the retry delay cap ({max:?}) is below the initial delay ({initial:?})")]
    MaxBelowInitial { initial: Duration, max: Duration },
}

/// Where under the ceiling a delay is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// `[0, ceiling]`.
    Full,
    /// `[ceiling/2, ceiling]`.
    Equal,
    /// `[initial/2, ceiling]`.
    Wide,
}

/// The policy: first ceiling, cap, jitter. Stateless; [`Retries`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A backoff whose first ceiling is `initial` and whose delays never
    /// exceed `max`.
    pub fn try_new(initial: Duration, max: Duration, jitter: Jitter) -> Result<Backoff, InvalidBackoff> {
        if initial.is_zero() {
            return Err(InvalidBackoff::ZeroInitial);
        }
        if max < initial {
            return Err(InvalidBackoff::MaxBelowInitial { initial, max });
        }
        Ok(Backoff { initial, max, jitter })
    }

    /// As [`Backoff::try_new`], bringing bad bounds into range instead of
    /// refusing them: a zero `initial` becomes 1 ms, a `max` below
    /// `initial` lowers `initial` to it (for limits fixed in code, or
    /// already validated elsewhere).
    pub const fn clamped(initial: Duration, max: Duration, jitter: Jitter) -> Backoff {
        let max = if max.is_zero() { Duration::from_millis(1) } else { max };
        let initial = if initial.is_zero() { Duration::from_millis(1) } else { initial };
        let initial = if initial.as_nanos() > max.as_nanos() { max } else { initial };
        Backoff { initial, max, jitter }
    }

    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The cap no delay exceeds.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Upper bound of retry number `attempt` (0 = the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.initial.saturating_mul(1u32 << attempt.min(30)).min(self.max)
    }

    /// The delay of retry number `attempt` for a draw `unit` in `[0, 1]`
    /// (0 gives the shortest delay the jitter allows, 1 the ceiling).
    pub fn delay_at(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let floor = match self.jitter {
            Jitter::Full => Duration::ZERO,
            Jitter::Equal => ceiling / 2,
            Jitter::Wide => (self.initial / 2).min(ceiling),
        };
        floor + (ceiling - floor).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The delay of retry number `attempt`, drawn from `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        self.delay_at(attempt, rng.random::<f64>())
    }
}

/// A backoff with its count of consecutive retries (a reconnect loop).
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    attempt: u32,
}

impl Retries {
    pub fn new(policy: Backoff) -> Retries {
        Retries { policy, attempt: 0 }
    }

    /// Upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.policy.ceiling(self.attempt)
    }

    /// The cap no delay exceeds.
    pub fn max(&self) -> Duration {
        self.policy.max()
    }

    /// The next delay; the ceiling then doubles (up to the cap).
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let delay = self.policy.delay(self.attempt, rng);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the initial ceiling (after a connection that stayed up).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn full(initial: Duration, max: Duration) -> Retries {
        Retries::new(Backoff::try_new(initial, max, Jitter::Full).expect("valid"))
    }

    #[test]
    fn rejects_invalid_bounds() {
        let one = Duration::from_secs(1);
        assert_eq!(Backoff::try_new(Duration::ZERO, one, Jitter::Full).err(), Some(InvalidBackoff::ZeroInitial));
        assert!(matches!(
            Backoff::try_new(Duration::from_secs(2), one, Jitter::Full),
            Err(InvalidBackoff::MaxBelowInitial { .. })
        ));
        assert!(Backoff::try_new(one, one, Jitter::Full).is_ok());
        let c = Backoff::clamped(Duration::from_secs(2), Duration::from_millis(100), Jitter::Equal);
        assert_eq!((c.initial(), c.max()), (Duration::from_millis(100), Duration::from_millis(100)));
        assert_eq!(Backoff::clamped(Duration::ZERO, Duration::ZERO, Jitter::Full).initial(), Duration::from_millis(1));
    }

    #[test]
    fn doubles_to_the_cap_then_resets() {
        let mut b = full(Duration::from_millis(500), Duration::from_secs(30));
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

    #[test]
    fn each_jitter_stays_in_its_range() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in [0, 1, 3, 10, 40, u32::MAX] {
            for unit in [0.0, 0.25, 1.0, -3.0, 7.0] {
                let at = |j| Backoff::try_new(initial, max, j).expect("valid").delay_at(attempt, unit);
                let ceiling = Backoff::try_new(initial, max, Jitter::Full).expect("valid").ceiling(attempt);
                assert!(at(Jitter::Full) <= ceiling);
                assert!(at(Jitter::Equal) >= ceiling / 2 && at(Jitter::Equal) <= ceiling);
                assert!(at(Jitter::Wide) >= initial / 2 && at(Jitter::Wide) <= ceiling);
            }
        }
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
            let mut b = full(initial, max);
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
            let mut b = full(Duration::from_secs(1), Duration::from_secs(1));
            let mut rng = StdRng::seed_from_u64(seed);
            let delays: Vec<Duration> = (0..64).map(|_| b.next_delay(&mut rng)).collect();
            prop_assert!(delays.iter().any(|d| *d < Duration::from_millis(500)));
            prop_assert!(delays.iter().any(|d| *d >= Duration::from_millis(500)));
        }
    }
}
