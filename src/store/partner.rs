//! SQL of partner leads (`partner_leads`), the status reports owed to the
//! partner (`partner_reports`, kept with the partner's answers for the weekly
//! settlement) and the partner sources' poll cursors (`partner_cursors`).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::StoreError;

/// A partner lead as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredPartnerLead {
    pub id: i64,
    pub source: String,
    pub partner_lead_id: String,
    pub crm_account: String,
    /// The lead as read through the source's field map (`PartnerLead`).
    pub fields: serde_json::Value,
    pub lead_id: Option<i64>,
    pub contact_id: Option<i64>,
    pub status_id: Option<i64>,
    pub changed_at: Option<i64>,
}

const LEAD_COLUMNS: &str =
    "id, source, partner_lead_id, crm_account, fields, lead_id, contact_id, status_id, changed_at";

/// A new partner lead.
pub struct NewPartnerLead<'a> {
    pub source: &'a str,
    pub partner_lead_id: &'a str,
    pub crm_account: &'a str,
    pub payload: &'a serde_json::Value,
    pub fields: &'a serde_json::Value,
    pub buyout_price: Option<f64>,
    pub client_price: Option<f64>,
}

/// Stores a lead unless the source already has one with its id: `Some(row id)`
/// for a new lead, `None` for a repeat.
pub async fn insert_lead(
    conn: &mut PgConnection,
    lead: &NewPartnerLead<'_>,
) -> Result<Option<i64>, StoreError> {
    let id = sqlx::query_scalar(
        "INSERT INTO partner_leads (source, partner_lead_id, crm_account, payload, fields, buyout_price, client_price)
         VALUES ($1, $2, $3, $4, $5, $6::float8::numeric, $7::float8::numeric)
         ON CONFLICT (source, partner_lead_id) DO NOTHING
         RETURNING id",
    )
    .bind(lead.source)
    .bind(lead.partner_lead_id)
    .bind(lead.crm_account)
    .bind(lead.payload)
    .bind(lead.fields)
    .bind(lead.buyout_price)
    .bind(lead.client_price)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(id)
}

pub async fn lead(pool: &PgPool, id: i64) -> Result<Option<StoredPartnerLead>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {LEAD_COLUMNS} FROM partner_leads WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The partner lead behind a CRM lead, locked for the caller's transaction
/// (changes of one lead are judged one after another, across replicas).
pub async fn by_crm_lead_locked(
    conn: &mut PgConnection,
    crm_account: &str,
    lead_id: i64,
) -> Result<Option<StoredPartnerLead>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {LEAD_COLUMNS} FROM partner_leads WHERE crm_account = $1 AND lead_id = $2 FOR UPDATE"
    ))
    .bind(crm_account)
    .bind(lead_id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Records the CRM lead a partner lead became, in its intake stage.
pub async fn set_crm_lead(
    conn: &mut PgConnection,
    id: i64,
    lead_id: i64,
    contact_id: Option<i64>,
    status_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE partner_leads SET lead_id = $2, contact_id = $3, status_id = $4 WHERE id = $1",
    )
    .bind(id)
    .bind(lead_id)
    .bind(contact_id)
    .bind(status_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records the stage a lead is known to be in after a change at `changed_at`.
pub async fn set_stage(
    conn: &mut PgConnection,
    id: i64,
    status_id: i64,
    changed_at: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE partner_leads SET status_id = $2, changed_at = GREATEST(changed_at, $3) WHERE id = $1",
    )
    .bind(id)
    .bind(status_id)
    .bind(changed_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A report owed to the partner.
pub struct NewReport<'a> {
    pub partner_lead: i64,
    pub source: &'a str,
    pub stage_id: i64,
    pub stage: &'a str,
    pub partner_status: &'a str,
    pub changed_at: DateTime<Utc>,
}

/// Stores a report (before its job is queued, in the same transaction); its id.
pub async fn insert_report(
    conn: &mut PgConnection,
    report: &NewReport<'_>,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO partner_reports (partner_lead, source, stage_id, stage, partner_status, changed_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(report.partner_lead)
    .bind(report.source)
    .bind(report.stage_id)
    .bind(report.stage)
    .bind(report.partner_status)
    .bind(report.changed_at)
    .fetch_one(&mut *conn)
    .await?)
}

/// A report with what the partner needs of its lead.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredReport {
    pub id: i64,
    pub source: String,
    pub partner_lead_id: String,
    pub crm_lead_id: Option<i64>,
    pub stage: String,
    pub partner_status: String,
    pub changed_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    /// 1, 2, … among the lead's reports.
    pub seq: i64,
}

pub async fn report(pool: &PgPool, id: i64) -> Result<Option<StoredReport>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT r.id, r.source, l.partner_lead_id, l.lead_id AS crm_lead_id, r.stage, r.partner_status,
                r.changed_at, r.sent_at,
                (SELECT count(*) FROM partner_reports o WHERE o.partner_lead = r.partner_lead AND o.id <= r.id) AS seq
         FROM partner_reports r JOIN partner_leads l ON l.id = r.partner_lead
         WHERE r.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Records an attempt at a report and the partner's answer (`sent` when it
