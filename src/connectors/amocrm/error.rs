//! amoCRM errors, and their classification into retry actions: the knowledge
//! of what each answer means lives here, the backoff mechanics in the outbox.

use std::time::Duration;

use crate::outbox::RetryAction;
use crate::store::StoreError;

/// One rejected item of a batch (`validation-errors[]` of a 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRejection {
    /// Our `request_id` (or the item's index when none was sent).
    pub request_id: String,
    /// `path: detail` of each error, as amoCRM gave them.
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AmoError {
    #[error("amoCRM rate limit hit (429){}", .retry_after.map(|d| format!("; retry after {} s", d.as_secs())).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    #[error("amoCRM answered 403: the IP or account is blocked; traffic to {target} is stopped")]
    Blocked { target: String },
    #[error("the circuit of {target} is open ({reason}); no calls for {} s more", .remaining.as_secs())]
    CircuitOpen {
        target: String,
        reason: String,
        remaining: Duration,
    },
    #[error("amoCRM answered 402 Payment Required: the account's paid period has ended")]
    PaymentRequired,
    #[error("amoCRM refused the credentials (401{}): {detail}", if *.after_refresh { " after a token refresh" } else { "" })]
    Unauthorized { after_refresh: bool, detail: String },
    #[error(
        "the OAuth token row of account {0} is missing; seed it with auth.initial_refresh_token"
    )]
    NoToken(String),
    #[error("amoCRM rejected {} item(s): {}", .0.len(), .0.iter().map(|r| format!("{}: {}", r.request_id, r.errors.join("; "))).collect::<Vec<_>>().join(" | "))]
    Validation(Vec<ItemRejection>),
    #[error("amoCRM answered 400 Bad Request: {0}")]
    BadRequest(String),
    #[error("amoCRM answered 404 Not Found: {0}")]
    NotFound(String),
    #[error("amoCRM answered 422 Unprocessable Entity: {0}")]
    Unprocessable(String),
    #[error("amoCRM answered 504 Gateway Timeout (batch too large or slow)")]
    GatewayTimeout,
    #[error("amoCRM answered {status}: {detail}")]
    Server { status: u16, detail: String },
    #[error("amoCRM answered an unexpected {status}: {detail}")]
    Unexpected { status: u16, detail: String },
    #[error("no answer from amoCRM within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("network error talking to amoCRM: {0}")]
    Network(String),
    #[error("amoCRM's answer to {what} could not be read: {error}")]
    Decode { what: &'static str, error: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// After the 403 itself, when a job comes back to meet the open circuit.
const BLOCKED_RECHECK: Duration = Duration::from_secs(5);

impl AmoError {
    /// What the outbox should do after this error.
    pub fn classify(&self) -> RetryAction {
        let text = self.to_string();
        match self {
            AmoError::RateLimited {
                retry_after: Some(after),
            } => RetryAction::RetryAfter {
                after: *after,
                error: text,
            },
            AmoError::RateLimited { retry_after: None } => RetryAction::throttled(text),
            // Not the job's failure: it waits for the account (the cool-down,
            // or an operator's `circuit reset`, which makes it due at once),
            // however long the block lasts; never dead-lettered for it
            // (found by `prove api-faults`: a job that had met 500s and
            // timeouts before died of retries during a 30-second block).
            AmoError::CircuitOpen { remaining, .. } => RetryAction::Wait {
                after: *remaining,
                reason: text,
            },
            // The circuit is open now: the next attempt meets it and waits.
            AmoError::Blocked { .. } => RetryAction::Wait {
                after: BLOCKED_RECHECK,
                reason: text,
            },
            AmoError::Timeout(_) => RetryAction::timeout(text),
            AmoError::GatewayTimeout
            | AmoError::Server { .. }
            | AmoError::Network(_)
            | AmoError::Decode { .. }
            | AmoError::Store(_) => RetryAction::retry(text),
            AmoError::PaymentRequired
            | AmoError::Unauthorized { .. }
            | AmoError::NoToken(_)
            | AmoError::Validation(_)
            | AmoError::BadRequest(_)
            | AmoError::NotFound(_)
            | AmoError::Unprocessable(_)
            | AmoError::Unexpected { .. } => RetryAction::permanent(text),
        }
    }

    /// Errors an operator must hear about at once.
    pub fn is_alert(&self) -> bool {
        matches!(
            self,
            AmoError::Blocked { .. }
                | AmoError::PaymentRequired
                | AmoError::Unauthorized { .. }
                | AmoError::NoToken(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A circuit reset finds the jobs the circuit put off by these words.
    #[test]
    fn jobs_put_off_by_the_circuit_carry_its_markers() {
        let [met_circuit, met_block] = crate::store::circuits::deferred_job_markers("amocrm:main");
        let open = AmoError::CircuitOpen {
            target: "amocrm:main".into(),
            reason: "amoCRM answered 403".into(),
            remaining: Duration::from_secs(60),
        };
        assert!(open.to_string().contains(&met_circuit), "{open}");
        let blocked = AmoError::Blocked {
            target: "amocrm:main".into(),
        };
        assert!(blocked.to_string().contains(&met_block), "{blocked}");
    }

    #[test]
    fn each_answer_has_its_retry_action() {
        let after = Duration::from_secs(3);
        assert!(matches!(
            AmoError::RateLimited { retry_after: Some(after) }.classify(),
            RetryAction::RetryAfter { after: a, .. } if a == after
        ));
        assert!(matches!(
            AmoError::Server {
                status: 500,
                detail: String::new()
            }
            .classify(),
            RetryAction::Retry { .. }
        ));
        assert!(matches!(
            AmoError::GatewayTimeout.classify(),
            RetryAction::Retry { .. }
        ));
        for permanent in [
            AmoError::PaymentRequired,
            AmoError::Unauthorized {
                after_refresh: true,
                detail: String::new(),
            },
            AmoError::Validation(vec![]),
        ] {
            assert!(
                matches!(permanent.classify(), RetryAction::Permanent { .. }),
                "{permanent}"
            );
        }
        assert!(AmoError::PaymentRequired.is_alert());
        assert!(!AmoError::GatewayTimeout.is_alert());
    }
}
