//! The simulated account: tokens, orders, chats, webhooks, limits, faults and
//! the request log.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::SimWebhookDelivery;
use super::{AvitoFault, AvitoSimConfig, SimAvitoOrder, SimAvitoOrderSpec, SimRequest};

pub(super) struct Order {
    pub spec: SimAvitoOrderSpec,
    pub status: String,
    pub updated_at: DateTime<Utc>,
    pub tracking_number: Option<String>,
    pub transitions: Vec<String>,
}

impl Order {
    pub fn sim(&self) -> SimAvitoOrder {
        SimAvitoOrder {
            id: self.spec.id.clone(),
            status: self.status.clone(),
            updated_at: self.updated_at,
            tracking_number: self.tracking_number.clone(),
            transitions: self.transitions.clone(),
        }
    }

    /// Bumps `updatedAt` so that the change shows in a whole-second timestamp.
    pub fn touch(&mut self) {
        let now = whole_seconds(Utc::now());
        let next = whole_seconds(self.updated_at) + chrono::Duration::seconds(1);
        self.updated_at = now.max(next);
    }

    pub fn move_to(&mut self, status: &str) {
        self.status = status.to_string();
        self.touch();
    }

    /// `(name, required)` of the actions the seller can take now.
    pub fn actions(&self) -> Vec<(&'static str, bool)> {
        let service = self.spec.service_type.as_str();
        match self.status.as_str() {
            "on_confirmation" => vec![("confirm", true), ("reject", false)],
            "ready_to_ship" if service == "rdbs" => vec![("perform", true), ("reject", false)],
            "ready_to_ship" if service == "dbs" => vec![("setTrackNumber", true)],
            "in_transit" if service == "rdbs" || service == "cnc" => vec![("receive", true)],
            _ => Vec::new(),
        }
    }

    pub fn allows(&self, action: &str) -> bool {
        self.actions().iter().any(|(name, _)| *name == action)
    }
}

fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(super) struct Message {
    pub id: String,
    pub author_id: u64,
    pub created: i64,
    pub text: String,
    /// Unix seconds when it was read; `None` while unread.
    pub read: Option<i64>,
}

pub(super) struct Chat {
    pub id: String,
    pub item_id: u64,
    pub item_title: String,
    pub buyer_id: u64,
    pub buyer_name: String,
    pub created: i64,
    pub updated: i64,
    pub messages: Vec<Message>,
}

/// A sliding window of served requests.
#[derive(Default)]
pub(super) struct Window(VecDeque<Instant>);

impl Window {
    /// Whether one more request fits `limit` within `span`.
    pub fn has_room(&mut self, now: Instant, span: Duration, limit: u32) -> bool {
        while self
            .0
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= span)
        {
            self.0.pop_front();
        }
        self.0.len() < limit as usize
    }

    pub fn record(&mut self, now: Instant) {
        self.0.push_back(now);
    }
}

pub(super) struct State {
    pub config: AvitoSimConfig,
    /// token → when it expires.
    pub tokens: HashMap<String, Instant>,
    pub token_calls: usize,
    pub orders: Vec<Order>,
    pub chats: Vec<Chat>,
    pub webhooks: Vec<String>,
    pub deliveries: Vec<SimWebhookDelivery>,
    pub faults: VecDeque<AvitoFault>,
    /// Every n-th request gets this fault until lifted (after queued ones).
    pub steady_fault: Option<crate::sim::support::SteadyFault<AvitoFault>>,
    pub success_false: usize,
    pub requests: Vec<SimRequest>,
    /// 429s a rate limit gave (injected ones not counted).
    pub rate_limited: usize,
    pub global: Window,
    pub per_endpoint: HashMap<&'static str, Window>,
}

/// How a bearer token checks out.
pub(super) enum TokenCheck {
    Valid,
    Missing,
    Unknown,
    Expired,
}

impl State {
    pub fn new(config: AvitoSimConfig) -> State {
        State {
            config,
            tokens: HashMap::new(),
            token_calls: 0,
            orders: Vec::new(),
            chats: Vec::new(),
            webhooks: Vec::new(),
            deliveries: Vec::new(),
            faults: VecDeque::new(),
            steady_fault: None,
            success_false: 0,
            requests: Vec::new(),
            rate_limited: 0,
            global: Window::default(),
            per_endpoint: HashMap::new(),
        }
    }

