//! Kaspi Shop API (JSON:API) wire types, private to the connector. Attributes
//! are kept as JSON and read leniently (numbers as ints or floats, delivery
//! fields top-level or under `kaspiDelivery`, nullable blocks).

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub(super) struct ListEnvelope {
    #[serde(default)]
    pub data: Vec<Resource>,
    #[serde(default)]
    pub included: Vec<Resource>,
    #[serde(default)]
    pub meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
pub(super) struct SingleEnvelope {
    pub data: Resource,
    #[serde(default)]
    pub included: Vec<Resource>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Meta {
    #[serde(rename = "pageCount", default)]
    pub page_count: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct Resource {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub id: String,
    #[serde(default)]
    pub attributes: Value,
    #[serde(default)]
    pub relationships: Value,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorsEnvelope {
    #[serde(default)]
    pub errors: Vec<ErrorItem>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorItem {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

impl ErrorsEnvelope {
    /// `errors[0].detail || errors[0].title`, as clients read it.
    pub fn message(&self) -> Option<String> {
        self.errors
            .first()
            .and_then(|e| e.detail.clone().or_else(|| e.title.clone()))
    }
}

/// Reads an attribute that may be a string, a number, a bool or null.
pub(super) fn text(value: &Value, key: &str) -> Option<String> {
    match value.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn number(value: &Value, key: &str) -> Option<f64> {
    match value.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn millis(value: &Value, key: &str) -> Option<i64> {
    number(value, key).map(|f| f as i64)
}

pub(super) fn flag(value: &Value, key: &str) -> bool {
    match value.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

/// A delivery field, from `kaspiDelivery` (newer doc) or the top level (older doc).
pub(super) fn delivery<'a>(attributes: &'a Value, key: &str) -> Option<&'a Value> {
    attributes
        .get("kaspiDelivery")
        .and_then(|d| d.get(key))
        .filter(|v| !v.is_null())
        .or_else(|| attributes.get(key).filter(|v| !v.is_null()))
}
