//! Webhooks stored in groups. amoCRM gives a webhook 2 s for its answer and
//! may send many at once (a manager's bulk move, a catch-up after an outage):
//! one transaction per webhook is one WAL flush each, and at 1,000 a second
//! the answers queued past the deadline (`orderbridge prove load`). Handlers
//! hand their items to one writer task, which takes whatever has queued
//! meanwhile (up to [`GROUP_MAX`] webhooks) and stores it in one statement
//! and one commit; each handler answers only after its group committed, so
//! a 200 still means "stored". A group that fails is retried webhook by
//! webhook, so one bad item fails only its own webhook.

use std::sync::{Arc, OnceLock};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::store::inbox::{self, NewInboxItem};
use crate::store::StoreError;

/// The most webhooks stored in one commit.
const GROUP_MAX: usize = 500;
/// Webhooks waiting for the writer before handlers wait to hand theirs over.
const QUEUE: usize = 4_096;

#[derive(Debug, thiserror::Error)]
pub enum InboxWriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the inbox writer stopped")]
    Stopped,
}

/// A handle on the writer (started at the first webhook; stops when the
/// last handle is gone). `Default` is a handle with no writer yet.
#[derive(Clone, Default)]
pub struct InboxWriter {
    queue: Arc<OnceLock<mpsc::Sender<Pending>>>,
}

struct Pending {
    items: Vec<NewInboxItem>,
    done: oneshot::Sender<Result<u64, InboxWriteError>>,
}

impl InboxWriter {
    /// Stores one webhook's items (duplicates by dedupe key skipped) once its
    /// group committed; how many of the group's items were new.
    pub async fn insert(
        &self,
        pool: &PgPool,
        items: Vec<NewInboxItem>,
    ) -> Result<u64, InboxWriteError> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(write_groups(pool.clone(), rx));
            tx
        });
        let (done, committed) = oneshot::channel();
        queue
            .send(Pending { items, done })
            .await
            .map_err(|_| InboxWriteError::Stopped)?;
        committed.await.map_err(|_| InboxWriteError::Stopped)?
    }
}

async fn write_groups(pool: PgPool, mut queue: mpsc::Receiver<Pending>) {
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let all: Vec<NewInboxItem> = group.iter().flat_map(|p| p.items.clone()).collect();
        match inbox::insert(&pool, &all).await {
            Ok(new) => {
                for pending in group {
                    let _ = pending.done.send(Ok(new));
                }
            }
            Err(error) if group.len() > 1 => {
                tracing::warn!(%error, webhooks = group.len(),
                    "Storing a group of webhooks failed; storing them one by one.");
                for pending in group {
                    let result = inbox::insert(&pool, &pending.items)
                        .await
                        .map_err(InboxWriteError::from);
                    let _ = pending.done.send(result);
                }
            }
            Err(error) => {
                if let Some(pending) = group.pop() {
                    let _ = pending.done.send(Err(error.into()));
                }
            }
        }
    }
}
