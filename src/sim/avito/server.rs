//! The HTTP front. For every request, in order: routing (404), `/token`
//! (no faults, no limits), an injected fault, the bearer token (401 / 403
//! expired), the global per-second cap, the endpoint's per-minute limit, the
//! handler, then the request log. Connections run through a stream that a
//! handler can cut, so a fault can drop a request without any response.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State as AxState};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::state::{State, TokenCheck};
use super::{messenger, orders, AvitoFault, Shared, SimRequest};

/// Which error envelope a path answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Envelope {
    /// `{"code":…,"message":…}` (order-management).
    Flat,
    /// `{"error":{"code":…,"message":…}}` (messenger, user, …).
    Wrapped,
}

impl Envelope {
    fn of(path: &str) -> Envelope {
        if path.starts_with("/order-management/") {
            Envelope::Flat
        } else {
            Envelope::Wrapped
        }
    }
}

/// An answer: status, JSON body and extra headers.
pub(super) struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body,
            headers: Vec::new(),
        }
    }

    pub fn error(envelope: Envelope, status: u16, message: &str) -> Reply {
        let body = match envelope {
            Envelope::Flat => json!({ "code": status, "message": message }),
            Envelope::Wrapped => json!({ "error": { "code": status, "message": message } }),
        };
        Reply {
            status,
            body,
            headers: Vec::new(),
        }
    }

    /// A limit's 429. The spec attaches `X-RateLimit-*` to no order-management
    /// response, so those go without; other paths carry them.
    fn too_many(envelope: Envelope, limit: u32) -> Reply {
        let mut reply = Reply::error(envelope, 429, "Too Many Requests");
        if envelope == Envelope::Wrapped {
            reply.headers = vec![
                ("x-ratelimit-limit", limit.to_string()),
                ("x-ratelimit-remaining", "0".to_string()),
            ];
        }
        reply
    }
}

/// What a route handler sees of the request.
pub(super) struct Req<'a> {
    pub query: Vec<(String, String)>,
    pub body: &'a [u8],
}

impl Req<'_> {
    /// The first value of a query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of an array parameter: `key=a&key=b`, `key=a,b` or `key[]=a`.
    pub fn list(&self, key: &str) -> Vec<String> {
        let bracketed = format!("{key}[]");
        self.query
            .iter()
            .filter(|(k, _)| *k == key || *k == bracketed)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Token,
    Orders,
    ApplyTransition,
    SetTracking,
    AccountSelf,
    WebhookSubscribe,
    Subscriptions,
    Unsubscribe,
    Chats(String),
    Chat(String, String),
    Messages(String, String),
    SendMessage(String, String),
    Read(String, String),
}

fn route(method: &Method, path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    let s = |v: &str| v.to_string();
    Some(match segs.as_slice() {
        ["token"] if post => Route::Token,
        ["order-management", "1", "orders"] if get => Route::Orders,
        ["order-management", "1", "order", "applyTransition"] if post => Route::ApplyTransition,
        ["order-management", "1", "order", "setTrackingNumber"] if post => Route::SetTracking,
        ["core", "v1", "accounts", "self"] if get => Route::AccountSelf,
        ["messenger", "v3", "webhook"] if post => Route::WebhookSubscribe,
        ["messenger", "v1", "subscriptions"] if post => Route::Subscriptions,
        ["messenger", "v1", "webhook", "unsubscribe"] if post => Route::Unsubscribe,
        ["messenger", "v2", "accounts", uid, "chats"] if get => Route::Chats(s(uid)),
        ["messenger", "v2", "accounts", uid, "chats", chat] if get => Route::Chat(s(uid), s(chat)),
        ["messenger", "v3", "accounts", uid, "chats", chat, "messages"] if get => {
            Route::Messages(s(uid), s(chat))
        }
        ["messenger", "v1", "accounts", uid, "chats", chat, "messages"] if post => {
            Route::SendMessage(s(uid), s(chat))
        }
        ["messenger", "v1", "accounts", uid, "chats", chat, "read"] if post => {
            Route::Read(s(uid), s(chat))
        }
        _ => return None,
    })
}

impl Route {
    /// The per-minute limit key and value, for the endpoints that have one.
    fn limit(&self, st: &State) -> Option<(&'static str, u32)> {
        match self {
            Route::Orders => Some(("orders", st.config.orders_per_minute)),
            Route::ApplyTransition => Some(("applyTransition", st.config.transitions_per_minute)),
            Route::SetTracking => Some(("setTrackingNumber", st.config.tracking_per_minute)),
            _ => None,
        }
    }

    /// The account id in a messenger path.
    fn user_id(&self) -> Option<&str> {
        match self {
            Route::Chats(uid)
            | Route::Chat(uid, _)
            | Route::Messages(uid, _)
            | Route::SendMessage(uid, _)
            | Route::Read(uid, _) => Some(uid),
            _ => None,
        }
    }
}

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new().fallback(handle).with_state(shared);
    crate::sim::support::serve(listener, app, "avito").await
}

