//! The order-management endpoints: the list, `applyTransition` and
//! `setTrackingNumber`. Errors use the flat `{"code","message"}` envelope;
//! business failures come inside a 200.

use chrono::DateTime;
use serde_json::{json, Value};

use super::server::{Envelope, Reply, Req};
use super::state::{rfc3339, Order, State};

const MAX_LIMIT: i64 = 20;

fn bad_request(message: &str) -> Reply {
    Reply::error(Envelope::Flat, 400, message)
}

/// `GET /order-management/1/orders`.
pub(super) fn list(st: &State, req: &Req<'_>) -> Reply {
    let limit = match req.param("limit").map(|v| v.trim().parse::<i64>()) {
        None => MAX_LIMIT,
        Some(Ok(0)) => MAX_LIMIT,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => return bad_request("limit must be between 0 and 20"),
    };
    let page = match req.param("page").map(|v| v.trim().parse::<i64>()) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => return bad_request("page must be a positive integer"),
    };
    let date_from = match req.param("dateFrom").map(|v| v.trim().parse::<i64>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad_request("dateFrom must be a unix timestamp"),
    };
    let ids = req.list("ids");
    let statuses = req.list("statuses");
    let mut matching: Vec<&Order> = st
        .orders
        .iter()
        .filter(|o| ids.is_empty() || ids.contains(&o.spec.id))
        .filter(|o| statuses.is_empty() || statuses.contains(&o.status))
        .filter(|o| date_from.is_none_or(|from| o.spec.created_at.timestamp() >= from))
        .collect();
    matching.sort_by(|a, b| {
        a.spec
            .created_at
            .cmp(&b.spec.created_at)
            .then_with(|| a.spec.id.cmp(&b.spec.id))
    });
    let start = usize::try_from((page - 1).saturating_mul(limit)).unwrap_or(usize::MAX);
    let orders: Vec<Value> = matching
        .iter()
        .skip(start)
        .take(limit as usize)
        .map(|o| render(o))
        .collect();
    let has_more = start.saturating_add(limit as usize) < matching.len();
    Reply::ok(json!({ "orders": orders, "hasMore": has_more }))
}

fn time(t: Option<DateTime<chrono::Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

fn render(o: &Order) -> Value {
    let spec = &o.spec;
    let marketplace_id = match spec.id.get(1..) {
        Some(rest) if spec.id.chars().all(|c| c.is_ascii_digit()) => format!("7{rest}"),
        _ => format!("7{}", spec.id),
    };
    let actions: Vec<Value> = o
        .actions()
        .into_iter()
        .map(|(name, required)| json!({ "name": name, "required": required }))
        .collect();
    let items: Vec<Value> = spec
        .items
        .iter()
        .map(|item| {
            json!({
                "avitoId": item.avito_id,
                "id": item.sku,
                "title": item.title,
                "count": item.count,
                "location": "Москва",
                "chatId": item.chat_id,
                "prices": {
                    "price": item.price,
                    "discountSum": 0,
                    "total": item.price - item.commission,
                    "commission": item.commission,
                },
                "discounts": [],
            })
        })
        .collect();
    let service = spec.service_type.as_str();
    let buyer = if spec.buyer_name.is_some() || spec.buyer_phone.is_some() {
        json!({ "fullName": spec.buyer_name, "phoneNumber": spec.buyer_phone })
    } else {
        Value::Null
    };
    let terminal = if service == "dbs" || service == "pvz" {
        json!({ "address": "Москва, Настасьинский 8 стр2 6", "code": "MSK14" })
    } else {
        Value::Null
    };
    let mut delivery = json!({
        "serviceName": match service {
            "rdbs" => "Доставка продавцом",
            "cnc" => "Самовывоз",
            _ => "Boxberry",
        },
        "serviceType": service,
        "buyerInfo": buyer,
        "courierInfo": null,
        "terminalInfo": terminal,
    });
    if service != "rdbs" {
        if let Some(map) = delivery.as_object_mut() {
            let dispatch = if service == "pvz" {
                Value::String(format!(
                    "00000{}",
                    spec.id.chars().rev().take(8).collect::<String>()
                ))
            } else {
                Value::Null
            };
            map.insert("dispatchNumber".to_string(), dispatch);
            map.insert("trackingNumber".to_string(), json!(o.tracking_number));
        }
    }
    let ship_till = spec.ship_till;
    let return_policy = if o.status == "on_return" {
        json!({ "returnStatus": "in_transit", "trackingNumber": null })
    } else {
        Value::Null
    };
    json!({
        "id": spec.id,
        "marketplaceId": marketplace_id,
        "status": o.status,
        "createdAt": rfc3339(spec.created_at),
        "updatedAt": rfc3339(o.updated_at),
        "availableActions": actions,
        "items": items,
        "prices": {
            "price": spec.price,
            "discount": 0,
            "commission": spec.commission,
            "delivery": spec.delivery_cost,
            "total": spec.price - spec.commission,
        },
        "delivery": delivery,
        "schedules": {
            "confirmTill": time(spec.confirm_till),
            "shipTill": time(ship_till),
            "setTrackingNumberTill": time(if service == "dbs" { ship_till } else { None }),
            "deliveryDate": null,
            "deliveryDateMin": time(ship_till.map(|t| t + chrono::Duration::days(1))),
            // The key's last letter is the Cyrillic "х" (U+0445), as in the spec.
            "deliveryDateMa\u{0445}": time(ship_till.map(|t| t + chrono::Duration::days(3))),
        },
        "returnPolicy": return_policy,
    })
}

/// The JSON object body, or a 400.
fn object(req: &Req<'_>) -> Result<serde_json::Map<String, Value>, Reply> {
    match serde_json::from_slice::<Value>(req.body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(bad_request("Request body must be a JSON object")),
    }
}

fn string_field(map: &serde_json::Map<String, Value>, key: &str) -> Result<String, Reply> {
    match map.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(bad_request(&format!("{key} is required"))),
    }
}

