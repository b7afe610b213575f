//! The Kaspi Shop API client: headers on every call, order lists over creation
//! windows of at most 14 days (split, all pages), single orders by id and by
//! code, entries, and the transitions (all `POST /orders`) with a re-read
//! before each one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use governor::DefaultDirectRateLimiter;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::convert::{order_from_resource, KaspiOrder};
use super::error::KaspiError;
use super::wire;
use crate::domain::OrderItem;

const JSON_API: &str = "application/vnd.api+json";
/// Kaspi refuses creation windows longer than 14 days.
pub const MAX_WINDOW: Duration = Duration::from_secs(14 * 24 * 3600);
/// Kaspi caps pages at 100 orders.
pub const PAGE_SIZE: usize = 100;
/// Pages of one window fetched at the same time, once the page count is known.
const PARALLEL_PAGES: usize = 4;

/// One configured Kaspi shop, as the client needs it.
#[derive(Clone)]
pub struct KaspiShop {
    pub name: String,
    /// e.g. `https://kaspi.kz/shop/api/v2`
    pub base_url: String,
    pub token: SecretString,
    pub merchant_uid: Option<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for KaspiShop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KaspiShop")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("merchant_uid", &self.merchant_uid)
            .finish_non_exhaustive()
    }
}

/// A reason Kaspi accepts for a merchant's cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    BuyerCancellationByMerchant,
    BuyerNotReachable,
    MerchantOutOfStock,
}

impl CancelReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            CancelReason::BuyerCancellationByMerchant => "BUYER_CANCELLATION_BY_MERCHANT",
            CancelReason::BuyerNotReachable => "BUYER_NOT_REACHABLE",
            CancelReason::MerchantOutOfStock => "MERCHANT_OUT_OF_STOCK",
        }
    }

    pub fn parse(value: &str) -> Option<CancelReason> {
        match value {
            "BUYER_CANCELLATION_BY_MERCHANT" => Some(CancelReason::BuyerCancellationByMerchant),
            "BUYER_NOT_REACHABLE" => Some(CancelReason::BuyerNotReachable),
            "MERCHANT_OUT_OF_STOCK" => Some(CancelReason::MerchantOutOfStock),
            _ => None,
        }
    }
}

/// A merchant action on an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Accept,
    /// Kaspi Delivery only: the parcel is packed; generates the waybill.
    Assemble {
        spaces: u32,
    },
    /// Step 1 of completion: Kaspi sends a code to the buyer.
    SendCompletionCode,
    /// Step 2: complete with the code the buyer read out.
    Complete {
        security_code: String,
    },
    Cancel {
        reason: CancelReason,
        comment: Option<String>,
    },
}

/// Where a window's listing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRun {
    /// Page 0, which tells the page count.
    First,
    /// Pages from `page` on, of `page_count`.
    From { page: u64, page_count: u64 },
}

/// What a transition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionOutcome {
    Done,
    /// The order was already there; nothing was sent.
    AlreadyThere,
}

/// The Kaspi client of one shop.
#[derive(Clone)]
pub struct KaspiClient {
    shop: Arc<KaspiShop>,
    http: reqwest::Client,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// The shop's pause after 429s, shared by its poller and its actions.
    throttle: crate::connectors::throttle::Throttle,
}

struct Answer {
    status: StatusCode,
    html: bool,
    body: bytes::Bytes,
}

