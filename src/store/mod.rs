//! The store: PostgreSQL is the only state. This module owns the pool, the
//! embedded migrations and every SQL statement of the crate (one submodule per
//! table family); nothing outside `store` writes a query.

pub mod alerts;
pub mod circuits;
pub mod inbox;
pub mod kpi;
pub mod links;
pub mod orders;
pub mod outbox;
pub mod partner;
pub mod rate_slots;
pub mod reconcile;
pub mod sla;
pub mod timeline;
pub mod tokens;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database URL is not valid: {0}")]
    BadUrl(#[source] sqlx::Error),
    #[error("cannot create database: {0}")]
    Create(#[source] sqlx::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database schema is behind this binary ({pending} migration(s) pending); run `orderbridge migrate` or start without --no-migrate")]
    SchemaBehind { pending: usize },
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
}

/// Creates the database named in `url` when it does not exist yet.
pub async fn create_database_if_missing(url: &str) -> Result<(), StoreError> {
    let exists = Postgres::database_exists(url)
        .await
        .map_err(StoreError::Create)?;
    if !exists {
        match Postgres::create_database(url).await {
            Ok(()) => tracing::info!("Created the database."),
            // Another replica created it at the same moment.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(StoreError::Create(e)),
        }
    }
    Ok(())
}

/// Drops the database named in `url` (closing its sessions) when it exists.
pub async fn drop_database(url: &str) -> Result<(), StoreError> {
    if Postgres::database_exists(url)
        .await
        .map_err(StoreError::Create)?
    {
        Postgres::force_drop_database(url)
            .await
            .map_err(StoreError::Create)?;
    }
    Ok(())
}

/// Opens the connection pool (the database is created first when missing).
pub async fn connect(
    url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<PgPool, StoreError> {
    create_database_if_missing(url).await?;
    connect_existing(url, max_connections, connect_timeout).await
}

/// Opens a pool on an existing database.
pub async fn connect_existing(
    url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(StoreError::BadUrl)?
        .application_name("orderbridge");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
        .map_err(StoreError::Connect)
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Refuses to go on when migrations are pending (for `run --no-migrate`).
pub async fn ensure_schema_current(pool: &PgPool) -> Result<(), StoreError> {
    let table_exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await?;
    let applied: Vec<i64> = if table_exists {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?
    } else {
        Vec::new()
    };
    let pending = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .count();
    if pending > 0 {
        return Err(StoreError::SchemaBehind { pending });
    }
    Ok(())
}

/// Is the database reachable? (for `/readyz`)
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// A throw-away database on the configured server, migrated, for tests and
/// benchmarks: created by [`ScratchDatabase::create`], removed by [`ScratchDatabase::drop_now`].
pub struct ScratchDatabase {
    pub pool: PgPool,
    pub name: String,
    admin: PgPool,
}

impl ScratchDatabase {
    /// Creates `{prefix}_{random}` next to the database `admin_url` names, and migrates it.
    pub async fn create(
        admin_url: &str,
        prefix: &str,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let admin_options = PgConnectOptions::from_str(admin_url).map_err(StoreError::BadUrl)?;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(admin_options.clone())
            .await
            .map_err(StoreError::Connect)?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .map_err(StoreError::Create)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(
                admin_options
                    .database(&name)
                    .application_name("orderbridge"),
            )
            .await
            .map_err(StoreError::Connect)?;
        migrate(&pool).await?;
        Ok(ScratchDatabase { pool, name, admin })
    }

    /// Closes the pool and drops the database.
    pub async fn drop_now(self) -> Result<(), StoreError> {
        self.pool.close().await;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await?;
        Ok(())
    }
}
