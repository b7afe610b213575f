//! In-process simulator of the Avito public API, written from
//! `shared/apis/avito.md` and nothing else (it shares no code with the Avito
//! connector).
//!
//! It owns one simulated Avito account: the `client_credentials` token
//! endpoint, the delivery orders of `order-management` (list, `applyTransition`,
//! `setTrackingNumber`), `GET /core/v1/accounts/self`, and the messenger (chats,
//! messages, read marks, the v3 webhook subscription with its probe and the
//! deliveries). It reproduces the quirks clients must survive: 403 for an
//! expired token, the flat error envelope on order endpoints and the wrapped one
//! elsewhere, business failures inside a 200, the Cyrillic `х` in
//! `deliveryDateMaх`, per-endpoint per-minute limits plus an undocumented global
//! per-second cap, and both encodings of array query parameters. Tests drive it
//! through [`AvitoSim`]: seed orders, move them as Avito does, play a buyer in a
//! chat, inject faults, and inspect what the client sent.
//!
//! Layout: `server` is the HTTP front (faults, routing, auth, limits, the
//! request log, the cuttable connections); `orders` and `messenger` answer
//! their endpoints; `state` holds the account.
//!
//! Choices where the facts are silent are listed on [`AvitoSim`].

mod messenger;
mod orders;
mod server;
mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use state::State;

/// How the simulated Avito account behaves.
#[derive(Clone, Debug)]
pub struct AvitoSimConfig {
    /// `POST /token` accepts only this pair.
    pub client_id: String,
    pub client_secret: String,
    /// The account id: `GET /core/v1/accounts/self` answers it and the
    /// messenger paths must carry it (else 403).
    pub user_id: u64,
    /// How long an issued token works; after that every call with it is 403.
    pub token_ttl: Duration,
    /// `GET /order-management/1/orders`, per sliding minute.
    pub orders_per_minute: u32,
    /// `POST /order-management/1/order/applyTransition`, per sliding minute.
    pub transitions_per_minute: u32,
    /// `POST /order-management/1/order/setTrackingNumber`, per sliding minute.
    pub tracking_per_minute: u32,
    /// The undocumented cap across every endpoint but `/token`, per sliding second.
    pub global_per_second: u32,
}

impl Default for AvitoSimConfig {
    fn default() -> Self {
        AvitoSimConfig {
            client_id: "avito-client-id".to_string(),
            client_secret: "avito-client-secret".to_string(),
            user_id: 94235311,
            token_ttl: Duration::from_secs(24 * 3600),
            orders_per_minute: 500,
            transitions_per_minute: 100,
            tracking_per_minute: 100,
            global_per_second: 10,
        }
    }
}

/// A failure to answer the next requests with (never `/token`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AvitoFault {
    /// 500: flat `{"code":500,"message":…}` on order endpoints, wrapped
    /// `{"error":{"code":500,"message":…}}` elsewhere.
    ServerError,
    /// 429 in the envelope of the path, without `Retry-After`.
    TooManyRequests,
    /// Closes the connection without writing a response.
    ConnectionReset,
    /// Holds the request ~35 s, then 500 (clients time out first).
    Timeout,
    /// The next `applyTransition` (that passes validation) answers
    /// 200 `{"success":false}` and applies nothing. Other requests are unaffected.
    SuccessFalse,
}

/// One line of an order as seeded.
#[derive(Clone, Debug)]
pub struct SimAvitoItem {
    /// `avitoId`: the ad id.
    pub avito_id: String,
    /// `id`: the seller's own SKU.
    pub sku: Option<String>,
    pub title: String,
    pub count: u32,
    /// `prices.price` of the item (the line's price, in roubles).
    pub price: i64,
    /// `prices.commission` of the item.
    pub commission: i64,
    /// `chatId`: the buyer's messenger chat, when there is one.
    pub chat_id: Option<String>,
}

/// An order as seeded with [`AvitoSim::create_order`].
#[derive(Clone, Debug)]
pub struct SimAvitoOrderSpec {
    /// e.g. "50000000000000001"
    pub id: String,
    /// on_confirmation | ready_to_ship | in_transit | canceled | delivered |
    /// on_return | in_dispute | closed (any string is accepted: open enum)
    pub status: String,
    pub created_at: DateTime<Utc>,
    /// pvz | dbs | rdbs | courier | cnc (open)
    pub service_type: String,
    pub items: Vec<SimAvitoItem>,
    /// `prices.price`, `prices.commission`, `prices.delivery` of the order.
    pub price: i64,
    pub commission: i64,
    pub delivery_cost: i64,
    /// `delivery.buyerInfo`; null when both are `None`.
    pub buyer_name: Option<String>,
    /// "79876543210" style.
    pub buyer_phone: Option<String>,
    pub confirm_till: Option<DateTime<Utc>>,
    pub ship_till: Option<DateTime<Utc>>,
}

