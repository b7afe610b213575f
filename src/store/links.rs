//! SQL of CRM links (order → lead, contact, what the bridge last set) and of
//! the local index of CRM contacts by normalised phone and email.

use sqlx::{PgConnection, PgPool};

use super::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Link {
    pub order_id: i64,
    pub crm_account: String,
    pub lead_id: i64,
    pub contact_id: Option<i64>,
    pub pushed_pipeline_id: Option<i64>,
    pub pushed_status_id: Option<i64>,
    /// The lead's last known stage was set by a manager, not by the bridge.
    pub manager_moved: bool,
}

pub async fn get(pool: &PgPool, order_id: i64) -> Result<Option<Link>, StoreError> {
    let row = sqlx::query_as(
        "SELECT order_id, crm_account, lead_id, contact_id, pushed_pipeline_id, pushed_status_id, manager_moved
         FROM crm_links WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Records the lead an order became (and the stage the bridge set).
pub async fn insert(pool: &PgPool, link: &Link) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    insert_in(&mut conn, link).await
}

/// [`insert`] on the caller's connection (or inside its transaction).
pub async fn insert_in(conn: &mut PgConnection, link: &Link) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO crm_links (order_id, crm_account, lead_id, contact_id, pushed_pipeline_id, pushed_status_id, pushed_at)
         VALUES ($1, $2, $3, $4, $5, $6, now())
         ON CONFLICT (order_id) DO UPDATE SET lead_id = EXCLUDED.lead_id, contact_id = EXCLUDED.contact_id,
             pushed_pipeline_id = EXCLUDED.pushed_pipeline_id, pushed_status_id = EXCLUDED.pushed_status_id, pushed_at = now()",
    )
    .bind(link.order_id)
    .bind(&link.crm_account)
    .bind(link.lead_id)
    .bind(link.contact_id)
    .bind(link.pushed_pipeline_id)
    .bind(link.pushed_status_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A known contact with this phone or email.
pub async fn find_contact(
    conn: &mut PgConnection,
    crm_account: &str,
    phone: Option<&str>,
    email: Option<&str>,
) -> Result<Option<i64>, StoreError> {
    // Two index lookups (a NULL matches nothing), not one OR that a
    // prepared statement's generic plan answers with a scan of the table.
    let id: Option<i64> = sqlx::query_scalar(
        "SELECT min(contact_id) FROM (
             SELECT contact_id FROM crm_contacts WHERE crm_account = $1 AND phone = $2
             UNION ALL
             SELECT contact_id FROM crm_contacts WHERE crm_account = $1 AND email = $3
         ) AS found",
    )
    .bind(crm_account)
    .bind(phone)
    .bind(email)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// Remembers a CRM contact's phone and email.
pub async fn remember_contact(
    conn: &mut PgConnection,
    crm_account: &str,
    contact_id: i64,
    phone: Option<&str>,
    email: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO crm_contacts (crm_account, contact_id, phone, email) VALUES ($1, $2, $3, $4)
         ON CONFLICT (crm_account, contact_id) DO UPDATE
         SET phone = COALESCE(EXCLUDED.phone, crm_contacts.phone), email = COALESCE(EXCLUDED.email, crm_contacts.email)",
    )
    .bind(crm_account)
    .bind(contact_id)
    .bind(phone)
    .bind(email)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The order behind a lead.
#[derive(Debug, Clone, sqlx::FromRow)]
struct LeadOrderRow {
    marketplace: String,
    account: String,
    external_id: String,
    order_id: i64,
    crm_account: String,
    lead_id: i64,
    contact_id: Option<i64>,
    pushed_pipeline_id: Option<i64>,
    pushed_status_id: Option<i64>,
    manager_moved: bool,
}

/// The order behind a lead: (marketplace, shop, external id, link).
pub async fn by_lead(
    pool: &PgPool,
    crm_account: &str,
    lead_id: i64,
) -> Result<Option<(String, String, String, Link)>, StoreError> {
    let mut conn = pool.acquire().await?;
    by_lead_in(&mut conn, crm_account, lead_id).await
}

/// [`by_lead`] inside the caller's transaction (it sees the transaction's own writes).
pub async fn by_lead_in(
    conn: &mut PgConnection,
    crm_account: &str,
    lead_id: i64,
) -> Result<Option<(String, String, String, Link)>, StoreError> {
    let row: Option<LeadOrderRow> = sqlx::query_as(
        "SELECT o.marketplace, o.account, o.external_id, l.order_id, l.crm_account, l.lead_id, l.contact_id,
                l.pushed_pipeline_id, l.pushed_status_id, l.manager_moved
         FROM crm_links l JOIN orders o ON o.id = l.order_id
         WHERE l.crm_account = $1 AND l.lead_id = $2",
    )
    .bind(crm_account)
    .bind(lead_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| {
        (
            r.marketplace,
            r.account,
            r.external_id,
            Link {
                order_id: r.order_id,
                crm_account: r.crm_account,
                lead_id: r.lead_id,
                contact_id: r.contact_id,
                pushed_pipeline_id: r.pushed_pipeline_id,
                pushed_status_id: r.pushed_status_id,
                manager_moved: r.manager_moved,
            },
        )
    }))
}

