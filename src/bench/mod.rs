//! `orderbridge bench …`: performance figures printed one per line as
//! `key: value`. Benchmarks run against the configured PostgreSQL in scratch
//! databases that are dropped afterwards.

pub mod amocrm;
pub mod avito;
pub mod kaspi;
pub mod kpi;
pub mod outbox;
pub mod partner;
pub mod pipeline;
pub mod reconcile;
