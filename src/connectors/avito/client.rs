//! The Avito client: a `client_credentials` token cached until shortly before
//! it expires (fetched as a single flight; a 401 or 403 triggers one new token
//! and one retry, since an expired token answers 403), a limiter per endpoint
//! with Avito's per-minute quotas plus a global per-second cap, orders (paged
//! by `hasMore`), transitions only when `availableActions` lists them, and the
//! messenger calls the lead intake needs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use governor::DefaultDirectRateLimiter;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::error::AvitoError;
use super::wire;
use super::{AvitoOrder, Chat, ChatMessage, Endpoint};

/// A token this close to its expiry is replaced before use.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);
/// Avito's page size limit for orders.
pub const ORDERS_PAGE: usize = 20;

/// One configured Avito account, as the client needs it.
#[derive(Clone)]
pub struct AvitoAccount {
    pub name: String,
    /// `https://api.avito.ru` or a simulator's address.
    pub base_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub timeout: Duration,
}

impl std::fmt::Debug for AvitoAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvitoAccount")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The account's limiters: a global cap and one per endpoint (shared with every
/// other user of the account in this process).
#[derive(Clone, Default)]
pub struct AvitoLimiters {
    pub global: Option<Arc<DefaultDirectRateLimiter>>,
    pub orders: Option<Arc<DefaultDirectRateLimiter>>,
    pub transitions: Option<Arc<DefaultDirectRateLimiter>>,
    pub tracking: Option<Arc<DefaultDirectRateLimiter>>,
}

impl AvitoLimiters {
    /// The limiter keys of an account: `avito:<name>` (global) and
    /// `avito:<name>:orders|transitions|tracking`.
    pub fn keys(account: &str) -> [String; 4] {
        [
            format!("avito:{account}"),
            format!("avito:{account}:orders"),
            format!("avito:{account}:transitions"),
            format!("avito:{account}:tracking"),
        ]
    }

    /// Takes the limiters of `account` from the process-wide registry.
    pub fn from_registry(limits: &crate::outbox::limits::Limiters, account: &str) -> Self {
        let [global, orders, transitions, tracking] = Self::keys(account);
        AvitoLimiters {
            global: limits.limiter(&global),
            orders: limits.limiter(&orders),
            transitions: limits.limiter(&transitions),
            tracking: limits.limiter(&tracking),
        }
    }

    fn for_endpoint(&self, endpoint: Endpoint) -> Option<&Arc<DefaultDirectRateLimiter>> {
        match endpoint {
            Endpoint::Orders => self.orders.as_ref(),
            Endpoint::Transition => self.transitions.as_ref(),
            Endpoint::Tracking => self.tracking.as_ref(),
            Endpoint::Other => None,
        }
    }
}

struct CachedToken {
    token: String,
    fresh_until: Instant,
}

#[derive(Clone)]
pub struct AvitoClient {
    inner: Arc<Inner>,
}

struct Inner {
    account: AvitoAccount,
    http: reqwest::Client,
    limiters: AvitoLimiters,
    token: tokio::sync::Mutex<Option<CachedToken>>,
    user_id: tokio::sync::OnceCell<u64>,
    /// The account's pause after 429s, shared by its poller and its actions.
    throttle: crate::connectors::throttle::Throttle,
}

struct Answer {
    status: StatusCode,
    body: bytes::Bytes,
}

impl AvitoClient {
    pub fn new(account: AvitoAccount, limiters: AvitoLimiters) -> Result<AvitoClient, AvitoError> {
        let http = reqwest::Client::builder()
            .timeout(account.timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("orderbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AvitoError::Network(e.to_string()))?;
        Ok(AvitoClient {
            inner: Arc::new(Inner {
                account,
                http,
                limiters,
                token: tokio::sync::Mutex::new(None),
                user_id: tokio::sync::OnceCell::new(),
                throttle: Default::default(),
            }),
        })
    }

    pub fn account(&self) -> &str {
        &self.inner.account.name
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}{}",
            self.inner.account.base_url.trim_end_matches('/'),
            path
        )
    }

    // ---- token -------------------------------------------------------------------

