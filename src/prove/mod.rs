//! `orderbridge prove SUITE`: evidence anyone can run. Each suite drives the
//! daemon as deployed (the real binary as a child process, `--config FILE
//! run`) against the in-process simulators, breaks something on purpose, and
//! checks from the outside (the simulators' records and the database) that
//! nothing was lost or done twice. It prints one `key: value` per line and
//! fails (exit 1) naming every broken promise. The short versions run in
//! `.ci/run`; the full ones by hand (`scripts/prove.sh SUITE --full`).

pub mod crash;
pub mod faults;
pub mod load;
pub mod security;
pub mod world;

use std::io::Write;

/// Why a suite failed: its harness broke, or the daemon broke a promise.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error(transparent)]
    Harness(#[from] crate::bench::BenchError),
    #[error("the daemon broke its promises: {0}")]
    Broken(String),
}

/// Runs `suite` in a scratch database on the configured server (dropped
/// after, whatever happened), then reports its figures and broken promises.
pub(crate) async fn in_scratch_database(
    settings: &crate::config::Settings,
    out: &mut impl Write,
    suite: impl AsyncFnOnce(
        &str,
        &crate::store::ScratchDatabase,
    ) -> Result<world::Outcome, crate::bench::BenchError>,
) -> Result<(), ProveError> {
    use secrecy::ExposeSecret;
    let admin = settings.database.url.expose_secret().to_string();
    crate::store::create_database_if_missing(&admin)
        .await
        .map_err(crate::bench::BenchError::from)?;
    let db = crate::store::ScratchDatabase::create(&admin, "orderbridge_prove", 16)
        .await
        .map_err(crate::bench::BenchError::from)?;
    let result = suite(&admin, &db).await;
    db.drop_now()
        .await
        .map_err(crate::bench::BenchError::from)?;
    let (figures, broken) = result?;
    report(out, &figures, &broken)
}

/// Prints the figures, then fails when any promise was broken.
pub(crate) fn report(
    out: &mut impl Write,
    figures: &[(&str, String)],
    broken: &[String],
) -> Result<(), ProveError> {
    for (key, value) in figures {
        writeln!(out, "{key}: {value}").map_err(crate::bench::BenchError::from)?;
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(ProveError::Broken(broken.join("; ")))
    }
}
