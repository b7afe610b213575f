//! Request plumbing of the amoCRM client: the account's limiter before every
//! call (in the daemon, request slots shared by every replica through the
//! database), the circuit breaker, bearer auth with one refresh and one retry on 401
//! (single flight per account, under the token row's lock, new pair committed
//! before use), and the mapping of answers to [`AmoError`]s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use governor::DefaultDirectRateLimiter;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sqlx::PgPool;

use super::error::{AmoError, ItemRejection};
use super::wire;
use crate::store;

tokio::task_local! {
    /// Set inside [`AmoClient::with_permit`]: a permit of the account's
    /// limiter was taken for the next request made in that scope.
    static PERMIT_TAKEN: std::cell::Cell<bool>;
}

/// How often a closed or open circuit is re-read from the database (another
/// replica may have opened it, or an operator reset it).
const CIRCUIT_RECHECK: Duration = Duration::from_secs(2);
/// The longest account-wide pause after 429s in a row.
const THROTTLE_MAX: Duration = Duration::from_secs(60);
/// An access token this close to expiry is refreshed before use.
const EXPIRY_MARGIN_S: i64 = 60;

/// How the client authenticates.
#[derive(Clone)]
pub enum AmoAuth {
    LongLived(SecretString),
    OAuth {
        client_id: String,
        client_secret: SecretString,
        redirect_uri: String,
    },
}

impl std::fmt::Debug for AmoAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmoAuth::LongLived(_) => f.write_str("LongLived(**REDACTED**)"),
            AmoAuth::OAuth { client_id, .. } => write!(f, "OAuth {{ client_id: {client_id}, .. }}"),
        }
    }
}

/// One configured amoCRM account, as the client needs it.
#[derive(Debug, Clone)]
pub struct AmoAccount {
    /// The account's name in config.
    pub name: String,
    pub base_url: reqwest::Url,
    pub auth: AmoAuth,
    pub timeout: Duration,
    pub circuit_cooldown: Duration,
}

impl AmoAccount {
    /// The rate-limit, lease and circuit key of this account.
    pub fn target(&self) -> String {
        format!("amocrm:{}", self.name)
    }
}

/// A raw answer.
pub(super) struct Answer {
    pub status: StatusCode,
    pub body: bytes::Bytes,
}

impl Answer {
    /// The body as JSON; an empty body (204) is `None`.
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
    ) -> Result<Option<T>, AmoError> {
        if self.status == StatusCode::NO_CONTENT || self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&self.body)
            .map(Some)
            .map_err(|e| AmoError::Decode {
                what,
                error: e.to_string(),
            })
    }
}

struct CircuitState {
    open: Option<(Instant, String)>,
    checked: Option<Instant>,
}

/// The amoCRM client of one account. Cheap to clone; share one per account.
#[derive(Clone)]
pub struct AmoClient {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub account: AmoAccount,
    pub target: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// Spacing of the account's request slots shared by every replica on the
    /// database (`rate_slots`); `None`: the process's own limiter alone.
    shared_spacing: Option<Duration>,
    refresh_flight: tokio::sync::Mutex<()>,
    cached_access: std::sync::Mutex<Option<(String, i64)>>,
    circuit: std::sync::Mutex<CircuitState>,
    /// The account-wide pause after 429s: (until, 429s in a row).
    throttle: std::sync::Mutex<(Option<Instant>, u32)>,
    pub pipelines: tokio::sync::RwLock<Option<Vec<super::Pipeline>>>,
}

