//! The endpoints: `GET /orders` (list and lookup by code), `GET /orders/{id}`,
//! `GET /orders/{id}/entries`, `GET /orderentries/{id}` (and `/product`),
//! `POST /orders` (status transitions) and the waybill PDF.

use axum::http::Method;
use serde_json::{json, Map, Value};

use super::render::{self, View};
use super::server::{Body, Reply, Req};
use super::state::{now_ms, Order, State};

/// The longest creationDate window a list may ask for.
const MAX_PERIOD_MS: i64 = 14 * 24 * 3600 * 1000;
const MAX_PAGE_SIZE: usize = 100;
const STATES: [&str; 6] = [
    "NEW",
    "SIGN_REQUIRED",
    "PICKUP",
    "DELIVERY",
    "KASPI_DELIVERY",
    "ARCHIVE",
];
const STATUSES: [&str; 8] = [
    "APPROVED_BY_BANK",
    "ACCEPTED_BY_MERCHANT",
    "COMPLETED",
    "CANCELLED",
    "CANCELLING",
    "KASPI_DELIVERY_RETURN_REQUESTED",
    "RETURN_ACCEPTED_BY_MERCHANT",
    "RETURNED",
];
const CANCEL_REASONS: [&str; 3] = [
    "BUYER_CANCELLATION_BY_MERCHANT",
    "BUYER_NOT_REACHABLE",
    "MERCHANT_OUT_OF_STOCK",
];
const MAX_COMMENT_CHARS: usize = 1000;

/// What `include[orders]` asked for.
#[derive(Clone, Copy, Default)]
struct Include {
    user: bool,
    entries: bool,
}

impl Include {
    fn parse(req: &Req) -> Include {
        let mut inc = Include::default();
        for part in req.param("include[orders]").unwrap_or_default().split(',') {
            match part.trim() {
                "user" => inc.user = true,
                "entries" => inc.entries = true,
                _ => {}
            }
        }
        inc
    }
}

/// Renders `orders` (indices into `st.orders`) and their `included` resources.
fn render_orders(st: &mut State, picked: &[usize], inc: Include) -> (Vec<Value>, Vec<Value>) {
    let first_nonce = st.waybill_reads;
    st.waybill_reads += picked.len() as u64;
    let api = format!("{}{}", st.origin, super::server::API_PREFIX);
    let mut data = Vec::with_capacity(picked.len());
    let mut included: Vec<Value> = Vec::new();
    let mut customers: Vec<String> = Vec::new();
    for (n, &i) in picked.iter().enumerate() {
        let Some(order) = st.orders.get(i) else {
            continue;
        };
        let view = View {
            origin: &st.origin,
            with_entries: inc.entries,
            nonce: first_nonce + n as u64,
        };
        data.push(render::order_resource(order, &view));
        if inc.user {
            let id = render::customer_id(order);
            if !customers.contains(&id) {
                customers.push(id);
                included.push(render::customer_resource(order, &api));
            }
        }
        if inc.entries {
            included.extend(
                (0..order.spec.entries.len())
                    .filter_map(|e| render::entry_resource(order, e, false)),
            );
        }
    }
    (data, included)
}

fn bad_number(name: &str) -> Reply {
    Reply::error(400, &format!("{name} must be an integer"))
}

/// A required integer query parameter.
fn int_param(req: &Req, name: &str) -> Result<Option<i64>, Reply> {
    match req.param(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| bad_number(name)),
    }
}

fn list_reply(data: Vec<Value>, included: Vec<Value>, total: usize, size: usize) -> Reply {
    let page_count = total.div_ceil(size.max(1));
    Reply::ok(json!({
        "data": data,
        "included": included,
        "meta": { "pageCount": page_count, "totalCount": total },
    }))
}

