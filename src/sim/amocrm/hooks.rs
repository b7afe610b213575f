//! Outgoing account webhooks: one form-encoded POST per job, sent from a
//! spawned task with a 2 s timeout, recorded as a [`SimDelivery`], and the
//! auto-disable rule (more than 100 failures within 2 hours).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::HookJob;
use super::{Shared, SimDelivery};

const DISABLE_AFTER: usize = 100;
const FAILURE_WINDOW: Duration = Duration::from_secs(2 * 3600);

pub(super) fn spawn_all(shared: &Arc<Shared>, jobs: Vec<HookJob>) {
    for job in jobs {
        let shared = shared.clone();
        shared.runtime.clone().spawn(deliver(shared, job));
    }
}

async fn deliver(shared: Arc<Shared>, job: HookJob) {
    let result = shared
        .http
        .post(&job.destination)
        .form(&job.form)
        .send()
        .await;
    let status = match result {
        Ok(resp) => Some(resp.status().as_u16()),
        Err(error) => {
            tracing::debug!(%error, destination = %job.destination, "simulated amoCRM webhook failed");
            None
        }
    };
    let delivered = status.is_some_and(|s| (100..300).contains(&s));
    let mut st = shared.lock();
    if !delivered {
        let now = Instant::now();
        if let Some(hook) = st.webhooks.iter_mut().find(|w| w.id == job.webhook_id) {
            hook.failures.push_back(now);
            while hook
                .failures
                .front()
                .is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW)
            {
                hook.failures.pop_front();
            }
            if hook.failures.len() > DISABLE_AFTER {
                hook.disabled = true;
            }
        }
    }
    st.deliveries.push(SimDelivery {
        destination: job.destination,
        form: job.form,
        status,
    });
}