/// `POST /order-management/1/order/applyTransition`.
pub(super) fn apply_transition(st: &mut State, req: &Req<'_>) -> Reply {
    let parsed = object(req).and_then(|map| {
        let order_id = string_field(&map, "orderId")?;
        let transition = string_field(&map, "transition")?;
        Ok((order_id, transition))
    });
    let (order_id, transition) = match parsed {
        Ok(v) => v,
        Err(reply) => return reply,
    };
    let target = match transition.as_str() {
        "confirm" => "ready_to_ship",
        "reject" => "canceled",
        "perform" => "in_transit",
        "receive" => "delivered",
        _ => return bad_request("transition must be one of confirm, reject, perform, receive"),
    };
    if st.find(&order_id).is_none() {
        return Reply::error(Envelope::Flat, 404, "Order not found");
    }
    if st.success_false > 0 {
        st.success_false -= 1;
        return Reply::ok(json!({ "success": false }));
    }
    let Some(order) = st.find_mut(&order_id) else {
        return Reply::error(Envelope::Flat, 404, "Order not found");
    };
    if !order.allows(&transition) {
        return Reply::ok(json!({ "success": false }));
    }
    order.move_to(target);
    order.transitions.push(transition);
    Reply::ok(json!({ "success": true }))
}

fn business_error(code: &str, message: &str) -> Reply {
    Reply::ok(json!({ "success": false, "error": { "code": code, "message": message } }))
}

fn valid_tracking_number(number: &str) -> bool {
    (5..=32).contains(&number.chars().count())
        && number
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// `POST /order-management/1/order/setTrackingNumber`.
pub(super) fn set_tracking_number(st: &mut State, req: &Req<'_>) -> Reply {
    let parsed = object(req).and_then(|map| {
        let order_id = string_field(&map, "orderId")?;
        let number = string_field(&map, "trackingNumber")?;
        Ok((order_id, number))
    });
    let (order_id, number) = match parsed {
        Ok(v) => v,
        Err(reply) => return reply,
    };
    let number = number.trim().to_string();
    if st.find(&order_id).is_none() {
        return Reply::error(Envelope::Flat, 404, "Order not found");
    }
    if st
        .orders
        .iter()
        .any(|o| o.spec.id != order_id && o.tracking_number.as_deref() == Some(number.as_str()))
    {
        return business_error(
            "already_set",
            "Трек-номер уже зарегистрирован для другого заказа",
        );
    }
    let Some(order) = st.find_mut(&order_id) else {
        return Reply::error(Envelope::Flat, 404, "Order not found");
    };
    if !order.allows("setTrackNumber") {
        return if order.tracking_number.is_some() {
            business_error("already_set", "Трек-номер уже задан для заказа")
        } else {
            business_error(
                "not_allowed",
                "Действие недоступно для заказа в текущем статусе",
            )
        };
    }
    if !valid_tracking_number(&number) {
        return business_error("incorrect_number", "Некорректный трек-номер");
    }
    order.tracking_number = Some(number);
    order.move_to("in_transit");
    Reply::ok(json!({ "success": true }))
}
