//! amoCRM API v4 wire types (private to the connector). Parsing is lenient:
//! optional fields are optional, unknown fields are ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{"_links": {"next": {"href": …}}}`
#[derive(Debug, Default, Deserialize)]
pub(super) struct Links {
    pub next: Option<Href>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Href {
    #[allow(dead_code)]
    pub href: String,
}

/// A HAL page: `_embedded` holds the entity list.
#[derive(Debug, Deserialize)]
pub(super) struct Hal<T> {
    #[serde(rename = "_embedded")]
    pub embedded: T,
    #[serde(rename = "_links", default)]
    pub links: Option<Links>,
}

impl<T> Hal<T> {
    pub fn has_next(&self) -> bool {
        self.links.as_ref().is_some_and(|l| l.next.is_some())
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct Pipelines {
    pub pipelines: Vec<PipelineWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct PipelineWire {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub is_main: bool,
    #[serde(default)]
    pub is_archive: bool,
    #[serde(rename = "_embedded", default)]
    pub embedded: Option<Statuses>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct Statuses {
    #[serde(default)]
    pub statuses: Vec<StatusWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct StatusWire {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub sort: i64,
    #[serde(rename = "type", default)]
    pub kind: i64,
}

#[derive(Debug, Deserialize)]
pub(super) struct CustomFields {
    pub custom_fields: Vec<CustomFieldWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CustomFieldWire {
    pub id: u64,
    pub name: String,
    #[serde(rename = "type", default)]
    pub field_type: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub enums: Option<Vec<EnumWire>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct EnumWire {
    pub id: u64,
    pub value: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct Users {
    pub users: Vec<UserWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct UserWire {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub rights: Option<UserRightsWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct UserRightsWire {
    #[serde(default = "yes")]
    pub is_active: bool,
}

fn yes() -> bool {
    true
}

/// `_embedded.leads[]` of a create or update answer, and of reads.
#[derive(Debug, Deserialize)]
pub(super) struct Leads {
    pub leads: Vec<LeadWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct LeadWire {
    pub id: u64,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub price: Option<Value>,
    #[serde(default)]
    pub status_id: Option<u64>,
    #[serde(default)]
    pub pipeline_id: Option<u64>,
    #[serde(default)]
    pub responsible_user_id: Option<u64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
    #[serde(default)]
    pub custom_fields_values: Option<Vec<FieldValueWire>>,
    #[serde(rename = "_embedded", default)]
    pub embedded: Option<LeadEmbedded>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct LeadEmbedded {
    #[serde(default)]
    pub tags: Vec<TagWire>,
    #[serde(default)]
    pub contacts: Vec<IdWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct TagWire {
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct IdWire {
    pub id: u64,
}

/// A custom field value as read: `values[{value, enum_id, enum_code}]`.
#[derive(Debug, Deserialize)]
pub(super) struct FieldValueWire {
    #[serde(default)]
    pub field_id: Option<u64>,
    #[serde(default)]
    pub field_code: Option<String>,
    #[serde(default)]
    pub values: Vec<FieldItemWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct FieldItemWire {
    #[serde(default)]
    pub value: Option<Value>,
    #[serde(default)]
    pub enum_id: Option<u64>,
}

/// One row of the bare-array answer of `/leads/complex`.
#[derive(Debug, Deserialize)]
pub(super) struct ComplexCreatedWire {
    pub id: u64,
    #[serde(default)]
    pub contact_id: Option<u64>,
    #[serde(default)]
    pub request_id: Vec<String>,
    #[serde(default)]
    pub merged: bool,
}

#[derive(Debug, Deserialize)]
pub(super) struct Contacts {
    pub contacts: Vec<ContactWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ContactWire {
    pub id: u64,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub updated_at: Option<i64>,
    #[serde(default)]
    pub custom_fields_values: Option<Vec<FieldValueWire>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Events {
    pub events: Vec<EventWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct EventWire {
    pub id: Value,
    #[serde(rename = "type")]
    pub kind: String,
    pub entity_id: u64,
    #[serde(default)]
    pub created_by: u64,
    pub created_at: i64,
    #[serde(default)]
    pub value_before: Vec<Value>,
    #[serde(default)]
    pub value_after: Vec<Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Webhooks {
    pub webhooks: Vec<WebhookWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WebhookWire {
    pub id: u64,
    pub destination: String,
    #[serde(default)]
    pub settings: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
}

/// The problem+json error body.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Problem {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub hint: Option<String>,
    #[serde(default)]
    pub retry_after: Option<Value>,
    #[serde(rename = "validation-errors", default)]
    pub validation_errors: Option<Vec<ValidationWire>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ValidationWire {
    #[serde(default)]
    pub request_id: Option<Value>,
    #[serde(default)]
    pub errors: Vec<ValidationItemWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ValidationItemWire {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

/// The token endpoint's answer.
#[derive(Deserialize)]
pub(super) struct TokenWire {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
}

/// The token endpoint's request.
#[derive(Serialize)]
pub(super) struct RefreshRequest<'a> {
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub grant_type: &'static str,
    pub refresh_token: &'a str,
    pub redirect_uri: &'a str,
}

/// A request id as amoCRM echoes it: a string, a number, or an array of strings.
pub(super) fn request_id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(items) => items.first().and_then(request_id_text),
        _ => None,
    }
}

/// A value that may come as a number or a numeric string.
pub(super) fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f.round() as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
