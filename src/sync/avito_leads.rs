//! Avito messenger leads: a buyer's message (from the webhook or the polling
//! fallback over unread chats) is stored in the inbox, deduplicated by message
//! id; the inbox processor turns a chat's first buyer message into one CRM lead
//! intent carrying the item (title, price, URL), the buyer and the message,
//! and each later message of that chat into a note intent (same kind, ordered
//! per chat, so it runs after the lead exists); `sync::messenger_leads` runs them.

use sqlx::PgPool;

use crate::connectors::avito::webhook::MessengerMessage;
use crate::connectors::avito::{AvitoClient, AvitoError};
use crate::outbox::NewJob;
use crate::store::inbox::{self, NewInboxItem};
use crate::store::StoreError;

/// Job kind of the intent "create a CRM lead for this Avito chat".
pub const MESSENGER_LEAD_KIND: &str = "crm_create_messenger_lead";

#[derive(Debug, thiserror::Error)]
pub enum LeadError {
    #[error(transparent)]
    Avito(#[from] AvitoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The inbox row for a buyer's message, or `None` for what is not a lead
/// (the account's own messages, system and other non-text messages).
pub fn inbox_item(account: &str, message: &MessengerMessage) -> Option<NewInboxItem> {
    if !message.is_buyer_text() {
        return None;
    }
    Some(NewInboxItem {
        source: "avito".into(),
        account: account.to_string(),
        kind: "messenger_message".into(),
        dedupe_key: format!("avito:{account}:message:{}", message.message_id),
        payload: serde_json::json!({
            "message_id": message.message_id,
            "chat_id": message.chat_id,
            "author_id": message.author_id,
            "item_id": message.item_id,
            "created": message.created,
            "text": message.text,
        }),
    })
}

/// The polling fallback: buyer messages of unread chats into the inbox
/// (deduplicated with what the webhook stored). Chats are not marked read: the
/// managers still see them as unread. Returns how many messages were new.
pub async fn poll_unread(client: &AvitoClient, pool: &PgPool) -> Result<u64, LeadError> {
    let user_id = client.user_id().await?;
    let mut items = Vec::new();
    for chat in client.unread_chats().await? {
        for message in client.messages(&chat.id).await? {
            let message = MessengerMessage {
                message_id: message.id,
                chat_id: chat.id.clone(),
                user_id,
                author_id: message.author_id,
                item_id: chat.item_id,
                created: message.created,
                kind: message.kind,
                text: message.text,
            };
            items.extend(inbox_item(client.account(), &message));
        }
    }
    Ok(inbox::insert(pool, &items).await?)
}

/// Turns unprocessed messenger messages of `client`'s account into lead
/// intents (one per chat). Returns how many leads were queued.
pub async fn process_inbox(
    client: &AvitoClient,
    pool: &PgPool,
    crm_target: &str,
) -> Result<usize, LeadError> {
    let mut queued = 0;
    let rows = inbox::unprocessed(pool, "avito", 500).await?;
    for row in rows
        .into_iter()
        .filter(|r| r.account == client.account() && r.kind == "messenger_message")
    {
        let chat_id = row.payload["chat_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let message_id = row.payload["message_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut tx = pool.begin().await.map_err(StoreError::from)?;
        let first = inbox::claim_avito_chat(
            &mut tx,
            client.account(),
            &chat_id,
            row.payload["item_id"].as_i64(),
            row.payload["author_id"].as_i64(),
            &message_id,
        )
        .await?;
        if first {
            // The item's title, price and URL come with the chat.
            let chat = client.chat(&chat_id).await?;
            let author = row.payload["author_id"].as_u64().unwrap_or_default();
            let buyer_name = chat
                .users
                .iter()
                .find(|(id, _)| *id == author)
                .map(|(_, name)| name.clone());
            let job = NewJob {
                kind: MESSENGER_LEAD_KIND.into(),
                target: crm_target.to_string(),
                ordering_key: format!("avito-chat:{}:{chat_id}", client.account()),
                dedupe_key: Some(format!(
                    "{MESSENGER_LEAD_KIND}:{}:{chat_id}",
                    client.account()
                )),
                payload: serde_json::json!({
                    "account": client.account(),
                    "chat_id": chat_id,
                    "item_id": chat.item_id,
                    "item_title": chat.item_title,
                    "item_price": chat.item_price,
                    "item_url": chat.item_url,
                    "buyer_id": author,
                    "buyer_name": buyer_name,
                    "message_id": message_id,
                    "text": row.payload["text"],
                }),
                run_at: None,
            };
            crate::store::outbox::enqueue(&mut tx, &job).await?;
            queued += 1;
            tracing::info!(account = %client.account(), chat = %chat_id, "An Avito buyer's first message became a lead intent.");
        } else {
            // A later message: a note on the chat's lead, after the lead exists.
            let job = NewJob {
                kind: MESSENGER_LEAD_KIND.into(),
                target: crm_target.to_string(),
                ordering_key: format!("avito-chat:{}:{chat_id}", client.account()),
                dedupe_key: Some(format!(
                    "{MESSENGER_LEAD_KIND}:{}:{chat_id}:{message_id}",
                    client.account()
                )),
                payload: serde_json::json!({
                    "account": client.account(),
                    "chat_id": chat_id,
                    "message_id": message_id,
                    "text": row.payload["text"],
                    "note_only": true,
                }),
                run_at: None,
            };
            crate::store::outbox::enqueue(&mut tx, &job).await?;
        }
        inbox::mark_processed(&mut tx, row.id).await?;
        tx.commit().await.map_err(StoreError::from)?;
    }
    Ok(queued)
}
