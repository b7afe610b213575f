//! Partner programmes (buyout / trade-in lead sources): a connector of its own
//! kind, since each programme's API is private and its format is
//! configuration (`[partners.<source>]`).
//!
//! - [`read_lead`]: a partner's JSON lead read through the source's field map
//!   (JSON pointers), with every missing or malformed datum named;
//! - [`PartnerClient`]: status reports (URL, method, body template and auth
//!   header from config) under the partner's own limits (per second and per
//!   minute, one permit of each per request), and the poll of new leads
//!   (`GET {poll_url}?cursor=…` answered `{"leads": [...], "next_cursor": …}`);
//! - [`classify`]: 5xx, 429 (with `Retry-After`), timeouts and network errors
//!   retry; any other 4xx is permanent with the partner's answer.

mod lead;

pub use lead::{read_lead, PartnerLead};

use std::sync::Arc;
use std::time::Duration;

use governor::DefaultDirectRateLimiter;
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::config::PartnerSource;
use crate::outbox::limits::Limiters;
use crate::outbox::RetryAction;

#[derive(Debug, thiserror::Error)]
pub enum PartnerError {
    #[error("the partner answered 429 (too many requests){}", .retry_after.map(|d| format!("; retry after {} s", d.as_secs())).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    #[error("the partner answered {status}: {body}")]
    Server { status: u16, body: String },
    #[error("the partner refused the request ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("no answer from the partner within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("network error talking to the partner: {0}")]
    Network(String),
    #[error("the partner's answer could not be read: {0}")]
    Decode(String),
    #[error("the report of lead {0} could not be built: {1}")]
    Template(String, String),
}

/// What a partner's answer means for the job.
pub fn classify(error: &PartnerError) -> RetryAction {
    match error {
        PartnerError::RateLimited {
            retry_after: Some(after),
        } => RetryAction::RetryAfter {
            after: *after,
            error: error.to_string(),
        },
        PartnerError::RateLimited { retry_after: None } => {
            RetryAction::throttled(error.to_string())
        }
        PartnerError::Server { .. } | PartnerError::Network(_) | PartnerError::Decode(_) => {
            RetryAction::retry(error.to_string())
        }
        PartnerError::Timeout(_) => RetryAction::timeout(error.to_string()),
        PartnerError::Refused { .. } | PartnerError::Template(..) => {
            RetryAction::permanent(error.to_string())
        }
    }
}

/// One status report.
#[derive(Debug, Clone)]
pub struct Report {
    pub partner_lead_id: String,
    pub status: String,
    pub stage: String,
    pub crm_lead_id: Option<i64>,
    pub changed_at: chrono::DateTime<chrono::Utc>,
    /// 1, 2, … per lead, in the order of the changes.
    pub seq: i64,
}

/// What the partner answered to a report.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// A page of the partner's new leads.
#[derive(Debug, Deserialize)]
struct LeadsPage {
    #[serde(default)]
    leads: Vec<serde_json::Value>,
    #[serde(default)]
    next_cursor: Option<serde_json::Value>,
}

/// The limiter keys of a source: per second and per minute.
pub fn limiter_keys(source: &str) -> (String, String) {
    (
        format!("partner:{source}"),
        format!("partner:{source}:minute"),
    )
}

/// A partner's HTTP side: reports and polls, one permit of both limits per request.
#[derive(Clone)]
pub struct PartnerClient {
    source: String,
    config: Arc<PartnerSource>,
    http: reqwest::Client,
    per_second: Option<Arc<DefaultDirectRateLimiter>>,
    per_minute: Option<Arc<DefaultDirectRateLimiter>>,
}

