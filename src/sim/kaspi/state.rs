//! The simulated merchant's data: orders with their truth (state, status,
//! assembly, courier, cancellation, security code), the fault queue and the
//! request log.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::Value;

use super::render::b64;
use super::{KaspiFault, KaspiSimConfig, SimOrder, SimOrderSpec, SimRequest};

pub(super) struct State {
    pub token: String,
    pub merchant_uid: Option<String>,
    pub latency: Duration,
    /// `http://127.0.0.1:PORT`, for `links` and waybill URLs.
    pub origin: String,
    /// In the order `create_order` was called.
    pub orders: Vec<Order>,
    pub faults: VecDeque<KaspiFault>,
    /// Every n-th request gets this fault until lifted (after queued ones).
    pub steady_fault: Option<crate::sim::support::SteadyFault<KaspiFault>>,
    pub requests: Vec<SimRequest>,
    next_internal: u64,
    next_waybill: u64,
    /// Bumped on every waybill URL handed out, so no two are equal.
    pub waybill_reads: u64,
}

pub(super) struct Order {
    /// The internal number the opaque id encodes.
    pub internal: u64,
    pub id: String,
    pub spec: SimOrderSpec,
    pub state: String,
    pub status: String,
    pub approved_by_bank_date_ms: i64,
    pub assembled: bool,
    pub courier_transmission_date_ms: Option<i64>,
    pub courier_planning_date_ms: Option<i64>,
    pub waybill_number: Option<String>,
    pub number_of_space: Option<u32>,
    pub cancellation_reason: Option<String>,
    pub cancellation_comment: Option<String>,
    pub completed_with_code: bool,
    pub security_code: Option<String>,
    pub returned_to_warehouse: bool,
    /// `set_field` values for names that are not part of the truth, applied on read.
    pub overrides: Vec<(String, Value)>,
}

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl State {
    pub fn new(cfg: KaspiSimConfig, origin: String) -> State {
        State {
            token: cfg.token,
            merchant_uid: cfg.merchant_uid,
            latency: cfg.latency,
            origin,
            orders: Vec::new(),
            faults: VecDeque::new(),
            steady_fault: None,
            requests: Vec::new(),
            next_internal: 495_145_021,
            next_waybill: 101_110_589,
            waybill_reads: 0,
        }
    }

    pub fn create(&mut self, spec: SimOrderSpec) -> SimOrder {
        let internal = self.next_internal;
        self.next_internal += 1;
        let order = Order {
            internal,
            id: b64(internal.to_string().as_bytes()),
            state: spec.state.clone(),
            status: spec.status.clone(),
            approved_by_bank_date_ms: spec.creation_date_ms + 746,
            assembled: false,
            courier_transmission_date_ms: None,
            courier_planning_date_ms: None,
            waybill_number: None,
            number_of_space: None,
            cancellation_reason: None,
            cancellation_comment: None,
            completed_with_code: false,
            security_code: None,
            returned_to_warehouse: false,
            overrides: Vec::new(),
            spec,
        };
        let sim = order.sim();
        self.orders.push(order);
        sim
    }

    pub fn find(&self, id: &str) -> Option<&Order> {
        self.orders.iter().find(|o| o.id == id)
    }

    pub fn find_mut(&mut self, id: &str) -> Option<&mut Order> {
        self.orders.iter_mut().find(|o| o.id == id)
    }

    pub fn next_waybill_number(&mut self) -> String {
        let n = self.next_waybill;
        self.next_waybill += 1;
        n.to_string()
    }
}

/// The state an accepted order moves to from NEW.
fn delivery_state(is_kaspi_delivery: bool, delivery_mode: &str) -> &'static str {
    if is_kaspi_delivery {
        "KASPI_DELIVERY"
    } else if matches!(
        delivery_mode,
        "DELIVERY_PICKUP" | "DELIVERY_REGIONAL_PICKUP"
    ) {
        "PICKUP"
    } else {
        "DELIVERY"
    }
}

fn opt_i64(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_f64().map(|f| f as i64))
}

fn opt_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl Order {
    pub fn sim(&self) -> SimOrder {
        SimOrder {
            id: self.id.clone(),
            code: self.spec.code.clone(),
            state: self.state.clone(),
            status: self.status.clone(),
            creation_date_ms: self.spec.creation_date_ms,
            assembled: self.assembled,
            courier_transmission_date_ms: self.courier_transmission_date_ms,
            waybill_number: self.waybill_number.clone(),
            number_of_space: self.number_of_space,
            cancellation_reason: self.cancellation_reason.clone(),
            cancellation_comment: self.cancellation_comment.clone(),
            completed_with_code: self.completed_with_code,
        }
    }

    /// APPROVED_BY_BANK → ACCEPTED_BY_MERCHANT; NEW moves to the delivery state.
    pub fn accept(&mut self) {
        self.status = "ACCEPTED_BY_MERCHANT".to_string();
        if self.state == "NEW" {
            self.state =
                delivery_state(self.spec.is_kaspi_delivery, &self.spec.delivery_mode).to_string();
        }
    }

    pub fn set_field(&mut self, field: &str, value: Value) {
        let name = field.strip_prefix("kaspiDelivery.").unwrap_or(field);
        match name {
            "status" => {
                if let Some(s) = value.as_str() {
                    self.status = s.to_string();
                    return;
                }
            }
            "state" => {
                if let Some(s) = value.as_str() {
                    self.state = s.to_string();
                    return;
                }
            }
            "assembled" => {
                if let Some(b) = value.as_bool() {
                    self.assembled = b;
                    return;
                }
            }
            "creationDate" => {
                if let Some(ms) = opt_i64(&value) {
                    self.spec.creation_date_ms = ms;
                    return;
                }
            }
            "cancellationReason" => {
                self.cancellation_reason = opt_string(&value);
                return;
            }
            "courierTransmissionDate" => {
                self.courier_transmission_date_ms = opt_i64(&value);
                return;
            }
            "waybillNumber" => {
                self.waybill_number = opt_string(&value);
                return;
            }
            _ => {}
        }
        self.overrides.retain(|(k, _)| k != field);
        self.overrides.push((field.to_string(), value));
    }
}
