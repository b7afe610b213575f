//! The Avito order poller: non-terminal orders by status, and orders the bridge
//! already holds by id (20 per page, `hasMore` paging), diffed on `status` and
//! `updatedAt`; each change is written like Kaspi's (one transaction with its
//! history row and CRM intent).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::ingest::{self, Written};
use crate::connectors::avito::{AvitoClient, AvitoError, AvitoOrder, ACTIVE_STATUSES, ORDERS_PAGE};
use crate::store::{orders, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AvitoPollError {
    #[error(transparent)]
    Avito(#[from] AvitoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AvitoPollReport {
    pub listed: usize,
    pub new: usize,
    pub changed: usize,
    pub unchanged: usize,
    /// Held orders read by id because they left the active statuses.
    pub by_id: usize,
}

pub struct AvitoPoller {
    client: AvitoClient,
    pool: PgPool,
    crm_target: String,
}

impl AvitoPoller {
    pub fn new(client: AvitoClient, pool: PgPool, crm_target: impl Into<String>) -> Self {
        AvitoPoller {
            client,
            pool,
            crm_target: crm_target.into(),
        }
    }

    #[tracing::instrument(skip_all, fields(marketplace = "avito", account = %self.client.account()))]
    pub async fn poll_once(&self) -> Result<AvitoPollReport, AvitoPollError> {
        let account = self.client.account().to_string();
        orders::poll_started(&self.pool, "avito", &account).await?;
        let result = self.poll().await;
        match &result {
            Ok(report) => {
                orders::poll_succeeded(&self.pool, "avito", &account, Utc::now()).await?;
                tracing::info!(
                    listed = report.listed,
                    new = report.new,
                    changed = report.changed,
                    "Avito poll done."
                );
            }
            Err(error) => {
                orders::poll_failed(&self.pool, "avito", &account, &error.to_string()).await?;
                tracing::warn!(%error, "Avito poll failed; what it saw is kept, the next poll resumes.");
            }
        }
        result
    }

    async fn poll(&self) -> Result<AvitoPollReport, AvitoPollError> {
        let mut report = AvitoPollReport::default();
        let asked = Utc::now();
        let active = self.client.orders(ACTIVE_STATUSES, &[], None).await?;
        let seen: std::collections::HashSet<String> =
            active.iter().map(|o| o.order.external_id.clone()).collect();
        self.ingest(active, asked, &mut report).await?;
        // Held orders that left the active statuses (closed, canceled, unknown): by id.
        let far = Utc::now() + chrono::Duration::days(1);
        let held: Vec<String> =
            orders::active_created_before(&self.pool, "avito", self.client.account(), far)
                .await?
                .into_iter()
                .map(|k| k.external_id)
                .filter(|id| !seen.contains(id))
                .collect();
        for chunk in held.chunks(ORDERS_PAGE) {
            let asked = Utc::now();
            let read = self.client.orders(&[], chunk, None).await?;
            report.by_id += read.len();
            self.ingest(read, asked, &mut report).await?;
        }
        Ok(report)
    }

    /// Stores what was asked of Avito at `asked`.
    async fn ingest(
        &self,
        listed: Vec<AvitoOrder>,
        asked: DateTime<Utc>,
        report: &mut AvitoPollReport,
    ) -> Result<(), AvitoPollError> {
        report.listed += listed.len();
        let ids: Vec<String> = listed.iter().map(|o| o.order.external_id.clone()).collect();
        let known = orders::known(&self.pool, "avito", self.client.account(), &ids).await?;
        for order in listed {
            if known
                .get(&order.order.external_id)
                .is_some_and(|k| k.content_hash == order.content_hash)
            {
                report.unchanged += 1;
                continue;
            }
            match ingest::write_order(
                &self.pool,
                &order.order,
                &order.content_hash,
                &self.crm_target,
                asked,
            )
            .await?
            {
                Written::New => report.new += 1,
                Written::Changed { .. } => report.changed += 1,
                Written::Older => report.unchanged += 1,
            }
        }
        Ok(())
    }

    /// Polls every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        super::every(interval, shutdown, || async {
            // A failure is logged and recorded in the cursor; the next round resumes.
            let _ = self.poll_once().await;
        })
        .await
    }
}
