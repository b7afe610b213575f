//! Alerts to on-call: an optional outgoing webhook (`alerts.url`; a JSON body
//! with `kind`, `state`, a human `text` and the ids, which a Telegram or Slack
//! relay can forward) for SLA breaches, orders nobody can take, dead-lettered
//! jobs, open circuits (amoCRM's 403), shops whose polls keep failing and
//! refused map reloads.
//!
//! Grouped so that an outage sends one alert and one "resolved", not
//! thousands: a condition (circuit, failing polls, refused reload) opens its
//! alert once and resolves it when it ends; events of a kind (breaches,
//! unassigned orders, dead letters) open the kind's alert once, later ones
//! only count, and it resolves (with the count) after `alerts.quiet_after`
//! without a new one. Every "open" and "resolved" is an `alert` job queued in
//! the transaction that changes the alert's row, delivered through the outbox
//! (rate-limited by the `alerts:webhook` target, retried on 5xx, 429 and
//! timeouts; a 4xx is dead-lettered with the answer). Without a URL, alerts
//! are kept in the `alerts` table and logged only.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{PgConnection, PgPool};

use crate::outbox::{Handler, JobContext, NewJob, RetryAction};
use crate::store::alerts as store;
use crate::store::StoreError;

/// Job kind of an alert delivery.
pub const ALERT_KIND: &str = "alert";
/// The outbox target (and rate limit) of alert deliveries.
pub const ALERT_TARGET: &str = "alerts:webhook";

/// Kinds that are conditions (resolved when they end), not events.
const CONDITIONS: &[&str] = &["circuit_open", "poll_failing", "map_reload_refused"];

/// One occurrence of an event kind (`sla_breach`, `unassigned`,
/// `dead_letter`), in the caller's transaction: opens the kind's alert (and
/// queues its delivery) or counts into the open one.
pub async fn event(
    conn: &mut PgConnection,
    kind: &str,
    text: &str,
    ids: serde_json::Value,
) -> Result<(), StoreError> {
    let now = Utc::now();
    if store::open_or_count(conn, kind, kind, text, now).await? {
        tracing::warn!(alert = kind, text, "Alert opened.");
        crate::store::outbox::enqueue(conn, &delivery(kind, kind, "open", text, 1, now, ids))
            .await?;
    }
    Ok(())
}

fn delivery(
    key: &str,
    kind: &str,
    state: &str,
    text: &str,
    occurrences: i64,
    at: DateTime<Utc>,
    ids: serde_json::Value,
) -> NewJob {
    NewJob {
        kind: ALERT_KIND.to_string(),
        target: ALERT_TARGET.to_string(),
        ordering_key: format!("alert:{key}"),
        dedupe_key: None,
        payload: serde_json::json!({
            "source": "orderbridge",
            "kind": kind,
            "state": state,
            "key": key,
            "text": text,
            "occurrences": occurrences,
            "at": at,
            "ids": ids,
        }),
        run_at: None,
    }
}

/// What the watch compares against.
#[derive(Debug, Clone)]
pub struct Watch {
    /// A shop's polls failing for longer than this is an alert.
    pub poll_failing_after: Duration,
    /// An event kind's alert resolves after this long without a new event.
    pub quiet_after: Duration,
}

