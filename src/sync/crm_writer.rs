//! Batching of amoCRM writes across orders. Each CRM account has one writer
//! task; the `crm_sync_order` jobs of many orders hand it their lead
//! creations (with a new contact embedded, through `/leads/complex`) and their
//! lead updates, and it sends them in batches of up to 50 per request. It does
//! not wait to fill a batch: it waits for the account's rate limiter first and
//! gathers the batch then, so whatever queued during that wait goes in the
//! request; a quiet bridge pays no latency and a busy one gets full batches (design §2: amoCRM ≤7
//! req/s, batches ≤50). Optionally (`crm_accounts.<name>.batch_fill`, off by
//! default) a round short of a batch is not sent sooner than that after the
//! previous request.

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};

use crate::connectors::amocrm::{
    AmoClient, AmoError, ComplexCreated, LeadUpdate, NewComplexLead, BATCH,
};
use crate::outbox::RetryAction;

/// Why one item of a batch was not written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// amoCRM refused this item (validation): retrying the same data cannot help.
    #[error("amoCRM refused the item: {0}")]
    Refused(String),
    /// The whole request failed; `action` is the connector's classification.
    #[error("{message}")]
    Failed {
        message: String,
        action: RetryAction,
    },
    #[error("the amoCRM writer of this account has stopped")]
    Stopped,
}

impl WriteError {
    pub fn classify(&self) -> RetryAction {
        match self {
            WriteError::Refused(reason) => RetryAction::permanent(reason.clone()),
            WriteError::Failed { action, .. } => action.clone(),
            WriteError::Stopped => RetryAction::retry(self.to_string()),
        }
    }

    fn from_amo(error: &AmoError) -> WriteError {
        WriteError::Failed {
            message: error.to_string(),
            action: error.classify(),
        }
    }
}

enum Op {
    Create(
        NewComplexLead,
        oneshot::Sender<Result<ComplexCreated, WriteError>>,
    ),
    Update(LeadUpdate, oneshot::Sender<Result<(), WriteError>>),
}

/// The handle jobs use; cloning shares the account's writer task.
#[derive(Clone)]
pub struct CrmWriter {
    ops: mpsc::UnboundedSender<Op>,
}

impl CrmWriter {
    /// Starts the writer task of one account. It ends when every handle is dropped.
    pub fn start(client: AmoClient) -> CrmWriter {
        CrmWriter::start_filling(client, std::time::Duration::ZERO)
    }

    /// Like [`CrmWriter::start`], holding a request up to `fill` for more
    /// writes while it has fewer than a batch.
    pub fn start_filling(client: AmoClient, fill: std::time::Duration) -> CrmWriter {
        let (ops, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_forever(client, rx, fill));
        CrmWriter { ops }
    }

    /// Creates one lead (and its embedded new contact), batched with others.
    pub async fn create(&self, lead: NewComplexLead) -> Result<ComplexCreated, WriteError> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Op::Create(lead, tx))
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Applies one lead update, batched with other orders' updates.
    pub async fn update(&self, update: LeadUpdate) -> Result<(), WriteError> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Op::Update(update, tx))
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }
}

type CreateWaiter = (
    NewComplexLead,
    oneshot::Sender<Result<ComplexCreated, WriteError>>,
);
type UpdateWaiter = (LeadUpdate, oneshot::Sender<Result<(), WriteError>>);

async fn write_forever(
    client: AmoClient,
    mut rx: mpsc::UnboundedReceiver<Op>,
    fill: std::time::Duration,
) {
    let mut creates: VecDeque<CreateWaiter> = VecDeque::new();
    let mut updates: VecDeque<UpdateWaiter> = VecDeque::new();
    let mut last_sent = tokio::time::Instant::now() - fill;
    loop {
        if creates.is_empty() && updates.is_empty() {
            match rx.recv().await {
                Some(op) => queue(op, &mut creates, &mut updates),
                None => return,
            }
        }
        // Everything that queued meanwhile joins this round.
        while let Ok(op) = rx.try_recv() {
            queue(op, &mut creates, &mut updates);
        }
        // Short of a batch: wait for more until `fill` after the previous
        // request (a backlog's jobs keep arriving while the rate limit would
        // hold the request anyway; a write after a quiet spell goes at once,
        // and none waits longer than `fill`).
        let deadline = last_sent + fill;
        while !fill.is_zero() && creates.len().max(updates.len()) < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(op)) => queue(op, &mut creates, &mut updates),
                Ok(None) | Err(_) => break,
            }
        }
        last_sent = tokio::time::Instant::now();
        // The batch is gathered once the account's limiter lets a request go:
        // what queued during the wait travels in it.
        let (creates, updates, rx, writer) = (&mut creates, &mut updates, &mut rx, &client);
        client
            .with_permit(move || async move {
                while let Ok(op) = rx.try_recv() {
                    queue(op, creates, updates);
                }
                if !creates.is_empty() {
                    let n = creates.len().min(BATCH);
                    let batch: Vec<CreateWaiter> = creates.drain(..n).collect();
                    write_creates(writer, batch).await;
                }
                if !updates.is_empty() {
                    let n = updates.len().min(BATCH);
                    let batch: Vec<UpdateWaiter> = updates.drain(..n).collect();
                    write_updates(writer, batch).await;
                }
            })
            .await;
    }
}

fn queue(op: Op, creates: &mut VecDeque<CreateWaiter>, updates: &mut VecDeque<UpdateWaiter>) {
    match op {
        Op::Create(lead, tx) => creates.push_back((lead, tx)),
        Op::Update(update, tx) => updates.push_back((update, tx)),
    }
}

