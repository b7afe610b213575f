//! SQL of alerts: opening (or counting into) an open alert, resolving,
//! listing the open ones, and the dead-letter watch's cursor. Every change
//! happens in the caller's transaction, which also queues the alert's delivery.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreError;

/// Opens the alert `key`, or counts one more occurrence into it when it is
/// open. `true` when it was opened now (the caller sends it).
pub async fn open_or_count(
    conn: &mut PgConnection,
    key: &str,
    kind: &str,
    text: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let opened: Option<bool> = sqlx::query_scalar(
        "INSERT INTO alerts (key, kind, opened_at, last_seen_at, text) VALUES ($1, $2, $4, $4, $3)
         ON CONFLICT (key) DO UPDATE SET
             opened_at   = CASE WHEN alerts.resolved_at IS NULL THEN alerts.opened_at ELSE EXCLUDED.opened_at END,
             occurrences = CASE WHEN alerts.resolved_at IS NULL THEN alerts.occurrences + 1 ELSE 1 END,
             text        = CASE WHEN alerts.resolved_at IS NULL THEN alerts.text ELSE EXCLUDED.text END,
             last_seen_at = EXCLUDED.last_seen_at,
             resolved_at = NULL
         RETURNING (xmax = 0) OR occurrences = 1",
    )
    .bind(key)
    .bind(kind)
    .bind(text)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(opened.unwrap_or(false))
}

/// An open alert.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenAlert {
    pub key: String,
    pub kind: String,
    pub opened_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub occurrences: i64,
    pub text: String,
}

pub async fn open_alerts(conn: &mut PgConnection) -> Result<Vec<OpenAlert>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT key, kind, opened_at, last_seen_at, occurrences, text FROM alerts
         WHERE resolved_at IS NULL ORDER BY opened_at FOR UPDATE",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

pub async fn resolve(
    conn: &mut PgConnection,
    key: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE alerts SET resolved_at = $2 WHERE key = $1 AND resolved_at IS NULL")
        .bind(key)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Jobs dead-lettered since the watch last looked (not alert deliveries
/// themselves), and moves the watch's cursor to `now`.
pub async fn dead_since_last_look(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<Vec<(i64, String, Option<String>)>, StoreError> {
    let since: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT at FROM alert_cursors WHERE name = 'dead_letters' FOR UPDATE")
            .fetch_optional(&mut *conn)
            .await?;
    let rows = match since {
        None => Vec::new(),
        Some(since) => {
            sqlx::query_as(
                "SELECT id, kind, last_error FROM outbox_jobs
                 WHERE state = 'dead' AND kind <> 'alert' AND updated_at > $1 AND updated_at <= $2
                 ORDER BY id LIMIT 100",
            )
            .bind(since)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    sqlx::query(
        "INSERT INTO alert_cursors (name, at) VALUES ('dead_letters', $1)
         ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at",
    )
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(rows)
}

/// Shops whose last successful poll is older than `since` while the last
/// attempt failed: (marketplace, shop, last error).
pub async fn failing_polls(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT marketplace, account, last_error FROM poll_cursors
         WHERE marketplace IN ('kaspi', 'avito') AND last_error IS NOT NULL
           AND COALESCE(last_success_at, '-infinity') < $1
           AND last_started_at > $1",
    )
    .bind(since)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}
