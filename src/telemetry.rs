//! Telemetry: JSON logs (one object per line), the PII masking helpers every log
//! line that could carry a customer's phone goes through, and the Prometheus
//! metrics recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogFormat, TelemetrySettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter `{filter}`: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error("cannot open the log file {path}: {error}")]
    LogFile { path: String, error: String },
}

/// Installs the global log subscriber. `RUST_LOG`, when set, wins over the config.
pub fn init_logging(settings: &TelemetrySettings) -> Result<(), TelemetryError> {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| settings.log_filter.clone());
    let filter =
        EnvFilter::builder()
            .parse(&directives)
            .map_err(|source| TelemetryError::Filter {
                filter: directives.clone(),
                source,
            })?;
    let writer = match &settings.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| TelemetryError::LogFile {
                    path: path.display().to_string(),
                    error: e.to_string(),
                })?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = fmt().with_env_filter(filter).with_writer(writer);
    let result = match settings.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInstalled)
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics() -> Result<PrometheusHandle, TelemetryError> {
    if let Some(handle) = METRICS.get() {
        return Ok(handle.clone());
    }
    // Two daemons starting at once in one process (tests, the demo) install
    // one recorder: the second waits here and takes the first one's handle.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = METRICS.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])
        .map_err(|e| TelemetryError::Metrics(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            let _ = METRICS.set(handle.clone());
            Ok(handle)
        }
        // Someone else installed a recorder outside this function.
        Err(_) => METRICS
            .get()
            .cloned()
            .ok_or_else(|| TelemetryError::Metrics("a foreign recorder is installed".into())),
    }
}

/// Masks a customer's phone for logs (see [`crate::domain::contact::mask_phone`]).
pub fn mask_phone(phone: &str) -> String {
    crate::domain::contact::mask_phone(phone)
}

/// Masks an email for logs: `ivan.petrov@example.kz` → `i***@example.kz`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn masks_a_kazakh_mobile() {
        assert_eq!(mask_phone("+77011234567"), "+770******67");
        assert_eq!(mask_phone("+7 (701) 123-45-67"), "+7 (70*) ***-**-67");
    }

    #[test]
    fn short_values_are_fully_masked() {
        assert_eq!(mask_phone("1234"), "****");
        assert_eq!(mask_phone(""), "");
    }

    #[test]
    fn masks_email() {
        assert_eq!(mask_email("ivan.petrov@example.kz"), "i***@example.kz");
        assert_eq!(mask_email("not-an-email"), "***");
    }

    proptest! {
        #[test]
        fn a_masked_phone_never_reveals_more_than_five_digits(phone in "\\+?[0-9 ()-]{0,24}") {
            let masked = mask_phone(&phone);
            let shown = masked.chars().filter(char::is_ascii_digit).count();
            prop_assert!(shown <= 5);
            prop_assert_eq!(masked.chars().count(), phone.chars().count());
            let digits = phone.chars().filter(char::is_ascii_digit).count();
            if digits >= 7 {
                // At least half of a real phone's digits are hidden.
                prop_assert!(shown * 2 <= digits);
            }
        }
    }
}
