//! In-process simulator of the Kaspi.kz merchant Shop API (orders), written
//! from `shared/apis/kaspi.md` and nothing else.
//!
//! It owns one simulated merchant: its orders (with entries and buyers), the
//! order state machine that `POST /orders` drives (accept, two-step completion
//! with the buyer's security code, cancel, assemble, arrived), and the quirks
//! clients must survive: the 404 HTML page without `Accept`, the silent empty
//! answer without `X-Merchant-Uid`, the 14-day window, the page size cap and
//! the waybill URL that is re-signed on every read. Tests drive it through
//! [`KaspiSim`]: seed orders, play Kaspi, the buyer or the courier, inject
//! faults, and inspect what the client sent.
//!
//! Layout: `server` is the HTTP front (faults, latency, `Accept`, auth,
//! routing, the request log); `orders` answers the endpoints; `state` holds
//! the orders and their state machine; `render` turns them into JSON:API
//! resources.
//!
//! Choices where the facts are silent are listed on [`KaspiSim`].

mod orders;
mod render;
mod server;
mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use state::State;

/// How the simulated merchant account behaves.
#[derive(Clone, Debug)]
pub struct KaspiSimConfig {
    /// `X-Auth-Token` must equal it, else 401 with a JSON:API errors body.
    pub token: String,
    /// When set, requests without a matching `X-Merchant-Uid` see no orders
    /// (HTTP 200 with zero orders for lists, "not found" for one order).
    pub merchant_uid: Option<String>,
    /// Added to every response.
    pub latency: Duration,
}

impl Default for KaspiSimConfig {
    fn default() -> Self {
        KaspiSimConfig {
            token: "kaspi-test-token".to_string(),
            merchant_uid: None,
            latency: Duration::ZERO,
        }
    }
}

/// A failure to answer the next requests with, instead of their real answer.
#[derive(Clone, Debug)]
pub enum KaspiFault {
    /// 500 with a JSON:API errors body.
    ServerError,
    /// Holds the request ~35 s, then 504 with an HTML page (clients time out first).
    Timeout,
    /// Closes the connection without writing a response.
    ConnectionReset,
    /// 429 with a JSON:API errors body.
    TooManyRequests,
    /// 403 with a `text/html` body: the geo/WAF block, not a bad token.
    HtmlForbidden,
}

/// One order line as seeded.
#[derive(Clone, Debug)]
pub struct SimEntrySpec {
    /// The merchant SKU, read back as `offer.code`.
    pub sku: String,
    pub name: String,
    pub quantity: u32,
    /// Unit price; the entry's `totalPrice` is `base_price * quantity`.
    pub base_price: f64,
}

/// An order as seeded with [`KaspiSim::create_order`].
#[derive(Clone, Debug)]
pub struct SimOrderSpec {
    pub code: String,
    pub creation_date_ms: i64,
    /// NEW | SIGN_REQUIRED | PICKUP | DELIVERY | KASPI_DELIVERY | ARCHIVE
    pub state: String,
    /// APPROVED_BY_BANK | ACCEPTED_BY_MERCHANT | COMPLETED | CANCELLED | CANCELLING |
    /// KASPI_DELIVERY_RETURN_REQUESTED | RETURN_ACCEPTED_BY_MERCHANT | RETURNED
    pub status: String,
    pub is_kaspi_delivery: bool,
    /// DELIVERY_LOCAL | DELIVERY_PICKUP | DELIVERY_REGIONAL_TODOOR | DELIVERY_REGIONAL_PICKUP
    pub delivery_mode: String,
    /// PREPAID | PAY_WITH_CREDIT
    pub payment_mode: String,
    pub pre_order: bool,
    /// Sent as a float (`4000.0`) unless `integer_prices`.
    pub total_price: f64,
    /// When true, every price and weight is sent as a JSON integer (the docs show both).
    pub integer_prices: bool,
    pub customer_name: String,
    /// As Kaspi sends it: 10 digits without the country code by default.
    pub customer_phone: String,
    /// `formattedAddress`; a `deliveryAddress` object is built around it.
    pub delivery_address: Option<String>,
    pub planned_delivery_date_ms: Option<i64>,
    /// true: delivery fields nested in `kaspiDelivery{…}` (newer doc);
    /// false: the same keys as top-level attributes (older doc).
    pub nested_delivery_fields: bool,
    pub entries: Vec<SimEntrySpec>,
}

