//! The finisher: writes attempt outcomes in batches (one or two statements per
//! batch, fenced by attempt number), retries the write while the database is
//! away (the dispatcher claims nothing new meanwhile), then frees the jobs'
//! slots and wakes the dispatcher.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::Shared;
use crate::store::outbox::{self as store, Completion};

/// Largest batch written in one go.
const MAX_BATCH: usize = 1000;

/// An attempt's outcome on its way to the database.
pub(super) struct Finished {
    pub completion: Completion,
    pub target: String,
    pub kind: String,
}

pub(super) async fn run_finisher(shared: Arc<Shared>, mut rx: UnboundedReceiver<Finished>) {
    let mut batch: Vec<Finished> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        {
            // A panic while writing is caught and the batch written again: the
            // finisher lives on, and no outcome is dropped.
            use futures::FutureExt;
            while std::panic::AssertUnwindSafe(write_until_done(&shared, &batch))
                .catch_unwind()
                .await
                .is_err()
            {
                metrics::counter!("orderbridge_part_restarts_total", "part" => "outbox_finisher")
                    .increment(1);
                tracing::error!(
                    part = "outbox_finisher",
                    "Writing job outcomes panicked; writing the batch again."
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        {
            let mut state = shared.state();
            for done in &batch {
                if state.in_flight.remove(&done.completion.job_id).is_some() {
                    if let Some(count) = state.per_target.get_mut(&done.target) {
                        *count = count.saturating_sub(1);
                    }
                }
            }
        }
        shared.wake.notify_one();
        batch.clear();
    }
}

/// Writes a batch, retrying with backoff while the database fails. The jobs stay
/// leased (and their leases renewed) meanwhile, so nothing is lost or run twice.
async fn write_until_done(shared: &Shared, batch: &[Finished]) {
    let completions: Vec<Completion> = batch.iter().map(|f| f.completion.clone()).collect();
    let mut backoff = Duration::from_millis(100);
    loop {
        match store::complete(&shared.pool, &shared.owner, &completions).await {
            Ok(applied) => {
                if shared
                    .finisher_stalled
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    tracing::info!("Job outcomes are written again; claiming resumes.");
                    shared.wake.notify_one();
                }
                if applied.len() < completions.len() {
                    let applied: HashSet<i64> = applied.into_iter().collect();
                    for lost in batch
                        .iter()
                        .filter(|f| !applied.contains(&f.completion.job_id))
                    {
                        metrics::counter!("orderbridge_outbox_fenced_total").increment(1);
                        tracing::warn!(job_id = lost.completion.job_id,
                            attempt = lost.completion.attempt, kind = %lost.kind,
                            target = %lost.target,
                            "Outcome discarded: this worker lost the job's lease to another attempt.");
                    }
                }
                return;
            }
            Err(error) => {
                // No new claims while outcomes cannot be written: completions
                // are never silently lost behind new work.
                shared
                    .finisher_stalled
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::error!(%error, jobs = completions.len(), retry_in_ms = backoff.as_millis() as u64,
                    "Writing job outcomes failed; retrying, and claiming nothing new meanwhile.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
