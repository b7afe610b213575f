//! The daemon (`orderbridge run`): connects and migrates the database, serves
//! the HTTP side, runs the outbox engine, and shuts everything down in order on
//! SIGTERM/SIGINT.

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::outbox::{Engine, EngineConfig, OutboxError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Runs until SIGTERM or SIGINT, then stops gracefully.
pub async fn run(settings: Settings, migrate: bool) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let result = run_until(settings, migrate, shutdown).await;
    signals.abort();
    result
}

/// Runs until `shutdown` is cancelled.
pub async fn run_until(
    settings: Settings,
    migrate: bool,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let metrics = crate::telemetry::metrics()?;
    let pool = open_database(&settings.database).await?;
    if migrate {
        crate::store::migrate(&pool).await?;
        tracing::info!("Database schema is current.");
    } else {
        crate::store::ensure_schema_current(&pool).await?;
    }
    let listener = crate::http::bind(settings.http.listen).await?;
    tracing::info!(listen = %settings.http.listen, "Serving /healthz, /readyz and /metrics.");
    let http = tokio::spawn(crate::http::serve(
        listener,
        crate::http::AppState {
            pool: pool.clone(),
            metrics,
        },
        shutdown.clone(),
    ));
    let engine = Engine::builder(pool.clone(), EngineConfig::from_settings(&settings.outbox))
        .quotas(settings.target_quotas())
        .build();
    tracing::info!(
        replica = engine.owner(),
        crm_accounts = settings.crm_accounts.len(),
        shops = settings.shops.len(),
        "orderbridge is running."
    );
    let engine_result = engine.run(shutdown.clone()).await;
    shutdown.cancel();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "The HTTP server stopped with an error."),
        Err(e) => tracing::error!(error = %e, "The HTTP server task failed."),
    }
    pool.close().await;
    engine_result?;
    tracing::info!("orderbridge stopped.");
    Ok(())
}

/// Opens the configured database (creating it when missing).
pub async fn open_database(
    settings: &crate::config::DatabaseSettings,
) -> Result<sqlx::PgPool, StoreError> {
    use secrecy::ExposeSecret;
    crate::store::connect(
        settings.url.expose_secret(),
        settings.max_connections,
        settings.connect_timeout,
    )
    .await
}

async fn cancel_on_signal(shutdown: CancellationToken) -> Result<(), DaemonError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down."),
            r = tokio::signal::ctrl_c() => {
                r.map_err(DaemonError::Signal)?;
                tracing::info!("SIGINT received; shutting down.");
            }
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(DaemonError::Signal)?;
        tracing::info!("Interrupt received; shutting down.");
    }
    shutdown.cancel();
    Ok(())
}