impl SimAvitoOrderSpec {
    /// An RDBS order awaiting confirmation: one pair of sneakers for 1000 ₽
    /// (commission 20, free delivery), bought by "Пушкин Александр"
    /// 79876543210, to confirm within a day of creation.
    pub fn new(id: &str, created_at: DateTime<Utc>) -> Self {
        SimAvitoOrderSpec {
            id: id.to_string(),
            status: "on_confirmation".to_string(),
            created_at,
            service_type: "rdbs".to_string(),
            items: vec![SimAvitoItem {
                avito_id: "2799377316".to_string(),
                sku: Some("132768483".to_string()),
                title: "Кеды Venice".to_string(),
                count: 1,
                price: 1000,
                commission: 20,
                chat_id: Some(format!("u2i-{id}")),
            }],
            price: 1000,
            commission: 20,
            delivery_cost: 0,
            buyer_name: Some("Пушкин Александр".to_string()),
            buyer_phone: Some("79876543210".to_string()),
            confirm_till: Some(created_at + chrono::Duration::days(1)),
            ship_till: None,
        }
    }
}

/// What the simulator knows of an order now.
#[derive(Clone, Debug)]
pub struct SimAvitoOrder {
    pub id: String,
    pub status: String,
    pub updated_at: DateTime<Utc>,
    pub tracking_number: Option<String>,
    /// Every transition applied through `applyTransition`, in order.
    pub transitions: Vec<String>,
}

/// One request as received, with the status it was answered with
/// (0: the connection was dropped).
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub status: u16,
    pub at: Instant,
}

