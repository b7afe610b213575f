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

/// What the last error of a job put off by `target`'s circuit says (the
/// connector's own words: it met the open circuit, or the 403 that opened it).
pub fn deferred_job_markers(target: &str) -> [String; 2] {
    [
        format!("circuit of {target} is open"),
        format!("traffic to {target} is stopped"),
    ]
}

/// Closes a target's circuit (operator reset, or a call that succeeded after
/// the cool-down) and, in the same transaction, makes due now the jobs the
/// circuit put off (they were scheduled for the end of its cool-down, up to
/// 30 min away; found by `orderbridge prove api-faults`). Whether a circuit
/// was open, and how many jobs were woken.
pub async fn close(pool: &PgPool, target: &str) -> Result<(bool, u64), StoreError> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("DELETE FROM circuits WHERE target = $1")
        .bind(target)
        .execute(&mut *tx)
        .await?;
    let woken = wake_deferred(&mut *tx, target).await?;
    tx.commit().await?;
    Ok((deleted.rows_affected() > 0, woken))
}

/// Makes due now the pending jobs `target`'s circuit put off; how many.
/// Also run by a process that finds the circuit it had cached as open gone
/// (reset by an operator or closed by another replica): jobs it deferred
/// after the reset, on its cached state, must not wait out the cool-down.
pub async fn wake_deferred<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    target: &str,
) -> Result<u64, StoreError> {
    let [met_circuit, met_block] = deferred_job_markers(target);
    let woken = sqlx::query(
        "UPDATE outbox_jobs SET run_at = NULL, updated_at = now()
         WHERE target = $1 AND state = 'pending' AND run_at > now()
           AND (strpos(last_error, $2) > 0 OR strpos(last_error, $3) > 0)",
    )
    .bind(target)
    .bind(met_circuit)
    .bind(met_block)
    .execute(executor)
    .await?;
    Ok(woken.rows_affected())
}
