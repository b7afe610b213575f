//! Parsing of Avito messenger webhook deliveries (v3): `{id, version,
//! timestamp, payload: {type, value: message}}`; an empty `{}` is Avito's probe.

use serde_json::Value;

/// What a delivery carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Avito checking the URL answers: `{}`.
    Probe,
    Message(MessengerMessage),
    /// Another payload type (not a message).
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessengerMessage {
    pub message_id: String,
    pub chat_id: String,
    /// The account the webhook belongs to.
    pub user_id: u64,
    pub author_id: u64,
    pub item_id: Option<u64>,
    pub created: i64,
    /// `text`, `system`, `image`, …
    pub kind: String,
    pub text: Option<String>,
}

impl MessengerMessage {
    /// The account's own outgoing message.
    pub fn is_own(&self) -> bool {
        self.author_id == self.user_id
    }

    /// A buyer's text message (what becomes a lead).
    pub fn is_buyer_text(&self) -> bool {
        !self.is_own() && self.kind == "text"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the delivery lacks `{0}`")]
    Missing(&'static str),
}

pub fn parse(body: &[u8]) -> Result<Delivery, WebhookError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::NotJson(e.to_string()))?;
    if value.as_object().is_some_and(|o| o.is_empty()) {
        return Ok(Delivery::Probe);
    }
    let payload = value
        .get("payload")
        .ok_or(WebhookError::Missing("payload"))?;
    let kind = payload
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind != "message" {
        return Ok(Delivery::Other(kind.to_string()));
    }
    let m = payload
        .get("value")
        .ok_or(WebhookError::Missing("payload.value"))?;
    let text_of = |k: &'static str| {
        m.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(WebhookError::Missing(k))
    };
    let number = |k: &'static str| {
        m.get(k)
            .and_then(Value::as_u64)
            .ok_or(WebhookError::Missing(k))
    };
    Ok(Delivery::Message(MessengerMessage {
        message_id: text_of("id")?,
        chat_id: text_of("chat_id")?,
        user_id: number("user_id")?,
        author_id: number("author_id")?,
        item_id: m.get("item_id").and_then(Value::as_u64),
        created: m.get("created").and_then(Value::as_i64).unwrap_or_default(),
        kind: m
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        text: m
            .get("content")
            .and_then(|c| c.get("text"))
            .and_then(Value::as_str)
            .map(str::to_string),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_delivery_and_the_probe() {
        let body = r#"{"id":"abc","version":"v3.0.0","timestamp":1754382000,"payload":{"type":"message","value":{"id":"bdcc","chat_id":"u2i-x","chat_type":"u2i","user_id":94235311,"author_id":141906442,"item_id":1768287444,"created":1754382000,"published_at":"2026-08-05T07:00:00Z","read":null,"type":"text","content":{"text":"Здравствуйте"}}}}"#;
        let Delivery::Message(m) = parse(body.as_bytes()).unwrap() else {
            panic!("a message")
        };
        assert_eq!(m.chat_id, "u2i-x");
        assert!(m.is_buyer_text());
        assert_eq!(m.text.as_deref(), Some("Здравствуйте"));
        assert_eq!(parse(b"{}").unwrap(), Delivery::Probe);
        assert!(parse(b"not json").is_err());
    }
}
