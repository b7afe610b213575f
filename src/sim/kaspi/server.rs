//! The HTTP front. For every request, in order: an injected fault, the
//! `Accept` check (404 HTML), the `X-Auth-Token` check (401), routing, the
//! request log, then the configured latency before the answer goes out.
//! Connections run through a stream that a handler can cut, so a fault can
//! drop a request without any response.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::state::State;
use super::{orders, KaspiFault, Shared, SimRequest};

/// Where the API lives on the simulator, as on kaspi.kz.
pub(crate) const API_PREFIX: &str = "/shop/api/v2";
/// Where signed waybill URLs point.
pub(super) const WAYBILL_PREFIX: &str = "/shop/api/waybill/";

const JSON_API: &str = "application/vnd.api+json";

pub(super) enum Body {
    Json(Value),
    Html(String),
    Pdf(&'static [u8]),
}

/// An answer: status and body.
pub(super) struct Reply {
    pub status: u16,
    pub body: Body,
}

impl Reply {
    pub fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Body::Json(body),
        }
    }

    /// A JSON:API `{"errors":[{"title":…}]}` body.
    pub fn error(status: u16, title: &str) -> Reply {
        Reply {
            status,
            body: Body::Json(json!({ "errors": [{ "title": title }] })),
        }
    }

    pub fn not_found() -> Reply {
        Reply::error(404, "Not found")
    }

    fn html(status: u16, title: &str) -> Reply {
        Reply {
            status,
            body: Body::Html(format!(
                "<!DOCTYPE html>\n<html><head><title>{title}</title></head>\
                 <body><h1>{title}</h1><hr><p>kaspi.kz</p></body></html>\n"
            )),
        }
    }
}

/// What a route handler sees of the request.
pub(super) struct Req<'a> {
    pub query: Vec<(String, String)>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// The `X-Merchant-Uid` matches the configuration (or none is configured).
    pub merchant_ok: bool,
}

impl Req<'_> {
    /// The first value of a query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new().fallback(handle).with_state(shared);
    crate::sim::support::serve(listener, app, "kaspi").await
}

/// What the front decided.
enum Outcome {
    Answer(Reply),
    /// Hold ~35 s, then 504.
    Hold,
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
    let (outcome, latency) = {
        let mut st = shared.lock();
        let outcome = decide(&mut st, &method, &path, &raw_query, &headers, &body);
        let status = match &outcome {
            Outcome::Answer(reply) => reply.status,
            Outcome::Hold => 504,
            Outcome::Drop => 0,
        };
        st.requests.push(SimRequest {
            method: method.to_string(),
            path,
            query: raw_query,
            body: String::from_utf8_lossy(&body).into_owned(),
            status,
            at: Instant::now(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        });
        (outcome, st.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match outcome {
        Outcome::Answer(reply) => respond(reply),
        Outcome::Hold => {
            tokio::time::sleep(Duration::from_secs(35)).await;
            respond(Reply::html(504, "504 Gateway Time-out"))
        }
        Outcome::Drop => {
            cut.cut();
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn decide(
    st: &mut State,
    method: &Method,
    path: &str,
    raw_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Outcome {
    let fault = st
        .faults
        .pop_front()
        .or_else(|| st.steady_fault.as_mut().and_then(|f| f.next()));
    if let Some(fault) = fault {
        return match fault {
            KaspiFault::ServerError => Outcome::Answer(Reply::error(500, "Internal Server Error")),
            KaspiFault::Timeout => Outcome::Hold,
            KaspiFault::ConnectionReset => Outcome::Drop,
            KaspiFault::TooManyRequests => Outcome::Answer(Reply::error(429, "Too Many Requests")),
            KaspiFault::HtmlForbidden => Outcome::Answer(Reply::html(403, "403 Forbidden")),
        };
    }
    let header = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let token_ok = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim() == st.token);

    // The signed waybill link is a PDF download, outside the JSON:API.
    if let Some(file) = path.strip_prefix(WAYBILL_PREFIX) {
        if !token_ok {
            return Outcome::Answer(Reply::error(401, "Unauthorized"));
        }
        return Outcome::Answer(orders::waybill(st, method, file));
    }
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return Outcome::Answer(Reply::html(404, "404 Not Found"));
    };
    if !header(header::ACCEPT).contains(JSON_API) {
        return Outcome::Answer(Reply::html(404, "404 Not Found"));
    }
    if !token_ok {
        return Outcome::Answer(Reply::error(
            401,
            "Unauthorized: the X-Auth-Token is missing or invalid",
        ));
    }
    let merchant_ok = match &st.merchant_uid {
        None => true,
        Some(uid) => headers
            .get("x-merchant-uid")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == uid),
    };
    let Ok(query) = serde_urlencoded::from_str::<Vec<(String, String)>>(raw_query) else {
        return Outcome::Answer(Reply::error(400, "Malformed query string"));
    };
    let req = Req {
        query,
        headers,
        body,
        merchant_ok,
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let get = method == Method::GET;
    let reply = match segs.as_slice() {
        ["orders"] if get => orders::list(st, &req),
        ["orders"] if method == Method::POST => {
            if !header(header::CONTENT_TYPE).contains(JSON_API) {
                Reply::error(415, "Content-Type must be application/vnd.api+json")
            } else {
                orders::transition(st, &req)
            }
        }
        ["orders", id] if get => orders::get_one(st, &req, id),
        ["orders", id, "entries"] if get => orders::entries(st, &req, id),
        ["orderentries", id] if get => orders::entry(st, &req, id),
        ["orderentries", id, "product"] if get => orders::product(st, &req, id),
        _ => Reply::not_found(),
    };
    Outcome::Answer(reply)
}

fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (content_type, bytes): (&'static str, Vec<u8>) = match reply.body {
        Body::Json(v) => (JSON_API, v.to_string().into_bytes()),
        Body::Html(s) => ("text/html; charset=utf-8", s.into_bytes()),
        Body::Pdf(b) => ("application/pdf", b.to_vec()),
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    (status, headers, bytes).into_response()
}
