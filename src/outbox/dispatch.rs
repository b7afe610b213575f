//! Claiming and running jobs: the dispatcher claims due jobs of held targets
//! in batches (up to the replica's concurrency and each target's claim cap),
//! and runs each one in its own task: wait for the target's limiter (holding no
//! database connection), run the handler (timeout, panic caught), turn the
//! outcome into the next step, and hand it to the finisher.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::finish::Finished;
use super::retry::{NextStep, RetryAction, RetryCause};
use super::{InFlight, JobContext, OutboxError, Shared};
use crate::store::outbox::{self as store, ClaimedJob, Completion, Finish};
use crate::store::StoreError;

pub(super) async fn run_dispatcher(
    shared: Arc<Shared>,
    finish_tx: UnboundedSender<Finished>,
    shutdown: CancellationToken,
) -> Result<(), OutboxError> {
    let mut tasks = JoinSet::new();
    let mut poll = tokio::time::interval(shared.config.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = poll.tick() => {}
        }
        while let Some(done) = tasks.try_join_next() {
            report_join(done);
        }
        // A panic in one claim round is caught: the dispatcher lives on (the
        // round's claimed jobs stay leased and are reaped when it expires).
        use futures::FutureExt;
        let round = std::panic::AssertUnwindSafe(claim_round(&shared, &mut tasks, &finish_tx))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                metrics::counter!("orderbridge_part_restarts_total", "part" => "outbox_dispatcher")
                    .increment(1);
                tracing::error!(
                    part = "outbox_dispatcher",
                    "A claim round panicked; the dispatcher goes on."
                );
                Ok(false)
            });
        match round {
            Ok(maybe_more) => {
                backoff = Duration::from_millis(100);
                if maybe_more {
                    shared.wake.notify_one();
                }
            }
            Err(error) => {
                tracing::error!(%error, retry_in_ms = backoff.as_millis() as u64,
                    "Claiming outbox jobs failed; backing off.");
                metrics::counter!("orderbridge_outbox_claim_errors_total").increment(1);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    drain_on_shutdown(&shared, tasks, &finish_tx).await;
    Ok(())
}

/// Stops claiming; waits for running jobs up to the shutdown deadline; gives the
/// rest back to the queue as `released`.
async fn drain_on_shutdown(
    shared: &Arc<Shared>,
    mut tasks: JoinSet<()>,
    finish_tx: &UnboundedSender<Finished>,
) {
    let running = tasks.len();
    tracing::info!(
        running,
        deadline_ms = shared.config.shutdown_deadline.as_millis() as u64,
        "Outbox engine stopping: no more claims; waiting for running jobs."
    );
    let deadline = tokio::time::sleep(shared.config.shutdown_deadline);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            next = tasks.join_next() => match next {
                Some(done) => report_join(done),
                None => break,
            },
        }
    }
    tasks.abort_all();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            if !e.is_cancelled() {
                tracing::error!(error = %e, "An outbox job task failed.");
            }
        }
    }
    let unreported: Vec<(i64, InFlight)> = shared
        .state()
        .in_flight
        .iter()
        .filter(|(_, f)| !f.reported)
        .map(|(id, f)| (*id, f.clone()))
        .collect();
    if !unreported.is_empty() {
        tracing::warn!(
            jobs = unreported.len(),
            "Shutdown deadline passed; releasing unfinished jobs back to the queue."
        );
    }
    let now = shared.clock.now();
    for (job_id, flight) in unreported {
        let _ = finish_tx.send(Finished {
            completion: Completion {
                job_id,
                attempt: flight.attempt,
                started_at: flight.started_at,
                finished_at: now,
                finish: Finish::Released,
                remark: None,
            },
            target: flight.target,
            kind: flight.kind,
        });
    }
}

fn report_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if !e.is_cancelled() {
            tracing::error!(error = %e, "An outbox job task failed outside its handler.");
        }
    }
}

