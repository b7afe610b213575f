//! SQL of the KPIs a manager watches, set-based over the orders, their
//! marketplace status history and the stage entries, per marketplace and
//! shop (and over all of them): confirmation and full-cycle times, SLA
//! compliance per stage, cancellations and their reasons, orders nobody is
//! responsible for now, and the sync's health.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// Status keys that mean "confirmed by the seller" (the first one reached
/// counts, so an order that skips a stage is confirmed too), "completed" and
/// "cancelled", for Kaspi and Avito.
pub const CONFIRMED_KEYS: &[&str] = &[
    "accepted",
    "preorder_accepted",
    "assembled",
    "handed_to_courier",
    "completed",
    "ready_to_ship",
    "in_transit",
    "delivered",
    "closed",
];
pub const COMPLETED_KEYS: &[&str] = &["completed", "closed"];
pub const CANCELLED_KEYS: &[&str] = &["cancelled", "canceled", "cancelling"];

/// The order figures of one marketplace and shop (`None` both: all).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct OrderFigures {
    pub marketplace: Option<String>,
    pub shop: Option<String>,
    pub orders: i64,
    pub confirmed: i64,
    pub confirmation_p50_s: Option<f64>,
    pub confirmation_p90_s: Option<f64>,
    pub completed: i64,
    pub full_cycle_p50_s: Option<f64>,
    pub full_cycle_p90_s: Option<f64>,
    pub cancelled: i64,
    /// Orders in the range that have a lead, and the time to it.
    pub with_lead: i64,
    pub lead_lag_p50_s: Option<f64>,
    pub lead_lag_p90_s: Option<f64>,
}

/// Orders first seen in `[from, to)` (of `shop`, or all).
pub async fn order_figures(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    shop: Option<&str>,
) -> Result<Vec<OrderFigures>, StoreError> {
    let rows = sqlx::query_as(
        "WITH r AS (
             SELECT o.id, o.marketplace, o.account, o.first_seen_at, o.status_key
             FROM orders o
             WHERE o.first_seen_at >= $1 AND o.first_seen_at < $2 AND ($3::text IS NULL OR o.account = $3)
         ), h AS (
             SELECT h.order_id,
                    min(h.observed_at) FILTER (WHERE h.to_key = ANY($4)) AS confirmed_at,
                    min(h.observed_at) FILTER (WHERE h.to_key = ANY($5)) AS completed_at
             FROM order_stage_history h JOIN r ON r.id = h.order_id
             GROUP BY h.order_id
         ), o AS (
             SELECT r.*, h.confirmed_at, h.completed_at, l.created_at AS lead_at
             FROM r LEFT JOIN h ON h.order_id = r.id LEFT JOIN crm_links l ON l.order_id = r.id
         )
         SELECT marketplace, account AS shop, count(*) AS orders,
                count(confirmed_at) AS confirmed,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM confirmed_at - first_seen_at)::float8) AS confirmation_p50_s,
                percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM confirmed_at - first_seen_at)::float8) AS confirmation_p90_s,
                count(completed_at) AS completed,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - first_seen_at)::float8) AS full_cycle_p50_s,
                percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM completed_at - first_seen_at)::float8) AS full_cycle_p90_s,
                count(*) FILTER (WHERE status_key = ANY($6)) AS cancelled,
                count(lead_at) AS with_lead,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM lead_at - first_seen_at)::float8) AS lead_lag_p50_s,
                percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM lead_at - first_seen_at)::float8) AS lead_lag_p90_s
         FROM o
         GROUP BY GROUPING SETS ((marketplace, account), ())
         ORDER BY marketplace NULLS FIRST, account NULLS FIRST",
    )
    .bind(from)
    .bind(to)
    .bind(shop)
    .bind(CONFIRMED_KEYS)
    .bind(COMPLETED_KEYS)
    .bind(CANCELLED_KEYS)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// SLA compliance of one stage (`None`: all stages).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct StageCompliance {
    pub stage: Option<String>,
    /// Entries left by their deadline.
    pub within: i64,
    /// Entries left after it, or still in the stage past it.
    pub breached: i64,
}

/// Stage entries with an SLA entered in `[from, to)`, judged at `now`.
pub async fn sla_compliance(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    shop: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<StageCompliance>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT e.stage,
                count(*) FILTER (WHERE e.left_at IS NOT NULL AND e.left_at <= e.deadline) AS within,
                count(*) FILTER (WHERE (e.left_at IS NOT NULL AND e.left_at > e.deadline)
                                    OR (e.left_at IS NULL AND e.deadline < $4)) AS breached
         FROM stage_entries e JOIN orders o ON o.id = e.order_id
         WHERE e.deadline IS NOT NULL AND e.entered_at >= $1 AND e.entered_at < $2
           AND ($3::text IS NULL OR o.account = $3)
         GROUP BY GROUPING SETS ((e.stage), ())
         ORDER BY e.stage NULLS FIRST",
    )
    .bind(from)
    .bind(to)
    .bind(shop)
    .bind(now)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Cancelled orders of the range by reason (`None`: no reason given).
