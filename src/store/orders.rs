//! SQL of marketplace orders: snapshots with their content hash, stage
//! history, and the pollers' cursors.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;
use crate::domain::Order;

/// What the store knows of an order, for change detection.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Known {
    pub id: i64,
    pub external_id: String,
    pub content_hash: String,
    pub status_key: String,
    pub has_items: bool,
}

/// The stored state of the given orders of one account, by external id.
pub async fn known(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
    external_ids: &[String],
) -> Result<HashMap<String, Known>, StoreError> {
    let rows: Vec<Known> = sqlx::query_as(
        "SELECT id, external_id, content_hash, status_key,
                jsonb_array_length(COALESCE(snapshot->'items', '[]'::jsonb)) > 0 AS has_items
         FROM orders WHERE marketplace = $1 AND account = $2 AND external_id = ANY($3)",
    )
    .bind(marketplace)
    .bind(account)
    .bind(external_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|k| (k.external_id.clone(), k))
        .collect())
}

/// Orders not yet terminal, created before `before` (they have left the list window).
pub async fn active_created_before(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
    before: DateTime<Utc>,
) -> Result<Vec<Known>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT id, external_id, content_hash, status_key,
                jsonb_array_length(COALESCE(snapshot->'items', '[]'::jsonb)) > 0 AS has_items
         FROM orders
         WHERE marketplace = $1 AND account = $2 AND NOT is_terminal AND source_created_at < $3
         ORDER BY source_created_at",
    )
    .bind(marketplace)
    .bind(account)
    .bind(before)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// What an upsert did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upserted {
    pub id: i64,
    pub inserted: bool,
    /// The status key before this write (`None` for a new order).
    pub previous_status: Option<String>,
}

/// Inserts or updates an order's snapshot inside the caller's transaction.
pub async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    order: &Order,
    content_hash: &str,
) -> Result<Upserted, StoreError> {
    let snapshot = serde_json::to_value(order)
        .map_err(|e| StoreError::Query(sqlx::Error::Encode(Box::new(e))))?;
    let previous: Option<(i64, String)> = sqlx::query_as(
        "SELECT id, status_key FROM orders
         WHERE marketplace = $1 AND account = $2 AND external_id = $3 FOR UPDATE",
    )
    .bind(order.marketplace.as_str())
    .bind(&order.account)
    .bind(&order.external_id)
    .fetch_optional(&mut **tx)
    .await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (marketplace, account, external_id, code, status_key, raw_state, raw_status,
                             is_terminal, content_hash, snapshot, source_created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (marketplace, account, external_id) DO UPDATE SET
             code = EXCLUDED.code, status_key = EXCLUDED.status_key, raw_state = EXCLUDED.raw_state,
             raw_status = EXCLUDED.raw_status, is_terminal = EXCLUDED.is_terminal,
             content_hash = EXCLUDED.content_hash, snapshot = EXCLUDED.snapshot, updated_at = now()
         RETURNING id",
    )
    .bind(order.marketplace.as_str())
    .bind(&order.account)
    .bind(&order.external_id)
    .bind(&order.code)
    .bind(order.status.as_str())
    .bind(&order.raw_state)
    .bind(&order.raw_status)
    .bind(order.is_terminal)
    .bind(content_hash)
    .bind(&snapshot)
    .bind(order.created_at)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Upserted {
        id,
        inserted: previous.is_none(),
        previous_status: previous.map(|p| p.1),
    })
}

/// Records a stage change inside the caller's transaction.
pub async fn add_history(
    tx: &mut Transaction<'_, Postgres>,
    order_id: i64,
    from_key: Option<&str>,
    order: &Order,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO order_stage_history (order_id, from_key, to_key, raw_state, raw_status)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind(from_key)
    .bind(order.status.as_str())
    .bind(&order.raw_state)
    .bind(&order.raw_status)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Ingest transactions may skip waiting for the WAL flush: a commit lost in a
/// crash loses the order row and its outbox intent together, and the next poll
/// sees the order as changed again, so nothing is lost.
pub async fn relax_commit(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// An order's stored snapshot.
pub async fn snapshot(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
    external_id: &str,
) -> Result<Option<Order>, StoreError> {
    let value: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT snapshot FROM orders WHERE marketplace = $1 AND account = $2 AND external_id = $3",
    )
    .bind(marketplace)
    .bind(account)
    .bind(external_id)
    .fetch_optional(pool)
    .await?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

/// An order's stage history: (from, to), oldest first.
pub async fn history(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
    external_id: &str,
) -> Result<Vec<(Option<String>, String)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT h.from_key, h.to_key FROM order_stage_history h
         JOIN orders o ON o.id = h.order_id
         WHERE o.marketplace = $1 AND o.account = $2 AND o.external_id = $3
         ORDER BY h.id",
    )
    .bind(marketplace)
    .bind(account)
    .bind(external_id)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// A poller's cursor.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Cursor {
    pub listed_until: Option<DateTime<Utc>>,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

pub async fn cursor(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
) -> Result<Option<Cursor>, StoreError> {
    let row = sqlx::query_as(
        "SELECT listed_until, last_started_at, last_success_at, last_error
         FROM poll_cursors WHERE marketplace = $1 AND account = $2",
    )
    .bind(marketplace)
    .bind(account)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Records the start of a poll.
pub async fn poll_started(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO poll_cursors (marketplace, account, last_started_at) VALUES ($1, $2, now())
         ON CONFLICT (marketplace, account) DO UPDATE SET last_started_at = now()",
    )
    .bind(marketplace)
    .bind(account)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a poll that listed everything up to `listed_until`.
pub async fn poll_succeeded(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
    listed_until: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE poll_cursors SET listed_until = $3, last_success_at = now(), last_error = NULL
         WHERE marketplace = $1 AND account = $2",
    )
    .bind(marketplace)
    .bind(account)
    .bind(listed_until)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a poll that failed part-way (what it saw is committed; the cursor stays).
pub async fn poll_failed(
    pool: &PgPool,
    marketplace: &str,
    account: &str,
    error: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE poll_cursors SET last_error = $3 WHERE marketplace = $1 AND account = $2")
        .bind(marketplace)
        .bind(account)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}
