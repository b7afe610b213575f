//! The messenger and user endpoints, and the webhook probe and deliveries.
//! Errors use the wrapped `{"error":{"code","message"}}` envelope.

use std::sync::Arc;

use serde_json::{json, Value};

use super::server::{Envelope, Reply, Req};
use super::state::{Chat, Message, State};
use super::{Shared, SimWebhookDelivery};

const ACCOUNT_NAME: &str = "Выкуп техники";

fn validation(field: &str, problem: &str) -> Reply {
    let mut reply = Reply::error(Envelope::Wrapped, 400, "Validation error");
    if let Some(error) = reply.body.get_mut("error").and_then(Value::as_object_mut) {
        error.insert("fields".to_string(), json!({ field: problem }));
    }
    reply
}

fn not_found() -> Reply {
    Reply::error(Envelope::Wrapped, 404, "Not found")
}

fn url_field(req: &Req<'_>) -> Option<String> {
    let body: Value = serde_json::from_slice(req.body).ok()?;
    let url = body.get("url")?.as_str()?.trim();
    (!url.is_empty()).then(|| url.to_string())
}

/// `POST /messenger/v3/webhook`: probes the url with `{}` first.
pub(super) async fn subscribe(shared: &Arc<Shared>, req: &Req<'_>) -> Reply {
    let Some(url) = url_field(req) else {
        return validation("url", "required");
    };
    let probe = shared.http.post(&url).json(&json!({})).send().await;
    match probe {
        Ok(resp) if resp.status().as_u16() == 200 => {}
        Ok(resp) => {
            return Reply::error(
                Envelope::Wrapped,
                400,
                &format!(
                    "webhook url answered {} instead of 200",
                    resp.status().as_u16()
                ),
            )
        }
        Err(_) => {
            return Reply::error(
                Envelope::Wrapped,
                400,
                "webhook url is not reachable within 2 s",
            )
        }
    }
    let mut st = shared.lock();
    if !st.webhooks.contains(&url) {
        st.webhooks.push(url);
    }
    Reply::ok(json!({ "ok": true }))
}

/// POSTs a v3 webhook body to every subscribed url, one after the other,
/// recording each delivery. A `Null` body (nothing to deliver) is skipped.
pub(super) async fn deliver(shared: &Arc<Shared>, body: Value) {
    if body.is_null() {
        return;
    }
    let urls = shared.lock().webhooks.clone();
    for url in urls {
        let status = match shared.http.post(&url).json(&body).send().await {
            Ok(resp) => Some(resp.status().as_u16()),
            Err(error) => {
                tracing::debug!(%error, url, "simulated Avito webhook delivery failed");
                None
            }
        };
        shared.lock().deliveries.push(SimWebhookDelivery {
            url,
            body: body.clone(),
            status,
        });
    }
}

/// `POST /messenger/v1/subscriptions`.
pub(super) fn subscriptions(st: &State) -> Reply {
    let list: Vec<Value> = st
        .webhooks
        .iter()
        .map(|url| json!({ "url": url, "version": "3" }))
        .collect();
    Reply::ok(json!({ "subscriptions": list }))
}

/// `POST /messenger/v1/webhook/unsubscribe`.
pub(super) fn unsubscribe(st: &mut State, req: &Req<'_>) -> Reply {
    let Some(url) = url_field(req) else {
        return validation("url", "required");
    };
    st.webhooks.retain(|u| *u != url);
    Reply::ok(json!({ "ok": true }))
}

/// `GET /core/v1/accounts/self`.
pub(super) fn account_self(st: &State) -> Reply {
    let id = st.config.user_id;
    Reply::ok(json!({
        "id": id,
        "name": ACCOUNT_NAME,
        "email": "shop@example.com",
        "phone": "79990001122",
        "phones": ["79990001122"],
        "profile_url": format!("https://www.avito.ru/user/{id}/profile"),
    }))
}

fn bounded(req: &Req<'_>, key: &str, default: i64, min: i64, max: i64) -> Result<i64, Reply> {
    match req.param(key).map(|v| v.trim().parse::<i64>()) {
        None => Ok(default),
        Some(Ok(n)) if (min..=max).contains(&n) => Ok(n),
        Some(_) => Err(validation(key, &format!("must be between {min} and {max}"))),
    }
}

fn user_json(id: u64, name: &str, item_id: u64) -> Value {
    json!({
        "id": id,
        "name": name,
        "public_user_profile": {
            "user_id": id,
            "item_id": item_id,
            "avatar": { "default": "https://static.avito.ru/stub_avatars/default.png", "images": {} },
            "url": format!("https://www.avito.ru/user/{id}/profile"),
        },
    })
}

fn message_json(st: &State, m: &Message) -> Value {
    let direction = if m.author_id == st.config.user_id {
        "out"
    } else {
        "in"
    };
    json!({
        "id": m.id,
        "author_id": m.author_id,
        "created": m.created,
        "direction": direction,
        "type": "text",
        "content": { "text": m.text },
        "is_read": m.read.is_some(),
        "read": m.read,
        "quote": null,
    })
}

fn unread(st: &State, chat: &Chat) -> bool {
    chat.messages
        .iter()
        .any(|m| m.author_id != st.config.user_id && m.read.is_none())
}