pub async fn cancellation_reasons(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    shop: Option<&str>,
) -> Result<Vec<(Option<String>, i64)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT snapshot->>'cancellation_reason' AS reason, count(*)
         FROM orders
         WHERE first_seen_at >= $1 AND first_seen_at < $2 AND ($3::text IS NULL OR account = $3)
           AND status_key = ANY($4)
         GROUP BY 1 ORDER BY 2 DESC, 1",
    )
    .bind(from)
    .bind(to)
    .bind(shop)
    .bind(CANCELLED_KEYS)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The sync's health now.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct Health {
    /// Open stage entries of a role with nobody responsible.
    pub unassigned_now: i64,
    pub jobs_pending: i64,
    /// Pending jobs that failed before.
    pub jobs_retrying: i64,
    pub jobs_dead: i64,
    /// Attempts of the range that met a 429.
    pub throttled_attempts: i64,
    pub open_circuits: i64,
}

pub async fn health(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    shop: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Health, StoreError> {
    let row = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM stage_entries e JOIN orders o ON o.id = e.order_id
             WHERE e.left_at IS NULL AND e.role IS NOT NULL AND e.responsible_user_id IS NULL
               AND ($3::text IS NULL OR o.account = $3)) AS unassigned_now,
           (SELECT count(*) FROM outbox_jobs WHERE state IN ('pending', 'running')) AS jobs_pending,
           (SELECT count(*) FROM outbox_jobs WHERE state = 'pending' AND failures > 0) AS jobs_retrying,
           (SELECT count(*) FROM outbox_jobs WHERE state = 'dead') AS jobs_dead,
           (SELECT count(*) FROM outbox_attempts WHERE finished_at >= $1 AND finished_at < $2
              AND error LIKE '%429%') AS throttled_attempts,
           (SELECT count(*) FROM circuits WHERE open_until > $4) AS open_circuits",
    )
    .bind(from)
    .bind(to)
    .bind(shop)
    .bind(now)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// Each shop's last successful poll, and its last error.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct ShopPoll {
    pub marketplace: String,
    pub shop: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

pub async fn shop_polls(pool: &PgPool, shop: Option<&str>) -> Result<Vec<ShopPoll>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT marketplace, account AS shop, last_success_at, last_error FROM poll_cursors
         WHERE marketplace IN ('kaspi', 'avito') AND ($1::text IS NULL OR account = $1)
         ORDER BY marketplace, account",
    )
    .bind(shop)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Orders first seen and SLA breaches, per hour of the last 24 h (oldest
/// first, 24 rows, zeros included).
pub async fn hourly(
    pool: &PgPool,
    now: DateTime<Utc>,
) -> Result<Vec<(DateTime<Utc>, i64, i64)>, StoreError> {
    let rows = sqlx::query_as(
        "WITH hours AS (
             SELECT generate_series(date_trunc('hour', $1::timestamptz) - interval '23 hours',
                                    date_trunc('hour', $1::timestamptz), interval '1 hour') AS hour
         )
         SELECT h.hour,
                (SELECT count(*) FROM orders o
                  WHERE o.first_seen_at >= h.hour AND o.first_seen_at < h.hour + interval '1 hour'),
                (SELECT count(*) FROM stage_entries e
                  WHERE e.breached_at >= h.hour AND e.breached_at < h.hour + interval '1 hour')
         FROM hours h ORDER BY h.hour",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// An order at risk: its current stage's deadline, nearest first.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct AtRisk {
    pub code: String,
    pub marketplace: String,
    pub shop: String,
    pub stage: String,
    pub crm_account: String,
    pub lead_id: i64,
    pub responsible_user_id: Option<i64>,
    pub deadline: DateTime<Utc>,
}

pub async fn at_risk(pool: &PgPool, limit: i64) -> Result<Vec<AtRisk>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT o.code, o.marketplace, o.account AS shop, e.stage, e.crm_account, e.lead_id,
                e.responsible_user_id, e.deadline
         FROM stage_entries e JOIN orders o ON o.id = e.order_id
         WHERE e.left_at IS NULL AND e.deadline IS NOT NULL
         ORDER BY e.deadline LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The newest failed attempts: (when, kind, outcome, error).
pub async fn recent_errors(
    pool: &PgPool,
    limit: i64,
) -> Result<Vec<(DateTime<Utc>, String, String, Option<String>)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT finished_at, kind, outcome, error FROM outbox_attempts
         WHERE outcome IN ('retry', 'dead', 'lease_expired')
         ORDER BY finished_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
