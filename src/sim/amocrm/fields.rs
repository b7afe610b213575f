//! Lead custom-field values on writes: identification by `field_id` or
//! `field_code`, per-type checks (enum ids or labels, numbers, dates moved to
//! the account timezone's midnight), and merging into the stored read form.

use serde_json::{json, Value};

use super::state::{Field, TZ_OFFSET_SECS};
use super::wire::Check;

const ENUM_TYPES: [&str; 4] = ["select", "radiobutton", "multiselect", "category"];

/// `date` and `birthday` values move to midnight of their day in the account timezone.
fn local_midnight(ts: i64) -> i64 {
    let local = ts + TZ_OFFSET_SECS;
    local - local.rem_euclid(86_400) - TZ_OFFSET_SECS
}

/// One value item of a write, checked against the field's type.
fn field_value(f: &Field, v: &Value, path: &str, check: &mut Check) -> Option<Value> {
    let Some(obj) = v.as_object() else {
        check.err("InvalidType", path, "This value should be of type object.");
        return None;
    };
    let value = obj.get("value").unwrap_or(&Value::Null);
    let ft = f.field_type.as_str();
    if ENUM_TYPES.contains(&ft) {
        let found = match (obj.get("enum_id").and_then(Value::as_u64), value) {
            (Some(id), _) => f.enums.iter().find(|(e, _)| *e == id),
            (None, Value::String(label)) => f.enums.iter().find(|(_, l)| l == label),
            _ => None,
        };
        return match found {
            Some((id, label)) => Some(json!({"value": label, "enum_id": id, "enum_code": null})),
            None => {
                let key = if obj.contains_key("enum_id") {
                    "enum_id"
                } else {
                    "value"
                };
                check.not_choice(format!("{path}.{key}"));
                None
            }
        };
    }
    let stored = match ft {
        "checkbox" => value.as_bool().map(Value::Bool),
        "numeric" | "price" | "monetary" => match value {
            Value::Number(_) => Some(value.clone()),
            Value::String(s) if s.trim().parse::<f64>().is_ok() => Some(value.clone()),
            _ => None,
        },
        "date" | "date_time" | "birthday" => {
            let ts = match value {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            };
            ts.map(|t| {
                json!(if ft == "date_time" {
                    t
                } else {
                    local_midnight(t)
                })
            })
        }
        _ => match value {
            Value::String(_) => Some(value.clone()),
            Value::Number(n) => Some(Value::String(n.to_string())),
            _ => None,
        },
    };
    if stored.is_none() {
        check.err(
            "InvalidType",
            format!("{path}.value"),
            "This value is not valid.",
        );
    }
    stored.map(|v| json!({"value": v}))
}

/// Resolves `custom_fields_values` of a lead write into read-form entries;
/// `None` for a field means "clear it" (`values: null` or `[]`).
pub(super) fn resolve_fields(
    fields: &[Field],
    raw: &Value,
    check: &mut Check,
) -> Vec<(u64, Option<Value>)> {
    let Some(entries) = raw.as_array() else {
        check.err(
            "InvalidType",
            "custom_fields_values",
            "This value should be of type array.",
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let path = format!("custom_fields_values.{i}");
        let by_id = entry.get("field_id").and_then(Value::as_u64);
        let by_code = entry.get("field_code").and_then(Value::as_str);
        let field = fields.iter().find(|f| match (by_id, by_code) {
            (Some(id), _) => f.id == id,
            (None, Some(code)) => f.code.as_deref() == Some(code),
            (None, None) => false,
        });
        let Some(field) = field else {
            let key = if by_id.is_none() && by_code.is_some() {
                "field_code"
            } else {
                "field_id"
            };
            check.not_choice(format!("{path}.{key}"));
            continue;
        };
        let values = match entry.get("values") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(vs)) => vs.clone(),
            Some(_) => {
                check.err(
                    "InvalidType",
                    format!("{path}.values"),
                    "This value should be of type array.",
                );
                continue;
            }
        };
        let items: Vec<Value> = values
            .iter()
            .enumerate()
            .filter_map(|(j, v)| field_value(field, v, &format!("{path}.values.{j}"), check))
            .collect();
        let read = (!items.is_empty()).then(|| {
            json!({
                "field_id": field.id,
                "field_name": field.name,
                "field_code": field.code,
                "field_type": field.field_type,
                "values": items,
            })
        });
        out.push((field.id, read));
    }
    out
}

pub(super) fn merge_fields(current: &mut Vec<Value>, updates: Vec<(u64, Option<Value>)>) {
    for (id, entry) in updates {
        let pos = current
            .iter()
            .position(|e| e["field_id"].as_u64() == Some(id));
        match (pos, entry) {
            (Some(p), Some(e)) => current[p] = e,
            (Some(p), None) => {
                current.remove(p);
            }
            (None, Some(e)) => current.push(e),
            (None, None) => {}
        }
    }
}