fn chat_json(st: &State, chat: &Chat) -> Value {
    let user_id = st.config.user_id;
    let last = chat
        .messages
        .last()
        .map_or(Value::Null, |m| message_json(st, m));
    let mut users = vec![user_json(user_id, ACCOUNT_NAME, chat.item_id)];
    if chat.buyer_id != 0 {
        users.push(user_json(chat.buyer_id, &chat.buyer_name, chat.item_id));
    }
    json!({
        "id": chat.id,
        "created": chat.created,
        "updated": chat.updated,
        "context": {
            "type": "item",
            "value": {
                "id": chat.item_id,
                "title": chat.item_title,
                "price_string": "1 000 ₽",
                "url": format!("https://www.avito.ru/items/{}", chat.item_id),
                "status_id": 10,
                "user_id": user_id,
                "images": { "main": { "140x105": "https://static.avito.ru/item.jpg" }, "count": 1 },
            }
        },
        "last_message": last,
        "users": users,
    })
}

/// `GET /messenger/v2/accounts/{user_id}/chats`.
pub(super) fn chats(st: &State, req: &Req<'_>) -> Reply {
    let limit = match bounded(req, "limit", 100, 1, 100) {
        Ok(n) => n as usize,
        Err(reply) => return reply,
    };
    let offset = match bounded(req, "offset", 0, 0, 1000) {
        Ok(n) => n as usize,
        Err(reply) => return reply,
    };
    let unread_only = match req.param("unread_only").map(str::trim) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(_) => return validation("unread_only", "must be a boolean"),
    };
    let item_ids: Vec<u64> = req
        .list("item_ids")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let chat_types = req.list("chat_types");
    if !chat_types.is_empty() && !chat_types.iter().any(|t| t == "u2i") {
        return Reply::ok(json!({ "chats": [] }));
    }
    let mut list: Vec<&Chat> = st
        .chats
        .iter()
        .filter(|c| !unread_only || unread(st, c))
        .filter(|c| item_ids.is_empty() || item_ids.contains(&c.item_id))
        .collect();
    list.sort_by(|a, b| b.updated.cmp(&a.updated).then_with(|| a.id.cmp(&b.id)));
    let chats: Vec<Value> = list
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|c| chat_json(st, c))
        .collect();
    Reply::ok(json!({ "chats": chats }))
}

/// `GET /messenger/v2/accounts/{user_id}/chats/{chat_id}`.
pub(super) fn chat(st: &State, chat_id: &str) -> Reply {
    match st.chat(chat_id) {
        Some(chat) => Reply::ok(chat_json(st, chat)),
        None => not_found(),
    }
}

/// `GET /messenger/v3/accounts/{user_id}/chats/{chat_id}/messages/`: newest
/// first; does not mark anything read.
pub(super) fn messages(st: &State, req: &Req<'_>, chat_id: &str) -> Reply {
    let limit = match bounded(req, "limit", 100, 1, 100) {
        Ok(n) => n as usize,
        Err(reply) => return reply,
    };
    let offset = match bounded(req, "offset", 0, 0, 1000) {
        Ok(n) => n as usize,
        Err(reply) => return reply,
    };
    let Some(chat) = st.chat(chat_id) else {
        return not_found();
    };
    let list: Vec<Value> = chat
        .messages
        .iter()
        .rev()
        .skip(offset)
        .take(limit)
        .map(|m| message_json(st, m))
        .collect();
    Reply::ok(Value::Array(list))
}

/// `POST /messenger/v1/accounts/{user_id}/chats/{chat_id}/messages`: returns
/// the reply and the webhook body to deliver (Avito echoes own messages).
pub(super) fn send(st: &mut State, req: &Req<'_>, chat_id: &str) -> (Reply, Option<Value>) {
    let body: Option<Value> = serde_json::from_slice(req.body).ok();
    let text = body
        .as_ref()
        .and_then(|b| b.get("message"))
        .and_then(|m| m.get("text"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return (validation("message.text", "required"), None);
    };
    if text.chars().count() > 1000 {
        return (validation("message.text", "at most 1000 characters"), None);
    }
    if st.chat(chat_id).is_none() {
        return (not_found(), None);
    }
    let (id, webhook) = st.seller_message(chat_id, &text);
    let created = st
        .chat(chat_id)
        .and_then(|c| c.messages.last())
        .map_or(0, |m| m.created);
    let reply = Reply::ok(json!({
        "id": id,
        "created": created,
        "direction": "out",
        "type": "text",
        "content": { "text": text },
    }));
    (reply, Some(webhook))
}

/// `POST /messenger/v1/accounts/{user_id}/chats/{chat_id}/read`.
pub(super) fn read(st: &mut State, chat_id: &str) -> Reply {
    let user_id = st.config.user_id;
    let now = chrono::Utc::now().timestamp();
    let Some(chat) = st.chat_mut(chat_id) else {
        return not_found();
    };
    for m in chat.messages.iter_mut() {
        if m.author_id != user_id && m.read.is_none() {
            m.read = Some(now);
        }
    }
    Reply::ok(json!({ "ok": true }))
}
