//! Orders, entries and buyers as JSON:API resources, shaped like the doc
//! examples (`kaspi.md` §2.5 and §4), and the opaque base64 ids.

use rand::Rng;
use serde_json::{json, Map, Value};

use super::state::{now_ms, Order};
use super::SimEntrySpec;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Unpadded standard base64, the look of Kaspi's ids.
pub(super) fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            let idx = (n >> (18 - 6 * i)) & 63;
            out.push(char::from(B64[idx as usize]));
        }
    }
    out
}

/// A price or weight: `5990.0`, or `5990` when the order uses integer prices.
fn money(value: f64, integer: bool) -> Value {
    if integer {
        json!(value.round() as i64)
    } else {
        json!(value)
    }
}

pub(super) fn customer_id(order: &Order) -> String {
    b64(format!("{}##customer", order.spec.customer_phone).as_bytes())
}

pub(super) fn entry_id(order: &Order, index: usize) -> String {
    b64(format!("{}##{index}", order.internal).as_bytes())
}

fn product_id(entry: &SimEntrySpec) -> String {
    b64(format!("{}", 136_000_000 + entry.sku.len() as u64 * 7919).as_bytes())
}

const POINT_OF_SERVICE_ID: &str = "U3VscGFrXzcyOTY";

/// The order's buyer, as the `customer` attribute and the `customers` resource show it.
fn customer_attrs(order: &Order) -> Map<String, Value> {
    let name = order.spec.customer_name.trim();
    let mut words = name.split_whitespace();
    let first = words.next().map(str::to_string);
    let rest: Vec<&str> = words.collect();
    let last = if rest.is_empty() {
        Value::Null
    } else {
        json!(rest.join(" "))
    };
    let mut m = Map::new();
    m.insert(
        "name".into(),
        if name.is_empty() {
            Value::Null
        } else {
            json!(name)
        },
    );
    m.insert("cellPhone".into(), json!(order.spec.customer_phone));
    m.insert("firstName".into(), json!(first));
    m.insert("lastName".into(), last);
    m
}

pub(super) fn customer_resource(order: &Order, api: &str) -> Value {
    let id = customer_id(order);
    json!({
        "type": "customers",
        "id": id,
        "attributes": customer_attrs(order),
        "links": { "self": format!("{api}/customers/{id}") },
    })
}

/// `formattedAddress` "Town, street, number" split back into its parts.
fn delivery_address(formatted: &str) -> Value {
    let parts: Vec<&str> = formatted.split(',').map(str::trim).collect();
    let part = |i: usize| parts.get(i).map_or(Value::Null, |s| json!(s));
    json!({
        "streetName": part(1),
        "streetNumber": part(2),
        "town": part(0),
        "district": null,
        "building": null,
        "apartment": null,
        "formattedAddress": formatted,
        "latitude": 43.240013,
        "longitude": 76.938854,
    })
}

fn origin_address() -> Value {
    json!({
        "id": POINT_OF_SERVICE_ID,
        "displayName": "7296",
        "address": {
            "streetName": " улица Кунаева", "streetNumber": " 20", "town": "г. Талдыкорган",
            "district": null, "building": null, "apartment": null,
            "formattedAddress": "г. Талдыкорган, улица Кунаева, 20",
            "latitude": 44.9983024597168, "longitude": 78.36637115478516
        },
        "city": { "id": "MTkxMDEwMDAw", "code": "191010000", "name": "Талдыкорган", "active": true }
    })
}

/// A waybill URL signed just now: a different `signature` on every call.
fn signed_waybill(origin: &str, number: &str, nonce: u64) -> String {
    let sig: u64 = rand::rng().random();
    format!(
        "{origin}/shop/api/waybill/{number}.pdf?expires={}&signature={sig:016x}{nonce:x}",
        now_ms() + 3_600_000
    )
}

/// Sets `path` (dotted) in `attrs`, creating objects on the way.
fn set_path(attrs: &mut Map<String, Value>, path: &str, value: Value) {
    let mut parts = path.split('.').peekable();
    let mut cur = attrs;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return;
        }
        let slot = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else { return };
        cur = next;
    }
}

/// What a read of the order depends on besides the order itself.
pub(super) struct View<'a> {
    /// `http://127.0.0.1:PORT`.
    pub origin: &'a str,
    /// Lists the entry ids in `relationships.entries.data`.
    pub with_entries: bool,
    /// Unique per read, for the waybill signature.
    pub nonce: u64,
}

