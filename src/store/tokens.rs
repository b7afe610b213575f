//! SQL of the OAuth token table: one rotating pair per CRM account, refreshed
//! under the row's lock so that two replicas never spend one refresh token twice.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;

/// A stored token pair.
#[derive(Clone, sqlx::FromRow)]
pub struct TokenRow {
    pub access_token: Option<String>,
    pub access_expires_at: Option<DateTime<Utc>>,
    pub refresh_token: String,
    pub previous_refresh_token: Option<String>,
}

impl std::fmt::Debug for TokenRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRow")
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "**REDACTED**"),
            )
            .field("access_expires_at", &self.access_expires_at)
            .field("refresh_token", &"**REDACTED**")
            .finish()
    }
}

/// Seeds an account's row with its first refresh token, once.
pub async fn seed(pool: &PgPool, account: &str, refresh_token: &str) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO oauth_tokens (account, refresh_token) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(account)
    .bind(refresh_token)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The current pair, without locking.
pub async fn current(pool: &PgPool, account: &str) -> Result<Option<TokenRow>, StoreError> {
    let row = sqlx::query_as(
        "SELECT access_token, access_expires_at, refresh_token, previous_refresh_token
         FROM oauth_tokens WHERE account = $1",
    )
    .bind(account)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Opens a transaction holding the account's row lock (the refresh's single flight
/// across replicas); returns the row as it is under the lock.
pub async fn lock(
    pool: &PgPool,
    account: &str,
) -> Result<(Transaction<'static, Postgres>, Option<TokenRow>), StoreError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query_as(
        "SELECT access_token, access_expires_at, refresh_token, previous_refresh_token
         FROM oauth_tokens WHERE account = $1 FOR UPDATE",
    )
    .bind(account)
    .fetch_optional(&mut *tx)
    .await?;
    Ok((tx, row))
}

/// Stores a freshly issued pair inside the locked transaction; the caller commits
/// before using it.
pub async fn store_pair(
    tx: &mut Transaction<'static, Postgres>,
    account: &str,
    access_token: &str,
    access_expires_at: DateTime<Utc>,
    refresh_token: &str,
    used_refresh_token: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE oauth_tokens
         SET access_token = $2, access_expires_at = $3, refresh_token = $4,
             previous_refresh_token = $5, refreshed_at = now(), updated_at = now()
         WHERE account = $1",
    )
    .bind(account)
    .bind(access_token)
    .bind(access_expires_at)
    .bind(refresh_token)
    .bind(used_refresh_token)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