impl std::fmt::Debug for PartnerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartnerClient")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
pub fn clipped(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` as the inside of a JSON string.
fn json_escaped(text: &str) -> String {
    let quoted = serde_json::Value::String(text.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

/// Fills a report template.
pub fn fill_template(template: &str, report: &Report, json: bool) -> String {
    let esc = |v: &str| {
        if json {
            json_escaped(v)
        } else {
            urlencoding_light(v)
        }
    };
    template
        .replace("{lead_id}", &esc(&report.partner_lead_id))
        .replace("{status}", &esc(&report.status))
        .replace("{stage}", &esc(&report.stage))
        .replace(
            "{crm_lead_id}",
            &report
                .crm_lead_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        )
        .replace("{changed_at}", &esc(&report.changed_at.to_rfc3339()))
        .replace("{seq}", &report.seq.to_string())
}

/// Percent-encodes what is not unreserved in a URL path segment.
fn urlencoding_light(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl PartnerClient {
    pub fn new(
        source: &str,
        config: PartnerSource,
        limiters: &Limiters,
    ) -> Result<PartnerClient, PartnerError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("orderbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PartnerError::Network(crate::connectors::transport_error_text(e)))?;
        let (second, minute) = limiter_keys(source);
        Ok(PartnerClient {
            source: source.to_string(),
            per_second: limiters.limiter(&second),
            per_minute: limiters.limiter(&minute),
            config: Arc::new(config),
            http,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn config(&self) -> &PartnerSource {
        &self.config
    }

    async fn permit(&self) {
        if let Some(minute) = &self.per_minute {
            minute.until_ready().await;
        }
        if let Some(second) = &self.per_second {
            second.until_ready().await;
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match (
            &self.config.report.auth_header,
            &self.config.report.auth_value,
        ) {
            (Some(header), Some(value)) => request.header(header.as_str(), value.expose_secret()),
            _ => request,
        }
    }

    fn failure(&self, error: reqwest::Error) -> PartnerError {
        if error.is_timeout() {
            PartnerError::Timeout(self.config.request_timeout)
        } else {
            PartnerError::Network(crate::connectors::transport_error_text(error))
        }
    }

    async fn checked(&self, answer: reqwest::Response) -> Result<Answer, PartnerError> {
        let status = answer.status().as_u16();
        let retry_after = answer
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = answer.text().await.map_err(|e| self.failure(e))?;
        let short = || clipped(&body, 500).to_string();
        match status {
            200..=299 => Ok(Answer { status, body }),
            429 => Err(PartnerError::RateLimited { retry_after }),
            500..=599 => Err(PartnerError::Server {
                status,
                body: short(),
            }),
            _ => Err(PartnerError::Refused {
                status,
                body: short(),
            }),
        }
    }

    /// Sends one status report.
    pub async fn report(&self, report: &Report) -> Result<Answer, PartnerError> {
        let r = &self.config.report;
        let url = fill_template(&r.url, report, false);
        let body = fill_template(&r.body, report, true);
        let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
            PartnerError::Template(
                report.partner_lead_id.clone(),
                format!("the body template does not make JSON: {e}"),
            )
        })?;
        let method = reqwest::Method::from_bytes(r.method.to_uppercase().as_bytes())
            .unwrap_or(reqwest::Method::POST);
        self.permit().await;
        let request = self.authorized(self.http.request(method, url).json(&json));
        let answer = request.send().await.map_err(|e| self.failure(e))?;
        self.checked(answer).await
    }

    /// Reads the partner's leads after `cursor`: the leads and the next cursor
    /// (unchanged when the partner gives none).
    pub async fn poll(
        &self,
        cursor: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, Option<String>), PartnerError> {
        let Some(url) = &self.config.poll_url else {
            return Ok((Vec::new(), cursor.map(str::to_string)));
        };
        self.permit().await;
        let mut request = self.http.get(url);
        if let Some(cursor) = cursor {
            request = request.query(&[("cursor", cursor)]);
        }
        let answer = self
            .authorized(request)
            .send()
            .await
            .map_err(|e| self.failure(e))?;
        let answer = self.checked(answer).await?;
        let page: LeadsPage =
            serde_json::from_str(&answer.body).map_err(|e| PartnerError::Decode(e.to_string()))?;
        let next = match page.next_cursor {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => cursor.map(str::to_string),
        };
        Ok((page.leads, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_escape_what_they_fill_in() {
        let report = Report {
            partner_lead_id: "a\"b/1".into(),
            status: "sold".into(),
            stage: "Продано".into(),
            crm_lead_id: Some(7),
            changed_at: chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
            seq: 3,
        };
        let body = fill_template(
            r#"{"id":"{lead_id}","status":"{status}","n":{seq},"lead":{crm_lead_id}}"#,
            &report,
            true,
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(parsed["id"], "a\"b/1");
        assert_eq!(parsed["n"], 3);
        assert_eq!(parsed["lead"], 7);
        assert_eq!(
            fill_template("http://p/leads/{lead_id}", &report, false),
            "http://p/leads/a%22b%2F1"
        );
    }

    #[test]
    fn answers_are_classified() {
        assert!(matches!(
            classify(&PartnerError::Server {
                status: 503,
                body: String::new()
            }),
            RetryAction::Retry { .. }
        ));
        assert!(matches!(
            classify(&PartnerError::RateLimited {
                retry_after: Some(Duration::from_secs(2))
            }),
            RetryAction::RetryAfter { .. }
        ));
        assert!(matches!(
            classify(&PartnerError::Refused {
                status: 400,
                body: "bad status".into()
            }),
            RetryAction::Permanent { .. }
        ));
        assert!(matches!(
            classify(&PartnerError::Timeout(Duration::from_secs(1))),
            RetryAction::Retry { .. }
        ));
    }
}
