//! SQL of stage entries and their SLA timers: entering a stage (closing the
//! open entry), claiming due warnings and breaches (flagged in the caller's
//! transaction, so each fires once), reading an entry, and the open entries
//! per responsible (a role's load), and the round-robin turns.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::StoreError;

/// A stage a lead enters.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub order_id: i64,
    pub crm_account: String,
    pub lead_id: i64,
    pub pipeline_id: i64,
    pub status_id: i64,
    pub stage: String,
    pub role: Option<String>,
    /// `marketplace`, `manager` or `bridge`.
    pub source: &'static str,
    pub responsible_user_id: Option<i64>,
    pub entered_at: DateTime<Utc>,
    pub warn_at: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
}

/// Records a stage entry, closing the order's open one. Entering the stage
/// the lead is already in changes nothing (`None`).
pub async fn enter(conn: &mut PgConnection, entry: &NewEntry) -> Result<Option<i64>, StoreError> {
    let open: Option<(i64, i64)> = sqlx::query_as(
        "SELECT pipeline_id, status_id FROM stage_entries WHERE order_id = $1 AND left_at IS NULL",
    )
    .bind(entry.order_id)
    .fetch_optional(&mut *conn)
    .await?;
    if open == Some((entry.pipeline_id, entry.status_id)) {
        return Ok(None);
    }
    sqlx::query("UPDATE stage_entries SET left_at = $2 WHERE order_id = $1 AND left_at IS NULL")
        .bind(entry.order_id)
        .bind(entry.entered_at)
        .execute(&mut *conn)
        .await?;
    let id = sqlx::query_scalar(
        "INSERT INTO stage_entries (order_id, crm_account, lead_id, pipeline_id, status_id, stage, role,
                                    source, responsible_user_id, entered_at, warn_at, deadline)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
    )
    .bind(entry.order_id)
    .bind(&entry.crm_account)
    .bind(entry.lead_id)
    .bind(entry.pipeline_id)
    .bind(entry.status_id)
    .bind(&entry.stage)
    .bind(&entry.role)
    .bind(entry.source)
    .bind(entry.responsible_user_id)
    .bind(entry.entered_at)
    .bind(entry.warn_at)
    .bind(entry.deadline)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some(id))
}

/// A warning or breach that came due.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub entry_id: i64,
    /// `warning` or `breach`.
    pub kind: String,
    pub order_id: i64,
    pub crm_account: String,
    pub lead_id: i64,
    pub stage: String,
    pub responsible_user_id: Option<i64>,
    pub entered_at: DateTime<Utc>,
    pub deadline: Option<DateTime<Utc>>,
    pub code: String,
    pub marketplace: String,
}

/// Flags up to `limit` timers due at `now` as fired and returns them, in the
/// caller's transaction (which queues their tasks). A stage whose deadline has
/// passed fires its breach only (the warning would come too late).
pub async fn claim_due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Due>, StoreError> {
    let rows = sqlx::query_as(
        "WITH due AS (
             SELECT e.id, CASE WHEN e.deadline <= $1 THEN 'breach' ELSE 'warning' END AS kind
             FROM stage_entries e
             WHERE e.left_at IS NULL
               AND ((e.breached_at IS NULL AND e.deadline <= $1)
                    OR (e.warned_at IS NULL AND e.warn_at <= $1))
             ORDER BY e.id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), fired AS (
             UPDATE stage_entries e
             SET warned_at = COALESCE(e.warned_at, $1),
                 breached_at = CASE WHEN due.kind = 'breach' THEN $1 ELSE e.breached_at END
             FROM due WHERE e.id = due.id
             RETURNING e.id, due.kind, e.order_id, e.crm_account, e.lead_id, e.stage,
                       e.responsible_user_id, e.entered_at, e.deadline
         )
         SELECT f.id AS entry_id, f.kind, f.order_id, f.crm_account, f.lead_id, f.stage,
                f.responsible_user_id, f.entered_at, f.deadline, o.code, o.marketplace
         FROM fired f JOIN orders o ON o.id = f.order_id",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Whether the entry is still the lead's current stage.
pub async fn is_open(pool: &PgPool, entry_id: i64) -> Result<bool, StoreError> {
    let open = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM stage_entries WHERE id = $1 AND left_at IS NULL)",
    )
    .bind(entry_id)
    .fetch_one(pool)
    .await?;
    Ok(open)
}

/// Open stage entries per responsible user of the account (a role's load).
pub async fn open_load(
    pool: &PgPool,
    crm_account: &str,
    users: &[i64],
) -> Result<HashMap<i64, i64>, StoreError> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT responsible_user_id, count(*) FROM stage_entries
         WHERE crm_account = $1 AND left_at IS NULL AND responsible_user_id = ANY($2)
         GROUP BY responsible_user_id",
    )
    .bind(crm_account)
    .bind(users)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Takes the role's next round-robin turn (0 first).
pub async fn next_turn(pool: &PgPool, crm_account: &str, role: &str) -> Result<i64, StoreError> {
    let n: i64 = sqlx::query_scalar(
        // Every order of a role takes the same row: its lock is held only
        // until the commit, which does not wait for the WAL flush (a turn
        // lost in a database crash only repeats a responsible once).
        "INSERT INTO role_turns (crm_account, role, turn)
         SELECT $1, $2, 1 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS relaxed
         ON CONFLICT (crm_account, role) DO UPDATE SET turn = role_turns.turn + 1
         RETURNING turn",
    )
    .bind(crm_account)
    .bind(role)
    .fetch_one(pool)
    .await?;
    Ok(n - 1)
}
