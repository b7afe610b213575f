//! Webhook intake. `POST /hooks/amocrm/{secret}`: the secret picks the CRM
//! account (a wrong one is 404), the body is parsed and checked against the
//! account's subdomain and id, every lead change is stored in the inbox
//! (deduplicated), and the answer is 200 at once (amoCRM waits 2 s);
//! processing happens later. A malformed body is 400, logged, nothing stored;
//! another content type than form-encoded 415 (a missing one is taken as
//! form-encoded). `POST /hooks/avito/{secret}`: Avito's messenger (JSON; 415
//! likewise). `POST
//! /hooks/partner/{source}/{secret}`: a partner programme's lead (JSON), read
//! through the source's field map and stored with its CRM job (200; a repeated
//! lead id is 200 and stores nothing); an invalid lead is 422 with every
//! problem, a body that is not JSON 400, another content type 415.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};

use super::AppState;
use crate::connectors::amocrm::webhook;
use crate::store::inbox::{self, NewInboxItem};

/// A CRM account that accepts webhooks.
#[derive(Clone)]
pub struct HookAccount {
    pub name: String,
    pub secret: SecretString,
    pub subdomain: String,
    pub account_id: u64,
}

impl std::fmt::Debug for HookAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookAccount")
            .field("name", &self.name)
            .field("subdomain", &self.subdomain)
            .field("account_id", &self.account_id)
            .finish_non_exhaustive()
    }
}

