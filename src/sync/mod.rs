//! Orchestration between the connectors, the store and the outbox: ingest
//! (one transaction per order change: snapshot, stage history, outbox intent),
//! the marketplace pollers (each under its shop's lease), the Marketplace →
//! CRM handler (`to_crm`), and CRM → marketplace (`to_marketplace`: the amoCRM
//! inbox, the events poll, the marketplace action handler), and partner
//! programmes' leads and status reports (`partner`). Also the loops
//! every long-running part runs in: [`every`], [`every_while_leased`] (which
//! slows a poller down while its API answers 429, [`Round`]), and
//! [`supervise`], which restarts a failed part.

pub mod avito_leads;
pub mod avito_poll;
pub mod contact_index;
pub mod crm_writer;
pub mod ingest;
pub mod kaspi_poll;
pub mod messenger_leads;
pub mod partner;
pub mod reconcile;
pub mod to_crm;
pub mod to_marketplace;

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::outbox::{RetryAction, RetryCause};

/// The longest a throttled poller waits between rounds (unless the API asked
/// for longer).
pub const POLL_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// How a polling round went, for [`every_while_leased`]'s pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Done, or failed in a way the next round at the usual pace may mend
    /// (a 5xx, a timeout: the interval is the backoff).
    Done,
    /// The API answered 429, or its network path is blocked (`Some`: it said
    /// when to come back): the next rounds slow down, doubling per throttled
    /// round in a row up to [`POLL_BACKOFF_CAP`], so a storm of 429s is not
    /// met with a request every interval (both marketplaces' facts: back off
    /// exponentially on 429).
    Throttled(Option<Duration>),
}

impl Round {
    /// The pace a failed round's classification asks for.
    pub fn after(action: &RetryAction) -> Round {
        match action {
            RetryAction::Retry {
                cause: RetryCause::Throttled,
                ..
            } => Round::Throttled(None),
            RetryAction::RetryAfter { after, .. } => Round::Throttled(Some(*after)),
            _ => Round::Done,
        }
    }
}

/// The wait before the next round after `throttled` throttled rounds in a
/// row: `interval` when none, else `interval` doubled per round (±10 %
/// jitter, so replicas and shops spread out) up to [`POLL_BACKOFF_CAP`] (or
/// `interval`, if longer), and never shorter than what the API asked for.
pub fn poll_pace(interval: Duration, throttled: u32, asked: Option<Duration>) -> Duration {
    if throttled == 0 {
        return interval;
    }
    let doubled = interval.saturating_mul(2u32.saturating_pow(throttled.min(16)));
    let paced = doubled
        .min(POLL_BACKOFF_CAP.max(interval))
        .mul_f64(rand::rng().random_range(0.9..1.1));
    paced.max(asked.unwrap_or_default())
}

/// Runs `round` every `interval` (the first at once) until `shutdown`; a late
/// round delays the next instead of bunching them.
pub async fn every<F, Fut>(interval: Duration, shutdown: CancellationToken, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        round().await;
    }
}

/// A shop's polling belongs to the replica that holds the shop's outbox target
/// lease (the lease its marketplace actions run under; the engine shares and
/// renews those), so one replica polls a shop at a time and a dead replica's
/// shops move to another when their leases expire.
#[derive(Clone)]
pub struct ShopLease {
    pub pool: sqlx::PgPool,
    /// The outbox target, e.g. `kaspi:kaspi_main`.
    pub target: String,
    /// This replica's name in leases.
    pub owner: String,
}

impl ShopLease {
    /// Whether this replica holds the lease now (a database error: not held).
    pub async fn held(&self) -> bool {
        match crate::store::outbox::target_owner(&self.pool, &self.target, chrono::Utc::now()).await
        {
            Ok(owner) => owner.as_deref() == Some(self.owner.as_str()),
            Err(error) => {
                tracing::warn!(target_key = %self.target, %error, "Could not read the shop's lease; not polling this round.");
                false
            }
        }
    }
}

