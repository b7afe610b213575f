//! The HTTP side (axum): `/healthz` (alive), `/readyz` (ready: the database
//! answers, no target's circuit is open, every map is resolved against its
//! CRM, and no supervised part keeps failing), `/metrics` (Prometheus), and the
//! webhook intake under `/hooks/…` ([`hooks`]: amoCRM, Avito's messenger,
//! partner programmes' leads). The dashboard joins here later.

mod dashboard;
pub mod hooks;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub metrics: PrometheusHandle,
    /// CRM accounts that accept webhooks.
    pub amocrm_hooks: std::sync::Arc<Vec<hooks::HookAccount>>,
    /// Avito accounts that accept messenger webhooks.
    pub avito_hooks: std::sync::Arc<Vec<hooks::AvitoHookAccount>>,
    /// Partner sources that accept leads by webhook.
    pub partner_hooks: std::sync::Arc<Vec<hooks::PartnerHookSource>>,
    /// Largest accepted webhook body (larger: 413).
    pub webhook_body_limit: usize,
    /// The status maps in force (their last refused reload is shown by `/readyz`).
    pub maps: Option<std::sync::Arc<crate::mapping::MapRegistry>>,
    /// Woken when an amoCRM webhook stored changes, so the inbox processor acts
    /// at once instead of at its next tick.
    pub inbox_wake: std::sync::Arc<tokio::sync::Notify>,
    /// Who may see the dashboard and `/api/kpi`, and where leads link to.
    pub dashboard: Dashboard,
}

/// The dashboard's settings.
#[derive(Clone, Default)]
pub struct Dashboard {
    pub access: DashboardAccess,
    /// CRM account → its amoCRM address (the base of lead links).
    pub crm_urls: std::sync::Arc<std::collections::BTreeMap<String, String>>,
}

/// Who may see the dashboard and the KPI API.
#[derive(Clone, Default)]
pub enum DashboardAccess {
    /// Served on a loopback address: anyone who can reach it.
    #[default]
    Loopback,
    /// A public address with `http.access_token`: bearer or basic auth.
    Token(secrecy::SecretString),
    /// A public address without a token: refused (never served openly).
    Refused,
}

impl DashboardAccess {
    pub fn for_listen(listen: SocketAddr, token: Option<secrecy::SecretString>) -> DashboardAccess {
        match (listen.ip().is_loopback(), token) {
            (_, Some(token)) => DashboardAccess::Token(token),
            (true, None) => DashboardAccess::Loopback,
            (false, None) => DashboardAccess::Refused,
        }
    }

    /// `None` when the request may pass; else the answer.
    pub(crate) fn check(&self, headers: &axum::http::HeaderMap) -> Option<Response> {
        use secrecy::ExposeSecret;
        match self {
            DashboardAccess::Loopback => None,
            DashboardAccess::Refused => Some(
                (
                    StatusCode::FORBIDDEN,
                    "the dashboard and /api/kpi are not served on a public address without http.access_token",
                )
                    .into_response(),
            ),
            DashboardAccess::Token(token) => {
                let given = headers
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        if let Some(bearer) = v.strip_prefix("Bearer ") {
                            Some(bearer.trim().to_string())
                        } else {
                            let basic = v.strip_prefix("Basic ")?;
                            use base64::Engine;
                            let decoded = base64::engine::general_purpose::STANDARD
                                .decode(basic.trim())
                                .ok()?;
                            let text = String::from_utf8(decoded).ok()?;
                            text.split_once(':').map(|(_, p)| p.to_string())
                        }
                    });
                if given.as_deref() == Some(token.expose_secret()) {
                    None
                } else {
                    Some(
                        (
                            StatusCode::UNAUTHORIZED,
                            [(axum::http::header::WWW_AUTHENTICATE, "Basic realm=\"orderbridge\"")],
                            "an access token is required",
                        )
                            .into_response(),
                    )
                }
            }
        }
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.webhook_body_limit;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(dashboard::page))
        .route("/api/kpi", get(api_kpi))
        .route(
            "/hooks/amocrm/{secret}",
            post(hooks::amocrm).layer(DefaultBodyLimit::max(limit)),
        )
        .route(
            "/hooks/avito/{secret}",
            post(hooks::avito).layer(DefaultBodyLimit::max(limit)),
        )
        .route(
            "/hooks/partner/{source}/{secret}",
            post(hooks::partner).layer(DefaultBodyLimit::max(limit)),
        )
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Binds the listener (so that a port conflict is reported before anything starts).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(HttpError::Serve)
}

