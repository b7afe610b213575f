//! The `crm_create_messenger_lead` handler: Avito messenger messages into
//! amoCRM. A chat's first buyer message becomes one lead (the map's
//! `[messenger]` section gives the stage of the map's pipeline, the name and
//! the tags; the item's title and link go into the `item_title` / `item_url`
//! field slots, the chat id into the order-code field, by which a retry finds
//! the lead again) linked to the buyer's contact (one per Avito buyer: reused
//! from the buyer's earlier chats), with the message as a note. The buyer's
//! later messages in that chat (jobs of the same kind, ordered per chat)
//! become notes on the same lead. Nothing is written while the map is not
//! resolved against the CRM (the job waits).

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;

use crate::connectors::amocrm::{
    AmoClient, AmoError, FieldInput, FieldValue, NewComplexLead, NewContact, NewLead, NewNote,
};
use crate::mapping::MapRegistry;
use crate::outbox::{Handler, JobContext, RetryAction};
use crate::store::{inbox, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum MessengerError {
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the job's payload is not a messenger message: {0}")]
    BadPayload(String),
    #[error("no CRM client for shop `{0}`")]
    NoClient(String),
    #[error("shop `{0}` has no map in force")]
    NoMap(String),
    #[error("the map of shop `{0}` has no [messenger] section: messenger leads are not created")]
    NoMessenger(String),
    /// Starts with [`crate::mapping::UNRESOLVED`]: released when the maps resolve.
    #[error("maps unresolved: the map of shop `{shop}` is not resolved against CRM account `{crm_account}` ({why}); nothing is written to it until it is")]
    MapOffline {
        shop: String,
        crm_account: String,
        why: String,
    },
    #[error("chat {0}: its lead is not created yet (the chat's first message comes first)")]
    NoLeadYet(String),
    #[error("amoCRM created no lead for chat {chat}: {reason}")]
    Refused { chat: String, reason: String },
}

/// The handler of [`crate::sync::avito_leads::MESSENGER_LEAD_KIND`].
pub struct MessengerLeadHandler {
    pub pool: PgPool,
    /// CRM clients by CRM account name.
    pub clients: BTreeMap<String, AmoClient>,
    pub maps: Arc<MapRegistry>,
    /// Shop name → CRM account name.
    pub shop_crm: BTreeMap<String, String>,
}

impl Handler for MessengerLeadHandler {
    type Error = MessengerError;

    async fn run(&self, job: &JobContext) -> Result<(), MessengerError> {
        let p = &job.payload;
        let text = |k: &str| p[k].as_str().map(str::to_string);
        let need = |k: &str| text(k).ok_or_else(|| MessengerError::BadPayload(format!("no `{k}`")));
        let (shop, chat_id) = (need("account")?, need("chat_id")?);
        let message_id = text("message_id").unwrap_or_else(|| format!("job{}", job.id));
        let message = text("text")
            .or_else(|| text("first_message"))
            .unwrap_or_default();
        let crm_account = self
            .shop_crm
            .get(&shop)
            .ok_or_else(|| MessengerError::NoClient(shop.clone()))?;
        let client = self
            .clients
            .get(crm_account)
            .ok_or_else(|| MessengerError::NoClient(crm_account.clone()))?;
        let maps = self.maps.current();
        let map = maps
            .shops
            .get(&shop)
            .ok_or_else(|| MessengerError::NoMap(shop.clone()))?;
        if !map.online {
            return Err(MessengerError::MapOffline {
                why: maps
                    .unresolved
                    .get(crm_account)
                    .cloned()
                    .unwrap_or_else(|| "not resolved yet".into()),
                shop,
                crm_account: crm_account.clone(),
            });
        }
        let note = |lead_id: u64| NewNote {
            request_id: format!("avito-message-{message_id}"),
            lead_id,
            text: format!("Avito, сообщение покупателя: {message}"),
        };
        if let Some(lead_id) = inbox::chat_lead(&self.pool, &shop, &chat_id).await? {
            client.add_notes(&[note(lead_id as u64)]).await?;
            return Ok(());
        }
        if p["note_only"].as_bool() == Some(true) {
            return Err(MessengerError::NoLeadYet(chat_id));
        }
        let route = map
            .messenger
            .as_ref()
            .ok_or_else(|| MessengerError::NoMessenger(shop.clone()))?;
        let (Some(pipeline_id), Some(status_id)) = (map.pipeline_id, route.stage_id) else {
            return Err(MessengerError::MapOffline {
                why: "the messenger stage has no id".into(),
                shop,
                crm_account: crm_account.clone(),
            });
        };
        let code = format!("avito-chat-{chat_id}");
        let buyer_id = p["buyer_id"].as_i64();
        // A retry may follow a creation whose answer was lost: look first.
        let found = if job.attempt > 1 {
            crate::sync::to_crm::find_lead_by_code(client, map, &code).await?
        } else {
            None
        };
        let (lead_id, contact_id) = match found {
            Some(lead) => {
                tracing::warn!(chat = %chat_id, lead_id = lead.id, "Found the chat's lead by its code; linking it instead of creating a second one.");
                (lead.id, lead.contact_ids.first().copied())
            }
            None => {
                let known = match buyer_id {
                    Some(buyer) => inbox::buyer_contact(&self.pool, &shop, buyer).await?,
                    None => None,
                };
                let buyer_name = text("buyer_name").unwrap_or_else(|| "Покупатель Avito".into());
                let item = text("item_title").unwrap_or_default();
                let mut fields = Vec::new();
                for (slot, value) in [
                    ("order_code", Some(code.clone())),
                    ("item_title", text("item_title")),
                    ("item_url", text("item_url")),
                ] {
                    if let (Some((_, Some(field_id))), Some(value)) = (map.fields.get(slot), value)
                    {
                        fields.push(FieldValue {
                            field_id: *field_id,
                            values: vec![FieldInput::Text(value)],
                        });
                    }
                }
                let lead = NewLead {
                    request_id: code.clone(),
                    name: route
                        .name
                        .replace("{item}", &item)
                        .replace("{buyer}", &buyer_name)
                        .replace("{shop}", &shop),
                    price: p["item_price"].as_f64().map(|v| v.round() as i64),
                    pipeline_id,
                    status_id,
                    responsible_user_id: None,
                    fields,
                    tags: route.tags.clone(),
                    contact_ids: known.map(|c| c as u64).into_iter().collect(),
                };
                let contact = known.is_none().then(|| NewContact {
                    request_id: format!("contact-{code}"),
                    name: buyer_name,
                    phone: None,
                    email: None,
                });
                let created = client
                    .create_leads_complex(&[NewComplexLead { lead, contact }])
                    .await?;
                let Some(created) = created.into_iter().next() else {
                    return Err(MessengerError::Refused {
                        chat: chat_id,
                        reason: "amoCRM answered no lead".into(),
                    });
                };
                (
                    created.lead_id,
                    known.map(|c| c as u64).or(created.contact_id),
                )
            }
        };
        inbox::set_chat_lead(
            &self.pool,
            &shop,
            &chat_id,
            crm_account,
            lead_id as i64,
            contact_id.map(|c| c as i64),
        )
        .await?;
        metrics::counter!("orderbridge_messenger_leads_total").increment(1);
        tracing::info!(shop = %shop, chat = %chat_id, lead_id, "An Avito chat became a lead.");
        client.add_notes(&[note(lead_id)]).await?;
        Ok(())
    }

    fn classify(&self, error: &MessengerError) -> RetryAction {
        match error {
            MessengerError::Amo(e) => e.classify(),
            MessengerError::Store(e) => RetryAction::retry(e.to_string()),
            MessengerError::MapOffline { .. } => RetryAction::Wait {
                after: std::time::Duration::from_secs(30),
                reason: error.to_string(),
            },
            MessengerError::NoLeadYet(_) | MessengerError::NoMap(_) => {
                RetryAction::retry(error.to_string())
            }
            MessengerError::BadPayload(_)
            | MessengerError::NoClient(_)
            | MessengerError::NoMessenger(_)
            | MessengerError::Refused { .. } => RetryAction::permanent(error.to_string()),
        }
    }
}
