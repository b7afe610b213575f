//! Conversion of Kaspi resources into domain orders, and the content hash that
//! detects changes while ignoring the re-signed `kaspiDelivery.waybill` URL.

use chrono::{DateTime, FixedOffset, NaiveDate, TimeZone, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::KaspiError;
use super::status;
use super::wire::{self, Resource};
use crate::domain::{Customer, Delivery, Marketplace, Money, Order, OrderItem, Phone, StatusKey};

/// A Kaspi order as read: the domain order plus what the poller needs.
#[derive(Debug, Clone, PartialEq)]
pub struct KaspiOrder {
    pub order: Order,
    /// Hash of the attributes without volatile fields; equal hashes mean no change.
    pub content_hash: String,
    /// The lines came with the order (`include[orders]=entries`).
    pub items_included: bool,
    pub assembled: bool,
}

/// Kaspi's calendar is Almaty time, UTC+5 all year.
pub fn almaty() -> FixedOffset {
    FixedOffset::east_opt(5 * 3600)
        .unwrap_or_else(|| FixedOffset::east_opt(0).unwrap_or_else(|| unreachable!()))
}

/// The first instant of a calendar day in Almaty.
pub fn almaty_day_start(day: NaiveDate) -> DateTime<Utc> {
    let midnight = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    almaty()
        .from_local_datetime(&midnight)
        .single()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| midnight.and_utc())
}

fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// Converts an `orders` resource (and the `orderentries` included with it).
pub fn order_from_resource(
    shop: &str,
    resource: &Resource,
    included: &[Resource],
) -> Result<KaspiOrder, KaspiError> {
    let a = &resource.attributes;
    let code = wire::text(a, "code").ok_or(KaspiError::Decode {
        what: "an order",
        error: format!("order {} has no code", resource.id),
    })?;
    let created_at = wire::millis(a, "creationDate")
        .and_then(from_millis)
        .ok_or(KaspiError::Decode {
            what: "an order",
            error: format!("order {code} has no creationDate"),
        })?;
    let state = wire::text(a, "state").unwrap_or_default();
    let raw_status = wire::text(a, "status").unwrap_or_default();
    let assembled = wire::flag(a, "assembled");
    let courier_at = wire::delivery(a, "courierTransmissionDate")
        .and_then(|v| v.as_f64())
        .and_then(|ms| from_millis(ms as i64));
    let pre_order = wire::flag(a, "preOrder");
    let (key, terminal) = match status::derive(
        &state,
        &raw_status,
        assembled,
        courier_at.is_some(),
        pre_order,
    ) {
        Ok(key) => (key.to_string(), status::TERMINAL_KEYS.contains(&key)),
        Err(raw) => {
            metrics::counter!("orderbridge_unknown_status_total", "marketplace" => "kaspi")
                .increment(1);
            tracing::warn!(shop, order = %code, raw = %raw,
                "Kaspi sent a state/status combination the connector does not know; it is kept as unknown, not guessed.");
            (format!("unknown:{raw}"), false)
        }
    };
    let customer = a.get("customer").cloned().unwrap_or(Value::Null);
    let raw_phone = wire::text(&customer, "cellPhone");
    let phone = raw_phone.as_deref().and_then(|p| match Phone::parse(p) {
        Ok(phone) => Some(phone),
        Err(error) => {
            tracing::warn!(shop, order = %code, phone = %crate::domain::mask_phone(p), %error,
                "The customer's phone did not parse; the order goes on without it.");
            None
        }
    });
    let name = wire::text(&customer, "name").or_else(|| {
        let parts: Vec<String> = ["firstName", "lastName"]
            .iter()
            .filter_map(|k| wire::text(&customer, k))
            .filter(|s| !s.trim().is_empty())
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    });
    let address = a
        .get("deliveryAddress")
        .and_then(|d| wire::text(d, "formattedAddress"));
    let items = entries_of(resource, included);
    let items_included = items.is_some();
    let order = Order {
        marketplace: Marketplace::Kaspi,
        account: shop.to_string(),
        external_id: resource.id.clone(),
        code,
        status: StatusKey(key),
        is_terminal: terminal,
        raw_state: Some(state).filter(|s| !s.is_empty()),
        raw_status: Some(raw_status).filter(|s| !s.is_empty()),
        created_at,
        total: wire::number(a, "totalPrice")
            .and_then(Money::from_major)
            .unwrap_or_default(),
        customer: Customer {
            name,
            phone,
            email: None,
        },
        delivery: Delivery {
            mode: wire::text(a, "deliveryMode"),
            by_marketplace: wire::flag(a, "isKaspiDelivery"),
            address,
            planned_date: wire::millis(a, "plannedDeliveryDate").and_then(from_millis),
            waybill_number: wire::delivery(a, "waybillNumber").and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
            handed_to_courier_at: courier_at,
            cost: wire::number(a, "deliveryCost").and_then(Money::from_major),
        },
        payment_mode: wire::text(a, "paymentMode"),
        pre_order,
        cancellation_reason: wire::text(a, "cancellationReason"),
        items: items.unwrap_or_default(),
        marketplace_deadline: None,
        commission: None,
    };
    Ok(KaspiOrder {
        content_hash: content_hash(a),
        items_included,
        assembled,
        order,
    })
}

