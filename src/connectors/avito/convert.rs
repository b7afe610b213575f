//! Conversion of Avito wire orders and chats into domain values.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::AvitoError;
use super::wire::{ChatWire, OrderWire};
use super::{AvitoOrder, Chat, STATUS_KEYS, TERMINAL_KEYS};
use crate::domain::{Customer, Delivery, Marketplace, Money, Order, OrderItem, Phone, StatusKey};

fn time(value: Option<&str>) -> Option<DateTime<Utc>> {
    value
        .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn money(value: Option<f64>) -> Money {
    value.and_then(Money::from_major).unwrap_or_default()
}

fn id_text(value: &Option<Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn order_from_wire(account: &str, o: OrderWire) -> Result<AvitoOrder, AvitoError> {
    let created_at = time(o.created_at.as_deref()).ok_or_else(|| AvitoError::Decode {
        what: "an order",
        error: format!("order {} has no createdAt", o.id),
    })?;
    let updated_at = time(o.updated_at.as_deref()).unwrap_or(created_at);
    let (key, terminal) = if STATUS_KEYS.contains(&o.status.as_str()) {
        (o.status.clone(), TERMINAL_KEYS.contains(&o.status.as_str()))
    } else {
        metrics::counter!("orderbridge_unknown_status_total", "marketplace" => "avito")
            .increment(1);
        tracing::warn!(account, order = %o.id, status = %o.status,
            "Avito sent a status the connector does not know; it is kept as unknown, not guessed.");
        (format!("unknown:{}", o.status), false)
    };
    let delivery = o.delivery.clone();
    let buyer = delivery.as_ref().and_then(|d| d.buyer_info.clone());
    let phone = buyer
        .as_ref()
        .and_then(|b| b.phone_number.as_deref())
        .and_then(|p| Phone::parse(p).ok());
    let prices = o.prices.clone();
    let schedules = o.schedules.clone();
    let mut hasher = Sha256::new();
    hasher.update(o.status.as_bytes());
    hasher.update(b"|");
    hasher.update(o.updated_at.clone().unwrap_or_default().as_bytes());
    let items = o
        .items
        .iter()
        .map(|i| {
            let count = i.count.unwrap_or(1.0);
            let unit = money(i.prices.as_ref().and_then(|p| p.price));
            OrderItem {
                sku: id_text(&i.id).or_else(|| id_text(&i.avito_id)),
                name: i.title.clone().unwrap_or_else(|| "item".to_string()),
                quantity: count,
                unit_price: unit,
                total: i
                    .prices
                    .as_ref()
                    .and_then(|p| p.total)
                    .and_then(Money::from_major)
                    .unwrap_or(Money((unit.0 as f64 * count).round() as i64)),
            }
        })
        .collect();
    let order = Order {
        marketplace: Marketplace::Avito,
        account: account.to_string(),
        external_id: o.id.clone(),
        code: o.id.clone(),
        status: StatusKey(key),
        is_terminal: terminal,
        raw_state: None,
        raw_status: Some(o.status.clone()),
        created_at,
        total: money(prices.as_ref().and_then(|p| p.price)),
        customer: Customer {
            name: buyer.and_then(|b| b.full_name),
            phone,
            email: None,
        },
        delivery: Delivery {
            mode: delivery.as_ref().and_then(|d| d.service_type.clone()),
            by_marketplace: true,
            address: delivery.as_ref().and_then(|d| {
                d.courier_info
                    .as_ref()
                    .and_then(|c| c.address.clone())
                    .or_else(|| d.terminal_info.as_ref().and_then(|t| t.address.clone()))
            }),
            planned_date: schedules
                .as_ref()
                .and_then(|s| time(s.delivery_date.as_deref())),
            waybill_number: delivery.as_ref().and_then(|d| d.tracking_number.clone()),
            handed_to_courier_at: None,
            cost: prices
                .as_ref()
                .and_then(|p| p.delivery)
                .and_then(Money::from_major),
        },
        payment_mode: None,
        pre_order: false,
        cancellation_reason: None,
        items,
        commission: prices
            .as_ref()
            .and_then(|p| p.commission)
            .and_then(Money::from_major),
        marketplace_deadline: schedules.as_ref().and_then(|s| match o.status.as_str() {
            "on_confirmation" => time(s.confirm_till.as_deref()),
            "ready_to_ship" => time(s.ship_till.as_deref()),
            _ => None,
        }),
    };
    Ok(AvitoOrder {
        available_actions: o
            .available_actions
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a.name, a.required))
            .collect(),
        updated_at,
        confirm_till: schedules
            .as_ref()
            .and_then(|s| time(s.confirm_till.as_deref())),
        ship_till: schedules
            .as_ref()
            .and_then(|s| time(s.ship_till.as_deref())),
        delivery_date_max: schedules
            .as_ref()
            .and_then(|s| time(s.delivery_date_max.as_deref())),
        commission: money(prices.as_ref().and_then(|p| p.commission)),
        payout: money(prices.as_ref().and_then(|p| p.total)),
        marketplace_id: o.marketplace_id.clone(),
        service_name: delivery.as_ref().and_then(|d| d.service_name.clone()),
        content_hash: hex::encode(hasher.finalize()),
        order,
    })
}

pub(super) fn chat_from_wire(c: ChatWire) -> Chat {
    let item = c
        .context
        .as_ref()
        .and_then(|ctx| ctx.get("value"))
        .cloned()
        .unwrap_or(Value::Null);
    Chat {
        id: c.id,
        item_id: item.get("id").and_then(Value::as_u64),
        item_title: item
            .get("title")
            .and_then(Value::as_str)
            .map(str::to_string),
        item_price: item
            .get("price_string")
            .and_then(Value::as_str)
            .map(str::to_string),
        item_url: item.get("url").and_then(Value::as_str).map(str::to_string),
        users: c
            .users
            .iter()
            .filter_map(|u| Some((u.get("id")?.as_u64()?, u.get("name")?.as_str()?.to_string())))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::STATUS_KEYS;

    #[test]
    fn the_shipped_map_documents_and_covers_every_key() {
        let map = include_str!("../../../config/maps/avito.toml");
        let table: toml::Table = map.parse().unwrap();
        let statuses = table["statuses"].as_table().unwrap();
        for key in STATUS_KEYS {
            assert!(
                map.contains(&format!("#   {key} ")),
                "{key} is not documented"
            );
            assert!(statuses.contains_key(*key), "{key} has no row");
        }
        assert_eq!(statuses.len(), STATUS_KEYS.len());
    }

    #[test]
    fn the_cyrillic_delivery_key_is_read() {
        let wire: super::super::wire::SchedulesWire =
            serde_json::from_str(r#"{"deliveryDateMaх": "2016-11-01T20:44:39Z"}"#).unwrap();
        assert!(wire.delivery_date_max.is_some());
        let latin: super::super::wire::SchedulesWire =
            serde_json::from_str(r#"{"deliveryDateMax": "2016-11-01T20:44:39Z"}"#).unwrap();
        assert!(latin.delivery_date_max.is_some());
    }
}
