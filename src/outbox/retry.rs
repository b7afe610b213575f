//! Retry policy as data: what a handler's outcome means ([`RetryAction`]) and
//! when the next attempt runs ([`RetrySchedule`]). Connectors classify their
//! responses into a `RetryAction`; this module owns the backoff mechanics only.

use std::time::Duration;

use rand::Rng;

use crate::config::RetrySettings;

/// What a handler's outcome means for its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAction {
    /// Done; the job is finished.
    Success,
    /// A transient failure; retry on the schedule.
    Retry { error: String, cause: RetryCause },
    /// The other side said when to come back (`Retry-After`, `retry_after`).
    RetryAfter { after: Duration, error: String },
    /// Retrying cannot help; dead-letter with this reason.
    Permanent { reason: String },
    /// Not a failure: something the job needs is not there yet (e.g. the maps
    /// are not resolved against the CRM). The job waits with this reason and
    /// is tried again after `after` (or at once when released, see
    /// `outbox::release_waiting`); it is never dead-lettered for waiting.
    Wait { after: Duration, reason: String },
}

impl RetryAction {
    pub fn retry(error: impl Into<String>) -> Self {
        RetryAction::Retry {
            error: error.into(),
            cause: RetryCause::Failure,
        }
    }
    pub fn throttled(error: impl Into<String>) -> Self {
        RetryAction::Retry {
            error: error.into(),
            cause: RetryCause::Throttled,
        }
    }
    pub fn timeout(error: impl Into<String>) -> Self {
        RetryAction::Retry {
            error: error.into(),
            cause: RetryCause::Timeout,
        }
    }
    pub fn permanent(reason: impl Into<String>) -> Self {
        RetryAction::Permanent {
            reason: reason.into(),
        }
    }
    /// The error text to store, if any.
    pub fn error(&self) -> Option<&str> {
        match self {
            RetryAction::Success => None,
            RetryAction::Retry { error, .. } | RetryAction::RetryAfter { error, .. } => Some(error),
            RetryAction::Permanent { reason } | RetryAction::Wait { reason, .. } => Some(reason),
        }
    }
}

/// Why a retryable failure happened; throttling and timeouts get a floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    Failure,
    Throttled,
    Timeout,
}

/// What happens to a job after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    RetryIn(Duration),
    DeadLetter,
}

/// The configured retry schedule.
#[derive(Debug, Clone)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
    jitter: f64,
    throttle_floor: Duration,
    max_retry_after: Duration,
}

impl RetrySchedule {
    pub fn new(settings: &RetrySettings) -> Self {
        RetrySchedule {
            delays: settings.schedule.clone(),
            jitter: settings.jitter.clamp(0.0, 1.0),
            throttle_floor: settings.throttle_floor,
            max_retry_after: settings.max_retry_after,
        }
    }