/// Remembers many CRM contacts at once (the contact index): for each, its first
/// phone (E.164) and email (lower-cased). Later values replace earlier ones.
pub async fn remember_contacts(
    pool: &PgPool,
    crm_account: &str,
    contacts: &[(i64, Option<String>, Option<String>)],
) -> Result<u64, StoreError> {
    let mut written = 0;
    for chunk in contacts.chunks(1000) {
        let ids: Vec<i64> = chunk.iter().map(|c| c.0).collect();
        let phones: Vec<Option<String>> = chunk.iter().map(|c| c.1.clone()).collect();
        let emails: Vec<Option<String>> = chunk.iter().map(|c| c.2.clone()).collect();
        let done = sqlx::query(
            "INSERT INTO crm_contacts (crm_account, contact_id, phone, email)
             SELECT DISTINCT ON (id) $1, id, phone, email
             FROM UNNEST($2::bigint[], $3::text[], $4::text[]) WITH ORDINALITY AS t(id, phone, email, n)
             ORDER BY id, n DESC
             ON CONFLICT (crm_account, contact_id) DO UPDATE
             SET phone = EXCLUDED.phone, email = EXCLUDED.email",
        )
        .bind(crm_account)
        .bind(&ids)
        .bind(&phones)
        .bind(&emails)
        .execute(pool)
        .await?;
        written += done.rows_affected();
    }
    Ok(written)
}

/// A known contact with this phone or email, outside any transaction.
pub async fn find_contact_by(
    pool: &PgPool,
    crm_account: &str,
    phone: Option<&str>,
    email: Option<&str>,
) -> Result<Option<i64>, StoreError> {
    let mut conn = pool.acquire().await?;
    find_contact(&mut conn, crm_account, phone, email).await
}

/// Records a stage the bridge is about to set on a lead, before the request
/// goes out, so that a report of it (webhook or event) arriving at any time
/// later, even before the request returns, is recognised as the bridge's echo.
/// Prunes the lead's records older than a day on the way.
pub async fn record_push(
    pool: &PgPool,
    crm_account: &str,
    lead_id: i64,
    pipeline_id: i64,
    status_id: i64,
) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
    let intended_at = sqlx::query_scalar(
        "WITH pruned AS (
             DELETE FROM crm_pushes
             WHERE crm_account = $1 AND lead_id = $2 AND intended_at < now() - interval '1 day'
         )
         INSERT INTO crm_pushes (crm_account, lead_id, pipeline_id, status_id)
         VALUES ($1, $2, $3, $4) RETURNING intended_at",
    )
    .bind(crm_account)
    .bind(lead_id)
    .bind(pipeline_id)
    .bind(status_id)
    .fetch_one(pool)
    .await?;
    Ok(intended_at)
}

/// Whether the bridge ever recorded a push of this stage on this lead (pushes
/// are kept a day).
pub async fn was_pushed(
    pool: &PgPool,
    crm_account: &str,
    lead_id: i64,
    pipeline_id: i64,
    status_id: i64,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM crm_pushes
                         WHERE crm_account = $1 AND lead_id = $2 AND pipeline_id = $3 AND status_id = $4)",
    )
    .bind(crm_account)
    .bind(lead_id)
    .bind(pipeline_id)
    .bind(status_id)
    .fetch_one(pool)
    .await?)
}

