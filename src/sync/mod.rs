//! Orchestration between the connectors, the store and the outbox: ingest
//! (one transaction per order change: snapshot, stage history, outbox intent)
//! the marketplace pollers, and the Marketplace → CRM handler (`to_crm`).
//! CRM → marketplace, amoCRM inbox processing and reconciliation join later.

pub mod avito_leads;
pub mod avito_poll;
pub mod ingest;
pub mod kaspi_poll;
pub mod to_crm;
pub mod to_marketplace;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `round` every `interval` (the first at once) until `shutdown`; a late
/// round delays the next instead of bunching them.
pub async fn every<F, Fut>(interval: Duration, shutdown: CancellationToken, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        round().await;
    }
}