    /// The cached token, or a new one (one fetch at a time; `refused` is a token
    /// the API just refused, which is never handed out again).
    async fn token(&self, refused: Option<&str>) -> Result<String, AvitoError> {
        let mut cached = self.inner.token.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.fresh_until > Instant::now() && Some(c.token.as_str()) != refused {
                return Ok(c.token.clone());
            }
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.inner.account.client_id.as_str()),
            (
                "client_secret",
                self.inner.account.client_secret.expose_secret(),
            ),
        ];
        let request = self.inner.http.post(self.url("/token")).form(&form);
        let answer = self.exchange(request, Endpoint::Other).await?;
        if !answer.status.is_success() {
            let message = wire::error_message(&answer.body);
            let error = match answer.status.as_u16() {
                400 | 401 | 403 => AvitoError::Auth {
                    status: answer.status.as_u16(),
                    message,
                },
                429 => AvitoError::RateLimited {
                    endpoint: "token",
                    retry_after: None,
                },
                s @ 500..=599 => AvitoError::Server { status: s, message },
                s => AvitoError::Unexpected { status: s, message },
            };
            if error.is_alert() {
                tracing::error!(account = %self.account(), alert = true, error = %error, "Avito refused the client credentials.");
            }
            return Err(error);
        }
        let token: wire::TokenWire = decode(&answer.body, "the token")?;
        let ttl = Duration::from_secs(token.expires_in.unwrap_or(86_400).max(0) as u64);
        let fresh_for = ttl.saturating_sub(TOKEN_MARGIN.min(ttl / 10));
        *cached = Some(CachedToken {
            token: token.access_token.clone(),
            fresh_until: Instant::now() + fresh_for,
        });
        tracing::info!(account = %self.account(), expires_in_s = ttl.as_secs(), "Avito token obtained.");
        Ok(token.access_token)
    }

    // ---- plumbing --------------------------------------------------------------

    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        endpoint: Endpoint,
    ) -> Result<Answer, AvitoError> {
        let admitted = loop {
            let admitted = self.inner.throttle.admit().await;
            if let Some(global) = &self.inner.limiters.global {
                global.until_ready().await;
            }
            if let Some(limiter) = self.inner.limiters.for_endpoint(endpoint) {
                limiter.until_ready().await;
            }
            if admitted.still_clear() {
                break admitted;
            }
        };
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let headers = response.headers();
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            tracing::warn!(account = %self.account(), endpoint = endpoint.as_str(),
                limit = header("x-ratelimit-limit"), remaining = header("x-ratelimit-remaining"),
                retry_after = header("retry-after"), "Avito answered 429 Too Many Requests.");
        }
        let retry_after = crate::connectors::throttle::retry_after(response.headers());
        let body = response.bytes().await.map_err(|e| self.transport(e))?;
        metrics::counter!("orderbridge_avito_requests_total",
            "account" => self.account().to_string(), "endpoint" => endpoint.as_str(),
            "status" => status.as_u16().to_string())
        .increment(1);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let pause = admitted.rate_limited(retry_after);
            tracing::warn!(account = %self.account(), pause_ms = pause.as_millis() as u64,
                "Avito rate-limited the account; every request to it pauses.");
            return Err(AvitoError::RateLimited {
                endpoint: endpoint.as_str(),
                retry_after,
            });
        }
        admitted.answered();
        Ok(Answer { status, body })
    }

    fn transport(&self, error: reqwest::Error) -> AvitoError {
        if error.is_timeout() {
            AvitoError::Timeout(self.inner.account.timeout)
        } else {
            AvitoError::Network(crate::connectors::transport_error_text(error))
        }
    }

    /// An API call with the token; a 401/403 gets one new token and one retry.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        endpoint: Endpoint,
    ) -> Result<Answer, AvitoError> {
        let mut token = self.token(None).await?;
        for attempt in 0..2 {
            let mut request = self
                .inner
                .http
                .request(method.clone(), self.url(path))
                .bearer_auth(&token);
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let answer = self.exchange(request, endpoint).await?;
            let status = answer.status.as_u16();
            if (status == 401 || status == 403) && attempt == 0 {
                tracing::info!(account = %self.account(), status, "Avito refused the token; fetching a new one.");
                token = self.token(Some(&token)).await?;
                continue;
            }
            return self.check(answer);
        }
        Err(AvitoError::Unexpected {
            status: 0,
            message: "unreachable".into(),
        })
    }

    fn check(&self, answer: Answer) -> Result<Answer, AvitoError> {
        if answer.status.is_success() {
            return Ok(answer);
        }
        let status = answer.status.as_u16();
        let message = wire::error_message(&answer.body);
        let error = match status {
            400 => AvitoError::BadRequest(message),
            401 | 403 => AvitoError::Auth { status, message },
            404 => AvitoError::NotFound(message),
            500..=599 => AvitoError::Server { status, message },
            _ => AvitoError::Unexpected { status, message },
        };
        if error.is_alert() {
            tracing::error!(account = %self.account(), alert = true, error = %error, "Avito refuses this account's calls.");
        }
        Err(error)
    }

    // ---- orders ----------------------------------------------------------------

    /// Orders by status and/or id, created at or after `date_from`, all pages.
    pub async fn orders(
        &self,
        statuses: &[&str],
        ids: &[String],
        date_from: Option<DateTime<Utc>>,
    ) -> Result<Vec<AvitoOrder>, AvitoError> {
        let mut orders = Vec::new();
        for page in 1.. {
            let mut query: Vec<(String, String)> = vec![
                ("page".into(), page.to_string()),
                ("limit".into(), ORDERS_PAGE.to_string()),
            ];
            query.extend(
                statuses
                    .iter()
                    .map(|s| ("statuses".to_string(), s.to_string())),
            );
            query.extend(ids.iter().map(|id| ("ids".to_string(), id.clone())));
            if let Some(from) = date_from {
                query.push(("dateFrom".into(), from.timestamp().to_string()));
            }
            let answer = self
                .call(
                    Method::GET,
                    "/order-management/1/orders",
                    &query,
                    None,
                    Endpoint::Orders,
                )
                .await?;
            let (page, more) = parse_orders_page(self.account(), &answer.body)?;
            orders.extend(page);
            if !more {
                break;
            }
        }
        Ok(orders)
    }

    /// One order by id (re-read).
    pub async fn order(&self, id: &str) -> Result<Option<AvitoOrder>, AvitoError> {
        Ok(self
            .orders(&[], &[id.to_string()], None)
            .await?
            .into_iter()
            .find(|o| o.order.external_id == id))
    }

    /// Applies a transition (`confirm`, `reject`, `perform`, `receive`) only when the
    /// order's `availableActions` lists it; `{success: false}` is a failure. Returns
    /// the order as re-read afterwards.
    pub async fn apply_transition(
        &self,
        order_id: &str,
        transition: &str,
    ) -> Result<AvitoOrder, AvitoError> {
        let current = self
            .order(order_id)
            .await?
            .ok_or_else(|| AvitoError::NoSuchOrder(order_id.to_string()))?;
        if !current
            .available_actions
            .iter()
            .any(|(name, _)| name == transition)
        {
            return Err(AvitoError::NotAvailable {
                order: order_id.to_string(),
                action: transition.to_string(),
                available: current
                    .available_actions
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let body = json!({ "orderId": order_id, "transition": transition });
        let answer = self
            .call(
                Method::POST,
                "/order-management/1/order/applyTransition",
                &[],
                Some(&body),
                Endpoint::Transition,
            )
            .await?;
        let result: wire::SuccessWire = if answer.body.iter().all(u8::is_ascii_whitespace) {
            wire::SuccessWire {
                success: true,
                error: None,
            }
        } else {
            decode(&answer.body, "a transition")?
        };
        if !result.success {
            return Err(AvitoError::TransitionRefused {
                order: order_id.to_string(),
                action: transition.to_string(),
            });
        }
        tracing::info!(account = %self.account(), order = order_id, transition, "Avito transition applied.");
        self.order(order_id)
            .await?
            .ok_or_else(|| AvitoError::NoSuchOrder(order_id.to_string()))
    }

    /// Sets the tracking number (DBS); Avito's in-200 error codes become errors.
    pub async fn set_tracking_number(
        &self,
        order_id: &str,
        number: &str,
    ) -> Result<(), AvitoError> {
        let body = json!({ "orderId": order_id, "trackingNumber": number });
        let answer = self
            .call(
                Method::POST,
                "/order-management/1/order/setTrackingNumber",
                &[],
                Some(&body),
                Endpoint::Tracking,
            )
            .await?;
        let result: wire::SuccessWire = decode(&answer.body, "a tracking number")?;
        if result.success {
            return Ok(());
        }
        let (code, message) = match result.error {
            Some(e) => (
                e.code
                    .map(|c| {
                        c.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| c.to_string())
                    })
                    .unwrap_or_default(),
                e.message.unwrap_or_default(),
            ),
            None => (String::new(), String::new()),
        };
        Err(AvitoError::TrackingRefused {
            order: order_id.to_string(),
            code,
            message,
        })
    }

    // ---- account and messenger -------------------------------------------------------

    /// The account's user id (from `/core/v1/accounts/self`, read once).
    pub async fn user_id(&self) -> Result<u64, AvitoError> {
        self.inner
            .user_id
            .get_or_try_init(|| async {
                let answer = self
                    .call(
                        Method::GET,
                        "/core/v1/accounts/self",
                        &[],
                        None,
                        Endpoint::Other,
                    )
                    .await?;
                let me: wire::SelfWire = decode(&answer.body, "the account")?;
                Ok(me.id)
            })
            .await
            .copied()
    }

    /// Subscribes the messenger webhook (Avito probes the URL first).
    pub async fn subscribe_webhook(&self, url: &str) -> Result<(), AvitoError> {
        self.call(
            Method::POST,
            "/messenger/v3/webhook",
            &[],
            Some(&json!({ "url": url })),
            Endpoint::Other,
        )
        .await?;
        Ok(())
    }

    /// The subscribed webhook URLs.
    pub async fn webhook_subscriptions(&self) -> Result<Vec<String>, AvitoError> {
        let answer = self
            .call(
                Method::POST,
                "/messenger/v1/subscriptions",
                &[],
                None,
                Endpoint::Other,
            )
            .await?;
        let subs: wire::SubscriptionsWire = decode(&answer.body, "the subscriptions")?;
        Ok(subs.subscriptions.into_iter().map(|s| s.url).collect())
    }

    /// Chats with unread messages (the polling fallback for missed webhooks).
    pub async fn unread_chats(&self) -> Result<Vec<Chat>, AvitoError> {
        let user_id = self.user_id().await?;
        let mut chats = Vec::new();
        for offset in (0..=1000).step_by(100) {
            let query = vec![
                ("unread_only".to_string(), "true".to_string()),
                ("limit".to_string(), "100".to_string()),
                ("offset".to_string(), offset.to_string()),
            ];
            let answer = self
                .call(
                    Method::GET,
                    &format!("/messenger/v2/accounts/{user_id}/chats"),
                    &query,
                    None,
                    Endpoint::Other,
                )
                .await?;
            let page: wire::ChatsWire = decode(&answer.body, "chats")?;
            let n = page.chats.len();
            chats.extend(page.chats.into_iter().map(super::convert::chat_from_wire));
            if n < 100 {
                break;
            }
        }
        Ok(chats)
    }

    /// One chat (its item context and users).
    pub async fn chat(&self, chat_id: &str) -> Result<Chat, AvitoError> {
        let user_id = self.user_id().await?;
        let answer = self
            .call(
                Method::GET,
                &format!("/messenger/v2/accounts/{user_id}/chats/{chat_id}"),
                &[],
                None,
                Endpoint::Other,
            )
            .await?;
        let chat: wire::ChatWire = decode(&answer.body, "a chat")?;
        Ok(super::convert::chat_from_wire(chat))
    }

    /// The latest messages of a chat (does not mark it read).
    pub async fn messages(&self, chat_id: &str) -> Result<Vec<ChatMessage>, AvitoError> {
        let user_id = self.user_id().await?;
        let answer = self
            .call(
                Method::GET,
                &format!("/messenger/v3/accounts/{user_id}/chats/{chat_id}/messages/"),
                &[("limit".to_string(), "100".to_string())],
                None,
                Endpoint::Other,
            )
            .await?;
        let messages: Vec<wire::MessageWire> = decode(&answer.body, "messages")?;
        Ok(messages
            .into_iter()
            .map(|m| ChatMessage {
                id: m.id,
                chat_id: chat_id.to_string(),
                author_id: m.author_id,
                created: m.created,
                kind: m.kind,
                text: m
                    .content
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
            .collect())
    }
}

/// An order list page's body → its orders and whether more pages follow;
/// anything malformed is a `Decode` error.
pub fn parse_orders_page(
    account: &str,
    body: &[u8],
) -> Result<(Vec<AvitoOrder>, bool), AvitoError> {
    let page: wire::OrdersPage = decode(body, "an order list")?;
    let more = page.has_more && !page.orders.is_empty();
    let orders = page
        .orders
        .into_iter()
        .map(|order| super::convert::order_from_wire(account, order))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((orders, more))
}

fn decode<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, AvitoError> {
    serde_json::from_slice(body).map_err(|e| AvitoError::Decode {
        what,
        error: e.to_string(),
    })
}
