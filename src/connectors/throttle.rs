//! A marketplace account's pause after 429s, shared by everything that calls
//! the account from this process (its poller and its actions alike): the
//! facts of both Kaspi and Avito say to back off exponentially on 429, and a
//! per-job retry alone let queued actions keep knocking during a 429 storm
//! (Kaspi 2.9, Avito 1.9 requests a second in `prove api-faults`).
//!
//! A 429 pauses every request of the account: 1 s (or the API's
//! `Retry-After`, if longer) doubled per 429 in a row, ±10 % jitter, at most
//! [`PAUSE_MAX`]. While a series lasts, one request at a time goes (a probe);
//! the first answer that is not a 429 ends the series and lets everyone go.
//! 429s answering requests sent before the pause began belong to the same
//! wave and do not lengthen it. Only one replica serves a shop's target at a
//! time, so the pause is in-process.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

/// The longest pause one 429 causes.
pub const PAUSE_MAX: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    /// When the pause began and when it ends.
    paused: Option<(Instant, Instant)>,
    in_a_row: u32,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Held by the one request that may go while a series lasts.
    probe: Arc<tokio::sync::Mutex<()>>,
}

/// An answer's `Retry-After` in seconds (neither Kaspi nor Avito documents
/// it; honoured where present).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The pause of one account; clones share it.
#[derive(Clone, Default)]
pub struct Throttle(Arc<Inner>);

/// Leave to send one request; say what it got with [`Admitted::rate_limited`]
/// or [`Admitted::answered`] (dropped unsaid: nothing changes).
pub struct Admitted {
    throttle: Throttle,
    sent_at: Instant,
    _probe: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Throttle {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits out the account's pause, if one is on (and, while a series of
    /// 429s lasts, for the one request then allowed at a time).
    pub async fn admit(&self) -> Admitted {
        let probe = if self.state().in_a_row > 0 {
            Some(self.0.probe.clone().lock_owned().await)
        } else {
            None
        };
        let ends = self.state().paused.map(|(_, ends)| ends);
        if let Some(ends) = ends.filter(|e| *e > Instant::now()) {
            tokio::time::sleep_until(ends.into()).await;
        }
        Admitted {
            throttle: self.clone(),
            sent_at: Instant::now(),
            _probe: probe,
        }
    }
}

impl Admitted {
    /// Whether no pause began since this leave was given: a caller that
    /// waited for something else after [`Throttle::admit`] (a rate limiter)
    /// asks again before sending, or it would send during the pause.
    pub fn still_clear(&self) -> bool {
        match self.throttle.state().paused {
            Some((began, ends)) => began <= self.sent_at || ends <= Instant::now(),
            None => true,
        }
    }

    /// The request got a 429: pauses the account and returns for how long.
    pub fn rate_limited(self, retry_after: Option<Duration>) -> Duration {
        let mut state = self.throttle.state();
        let now = Instant::now();
        if let Some((began, ends)) = state.paused {
            if self.sent_at < began {
                // Sent before this pause began: the same wave.
                return ends.saturating_duration_since(now);
            }
        }
        state.in_a_row = state.in_a_row.saturating_add(1);
        let doubled = Duration::from_secs(1)
            .saturating_mul(1u32 << (state.in_a_row - 1).min(6))
            .mul_f64(rand::rng().random_range(0.9..1.1));
        let pause = doubled.max(retry_after.unwrap_or_default()).min(PAUSE_MAX);
        state.paused = Some((now, now + pause));
        pause
    }

    /// The request got something else than a 429: the series ends.
    pub fn answered(self) {
        let mut state = self.throttle.state();
        state.in_a_row = 0;
        state.paused = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pauses_double_per_429_in_a_row_up_to_the_cap_and_an_answer_resets_them() {
        tokio::time::pause();
        let throttle = Throttle::default();
        let mut pauses = Vec::new();
        for _ in 0..9 {
            pauses.push(throttle.admit().await.rate_limited(None));
        }
        for (n, pause) in pauses.iter().enumerate().take(6) {
            let base = Duration::from_secs(1 << n);
            assert!(
                *pause >= base.mul_f64(0.9) && *pause <= base.mul_f64(1.1),
                "429 #{}: {pause:?}",
                n + 1
            );
        }
        assert!(pauses[8] <= PAUSE_MAX, "{:?}", pauses[8]);
        throttle.admit().await.answered();
        assert!(throttle.admit().await.rate_limited(None) <= Duration::from_millis(1100));
        assert!(
            throttle
                .admit()
                .await
                .rate_limited(Some(Duration::from_secs(30)))
                >= Duration::from_secs(30),
            "the API's Retry-After is honoured"
        );
    }

    #[tokio::test]
    async fn a_wave_of_429s_to_requests_sent_together_pauses_once() {
        tokio::time::pause();
        let throttle = Throttle::default();
        let wave: Vec<Admitted> = vec![
            throttle.admit().await,
            throttle.admit().await,
            throttle.admit().await,
        ];
        tokio::time::advance(Duration::from_millis(10)).await;
        let pauses: Vec<Duration> = wave.into_iter().map(|a| a.rate_limited(None)).collect();
        assert!(
            pauses.iter().all(|p| *p <= Duration::from_millis(1100)),
            "{pauses:?}"
        );
    }
}