/// Like [`every`], but only while `lease` is held: checked every second, so
/// a replica that gains the lease polls at once, and one that loses it stops.
/// A throttled round ([`Round::Throttled`]) stretches the wait before the
/// next ([`poll_pace`]); the first round that is not resets it.
pub async fn every_while_leased<F, Fut>(
    lease: ShopLease,
    interval: Duration,
    shutdown: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Round>,
{
    let mut last: Option<tokio::time::Instant> = None;
    let mut wait = interval;
    let mut throttled = 0u32;
    let mut was_held = false;
    loop {
        let held = lease.held().await;
        if held != was_held {
            if held {
                tracing::info!(target_key = %lease.target, "This replica polls the shop now.");
            } else {
                tracing::info!(target_key = %lease.target, "Another replica polls the shop now.");
            }
            was_held = held;
        }
        if held && last.is_none_or(|at| at.elapsed() >= wait) {
            last = Some(tokio::time::Instant::now());
            match round().await {
                Round::Done => {
                    if throttled > 0 {
                        tracing::info!(target_key = %lease.target, "The API stopped throttling; polling at the usual pace again.");
                    }
                    throttled = 0;
                    wait = interval;
                }
                Round::Throttled(asked) => {
                    throttled = throttled.saturating_add(1);
                    wait = poll_pace(interval, throttled, asked);
                    tracing::warn!(target_key = %lease.target, throttled_rounds = throttled, next_round_in_s = wait.as_secs_f64(), "The API is throttling this poller (429); the next round waits longer.");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1).min(interval)) => {}
        }
    }
}

/// Keeps one long-running part of the daemon alive: `start` makes a fresh run
/// of it; if that run panics, or returns while the daemon is not shutting
/// down, the failure is logged and counted and the part restarted after a
/// backoff (1 s doubling to 1 min; reset after a run that lasted a minute).
/// The other parts are separate tasks and keep working meanwhile.
pub async fn supervise<F, Fut>(part: String, shutdown: CancellationToken, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(60);
    const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    let mut backoff = FIRST;
    loop {
        let started = tokio::time::Instant::now();
        let mut run = tokio::spawn(start());
        let outcome = tokio::select! {
            outcome = &mut run => outcome,
            _ = shutdown.cancelled() => {
                // Parts watch the token themselves; one that does not stop
                // within the grace period is aborted so shutdown never hangs.
                if tokio::time::timeout(SHUTDOWN_GRACE, &mut run).await.is_err() {
                    tracing::warn!(part = %part, "The part did not stop within the shutdown grace period; aborting it.");
                    run.abort();
                }
                return;
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        let why = match outcome {
            Ok(()) => "it stopped on its own".to_string(),
            Err(error) if error.is_panic() => {
                let panic = error.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                format!("it panicked: {message}")
            }
            Err(error) => format!("it was cancelled: {error}"),
        };
        if started.elapsed() >= LONGEST {
            backoff = FIRST;
        }
        metrics::counter!("orderbridge_part_restarts_total", "part" => part.clone()).increment(1);
        record_failure(&part, &why);
        tracing::error!(part = %part, error = %why, restart_in_ms = backoff.as_millis() as u64,
            "A part of the daemon failed; restarting it after a backoff. The rest keeps working.");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LONGEST);
    }
}

/// A part that failed this often within [`FAILING_WINDOW`] keeps failing:
/// `/readyz` reports it.
pub const FAILING_AFTER: usize = 3;
/// See [`FAILING_AFTER`].
pub const FAILING_WINDOW: Duration = Duration::from_secs(10 * 60);

type Failures = std::collections::BTreeMap<String, Vec<(std::time::Instant, String)>>;

/// Recent failures of each supervised part: (when, why).
static FAILURES: std::sync::Mutex<Failures> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn record_failure(part: &str, why: &str) {
    let mut failures = FAILURES.lock().unwrap_or_else(|p| p.into_inner());
    let list = failures.entry(part.to_string()).or_default();
    list.retain(|(at, _)| at.elapsed() < FAILING_WINDOW);
    list.push((std::time::Instant::now(), why.to_string()));
}

/// The parts that failed at least [`FAILING_AFTER`] times within
/// [`FAILING_WINDOW`]: (part, failures, last error).
pub fn failing_parts() -> Vec<(String, usize, String)> {
    let failures = FAILURES.lock().unwrap_or_else(|p| p.into_inner());
    failures
        .iter()
        .filter_map(|(part, list)| {
            let recent: Vec<&(std::time::Instant, String)> = list
                .iter()
                .filter(|(at, _)| at.elapsed() < FAILING_WINDOW)
                .collect();
            (recent.len() >= FAILING_AFTER).then(|| {
                (
                    part.clone(),
                    recent.len(),
                    recent
                        .last()
                        .map(|(_, why)| why.clone())
                        .unwrap_or_default(),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_throttled_poller_waits_twice_as_long_per_round_up_to_the_cap() {
        let second = Duration::from_secs(1);
        assert_eq!(poll_pace(second, 0, None), second);
        let near = |got: Duration, want: f64| {
            let got = got.as_secs_f64();
            assert!(
                (want * 0.9..=want * 1.1).contains(&got),
                "{got} s, wanted about {want} s"
            );
        };
        near(poll_pace(second, 1, None), 2.0);
        near(poll_pace(second, 3, None), 8.0);
        near(poll_pace(second, 40, None), 60.0);
        // An interval longer than the cap stays the floor.
        near(poll_pace(Duration::from_secs(120), 5, None), 120.0);
        // What the API asked for wins when longer.
        assert!(poll_pace(second, 1, Some(Duration::from_secs(90))) >= Duration::from_secs(90));
        assert_eq!(
            Round::after(&RetryAction::throttled("429")),
            Round::Throttled(None)
        );
        assert_eq!(
            Round::after(&RetryAction::RetryAfter {
                after: Duration::from_secs(7),
                error: "429".into()
            }),
            Round::Throttled(Some(Duration::from_secs(7)))
        );
        assert_eq!(Round::after(&RetryAction::retry("500")), Round::Done);
        assert_eq!(Round::after(&RetryAction::timeout("slow")), Round::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_part_is_restarted_with_backoff_while_others_keep_working() {
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let ticks = Arc::new(AtomicUsize::new(0));
        let failing = {
            let runs = runs.clone();
            tokio::spawn(supervise("failing".into(), shutdown.clone(), move || {
                let runs = runs.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) < 3 {
                        panic!("simulated failure");
                    }
                    // The fourth run works until shutdown.
                    std::future::pending::<()>().await
                }
            }))
        };
        let healthy = {
            let ticks = ticks.clone();
            let token = shutdown.clone();
            tokio::spawn(supervise("healthy".into(), shutdown.clone(), move || {
                let (ticks, token) = (ticks.clone(), token.clone());
                every(Duration::from_secs(1), token, move || {
                    let ticks = ticks.clone();
                    async move {
                        ticks.fetch_add(1, Ordering::SeqCst);
                    }
                })
            }))
        };
        // Backoffs of 1 s, 2 s and 4 s: the fourth run starts after 7 s.
        tokio::time::sleep(Duration::from_millis(6_500)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "restarted after 1 s and 3 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "restarted after 4 s more");
        assert!(
            ticks.load(Ordering::SeqCst) >= 7,
            "the healthy part kept ticking"
        );
        let reported = failing_parts();
        assert!(
            reported.iter().any(|(part, n, why)| part == "failing"
                && *n == 3
                && why.contains("simulated failure")),
            "a part that keeps failing is reported: {reported:?}"
        );
        assert!(!reported.iter().any(|(part, _, _)| part == "healthy"));
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            4,
            "a working part is left alone"
        );
        shutdown.cancel();
        failing.await.unwrap();
        healthy.await.unwrap();
    }
}
