//! Ingest: an order change is written in ONE transaction: the order snapshot,
//! its stage-history row (when the status key moved), and the outbox intent
//! "make the CRM lead reflect this order" (deduplicated per order).

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

/// Writes one order change with its history row and outbox intent, atomically.
pub async fn write_order(
    pool: &PgPool,
    order: &Order,
    content_hash: &str,
    crm_target: &str,
) -> Result<Written, StoreError> {
    let mut tx = pool.begin().await?;
    orders::relax_commit(&mut tx).await?;
    let upserted = orders::upsert(&mut tx, order, content_hash).await?;
    let moved = upserted.previous_status.as_deref() != Some(order.status.as_str());
    if moved {
        orders::add_history(
            &mut tx,
            upserted.id,
            upserted.previous_status.as_deref(),
            order,
        )
        .await?;
    }
    crate::store::outbox::enqueue(&mut tx, &crm_sync_job(order, upserted.id, crm_target)).await?;
    tx.commit().await?;
    metrics::counter!("orderbridge_orders_ingested_total",
        "marketplace" => order.marketplace.as_str(), "change" => if upserted.inserted { "new" } else { "changed" })
    .increment(1);
    Ok(if upserted.inserted {
        Written::New
    } else {
        Written::Changed {
            status_from: if moved {
                upserted.previous_status
            } else {
                None
            },
        }
    })
}
