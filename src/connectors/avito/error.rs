//! Avito errors and their classification into retry actions.

use std::time::Duration;

use crate::outbox::RetryAction;

#[derive(Debug, thiserror::Error)]
pub enum AvitoError {
    #[error("Avito refused the credentials ({status}) even with a fresh token: {message}")]
    Auth { status: u16, message: String },
    #[error("Avito rate limit hit (429) on {endpoint}{}", .retry_after.map(|d| format!("; retry after {} s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        endpoint: &'static str,
        retry_after: Option<Duration>,
    },
    #[error("Avito answered 400: {0}")]
    BadRequest(String),
    #[error("Avito answered 404: {0}")]
    NotFound(String),
    #[error("Avito answered {status}: {message}")]
    Server { status: u16, message: String },
    #[error("Avito answered an unexpected {status}: {message}")]
    Unexpected { status: u16, message: String },
    #[error("no answer from Avito within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("network error talking to Avito: {0}")]
    Network(String),
    #[error("Avito's answer to {what} could not be read: {error}")]
    Decode { what: &'static str, error: String },
    #[error("order {order} does not offer `{action}` now (available: {available})")]
    NotAvailable {
        order: String,
        action: String,
        available: String,
    },
    #[error("Avito did not apply `{action}` to order {order} (success: false)")]
    TransitionRefused { order: String, action: String },
    #[error("Avito refused the tracking number for order {order}: {code}: {message}")]
    TrackingRefused {
        order: String,
        code: String,
        message: String,
    },
    #[error("order {0} does not exist at Avito")]
    NoSuchOrder(String),
}

impl AvitoError {
    /// What the outbox should do after this error.
    pub fn classify(&self) -> RetryAction {
        let text = self.to_string();
        match self {
            AvitoError::RateLimited {
                retry_after: Some(after),
                ..
            } => RetryAction::RetryAfter {
                after: *after,
                error: text,
            },
            AvitoError::RateLimited { .. } => RetryAction::throttled(text),
            AvitoError::Timeout(_) => RetryAction::timeout(text),
            AvitoError::Server { .. } | AvitoError::Network(_) | AvitoError::Decode { .. } => {
                RetryAction::retry(text)
            }
            AvitoError::Auth { .. }
            | AvitoError::BadRequest(_)
            | AvitoError::NotFound(_)
            | AvitoError::Unexpected { .. }
            | AvitoError::NotAvailable { .. }
            | AvitoError::TransitionRefused { .. }
            | AvitoError::TrackingRefused { .. }
            | AvitoError::NoSuchOrder(_) => RetryAction::permanent(text),
        }
    }

    pub fn is_alert(&self) -> bool {
        matches!(self, AvitoError::Auth { .. })
    }
}
