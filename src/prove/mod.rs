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
    // Stopped from outside (Ctrl-C, SIGTERM): the suite is dropped, which
    // stops its daemons, and its database goes too, as after a finished run.
    let result = tokio::select! {
        result = suite(&admin, &db) => result,
        signal = stop_signal() => Err(crate::bench::failed(format!(
            "stopped by {signal}: its daemons were stopped and its scratch database dropped"
        ))),
    };
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

/// Waits for SIGINT or SIGTERM; names the one that came. A signal that
/// cannot be listened for never comes.
async fn stop_signal() -> &'static str {
    async fn interrupted() -> &'static str {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT",
            Err(_) => std::future::pending().await,
        }
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                Some(()) = term.recv() => "SIGTERM",
                name = interrupted() => name,
            },
            Err(_) => interrupted().await,
        }
    }
    #[cfg(not(unix))]
    {
        interrupted().await
    }
}
