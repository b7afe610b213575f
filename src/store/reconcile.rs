//! SQL of reconciliation: the runs (what each covers, its progress and
//! summary), the stored orders of a range with their links, and the facts that
//! explain a lead's stage without a repair (unfinished jobs of the order, a
//! Kaspi completion waiting for its code, unprocessed CRM changes of the lead).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// A run as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Run {
    pub id: i64,
    pub crm_account: String,
    pub shop: Option<String>,
    pub since: DateTime<Utc>,
    pub dry_run: bool,
    pub origin: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub phase: Option<String>,
    pub done: i64,
    pub total: Option<i64>,
    pub summary: Option<serde_json::Value>,
    pub cancel_requested: bool,
}

const RUN_COLUMNS: &str = "id, crm_account, shop, since, dry_run, origin, started_at, finished_at, phase, done, total, summary, cancel_requested";

/// Records a requested run; its id goes into the job that carries it out.
pub async fn create_run(
    conn: &mut sqlx::PgConnection,
    crm_account: &str,
    shop: Option<&str>,
    since: DateTime<Utc>,
    dry_run: bool,
    origin: &str,
) -> Result<i64, StoreError> {
    let id = sqlx::query_scalar(
        "INSERT INTO reconcile_runs (crm_account, shop, since, dry_run, origin)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(crm_account)
    .bind(shop)
    .bind(since)
    .bind(dry_run)
    .bind(origin)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

pub async fn run(pool: &PgPool, id: i64) -> Result<Option<Run>, StoreError> {
    let row = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM reconcile_runs WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

pub async fn mark_started(pool: &PgPool, id: i64) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE reconcile_runs SET started_at = now(), done = 0, total = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn set_progress(
    pool: &PgPool,
    id: i64,
    phase: &str,
    done: u64,
    total: Option<u64>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE reconcile_runs SET phase = $2, done = $3, total = $4 WHERE id = $1")
        .bind(id)
        .bind(phase)
        .bind(done as i64)
        .bind(total.map(|t| t as i64))
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn finish(pool: &PgPool, id: i64, summary: &serde_json::Value) -> Result<(), StoreError> {
    sqlx::query("UPDATE reconcile_runs SET finished_at = now(), summary = $2 WHERE id = $1")
        .bind(id)
        .bind(summary)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn request_cancel(pool: &PgPool, id: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE reconcile_runs SET cancel_requested = true WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// When the newest finished, non-dry run of the account (over all its shops)
/// started: the next periodic run reaches back at least to it.
pub async fn last_complete_start(
    pool: &PgPool,
    crm_account: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let at = sqlx::query_scalar(
        "SELECT max(started_at) FROM reconcile_runs
         WHERE crm_account = $1 AND shop IS NULL AND NOT dry_run AND finished_at IS NOT NULL",
    )
    .bind(crm_account)
    .fetch_one(pool)
    .await?;
    Ok(at)
}

/// A periodic run of the account requested within `within` that has not
/// finished, or one that finished that recently: the periodic trigger then
/// waits. (A run that never finished, e.g. dead-lettered, stops blocking
/// once it is older than `within`.)
pub async fn recent_run(
    pool: &PgPool,
    crm_account: &str,
    within: std::time::Duration,
) -> Result<bool, StoreError> {
    let found = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM reconcile_runs
                        WHERE crm_account = $1 AND origin = 'periodic'
                          AND ((finished_at IS NULL AND requested_at > now() - $2)
                               OR finished_at > now() - $2))",
    )
    .bind(crm_account)
    .bind(within)
    .fetch_one(pool)
    .await?;
    Ok(found)
}

/// A live replica holds this outbox target: a daemon serves it.
pub async fn target_served(pool: &PgPool, target: &str) -> Result<bool, StoreError> {
    let served = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox_target_leases l
                        JOIN outbox_replicas r ON r.owner = l.owner
                        WHERE l.target = $1 AND l.expires_at > now()
                          AND r.last_seen > now() - interval '30 seconds')",
    )
    .bind(target)
    .fetch_one(pool)
    .await?;
    Ok(served)
}

/// A stored order of a reconciled range, with its lead (a lead found in
/// another stage is judged against its link as read then, not here).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredOrder {
    pub order_id: i64,
    pub marketplace: String,
    pub account: String,
    pub external_id: String,
    pub code: String,
    pub status_key: String,
    pub is_terminal: bool,
    pub lead_id: Option<i64>,
}

/// The stored orders of `shops` created at or after `since`, and those older
/// that are still active.
pub async fn orders_in_range(
    pool: &PgPool,
    shops: &[String],
    since: DateTime<Utc>,
) -> Result<Vec<StoredOrder>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT o.id AS order_id, o.marketplace, o.account, o.external_id, o.code, o.status_key,
                o.is_terminal, l.lead_id
         FROM orders o LEFT JOIN crm_links l ON l.order_id = o.id
         WHERE o.account = ANY($1) AND (o.source_created_at >= $2 OR NOT o.is_terminal)
         ORDER BY o.source_created_at, o.id",
    )
    .bind(shops)
    .bind(since)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// What explains a lead's stage without a repair, for a set of orders.
#[derive(Debug, Default)]
pub struct Explanations {
    /// Ordering keys with a pending or running job (a sync or an action on its way).
    pub busy_keys: HashSet<String>,
    /// Orders whose Kaspi completion waits for the buyer's code.
    pub awaiting_code: HashSet<i64>,
    /// Leads with CRM changes not processed yet.
    pub unprocessed_leads: HashSet<i64>,
}

pub async fn explanations(
    pool: &PgPool,
    crm_account: &str,
    ordering_keys: &[String],
    order_ids: &[i64],
) -> Result<Explanations, StoreError> {
    let busy: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT ordering_key FROM outbox_jobs
         WHERE ordering_key = ANY($1) AND state IN ('pending', 'running')",
    )
    .bind(ordering_keys)
    .fetch_all(pool)
    .await?;
    let awaiting: Vec<i64> = sqlx::query_scalar(
        "SELECT order_id FROM crm_links WHERE order_id = ANY($1) AND awaiting_code_since IS NOT NULL",
    )
    .bind(order_ids)
    .fetch_all(pool)
    .await?;
    let unprocessed: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT (payload->>'lead_id')::bigint FROM inbox
         WHERE processed_at IS NULL AND source = 'amocrm' AND account = $1
           AND payload ? 'lead_id'",
    )
    .bind(crm_account)
    .fetch_all(pool)
    .await?;
    Ok(Explanations {
        busy_keys: busy.into_iter().collect(),
        awaiting_code: awaiting.into_iter().collect(),
        unprocessed_leads: unprocessed.into_iter().collect(),
    })
}

/// Forgets the link of an order whose lead was deleted in the CRM (its
/// recreation is enqueued in the same transaction).
pub async fn drop_link(conn: &mut sqlx::PgConnection, order_id: i64) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM crm_links WHERE order_id = $1")
        .bind(order_id)
        .execute(conn)
        .await?;
    Ok(())
}