    /// Failed attempts a job may have before it is dead-lettered.
    pub fn max_failures(&self) -> u32 {
        u32::try_from(self.delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The step after failure number `failures` (1-based, this failure included).
    pub fn next_step(&self, failures: u32, action: &RetryAction, rng: &mut impl Rng) -> NextStep {
        if matches!(action, RetryAction::Permanent { .. } | RetryAction::Success) {
            return NextStep::DeadLetter;
        }
        let Some(base) = failures
            .checked_sub(1)
            .and_then(|i| self.delays.get(i as usize))
        else {
            return NextStep::DeadLetter;
        };
        let delay = match action {
            RetryAction::Retry {
                cause: RetryCause::Failure,
                ..
            } => self.spread(*base, rng),
            RetryAction::Retry { .. } => self.spread(*base, rng).max(self.throttle_floor),
            RetryAction::RetryAfter { after, .. } => {
                // Honour the server, but never sooner than the floor nor later than the clamp;
                // jitter only adds, so we never come back before the server asked.
                let honoured = (*after).clamp(self.throttle_floor, self.max_retry_after);
                let extra = honoured.mul_f64(rng.random_range(0.0..=self.jitter.max(0.0)));
                (honoured + extra).min(self.max_retry_after)
            }
            RetryAction::Wait { after, .. } => *after,
            RetryAction::Permanent { .. } | RetryAction::Success => return NextStep::DeadLetter,
        };
        NextStep::RetryIn(delay)
    }

    fn spread(&self, base: Duration, rng: &mut impl Rng) -> Duration {
        if self.jitter == 0.0 {
            return base;
        }
        let factor = 1.0 + rng.random_range(-self.jitter..=self.jitter);
        base.mul_f64(factor.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn schedule(jitter: f64) -> RetrySchedule {
        RetrySchedule::new(&RetrySettings {
            schedule: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
            ],
            jitter,
            throttle_floor: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(120),
        })
    }

    #[test]
    fn follows_the_schedule_then_dead_letters() {
        let s = schedule(0.0);
        let mut rng = StdRng::seed_from_u64(1);
        let err = RetryAction::retry("boom");
        assert_eq!(
            s.next_step(1, &err, &mut rng),
            NextStep::RetryIn(Duration::from_secs(1))
        );
        assert_eq!(
            s.next_step(2, &err, &mut rng),
            NextStep::RetryIn(Duration::from_secs(10))
        );
        assert_eq!(
            s.next_step(3, &err, &mut rng),
            NextStep::RetryIn(Duration::from_secs(60))
        );
        assert_eq!(s.next_step(4, &err, &mut rng), NextStep::DeadLetter);
        assert_eq!(s.max_failures(), 4);
    }

    #[test]
    fn permanent_dead_letters_at_once() {
        let s = schedule(0.2);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            s.next_step(1, &RetryAction::permanent("bad request"), &mut rng),
            NextStep::DeadLetter
        );
    }

    #[test]
    fn throttling_and_timeouts_get_the_floor() {
        let s = schedule(0.0);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            s.next_step(1, &RetryAction::throttled("429"), &mut rng),
            NextStep::RetryIn(Duration::from_secs(5))
        );
        assert_eq!(
            s.next_step(1, &RetryAction::timeout("30 s"), &mut rng),
            NextStep::RetryIn(Duration::from_secs(5))
        );
        // Beyond the floor the schedule's own delay holds.
        assert_eq!(
            s.next_step(2, &RetryAction::throttled("429"), &mut rng),
            NextStep::RetryIn(Duration::from_secs(10))
        );
    }

    #[test]
    fn retry_after_is_honoured_but_clamped() {
        let s = schedule(0.0);
        let mut rng = StdRng::seed_from_u64(1);
        let after = |secs| RetryAction::RetryAfter {
            after: Duration::from_secs(secs),
            error: "429".into(),
        };
        assert_eq!(
            s.next_step(1, &after(30), &mut rng),
            NextStep::RetryIn(Duration::from_secs(30))
        );
        assert_eq!(
            s.next_step(1, &after(1), &mut rng),
            NextStep::RetryIn(Duration::from_secs(5))
        );
        assert_eq!(
            s.next_step(1, &after(3600), &mut rng),
            NextStep::RetryIn(Duration::from_secs(120))
        );
        assert_eq!(s.next_step(4, &after(30), &mut rng), NextStep::DeadLetter);
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let s = schedule(0.2);
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let NextStep::RetryIn(d) = s.next_step(2, &RetryAction::retry("x"), &mut rng) else {
                panic!("expected a retry");
            };
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
            seen.insert(d.as_millis());
        }
        assert!(
            seen.len() > 100,
            "jitter should spread retries, saw {} values",
            seen.len()
        );
        for _ in 0..1000 {
            let after = RetryAction::RetryAfter {
                after: Duration::from_secs(30),
                error: "429".into(),
            };
            let NextStep::RetryIn(d) = s.next_step(1, &after, &mut rng) else {
                panic!("expected a retry");
            };
            assert!(
                d >= Duration::from_secs(30) && d <= Duration::from_secs(36),
                "{d:?}"
            );
        }
    }
}