/// Compares the SHA-256 digests of both without an early exit, so the time
/// taken reveals neither the secret nor its length.
fn same_secret(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

pub(super) async fn amocrm(
    State(state): State<AppState>,
    Path(secret): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let Some(account) = state
        .amocrm_hooks
        .iter()
        .find(|a| same_secret(a.secret.expose_secret(), &secret))
    else {
        tracing::warn!("A webhook arrived with an unknown secret; answered 404.");
        return StatusCode::NOT_FOUND.into_response();
    };
    if !content_type_is(&headers, "application/x-www-form-urlencoded") {
        return wrong_content_type("amocrm", "application/x-www-form-urlencoded");
    }
    let payload = match webhook::parse(&body) {
        Ok(payload) => payload,
        Err(error) => {
            tracing::warn!(account = %account.name, %error, bytes = body.len(),
                "A malformed amoCRM webhook was refused; nothing stored.");
            metrics::counter!("orderbridge_webhooks_total", "source" => "amocrm", "result" => "malformed")
                .increment(1);
            return (
                StatusCode::BAD_REQUEST,
                format!("malformed webhook: {error}"),
            )
                .into_response();
        }
    };
    if payload.subdomain != account.subdomain || payload.account_id != account.account_id {
        tracing::warn!(account = %account.name, got_subdomain = %payload.subdomain,
            got_account_id = payload.account_id,
            "A webhook named another amoCRM account than the one its secret belongs to; refused.");
        metrics::counter!("orderbridge_webhooks_total", "source" => "amocrm", "result" => "wrong_account")
            .increment(1);
        return (StatusCode::BAD_REQUEST, "webhook from another account").into_response();
    }
    let items: Vec<NewInboxItem> = payload
        .changes
        .iter()
        .map(|change| NewInboxItem {
            source: "amocrm".into(),
            account: account.name.clone(),
            kind: change.action.as_str().into(),
            dedupe_key: change.dedupe_key(&account.name),
            payload: serde_json::json!({
                "lead_id": change.lead_id,
                "status_id": change.status_id,
                "pipeline_id": change.pipeline_id,
                "old_status_id": change.old_status_id,
                "old_pipeline_id": change.old_pipeline_id,
                "modified_user_id": change.modified_user_id,
                "last_modified": change.last_modified,
                "fields": change.raw,
            }),
        })
        .collect();
    match inbox::insert(&state.pool, &items).await {
        Ok(new) => {
            if new > 0 {
                state.inbox_wake.notify_one();
            }
            tracing::info!(account = %account.name, items = items.len(), new, "amoCRM webhook stored.");
            metrics::counter!("orderbridge_webhooks_total", "source" => "amocrm", "result" => "stored")
                .increment(1);
            StatusCode::OK.into_response()
        }
        Err(error) => {
            // amoCRM retries non-2xx answers: nothing is lost.
            tracing::error!(account = %account.name, %error, "Could not store an amoCRM webhook; answered 500 so amoCRM retries.");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// An Avito account that accepts messenger webhooks.
#[derive(Clone)]
pub struct AvitoHookAccount {
    pub name: String,
    pub secret: SecretString,
}

impl std::fmt::Debug for AvitoHookAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvitoHookAccount")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `POST /hooks/avito/{secret}`: Avito's messenger webhook. The empty `{}` probe,
/// the account's own messages and system messages are answered 200 and not
/// stored; a buyer's message is stored in the inbox (deduplicated by message id).
pub(super) async fn avito(
    State(state): State<AppState>,
    Path(secret): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let Some(account) = state
        .avito_hooks
        .iter()
        .find(|a| same_secret(a.secret.expose_secret(), &secret))
    else {
        tracing::warn!("An Avito webhook arrived with an unknown secret; answered 404.");
        return StatusCode::NOT_FOUND.into_response();
    };
    if !content_type_is(&headers, "json") {
        return wrong_content_type("avito", "application/json");
    }
    let ok = || {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "ok": true })),
        )
            .into_response()
    };
    let message = match crate::connectors::avito::webhook::parse(&body) {
        Ok(crate::connectors::avito::webhook::Delivery::Probe) => return ok(),
        Ok(crate::connectors::avito::webhook::Delivery::Other(kind)) => {
            tracing::debug!(account = %account.name, kind, "An Avito webhook of another type; ignored.");
            return ok();
        }
        Ok(crate::connectors::avito::webhook::Delivery::Message(message)) => message,
        Err(error) => {
            tracing::warn!(account = %account.name, %error, "A malformed Avito webhook was refused; nothing stored.");
            metrics::counter!("orderbridge_webhooks_total", "source" => "avito", "result" => "malformed")
                .increment(1);
            return (
                StatusCode::BAD_REQUEST,
                format!("malformed webhook: {error}"),
            )
                .into_response();
        }
    };
    let Some(item) = crate::sync::avito_leads::inbox_item(&account.name, &message) else {
        metrics::counter!("orderbridge_webhooks_total", "source" => "avito", "result" => "ignored")
            .increment(1);
        return ok();
    };
    match inbox::insert(&state.pool, &[item]).await {
        Ok(_) => {
            metrics::counter!("orderbridge_webhooks_total", "source" => "avito", "result" => "stored")
                .increment(1);
            ok()
        }
        Err(error) => {
            tracing::error!(account = %account.name, %error, "Could not store an Avito webhook; answered 500.");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A partner source that accepts leads by webhook.
#[derive(Clone)]
pub struct PartnerHookSource {
    pub name: String,
    pub secret: SecretString,
    pub config: std::sync::Arc<crate::config::PartnerSource>,
}

impl std::fmt::Debug for PartnerHookSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartnerHookSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `POST /hooks/partner/{source}/{secret}`: one lead of a partner programme.
pub(super) async fn partner(
    State(state): State<AppState>,
    Path((source, secret)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    // Every source's secret is compared, so the time taken does not tell
    // which source names exist.
    let mut found = None;
    for hook in state.partner_hooks.iter() {
        if same_secret(hook.secret.expose_secret(), &secret) && hook.name == source {
            found = Some(hook);
        }
    }
    let Some(hook) = found else {
        tracing::warn!(source = %source, "A partner webhook arrived with an unknown source or secret; answered 404.");
        return StatusCode::NOT_FOUND.into_response();
    };
    if !content_type_is(&headers, "json") {
        metrics::counter!("orderbridge_webhooks_total", "source" => "partner", "result" => "content_type")
            .increment(1);
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            axum::Json(serde_json::json!({"error": "send the lead as application/json"})),
        )
            .into_response();
    }
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(error) => {
            tracing::warn!(source = %hook.name, %error, bytes = body.len(), "A partner webhook that is not JSON was refused; nothing stored.");
            metrics::counter!("orderbridge_webhooks_total", "source" => "partner", "result" => "malformed")
                .increment(1);
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": format!("the body is not JSON: {error}")})),
            )
                .into_response();
        }
    };
    match crate::sync::partner::accept_lead(&state.pool, &hook.name, &hook.config, &value).await {
        Ok((intake, lead)) => {
            let repeated = intake == crate::sync::partner::Intake::Repeated;
            tracing::info!(source = %hook.name, partner_lead = %lead.lead_id, repeated,
                "A partner lead arrived by webhook.");
            metrics::counter!("orderbridge_webhooks_total", "source" => "partner",
                "result" => if repeated { "repeated" } else { "stored" })
            .increment(1);
            (
                StatusCode::OK,
                axum::Json(serde_json::json!({
                    "ok": true, "lead_id": lead.lead_id, "repeated": repeated
                })),
            )
                .into_response()
        }
        Err(crate::sync::partner::IntakeError::Invalid(problems)) => {
            tracing::warn!(source = %hook.name, problems = %problems.join("; "),
                "An invalid partner lead was refused; nothing stored.");
            metrics::counter!("orderbridge_webhooks_total", "source" => "partner", "result" => "invalid")
                .increment(1);
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(serde_json::json!({"error": "invalid lead", "problems": problems})),
            )
                .into_response()
        }
        Err(crate::sync::partner::IntakeError::Store(error)) => {
            tracing::error!(source = %hook.name, %error, "Could not store a partner lead; answered 500 so the partner retries.");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Whether the request's content type names `expected` (a request without
/// one is taken as what the sender always sends).
fn content_type_is(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.to_ascii_lowercase().contains(expected))
}

/// 415, logged and counted: the body is not read.
fn wrong_content_type(source: &'static str, expected: &str) -> Response {
    tracing::warn!(
        source,
        expected,
        "A webhook with another content type was refused (415); nothing stored."
    );
    metrics::counter!("orderbridge_webhooks_total", "source" => source, "result" => "content_type")
        .increment(1);
    (
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!("send the webhook as {expected}"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_match_exactly_whatever_their_lengths() {
        assert!(same_secret("s3cret-path", "s3cret-path"));
        assert!(!same_secret("s3cret-path", "s3cret-pat"));
        assert!(!same_secret("s3cret-path", "s3cret-path-longer"));
        assert!(!same_secret("s3cret-path", "S3cret-path"));
        assert!(!same_secret("s3cret-path", ""));
        assert!(same_secret("", ""));
    }
}