impl SimOrderSpec {
    /// A new Kaspi Delivery order to the door, prepaid, one lid for 5990 KZT.
    pub fn new(code: &str, creation_date_ms: i64) -> SimOrderSpec {
        SimOrderSpec {
            code: code.to_string(),
            creation_date_ms,
            state: "NEW".to_string(),
            status: "APPROVED_BY_BANK".to_string(),
            is_kaspi_delivery: true,
            delivery_mode: "DELIVERY_REGIONAL_TODOOR".to_string(),
            payment_mode: "PREPAID".to_string(),
            pre_order: false,
            total_price: 5990.0,
            integer_prices: false,
            customer_name: "Марат".to_string(),
            customer_phone: "7021234567".to_string(),
            delivery_address: None,
            planned_delivery_date_ms: None,
            nested_delivery_fields: true,
            entries: vec![SimEntrySpec {
                sku: "355654asiuowl".to_string(),
                name: "Крышка Tefal 28 см".to_string(),
                quantity: 1,
                base_price: 5990.0,
            }],
        }
    }
}

/// The simulator's truth about an order.
#[derive(Clone, Debug)]
pub struct SimOrder {
    /// Opaque, base64-looking; not equal to `code`.
    pub id: String,
    pub code: String,
    pub state: String,
    pub status: String,
    pub creation_date_ms: i64,
    pub assembled: bool,
    pub courier_transmission_date_ms: Option<i64>,
    pub waybill_number: Option<String>,
    pub number_of_space: Option<u32>,
    pub cancellation_reason: Option<String>,
    pub cancellation_comment: Option<String>,
    /// Completed by the merchant through the two-step security-code flow.
    pub completed_with_code: bool,
}

/// One request the simulator received. `status` 0 means the connection was
/// dropped without an answer. Header names are lower-case.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub status: u16,
    pub at: Instant,
    pub headers: Vec<(String, String)>,
}

/// The shared core of the server task and the handles.
pub(crate) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a test panicked mid-call; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Owner {
    shared: Arc<Shared>,
    base_url: String,
    /// Stops the server when the last handle goes away.
    _server: crate::sim::support::ServerGuard,
}