/// One pass over the held targets. Returns whether a claim came back full
/// (so there may be more due work right now).
async fn claim_round(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    finish_tx: &UnboundedSender<Finished>,
) -> Result<bool, StoreError> {
    if shared
        .finisher_stalled
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        // The finisher wakes the dispatcher once it writes again.
        return Ok(false);
    }
    let mut held: Vec<String> = {
        let state = shared.state();
        state
            .held
            .iter()
            .filter(|t| !state.draining.contains(*t))
            .cloned()
            .collect()
    };
    // Start each round at another target, so no target always gets the free slots first.
    if !held.is_empty() {
        let start = shared
            .round
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % held.len();
        held.rotate_left(start);
    }
    let mut maybe_more = false;
    for target in held {
        // Kinds whose handler batches have an allowance of their own (a
        // batch), the others the target's claim cap (about two seconds of
        // its quota), so neither starves the other.
        let (global_free, plain_free, batch_free) = {
            let state = shared.state();
            let global_free = shared
                .config
                .concurrency
                .saturating_sub(state.in_flight.len());
            let cap = shared
                .limiters
                .claim_cap(&target, shared.config.concurrency);
            let used = state.per_target.get(&target).copied().unwrap_or(0);
            let in_batch = if shared.batch_kinds.is_empty() {
                0
            } else {
                state
                    .in_flight
                    .values()
                    .filter(|j| j.target == target && shared.batch_kinds.contains(&j.kind))
                    .count()
            };
            (
                global_free,
                cap.saturating_sub(used - in_batch.min(used)),
                shared.batch_size.saturating_sub(in_batch),
            )
        };
        if global_free == 0 {
            break;
        }
        for (free, kinds) in [
            (plain_free, &shared.plain_kinds),
            (batch_free, &shared.batch_kinds),
        ] {
            let global_free = shared
                .config
                .concurrency
                .saturating_sub(shared.state().in_flight.len());
            let want = global_free
                .min(free)
                .min(shared.config.claim_batch as usize);
            if want > 0
                && !kinds.is_empty()
                && claim_into(shared, tasks, finish_tx, &target, want, kinds).await?
            {
                maybe_more = true;
            }
        }
    }
    Ok(maybe_more)
}

/// Claims up to `want` due jobs of `kinds` for `target` and starts them;
/// whether it got all it wanted (so there may be more).
async fn claim_into(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    finish_tx: &UnboundedSender<Finished>,
    target: &str,
    want: usize,
    kinds: &[String],
) -> Result<bool, StoreError> {
    let now = shared.clock.now();
    let lease_until = shared.lease_until(shared.config.job_lease);
    let jobs = store::claim(
        &shared.pool,
        target,
        &shared.owner,
        now,
        lease_until,
        want as i64,
        kinds,
    )
    .await?;
    let all = jobs.len() == want;
    if jobs.is_empty() {
        return Ok(false);
    }
    {
        let mut state = shared.state();
        for job in &jobs {
            state.in_flight.insert(
                job.id,
                InFlight {
                    attempt: job.attempts,
                    target: job.target.clone(),
                    kind: job.kind.clone(),
                    started_at: now,
                    reported: false,
                },
            );
        }
        *state.per_target.entry(target.to_string()).or_insert(0) += jobs.len();
    }
    for job in jobs {
        tasks.spawn(run_job(shared.clone(), job, finish_tx.clone()));
    }
    Ok(all)
}

