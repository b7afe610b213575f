//! orderbridge: a long-running daemon that bridges marketplace orders (Kaspi.kz,
//! Avito) and amoCRM, through a PostgreSQL outbox.
//!
//! Layout (see `docs/ARCHITECTURE.md` for the data flow):
//! - [`cli`]: the clap commands (`run`, `demo`, `reconcile`, `order show`, `dlq`, `bench`, …);
//! - [`config`]: layered settings and their validation;
//! - [`domain`]: types shared by everything (phones, emails), knowing no API;
//! - [`connectors`]: one folder per external API (client, private wire types, conversion);
//! - [`telemetry`]: JSON logs, PII masking, the metrics recorder;
//! - [`store`]: the PostgreSQL pool, migrations and every SQL statement;
//! - [`mapping`]: the status maps admins edit, and their validation;
//! - [`outbox`]: the job engine (claims, leases, retries, rate limits);
//! - [`sync`]: ingest (order change + history + outbox intent in one transaction), the pollers,
//!   both sync directions and reconciliation;
//! - [`reports`]: the weekly commission settlement (partner leads, Avito orders) and its
//!   comparison with the partner's own report;
//! - [`sla`]: working time, stage entries with their SLA timers, and the tasks they create;
//! - [`http`]: the axum side (`/healthz`, `/readyz`, `/metrics`);
//! - [`daemon`]: wires the parts together for `run`, with graceful shutdown;
//! - [`bench`]: `orderbridge bench …`, throughput and latency figures;
//! - [`demo`]: `orderbridge demo`, the daemon against the simulators with generated orders and managers;
//! - [`sim`]: simulators of the external APIs, for tests, benchmarks and the demo.

pub mod bench;
pub mod cli;
pub mod config;
pub mod connectors;
pub mod daemon;
pub mod demo;
pub mod domain;
pub mod http;
pub mod mapping;
pub mod outbox;
pub mod prove;
pub mod reports;
pub mod sim;
pub mod sla;
pub mod store;
pub mod sync;
pub mod telemetry;
