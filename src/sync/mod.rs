//! Orchestration between the connectors, the store and the outbox: ingest
//! (one transaction per order change: snapshot, stage history, outbox intent)
//! and the marketplace pollers. CRM pushes, inbox processing and
//! reconciliation join here in later issues.

pub mod avito_leads;
pub mod avito_poll;
pub mod ingest;
pub mod kaspi_poll;