/// What the front decided.
enum Outcome {
    /// The reply, and a webhook body to deliver after it (a sent message).
    Answer(Reply, Option<Value>),
    /// Hold ~35 s, then 500.
    Hold(Envelope),
    /// Cut the connection.
    Drop,
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    ConnectInfo(cut): ConnectInfo<crate::sim::support::Cut>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let raw_query = uri.query().unwrap_or_default().to_string();
    let outcome = front(&shared, &method, &path, &raw_query, &headers, &body).await;
    let status = match &outcome {
        Outcome::Answer(reply, _) => reply.status,
        Outcome::Hold(_) => 500,
        Outcome::Drop => 0,
    };
    shared.lock().requests.push(SimRequest {
        method: method.to_string(),
        path,
        query: raw_query,
        body: String::from_utf8_lossy(&body).into_owned(),
        status,
        at: Instant::now(),
    });
    match outcome {
        Outcome::Answer(reply, webhook) => {
            if let Some(webhook) = webhook {
                let shared = shared.clone();
                tokio::spawn(async move { messenger::deliver(&shared, webhook).await });
            }
            respond(reply)
        }
        Outcome::Hold(envelope) => {
            tokio::time::sleep(Duration::from_secs(35)).await;
            respond(Reply::error(envelope, 500, "Internal Server Error"))
        }
        Outcome::Drop => {
            cut.cut();
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn front(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    raw_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Outcome {
    let envelope = Envelope::of(path);
    let answer = |reply| Outcome::Answer(reply, None);
    let Some(route) = route(method, path) else {
        return answer(Reply::error(envelope, 404, "Not found"));
    };
    if route == Route::Token {
        return answer(token(&mut shared.lock(), body));
    }
    {
        let mut st = shared.lock();
        let fault = st
            .faults
            .pop_front()
            .or_else(|| st.steady_fault.as_mut().and_then(|f| f.next()));
        if let Some(fault) = fault {
            return match fault {
                AvitoFault::ServerError => {
                    answer(Reply::error(envelope, 500, "Internal Server Error"))
                }
                AvitoFault::TooManyRequests => {
                    answer(Reply::error(envelope, 429, "Too Many Requests"))
                }
                AvitoFault::ConnectionReset => Outcome::Drop,
                AvitoFault::Timeout => Outcome::Hold(envelope),
                // Never queued here; see `AvitoSim::inject`.
                AvitoFault::SuccessFalse => answer(Reply::error(envelope, 500, "Internal error")),
            };
        }
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match st.check_token(authorization) {
            TokenCheck::Valid => {}
            TokenCheck::Missing | TokenCheck::Unknown => {
                return answer(Reply::error(envelope, 401, "Unauthorized"));
            }
            TokenCheck::Expired => return answer(Reply::error(envelope, 403, "Forbidden")),
        }
        let now = Instant::now();
        let global = st.config.global_per_second;
        if !st.global.has_room(now, Duration::from_secs(1), global) {
            st.rate_limited += 1;
            return answer(Reply::too_many(envelope, global));
        }
        if let Some((key, limit)) = route.limit(&st) {
            let window = st.per_endpoint.entry(key).or_default();
            if !window.has_room(now, Duration::from_secs(60), limit) {
                st.rate_limited += 1;
                return answer(Reply::too_many(envelope, limit));
            }
            window.record(now);
        }
        st.global.record(now);
        if let Some(uid) = route.user_id() {
            if uid != st.config.user_id.to_string() {
                return answer(Reply::error(envelope, 403, "Forbidden"));
            }
        }
    }
    let Ok(query) = serde_urlencoded::from_str::<Vec<(String, String)>>(raw_query) else {
        return answer(Reply::error(envelope, 400, "Malformed query string"));
    };
    let req = Req { query, body };
    if route == Route::WebhookSubscribe {
        return answer(messenger::subscribe(shared, &req).await);
    }
    let mut st = shared.lock();
    let st = &mut *st;
    match &route {
        Route::Orders => answer(orders::list(st, &req)),
        Route::ApplyTransition => answer(orders::apply_transition(st, &req)),
        Route::SetTracking => answer(orders::set_tracking_number(st, &req)),
        Route::AccountSelf => answer(messenger::account_self(st)),
        Route::Subscriptions => answer(messenger::subscriptions(st)),
        Route::Unsubscribe => answer(messenger::unsubscribe(st, &req)),
        Route::Chats(_) => answer(messenger::chats(st, &req)),
        Route::Chat(_, chat) => answer(messenger::chat(st, chat)),
        Route::Messages(_, chat) => answer(messenger::messages(st, &req, chat)),
        Route::SendMessage(_, chat) => {
            let (reply, webhook) = messenger::send(st, &req, chat);
            Outcome::Answer(reply, webhook)
        }
        Route::Read(_, chat) => answer(messenger::read(st, chat)),
        Route::Token | Route::WebhookSubscribe => answer(Reply::error(envelope, 404, "Not found")),
    }
}

/// `POST /token`: `client_credentials` only.
fn token(st: &mut State, body: &[u8]) -> Reply {
    st.token_calls += 1;
    let oauth_error = |status: u16, error: &str, description: &str| Reply {
        status,
        body: json!({ "error": error, "error_description": description }),
        headers: Vec::new(),
    };
    let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body) else {
        return oauth_error(400, "invalid_request", "malformed form body");
    };
    let field = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    match field("grant_type") {
        Some("client_credentials") => {}
        Some(_) => {
            return oauth_error(
                400,
                "unsupported_grant_type",
                "only client_credentials is supported",
            )
        }
        None => return oauth_error(400, "invalid_request", "grant_type is required"),
    }
    let (Some(id), Some(secret)) = (field("client_id"), field("client_secret")) else {
        return oauth_error(
            400,
            "invalid_request",
            "client_id and client_secret are required",
        );
    };
    if id != st.config.client_id || secret != st.config.client_secret {
        return oauth_error(401, "invalid_client", "Client authentication failed");
    }
    let token = st.issue_token();
    Reply::ok(json!({
        "access_token": token,
        "expires_in": st.config.token_ttl.as_secs(),
        "token_type": "Bearer",
    }))
}

fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in reply.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    (status, headers, reply.body.to_string()).into_response()
}