/// One round of the watch: conditions opened or resolved, dead letters
/// counted, quiet event alerts resolved. `map_problems`: the refused reload's
/// problems (empty when the last reload was good).
pub async fn watch_round(
    pool: &PgPool,
    watch: &Watch,
    map_problems: &[String],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut conditions: Vec<(String, &'static str, String, serde_json::Value)> = Vec::new();
    for circuit in crate::store::circuits::list_open(pool, now).await? {
        conditions.push((
            format!("circuit_open:{}", circuit.target),
            "circuit_open",
            format!(
                "All traffic to {} is stopped until {}: {}",
                circuit.target,
                circuit.open_until.to_rfc3339(),
                circuit.reason
            ),
            serde_json::json!({ "target": circuit.target }),
        ));
    }
    let mut tx = pool.begin().await?;
    let since = now - chrono::Duration::from_std(watch.poll_failing_after).unwrap_or_default();
    for (marketplace, shop, error) in store::failing_polls(&mut tx, since).await? {
        conditions.push((
            format!("poll_failing:{marketplace}:{shop}"),
            "poll_failing",
            format!(
                "Polling {marketplace} shop `{shop}` has failed for over {}: {}",
                humantime::format_duration(watch.poll_failing_after),
                error.unwrap_or_default()
            ),
            serde_json::json!({ "marketplace": marketplace, "shop": shop }),
        ));
    }
    if !map_problems.is_empty() {
        conditions.push((
            "map_reload_refused".into(),
            "map_reload_refused",
            format!(
                "A map reload was refused; the previous maps stay in force: {}",
                map_problems.join("; ")
            ),
            serde_json::json!({}),
        ));
    }
    for (id, kind, error) in store::dead_since_last_look(&mut tx, now).await? {
        let text = format!(
            "Job {id} ({kind}) was dead-lettered: {}",
            error.unwrap_or_default()
        );
        event(
            &mut tx,
            "dead_letter",
            &text,
            serde_json::json!({ "job_id": id }),
        )
        .await?;
    }
    let active: BTreeSet<String> = conditions.iter().map(|c| c.0.clone()).collect();
    for (key, kind, text, ids) in &conditions {
        if store::open_or_count(&mut tx, key, kind, text, now).await? {
            tracing::warn!(alert = %key, text = %text, "Alert opened.");
            crate::store::outbox::enqueue(
                &mut tx,
                &delivery(key, kind, "open", text, 1, now, ids.clone()),
            )
            .await?;
        }
    }
    let quiet = now - chrono::Duration::from_std(watch.quiet_after).unwrap_or_default();
    for alert in store::open_alerts(&mut tx).await? {
        let over = if CONDITIONS.contains(&alert.kind.as_str()) {
            !active.contains(&alert.key)
        } else {
            alert.last_seen_at < quiet
        };
        if !over {
            continue;
        }
        store::resolve(&mut tx, &alert.key, now).await?;
        let text = if CONDITIONS.contains(&alert.kind.as_str()) {
            format!("Resolved: {}", alert.text)
        } else {
            format!(
                "Resolved: {} alert(s) of kind {} since {} (first: {})",
                alert.occurrences,
                alert.kind,
                alert.opened_at.to_rfc3339(),
                alert.text
            )
        };
        tracing::info!(alert = %alert.key, occurrences = alert.occurrences, "Alert resolved.");
        crate::store::outbox::enqueue(
            &mut tx,
            &delivery(
                &alert.key,
                &alert.kind,
                "resolved",
                &text,
                alert.occurrences,
                now,
                serde_json::json!({}),
            ),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("the alert webhook answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the alert webhook answered {status}")]
    Failed { status: u16 },
    #[error("the alert webhook could not be reached: {0}")]
    Network(String),
}

/// The `alert` handler: POSTs the alert to `alerts.url` (or only logs it when
/// none is configured).
pub struct AlertHandler {
    pub url: Option<SecretString>,
    pub http: reqwest::Client,
}

impl AlertHandler {
    pub fn new(url: Option<SecretString>, timeout: Duration) -> AlertHandler {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        AlertHandler { url, http }
    }
}

impl Handler for AlertHandler {
    type Error = AlertError;

    async fn run(&self, job: &JobContext) -> Result<(), AlertError> {
        let Some(url) = &self.url else {
            tracing::info!(alert = %job.payload["key"], state = %job.payload["state"], "No alerts.url: the alert is logged only.");
            return Ok(());
        };
        let answer = self
            .http
            .post(url.expose_secret())
            .json(&job.payload)
            .send()
            .await
            .map_err(|e| AlertError::Network(crate::connectors::transport_error_text(e)))?;
        let status = answer.status().as_u16();
        if answer.status().is_success() {
            return Ok(());
        }
        if answer.status().is_client_error() && status != 429 {
            let body: String = answer
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            return Err(AlertError::Refused { status, body });
        }
        Err(AlertError::Failed { status })
    }

    fn classify(&self, error: &AlertError) -> RetryAction {
        match error {
            AlertError::Refused { .. } => RetryAction::permanent(error.to_string()),
            AlertError::Failed { status: 429 } => RetryAction::throttled(error.to_string()),
            AlertError::Failed { .. } | AlertError::Network(_) => {
                RetryAction::retry(error.to_string())
            }
        }
    }
}
