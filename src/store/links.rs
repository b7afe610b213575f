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
    .execute(pool)
    .await?;
    Ok(())
}

/// Records the stage the bridge just set on a lead.
pub async fn set_pushed(
    pool: &PgPool,
    order_id: i64,
    pipeline_id: i64,
    status_id: i64,
) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    set_pushed_in(&mut conn, order_id, pipeline_id, status_id, false).await
}

/// Serialises contact de-duplication for one phone/email until the caller's
/// transaction ends: two orders of one new customer make one contact.
pub async fn lock_contact_key(
    conn: &mut PgConnection,
    crm_account: &str,
    key: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("contact:{crm_account}:{key}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records the lead's stage inside the caller's transaction: set by the bridge,
/// or (`by_manager`) where a manager moved it.
pub async fn set_pushed_in(
    conn: &mut PgConnection,
    order_id: i64,
    pipeline_id: i64,
    status_id: i64,
    by_manager: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE crm_links SET pushed_pipeline_id = $2, pushed_status_id = $3, manager_moved = $4, pushed_at = now()
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(pipeline_id)
    .bind(status_id)
    .bind(by_manager)
    .execute(&mut *conn)
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
    let id = sqlx::query_scalar(
        "SELECT contact_id FROM crm_contacts
         WHERE crm_account = $1 AND (($2::text IS NOT NULL AND phone = $2) OR ($3::text IS NOT NULL AND email = $3))
         ORDER BY contact_id LIMIT 1",
    )
    .bind(crm_account)
    .bind(phone)
    .bind(email)
    .fetch_optional(&mut *conn)
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
    let row: Option<LeadOrderRow> = sqlx::query_as(
        "SELECT o.marketplace, o.account, o.external_id, l.order_id, l.crm_account, l.lead_id, l.contact_id,
                l.pushed_pipeline_id, l.pushed_status_id, l.manager_moved
         FROM crm_links l JOIN orders o ON o.id = l.order_id
         WHERE l.crm_account = $1 AND l.lead_id = $2",
    )
    .bind(crm_account)
    .bind(lead_id)
    .fetch_optional(pool)
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