pub(super) fn order_resource(order: &Order, view: &View) -> Value {
    let spec = &order.spec;
    let int = spec.integer_prices;
    let api = format!("{}{}", view.origin, super::server::API_PREFIX);
    let mut a = Map::new();
    a.insert("code".into(), json!(spec.code));
    a.insert("creationDate".into(), json!(spec.creation_date_ms));
    a.insert("totalPrice".into(), money(spec.total_price, int));
    let seller_cost = if spec.is_kaspi_delivery { 895.0 } else { 0.0 };
    a.insert("deliveryCostForSeller".into(), money(seller_cost, int));
    a.insert("isKaspiDelivery".into(), json!(spec.is_kaspi_delivery));
    a.insert("preOrder".into(), json!(spec.pre_order));
    a.insert(
        "approvedByBankDate".into(),
        json!(order.approved_by_bank_date_ms),
    );
    a.insert(
        "signatureRequired".into(),
        json!(order.state == "SIGN_REQUIRED"),
    );
    a.insert("status".into(), json!(order.status));
    a.insert("pickupPointId".into(), json!("Merchant_00005678"));
    a.insert("state".into(), json!(order.state));
    if let Some(reason) = &order.cancellation_reason {
        a.insert("cancellationReason".into(), json!(reason));
    }
    a.insert("deliveryCost".into(), money(0.0, int));
    let mut customer = customer_attrs(order);
    customer.insert("id".into(), json!(customer_id(order)));
    a.insert("customer".into(), Value::Object(customer));
    if let Some(formatted) = &spec.delivery_address {
        a.insert("deliveryAddress".into(), delivery_address(formatted));
    }
    a.insert("originAddress".into(), origin_address());
    if spec.is_kaspi_delivery {
        let waybill = match (&order.waybill_number, order.assembled) {
            (Some(number), true) => json!(signed_waybill(view.origin, number, view.nonce)),
            _ => Value::Null,
        };
        let delivery = json!({
            "waybill": waybill,
            "courierTransmissionDate": order.courier_transmission_date_ms,
            "courierTransmissionPlanningDate": order.courier_planning_date_ms,
            "waybillNumber": order.waybill_number,
            "express": false,
            "returnedToWarehouse": order.returned_to_warehouse,
            "firstMileCourier": null,
        });
        if spec.nested_delivery_fields {
            a.insert("kaspiDelivery".into(), delivery);
        } else if let Value::Object(fields) = delivery {
            a.extend(fields);
        }
    }
    a.insert("assembled".into(), json!(order.assembled));
    a.insert("deliveryMode".into(), json!(spec.delivery_mode));
    a.insert("paymentMode".into(), json!(spec.payment_mode));
    if let Some(planned) = spec.planned_delivery_date_ms {
        a.insert("plannedDeliveryDate".into(), json!(planned));
    }
    if spec.payment_mode == "PAY_WITH_CREDIT" {
        a.insert("creditTerm".into(), json!(3));
    }
    for (path, value) in &order.overrides {
        set_path(&mut a, path, value.clone());
    }

    let id = &order.id;
    let mut entries = json!({
        "links": {
            "self": format!("{api}/orders/{id}/relationships/entries"),
            "related": format!("{api}/orders/{id}/entries"),
        }
    });
    if view.with_entries {
        let data: Vec<Value> = (0..spec.entries.len())
            .map(|i| json!({ "id": entry_id(order, i), "type": "orderentries" }))
            .collect();
        entries["data"] = json!(data);
    }
    json!({
        "id": id,
        "type": "orders",
        "attributes": a,
        "relationships": {
            "entries": entries,
            "user": {
                "data": { "id": customer_id(order), "type": "customers" },
                "links": {
                    "self": format!("{api}/orders/{id}/relationships/user"),
                    "related": format!("{api}/orders/{id}/user"),
                }
            }
        },
        "links": { "self": format!("{api}/orders/{id}") },
    })
}

pub(super) fn entry_resource(order: &Order, index: usize, single: bool) -> Option<Value> {
    let entry = order.spec.entries.get(index)?;
    let int = order.spec.integer_prices;
    let mut attrs = json!({
        "entryNumber": index,
        "deliveryCost": money(0.0, int),
        "quantity": entry.quantity,
        "weight": money(0.0, int),
        "basePrice": money(entry.base_price, int),
        "totalPrice": money(entry.base_price * f64::from(entry.quantity), int),
        "unitType": "PIECES",
        "category": { "code": "Master - Lids", "title": "Крышки для посуды" },
        "isImeiRequired": false,
        "offer": { "code": entry.sku, "isImeiRequired": false, "name": entry.name },
    });
    if single {
        attrs["minAllowedWeight"] = money(0.0, int);
    }
    Some(json!({
        "id": entry_id(order, index),
        "type": "orderentries",
        "attributes": attrs,
        "relationships": {
            "product": { "data": { "id": product_id(entry), "type": "masterproducts" } },
            "deliveryPointOfService": { "data": { "id": POINT_OF_SERVICE_ID, "type": "pointofservices" } }
        }
    }))
}

pub(super) fn product_resource(order: &Order, index: usize) -> Option<Value> {
    let entry = order.spec.entries.get(index)?;
    Some(json!({
        "id": product_id(entry),
        "type": "masterproducts",
        "attributes": {
            "code": format!("{}", 136_000_000 + entry.sku.len() as u64 * 7919),
            "name": entry.name,
            "manufacturer": null,
            "category": "Master - Lids",
        }
    }))
}

/// The body a successful transition answers with.
pub(super) fn echo(order: &Order, status: &str, extra: Map<String, Value>) -> Value {
    let mut attrs = Map::new();
    attrs.insert("code".into(), json!(order.spec.code));
    attrs.insert("status".into(), json!(status));
    attrs.extend(extra);
    json!({
        "data": {
            "type": "orders",
            "id": order.id,
            "attributes": attrs,
            "relationships": {},
            "links": {},
        },
        "included": [],
    })
}

#[cfg(test)]
mod tests {
    use super::b64;

    #[test]
    fn ids_look_like_kaspis() {
        assert_eq!(b64(b"495145021##0"), "NDk1MTQ1MDIxIyMw");
        assert_eq!(b64(b"136517606"), "MTM2NTE3NjA2");
        assert_eq!(b64(b"ab"), "YWI");
    }
}
