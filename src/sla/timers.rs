//! SLA timers firing: [`fire_due`] flags due warnings and breaches and queues
//! one `sla_task` job for each in the same transaction (exactly once, across
//! restarts and replicas: the flags live in PostgreSQL); [`SlaTaskHandler`]
//! creates the amoCRM task for the responsible (the text says the order, the
//! stage and the deadline), unless the lead has left the stage meanwhile.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::connectors::amocrm::{AmoClient, AmoError, NewTask};
use crate::outbox::{Handler, JobContext, NewJob, RetryAction};
use crate::store::sla as store;
use crate::store::StoreError;

/// Job kind of an SLA warning or breach task.
pub const SLA_TASK_KIND: &str = "sla_task";

#[derive(Debug, thiserror::Error)]
pub enum SlaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error("bad sla_task payload: {0}")]
    BadPayload(String),
    #[error("no amoCRM client for CRM account `{0}`")]
    NoClient(String),
    #[error("amoCRM refused the task: {0}")]
    Refused(String),
}

/// Fires what is due at `now` (up to 500 a round); returns how many.
pub async fn fire_due(pool: &PgPool, now: DateTime<Utc>) -> Result<usize, StoreError> {
    let mut tx = pool.begin().await?;
    let due = store::claim_due(&mut tx, now, 500).await?;
    for timer in &due {
        crate::store::outbox::enqueue(&mut tx, &task_job(timer)).await?;
        if timer.kind == "breach" {
            super::alerts::event(
                &mut tx,
                "sla_breach",
                &format!(
                    "SLA breached: {} order {} is still in «{}» past its deadline {}",
                    timer.marketplace,
                    timer.code,
                    timer.stage,
                    timer.deadline.map(|d| d.to_rfc3339()).unwrap_or_default()
                ),
                serde_json::json!({ "order": timer.code, "lead_id": timer.lead_id, "crm_account": timer.crm_account }),
            )
            .await?;
        }
    }
    tx.commit().await?;
    for timer in &due {
        metrics::counter!("orderbridge_sla_total", "kind" => timer.kind.clone(), "marketplace" => timer.marketplace.clone())
            .increment(1);
        let deadline = timer.deadline.map(|d| d.to_rfc3339()).unwrap_or_default();
        if timer.kind == "breach" {
            tracing::warn!(order = %timer.code, stage = %timer.stage, deadline = %deadline,
                responsible = timer.responsible_user_id, "SLA breached: the order is still in the stage past its deadline.");
        } else {
            tracing::info!(order = %timer.code, stage = %timer.stage, deadline = %deadline,
                responsible = timer.responsible_user_id, "SLA warning: the order's deadline in this stage is near.");
        }
    }
    Ok(due.len())
}

fn task_job(timer: &store::Due) -> NewJob {
    NewJob {
        kind: SLA_TASK_KIND.to_string(),
        target: format!("amocrm:{}", timer.crm_account),
        ordering_key: format!("sla:{}", timer.entry_id),
        dedupe_key: Some(format!("{SLA_TASK_KIND}:{}:{}", timer.entry_id, timer.kind)),
        payload: serde_json::json!({
            "entry_id": timer.entry_id,
            "kind": timer.kind,
            "order_id": timer.order_id,
            "crm_account": timer.crm_account,
            "lead_id": timer.lead_id,
            "stage": timer.stage,
            "responsible_user_id": timer.responsible_user_id,
            "entered_at": timer.entered_at,
            "deadline": timer.deadline,
            "code": timer.code,
            "marketplace": timer.marketplace,
        }),
        run_at: None,
    }
}

/// The `sla_task` handler.
pub struct SlaTaskHandler {
    pub pool: PgPool,
    pub clients: BTreeMap<String, AmoClient>,
    /// For the task's text: deadlines in the working hours' timezone.
    pub timezone: chrono_tz::Tz,
}

impl Handler for SlaTaskHandler {
    type Error = SlaError;

    async fn run(&self, job: &JobContext) -> Result<(), SlaError> {
        let p = &job.payload;
        let text = |k: &str| {
            p[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| SlaError::BadPayload(format!("no `{k}`")))
        };
        let number = |k: &str| {
            p[k].as_i64()
                .ok_or_else(|| SlaError::BadPayload(format!("no `{k}`")))
        };
        let (entry_id, order_id, lead_id) =
            (number("entry_id")?, number("order_id")?, number("lead_id")?);
        let (kind, crm_account, stage, code) = (
            text("kind")?,
            text("crm_account")?,
            text("stage")?,
            text("code")?,
        );
        if !store::is_open(&self.pool, entry_id).await? {
            tracing::info!(order = %code, stage = %stage, kind = %kind, "The lead left the stage; its SLA task is not needed.");
            return Ok(());
        }
        let client = self
            .clients
            .get(&crm_account)
            .ok_or_else(|| SlaError::NoClient(crm_account.clone()))?;
        let deadline: Option<DateTime<Utc>> = p["deadline"]
            .as_str()
            .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
            .map(|d| d.with_timezone(&Utc));
        let local = deadline
            .map(|d| {
                d.with_timezone(&self.timezone)
                    .format("%d.%m.%Y %H:%M")
                    .to_string()
            })
            .unwrap_or_else(|| "?".into());
        let task_text = if kind == "breach" {
            format!("SLA нарушен: заказ {code} всё ещё в этапе «{stage}», срок был {local} ({}). Обработайте заказ.", self.timezone)
        } else {
            format!(
                "SLA: заказ {code} в этапе «{stage}», срок {local} ({}). Успейте до срока.",
                self.timezone
            )
        };
        let complete_till = match (kind.as_str(), deadline) {
            ("breach", _) | (_, None) => Utc::now().timestamp() + 3600,
            (_, Some(d)) => d.timestamp(),
        };
        let outcome = client
            .add_tasks(&[NewTask {
                request_id: format!("sla-{entry_id}-{kind}"),
                text: task_text,
                complete_till,
                responsible_user_id: p["responsible_user_id"].as_u64(),
                lead_id: Some(lead_id as u64),
            }])
            .await?;
        if let Some(rejection) = outcome.rejected.first() {
            return Err(SlaError::Refused(rejection.errors.join("; ")));
        }
        crate::store::timeline::record(
            &self.pool,
            order_id,
            if kind == "breach" {
                "sla_breach"
            } else {
                "sla_warning"
            },
            &format!("stage «{stage}», deadline {local}: a task for the responsible"),
        )
        .await;
        Ok(())
    }

    fn classify(&self, error: &SlaError) -> RetryAction {
        match error {
            SlaError::Amo(e) => e.classify(),
            SlaError::Store(e) => RetryAction::retry(e.to_string()),
            // A CRM account this configuration does not have: retrying cannot help.
            SlaError::BadPayload(_) | SlaError::Refused(_) | SlaError::NoClient(_) => {
                RetryAction::permanent(error.to_string())
            }
        }
    }
}