/// A running simulated Kaspi merchant on `127.0.0.1:PORT`. Clones share it;
/// the server stops when the last clone is dropped.
///
/// Behaviour where the API facts are silent:
/// - Order of the front: injected fault → `Accept` (404 HTML) → `X-Auth-Token`
///   (401) → route. Latency is added to every answer, faults included.
/// - `Accept: */*` (reqwest's default) does not count: only an `Accept` that names
///   `application/vnd.api+json` gets JSON.
/// - `POST /orders` without `Content-Type: application/vnd.api+json` → 415 JSON:API
///   error (the docs list the header as required).
/// - Without a matching `X-Merchant-Uid` (when configured) lists and code lookups
///   are 200 with no orders; `GET /orders/{id}`, its entries and `POST /orders`
///   answer 404 "not found", as for an unknown id.
/// - `page[number]` and `page[size]` are required on lists (not on a code lookup):
///   missing, non-numeric or `page[size]=0` → 400. `$le < $ge` gives an empty page.
/// - A code lookup ignores every other filter, date window included; an unknown
///   code gives an empty `data` array with `pageCount` 0.
/// - `filter[orders][state]`/`[status]` with an unknown value → 400. `deliveryType`
///   accepts both vocabularies; `signatureRequired` matches state `SIGN_REQUIRED`.
/// - `relationships.user.data` is always present; `relationships.entries.data` only
///   with `include[orders]=entries`. `customers` resources carry
///   `{name, cellPhone, firstName, lastName}`; the first word of the name is the
///   first name, the rest the last name (null when none).
/// - `links.self` and the waybill URL point at this simulator, not kaspi.kz. The
///   waybill (`GET /shop/api/waybill/{number}.pdf?…`) answers a tiny PDF with the token.
/// - `attributes.code` in a transition, when sent, must match the order's code (400).
/// - `COMPLETED`: checks in order cancelled (CANCELLED or CANCELLING) → completed →
///   state SIGN_REQUIRED → status not ACCEPTED_BY_MERCHANT. Step 1 (`X-Send-Code: true`,
///   empty `X-Security-Code`) answers 200 echoing the unchanged status; a repeat
///   sends a new code. No `X-Security-Code` header at all → "Security code is not valid…".
///   Kaspi Delivery orders may be completed like the others.
/// - `ASSEMBLE`: `numberOfSpace` must be a JSON string of an integer 1..=50 (a JSON
///   number → 400); an assembled order cannot be assembled again (400). The echo
///   says `"ASSEMBLED"` with `numberOfSpace` as a number.
/// - `ARRIVED` (pre-orders, ACCEPTED_BY_MERCHANT) changes nothing visible;
///   `ARRIVED_BACKWARD` (CANCELLING or KASPI_DELIVERY_RETURN_REQUESTED) sets
///   `returnedToWarehouse`.
/// - Accepting an order in state SIGN_REQUIRED keeps that state (the buyer still signs);
///   from NEW it moves to KASPI_DELIVERY (Kaspi Delivery), else PICKUP for the
///   pickup delivery modes and DELIVERY for the others.
/// - Timeout and gateway answers (504) are HTML; other errors are JSON:API.
/// - Handle methods on an unknown id, or out of turn (a courier picking up an
///   unassembled order), are ignored with a warning.
#[derive(Clone)]
pub struct KaspiSim {
    owner: Arc<Owner>,
}

