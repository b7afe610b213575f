//! SQL of the inbox: what arrived from outside (webhooks, polled events),
//! deduplicated and stored before anything acts on it.

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sqlx::PgPool;

use super::StoreError;

/// One received item.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInboxItem {
    pub source: String,
    pub account: String,
    pub kind: String,
    pub dedupe_key: String,
    pub payload: Json,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InboxRow {
    pub id: i64,
    pub source: String,
    pub account: String,
    pub kind: String,
    pub dedupe_key: String,
    pub payload: Json,
    pub received_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
}

/// How many items of a source ended with each outcome (tests, diagnostics).
pub async fn outcomes(pool: &PgPool, source: &str) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT COALESCE(outcome, '') AS outcome, count(*) FROM inbox
         WHERE source = $1 AND processed_at IS NOT NULL GROUP BY 1 ORDER BY 1",
    )
    .bind(source)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Stores items in one statement; duplicates (by dedupe key) are skipped.
/// Returns how many were new.
pub async fn insert(pool: &PgPool, items: &[NewInboxItem]) -> Result<u64, StoreError> {
    if items.is_empty() {
        return Ok(0);
    }
    let sources: Vec<&str> = items.iter().map(|i| i.source.as_str()).collect();
    let accounts: Vec<&str> = items.iter().map(|i| i.account.as_str()).collect();
    let kinds: Vec<&str> = items.iter().map(|i| i.kind.as_str()).collect();
    let keys: Vec<&str> = items.iter().map(|i| i.dedupe_key.as_str()).collect();
    let payloads: Vec<&Json> = items.iter().map(|i| &i.payload).collect();
    let result = sqlx::query(
        "INSERT INTO inbox (source, account, kind, dedupe_key, payload)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
         ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(&sources)
    .bind(&accounts)
    .bind(&kinds)
    .bind(&keys)
    .bind(&payloads)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Unprocessed items of a source, oldest first.
pub async fn unprocessed(
    pool: &PgPool,
    source: &str,
    limit: i64,
) -> Result<Vec<InboxRow>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT id, source, account, kind, dedupe_key, payload, received_at, processed_at
         FROM inbox WHERE processed_at IS NULL AND source = $1 ORDER BY id LIMIT $2",
    )
    .bind(source)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Claims up to `limit` unprocessed items of a source, oldest first, for the
/// caller's transaction: they stay locked (other replicas skip them) until it
/// ends, and the claimer marks them processed in it.
pub async fn claim_unprocessed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    source: &str,
    limit: i64,
) -> Result<Vec<InboxRow>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT id, source, account, kind, dedupe_key, payload, received_at, processed_at
         FROM inbox WHERE processed_at IS NULL AND source = $1 ORDER BY id LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(source)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// Whether a change judged with `outcome` (set aside as of a lead no order
/// was linked to) within the last day reported the lead in stage `status_id`.
pub async fn has_outcome_at_stage(
    pool: &PgPool,
    account: &str,
    outcome: &str,
    status_id: i64,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM inbox
                         WHERE source = 'amocrm' AND account = $1 AND outcome = $2
                           AND received_at > now() - interval '1 day'
                           AND payload->>'status_id' = $3::bigint::text)",
    )
    .bind(account)
    .bind(outcome)
    .bind(status_id)
    .fetch_one(pool)
    .await?)
}

/// Makes the changes judged with `outcome` within the last day unprocessed
/// again, to be judged anew (the lead they were set aside for is linked now);
/// returns how many.
pub async fn reopen_with_outcome(
    conn: &mut sqlx::PgConnection,
    account: &str,
    outcome: &str,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE inbox SET processed_at = NULL, outcome = NULL
          WHERE source = 'amocrm' AND account = $1 AND outcome = $2
            AND received_at > now() - interval '1 day'",
    )
    .bind(account)
    .bind(outcome)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Marks an item processed.
pub async fn mark_processed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: i64,
) -> Result<(), StoreError> {
    mark_processed_as(tx, id, None).await
}

/// Marks an item processed, saying what it led to (`action`, `echo`,
/// `duplicate`, `stale`, `ignored: <reason>`).
pub async fn mark_processed_as(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: i64,
    outcome: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE inbox SET processed_at = now(), outcome = $2 WHERE id = $1")
        .bind(id)
        .bind(outcome)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Records that a messenger chat became a lead; `false` when it already had.
pub async fn claim_avito_chat(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    account: &str,
    chat_id: &str,
    item_id: Option<i64>,
    buyer_id: Option<i64>,
    first_message_id: &str,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO avito_chats (account, chat_id, item_id, buyer_id, first_message_id)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(account)
    .bind(chat_id)
    .bind(item_id)
    .bind(buyer_id)
    .bind(first_message_id)
    .execute(&mut **tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The CRM lead a messenger chat became, once it has one.
pub async fn chat_lead(
    pool: &PgPool,
    account: &str,
    chat_id: &str,
) -> Result<Option<i64>, StoreError> {
    let lead: Option<Option<i64>> =
        sqlx::query_scalar("SELECT lead_id FROM avito_chats WHERE account = $1 AND chat_id = $2")
            .bind(account)
            .bind(chat_id)
            .fetch_optional(pool)
            .await?;
    Ok(lead.flatten())
}

/// Records the lead (and contact) a messenger chat became.
pub async fn set_chat_lead(
    pool: &PgPool,
    account: &str,
    chat_id: &str,
    crm_account: &str,
    lead_id: i64,
    contact_id: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE avito_chats SET crm_account = $3, lead_id = $4, contact_id = $5
         WHERE account = $1 AND chat_id = $2",
    )
    .bind(account)
    .bind(chat_id)
    .bind(crm_account)
    .bind(lead_id)
    .bind(contact_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// The CRM contact an Avito buyer already has from another chat.
pub async fn buyer_contact(
    pool: &PgPool,
    account: &str,
    buyer_id: i64,
) -> Result<Option<i64>, StoreError> {
    let id = sqlx::query_scalar(
        "SELECT contact_id FROM avito_chats
         WHERE account = $1 AND buyer_id = $2 AND contact_id IS NOT NULL
         ORDER BY created_at LIMIT 1",
    )
    .bind(account)
    .bind(buyer_id)
    .fetch_optional(pool)
    .await?;
    Ok(id)
}