impl KaspiClient {
    pub fn new(
        shop: KaspiShop,
        limiter: Option<Arc<DefaultDirectRateLimiter>>,
    ) -> Result<KaspiClient, KaspiError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(JSON_API));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_API));
        let token = HeaderValue::from_str(shop.token.expose_secret()).map_err(|_| {
            KaspiError::Invalid("the token has characters a header cannot carry".into())
        })?;
        let mut token = token;
        token.set_sensitive(true);
        headers.insert("X-Auth-Token", token);
        if let Some(uid) = &shop.merchant_uid {
            let uid = HeaderValue::from_str(uid).map_err(|_| {
                KaspiError::Invalid("merchant_uid is not a valid header value".into())
            })?;
            headers.insert("X-Merchant-Uid", uid);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(shop.timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!(
                "orderbridge/",
                env!("CARGO_PKG_VERSION"),
                " (+kaspi-shop-api)"
            ))
            .build()
            .map_err(|e| KaspiError::Network(e.to_string()))?;
        Ok(KaspiClient {
            shop: Arc::new(shop),
            http,
            limiter,
            throttle: Default::default(),
        })
    }

    pub fn shop(&self) -> &str {
        &self.shop.name
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.shop.base_url.trim_end_matches('/'), path)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        extra: &[(&'static str, String)],
    ) -> Result<Answer, KaspiError> {
        let admitted = loop {
            let admitted = self.throttle.admit().await;
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            if admitted.still_clear() {
                break admitted;
            }
        };
        let mut request = self.http.request(method, self.url(path)).query(query);
        for (name, value) in extra {
            request = request.header(*name, value.as_str());
        }
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let started = Instant::now();
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = crate::connectors::throttle::retry_after(response.headers());
            let pause = admitted.rate_limited(retry_after);
            tracing::warn!(shop = %self.shop.name, path, pause_ms = pause.as_millis() as u64,
                "Kaspi answered 429 Too Many Requests; every request of the shop pauses.");
        } else {
            admitted.answered();
        }
        let html = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("html"));
        let body = response.bytes().await.map_err(|e| self.transport(e))?;
        let html = html || body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<');
        metrics::counter!("orderbridge_kaspi_requests_total",
            "shop" => self.shop.name.clone(), "status" => status.as_u16().to_string())
        .increment(1);
        tracing::debug!(shop = %self.shop.name, path, status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64, "Kaspi call.");
        Ok(Answer { status, html, body })
    }

    fn transport(&self, error: reqwest::Error) -> KaspiError {
        if error.is_timeout() {
            KaspiError::Timeout(self.shop.timeout)
        } else {
            KaspiError::Network(crate::connectors::transport_error_text(error))
        }
    }

    /// Maps a non-2xx answer to its error; 2xx passes.
    fn check(&self, answer: Answer) -> Result<Answer, KaspiError> {
        let status = answer.status.as_u16();
        if answer.status.is_success() {
            return Ok(answer);
        }
        let message = || {
            serde_json::from_slice::<wire::ErrorsEnvelope>(&answer.body)
                .ok()
                .and_then(|e| e.message())
                .unwrap_or_else(|| {
                    String::from_utf8_lossy(&answer.body)
                        .chars()
                        .take(200)
                        .collect()
                })
        };
        let error = match status {
            400 => KaspiError::BadRequest(message()),
            401 => KaspiError::Auth {
                status,
                detail: message(),
            },
            403 if answer.html || serde_json::from_slice::<Value>(&answer.body).is_err() => {
                KaspiError::NetworkBlocked
            }
            403 => KaspiError::Auth {
                status,
                detail: message(),
            },
            404 if answer.html => KaspiError::Misconfigured,
            404 => KaspiError::NotFound(message()),
            429 => KaspiError::RateLimited,
            500..=599 => KaspiError::Server {
                status,
                detail: message(),
            },
            _ => KaspiError::Unexpected {
                status,
                detail: message(),
            },
        };
        if error.is_alert() {
            tracing::error!(shop = %self.shop.name, alert = true, error = %error, "Kaspi refuses this shop's calls.");
        }
        Err(error)
    }

    // ---- reads -----------------------------------------------------------------

    /// Orders created in `[from, to]`, with their lines; longer ranges are split
    /// into windows of at most 14 days. Each window is listed to its last page.
    pub async fn list_orders(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<KaspiOrder>, KaspiError> {
        let mut orders = Vec::new();
        for (start, end) in windows(from, to) {
            orders.extend(self.list_window(start, end).await?);
        }
        Ok(orders)
    }

    async fn list_window(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<KaspiOrder>, KaspiError> {
        let mut orders = Vec::new();
        let mut next = PageRun::First;
        loop {
            let (batch, more) = self.list_pages(from, to, next).await?;
            orders.extend(batch);
            match more {
                Some(run) => next = run,
                None => return Ok(orders),
            }
        }
    }

    /// A run of pages of one window: the first page alone (it tells the page
    /// count), then up to 4 pages at a time. Returns the orders and the next run,
    /// if any, so a caller can store each run before reading the next.
    pub async fn list_pages(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        run: PageRun,
    ) -> Result<(Vec<KaspiOrder>, Option<PageRun>), KaspiError> {
        let (page, page_count) = match run {
            PageRun::First => {
                let (orders, page_count) = self.list_page(from, to, 0).await?;
                let more = (page_count > 1 && !orders.is_empty()).then_some(PageRun::From {
                    page: 1,
                    page_count,
                });
                return Ok((orders, more));
            }
            PageRun::From { page, page_count } => (page, page_count),
        };
        let last = (page + PARALLEL_PAGES as u64).min(page_count);
        let pages =
            futures::future::try_join_all((page..last).map(|p| self.list_page(from, to, p)))
                .await?;
        let mut orders = Vec::new();
        let mut empty = false;
        for (batch, _) in pages {
            empty |= batch.is_empty();
            orders.extend(batch);
        }
        let more = (!empty && last < page_count).then_some(PageRun::From {
            page: last,
            page_count,
        });
        Ok((orders, more))
    }

    async fn list_page(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        page: u64,
    ) -> Result<(Vec<KaspiOrder>, u64), KaspiError> {
        let query = vec![
            ("page[number]".to_string(), page.to_string()),
            ("page[size]".to_string(), PAGE_SIZE.to_string()),
            (
                "filter[orders][creationDate][$ge]".to_string(),
                from.timestamp_millis().to_string(),
            ),
            (
                "filter[orders][creationDate][$le]".to_string(),
                to.timestamp_millis().to_string(),
            ),
            ("include[orders]".to_string(), "entries".to_string()),
        ];
        let answer = self.check(self.send(Method::GET, "/orders", &query, None, &[]).await?)?;
        parse_order_list(&self.shop.name, &answer.body)
    }

    /// One order by id (`None`: Kaspi does not know it).
    pub async fn order(&self, id: &str) -> Result<Option<KaspiOrder>, KaspiError> {
        let answer = self
            .send(Method::GET, &format!("/orders/{id}"), &[], None, &[])
            .await?;
        if answer.status == StatusCode::NOT_FOUND && !answer.html {
            return Ok(None);
        }
        let answer = self.check(answer)?;
        let envelope: wire::SingleEnvelope = decode(&answer.body, "an order")?;
        Ok(Some(order_from_resource(
            &self.shop.name,
            &envelope.data,
            &envelope.included,
        )?))
    }

    /// One order by its code, with its lines.
    pub async fn order_by_code(&self, code: &str) -> Result<Option<KaspiOrder>, KaspiError> {
        let query = vec![
            ("filter[orders][code]".to_string(), code.to_string()),
            ("include[orders]".to_string(), "entries".to_string()),
        ];
        let answer = self.check(self.send(Method::GET, "/orders", &query, None, &[]).await?)?;
        let envelope: wire::ListEnvelope = decode(&answer.body, "an order by code")?;
        envelope
            .data
            .first()
            .map(|r| order_from_resource(&self.shop.name, r, &envelope.included))
            .transpose()
    }

    /// The lines of an order.
    pub async fn entries(&self, id: &str) -> Result<Vec<OrderItem>, KaspiError> {
        let answer = self.check(
            self.send(
                Method::GET,
                &format!("/orders/{id}/entries"),
                &[],
                None,
                &[],
            )
            .await?,
        )?;
        let envelope: wire::ListEnvelope = decode(&answer.body, "order entries")?;
        Ok(envelope
            .data
            .iter()
            .map(super::convert::item_from_entry)
            .collect())
    }

    // ---- transitions -------------------------------------------------------------

    /// Applies a transition after re-reading the order: already there is success;
    /// a transition the current status does not allow is refused without a call.
    pub async fn transition(
        &self,
        id: &str,
        transition: &Transition,
    ) -> Result<TransitionOutcome, KaspiError> {
        let current = self
            .order(id)
            .await?
            .ok_or_else(|| KaspiError::NoSuchOrder(id.to_string()))?;
        let order = &current.order;
        let status = order.raw_status.clone().unwrap_or_default();
        let state = order.raw_state.clone().unwrap_or_default();
        let refuse = |wanted: &str| KaspiError::TransitionNotAllowed {
            code: order.code.clone(),
            current: format!("{state}/{status}"),
            wanted: wanted.to_string(),
        };
        let (attributes, headers): (Value, Vec<(&'static str, String)>) = match transition {
            Transition::Accept => {
                if status == "ACCEPTED_BY_MERCHANT" {
                    return Ok(TransitionOutcome::AlreadyThere);
                }
                if status != "APPROVED_BY_BANK" {
                    return Err(refuse("ACCEPTED_BY_MERCHANT"));
                }
                (
                    json!({ "code": order.code, "status": "ACCEPTED_BY_MERCHANT" }),
                    vec![],
                )
            }
            Transition::Assemble { spaces } => {
                if current.assembled {
                    return Ok(TransitionOutcome::AlreadyThere);
                }
                if status != "ACCEPTED_BY_MERCHANT" || state != "KASPI_DELIVERY" {
                    return Err(refuse("ASSEMBLE"));
                }
                if !(1..=50).contains(spaces) {
                    return Err(KaspiError::Invalid(format!(
                        "numberOfSpace must be 1 to 50, not {spaces}"
                    )));
                }
                (
                    json!({ "code": order.code, "status": "ASSEMBLE", "numberOfSpace": spaces.to_string() }),
                    vec![],
                )
            }
            Transition::SendCompletionCode | Transition::Complete { .. } => {
                if status == "COMPLETED" {
                    return Ok(TransitionOutcome::AlreadyThere);
                }
                if status != "ACCEPTED_BY_MERCHANT" {
                    return Err(refuse("COMPLETED"));
                }
                let code = match transition {
                    Transition::Complete { security_code } => security_code.trim().to_string(),
                    _ => String::new(),
                };
                (
                    json!({ "code": order.code, "status": "COMPLETED" }),
                    vec![
                        ("X-Send-Code", "true".to_string()),
                        ("X-Security-Code", code),
                    ],
                )
            }
            Transition::Cancel { reason, comment } => {
                if status == "CANCELLED" {
                    return Ok(TransitionOutcome::AlreadyThere);
                }
                if status != "ACCEPTED_BY_MERCHANT" && status != "APPROVED_BY_BANK" {
                    return Err(refuse("CANCELLED"));
                }
                let mut attributes = json!({ "code": order.code, "status": "CANCELLED", "cancellationReason": reason.as_str() });
                if let Some(comment) = comment {
                    let comment: String = comment.chars().take(1000).collect();
                    attributes["cancellationComment"] = json!(comment);
                }
                (attributes, vec![])
            }
        };
        let body = json!({ "data": { "type": "orders", "id": id, "attributes": attributes } });
        let answer = self
            .send(Method::POST, "/orders", &[], Some(&body), &headers)
            .await?;
        self.check(answer)?;
        tracing::info!(shop = %self.shop.name, order = %order.code, transition = ?transition_name(transition),
            "Kaspi transition applied.");
        Ok(TransitionOutcome::Done)
    }
}

fn transition_name(t: &Transition) -> &'static str {
    match t {
        Transition::Accept => "accept",
        Transition::Assemble { .. } => "assemble",
        Transition::SendCompletionCode => "send_completion_code",
        Transition::Complete { .. } => "complete",
        Transition::Cancel { .. } => "cancel",
    }
}

/// An order list page's body → its orders (lines included where the page
/// has them) and the page count; anything malformed is a `Decode` error.
pub fn parse_order_list(shop: &str, body: &[u8]) -> Result<(Vec<KaspiOrder>, u64), KaspiError> {
    let envelope: wire::ListEnvelope = decode(body, "an order list")?;
    let page_count = envelope
        .meta
        .as_ref()
        .and_then(|m| m.page_count)
        .unwrap_or(0);
    let orders = envelope
        .data
        .iter()
        .filter(|r| r.kind == "orders" || r.kind.is_empty())
        .map(|r| order_from_resource(shop, r, &envelope.included))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((orders, page_count))
}

fn decode<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, KaspiError> {
    serde_json::from_slice(body).map_err(|e| KaspiError::Decode {
        what,
        error: e.to_string(),
    })
}

/// Splits `[from, to]` into windows of at most 14 days (inclusive bounds, 1 ms apart).
pub fn windows(from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let span = chrono::Duration::from_std(MAX_WINDOW).unwrap_or(chrono::Duration::days(14))
        - chrono::Duration::milliseconds(1);
    let mut windows = Vec::new();
    let mut start = from;
    while start <= to {
        let end = (start + span).min(to);
        windows.push((start, end));
        start = end + chrono::Duration::milliseconds(1);
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_never_exceed_fourteen_days_and_leave_no_gap() {
        let to = DateTime::from_timestamp_millis(1_760_000_000_000).unwrap();
        let from = to - chrono::Duration::days(40);
        let w = windows(from, to);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].0, from);
        assert_eq!(w.last().unwrap().1, to);
        for (start, end) in &w {
            assert!(*end - *start < chrono::Duration::days(14));
        }
        for pair in w.windows(2) {
            assert_eq!(pair[1].0 - pair[0].1, chrono::Duration::milliseconds(1));
        }
        assert_eq!(windows(to, to), vec![(to, to)]);
        assert!(windows(to, from).is_empty());
    }
}
