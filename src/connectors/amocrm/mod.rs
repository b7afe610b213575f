//! The amoCRM (Kommo) API v4 connector: the client (auth with rotating OAuth
//! tokens kept in PostgreSQL, the account's shared rate limiter, a circuit
//! breaker for 403 blocks, error classification), the operations the bridge
//! needs, and the parsing of account webhooks. Wire types stay in `wire`.

mod client;
mod error;
mod ops;
pub mod webhook;
mod wire;

pub use client::{AmoAccount, AmoAuth, AmoClient};
pub use error::{AmoError, ItemRejection};
pub(crate) use ops::resolve_request_id;
pub use ops::{BATCH, RATE_MARGIN};

use crate::domain::{Email, Phone};

/// A pipeline with its stages, in amoCRM's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub id: u64,
    pub name: String,
    pub is_main: bool,
    pub is_archive: bool,
    pub stages: Vec<Stage>,
}

/// A stage (status) of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub id: u64,
    pub name: String,
    pub sort: i64,
    pub kind: StageKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    /// "Incoming leads" (type 1).
    Incoming,
    Regular,
    /// 142, "Closed - won": the same id in every pipeline.
    Won,
    /// 143, "Closed - lost": the same id in every pipeline.
    Lost,
}

pub const WON_STATUS_ID: u64 = 142;
pub const LOST_STATUS_ID: u64 = 143;

/// A lead custom field definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomField {
    pub id: u64,
    pub name: String,
    pub field_type: String,
    pub code: Option<String>,
    /// (enum id, label) of select-like fields.
    pub enums: Vec<(u64, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub email: Option<String>,
    /// `rights.is_active`: deactivated users stay listed but must never be
    /// made responsible.
    pub active: bool,
}

/// A value to write into a custom field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldInput {
    Text(String),
    Number(f64),
    /// A select option by id.
    Enum(u64),
    Flag(bool),
    /// A date or date-time, Unix seconds.
    Timestamp(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldValue {
    pub field_id: u64,
    pub values: Vec<FieldInput>,
}

/// A lead to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLead {
    /// Stable key (the order code); echoed by amoCRM to match answers to items.
    pub request_id: String,
    pub name: String,
    pub price: Option<i64>,
    pub pipeline_id: u64,
    pub status_id: u64,
    pub responsible_user_id: Option<u64>,
    pub fields: Vec<FieldValue>,
    pub tags: Vec<String>,
    pub contact_ids: Vec<u64>,
}

/// A contact to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewContact {
    pub request_id: String,
    pub name: String,
    pub phone: Option<Phone>,
    pub email: Option<Email>,
}

/// A lead plus (optionally) a new contact, for `/leads/complex`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewComplexLead {
    pub lead: NewLead,
    pub contact: Option<NewContact>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComplexCreated {
    pub request_id: String,
    pub lead_id: u64,
    pub contact_id: Option<u64>,
    /// Duplicate control merged the lead into an existing one.
    pub merged: bool,
}

/// A change to an existing lead; `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LeadUpdate {
    pub id: u64,
    /// (pipeline id, status id): always sent together.
    pub stage: Option<(u64, u64)>,
    pub name: Option<String>,
    pub price: Option<i64>,
    pub responsible_user_id: Option<u64>,
    pub fields: Vec<FieldValue>,
    /// Added without touching the lead's other tags.
    pub tags_to_add: Vec<String>,
}

/// A lead as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Lead {
    pub id: u64,
    pub name: String,
    pub price: Option<i64>,
    pub pipeline_id: u64,
    pub status_id: u64,
    pub responsible_user_id: Option<u64>,
    pub updated_at: i64,
    /// (field id, values as text).
    pub fields: Vec<(u64, Vec<String>)>,
    pub tags: Vec<String>,
    pub contact_ids: Vec<u64>,
}

/// A contact as read: phones and emails as stored (unnormalised).
#[derive(Debug, Clone, PartialEq)]
pub struct Contact {
    pub id: u64,
    pub name: String,
    pub phones: Vec<String>,
    pub emails: Vec<String>,
    pub updated_at: i64,
}

/// A note on a lead (`common`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewNote {
    pub request_id: String,
    pub lead_id: u64,
    pub text: String,
}

/// A task, usually on a lead.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub request_id: String,
    pub text: String,
    /// Deadline, Unix seconds.
    pub complete_till: i64,
    pub responsible_user_id: Option<u64>,
    pub lead_id: Option<u64>,
}

/// What a batch write did, item by item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// (request id, entity id) of each item written.
    pub done: Vec<(String, u64)>,
    /// Items amoCRM refused, with its reasons; the rest went through.
    pub rejected: Vec<ItemRejection>,
}

/// A `lead_status_changed` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// Event ids are strings.
    pub id: String,
    pub lead_id: u64,
    /// 0: a robot or the system.
    pub created_by: u64,
    pub created_at: i64,
    /// (pipeline id, status id) before and after.
    pub before: Option<(u64, u64)>,
    pub after: Option<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: u64,
    pub destination: String,
    pub settings: Vec<String>,
    pub disabled: bool,
}
