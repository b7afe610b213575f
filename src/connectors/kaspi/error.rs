//! Kaspi errors and their classification into retry actions.

use crate::outbox::RetryAction;

#[derive(Debug, thiserror::Error)]
pub enum KaspiError {
    #[error("Kaspi refused the request (400): {0}")]
    BadRequest(String),
    #[error("Kaspi refused the token ({status}): {detail}")]
    Auth { status: u16, detail: String },
    #[error("Kaspi answered 403 with a non-JSON page: the network path is blocked (Kaspi is reported to answer only from Kazakhstan addresses)")]
    NetworkBlocked,
    #[error("Kaspi answered 404 with an HTML page: a configuration error (the Accept header, or the base URL)")]
    Misconfigured,
    #[error("Kaspi answered 404: {0}")]
    NotFound(String),
    #[error("Kaspi rate limit hit (429)")]
    RateLimited,
    #[error("Kaspi answered {status}: {detail}")]
    Server { status: u16, detail: String },
    #[error("Kaspi answered an unexpected {status}: {detail}")]
    Unexpected { status: u16, detail: String },
    #[error("no answer from Kaspi within {} s", .0.as_secs())]
    Timeout(std::time::Duration),
    #[error("network error talking to Kaspi: {0}")]
    Network(String),
    #[error("Kaspi's answer to {what} could not be read: {error}")]
    Decode { what: &'static str, error: String },
    #[error("order {code} is {current}; Kaspi does not allow {wanted} from there")]
    TransitionNotAllowed {
        code: String,
        current: String,
        wanted: String,
    },
    #[error("order {0} does not exist at Kaspi")]
    NoSuchOrder(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl KaspiError {
    /// What the outbox should do after this error.
    pub fn classify(&self) -> RetryAction {
        let text = self.to_string();
        match self {
            KaspiError::RateLimited => RetryAction::throttled(text),
            KaspiError::Timeout(_) => RetryAction::timeout(text),
            KaspiError::Server { .. } | KaspiError::Network(_) | KaspiError::Decode { .. } => {
                RetryAction::retry(text)
            }
            // A blocked network path may open again; come back after the floor.
            KaspiError::NetworkBlocked => RetryAction::throttled(text),
            KaspiError::BadRequest(_)
            | KaspiError::Auth { .. }
            | KaspiError::Misconfigured
            | KaspiError::NotFound(_)
            | KaspiError::Unexpected { .. }
            | KaspiError::TransitionNotAllowed { .. }
            | KaspiError::NoSuchOrder(_)
            | KaspiError::Invalid(_) => RetryAction::permanent(text),
        }
    }

    /// Errors an operator must hear about at once.
    pub fn is_alert(&self) -> bool {
        matches!(
            self,
            KaspiError::Auth { .. } | KaspiError::NetworkBlocked | KaspiError::Misconfigured
        )
    }
}