impl KaspiSim {
    /// Binds `127.0.0.1:0` and serves in a spawned task.
    pub async fn start(config: KaspiSimConfig) -> std::io::Result<KaspiSim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let origin = format!("http://{addr}");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(config, origin.clone())),
        });
        let server = tokio::spawn(server::serve(listener, shared.clone())).abort_handle();
        Ok(KaspiSim {
            owner: Arc::new(Owner {
                shared,
                base_url: format!("{origin}{}", server::API_PREFIX),
                _server: crate::sim::support::ServerGuard(server),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.owner.shared.lock()
    }

    /// `http://127.0.0.1:PORT/shop/api/v2`.
    pub fn base_url(&self) -> String {
        self.owner.base_url.clone()
    }

    /// Adds an order exactly as specified (no state-machine checks).
    pub fn create_order(&self, spec: SimOrderSpec) -> SimOrder {
        self.lock().create(spec)
    }

    pub fn order(&self, id: &str) -> Option<SimOrder> {
        let st = self.lock();
        st.find(id).map(|o| o.sim())
    }

    pub fn order_by_code(&self, code: &str) -> Option<SimOrder> {
        let st = self.lock();
        st.orders
            .iter()
            .find(|o| o.spec.code == code)
            .map(|o| o.sim())
    }

    /// Every order, in creation order of the calls to `create_order`.
    pub fn orders(&self) -> Vec<SimOrder> {
        self.lock().orders.iter().map(|o| o.sim()).collect()
    }

    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// The next `times` requests (any path) get `fault`.
    pub fn inject(&self, fault: KaspiFault, times: usize) {
        let mut st = self.lock();
        for _ in 0..times {
            st.faults.push_back(fault.clone());
        }
    }

    /// From now on every `every`-th request gets `fault` (5: a 20 % error
    /// rate; 1: a storm) until [`KaspiSim::lift_steady_fault`].
    pub fn fault_every(&self, fault: KaspiFault, every: usize) {
        self.lock().steady_fault = Some(crate::sim::support::SteadyFault::new(fault, every));
    }

    pub fn lift_steady_fault(&self) {
        self.lock().steady_fault = None;
    }

    fn act(&self, id: &str, what: &str, f: impl FnOnce(&mut state::Order) -> bool) {
        let mut st = self.lock();
        match st.find_mut(id) {
            Some(order) => {
                if !f(order) {
                    tracing::warn!(order = id, action = what, status = %order.status,
                        "simulated Kaspi action out of turn was ignored");
                }
            }
            None => tracing::warn!(
                order = id,
                action = what,
                "simulated Kaspi action on an unknown order"
            ),
        }
    }

    /// Kaspi marks the order accepted (as if the merchant did it in the cabinet).
    pub fn kaspi_accepts_order(&self, id: &str) {
        self.act(id, "accept", |o| {
            o.accept();
            true
        });
    }

    /// The courier takes the parcels: `courierTransmissionDate = at_ms`. Needs `assembled`.
    pub fn courier_picks_up(&self, id: &str, at_ms: i64) {
        self.act(id, "courier_picks_up", |o| {
            if !o.assembled {
                return false;
            }
            o.courier_transmission_date_ms = Some(at_ms);
            true
        });
    }

    /// Kaspi (or the courier) completes the order: COMPLETED, state ARCHIVE.
    pub fn kaspi_completes(&self, id: &str) {
        self.act(id, "kaspi_completes", |o| {
            o.status = "COMPLETED".to_string();
            o.state = "ARCHIVE".to_string();
            true
        });
    }

    /// The buyer cancels: CANCELLING with `cancellationReason = reason`, state unchanged.
    pub fn buyer_cancels(&self, id: &str, reason: &str) {
        self.act(id, "buyer_cancels", |o| {
            o.status = "CANCELLING".to_string();
            o.cancellation_reason = Some(reason.to_string());
            true
        });
    }

    /// CANCELLING → CANCELLED, state ARCHIVE.
    pub fn cancellation_confirmed(&self, id: &str) {
        self.act(id, "cancellation_confirmed", |o| {
            if o.status != "CANCELLING" {
                return false;
            }
            o.status = "CANCELLED".to_string();
            o.state = "ARCHIVE".to_string();
            true
        });
    }

    /// The buyer asks to return a Kaspi Delivery order: KASPI_DELIVERY_RETURN_REQUESTED.
    pub fn buyer_requests_return(&self, id: &str) {
        self.act(id, "buyer_requests_return", |o| {
            o.status = "KASPI_DELIVERY_RETURN_REQUESTED".to_string();
            true
        });
    }

    /// The return is done: RETURNED, state ARCHIVE, `returnedToWarehouse`.
    pub fn returned(&self, id: &str) {
        self.act(id, "returned", |o| {
            o.status = "RETURNED".to_string();
            o.state = "ARCHIVE".to_string();
            o.returned_to_warehouse = true;
            true
        });
    }

    /// Changes an attribute by its API name (`"totalPrice"`, `"kaspiDelivery.express"`).
    /// `status`, `state`, `assembled`, `creationDate`, `cancellationReason`,
    /// `courierTransmissionDate` and `waybillNumber` (also under `kaspiDelivery.`)
    /// change the order's truth; any other name overrides what is read back.
    pub fn set_field(&self, id: &str, field: &str, value: serde_json::Value) {
        self.act(id, "set_field", |o| {
            o.set_field(field, value);
            true
        });
    }

    /// The code step 1 of the completion sent to the buyer, if any.
    pub fn security_code(&self, id: &str) -> Option<String> {
        self.lock().find(id).and_then(|o| o.security_code.clone())
    }

    /// Every request received, in order of arrival.
    pub fn requests(&self) -> Vec<SimRequest> {
        self.lock().requests.clone()
    }

    /// How many answers had this status (0: dropped connections).
    pub fn count_status(&self, status: u16) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.status == status)
            .count()
    }
}
