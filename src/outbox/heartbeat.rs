//! Liveness of one replica: its row in `outbox_replicas`, target leases (renew
//! its own, take free or expired ones up to its fair share of
//! ceil(targets / live replicas), hand the excess back once idle), renewal of
//! running jobs' leases, reaping of jobs whose worker died, queue depth gauges;
//! and the LISTEN/NOTIFY listener that wakes the dispatcher on enqueue.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::store::outbox::{self as store, NOTIFY_CHANNEL};
use crate::store::StoreError;

pub(super) async fn run_heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = shared.beat_now.notified() => {}
        }
        // A panic in one beat is caught: the heartbeat (and the leases it
        // renews) lives on.
        use futures::FutureExt;
        match std::panic::AssertUnwindSafe(beat(&shared, beats.is_multiple_of(6)))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "Outbox heartbeat failed; leases will be renewed on the next one.")
            }
            Err(_) => {
                metrics::counter!("orderbridge_part_restarts_total", "part" => "outbox_heartbeat")
                    .increment(1);
                tracing::error!(
                    part = "outbox_heartbeat",
                    "An outbox heartbeat panicked; the next one runs as usual."
                )
            }
        }
        beats += 1;
    }
}

async fn beat(shared: &Shared, with_gauges: bool) -> Result<(), StoreError> {
    let now = shared.clock.now();
    let ttl =
        chrono::Duration::from_std(shared.config.target_lease_ttl).unwrap_or(chrono::Duration::MAX);
    let (replicas, targets) =
        store::replica_heartbeat(&shared.pool, &shared.owner, now, now - ttl).await?;
    // Fair share: every live replica serves at most ceil(targets / replicas).
    let share = (targets + replicas.max(1) - 1) / replicas.max(1);
    let mut held = store::acquire_targets(
        &shared.pool,
        &shared.owner,
        now,
        shared.lease_until(shared.config.target_lease_ttl),
        share,
    )
    .await?;
    // Over the share (a replica joined): stop claiming the excess, and give each
    // back once its running jobs are finished, so its limiter never has two owners.
    let excess: Vec<String> = held.iter().skip(share.max(0) as usize).cloned().collect();
    let releasable: Vec<String> = {
        let mut state = shared.state();
        state.draining.retain(|t| excess.contains(t));
        for target in &excess {
            state.draining.insert(target.clone());
        }
        excess
            .iter()
            .filter(|t| state.per_target.get(*t).copied().unwrap_or(0) == 0)
            .cloned()
            .collect()
    };
    if !releasable.is_empty() {
        store::release_some_targets(&shared.pool, &shared.owner, &releasable).await?;
        tracing::info!(targets = ?releasable, share, replicas, "Handed targets over to other replicas.");
        held.retain(|t| !releasable.contains(t));
    }
    let gained = {
        let mut state = shared.state();
        for target in &releasable {
            state.draining.remove(target);
        }
        let gained = held.iter().any(|t| !state.held.contains(t));
        for target in state
            .held
            .iter()
            .filter(|t| !held.contains(t) && !releasable.contains(t))
        {
            tracing::warn!(target = %target, "Lost the lease of a target; another replica serves it now.");
        }
        state.held = held.clone();
        gained
    };
    metrics::gauge!("orderbridge_outbox_targets_held").set(held.len() as f64);
    let running: Vec<(i64, i32)> = shared
        .state()
        .in_flight
        .iter()
        .map(|(id, f)| (*id, f.attempt))
        .collect();
    store::renew_job_leases(
        &shared.pool,
        &shared.owner,
        &running,
        shared.lease_until(shared.config.job_lease),
    )
    .await?;
    let max_failures = i32::try_from(shared.config.schedule.max_failures()).unwrap_or(i32::MAX);
    let reaped = store::reap_expired(&shared.pool, &held, now, max_failures).await?;
    if reaped > 0 {
        tracing::warn!(
            jobs = reaped,
            "Reclaimed jobs whose worker stopped renewing their lease."
        );
        metrics::counter!("orderbridge_outbox_reaped_total").increment(reaped);
    }
    if gained || reaped > 0 {
        shared.wake.notify_one();
    }
    if with_gauges && !held.is_empty() {
        let dead = store::dead_letter_unhandled(
            &shared.pool,
            &held,
            &shared.kinds,
            shared.config.unhandled_grace,
        )
        .await?;
        if dead > 0 {
            tracing::error!(jobs = dead, grace_s = shared.config.unhandled_grace.as_secs(),
                "Dead-lettered jobs of a kind no handler in this build runs (see `orderbridge dlq list`).");
            metrics::counter!("orderbridge_outbox_dead_lettered_total", "kind" => "unhandled")
                .increment(dead);
        }
    }
    if with_gauges {
        for (state, count) in store::depth(&shared.pool).await? {
            metrics::gauge!("orderbridge_outbox_jobs", "state" => state).set(count as f64);
        }
    }
    Ok(())
}

/// [`run_listener`], started again (after a second) if it panics; counted in
/// `orderbridge_part_restarts_total{part="outbox_listener"}`. The poll tick
/// covers for it meanwhile.
pub(super) async fn run_listener_supervised(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let task = tokio::spawn(run_listener(shared.clone(), stop.clone()));
        match task.await {
            Ok(()) => return,
            Err(error) => {
                tracing::error!(part = "outbox_listener", %error, "The outbox's LISTEN task failed; restarting it in 1 s.");
                metrics::counter!("orderbridge_part_restarts_total", "part" => "outbox_listener")
                    .increment(1);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Listens for enqueue notifications; on a lost connection the polling
/// fallback covers the gap and the listener reconnects.
pub(super) async fn run_listener(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut listener = match connect(&shared).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "Cannot LISTEN for new outbox jobs; polling meanwhile.");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        // Anything enqueued while we were not listening is found by this wake.
        shared.wake.notify_one();
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = listener.try_recv() => next,
            };
            match next {
                Ok(Some(notification)) => {
                    let target = notification.payload();
                    let held = shared.state().held.iter().any(|t| t == target);
                    if held {
                        shared.wake.notify_one();
                    } else {
                        shared.beat_now.notify_one();
                    }
                }
                Ok(None) => {
                    tracing::warn!("The LISTEN connection was lost; reconnecting.");
                    shared.wake.notify_one();
                }
                Err(error) => {
                    tracing::warn!(%error, "The LISTEN connection failed; reconnecting.");
                    break;
                }
            }
        }
    }
}

async fn connect(shared: &Shared) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(&shared.pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}
