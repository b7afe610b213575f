//! The HTTP front: a listener whose connections can be dropped on purpose,
//! then for every request, in order: the 403 block, injected faults, the
//! 1-second sliding-window rate limit, bearer auth, routing, the request log,
//! `X-Request-Id`, and the webhook deliveries the request caused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;
use tokio::net::TcpListener;

use super::state::{LeadChange, State};
use super::wire::{problem_body, Body, Query, Reply};
use super::{activity, catalog, contacts, hooks, leads, links, oauth, Fault, Shared, SimRequest};

/// What a route handler sees of the request.
pub(super) struct Req<'a> {
    pub method: &'a Method,
    pub query: Query,
    /// `If-Modified-Since` as Unix seconds: lists keep entities updated at or after it.
    pub if_modified_since: Option<i64>,
    pub body: &'a [u8],
}

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(shared);
    crate::sim::support::serve(listener, app, "amocrm").await
}

/// What the front decided before any handler ran.
enum Front {
    Answer(Reply),
    Hold,
    Drop,
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<crate::sim::support::Cut>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let path = uri.path().to_string();
    let raw_query = uri.query().unwrap_or_default().to_string();
    let held = {
        let mut st = shared.lock();
        let query = Query::parse(&raw_query);
        st.holds
            .iter()
            .position(|h| h.matches(method.as_str(), &path, &query))
            .map(|i| st.holds.remove(i))
    };
    if let Some(hold) = held {
        // The test learns the request arrived, then decides when it goes on
        // (a dropped hold lets it go too).
        let _ = hold.reached.send(());
        let _ = hold.release.await;
    }
    let (front, jobs, delay) = {
        let mut st = shared.lock();
        let mut changes = Vec::new();
        // The request is carried out, but its answer never arrives.
        let lose_answer = matches!(st.faults.front(), Some(Fault::LoseAnswer));
        if lose_answer {
            st.faults.pop_front();
        }
        let front = decide(
            &mut st,
            &method,
            &path,
            &raw_query,
            &headers,
            &body,
            &mut changes,
        );
        let front = if lose_answer { Front::Drop } else { front };
        let status = match &front {
            Front::Answer(r) => r.status,
            Front::Hold => 504,
            Front::Drop => 0,
        };
        st.requests.push(SimRequest {
            method: method.to_string(),
            path: path.clone(),
            query: raw_query.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
            status,
            at: Instant::now(),
        });
        let jobs = st.hook_jobs(&changes);
        (front, jobs, st.answer_delay)
    };
    hooks::spawn_all(&shared, jobs);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match front {
        Front::Answer(reply) => respond(reply, &request_id),
        Front::Hold => {
            tokio::time::sleep(Duration::from_secs(35)).await;
            respond(Reply::html(504, "Gateway Time-out"), &request_id)
        }
        Front::Drop => {
            conn.cut();
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn too_many() -> Reply {
    Reply {
        status: 429,
        body: Body::ProblemText(
            r#"{"title":"Too Many Requests","type":"https://httpstatus.es/429","status":429,"detail":"You have sent too many requests in a given amount of time. Please try again later.","retry_after":1}"#
                .to_string(),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn decide(
    st: &mut State,
    method: &Method,
    path: &str,
    raw_query: &str,
    headers: &HeaderMap,
    body: &[u8],
    changes: &mut Vec<LeadChange>,
) -> Front {
    if st.blocked {
        return Front::Answer(Reply::html(403, "Forbidden"));
    }
    let scoped = st
        .path_faults
        .iter()
        .position(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|i| st.path_faults.remove(i).1);
    let fault = scoped
        .or_else(|| st.faults.pop_front())
        .or_else(|| st.steady_fault.as_mut().and_then(|f| f.next()));
    if let Some(fault) = fault {
        return match fault {
            Fault::ServerError => {
                let mut body = problem_body(500, "Internal Server Error", "Internal Server Error");
                if let serde_json::Value::Object(map) = &mut body {
                    map.insert(
                        "trace_id".into(),
                        json!(uuid::Uuid::new_v4().simple().to_string()),
                    );
                }
                Front::Answer(Reply {
                    status: 500,
                    body: Body::Problem(body),
                })
            }
            Fault::Timeout => Front::Hold,
            Fault::ConnectionReset => Front::Drop,
            Fault::TooManyRequests => Front::Answer(too_many()),
            Fault::GatewayTimeout => Front::Answer(Reply::html(504, "Gateway Time-out")),
            // Taken off the queue by `handle` before `decide` runs.
            Fault::LoseAnswer => Front::Drop,
            Fault::MalformedBody => Front::Answer(Reply {
                status: 200,
                body: Body::Broken(r#"{"_page":1,"_embedded":{"events":[{"id":"01"#.into()),
            }),
        };
    }
    let now = Instant::now();
    while st
        .window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        st.window.pop_front();
    }
    if st.window.len() >= st.cfg.rate_per_second as usize {
        st.too_many += 1;
        st.rate_limited += 1;
        if st.too_many >= st.cfg.block_after_429s {
            st.blocked = true;
        }
        return Front::Answer(too_many());
    }
    st.window.push_back(now);

    let req = Req {
        method,
        query: Query::parse(raw_query),
        if_modified_since: headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
            .map(|t| t.timestamp()),
        body,
    };
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["oauth2", "access_token"] => {
            if method == Method::POST {
                Front::Answer(oauth::token(st, &req))
            } else {
                Front::Answer(not_allowed())
            }
        }
        ["api", "v4", rest @ ..] => {
            if !authorized(st, headers, now) {
                return Front::Answer(Reply::problem(401, "Unauthorized", "Unauthorized"));
            }
            Front::Answer(api(st, &req, rest, changes))
        }
        _ => Front::Answer(Reply::not_found("Not Found")),
    }
}

fn authorized(st: &State, headers: &HeaderMap, now: Instant) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .is_some_and(|token| st.tokens.access_valid(token.trim(), now))
}

fn not_allowed() -> Reply {
    Reply::problem(405, "Method Not Allowed", "Method Not Allowed")
}

fn only(ok: bool, f: impl FnOnce() -> Reply) -> Reply {
    if ok {
        f()
    } else {
        not_allowed()
    }
}

fn id(seg: &str) -> Option<u64> {
    seg.parse().ok()
}

/// A path id already checked by `id`.
fn n(seg: &str) -> u64 {
    seg.parse().unwrap_or(0)
}

/// Routes `/api/v4/{rest}`.
fn api(st: &mut State, req: &Req, rest: &[&str], changes: &mut Vec<LeadChange>) -> Reply {
    let m = req.method;
    let get = m == Method::GET;
    let post = m == Method::POST;
    let patch = m == Method::PATCH;
    match rest {
        ["account"] => only(get, || catalog::account(st, req)),
        ["users"] => only(get, || catalog::users(st, req)),
        ["users", u] if id(u).is_some() => only(get, || catalog::user(st, n(u))),
        ["leads", "pipelines"] => only(get, || catalog::pipelines(st)),
        ["leads", "pipelines", p] if id(p).is_some() => only(get, || catalog::pipeline(st, n(p))),
        ["leads", "pipelines", p, "statuses"] if id(p).is_some() => {
            only(get, || catalog::statuses(st, n(p)))
        }
        ["leads", "pipelines", p, "statuses", s] if id(p).is_some() && id(s).is_some() => {
            only(get, || catalog::status(st, n(p), n(s)))
        }
        ["leads", "custom_fields"] => only(get, || catalog::custom_fields(st, req, true)),
        ["contacts", "custom_fields"] => only(get, || catalog::custom_fields(st, req, false)),
        ["leads", "loss_reasons"] => only(get, Reply::no_content),
        ["leads", "complex"] => only(post, || leads::complex(st, req, changes)),
        ["leads", "notes"] => only(post, || activity::add_notes(st, req)),
        ["leads"] => match *m {
            Method::GET => leads::list(st, req),
            Method::POST => leads::create(st, req, changes),
            Method::PATCH => leads::update_batch(st, req, changes),
            _ => not_allowed(),
        },
        ["leads", l] if id(l).is_some() => {
            if get {
                leads::get_one(st, req, n(l))
            } else if patch {
                leads::update_one(st, req, n(l), changes)
            } else {
                not_allowed()
            }
        }
        ["leads", l, "link"] if id(l).is_some() => only(post, || links::link(st, req, n(l))),
        ["leads", l, "unlink"] if id(l).is_some() => only(post, || links::unlink(st, req, n(l))),
        ["leads", l, "links"] if id(l).is_some() => only(get, || links::links(st, n(l))),
        ["contacts"] => match *m {
            Method::GET => contacts::list(st, req),
            Method::POST => contacts::create(st, req),
            _ => not_allowed(),
        },
        ["companies", c] if id(c).is_some() => only(get, || contacts::company(st, n(c))),
        ["contacts", c] if id(c).is_some() => only(get, || contacts::get_one(st, req, n(c))),
        ["tasks"] => match *m {
            Method::GET => activity::list_tasks(st, req),
            Method::POST => activity::add_tasks(st, req),
            _ => not_allowed(),
        },
        ["events"] => only(get, || activity::events(st, req)),
        ["webhooks"] => match *m {
            Method::GET => activity::list_webhooks(st, req),
            Method::POST => activity::subscribe(st, req),
            Method::DELETE => activity::unsubscribe(st, req),
            _ => not_allowed(),
        },
        _ => Reply::not_found("Not Found"),
    }
}

fn respond(reply: Reply, request_id: &str) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", v);
    }
    let (content_type, text) = match reply.body {
        Body::Hal(v) => (Some("application/hal+json"), v.to_string()),
        Body::Json(v) => (Some("application/json"), v.to_string()),
        Body::Problem(v) => (Some("application/problem+json"), v.to_string()),
        Body::ProblemText(s) => (Some("application/problem+json"), s),
        Body::Html(s) => (Some("text/html"), s),
        Body::Broken(s) => (Some("application/hal+json"), s),
        Body::Empty => (None, String::new()),
    };
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    (status, headers, text).into_response()
}
