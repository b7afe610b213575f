//! A partner's lead, read from its JSON through the source's field map (slot →
//! JSON pointer). Every datum that is required and missing, or present with
//! the wrong type, is named at once; nothing is half-read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::Phone;

/// What a partner programme sends about one device a seller offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartnerLead {
    pub lead_id: String,
    pub status: Option<String>,
    pub model: Option<String>,
    pub memory: Option<String>,
    pub colour: Option<String>,
    pub condition: Option<String>,
    pub defects: Vec<String>,
    pub buyout_price: Option<f64>,
    pub client_price: Option<f64>,
    pub seller_name: Option<String>,
    #[serde(with = "crate::domain::order::phone_serde")]
    pub seller_phone: Option<Phone>,
    pub city: Option<String>,
}

/// The longest text taken from one datum.
const MAX_TEXT: usize = 1_000;

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().replace(' ', "").replace(',', ".").parse().ok(),
        _ => None,
    }
    .filter(|v: &f64| v.is_finite() && *v >= 0.0)
}

/// Reads a lead; on failure, every problem (slot, pointer and what is wrong).
pub fn read_lead(
    fields: &BTreeMap<String, String>,
    required: &[String],
    body: &Value,
) -> Result<PartnerLead, Vec<String>> {
    let mut problems = Vec::new();
    if !body.is_object() {
        return Err(vec!["the lead is not a JSON object".into()]);
    }
    let at = |slot: &str| -> Option<(&String, &Value)> {
        let pointer = fields.get(slot)?;
        let value = body.pointer(pointer)?;
        (!value.is_null()).then_some((pointer, value))
    };
    for slot in required {
        let missing = match at(slot) {
            None => true,
            Some((_, Value::String(s))) => s.trim().is_empty(),
            Some(_) => false,
        };
        if missing {
            let pointer = fields.get(slot).map(String::as_str).unwrap_or("?");
            problems.push(format!("`{slot}` ({pointer}) is required and missing"));
        }
    }
    let text = |slot: &str, problems: &mut Vec<String>| -> Option<String> {
        let (pointer, value) = at(slot)?;
        match text_of(value) {
            Some(t) if t.chars().count() > MAX_TEXT => {
                problems.push(format!(
                    "`{slot}` ({pointer}) is longer than {MAX_TEXT} characters"
                ));
                None
            }
            Some(t) => Some(t).filter(|t| !t.is_empty()),
            None => {
                problems.push(format!(
                    "`{slot}` ({pointer}) must be a string or a number, not {}",
                    kind(value)
                ));
                None
            }
        }
    };
    let lead_id = text("lead_id", &mut problems);
    let status = text("status", &mut problems);
    let model = text("model", &mut problems);
    let memory = text("memory", &mut problems);
    let colour = text("colour", &mut problems);
    let condition = text("condition", &mut problems);
    let seller_name = text("seller_name", &mut problems);
    let city = text("city", &mut problems);
    let raw_phone = text("seller_phone", &mut problems);
    let seller_phone = match raw_phone {
        Some(raw) => match Phone::parse(&raw) {
            Ok(phone) => Some(phone),
            Err(error) => {
                problems.push(format!(
                    "`seller_phone` ({}) is not a phone number: {error}",
                    fields
                        .get("seller_phone")
                        .map(String::as_str)
                        .unwrap_or("?")
                ));
                None
            }
        },
        None => None,
    };
    let price = |slot: &str, problems: &mut Vec<String>| -> Option<f64> {
        let (pointer, value) = at(slot)?;
        let parsed = number_of(value);
        if parsed.is_none() {
            problems.push(format!(
                "`{slot}` ({pointer}) must be a non-negative number, not {}",
                kind(value)
            ));
        }
        parsed
    };
    let buyout_price = price("buyout_price", &mut problems);
    let client_price = price("client_price", &mut problems);
    let defects = match at("defects") {
        None => Vec::new(),
        Some((_, Value::String(s))) if s.trim().is_empty() => Vec::new(),
        Some((_, Value::String(s))) => vec![s.trim().to_string()],
        Some((pointer, Value::Array(items))) => {
            let texts: Vec<String> = items.iter().filter_map(text_of).collect();
            if texts.len() != items.len() || items.len() > 100 {
                problems.push(format!(
                    "`defects` ({pointer}) must be a list of at most 100 strings"
                ));
            }
            texts
        }
        Some((pointer, other)) => {
            problems.push(format!(
                "`defects` ({pointer}) must be a list of strings or a string, not {}",
                kind(other)
            ));
            Vec::new()
        }
    };
    match (lead_id, problems.is_empty()) {
        (Some(lead_id), true) => Ok(PartnerLead {
            lead_id,
            status,
            model,
            memory,
            colour,
            condition,
            defects,
            buyout_price,
            client_price,
            seller_name,
            seller_phone,
            city,
        }),
        _ => {
            if problems.is_empty() {
                problems.push("`lead_id` is missing".into());
            }
            Err(problems)
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map() -> BTreeMap<String, String> {
        [
            ("lead_id", "/id"),
            ("status", "/status"),
            ("model", "/device/model"),
            ("memory", "/device/memory_gb"),
            ("defects", "/device/defects"),
            ("buyout_price", "/prices/buyout"),
            ("client_price", "/prices/client"),
            ("seller_phone", "/seller/phone"),
            ("seller_name", "/seller/name"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    fn required() -> Vec<String> {
        vec!["lead_id".into(), "model".into(), "seller_phone".into()]
    }

    #[test]
    fn a_full_lead_is_read() {
        let lead = read_lead(
            &map(),
            &required(),
            &json!({"id": 42, "status": "new",
                "device": {"model": "iPhone 13", "memory_gb": 128, "defects": ["скол", "царапина"]},
                "prices": {"buyout": "35 000", "client": 41000.5},
                "seller": {"phone": "8 701 123 45 67", "name": "Ирина"}}),
        )
        .expect("valid");
        assert_eq!(lead.lead_id, "42");
        assert_eq!(lead.memory.as_deref(), Some("128"));
        assert_eq!(lead.defects, vec!["скол", "царапина"]);
        assert_eq!(lead.buyout_price, Some(35000.0));
        assert_eq!(lead.client_price, Some(41000.5));
        assert_eq!(
            lead.seller_phone.as_ref().map(Phone::as_e164),
            Some("+77011234567")
        );
        assert!(
            !format!("{lead:?}").contains("1234567"),
            "phone masked in Debug"
        );
    }

    #[test]
    fn every_problem_is_named() {
        let problems = read_lead(
            &map(),
            &required(),
            &json!({"id": "7", "device": {"defects": 3},
                "prices": {"buyout": "дорого", "client": -1},
                "seller": {"phone": "call me"}}),
        )
        .expect_err("invalid");
        let all = problems.join("\n");
        for needle in [
            "`model` (/device/model) is required",
            "`defects`",
            "`buyout_price`",
            "`client_price`",
            "`seller_phone`",
        ] {
            assert!(all.contains(needle), "{needle} not in {all}");
        }
        assert_eq!(
            read_lead(&map(), &required(), &json!([1])).expect_err("not an object"),
            vec!["the lead is not a JSON object".to_string()]
        );
    }
}