/// One webhook POST the simulator made (`status` `None`: no HTTP answer).
#[derive(Clone, Debug)]
pub struct SimWebhookDelivery {
    pub url: String,
    pub body: serde_json::Value,
    pub status: Option<u16>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// For the webhook probe and deliveries (2 s timeout).
    http: reqwest::Client,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Owner {
    shared: Arc<Shared>,
    base_url: String,
    /// Stops the server when the last handle goes away.
    _server: crate::sim::support::ServerGuard,
}

/// The simulated Avito API; clones share one server. The server stops when
/// the last clone is dropped.
///
/// Behaviour where the API facts are silent:
/// - Order of the front: unknown route (404) → injected fault → `Authorization`
///   (401 missing/unknown, 403 expired) → global per-second cap → per-endpoint
///   per-minute limit → handler. Error bodies are flat `{"code","message"}` under
///   `/order-management/`, wrapped `{"error":{"code","message"}}` elsewhere.
/// - `/token` (and `/token/`) takes no faults and no limits. Missing or wrong
///   `grant_type` → 400 `{"error":"unsupported_grant_type"|"invalid_request",
///   "error_description"}`; wrong client id or secret → 401
///   `{"error":"invalid_client","error_description"}`. Every call issues a new
///   token; older ones stay valid until their own expiry.
/// - Limits are sliding windows (60 s per endpoint, 1 s global) counted only
///   over requests that passed auth and were not 429'd. No 429 carries
///   `Retry-After`. Outside `/order-management/` a limit's 429 carries
///   `X-RateLimit-Limit` (the limit that fired) and `X-RateLimit-Remaining: 0`;
///   order-management 429s carry neither (the spec attaches them to none of its
///   responses).
/// - Order list: `ids`/`statuses` (also `ids[]`/`statuses[]`) repeated or comma
///   separated; `limit` absent or 0 means 20, over 20 or negative → 400;
///   `page` absent means 1, 0 or non-numeric → 400; `dateFrom` non-numeric → 400.
///   Orders sort by `createdAt` then `id`. Unknown statuses just match nothing.
/// - `marketplaceId` is the id with its first digit replaced by 7.
/// - `availableActions`: on_confirmation → confirm (required), reject;
///   ready_to_ship + rdbs → perform (required), reject; ready_to_ship + dbs →
///   setTrackNumber (required); in_transit + rdbs|cnc → receive (required);
///   otherwise `[]`.
/// - `delivery.dispatchNumber`/`trackingNumber` are absent for rdbs, else
///   present (null until known). `terminalInfo` is set for dbs and pvz, else
///   null; `courierInfo` is null; `returnPolicy` is null except on_return
///   (`{"returnStatus":"in_transit","trackingNumber":null}`).
/// - Every change bumps `updatedAt` to max(now, previous + 1 s), whole seconds,
///   so a change is always visible in the RFC 3339 string.
/// - `applyTransition`: bad JSON, missing fields or a transition outside
///   confirm|reject|perform|receive → 400; unknown order → 404; a transition not
///   in `availableActions` → 200 `{"success":false}`.
/// - `setTrackingNumber`: checks in order: the number is on another order →
///   `already_set`; setTrackNumber not available → `already_set` if the order has
///   a number, else `not_allowed`; the number is not 5..=32 of `[0-9A-Za-z-]` →
///   `incorrect_number`. Success moves the order to in_transit.
/// - Webhook subscribe probes the url with `{}` (2 s); a non-200 or no answer
///   → 400 wrapped. Subscribing twice keeps one entry; unsubscribing an unknown
///   url is `{"ok":true}`.
/// - Chats sort by `updated` descending; messages newest first. `limit` out of
///   1..=100 or `offset` out of 0..=1000 → 400 wrapped. A chat is unread while
///   it has an unread incoming message.
/// - Sending a message (`POST …/chats/{id}/messages`) stores it as outgoing and
///   delivers it to the webhooks too, as Avito echoes the account's own messages.
#[derive(Clone)]
pub struct AvitoSim {
    owner: Arc<Owner>,
}

impl AvitoSim {
    /// Binds `127.0.0.1:0` and serves in a spawned task.
    pub async fn start(config: AvitoSimConfig) -> std::io::Result<AvitoSim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(config)),
            http,
        });
        let server = tokio::spawn(server::serve(listener, shared.clone())).abort_handle();
        Ok(AvitoSim {
            owner: Arc::new(Owner {
                shared,
                base_url: format!("http://{addr}"),
                _server: crate::sim::support::ServerGuard(server),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.owner.shared.lock()
    }

    /// `http://127.0.0.1:PORT` (paths as on api.avito.ru).
    pub fn base_url(&self) -> String {
        self.owner.base_url.clone()
    }

    /// Adds (or replaces, by id) an order exactly as specified.
    pub fn create_order(&self, spec: SimAvitoOrderSpec) -> SimAvitoOrder {
        self.lock().create_order(spec)
    }

    pub fn order(&self, id: &str) -> Option<SimAvitoOrder> {
        self.lock().find(id).map(|o| o.sim())
    }

    /// Avito or the delivery service moves the order (bumps `updatedAt`).
    pub fn set_status(&self, id: &str, status: &str) {
        let mut st = self.lock();
        match st.find_mut(id) {
            Some(order) => order.move_to(status),
            None => tracing::warn!(order = id, "simulated Avito set_status on an unknown order"),
        }
    }

    /// The next `times` requests (any path but `/token`) get `fault`;
    /// [`AvitoFault::SuccessFalse`] counts `applyTransition` calls only.
    pub fn inject(&self, fault: AvitoFault, times: usize) {
        let mut st = self.lock();
        if fault == AvitoFault::SuccessFalse {
            st.success_false += times;
        } else {
            st.faults.extend(std::iter::repeat_n(fault, times));
        }
    }

    /// From now on every `every`-th request (not `/token`) gets `fault` (5: a
    /// 20 % error rate; 1: a storm) until [`AvitoSim::lift_steady_fault`].
    pub fn fault_every(&self, fault: AvitoFault, every: usize) {
        self.lock().steady_fault = Some(crate::sim::support::SteadyFault::new(fault, every));
    }

    pub fn lift_steady_fault(&self) {
        self.lock().steady_fault = None;
    }

    /// Every token issued so far is expired from now on (→ 403).
    pub fn expire_tokens(&self) {
        self.lock().expire_tokens();
    }

    /// How many `/token` calls were made (successful or not).
    pub fn token_calls(&self) -> usize {
        self.lock().token_calls
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

    /// 429s a rate limit gave so far (injected ones not counted).
    pub fn rate_limited(&self) -> usize {
        self.lock().rate_limited
    }

    /// Every order, as it is now, in order of creation.
    pub fn orders(&self) -> Vec<SimAvitoOrder> {
        self.lock().orders.iter().map(|o| o.sim()).collect()
    }

    /// A buyer writes in a chat about an item: stores the message (the chat
    /// gets unread, and is created if new) and POSTs the v3 webhook to every
    /// subscribed URL. Returns the message id.
    pub async fn buyer_writes(
        &self,
        chat_id: &str,
        item_id: u64,
        item_title: &str,
        author_id: u64,
        author_name: &str,
        text: &str,
    ) -> String {
        let (id, body) =
            self.lock()
                .buyer_message(chat_id, item_id, item_title, author_id, author_name, text);
        messenger::deliver(&self.owner.shared, body).await;
        id
    }

    /// The account's own outgoing message (`author_id == user_id`), also
    /// delivered to webhooks (bridges must ignore it).
    pub async fn seller_writes(&self, chat_id: &str, text: &str) -> String {
        let (id, body) = self.lock().seller_message(chat_id, text);
        messenger::deliver(&self.owner.shared, body).await;
        id
    }

    /// The subscribed webhook URLs, in order of subscription.
    pub fn webhook_urls(&self) -> Vec<String> {
        self.lock().webhooks.clone()
    }

    /// Every webhook delivery made, in order.
    pub fn webhook_deliveries(&self) -> Vec<SimWebhookDelivery> {
        self.lock().deliveries.clone()
    }
}
