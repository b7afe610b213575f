//! Ingest: an order change is written in ONE transaction: the order snapshot,
//! its stage-history row (when the status key moved), and the outbox intent
//! "make the CRM lead reflect this order" (deduplicated per order). A poll
//! writes a listed page's changes together ([`write_orders`]): one
//! transaction and a few statements for up to 100 orders. Every write says
//! when its reading was asked of the marketplace: a reading older than the
//! stored one (a reconciliation's page fetched before a poll's, a page whose
//! lines took long) is not written ([`Written::Older`]), so an order never
//! goes back to a status it has left.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::domain::Order;
use crate::outbox::NewJob;
use crate::store::{orders, StoreError};

/// Job kind of the intent "make the CRM lead of this order reflect its state".
pub const CRM_SYNC_KIND: &str = "crm_sync_order";

/// What writing an order did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    New,
    /// Changed; `from` is the previous status key when it moved.
    Changed {
        status_from: Option<String>,
    },
    /// Not written: the stored snapshot was asked of the marketplace later
    /// than this one (it is newer news).
    Older,
}

/// The ordering key every job of one order shares (its CRM sync and its
/// marketplace actions run one at a time, oldest first).
pub fn order_key(marketplace: &str, account: &str, external_id: &str) -> String {
    format!("order:{marketplace}:{account}:{external_id}")
}

/// The outbox intent for an order: ordered and deduplicated per order.
pub fn crm_sync_job(order: &Order, order_id: i64, crm_target: &str) -> NewJob {
    crm_sync_job_of(
        &OrderRef {
            marketplace: order.marketplace.as_str(),
            account: &order.account,
            external_id: &order.external_id,
            code: &order.code,
        },
        order_id,
        crm_target,
    )
}

/// An order's identity, as a job names it.
pub struct OrderRef<'a> {
    pub marketplace: &'a str,
    pub account: &'a str,
    pub external_id: &'a str,
    pub code: &'a str,
}

/// The CRM sync intent of an order known by its identity (a repair adds its
/// own flags to the payload).
pub fn crm_sync_job_of(order: &OrderRef<'_>, order_id: i64, crm_target: &str) -> NewJob {
    let key = format!(
        "{}:{}:{}",
        order.marketplace, order.account, order.external_id
    );
    NewJob {
        kind: CRM_SYNC_KIND.to_string(),
        target: crm_target.to_string(),
        ordering_key: order_key(order.marketplace, order.account, order.external_id),
        dedupe_key: Some(format!("{CRM_SYNC_KIND}:{key}")),
        payload: serde_json::json!({
            "order_id": order_id,
            "marketplace": order.marketplace,
            "account": order.account,
            "external_id": order.external_id,
            "code": order.code,
        }),
        run_at: None,
    }
}

/// Writes many order changes (a listed page) in ONE transaction: the
/// snapshots, the history rows of those whose status key moved and their
/// outbox intents, in a few statements; `observed_at`: when the page was
/// asked of the marketplace. Returns what happened to each distinct order (by
/// external id, in listing order; those with a later stored reading last, as
/// [`Written::Older`]).
pub async fn write_orders(
    pool: &PgPool,
    changed: &[(&Order, &str)],
    crm_target: &str,
    observed_at: DateTime<Utc>,
) -> Result<Vec<(String, Written)>, StoreError> {
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    orders::relax_commit(&mut tx).await?;
    let upserted = orders::upsert_many(&mut tx, changed, observed_at).await?;
    let by_id: std::collections::HashMap<&str, &Order> = changed
        .iter()
        .map(|(order, _)| (order.external_id.as_str(), *order))
        .collect();
    let mut history = Vec::new();
    let mut jobs = Vec::with_capacity(upserted.len());
    let mut written = Vec::with_capacity(upserted.len());
    for (external_id, up) in &upserted {
        let Some(order) = by_id.get(external_id.as_str()) else {
            continue;
        };
        let moved = up.previous_status.as_deref() != Some(order.status.as_str());
        if moved {
            history.push((up.id, up.previous_status.as_deref(), *order));
        }
        jobs.push(crm_sync_job(order, up.id, crm_target));
        metrics::counter!("orderbridge_orders_ingested_total",
            "marketplace" => order.marketplace.as_str(), "change" => if up.inserted { "new" } else { "changed" })
        .increment(1);
        written.push((
            external_id.clone(),
            if up.inserted {
                Written::New
            } else {
                Written::Changed {
                    status_from: if moved {
                        up.previous_status.clone()
                    } else {
                        None
                    },
                }
            },
        ));
    }
    orders::add_history_many(&mut tx, &history).await?;
    crate::store::outbox::enqueue_many(&mut tx, &jobs).await?;
    tx.commit().await?;
    // Orders of the page not written: a later reading is stored (each once).
    let mut accounted: std::collections::HashSet<String> =
        written.iter().map(|(id, _)| id.clone()).collect();
    let older: Vec<&Order> = changed
        .iter()
        .map(|(order, _)| *order)
        .filter(|order| accounted.insert(order.external_id.clone()))
        .collect();
    for order in older {
        tracing::info!(order = %order.code, status = %order.status, %observed_at,
            "A reading of the order older than the stored one came in late; the newer one is kept.");
        metrics::counter!("orderbridge_orders_older_readings_total",
            "marketplace" => order.marketplace.as_str())
        .increment(1);
        written.push((order.external_id.clone(), Written::Older));
    }
    let inserted = written
        .iter()
        .filter(|(_, w)| matches!(w, Written::New))
        .count();
    if inserted > 0 {
        orders::note_growth(pool, inserted as u64).await;
    }
    Ok(written)
}

/// Writes one order change with its history row and outbox intent, atomically
/// (a page of one); `observed_at`: when it was asked of the marketplace.
pub async fn write_order(
    pool: &PgPool,
    order: &Order,
    content_hash: &str,
    crm_target: &str,
    observed_at: DateTime<Utc>,
) -> Result<Written, StoreError> {
    write_orders(pool, &[(order, content_hash)], crm_target, observed_at)
        .await?
        .into_iter()
        .next()
        .map(|(_, written)| written)
        .ok_or(StoreError::Query(sqlx::Error::RowNotFound))
}