/// `GET /orders`: a page of the window, or the order with `filter[orders][code]`.
pub(super) fn list(st: &mut State, req: &Req) -> Reply {
    let inc = Include::parse(req);
    if let Some(code) = req.param("filter[orders][code]") {
        let picked: Vec<usize> = if req.merchant_ok {
            (0..st.orders.len())
                .filter(|&i| st.orders[i].spec.code == code)
                .collect()
        } else {
            Vec::new()
        };
        let total = picked.len();
        let (data, included) = render_orders(st, &picked, inc);
        return list_reply(data, included, total, total.max(1));
    }
    match page_of_window(st, req, inc) {
        Ok(reply) | Err(reply) => reply,
    }
}

fn page_of_window(st: &mut State, req: &Req, inc: Include) -> Result<Reply, Reply> {
    let number = int_param(req, "page[number]")?
        .ok_or_else(|| Reply::error(400, "page[number] is required"))?;
    let size =
        int_param(req, "page[size]")?.ok_or_else(|| Reply::error(400, "page[size] is required"))?;
    if number < 0 {
        return Err(Reply::error(400, "page[number] must not be negative"));
    }
    if size <= 0 {
        return Err(Reply::error(400, "page[size] must be positive"));
    }
    // Asking for more than 100 silently gets 100.
    let size = usize::try_from(size)
        .unwrap_or(MAX_PAGE_SIZE)
        .min(MAX_PAGE_SIZE);
    let number = usize::try_from(number).unwrap_or(usize::MAX);

    let from = match (
        int_param(req, "filter[orders][creationDate][$ge]")?,
        int_param(req, "filter[orders][creationDate][$gt]")?,
    ) {
        (Some(ge), _) => ge,
        (None, Some(gt)) => gt.saturating_add(1),
        (None, None) => {
            return Err(Reply::error(
                400,
                "filter[orders][creationDate][$ge] is required",
            ))
        }
    };
    let to = match (
        int_param(req, "filter[orders][creationDate][$le]")?,
        int_param(req, "filter[orders][creationDate][$lt]")?,
    ) {
        (Some(le), _) => le,
        (None, Some(lt)) => lt.saturating_sub(1),
        (None, None) => now_ms(),
    };
    if to.saturating_sub(from) > MAX_PERIOD_MS {
        return Err(Reply::error(
            400,
            "Invalid creationDate filter: the search period must not exceed 14 days",
        ));
    }
    let state = req.param("filter[orders][state]");
    if let Some(s) = state {
        if !STATES.contains(&s) {
            return Err(Reply::error(400, &format!("Unknown order state: {s}")));
        }
    }
    let status = req.param("filter[orders][status]");
    if let Some(s) = status {
        if !STATUSES.contains(&s) {
            return Err(Reply::error(400, &format!("Unknown order status: {s}")));
        }
    }
    let pickup_modes = ["DELIVERY_PICKUP", "DELIVERY_REGIONAL_PICKUP"];
    let delivery_type = match req.param("filter[orders][deliveryType]") {
        None => None,
        Some("PICKUP" | "DELIVERY_PICKUP") => Some(true),
        Some("DELIVERY" | "DELIVERY_LOCAL") => Some(false),
        Some(other) => {
            return Err(Reply::error(
                400,
                &format!("Unknown delivery type: {other}"),
            ))
        }
    };
    let signature = match req.param("filter[orders][signatureRequired]") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return Err(Reply::error(
                400,
                "filter[orders][signatureRequired] must be true or false",
            ))
        }
    };

    let mut picked: Vec<usize> = if req.merchant_ok {
        (0..st.orders.len())
            .filter(|&i| {
                let o: &Order = &st.orders[i];
                let created = o.spec.creation_date_ms;
                created >= from
                    && created <= to
                    && state.is_none_or(|s| o.state == s)
                    && status.is_none_or(|s| o.status == s)
                    && delivery_type
                        .is_none_or(|p| pickup_modes.contains(&o.spec.delivery_mode.as_str()) == p)
                    && signature.is_none_or(|s| (o.state == "SIGN_REQUIRED") == s)
            })
            .collect()
    } else {
        Vec::new()
    };
    picked.sort_by(|&a, &b| {
        let (a, b) = (&st.orders[a], &st.orders[b]);
        (a.spec.creation_date_ms, &a.id).cmp(&(b.spec.creation_date_ms, &b.id))
    });
    let total = picked.len();
    let page: Vec<usize> = picked
        .into_iter()
        .skip(number.saturating_mul(size))
        .take(size)
        .collect();
    let (data, included) = render_orders(st, &page, inc);
    Ok(list_reply(data, included, total, size))
}

