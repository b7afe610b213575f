//! CRM → marketplace. The amoCRM inbox processor reads lead status changes
//! (webhooks, events poll), drops the bridge's own echoes (a change equal to
//! what the bridge last set), and turns a manager's move into a stage with a
//! mapped action into a `marketplace_action` job. Its handler applies the
//! action at Kaspi or Avito; one the marketplace does not allow now is not
//! sent but becomes a note on the lead and a counted event.

use std::collections::BTreeMap;

use sqlx::PgPool;

use crate::connectors::amocrm::{AmoClient, AmoError, NewNote};
use crate::connectors::avito::{AvitoClient, AvitoError};
use crate::connectors::kaspi::{CancelReason, KaspiClient, KaspiError, Transition};
use crate::mapping::MapRegistry;
use crate::outbox::{Handler, JobContext, NewJob, RetryAction};
use crate::store::{inbox, links, StoreError};

/// Job kind of "apply this manager action at the marketplace".
pub const MARKETPLACE_ACTION_KIND: &str = "marketplace_action";

/// Processes stored amoCRM lead changes; returns how many actions were queued.
pub async fn process_amocrm_inbox(pool: &PgPool, maps: &MapRegistry) -> Result<usize, StoreError> {
    let mut queued = 0;
    for row in inbox::unprocessed(pool, "amocrm", 500).await? {
        let lead_id = row.payload["lead_id"].as_i64().unwrap_or_default();
        let status_id = row.payload["status_id"].as_i64();
        let pipeline_id = row.payload["pipeline_id"].as_i64();
        let mut tx = pool.begin().await?;
        if row.kind == "lead_status" {
            if let (Some(status_id), Some(pipeline_id)) = (status_id, pipeline_id) {
                if let Some((marketplace, shop, external_id, link)) =
                    links::by_lead(pool, &row.account, lead_id).await?
                {
                    let echo = link.pushed_status_id == Some(status_id)
                        && link.pushed_pipeline_id == Some(pipeline_id);
                    if echo {
                        metrics::counter!("orderbridge_echoes_ignored_total").increment(1);
                    } else {
                        let map = maps.current().shops.get(&shop).cloned();
                        let action = map
                            .as_ref()
                            .and_then(|m| m.action_for_stage(Some(status_id as u64), "").cloned());
                        if let Some(action) = action {
                            let job = NewJob {
                                kind: MARKETPLACE_ACTION_KIND.into(),
                                target: format!("{marketplace}:{shop}"),
                                ordering_key: format!("order:{marketplace}:{shop}:{external_id}"),
                                dedupe_key: None,
                                payload: serde_json::json!({
                                    "order_id": link.order_id, "marketplace": marketplace, "account": shop,
                                    "external_id": external_id, "crm_account": row.account, "lead_id": lead_id,
                                    "action": action.action, "reason": action.reason, "comment": action.comment,
                                    "spaces": action.spaces,
                                }),
                                run_at: None,
                            };
                            crate::store::outbox::enqueue(&mut tx, &job).await?;
                            queued += 1;
                            tracing::info!(order = %external_id, lead_id, action = %action.action, "A manager's move becomes a marketplace action.");
                        }
                        // The lead is where the manager put it: that is what the bridge knows now.
                        links::set_pushed_in(&mut tx, link.order_id, pipeline_id, status_id, true)
                            .await?;
                    }
                }
            }
        }
        inbox::mark_processed(&mut tx, row.id).await?;
        tx.commit().await?;
    }
    Ok(queued)
}

#[derive(Debug, thiserror::Error)]
pub enum ToMarketplaceError {
    #[error(transparent)]
    Kaspi(#[from] KaspiError),
    #[error(transparent)]
    Avito(#[from] AvitoError),
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error("the job's payload is not a marketplace action: {0}")]
    BadPayload(String),
    #[error("no client for shop `{0}`")]
    NoClient(String),
}

/// The `marketplace_action` handler.
pub struct MarketplaceActionHandler {
    pub kaspi: BTreeMap<String, KaspiClient>,
    pub avito: BTreeMap<String, AvitoClient>,
    pub crm: BTreeMap<String, AmoClient>,
}

impl Handler for MarketplaceActionHandler {
    type Error = ToMarketplaceError;