async fn write_creates(client: &AmoClient, batch: Vec<CreateWaiter>) {
    metrics::histogram!("orderbridge_amocrm_batch_size", "op" => "create")
        .record(batch.len() as f64);
    let mut pending = batch;
    let mut throttled = 0;
    while !pending.is_empty() {
        let leads: Vec<NewComplexLead> = pending.iter().map(|(lead, _)| lead.clone()).collect();
        match client.create_leads_complex(&leads).await {
            // amoCRM did not take the request: the batch goes again after a
            // short `retry_after` instead of failing (and later looking up)
            // every lead in it.
            Err(AmoError::RateLimited { retry_after }) if throttled < MAX_THROTTLED => {
                throttled += 1;
                match short_wait(retry_after) {
                    Some(wait) => {
                        tracing::warn!(size = pending.len(), wait_ms = wait.as_millis() as u64,
                            "amoCRM answered 429 to a batch; sending it again after its retry_after.");
                        tokio::time::sleep(wait).await;
                    }
                    None => {
                        let error = AmoError::RateLimited { retry_after };
                        for (_, tx) in pending {
                            let _ = tx.send(Err(WriteError::from_amo(&error)));
                        }
                        return;
                    }
                }
            }
            Ok(created) => {
                for (lead, tx) in pending {
                    let result = created
                        .iter()
                        .find(|c| c.request_id == lead.lead.request_id)
                        .cloned()
                        .ok_or_else(|| {
                            WriteError::Refused("amoCRM's answer does not name this lead".into())
                        });
                    let _ = tx.send(result);
                }
                return;
            }
            // `/leads/complex` refuses a whole batch for the items its
            // validation errors name: those fail with amoCRM's reason, the
            // rest go again together.
            Err(AmoError::Validation(items)) => {
                let by_index: Vec<String> = pending
                    .iter()
                    .map(|(lead, _)| lead.lead.request_id.clone())
                    .collect();
                let mut reasons: std::collections::HashMap<String, Vec<String>> =
                    Default::default();
                for item in &items {
                    let id =
                        crate::connectors::amocrm::resolve_request_id(&item.request_id, &by_index);
                    if by_index.contains(&id) {
                        reasons
                            .entry(id)
                            .or_default()
                            .extend(item.errors.iter().cloned());
                    }
                }
                if reasons.is_empty() {
                    // Nothing attributable: with one item, it is the one;
                    // with more, each goes alone to find out.
                    let reason = items
                        .iter()
                        .flat_map(|i| i.errors.iter().cloned())
                        .collect::<Vec<_>>()
                        .join("; ");
                    if pending.len() == 1 {
                        for (_, tx) in pending {
                            let _ = tx.send(Err(WriteError::Refused(reason.clone())));
                        }
                        return;
                    }
                    for one in pending {
                        Box::pin(write_creates(client, vec![one])).await;
                    }
                    return;
                }
                let mut rest = Vec::with_capacity(pending.len());
                for (lead, tx) in pending {
                    match reasons.remove(&lead.lead.request_id) {
                        Some(errors) => {
                            tracing::warn!(request_id = %lead.lead.request_id, errors = ?errors,
                                "amoCRM refused one lead of a batch; sending the others.");
                            let _ = tx.send(Err(WriteError::Refused(errors.join("; "))));
                        }
                        None => rest.push((lead, tx)),
                    }
                }
                pending = rest;
            }
            // Too large or slow for amoCRM: halves, each on its own.
            Err(AmoError::GatewayTimeout) if pending.len() > 1 => {
                let second = pending.split_off(pending.len() / 2);
                tracing::warn!(
                    size = pending.len() + second.len(),
                    "amoCRM answered 504 to a complex create; splitting the batch."
                );
                Box::pin(write_creates(client, pending)).await;
                Box::pin(write_creates(client, second)).await;
                return;
            }
            Err(error) => {
                for (_, tx) in pending {
                    let _ = tx.send(Err(WriteError::from_amo(&error)));
                }
                return;
            }
        }
    }
}

/// A batch refused with 429 is sent again at most this many times.
const MAX_THROTTLED: usize = 3;

/// A `retry_after` short enough to wait for inside the writer (none given:
/// one second); a longer one fails the batch's jobs, which retry later.
fn short_wait(retry_after: Option<std::time::Duration>) -> Option<std::time::Duration> {
    let wait = retry_after.unwrap_or(std::time::Duration::from_secs(1));
    (wait <= std::time::Duration::from_secs(10)).then_some(wait)
}

async fn write_updates(client: &AmoClient, batch: Vec<UpdateWaiter>) {
    metrics::histogram!("orderbridge_amocrm_batch_size", "op" => "update")
        .record(batch.len() as f64);
    let updates: Vec<LeadUpdate> = batch.iter().map(|(u, _)| u.clone()).collect();
    let mut throttled = 0;
    let outcome = loop {
        match client.update_leads(&updates).await {
            Err(AmoError::RateLimited { retry_after }) if throttled < MAX_THROTTLED => {
                throttled += 1;
                match short_wait(retry_after) {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => break Err(AmoError::RateLimited { retry_after }),
                }
            }
            other => break other,
        }
    };
    match outcome {
        Ok(outcome) => {
            for (update, tx) in batch {
                let id = update.id.to_string();
                let result = match outcome.rejected.iter().find(|r| r.request_id == id) {
                    Some(rejected) => Err(WriteError::Refused(rejected.errors.join("; "))),
                    None => Ok(()),
                };
                let _ = tx.send(result);
            }
        }
        Err(error) => {
            for (_, tx) in batch {
                let _ = tx.send(Err(WriteError::from_amo(&error)));
            }
        }
    }
}
