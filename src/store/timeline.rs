//! SQL of an order's timeline: the bridge's own events (`order_events`), and
//! the reads `orderbridge order show` assembles from the order's snapshot,
//! stage history, outbox jobs and attempts, the inbox items and pushes of its
//! lead.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// Records what the bridge did for an order. Best-effort: the effect has
/// happened, so a failure here is logged, never a reason to do it again.
pub async fn record(pool: &PgPool, order_id: i64, kind: &str, detail: &str) {
    let written =
        sqlx::query("INSERT INTO order_events (order_id, kind, detail) VALUES ($1, $2, $3)")
            .bind(order_id)
            .bind(kind)
            .bind(detail)
            .execute(pool)
            .await;
    if let Err(error) = written {
        tracing::warn!(order_id, kind, %error, "Could not add to the order's timeline.");
    }
}

/// An order found by its code.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Found {
    pub id: i64,
    pub marketplace: String,
    pub account: String,
    pub external_id: String,
    pub code: String,
    pub status_key: String,
    pub is_terminal: bool,
    pub source_created_at: DateTime<Utc>,
    pub first_seen_at: DateTime<Utc>,
    pub crm_account: Option<String>,
    pub lead_id: Option<i64>,
    pub contact_id: Option<i64>,
}

pub async fn find_by_code(
    pool: &PgPool,
    code: &str,
    shop: Option<&str>,
) -> Result<Vec<Found>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT o.id, o.marketplace, o.account, o.external_id, o.code, o.status_key, o.is_terminal,
                o.source_created_at, o.first_seen_at, l.crm_account, l.lead_id, l.contact_id
         FROM orders o LEFT JOIN crm_links l ON l.order_id = o.id
         WHERE o.code = $1 AND ($2::text IS NULL OR o.account = $2)
         ORDER BY o.account",
    )
    .bind(code)
    .bind(shop)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// One line of a timeline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Entry {
    pub at: DateTime<Utc>,
    /// Where it happened: `marketplace`, `bridge`, `outbox`, `crm`.
    pub source: String,
    pub what: String,
    pub detail: String,
}

/// Everything stored about an order, oldest first.
pub async fn entries(
    pool: &PgPool,
    order: &Found,
    ordering_key: &str,
) -> Result<Vec<Entry>, StoreError> {
    let mut entries: Vec<Entry> = sqlx::query_as(
        "SELECT observed_at AS at, 'marketplace' AS source, 'status' AS what,
                COALESCE(from_key || ' → ', '') || to_key
                  || COALESCE(' (' || raw_state || '/' || raw_status || ')', '') AS detail
         FROM order_stage_history WHERE order_id = $1
         UNION ALL
         SELECT at, 'bridge', kind, detail FROM order_events WHERE order_id = $1
         UNION ALL
         SELECT finished_at, 'outbox', kind || ' attempt ' || attempt,
                outcome || COALESCE(': ' || error, '')
         FROM outbox_attempts WHERE ordering_key = $2
         UNION ALL
         SELECT updated_at, 'outbox', kind || ' job ' || id,
                state || ' (attempts ' || attempts || ', next ' || to_char(run_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC)'
                  || COALESCE(': ' || last_error, '')
         FROM outbox_jobs WHERE ordering_key = $2",
    )
    .bind(order.id)
    .bind(ordering_key)
    .fetch_all(pool)
    .await?;
    if let (Some(account), Some(lead)) = (&order.crm_account, order.lead_id) {
        let crm: Vec<Entry> = sqlx::query_as(
            "SELECT received_at AS at, 'crm' AS source,
                    kind || CASE WHEN payload->>'via' = 'events' THEN ' (events poll)' ELSE ' (webhook)' END AS what,
                    'stage ' || COALESCE(payload->>'status_id', '?')
                      || COALESCE(' by user ' || (payload->>'modified_user_id'), '')
                      || COALESCE(' → ' || outcome, CASE WHEN processed_at IS NULL THEN ' → not processed yet' ELSE '' END) AS detail
             FROM inbox WHERE source = 'amocrm' AND account = $1 AND (payload->>'lead_id')::bigint = $2
             UNION ALL
             SELECT intended_at, 'bridge', 'stage push',
                    'stage ' || status_id || CASE WHEN echoed_at IS NULL THEN '' ELSE ' (echo seen)' END
             FROM crm_pushes WHERE crm_account = $1 AND lead_id = $2",
        )
        .bind(account)
        .bind(lead)
        .fetch_all(pool)
        .await?;
        entries.extend(crm);
    }
    entries.push(Entry {
        at: order.first_seen_at,
        source: "marketplace".into(),
        what: "seen".into(),
        detail: format!(
            "first seen by the poller (created {} UTC)",
            order.source_created_at.format("%Y-%m-%d %H:%M:%S")
        ),
    });
    entries.sort_by_key(|e| e.at);
    Ok(entries)
}