/// The index of a visible order.
fn visible(st: &State, req: &Req, id: &str) -> Option<usize> {
    if !req.merchant_ok {
        return None;
    }
    st.orders.iter().position(|o| o.id == id)
}

fn order_not_found(id: &str) -> Reply {
    Reply::error(404, &format!("Order {id} not found"))
}

/// `GET /orders/{id}`.
pub(super) fn get_one(st: &mut State, req: &Req, id: &str) -> Reply {
    let Some(i) = visible(st, req, id) else {
        return order_not_found(id);
    };
    let (mut data, included) = render_orders(st, &[i], Include::parse(req));
    Reply::ok(json!({ "data": data.pop(), "included": included }))
}

/// `GET /orders/{id}/entries`.
pub(super) fn entries(st: &mut State, req: &Req, id: &str) -> Reply {
    let Some(i) = visible(st, req, id) else {
        return order_not_found(id);
    };
    let order = &st.orders[i];
    let data: Vec<Value> = (0..order.spec.entries.len())
        .filter_map(|e| render::entry_resource(order, e, false))
        .collect();
    Reply::ok(json!({ "data": data, "included": [] }))
}

/// The order and index of a visible entry.
fn find_entry<'a>(st: &'a State, req: &Req, entry_id: &str) -> Option<(&'a Order, usize)> {
    if !req.merchant_ok {
        return None;
    }
    st.orders.iter().find_map(|o| {
        (0..o.spec.entries.len())
            .find(|&e| render::entry_id(o, e) == entry_id)
            .map(|e| (o, e))
    })
}

/// `GET /orderentries/{id}`.
pub(super) fn entry(st: &State, req: &Req, id: &str) -> Reply {
    match find_entry(st, req, id).and_then(|(o, e)| render::entry_resource(o, e, true)) {
        Some(data) => Reply::ok(json!({ "data": data, "included": [] })),
        None => Reply::error(404, &format!("Order entry {id} not found")),
    }
}

/// `GET /orderentries/{id}/product`.
pub(super) fn product(st: &State, req: &Req, id: &str) -> Reply {
    match find_entry(st, req, id).and_then(|(o, e)| render::product_resource(o, e)) {
        Some(data) => Reply::ok(json!({ "data": data, "included": [] })),
        None => Reply::error(404, &format!("Order entry {id} not found")),
    }
}

const WAYBILL_PDF: &[u8] = b"%PDF-1.4\n% simulated Kaspi waybill\n%%EOF\n";

/// `GET /shop/api/waybill/{number}.pdf?…`, the target of a signed waybill URL.
pub(super) fn waybill(st: &State, method: &Method, file: &str) -> Reply {
    let number = file.strip_suffix(".pdf").unwrap_or(file);
    let known = st
        .orders
        .iter()
        .any(|o| o.assembled && o.waybill_number.as_deref() == Some(number));
    if method == Method::GET && known {
        Reply {
            status: 200,
            body: Body::Pdf(WAYBILL_PDF),
        }
    } else {
        Reply::not_found()
    }
}