impl AmoClient {
    /// `limiter`: the account's shared limiter (from the outbox's registry), or
    /// `None` for an unlimited client (tests of the limiter itself only).
    pub fn new(
        account: AmoAccount,
        pool: PgPool,
        limiter: Option<Arc<DefaultDirectRateLimiter>>,
    ) -> Result<AmoClient, AmoError> {
        let http = reqwest::Client::builder()
            .timeout(account.timeout)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("orderbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AmoError::Network(e.to_string()))?;
        Ok(AmoClient {
            inner: Arc::new(Inner {
                target: account.target(),
                account,
                http,
                pool,
                limiter,
                shared_spacing: None,
                refresh_flight: tokio::sync::Mutex::new(()),
                cached_access: std::sync::Mutex::new(None),
                circuit: std::sync::Mutex::new(CircuitState {
                    open: None,
                    checked: None,
                }),
                throttle: std::sync::Mutex::new((None, 0)),
                pipelines: tokio::sync::RwLock::new(None),
            }),
        })
    }

    /// Seeds the token table with the first refresh token (OAuth), once.
    pub async fn seed_refresh_token(&self, refresh_token: &SecretString) -> Result<bool, AmoError> {
        Ok(store::tokens::seed(
            &self.inner.pool,
            &self.inner.account.name,
            refresh_token.expose_secret(),
        )
        .await?)
    }

    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The configured name of the CRM account.
    pub fn account_name(&self) -> &str {
        &self.inner.account.name
    }

    /// Takes the account's request slots from the database (`rate_slots`),
    /// one every `spacing`, shared with every other replica on it; the
    /// process's own limiter steps in only while the database cannot answer.
    /// Call on a new client, before it is cloned.
    pub fn with_shared_slots(mut self, spacing: Duration) -> AmoClient {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.shared_spacing = Some(spacing),
            None => tracing::warn!(target_key = %self.inner.target,
                "The amoCRM client was shared before its slots were; it keeps its own limiter."),
        }
        self
    }

    /// Waits until this process may send the account's next request.
    async fn wait_for_slot(&self) {
        if let Some(spacing) = self.inner.shared_spacing {
            match store::rate_slots::reserve(&self.inner.pool, &self.inner.target, spacing).await {
                Ok(wait) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    return;
                }
                Err(error) => tracing::warn!(target_key = %self.inner.target, %error,
                    "Could not reserve a shared request slot; pacing by this process's limiter alone."),
            }
        }
        if let Some(limiter) = &self.inner.limiter {
            limiter.until_ready().await;
        }
        // The account-wide pause after 429s (other replicas' pauses come
        // through the shared slots).
        let paused_until = self.throttle_state().0;
        if let Some(until) = paused_until.filter(|u| *u > Instant::now()) {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    fn throttle_state(&self) -> std::sync::MutexGuard<'_, (Option<Instant>, u32)> {
        self.inner
            .throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A 429: the whole account pauses (every replica, through the shared
    /// slots), `retry_after` (at least 1 s) doubled for each 429 in a row, at
    /// most [`THROTTLE_MAX`]. amoCRM blocks an account that keeps getting
    /// 429s; before this, every job kept its own short retry, and a 429 storm
    /// drew 4 requests a second (found by `prove api-faults`).
    async fn pause_account(&self, retry_after: Option<Duration>) {
        let pause = {
            let mut state = self.throttle_state();
            state.1 = state.1.saturating_add(1);
            let base = retry_after
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            let pause = base
                .saturating_mul(1u32 << (state.1 - 1).min(6))
                .min(THROTTLE_MAX);
            state.0 = Some(Instant::now() + pause);
            pause
        };
        tracing::warn!(target_key = %self.inner.target, pause_ms = pause.as_millis() as u64,
            "amoCRM rate-limited the account; every request to it pauses.");
        if self.inner.shared_spacing.is_some() {
            if let Err(error) =
                store::rate_slots::pause(&self.inner.pool, &self.inner.target, pause).await
            {
                tracing::warn!(%error, "Could not share the pause with other replicas.");
            }
        }
    }

    /// Waits for a permit of the account's limiter, then runs `work`, whose
    /// first request spends that permit instead of waiting for another: a
    /// batch writer gathers its batch after the wait, so whatever arrived
    /// meanwhile goes in the same request.
    pub async fn with_permit<W, Fut>(&self, work: W) -> Fut::Output
    where
        W: FnOnce() -> Fut,
        Fut: std::future::Future,
    {
        self.wait_for_slot().await;
        PERMIT_TAKEN.scope(std::cell::Cell::new(true), work()).await
    }

    /// Sends an API call: circuit, token, limiter, one refresh-and-retry on 401,
    /// then maps the answer. 2xx (204 included) is `Ok`.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<Answer, AmoError> {
        self.call_since(method, path, query, body, None).await
    }

    /// [`Self::call`] with `If-Modified-Since` (Unix seconds), which amoCRM's
    /// lists honour: only entities changed since then are listed.
    pub(super) async fn call_since(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        modified_since: Option<i64>,
    ) -> Result<Answer, AmoError> {
        self.check_circuit().await?;
        let token = self.access_token().await?;
        let mut answer = self
            .send(method.clone(), path, query, body, &token, modified_since)
            .await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            match &self.inner.account.auth {
                AmoAuth::LongLived(_) => {
                    return Err(AmoError::Unauthorized {
                        after_refresh: false,
                        detail: problem_detail(&answer.body),
                    })
                }
                AmoAuth::OAuth { .. } => {
                    let fresh = self.refresh(Some(&token)).await?;
                    answer = self
                        .send(method, path, query, body, &fresh, modified_since)
                        .await?;
                    if answer.status == StatusCode::UNAUTHORIZED {
                        return Err(AmoError::Unauthorized {
                            after_refresh: true,
                            detail: problem_detail(&answer.body),
                        });
                    }
                }
            }
        }
        self.map_answer(answer).await
    }