    async fn run(&self, job: &JobContext) -> Result<(), ToMarketplaceError> {
        let text = |k: &str| job.payload[k].as_str().map(str::to_string);
        let need =
            |k: &str| text(k).ok_or_else(|| ToMarketplaceError::BadPayload(format!("no `{k}`")));
        let (marketplace, shop, external_id, action) = (
            need("marketplace")?,
            need("account")?,
            need("external_id")?,
            need("action")?,
        );
        let refused = match marketplace.as_str() {
            "kaspi" => {
                let client = self
                    .kaspi
                    .get(&shop)
                    .ok_or_else(|| ToMarketplaceError::NoClient(shop.clone()))?;
                let transition = match action.as_str() {
                    "accept" => Transition::Accept,
                    "assemble" => Transition::Assemble {
                        spaces: job.payload["spaces"].as_u64().unwrap_or(1) as u32,
                    },
                    "complete" => Transition::SendCompletionCode,
                    "cancel" => Transition::Cancel {
                        reason: text("reason")
                            .as_deref()
                            .and_then(CancelReason::parse)
                            .ok_or_else(|| {
                                ToMarketplaceError::BadPayload(
                                    "cancel without a valid reason".into(),
                                )
                            })?,
                        comment: text("comment"),
                    },
                    other => {
                        return Err(ToMarketplaceError::BadPayload(format!(
                            "Kaspi has no action `{other}`"
                        )))
                    }
                };
                match client.transition(&external_id, &transition).await {
                    Ok(_) => None,
                    Err(error @ KaspiError::TransitionNotAllowed { .. }) => Some(error.to_string()),
                    Err(error) => return Err(error.into()),
                }
            }
            "avito" => {
                let client = self
                    .avito
                    .get(&shop)
                    .ok_or_else(|| ToMarketplaceError::NoClient(shop.clone()))?;
                match client.apply_transition(&external_id, &action).await {
                    Ok(_) => None,
                    Err(
                        error @ (AvitoError::NotAvailable { .. }
                        | AvitoError::TransitionRefused { .. }),
                    ) => Some(error.to_string()),
                    Err(error) => return Err(error.into()),
                }
            }
            other => {
                return Err(ToMarketplaceError::BadPayload(format!(
                    "unknown marketplace `{other}`"
                )))
            }
        };
        if let Some(reason) = refused {
            // Not sent (or refused): the manager learns why on the lead.
            metrics::counter!("orderbridge_actions_not_allowed_total", "marketplace" => marketplace.clone()).increment(1);
            tracing::warn!(order = %external_id, action = %action, reason = %reason, "A manager's action is not allowed now; noted on the lead.");
            let crm_account = need("crm_account")?;
            let lead_id = job.payload["lead_id"].as_u64().unwrap_or_default();
            let crm = self
                .crm
                .get(&crm_account)
                .ok_or_else(|| ToMarketplaceError::NoClient(crm_account.clone()))?;
            crm.add_notes(&[NewNote {
                request_id: format!("not-allowed-{}", job.id),
                lead_id,
                text: format!("orderbridge: «{action}» was not applied at {marketplace}: {reason}"),
            }])
            .await?;
        }
        Ok(())
    }

    fn classify(&self, error: &ToMarketplaceError) -> RetryAction {
        match error {
            ToMarketplaceError::Kaspi(e) => e.classify(),
            ToMarketplaceError::Avito(e) => e.classify(),
            ToMarketplaceError::Amo(e) => e.classify(),
            ToMarketplaceError::BadPayload(_) | ToMarketplaceError::NoClient(_) => {
                RetryAction::permanent(error.to_string())
            }
        }
    }
}

/// How far back each events poll re-reads before its cursor.
const EVENTS_OVERLAP: chrono::Duration = chrono::Duration::minutes(5);

/// The fallback for lost webhooks: amoCRM's `lead_status_changed` events since
/// the cursor (with an overlap) go into the inbox, deduplicated by event id.
/// Returns how many were new. A change seen both ways is processed twice; the
/// second time it equals the stage already recorded and is ignored.
pub async fn poll_amocrm_events(client: &AmoClient, pool: &PgPool) -> Result<u64, EventsError> {
    let account = client
        .target()
        .strip_prefix("amocrm:")
        .unwrap_or(client.target())
        .to_string();
    let started = chrono::Utc::now();
    let cursor = crate::store::orders::cursor(pool, "amocrm_events", &account).await?;
    let from = cursor
        .and_then(|c| c.listed_until)
        .map(|until| until - EVENTS_OVERLAP)
        .unwrap_or(started - chrono::Duration::hours(1));
    crate::store::orders::poll_started(pool, "amocrm_events", &account).await?;
    let events = client.status_changes_since(from.timestamp()).await?;
    let items: Vec<inbox::NewInboxItem> = events
        .iter()
        .filter_map(|e| {
            let (pipeline_id, status_id) = e.after?;
            Some(inbox::NewInboxItem {
                source: "amocrm".into(),
                account: account.clone(),
                kind: "lead_status".into(),
                dedupe_key: format!("amocrm:{account}:event:{}", e.id),
                payload: serde_json::json!({
                    "lead_id": e.lead_id, "status_id": status_id, "pipeline_id": pipeline_id,
                    "modified_user_id": e.created_by, "last_modified": e.created_at, "via": "events",
                }),
            })
        })
        .collect();
    let new = inbox::insert(pool, &items).await?;
    crate::store::orders::poll_succeeded(pool, "amocrm_events", &account, started).await?;
    if new > 0 {
        tracing::info!(crm_account = %account, new, "The events poll found lead changes.");
    }
    Ok(new)
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