/// `POST /orders`: `{"data":{"type":"orders","id":…,"attributes":{"status":…,…}}}`.
pub(super) fn transition(st: &mut State, req: &Req) -> Reply {
    let Ok(body) = serde_json::from_slice::<Value>(req.body) else {
        return Reply::error(400, "Malformed JSON body");
    };
    let data = &body["data"];
    if data["type"].as_str() != Some("orders") {
        return Reply::error(400, "data.type is required and must be \"orders\"");
    }
    let Some(id) = data["id"].as_str().filter(|s| !s.is_empty()) else {
        return Reply::error(400, "data.id is required");
    };
    let empty = Map::new();
    let attrs = data["attributes"].as_object().unwrap_or(&empty);
    let Some(target) = attrs.get("status").and_then(Value::as_str) else {
        return Reply::error(400, "attributes.status is required");
    };
    let Some(i) = visible(st, req, id) else {
        return order_not_found(id);
    };
    if let Some(code) = attrs.get("code").filter(|c| !c.is_null()) {
        if code.as_str() != Some(st.orders[i].spec.code.as_str()) {
            return Reply::error(400, "attributes.code does not match the order id");
        }
    }
    match target {
        "ACCEPTED_BY_MERCHANT" => accept(&mut st.orders[i]),
        "COMPLETED" => complete(&mut st.orders[i], req),
        "CANCELLED" => cancel(&mut st.orders[i], attrs),
        "ASSEMBLE" => assemble(st, i, attrs),
        "ARRIVED" => arrived(&mut st.orders[i]),
        "ARRIVED_BACKWARD" => arrived_backward(&mut st.orders[i]),
        other => Reply::error(400, &format!("Status {other} can't be set by the merchant")),
    }
}

fn accept(order: &mut Order) -> Reply {
    if order.status != "APPROVED_BY_BANK" {
        return Reply::error(
            400,
            &format!(
                "Order can't be accepted: its status is {}, not APPROVED_BY_BANK",
                order.status
            ),
        );
    }
    order.accept();
    Reply::ok(render::echo(order, "ACCEPTED_BY_MERCHANT", Map::new()))
}

/// Two steps: `X-Send-Code: true` with an empty `X-Security-Code` sends the buyer a
/// code; the same call with the code completes the order.
fn complete(order: &mut Order, req: &Req) -> Reply {
    if order.status == "CANCELLED" || order.status == "CANCELLING" {
        return Reply::error(400, "Order is cancelled, so it can't be completed.");
    }
    if order.status == "COMPLETED" {
        return Reply::error(
            400,
            "Order already has been completed, so it can't be completed again.",
        );
    }
    if order.state == "SIGN_REQUIRED" {
        return Reply::error(400, "Order is not may complete allowed");
    }
    if order.status != "ACCEPTED_BY_MERCHANT" {
        return Reply::error(
            400,
            &format!(
                "Order can't be completed: its status is {}, not ACCEPTED_BY_MERCHANT",
                order.status
            ),
        );
    }
    let invalid = || {
        Reply::error(
            400,
            "Security code is not valid. And the order cannot be completed without it",
        )
    };
    let send = req
        .header("x-send-code")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let Some(given) = req.header("x-security-code").map(str::trim) else {
        return invalid();
    };
    if given.is_empty() {
        if !send {
            return invalid();
        }
        let code = format!("{:04}", rand::random_range(0..10_000u32));
        tracing::debug!(order = %order.spec.code, "simulated Kaspi sent a security code to the buyer");
        order.security_code = Some(code);
        let status = order.status.clone();
        return Reply::ok(render::echo(order, &status, Map::new()));
    }
    if order.security_code.as_deref() != Some(given) {
        return invalid();
    }
    order.status = "COMPLETED".to_string();
    order.state = "ARCHIVE".to_string();
    order.completed_with_code = true;
    Reply::ok(render::echo(order, "COMPLETED", Map::new()))
}