/// took it).
pub async fn record_report_answer(
    pool: &PgPool,
    id: i64,
    http_status: Option<i32>,
    answer: &str,
    sent: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE partner_reports SET attempts = attempts + 1, http_status = $2, answer = $3,
                sent_at = CASE WHEN $4 THEN now() ELSE sent_at END
         WHERE id = $1",
    )
    .bind(id)
    .bind(http_status)
    .bind(answer)
    .bind(sent)
    .execute(pool)
    .await?;
    Ok(())
}

/// One lead's reports within a week, for the settlement.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SettlementRow {
    pub partner_lead_id: String,
    pub crm_lead_id: Option<i64>,
    /// The last status reported in the week (by change time, then order of report).
    pub final_status: String,
    pub final_at: DateTime<Utc>,
    pub reports: i64,
    pub unsent: i64,
    pub buyout_price: Option<f64>,
    pub client_price: Option<f64>,
    /// A status of `counting` was reported before the week: paid already.
    pub counted_before: bool,
}

/// Every lead of `source` with a status change in `[from, to)`.
pub async fn settlement_rows(
    pool: &PgPool,
    source: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    counting: &[String],
) -> Result<Vec<SettlementRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT l.partner_lead_id, l.lead_id AS crm_lead_id,
                last.partner_status AS final_status, last.changed_at AS final_at,
                agg.reports, agg.unsent,
                l.buyout_price::float8 AS buyout_price, l.client_price::float8 AS client_price,
                EXISTS (SELECT 1 FROM partner_reports b WHERE b.partner_lead = l.id
                        AND b.changed_at < $2 AND b.partner_status = ANY($4)) AS counted_before
         FROM partner_leads l
         JOIN LATERAL (
             SELECT count(*) AS reports, count(*) FILTER (WHERE r.sent_at IS NULL) AS unsent
             FROM partner_reports r
             WHERE r.partner_lead = l.id AND r.changed_at >= $2 AND r.changed_at < $3
         ) agg ON agg.reports > 0
         JOIN LATERAL (
             SELECT r.partner_status, r.changed_at FROM partner_reports r
             WHERE r.partner_lead = l.id AND r.changed_at >= $2 AND r.changed_at < $3
             ORDER BY r.changed_at DESC, r.id DESC LIMIT 1
         ) last ON true
         WHERE l.source = $1
         ORDER BY l.partner_lead_id",
    )
    .bind(source)
    .bind(from)
    .bind(to)
    .bind(counting)
    .fetch_all(pool)
    .await?)
}

/// A marketplace order of one shop settled in a week: its code, status and
/// commission (minor units), from the stored snapshot.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderSettlementRow {
    pub code: String,
    pub status_key: String,
    pub is_terminal: bool,
    pub total_minor: Option<i64>,
    pub commission_minor: Option<i64>,
}

/// The shop's orders updated in `[from, to)` (their status at the end of the week
/// is the stored one when nothing changed since).
pub async fn order_settlement_rows(
    pool: &PgPool,
    marketplace: &str,
    shop: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<OrderSettlementRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT o.code,
                COALESCE((SELECT h.to_key FROM order_stage_history h
                          WHERE h.order_id = o.id AND h.observed_at < $4
                          ORDER BY h.id DESC LIMIT 1), o.status_key) AS status_key,
                o.is_terminal,
                (o.snapshot->>'total')::bigint AS total_minor,
                (o.snapshot->>'commission')::bigint AS commission_minor
         FROM orders o
         WHERE o.marketplace = $1 AND o.account = $2
           AND EXISTS (SELECT 1 FROM order_stage_history h
                       WHERE h.order_id = o.id AND h.observed_at >= $3 AND h.observed_at < $4)
         ORDER BY o.code",
    )
    .bind(marketplace)
    .bind(shop)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?)
}

/// A polled source's cursor.
pub async fn cursor(pool: &PgPool, source: &str) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT cursor FROM partner_cursors WHERE source = $1")
            .bind(source)
            .fetch_optional(pool)
            .await?
            .flatten(),
    )
}

/// Moves a polled source's cursor (in the transaction that stored the page).
pub async fn set_cursor(
    conn: &mut PgConnection,
    source: &str,
    cursor: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO partner_cursors (source, cursor, last_success_at) VALUES ($1, $2, now())
         ON CONFLICT (source) DO UPDATE SET cursor = EXCLUDED.cursor, last_success_at = now(), last_error = NULL",
    )
    .bind(source)
    .bind(cursor)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a failed poll (the cursor stays).
pub async fn poll_failed(pool: &PgPool, source: &str, error: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO partner_cursors (source, last_error) VALUES ($1, $2)
         ON CONFLICT (source) DO UPDATE SET last_error = EXCLUDED.last_error",
    )
    .bind(source)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