/// Takes a reported change for the bridge's own echo when the bridge recorded
/// a push of exactly this stage on this lead, not yet matched by another
/// change (reports of the same change, by webhook and by poll, all match), and
/// the change happened between `slack_before` seconds before the push was
/// recorded and `slack_after` seconds after. Marks that push as echoed and
/// returns `true`; returns `false` when no such push exists.
pub async fn take_echo(
    conn: &mut PgConnection,
    crm_account: &str,
    lead_id: i64,
    pipeline_id: i64,
    status_id: i64,
    changed_at: Option<i64>,
    (slack_before, slack_after): (i64, i64),
) -> Result<bool, StoreError> {
    let taken = sqlx::query(
        "UPDATE crm_pushes SET echoed_at = now(), echo_change_at = COALESCE(echo_change_at, $5)
         WHERE id = (
             SELECT id FROM crm_pushes
             WHERE crm_account = $1 AND lead_id = $2 AND pipeline_id = $3 AND status_id = $4
               AND (echoed_at IS NULL OR ($5::bigint IS NOT NULL AND echo_change_at = $5))
               AND ($5::bigint IS NULL
                    OR to_timestamp($5) BETWEEN intended_at - make_interval(secs => $6)
                                            AND intended_at + make_interval(secs => $7))
             ORDER BY intended_at LIMIT 1
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(crm_account)
    .bind(lead_id)
    .bind(pipeline_id)
    .bind(status_id)
    .bind(changed_at)
    .bind(slack_before as f64)
    .bind(slack_after as f64)
    .execute(&mut *conn)
    .await?;
    Ok(taken.rows_affected() == 1)
}

/// What the inbox processor needs of a link to judge a reported change.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LinkState {
    pub crm_changed_at: Option<i64>,
    pub awaiting_code_since: Option<chrono::DateTime<chrono::Utc>>,
    pub code_tried: Option<String>,
}

/// The link's CRM-change bookkeeping, locked until the caller's transaction
/// ends (two changes of one lead are judged one after the other).
pub async fn lock_state(
    conn: &mut PgConnection,
    order_id: i64,
) -> Result<Option<LinkState>, StoreError> {
    let row = sqlx::query_as(
        "SELECT crm_changed_at, awaiting_code_since, code_tried FROM crm_links WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row)
}

/// Records the newest applied CRM change's time (never moves it back).
pub async fn set_crm_changed_at(
    conn: &mut PgConnection,
    order_id: i64,
    changed_at: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE crm_links SET crm_changed_at = GREATEST(COALESCE(crm_changed_at, $2), $2) WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(changed_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a manager's move of the lead (its stage, and when).
pub async fn set_manager_moved(
    conn: &mut PgConnection,
    order_id: i64,
    pipeline_id: i64,
    status_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE crm_links SET pushed_pipeline_id = $2, pushed_status_id = $3, manager_moved = true,
             manager_moved_at = now(), pushed_at = now()
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(pipeline_id)
    .bind(status_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The database's clock, against which the links' times are compared.
pub async fn database_now(pool: &PgPool) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?)
}

/// Whether the lead's last known stage is a manager's move recorded at or
/// after `since` (by the database's clock, [`database_now`]).
pub async fn manager_moved_since(
    pool: &PgPool,
    order_id: i64,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM crm_links
                         WHERE order_id = $1 AND manager_moved AND manager_moved_at >= $2)",
    )
    .bind(order_id)
    .bind(since)
    .fetch_one(pool)
    .await?)
}

/// Records the stage the bridge set with a push recorded at `intended_at`,
/// unless a manager's move was recorded after that push began (the manager's
/// move is the newer truth and stays). Returns whether it was recorded.
pub async fn set_pushed_since(
    pool: &PgPool,
    order_id: i64,
    pipeline_id: i64,
    status_id: i64,
    intended_at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE crm_links SET pushed_pipeline_id = $2, pushed_status_id = $3, manager_moved = false, pushed_at = now()
         WHERE order_id = $1 AND (manager_moved_at IS NULL OR manager_moved_at < $4)",
    )
    .bind(order_id)
    .bind(pipeline_id)
    .bind(status_id)
    .bind(intended_at)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Kaspi completion: step 1 was sent (`Some(now)`) or the wait is over (`None`).
pub async fn set_awaiting_code(
    pool: &PgPool,
    order_id: i64,
    awaiting: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE crm_links SET awaiting_code_since = CASE WHEN $2 THEN now() ELSE NULL END,
             code_tried = CASE WHEN $2 THEN NULL ELSE code_tried END
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(awaiting)
    .execute(pool)
    .await?;
    Ok(())
}

/// Remembers the code the bridge is trying, so the same wrong code is not
/// tried again.
pub async fn set_code_tried(
    conn: &mut PgConnection,
    order_id: i64,
    code: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE crm_links SET code_tried = $2 WHERE order_id = $1")
        .bind(order_id)
        .bind(code)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether the order's lead waits for the buyer's completion code.
pub async fn is_awaiting_code(pool: &PgPool, order_id: i64) -> Result<bool, StoreError> {
    let waiting: Option<bool> = sqlx::query_scalar(
        "SELECT awaiting_code_since IS NOT NULL FROM crm_links WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    Ok(waiting.unwrap_or(false))
}

/// `None`: the order's lead does not wait for a completion code; `Some(tried)`:
/// it does, and `tried` is the code last tried.
pub async fn awaiting_code_of(
    pool: &PgPool,
    order_id: i64,
) -> Result<Option<Option<String>>, StoreError> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT code_tried FROM crm_links WHERE order_id = $1 AND awaiting_code_since IS NOT NULL",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| r.0))
}

/// Leads of an account waiting for the buyer's completion code, with the code
/// last tried on each.
pub async fn awaiting_code(
    pool: &PgPool,
    crm_account: &str,
) -> Result<Vec<(i64, Option<String>)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT lead_id, code_tried FROM crm_links
         WHERE crm_account = $1 AND awaiting_code_since IS NOT NULL ORDER BY lead_id",
    )
    .bind(crm_account)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The hash of the mapped fields and price the bridge last wrote into the lead.
pub async fn pushed_content(pool: &PgPool, order_id: i64) -> Result<Option<String>, StoreError> {
    let hash: Option<Option<String>> =
        sqlx::query_scalar("SELECT pushed_content FROM crm_links WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    Ok(hash.flatten())
}

/// Records what the bridge wrote into the lead's mapped fields and price.
pub async fn set_pushed_content(
    pool: &PgPool,
    order_id: i64,
    hash: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE crm_links SET pushed_content = $2 WHERE order_id = $1")
        .bind(order_id)
        .bind(hash)
        .execute(pool)
        .await?;
    Ok(())
}