/// Runs one claimed job to its outcome and hands that to the finisher.
async fn run_job(shared: Arc<Shared>, job: ClaimedJob, finish_tx: UnboundedSender<Finished>) {
    if let Some(limiter) = shared.limiters.job_gate(&job.target) {
        let waited = Instant::now();
        limiter.until_ready().await;
        metrics::histogram!("orderbridge_outbox_limiter_wait_seconds", "target" => job.target.clone())
            .record(waited.elapsed().as_secs_f64());
    }
    let started_at = shared.clock.now();
    let timer = Instant::now();
    let context = JobContext::new(
        job.id,
        job.kind.clone(),
        job.target.clone(),
        job.ordering_key.clone(),
        job.payload.clone(),
        job.attempts,
    );
    let action = match shared.handlers.get(&job.kind) {
        None => RetryAction::permanent(format!("{}", OutboxError::UnknownKind(job.kind.clone()))),
        Some(handler) => {
            let run = AssertUnwindSafe(handler.call(&context)).catch_unwind();
            let limit = shared
                .timeouts
                .get(&job.kind)
                .copied()
                .unwrap_or(shared.config.handler_timeout);
            match tokio::time::timeout(limit, run).await {
                Err(_) => RetryAction::timeout(format!(
                    "handler ran longer than {} ms",
                    limit.as_millis()
                )),
                Ok(Err(panic)) => RetryAction::retry(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                )),
                Ok(Ok(action)) => action,
            }
        }
    };
    let finished_at = shared.clock.now();
    metrics::histogram!("orderbridge_outbox_job_seconds", "kind" => job.kind.clone())
        .record(timer.elapsed().as_secs_f64());
    let finish = next_finish(&shared, &job, &action, finished_at);
    log_outcome(&job, &action, &finish);
    metrics::counter!("orderbridge_outbox_attempts_total",
        "kind" => job.kind.clone(), "outcome" => outcome_label(&finish))
    .increment(1);
    if let Some(flight) = shared.state().in_flight.get_mut(&job.id) {
        flight.reported = true;
    }
    let _ = finish_tx.send(Finished {
        completion: Completion {
            job_id: job.id,
            attempt: job.attempts,
            started_at,
            finished_at,
            remark: matches!(finish, Finish::Success)
                .then(|| context.take_remarks())
                .flatten(),
            finish,
        },
        target: job.target,
        kind: job.kind,
    });
}

fn next_finish(
    shared: &Shared,
    job: &ClaimedJob,
    action: &RetryAction,
    finished_at: chrono::DateTime<chrono::Utc>,
) -> Finish {
    let Some(error) = action.error() else {
        return Finish::Success;
    };
    let error = error.to_string();
    if let RetryAction::Wait { after, .. } = action {
        return Finish::Waiting {
            run_at: finished_at
                + chrono::Duration::from_std(*after).unwrap_or(chrono::Duration::MAX),
            reason: error,
        };
    }
    let failures = u32::try_from(job.failures).unwrap_or(0).saturating_add(1);
    match shared
        .config
        .schedule
        .next_step(failures, action, &mut rand::rng())
    {
        NextStep::RetryIn(delay) => Finish::Retry {
            run_at: finished_at
                + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
            error,
        },
        NextStep::DeadLetter => Finish::Dead {
            error: match action {
                RetryAction::Permanent { .. } => format!("permanent failure: {error}"),
                _ => format!(
                    "retries exhausted after {failures} failed attempts; last error: {error}"
                ),
            },
        },
    }
}

fn outcome_label(finish: &Finish) -> &'static str {
    match finish {
        Finish::Success => "success",
        Finish::Retry { .. } => "retry",
        Finish::Dead { .. } => "dead",
        Finish::Released => "released",
        Finish::Waiting { .. } => "waiting",
    }
}

fn log_outcome(job: &ClaimedJob, action: &RetryAction, finish: &Finish) {
    match finish {
        Finish::Success => tracing::debug!(job_id = job.id, attempt = job.attempts,
            kind = %job.kind, target = %job.target, "Job done."),
        Finish::Retry { run_at, error } => {
            let cause = match action {
                RetryAction::Retry {
                    cause: RetryCause::Throttled,
                    ..
                } => "throttled",
                RetryAction::Retry {
                    cause: RetryCause::Timeout,
                    ..
                } => "timeout",
                RetryAction::RetryAfter { .. } => "retry_after",
                _ => "failure",
            };
            tracing::warn!(job_id = job.id, attempt = job.attempts, kind = %job.kind,
                target = %job.target, cause, %run_at, error = %error,
                "Job attempt failed; it will be retried.")
        }
        Finish::Dead { error } => {
            metrics::counter!("orderbridge_outbox_dead_lettered_total", "kind" => job.kind.clone())
                .increment(1);
            tracing::error!(job_id = job.id, attempt = job.attempts, kind = %job.kind,
                target = %job.target, error = %error, "Job dead-lettered.")
        }
        Finish::Waiting { run_at, reason } => tracing::info!(job_id = job.id, kind = %job.kind,
            target = %job.target, %run_at, reason = %reason, "Job waits; it is tried again later."),
        Finish::Released => {}
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}
