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

/// Inserts or updates many orders' snapshots (a page) in a few statements (lock, write, read back),
/// inside the caller's transaction: a poll writes a page of orders at once.
/// Rows are locked and written in one order (by identity), so two writers
/// of overlapping pages wait for each other instead of deadlocking. An order
/// listed twice is written once, as last listed. `observed_at` is when the
/// snapshots were asked of the marketplace: a stored order observed later
/// than that is newer news and stays as it is. Returns one [`Upserted`] per
/// distinct order written, in the order of `orders`' first appearance (an
/// order left as it is has none).
pub async fn upsert_many(
    tx: &mut Transaction<'_, Postgres>,
    orders: &[(&Order, &str)],
    observed_at: DateTime<Utc>,
) -> Result<Vec<(String, Upserted)>, StoreError> {
    // The last listing of each order wins; keys sorted for the lock order.
    let mut by_key: std::collections::BTreeMap<(&str, &str, &str), (&Order, &str)> =
        Default::default();
    let mut first_seen: Vec<(&str, &str, &str)> = Vec::new();
    for (order, hash) in orders {
        let key = (
            order.marketplace.as_str(),
            order.account.as_str(),
            order.external_id.as_str(),
        );
        if by_key.insert(key, (order, hash)).is_none() {
            first_seen.push(key);
        }
    }
    let mut marketplaces = Vec::with_capacity(by_key.len());
    let mut accounts = Vec::with_capacity(by_key.len());
    let mut ids = Vec::with_capacity(by_key.len());
    let mut codes = Vec::with_capacity(by_key.len());
    let mut statuses = Vec::with_capacity(by_key.len());
    let mut raw_states = Vec::with_capacity(by_key.len());
    let mut raw_statuses = Vec::with_capacity(by_key.len());
    let mut terminal = Vec::with_capacity(by_key.len());
    let mut hashes = Vec::with_capacity(by_key.len());
    let mut snapshots = Vec::with_capacity(by_key.len());
    let mut created = Vec::with_capacity(by_key.len());
    for ((marketplace, account, external_id), (order, hash)) in &by_key {
        marketplaces.push(*marketplace);
        accounts.push(*account);
        ids.push(*external_id);
        codes.push(order.code.as_str());
        statuses.push(order.status.as_str());
        raw_states.push(order.raw_state.as_deref());
        raw_statuses.push(order.raw_status.as_deref());
        terminal.push(order.is_terminal);
        hashes.push(*hash);
        snapshots.push(
            serde_json::to_value(order)
                .map_err(|e| StoreError::Query(sqlx::Error::Encode(Box::new(e))))?,
        );
        created.push(order.created_at);
    }
    let previous: Vec<(String, String, String, i64, String)> = sqlx::query_as(
        "SELECT o.marketplace, o.account, o.external_id, o.id, o.status_key FROM orders o
         JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(m, a, e)
           ON o.marketplace = k.m AND o.account = k.a AND o.external_id = k.e
         ORDER BY o.marketplace, o.account, o.external_id
         FOR UPDATE OF o",
    )
    .bind(&marketplaces)
    .bind(&accounts)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let previous: std::collections::HashMap<(String, String, String), String> = previous
        .into_iter()
        .map(|(m, a, e, _, status)| ((m, a, e), status))
        .collect();
    let written: Vec<(String, String, String, i64)> = sqlx::query_as(
        "INSERT INTO orders (marketplace, account, external_id, code, status_key, raw_state, raw_status,
                             is_terminal, content_hash, snapshot, source_created_at, observed_at)
         SELECT *, $12::timestamptz FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                              $5::text[], $6::text[], $7::text[], $8::bool[], $9::text[],
                              $10::jsonb[], $11::timestamptz[])
         ORDER BY 1, 2, 3
         ON CONFLICT (marketplace, account, external_id) DO UPDATE SET
             code = EXCLUDED.code, status_key = EXCLUDED.status_key, raw_state = EXCLUDED.raw_state,
             raw_status = EXCLUDED.raw_status, is_terminal = EXCLUDED.is_terminal,
             content_hash = EXCLUDED.content_hash, snapshot = EXCLUDED.snapshot, updated_at = now(),
             observed_at = EXCLUDED.observed_at
         WHERE orders.observed_at IS NULL OR orders.observed_at <= EXCLUDED.observed_at
         RETURNING marketplace, account, external_id, id",
    )
    .bind(&marketplaces)
    .bind(&accounts)
    .bind(&ids)
    .bind(&codes)
    .bind(&statuses)
    .bind(&raw_states)
    .bind(&raw_statuses)
    .bind(&terminal)
    .bind(&hashes)
    .bind(&snapshots)
    .bind(&created)
    .bind(observed_at)
    .fetch_all(&mut **tx)
    .await?;
    let row_ids: std::collections::HashMap<(String, String, String), i64> = written
        .into_iter()
        .map(|(m, a, e, id)| ((m, a, e), id))
        .collect();
    let mut out = Vec::with_capacity(first_seen.len());
    for (marketplace, account, external_id) in first_seen {
        let key = (
            marketplace.to_string(),
            account.to_string(),
            external_id.to_string(),
        );
        let Some(id) = row_ids.get(&key).copied() else {
            // Stored from a later reading: left as it is.
            continue;
        };
        let previous_status = previous.get(&key).cloned();
        out.push((
            external_id.to_string(),
            Upserted {
                id,
                inserted: previous_status.is_none(),
                previous_status,
            },
        ));
    }
    Ok(out)
}