    /// One HTTP exchange through the limiter.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        token: &str,
        modified_since: Option<i64>,
    ) -> Result<Answer, AmoError> {
        let url = self
            .inner
            .account
            .base_url
            .join(path)
            .map_err(|e| AmoError::Network(format!("bad URL {path}: {e}")))?;
        let mut request = self
            .inner
            .http
            .request(method.clone(), url)
            .bearer_auth(token)
            .header(
                reqwest::header::ACCEPT,
                "application/hal+json, application/json",
            );
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(since) = modified_since.and_then(|s| chrono::DateTime::from_timestamp(s, 0)) {
            // An HTTP-date (RFC 9110 IMF-fixdate).
            let http_date = since.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
            request = request.header(reqwest::header::IF_MODIFIED_SINCE, http_date);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        self.exchange(request, path).await
    }

    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<Answer, AmoError> {
        let taken = PERMIT_TAKEN.try_with(|t| t.replace(false)).unwrap_or(false);
        if !taken {
            self.wait_for_slot().await;
        }
        // A 403 met by another request while this one waited for its slot
        // stops this one too (found by `prove api-faults`: requests queued
        // behind the limiter went on hitting the blocked account).
        if let Some(open) = self.cached_open_circuit() {
            return Err(open);
        }
        let started = Instant::now();
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        metrics::counter!("orderbridge_amocrm_requests_total",
            "target" => self.inner.target.clone(), "status" => status.as_u16().to_string())
        .increment(1);
        tracing::debug!(target_key = %self.inner.target, path, status = status.as_u16(),
            request_id, elapsed_ms = started.elapsed().as_millis() as u64, "amoCRM call.");
        Ok(Answer { status, body })
    }

    fn transport_error(&self, error: reqwest::Error) -> AmoError {
        if error.is_timeout() {
            AmoError::Timeout(self.inner.account.timeout)
        } else {
            AmoError::Network(crate::connectors::transport_error_text(error))
        }
    }

    /// Maps a non-401 answer.
    async fn map_answer(&self, answer: Answer) -> Result<Answer, AmoError> {
        let status = answer.status.as_u16();
        match status {
            200..=299 => {
                self.circuit_succeeded().await;
                self.throttle_state().1 = 0;
                Ok(answer)
            }
            429 => {
                let problem: wire::Problem =
                    serde_json::from_slice(&answer.body).unwrap_or_default();
                let retry_after = problem
                    .retry_after
                    .as_ref()
                    .and_then(wire::as_i64)
                    .filter(|s| *s >= 0)
                    .map(|s| Duration::from_secs(s as u64));
                metrics::counter!("orderbridge_amocrm_rate_limited_total", "target" => self.inner.target.clone())
                    .increment(1);
                tracing::warn!(target_key = %self.inner.target, retry_after_s = retry_after.map(|d| d.as_secs()),
                    "amoCRM answered 429 Too Many Requests.");
                self.pause_account(retry_after).await;
                Err(AmoError::RateLimited { retry_after })
            }
            403 => {
                self.open_circuit("amoCRM answered 403 (IP or account blocked)")
                    .await;
                Err(AmoError::Blocked {
                    target: self.inner.target.clone(),
                })
            }
            402 => {
                tracing::error!(target_key = %self.inner.target, alert = true,
                    "amoCRM answered 402 Payment Required: the account's paid period has ended.");
                Err(AmoError::PaymentRequired)
            }
            400 => {
                let problem: wire::Problem =
                    serde_json::from_slice(&answer.body).unwrap_or_default();
                match problem.validation_errors {
                    Some(items) => Err(AmoError::Validation(
                        items
                            .into_iter()
                            .map(|item| ItemRejection {
                                request_id: item
                                    .request_id
                                    .as_ref()
                                    .and_then(wire::request_id_text)
                                    .unwrap_or_default(),
                                errors: item
                                    .errors
                                    .into_iter()
                                    .map(|e| {
                                        format!(
                                            "{}: {}{}",
                                            e.path.unwrap_or_default(),
                                            e.detail.unwrap_or_default(),
                                            e.code.map(|c| format!(" ({c})")).unwrap_or_default()
                                        )
                                    })
                                    .collect(),
                            })
                            .collect(),
                    )),
                    None => Err(AmoError::BadRequest(problem_detail(&answer.body))),
                }
            }
            404 => Err(AmoError::NotFound(problem_detail(&answer.body))),
            422 => Err(AmoError::Unprocessable(problem_detail(&answer.body))),
            504 => Err(AmoError::GatewayTimeout),
            500..=599 => Err(AmoError::Server {
                status,
                detail: problem_detail(&answer.body),
            }),
            _ => Err(AmoError::Unexpected {
                status,
                detail: problem_detail(&answer.body),
            }),
        }
    }

    // ---- auth ---------------------------------------------------------------

    /// The bearer token to use now.
    async fn access_token(&self) -> Result<String, AmoError> {
        match &self.inner.account.auth {
            AmoAuth::LongLived(token) => Ok(token.expose_secret().to_string()),
            AmoAuth::OAuth { .. } => {
                let now = Utc::now().timestamp();
                if let Some((token, expires)) = self.cached_access() {
                    if expires - EXPIRY_MARGIN_S > now {
                        return Ok(token);
                    }
                }
                let row = store::tokens::current(&self.inner.pool, &self.inner.account.name)
                    .await?
                    .ok_or_else(|| AmoError::NoToken(self.inner.account.name.clone()))?;
                if let (Some(token), Some(expires)) = (row.access_token, row.access_expires_at) {
                    if expires.timestamp() - EXPIRY_MARGIN_S > now {
                        self.cache_access(&token, expires.timestamp());
                        return Ok(token);
                    }
                }
                self.refresh(None).await
            }
        }
    }

    fn cached_access(&self) -> Option<(String, i64)> {
        self.inner
            .cached_access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn cache_access(&self, token: &str, expires: i64) {
        *self
            .inner
            .cached_access
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((token.to_string(), expires));
    }

    /// Refreshes the pair: one flight per account in this process (a mutex) and
    /// across replicas (the token row's lock). `failed` is the access token that
    /// was refused; if the stored one differs, someone else refreshed already.
    async fn refresh(&self, failed: Option<&str>) -> Result<String, AmoError> {
        let AmoAuth::OAuth {
            client_id,
            client_secret,
            redirect_uri,
        } = &self.inner.account.auth
        else {
            return Err(AmoError::Unauthorized {
                after_refresh: false,
                detail: "a long-lived token cannot be refreshed".into(),
            });
        };
        let _flight = self.inner.refresh_flight.lock().await;
        let account = &self.inner.account.name;
        let (mut tx, row) = store::tokens::lock(&self.inner.pool, account).await?;
        let row = row.ok_or_else(|| AmoError::NoToken(account.clone()))?;
        let now = Utc::now().timestamp();
        if let (Some(token), Some(expires)) = (&row.access_token, row.access_expires_at) {
            let fresh = expires.timestamp() - EXPIRY_MARGIN_S > now;
            if fresh && Some(token.as_str()) != failed {
                self.cache_access(token, expires.timestamp());
                return Ok(token.clone());
            }
        }
        let mut attempt = self
            .token_call(client_id, client_secret, redirect_uri, &row.refresh_token)
            .await;
        // The stored token was spent elsewhere (its successor got lost): its
        // predecessor stays valid until the successor is used.
        if let (Err(AmoError::Unauthorized { .. }), Some(previous)) =
            (&attempt, row.previous_refresh_token.as_deref())
        {
            tracing::warn!(account = %account, "The stored refresh token was refused; trying its predecessor.");
            attempt = self
                .token_call(client_id, client_secret, redirect_uri, previous)
                .await;
        }
        let pair = match attempt {
            Ok(pair) => pair,
            Err(error) => {
                if let AmoError::Unauthorized { .. } = error {
                    tracing::error!(account = %account, alert = true, error = %error,
                        "amoCRM refused the refresh token; the integration must be authorised again.");
                }
                return Err(error);
            }
        };
        let expires = now + pair.expires_in.max(0);
        let expires_at = chrono::DateTime::from_timestamp(expires, 0).unwrap_or_else(Utc::now);
        store::tokens::store_pair(
            &mut tx,
            account,
            &pair.access_token,
            expires_at,
            &pair.refresh_token,
            &row.refresh_token,
        )
        .await?;
        tx.commit().await.map_err(store::StoreError::from)?;
        self.cache_access(&pair.access_token, expires);
        tracing::info!(account = %account, expires_in_s = pair.expires_in, "amoCRM tokens refreshed and stored.");
        Ok(pair.access_token)
    }

    async fn token_call(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        redirect_uri: &str,
        refresh_token: &str,
    ) -> Result<wire::TokenWire, AmoError> {
        self.check_circuit().await?;
        let url = self
            .inner
            .account
            .base_url
            .join("/oauth2/access_token")
            .map_err(|e| AmoError::Network(e.to_string()))?;
        let body = wire::RefreshRequest {
            client_id,
            client_secret: client_secret.expose_secret(),
            grant_type: "refresh_token",
            refresh_token,
            redirect_uri,
        };
        let request = self.inner.http.post(url).json(&body);
        let answer = self.exchange(request, "/oauth2/access_token").await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            let problem: wire::Problem = serde_json::from_slice(&answer.body).unwrap_or_default();
            return Err(AmoError::Unauthorized {
                after_refresh: true,
                detail: problem
                    .hint
                    .or(problem.detail)
                    .unwrap_or_else(|| "refresh token refused".into()),
            });
        }
        let answer = self.map_answer(answer).await?;
        answer
            .json::<wire::TokenWire>("the token refresh")?
            .ok_or(AmoError::Decode {
                what: "the token refresh",
                error: "empty body".into(),
            })
    }

    // ---- circuit ------------------------------------------------------------

    /// Refuses the call while the account's circuit is open.
    async fn check_circuit(&self) -> Result<(), AmoError> {
        let due = {
            let state = self.circuit_state();
            state
                .checked
                .is_none_or(|at| at.elapsed() >= CIRCUIT_RECHECK)
        };
        if due {
            let stored = store::circuits::get(&self.inner.pool, &self.inner.target).await?;
            let (was_open, open) = {
                let mut state = self.circuit_state();
                state.checked = Some(Instant::now());
                let was_open = state.open.is_some();
                state.open = stored.map(|c| {
                    let remaining = (c.open_until - Utc::now())
                        .to_std()
                        .unwrap_or(Duration::ZERO);
                    (Instant::now() + remaining, c.reason)
                });
                (was_open, state.open.is_some())
            };
            if was_open && !open {
                // Reset elsewhere: what this process put off on its cached
                // state since then is due now, not at the cool-down's end.
                match store::circuits::wake_deferred(&self.inner.pool, &self.inner.target).await {
                    Ok(woken) => tracing::info!(target_key = %self.inner.target, woken,
                        "The amoCRM circuit was closed elsewhere; traffic resumes and the jobs it put off are due now."),
                    Err(error) => tracing::warn!(%error, target_key = %self.inner.target,
                        "Could not make the jobs the circuit put off due; they wait out their retry time."),
                }
            }
            metrics::gauge!("orderbridge_circuit_open", "target" => self.inner.target.clone())
                .set(if open { 1.0 } else { 0.0 });
        }
        match self.cached_open_circuit() {
            Some(open) => Err(open),
            // Closed, or the cool-down has passed: let this call try (half-open).
            None => Ok(()),
        }
    }

    /// The open circuit as this process knows it (no database read).
    fn cached_open_circuit(&self) -> Option<AmoError> {
        let state = self.circuit_state();
        match &state.open {
            Some((until, reason)) if *until > Instant::now() => Some(AmoError::CircuitOpen {
                target: self.inner.target.clone(),
                reason: reason.clone(),
                remaining: until.saturating_duration_since(Instant::now()),
            }),
            _ => None,
        }
    }

    fn circuit_state(&self) -> std::sync::MutexGuard<'_, CircuitState> {
        self.inner.circuit.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn open_circuit(&self, reason: &str) {
        let cooldown = self.inner.account.circuit_cooldown;
        let until =
            Utc::now() + chrono::Duration::from_std(cooldown).unwrap_or(chrono::Duration::MAX);
        {
            let mut state = self.circuit_state();
            state.open = Some((Instant::now() + cooldown, reason.to_string()));
            state.checked = Some(Instant::now());
        }
        metrics::gauge!("orderbridge_circuit_open", "target" => self.inner.target.clone()).set(1.0);
        tracing::error!(target_key = %self.inner.target, alert = true, cooldown_s = cooldown.as_secs(),
            reason, "Circuit opened: all traffic to this amoCRM account stops until the cool-down passes or `orderbridge circuit reset` is run. Unblocking needs amoCRM support (give them the IP, subdomain and account id).");
        if let Err(error) =
            store::circuits::open(&self.inner.pool, &self.inner.target, until, reason).await
        {
            tracing::error!(%error, "Could not store the open circuit; it holds in this process only.");
        }
    }

    /// A successful call after the cool-down closes the circuit.
    async fn circuit_succeeded(&self) {
        let was_open = self.circuit_state().open.take().is_some();
        if was_open {
            metrics::gauge!("orderbridge_circuit_open", "target" => self.inner.target.clone())
                .set(0.0);
            tracing::info!(target_key = %self.inner.target, "amoCRM answers again; circuit closed.");
            if let Err(error) = store::circuits::close(&self.inner.pool, &self.inner.target).await {
                tracing::warn!(%error, "Could not delete the closed circuit's row.");
            }
        }
    }
}

/// The `detail` (or `title`, or the start of the body) of an error answer.
fn problem_detail(body: &[u8]) -> String {
    match serde_json::from_slice::<wire::Problem>(body) {
        Ok(p) if p.detail.is_some() || p.title.is_some() => {
            p.detail.or(p.title).unwrap_or_default()
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.chars().take(200).collect();
            if text.trim_start().starts_with('<') {
                "an HTML page".to_string()
            } else {
                text
            }
        }
    }
}