#[derive(Debug, serde::Deserialize)]
struct KpiQuery {
    from: Option<String>,
    to: Option<String>,
    shop: Option<String>,
}

/// `GET /api/kpi?from=&to=&shop=`: the KPIs as JSON (default: the last 24 h).
async fn api_kpi(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(query): axum::extract::Query<KpiQuery>,
) -> Response {
    if let Some(denied) = state.dashboard.access.check(&headers) {
        return denied;
    }
    let now = chrono::Utc::now();
    let parse = |v: &Option<String>, default| match v {
        None => Ok(default),
        Some(text) => crate::sla::kpi::parse_moment(text, now),
    };
    let (from, to) = match (
        parse(&query.from, now - chrono::Duration::hours(24)),
        parse(&query.to, now),
    ) {
        (Ok(from), Ok(to)) if from < to => (from, to),
        (Err(why), _) | (_, Err(why)) => return (StatusCode::BAD_REQUEST, why).into_response(),
        _ => return (StatusCode::BAD_REQUEST, "`from` must be before `to`").into_response(),
    };
    match crate::sla::kpi::compute(&state.pool, from, to, query.shop.as_deref(), now).await {
        Ok(kpis) => axum::Json(kpis).into_response(),
        Err(error) => {
            tracing::warn!(%error, "Computing the KPIs failed.");
            (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let database =
        tokio::time::timeout(Duration::from_secs(2), crate::store::ping(&state.pool)).await;
    let (status, database) = match database {
        Ok(Ok(())) => (StatusCode::OK, "ok".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("unreachable: {e}")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unreachable: no answer within 2 s".to_string(),
        ),
    };
    // Only asked of a database that answered, and bounded too: /readyz must
    // answer promptly while the database is down (that is when it is read).
    let open_circuits = if status == StatusCode::OK {
        tokio::time::timeout(
            Duration::from_secs(2),
            crate::store::circuits::list_open(&state.pool, chrono::Utc::now()),
        )
        .await
        .ok()
    } else {
        None
    };
    let circuits = match open_circuits {
        Some(Ok(open)) => open
            .into_iter()
            .map(|c| {
                serde_json::json!({
                    "target": c.target,
                    "reason": c.reason,
                    "open_until": c.open_until.to_rfc3339(),
                })
            })
            .collect(),
        Some(Err(_)) | None => Vec::new(),
    };
    let status = if circuits.is_empty() {
        status
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // A refused map reload leaves the previous maps in force: shown, not fatal
    // (webhooks must keep arriving while an admin fixes the file).
    let map_errors = state.maps.as_ref().map(|m| m.errors()).unwrap_or_default();
    // Maps that cannot be resolved against their CRM: nothing can be written
    // there, so not ready; each account with the endpoint and the CRM's answer.
    let unresolved = state
        .maps
        .as_ref()
        .map(|m| m.unresolved())
        .unwrap_or_default();
    let status = if unresolved.is_empty() {
        status
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let maps = match (map_errors.is_empty(), unresolved.is_empty()) {
        (true, true) => serde_json::json!("ok"),
        _ => {
            let mut maps = serde_json::Map::new();
            if !map_errors.is_empty() {
                maps.insert("reload_refused".into(), serde_json::json!(map_errors));
            }
            if !unresolved.is_empty() {
                maps.insert(
                    "unresolved".into(),
                    serde_json::json!(unresolved
                        .iter()
                        .map(|(account, why)| serde_json::json!({ "crm_account": account, "problem": why }))
                        .collect::<Vec<_>>()),
                );
            }
            serde_json::Value::Object(maps)
        }
    };
    // A supervised part that keeps failing (restarted again and again).
    let failing: Vec<serde_json::Value> = crate::sync::failing_parts()
        .into_iter()
        .map(|(part, failures, last)| {
            serde_json::json!({ "part": part, "failures_in_10_min": failures, "last_error": last })
        })
        .collect();
    let status = if failing.is_empty() {
        status
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let ready = status == StatusCode::OK;
    (
        status,
        Json(serde_json::json!({
            "ready": ready,
            "checks": {
                "database": database,
                "open_circuits": circuits,
                "maps": maps,
                "failing_parts": failing,
            }
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}