/// Records many stage changes (order id, previous key, the order) inside the
/// caller's transaction, in one statement.
pub async fn add_history_many(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[(i64, Option<&str>, &Order)],
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = changes.iter().map(|c| c.0).collect();
    let from: Vec<Option<&str>> = changes.iter().map(|c| c.1).collect();
    let to: Vec<&str> = changes.iter().map(|c| c.2.status.as_str()).collect();
    let raw_state: Vec<Option<&str>> = changes.iter().map(|c| c.2.raw_state.as_deref()).collect();
    let raw_status: Vec<Option<&str>> = changes.iter().map(|c| c.2.raw_status.as_deref()).collect();
    sqlx::query(
        "INSERT INTO order_stage_history (order_id, from_key, to_key, raw_state, raw_status)
         SELECT i, f, t, rs, rst
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
              WITH ORDINALITY AS h(i, f, t, rs, rst, n)
         ORDER BY n",
    )
    .bind(&ids)
    .bind(&from)
    .bind(&to)
    .bind(&raw_state)
    .bind(&raw_status)
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

/// An order's stored snapshot, by its row id.
pub async fn snapshot_by_id(pool: &PgPool, id: i64) -> Result<Option<Order>, StoreError> {
    let value: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT snapshot FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

/// Orders inserted by this process since it last analyzed the tables they
/// grow, and how many it had inserted by then.
static GROWTH: std::sync::Mutex<(u64, u64)> = std::sync::Mutex::new((0, 0));

/// Counts `inserted` new orders; once they have doubled what was there at
/// the last analysis (at least 1,000), re-analyzes `orders` and
/// `outbox_jobs`. A first import of thousands of orders otherwise runs on
/// plans made for an empty table (a lookup by id scanning a whole shop's
/// orders by its code index) until autovacuum gets to them. Failing to
/// analyze is logged, not an error.
pub async fn note_growth(pool: &PgPool, inserted: u64) {
    let due = {
        let mut growth = GROWTH.lock().unwrap_or_else(|p| p.into_inner());
        growth.0 += inserted;
        if growth.0 >= growth.1.max(1_000) {
            growth.1 += growth.0;
            growth.0 = 0;
            true
        } else {
            false
        }
    };
    if due {
        let started = std::time::Instant::now();
        match sqlx::query("ANALYZE orders, outbox_jobs")
            .execute(pool)
            .await
        {
            Ok(_) => tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Many new orders: the planner's statistics of orders and jobs were refreshed."
            ),
            Err(error) => {
                tracing::warn!(%error, "Could not refresh the statistics of orders and jobs.")
            }
        }
    }
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
