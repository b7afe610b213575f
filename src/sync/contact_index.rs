//! The local index of each CRM account's contacts (`crm_contacts`): loaded in
//! pages of 250 at start, kept current with `If-Modified-Since` listings and
//! with what the bridge itself creates. With it, contact de-duplication costs
//! no request of the account's 7/s budget: only an account whose index has
//! never been loaded falls back to amoCRM's search per customer.

use sqlx::PgPool;

use crate::connectors::amocrm::{AmoClient, AmoError};
use crate::domain::{Email, Phone};
use crate::store::{links, orders, StoreError};

/// The cursor name of the index in `poll_cursors`.
pub const CONTACT_INDEX_CURSOR: &str = "amocrm_contacts";

/// How far back each refresh re-reads before the last one (clock skew, slow writes).
const OVERLAP: chrono::Duration = chrono::Duration::minutes(2);

#[derive(Debug, thiserror::Error)]
pub enum ContactIndexError {
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Loads (first time: everything) or refreshes the index of `client`'s
/// account; returns how many contacts were written.
pub async fn refresh(client: &AmoClient, pool: &PgPool) -> Result<u64, ContactIndexError> {
    let account = client.account_name().to_string();
    let started = chrono::Utc::now();
    let since = orders::cursor(pool, CONTACT_INDEX_CURSOR, &account)
        .await?
        .and_then(|c| c.listed_until)
        .map(|until| (until - OVERLAP).timestamp());
    orders::poll_started(pool, CONTACT_INDEX_CURSOR, &account).await?;
    let contacts = match client.contacts_modified_since(since).await {
        Ok(contacts) => contacts,
        Err(error) => {
            orders::poll_failed(pool, CONTACT_INDEX_CURSOR, &account, &error.to_string()).await?;
            return Err(error.into());
        }
    };
    let rows: Vec<(i64, Option<String>, Option<String>)> = contacts
        .iter()
        .map(|c| {
            let phone = c
                .phones
                .iter()
                .find_map(|p| Phone::parse(p).ok())
                .map(|p| p.as_e164().to_string());
            let email = c
                .emails
                .iter()
                .find_map(|e| Email::parse(e))
                .map(|e| e.as_str().to_string());
            (c.id as i64, phone, email)
        })
        .collect();
    let written = links::remember_contacts(pool, &account, &rows).await?;
    orders::poll_succeeded(pool, CONTACT_INDEX_CURSOR, &account, started).await?;
    tracing::info!(crm_account = %account, contacts = written, full = since.is_none(), "The contact index is current.");
    Ok(written)
}

/// Whether the index of `crm_account` has been loaded at least once (a miss
/// in it then means amoCRM has no such contact, as of the last refresh).
pub async fn is_loaded(pool: &PgPool, crm_account: &str) -> Result<bool, StoreError> {
    Ok(orders::cursor(pool, CONTACT_INDEX_CURSOR, crm_account)
        .await?
        .and_then(|c| c.listed_until)
        .is_some())
}
