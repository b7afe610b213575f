//! Marketplace → CRM: the handler of `crm_sync_order` intents. Level-triggered:
//! it reads the order as stored now and makes its lead reflect it. A new order
//! becomes one lead (found again by its code after a crash, never created
//! twice) in the mapped stage, with its contact (de-duplicated by phone and
//! email: the local index first, then amoCRM's search checked field by field)
//! and the map's fields and tags; a later status moves the lead (status and
//! pipeline together). What the bridge sets is remembered, so its own changes
//! echoed back by webhooks can be told from a manager's.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;

use crate::connectors::amocrm::{
    AmoClient, AmoError, FieldInput, FieldValue, LeadUpdate, NewContact, NewLead, NewNote,
};
use crate::domain::Order;
use crate::mapping::{MapRegistry, Route, RoutingMap};
use crate::outbox::{Handler, JobContext, RetryAction};
use crate::store::links::{self, Link};
use crate::store::{orders, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ToCrmError {
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the job's payload is not an order intent: {0}")]
    BadPayload(String),
    #[error("order {0} is not in the store")]
    NoOrder(String),
    #[error("shop `{0}` has no map in force")]
    NoMap(String),
    #[error("the map of shop `{shop}` has not been resolved against the CRM yet (it did not answer at load)")]
    MapOffline { shop: String },
    #[error("status `{status}` of order {code} has no row in the map of shop `{shop}`")]
    Unmapped {
        shop: String,
        code: String,
        status: String,
    },
    #[error("no CRM client for account `{0}`")]
    NoClient(String),
    #[error("amoCRM refused the lead of order {code}: {reason}")]
    Refused { code: String, reason: String },
}

/// The `crm_sync_order` handler.
pub struct CrmSyncHandler {
    pub pool: PgPool,
    /// CRM clients by CRM account name.
    pub clients: BTreeMap<String, AmoClient>,
    pub maps: Arc<MapRegistry>,
    /// Shop name → CRM account name.
    pub shop_crm: BTreeMap<String, String>,
}

impl Handler for CrmSyncHandler {
    type Error = ToCrmError;

    async fn run(&self, job: &JobContext) -> Result<(), ToCrmError> {
        let field = |k: &str| {
            job.payload[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ToCrmError::BadPayload(format!("no `{k}`")))
        };
        let (marketplace, shop, external_id) = (
            field("marketplace")?,
            field("account")?,
            field("external_id")?,
        );
        let order = orders::snapshot(&self.pool, &marketplace, &shop, &external_id)
            .await?
            .ok_or_else(|| ToCrmError::NoOrder(external_id.clone()))?;
        // Ingest put the order's row id in the intent: no second lookup.
        let order_id = job.payload["order_id"]
            .as_i64()
            .ok_or_else(|| ToCrmError::BadPayload("no `order_id`".into()))?;
        // The map this job started with stays in force for the whole job.
        let maps = self.maps.current();
        let map = maps
            .shops
            .get(&shop)
            .ok_or_else(|| ToCrmError::NoMap(shop.clone()))?;
        let crm_account = self
            .shop_crm
            .get(&shop)
            .ok_or_else(|| ToCrmError::NoClient(shop.clone()))?;
        let client = self
            .clients
            .get(crm_account)
            .ok_or_else(|| ToCrmError::NoClient(crm_account.clone()))?;
        if !map.online {
            return Err(ToCrmError::MapOffline { shop });
        }
        let route = map
            .route(order.status.as_str())
            .ok_or_else(|| ToCrmError::Unmapped {
                shop: shop.clone(),
                code: order.code.clone(),
                status: order.status.to_string(),
            })?;
        let stage = match route {
            Route::Stage {
                stage_id: Some(id), ..
            } => map.pipeline_id.map(|p| (p, *id)),
            Route::Stage { stage_id: None, .. } => return Err(ToCrmError::MapOffline { shop }),
            Route::Ignore => None,
        };
        match links::get(&self.pool, order_id).await? {
            Some(link) => self.update(client, &order, order_id, &link, stage).await,
            None => {
                let Some(stage) = stage else {
                    // An ignored status before the order has a lead: nothing to show yet.
                    return Ok(());
                };
                self.create(client, crm_account, map, &order, order_id, stage)
                    .await
            }
        }
    }

    fn classify(&self, error: &ToCrmError) -> RetryAction {
        match error {
            ToCrmError::Amo(e) => e.classify(),
            ToCrmError::Store(e) => RetryAction::retry(e.to_string()),
            // The map may resolve once the CRM answers or an admin fixes it.
            ToCrmError::MapOffline { .. } | ToCrmError::NoMap(_) => {
                RetryAction::retry(error.to_string())
            }
            ToCrmError::BadPayload(_)
            | ToCrmError::NoOrder(_)
            | ToCrmError::Unmapped { .. }
            | ToCrmError::NoClient(_)
            | ToCrmError::Refused { .. } => RetryAction::permanent(error.to_string()),
        }
    }
}

impl CrmSyncHandler {
    async fn update(
        &self,
        client: &AmoClient,
        order: &Order,
        order_id: i64,
        link: &Link,
        stage: Option<(u64, u64)>,
    ) -> Result<(), ToCrmError> {
        let Some((pipeline_id, status_id)) = stage else {
            return Ok(());
        };
        if link.pushed_pipeline_id == Some(pipeline_id as i64)
            && link.pushed_status_id == Some(status_id as i64)
        {
            return Ok(());
        }
        let outcome = client
            .update_leads(&[LeadUpdate {
                id: link.lead_id as u64,
                stage: Some((pipeline_id, status_id)),
                price: Some(order.total.major_rounded()),
                ..LeadUpdate::default()
            }])
            .await?;
        if let Some(rejected) = outcome.rejected.first() {
            return Err(ToCrmError::Refused {
                code: order.code.clone(),
                reason: rejected.errors.join("; "),
            });
        }
        links::set_pushed(&self.pool, order_id, pipeline_id as i64, status_id as i64).await?;
        if order.is_terminal && link.manager_moved {
            // The marketplace's final state wins over a manager's move: say why.
            let stage = client
                .stage(pipeline_id, status_id)
                .await?
                .map(|s| s.name)
                .unwrap_or_else(|| status_id.to_string());
            client
                .add_notes(&[NewNote {
                    request_id: format!("terminal-{}", order.code),
                    lead_id: link.lead_id as u64,
                    text: format!(
                        "orderbridge: the order is {} at {}; the lead was moved back to «{stage}». A final marketplace status always wins.",
                        order.status,
                        order.marketplace.as_str()
                    ),
                }])
                .await?;
            metrics::counter!("orderbridge_conflicts_total", "marketplace" => order.marketplace.as_str()).increment(1);
        }
        tracing::info!(order = %order.code, lead_id = link.lead_id, status = %order.status, "Lead moved to the mapped stage.");
        Ok(())
    }

    async fn create(
        &self,
        client: &AmoClient,
        crm_account: &str,
        map: &RoutingMap,
        order: &Order,
        order_id: i64,
        (pipeline_id, status_id): (u64, u64),
    ) -> Result<(), ToCrmError> {
        // After a crash between "lead created" and "link stored": find it again.
        let existing = client
            .search_leads(&order.code)
            .await?
            .into_iter()
            .find(|l| l.name.contains(&order.code) && l.pipeline_id == pipeline_id);
        let contact_id = self.contact(client, crm_account, order).await?;
        let lead_id = match existing {
            Some(lead) => {
                tracing::warn!(order = %order.code, lead_id = lead.id, "Found the order's lead by its code; linking it instead of creating a second one.");
                lead.id
            }
            None => {
                let lead = NewLead {
                    request_id: order.code.clone(),
                    name: lead_name(map, order),
                    price: Some(order.total.major_rounded()),
                    pipeline_id,
                    status_id,
                    responsible_user_id: responsible(map, order_id, order),
                    fields: fields(map, order),
                    tags: map.tags.clone(),
                    contact_ids: contact_id.into_iter().collect(),
                };
                let outcome = client.create_leads(&[lead]).await?;
                match (outcome.done.first(), outcome.rejected.first()) {
                    (Some((_, id)), _) => *id,
                    (None, Some(rejected)) => {
                        return Err(ToCrmError::Refused {
                            code: order.code.clone(),
                            reason: rejected.errors.join("; "),
                        })
                    }
                    (None, None) => {
                        return Err(ToCrmError::Refused {
                            code: order.code.clone(),
                            reason: "amoCRM returned no lead".into(),
                        })
                    }
                }
            }
        };
        links::insert(
            &self.pool,
            &Link {
                order_id,
                crm_account: crm_account.to_string(),
                lead_id: lead_id as i64,
                contact_id: contact_id.map(|c| c as i64),
                pushed_pipeline_id: Some(pipeline_id as i64),
                pushed_status_id: Some(status_id as i64),
                manager_moved: false,
            },
        )
        .await?;
        tracing::info!(order = %order.code, lead_id, contact_id, "Lead created for the order.");
        Ok(())
    }

    /// The order's contact: known locally, found in amoCRM (checked field by
    /// field), or created; `None` when the order carries no phone and no name.
    async fn contact(
        &self,
        client: &AmoClient,
        crm_account: &str,
        order: &Order,
    ) -> Result<Option<u64>, ToCrmError> {
        let phone = order.customer.phone.as_ref();
        if phone.is_none() && order.customer.name.is_none() {
            return Ok(None);
        }
        let e164 = phone.map(|p| p.as_e164().to_string());
        // One customer, one contact, even for two orders at the same moment.
        let key = e164
            .clone()
            .or_else(|| order.customer.name.clone())
            .unwrap_or_default();
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        links::lock_contact_key(&mut tx, crm_account, &key).await?;
        if let Some(id) = links::find_contact(&mut tx, crm_account, e164.as_deref(), None).await? {
            tx.commit().await.map_err(StoreError::from)?;
            return Ok(Some(id as u64));
        }
        let id = match client.find_contacts(phone, None).await?.first() {
            Some(found) => found.id,
            None => {
                let created = client
                    .create_contacts(&[NewContact {
                        request_id: format!("contact-{}", order.code),
                        name: order
                            .customer
                            .name
                            .clone()
                            .unwrap_or_else(|| "Покупатель".to_string()),
                        phone: phone.cloned(),
                        email: None,
                    }])
                    .await?;
                match created.done.first() {
                    Some((_, id)) => *id,
                    None => return Ok(None),
                }
            }
        };
        links::remember_contact(&mut tx, crm_account, id as i64, e164.as_deref(), None).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(Some(id))
    }
}

/// The lead's name from the map's template.
fn lead_name(map: &RoutingMap, order: &Order) -> String {
    let template = map
        .lead_name
        .clone()
        .unwrap_or_else(|| "{marketplace} {code}".into());
    template
        .replace("{code}", &order.code)
        .replace("{total}", &format!("{}", order.total.major_rounded()))
        .replace("{customer}", order.customer.name.as_deref().unwrap_or(""))
        .replace("{marketplace}", order.marketplace.as_str())
        .replace("{shop}", &order.account)
}

/// The responsible user: the stage role's users, taken in turn by order.
fn responsible(map: &RoutingMap, order_id: i64, order: &Order) -> Option<u64> {
    let Some(Route::Stage {
        role: Some(role), ..
    }) = map.route(order.status.as_str())
    else {
        return None;
    };
    let users = &map.roles.get(role)?.user_ids;
    if users.is_empty() {
        return None;
    }
    users
        .get(order_id.unsigned_abs() as usize % users.len())
        .copied()
}

/// The map's lead fields filled from the order.
fn fields(map: &RoutingMap, order: &Order) -> Vec<FieldValue> {
    let mut values = Vec::new();
    for (slot, (_, field_id)) in &map.fields {
        let Some(field_id) = *field_id else { continue };
        let input = match slot.as_str() {
            "order_code" => Some(FieldInput::Text(order.code.clone())),
            "items" => Some(FieldInput::Text(
                order
                    .items
                    .iter()
                    .map(|i| {
                        format!(
                            "{} × {} ({})",
                            i.name,
                            i.quantity,
                            i.sku.as_deref().unwrap_or("—")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ))
            .filter(|_| !order.items.is_empty()),
            "total" => Some(FieldInput::Number(order.total.0 as f64 / 100.0)),
            "delivery_address" => order.delivery.address.clone().map(FieldInput::Text),
            "planned_date" => order
                .delivery
                .planned_date
                .map(|d| FieldInput::Timestamp(d.timestamp())),
            "payment_mode" => order.payment_mode.clone().map(FieldInput::Text),
            "delivery_mode" => order.delivery.mode.as_ref().and_then(|mode| {
                match map.enums.get(slot).and_then(|options| options.get(mode)) {
                    Some((_, Some(enum_id))) => Some(FieldInput::Enum(*enum_id)),
                    Some((_, None)) => None,
                    None => Some(FieldInput::Text(mode.clone())),
                }
            }),
            _ => None,
        };
        if let Some(input) = input {
            values.push(FieldValue {
                field_id,
                values: vec![input],
            });
        }
    }
    values
}