    pub fn issue_token(&mut self) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.tokens
            .insert(token.clone(), Instant::now() + self.config.token_ttl);
        token
    }

    pub fn expire_tokens(&mut self) {
        let now = Instant::now();
        for expiry in self.tokens.values_mut() {
            *expiry = now;
        }
    }

    pub fn check_token(&self, authorization: Option<&str>) -> TokenCheck {
        let Some(value) = authorization else {
            return TokenCheck::Missing;
        };
        let value = value.trim();
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return TokenCheck::Missing,
        };
        match self.tokens.get(token) {
            None => TokenCheck::Unknown,
            Some(expiry) if Instant::now() >= *expiry => TokenCheck::Expired,
            Some(_) => TokenCheck::Valid,
        }
    }

    pub fn create_order(&mut self, spec: SimAvitoOrderSpec) -> SimAvitoOrder {
        let order = Order {
            status: spec.status.clone(),
            updated_at: spec.created_at,
            tracking_number: None,
            transitions: Vec::new(),
            spec,
        };
        let sim = order.sim();
        self.orders.retain(|o| o.spec.id != order.spec.id);
        self.orders.push(order);
        sim
    }

    pub fn find(&self, id: &str) -> Option<&Order> {
        self.orders.iter().find(|o| o.spec.id == id)
    }

    pub fn find_mut(&mut self, id: &str) -> Option<&mut Order> {
        self.orders.iter_mut().find(|o| o.spec.id == id)
    }

    pub fn chat(&self, id: &str) -> Option<&Chat> {
        self.chats.iter().find(|c| c.id == id)
    }

    pub fn chat_mut(&mut self, id: &str) -> Option<&mut Chat> {
        self.chats.iter_mut().find(|c| c.id == id)
    }

    /// The chat, created when new.
    fn chat_entry(
        &mut self,
        chat_id: &str,
        item_id: u64,
        item_title: &str,
        buyer_id: u64,
        buyer_name: &str,
    ) -> &mut Chat {
        let index = match self.chats.iter().position(|c| c.id == chat_id) {
            Some(index) => index,
            None => {
                let now = Utc::now().timestamp();
                self.chats.push(Chat {
                    id: chat_id.to_string(),
                    item_id,
                    item_title: item_title.to_string(),
                    buyer_id,
                    buyer_name: buyer_name.to_string(),
                    created: now,
                    updated: now,
                    messages: Vec::new(),
                });
                self.chats.len() - 1
            }
        };
        &mut self.chats[index]
    }

    /// Stores a message in a chat; returns its id and the v3 webhook body.
    fn add_message(&mut self, chat_id: &str, author_id: u64, text: &str) -> (String, Value) {
        let user_id = self.config.user_id;
        let now = Utc::now();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let Some(chat) = self.chat_mut(chat_id) else {
            return (id, Value::Null);
        };
        chat.updated = now.timestamp();
        chat.messages.push(Message {
            id: id.clone(),
            author_id,
            created: now.timestamp(),
            text: text.to_string(),
            // The account's own messages count as read.
            read: (author_id == user_id).then_some(now.timestamp()),
        });
        let item_id = chat.item_id;
        let body = json!({
            "id": uuid::Uuid::new_v4().simple().to_string(),
            "version": "v3.0.0",
            "timestamp": now.timestamp(),
            "payload": {
                "type": "message",
                "value": {
                    "id": id,
                    "chat_id": chat_id,
                    "chat_type": "u2i",
                    "user_id": user_id,
                    "author_id": author_id,
                    "item_id": item_id,
                    "created": now.timestamp(),
                    "published_at": rfc3339(now),
                    "read": null,
                    "type": "text",
                    "content": { "text": text },
                }
            }
        });
        (id, body)
    }

    pub fn buyer_message(
        &mut self,
        chat_id: &str,
        item_id: u64,
        item_title: &str,
        author_id: u64,
        author_name: &str,
        text: &str,
    ) -> (String, Value) {
        self.chat_entry(chat_id, item_id, item_title, author_id, author_name);
        self.add_message(chat_id, author_id, text)
    }

    /// The account writes; a chat unknown so far is created without an item.
    pub fn seller_message(&mut self, chat_id: &str, text: &str) -> (String, Value) {
        let user_id = self.config.user_id;
        self.chat_entry(chat_id, 0, "", 0, "");
        self.add_message(chat_id, user_id, text)
    }
}