/// The order's lines from `included`, when every entry it names is there.
fn entries_of(resource: &Resource, included: &[Resource]) -> Option<Vec<OrderItem>> {
    let ids: Vec<&str> = resource
        .relationships
        .get("entries")?
        .get("data")?
        .as_array()?
        .iter()
        .filter_map(|e| e.get("id")?.as_str())
        .collect();
    if ids.is_empty() {
        return None;
    }
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        let entry = included
            .iter()
            .find(|r| r.id == id && (r.kind == "orderentries" || r.kind.is_empty()))?;
        items.push(item_from_entry(entry));
    }
    Some(items)
}

/// An `orderentries` resource as an order line.
pub fn item_from_entry(entry: &Resource) -> OrderItem {
    let a = &entry.attributes;
    let offer = a.get("offer").cloned().unwrap_or(Value::Null);
    let quantity = wire::number(a, "quantity").unwrap_or(1.0);
    let unit = wire::number(a, "basePrice")
        .and_then(Money::from_major)
        .unwrap_or_default();
    OrderItem {
        sku: wire::text(&offer, "code"),
        name: wire::text(&offer, "name")
            .or_else(|| a.get("category").and_then(|c| wire::text(c, "title")))
            .unwrap_or_else(|| format!("entry {}", entry.id)),
        quantity,
        unit_price: unit,
        total: wire::number(a, "totalPrice")
            .and_then(Money::from_major)
            .unwrap_or(Money((unit.0 as f64 * quantity).round() as i64)),
    }
}

/// SHA-256 of the attributes in canonical form, without the waybill URL
/// (re-signed on every read) wherever it appears.
pub fn content_hash(attributes: &Value) -> String {
    let mut stable = attributes.clone();
    if let Some(map) = stable.as_object_mut() {
        map.remove("waybill");
        if let Some(Value::Object(delivery)) = map.get_mut("kaspiDelivery") {
            delivery.remove("waybill");
        }
    }
    let mut canonical = String::new();
    write_canonical(&stable, &mut canonical);
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// JSON with object keys sorted and numbers normalised (4000 == 4000.0).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*key).clone()).to_string());
                out.push(':');
                write_canonical(&map[*key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => out.push_str(&(f as i64).to_string()),
            _ => out.push_str(&n.to_string()),
        },
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_waybill_url_does_not_change_the_hash_but_anything_else_does() {
        let a = json!({"code": "1", "status": "ACCEPTED_BY_MERCHANT", "totalPrice": 4000.0,
            "kaspiDelivery": {"waybill": "https://kaspi.kz/w?sig=1", "waybillNumber": "101"}});
        let b = json!({"kaspiDelivery": {"waybillNumber": "101", "waybill": "https://kaspi.kz/w?sig=2"},
            "totalPrice": 4000, "status": "ACCEPTED_BY_MERCHANT", "code": "1"});
        assert_eq!(content_hash(&a), content_hash(&b));
        let top_a = json!({"code": "1", "waybill": "https://x?1"});
        let top_b = json!({"code": "1", "waybill": "https://x?2"});
        assert_eq!(content_hash(&top_a), content_hash(&top_b));
        let c = json!({"code": "1", "status": "COMPLETED", "totalPrice": 4000.0,
            "kaspiDelivery": {"waybill": "https://kaspi.kz/w?sig=1", "waybillNumber": "101"}});
        assert_ne!(content_hash(&a), content_hash(&c));
    }

    #[test]
    fn almaty_days_start_at_19_utc_the_day_before() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 23).unwrap();
        assert_eq!(
            almaty_day_start(day).to_rfc3339(),
            "2026-11-22T19:00:00+00:00"
        );
    }
}