fn cancel(order: &mut Order, attrs: &Map<String, Value>) -> Reply {
    if order.status != "APPROVED_BY_BANK" && order.status != "ACCEPTED_BY_MERCHANT" {
        return Reply::error(
            400,
            &format!(
                "Order can't be cancelled: its status is {}, not APPROVED_BY_BANK or ACCEPTED_BY_MERCHANT",
                order.status
            ),
        );
    }
    let reason = match attrs.get("cancellationReason") {
        None | Some(Value::Null) => {
            return Reply::error(400, "cancellationReason is required to cancel an order")
        }
        Some(Value::String(r)) if CANCEL_REASONS.contains(&r.as_str()) => r.clone(),
        Some(other) => {
            return Reply::error(400, &format!("Unknown cancellationReason: {other}"));
        }
    };
    let comment = match attrs.get("cancellationComment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.chars().count() <= MAX_COMMENT_CHARS => Some(c.clone()),
        Some(Value::String(_)) => {
            return Reply::error(
                400,
                "cancellationComment must not be longer than 1000 characters",
            )
        }
        Some(_) => return Reply::error(400, "cancellationComment must be a string"),
    };
    order.status = "CANCELLED".to_string();
    order.state = "ARCHIVE".to_string();
    order.cancellation_reason = Some(reason.clone());
    order.cancellation_comment = comment;
    let mut extra = Map::new();
    extra.insert("cancellationReason".into(), json!(reason));
    Reply::ok(render::echo(order, "CANCELLED", extra))
}

fn assemble(st: &mut State, i: usize, attrs: &Map<String, Value>) -> Reply {
    let order = &st.orders[i];
    if order.status != "ACCEPTED_BY_MERCHANT" {
        return Reply::error(
            400,
            &format!(
                "Order can't be assembled: its status is {}, not ACCEPTED_BY_MERCHANT",
                order.status
            ),
        );
    }
    if order.state != "KASPI_DELIVERY" {
        return Reply::error(
            400,
            &format!(
                "Order can't be assembled: only Kaspi Delivery orders (state KASPI_DELIVERY) are, this one is in state {}",
                order.state
            ),
        );
    }
    if order.assembled {
        return Reply::error(400, "Order has already been assembled");
    }
    let spaces = match attrs.get("numberOfSpace") {
        None | Some(Value::Null) => {
            return Reply::error(400, "numberOfSpace is required for ASSEMBLE")
        }
        Some(Value::String(s)) => match s.trim().parse::<u32>() {
            Ok(n) if (1..=50).contains(&n) => n,
            _ => return Reply::error(400, "numberOfSpace must be between 1 and 50"),
        },
        Some(_) => return Reply::error(400, "numberOfSpace must be a string, for example \"2\""),
    };
    let number = st.next_waybill_number();
    let order = &mut st.orders[i];
    order.assembled = true;
    order.number_of_space = Some(spaces);
    order.waybill_number = Some(number);
    order.courier_planning_date_ms = Some(now_ms() + 24 * 3600 * 1000);
    let mut extra = Map::new();
    extra.insert("numberOfSpace".into(), json!(spaces));
    Reply::ok(render::echo(order, "ASSEMBLED", extra))
}

fn arrived(order: &mut Order) -> Reply {
    if !order.spec.pre_order {
        return Reply::error(400, "ARRIVED is only allowed for pre-orders");
    }
    if order.status != "ACCEPTED_BY_MERCHANT" {
        return Reply::error(
            400,
            &format!(
                "Order can't be marked arrived: its status is {}, not ACCEPTED_BY_MERCHANT",
                order.status
            ),
        );
    }
    // The goods are at the point; nothing the API reads back changes.
    let status = order.status.clone();
    Reply::ok(render::echo(order, &status, Map::new()))
}

fn arrived_backward(order: &mut Order) -> Reply {
    if order.status != "CANCELLING" && order.status != "KASPI_DELIVERY_RETURN_REQUESTED" {
        return Reply::error(
            400,
            &format!(
                "Order can't be marked arrived back: its status is {}, not CANCELLING or KASPI_DELIVERY_RETURN_REQUESTED",
                order.status
            ),
        );
    }
    order.returned_to_warehouse = true;
    let status = order.status.clone();
    Reply::ok(render::echo(order, &status, Map::new()))
}
