//! The Avito connector: the client (cached `client_credentials` token, a
//! limiter per endpoint plus a global cap, orders, transitions gated by
//! `availableActions`, messenger), error classification with both error
//! envelopes, the status keys, and the messenger webhook parsing.

mod client;
mod convert;
mod error;
pub mod webhook;
mod wire;

pub use client::{parse_orders_page, AvitoAccount, AvitoClient, AvitoLimiters, ORDERS_PAGE};
pub use error::AvitoError;

use chrono::{DateTime, Utc};

use crate::domain::{Money, Order};

/// Every status key this connector produces (besides `unknown:…`): Avito's own statuses.
pub const STATUS_KEYS: &[&str] = &[
    "on_confirmation",
    "ready_to_ship",
    "in_transit",
    "delivered",
    "closed",
    "canceled",
    "on_return",
    "in_dispute",
];

/// Keys after which the order does not change any more.
pub const TERMINAL_KEYS: &[&str] = &["closed", "canceled"];

/// Statuses still expected to change (polled by status).
pub const ACTIVE_STATUSES: &[&str] = &[
    "on_confirmation",
    "ready_to_ship",
    "in_transit",
    "delivered",
    "on_return",
    "in_dispute",
];

/// The endpoints with limits of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Orders,
    Transition,
    Tracking,
    Other,
}

impl Endpoint {
    pub fn as_str(&self) -> &'static str {
        match self {
            Endpoint::Orders => "orders",
            Endpoint::Transition => "applyTransition",
            Endpoint::Tracking => "setTrackingNumber",
            Endpoint::Other => "other",
        }
    }
}

/// An Avito order as read.
#[derive(Debug, Clone, PartialEq)]
pub struct AvitoOrder {
    pub order: Order,
    /// (action, required) the seller can take now.
    pub available_actions: Vec<(String, bool)>,
    pub updated_at: DateTime<Utc>,
    pub confirm_till: Option<DateTime<Utc>>,
    pub ship_till: Option<DateTime<Utc>>,
    pub delivery_date_max: Option<DateTime<Utc>>,
    /// Avito's commission on the order.
    pub commission: Money,
    /// What the seller receives: goods minus discounts and commission.
    pub payout: Money,
    /// The order's number in Avito's newer system (labels, click-and-collect).
    pub marketplace_id: Option<String>,
    /// The delivery service, e.g. "Boxberry".
    pub service_name: Option<String>,
    /// Hash of status and `updatedAt`: equal means unchanged.
    pub content_hash: String,
}

/// A messenger chat.
#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    pub id: String,
    pub item_id: Option<u64>,
    pub item_title: Option<String>,
    pub item_price: Option<String>,
    pub item_url: Option<String>,
    /// (user id, name) of the chat's users.
    pub users: Vec<(u64, String)>,
}

/// A messenger message.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub id: String,
    pub chat_id: String,
    pub author_id: u64,
    pub created: i64,
    pub kind: String,
    pub text: Option<String>,
}
