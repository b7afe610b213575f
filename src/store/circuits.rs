//! SQL of circuit breakers: an open circuit stops all traffic to a target until
//! its cool-down passes or an operator resets it (deletes the row).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenCircuit {
    pub target: String,
    pub opened_at: DateTime<Utc>,
    pub open_until: DateTime<Utc>,
    pub reason: String,
}

/// Opens (or extends) a target's circuit.
pub async fn open(
    pool: &PgPool,
    target: &str,
    until: DateTime<Utc>,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO circuits (target, open_until, reason) VALUES ($1, $2, $3)
         ON CONFLICT (target) DO UPDATE SET open_until = EXCLUDED.open_until, reason = EXCLUDED.reason",
    )
    .bind(target)
    .bind(until)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// The circuit of a target, if one is open (whatever its cool-down says).
pub async fn get(pool: &PgPool, target: &str) -> Result<Option<OpenCircuit>, StoreError> {
    let row = sqlx::query_as(
        "SELECT target, opened_at, open_until, reason FROM circuits WHERE target = $1",
    )
    .bind(target)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Circuits whose cool-down has not passed at `now`.
pub async fn list_open(pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<OpenCircuit>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT target, opened_at, open_until, reason FROM circuits WHERE open_until > $1 ORDER BY target",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Closes a target's circuit (operator reset, or a call that succeeded after the cool-down).
pub async fn close(pool: &PgPool, target: &str) -> Result<bool, StoreError> {
    let deleted = sqlx::query("DELETE FROM circuits WHERE target = $1")
        .bind(target)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() > 0)
}
