//! Shared test helpers: a fresh migrated database per test, engine settings
//! sized for tests, running engines that can be stopped or killed, and polling
//! helpers that wait for a condition instead of sleeping and hoping.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderbridge::config::RetrySettings;
use orderbridge::outbox::clock::{Clock, ManualClock};
use orderbridge::outbox::{Engine, EngineBuilder, EngineConfig, NewJob, RetrySchedule};
use orderbridge::store::ScratchDatabase;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The server to create test databases on (the test script exports it).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Runs the daemon as deployed (`run_until`, migrating first) until the
/// returned token is cancelled; a daemon failure panics its task.
pub fn start_daemon(
    settings: orderbridge::config::Settings,
) -> (CancellationToken, JoinHandle<()>) {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        if let Err(error) = orderbridge::daemon::run_until(settings, true, token).await {
            panic!("the daemon failed: {error}");
        }
    });
    (stop, task)
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// The URL of a scratch database (on the test server).
pub fn database_url(db: &ScratchDatabase) -> String {
    let base = admin_url();
    let (server, _) = base.rsplit_once('/').unwrap_or((base.as_str(), ""));
    format!("{server}/{}", db.name)
}

/// Settings from a TOML text (written to `dir/name`), layered on the defaults.
pub fn settings_from(
    dir: &std::path::Path,
    name: &str,
    text: &str,
) -> orderbridge::config::Settings {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    orderbridge::config::Settings::load_from(Some(&path), Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fresh database, a Kaspi simulator, and an amoCRM simulator taking the
/// long-lived `token`, seeded from the shipped Kaspi map (pipeline, stages,
/// users, fields): what a daemon test of one Kaspi shop starts from.
pub async fn kaspi_and_amocrm(
    token: &str,
) -> (
    ScratchDatabase,
    orderbridge::sim::kaspi::KaspiSim,
    orderbridge::sim::amocrm::AmoSim,
) {
    let db = fresh_db().await;
    let kaspi = orderbridge::sim::kaspi::KaspiSim::start(Default::default())
        .await
        .unwrap_or_else(|e| panic!("the Kaspi simulator: {e}"));
    let amo = orderbridge::sim::amocrm::AmoSim::start(orderbridge::sim::amocrm::AmoSimConfig {
        long_lived_token: Some(token.into()),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("the amoCRM simulator: {e}"));
    seed_crm_from_map(&amo, std::path::Path::new("config/maps/kaspi.toml"), None);
    (db, kaspi, amo)
}

/// A fresh, migrated database for one test.
pub async fn fresh_db() -> ScratchDatabase {
    match ScratchDatabase::create(&admin_url(), "ob_test", 24).await {
        Ok(db) => db,
        Err(e) => panic!("cannot create a test database on {}: {e}", admin_url()),
    }
}

/// Engine settings sized for tests: short leases and heartbeats, a short schedule.
pub fn test_config() -> EngineConfig {
    EngineConfig {
        concurrency: 8,
        claim_batch: 32,
        job_lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        handler_timeout: Duration::from_secs(10),
        shutdown_deadline: Duration::from_secs(2),
        target_lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(100),
        unhandled_grace: Duration::from_secs(600),
        schedule: schedule(&[100, 200], 0.0),
    }
}

/// A retry schedule from delays in milliseconds.
pub fn schedule(delays_ms: &[u64], jitter: f64) -> RetrySchedule {
    RetrySchedule::new(&RetrySettings {
        schedule: delays_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect(),
        jitter,
        throttle_floor: Duration::from_millis(50),
        max_retry_after: Duration::from_secs(60),
    })
}

pub fn job(kind: &str, target: &str, ordering_key: &str, payload: serde_json::Value) -> NewJob {
    NewJob {
        kind: kind.to_string(),
        target: target.to_string(),
        ordering_key: ordering_key.to_string(),
        dedupe_key: None,
        payload,
        run_at: None,
    }
}

/// Enqueues jobs in one committed transaction.
pub async fn enqueue_all(pool: &PgPool, jobs: &[NewJob]) {
    let mut tx = pool.begin().await.expect("begin");
    for chunk in jobs.chunks(1000) {
        orderbridge::outbox::enqueue_many(&mut tx, chunk)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
}

/// A manual clock starting now, shared by engines of one test.
pub fn manual_clock() -> Arc<ManualClock> {
    use chrono::SubsecRound;
    // PostgreSQL keeps microseconds; start on one so stored times compare equal.
    Arc::new(ManualClock::starting_at(
        chrono::Utc::now().trunc_subsecs(6),
    ))
}

pub fn as_clock(clock: &Arc<ManualClock>) -> Arc<dyn Clock> {
    clock.clone()
}

/// An engine running in its own task.
pub struct Running {
    pub engine: Engine,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), orderbridge::outbox::OutboxError>>,
}

pub fn start(builder: EngineBuilder) -> Running {
    let engine = builder.build();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        async move { engine.run(shutdown).await }
    });
    Running {
        engine,
        shutdown,
        task,
    }
}

impl Running {
    /// Graceful stop, as on SIGTERM.
    pub async fn stop(self) {
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("engine did not stop cleanly: {other:?}"),
        }
    }

    /// Kills the engine as a crash would: no release, no final writes.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Polls `condition` every 20 ms until it holds, or panics after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        if started.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// How a test handler fails.
#[derive(Debug)]
pub enum Failure {
    Retry(String),
    Permanent(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Retry(s) | Failure::Permanent(s) => f.write_str(s),
        }
    }
}

/// A handler made of a closure, classified by [`Failure`].
pub struct FnHandler<F>(pub F);

impl<F, Fut> orderbridge::outbox::Handler for FnHandler<F>
where
    F: Fn(orderbridge::outbox::JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Failure>> + Send,
{
    type Error = Failure;
    fn run(
        &self,
        job: &orderbridge::outbox::JobContext,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        (self.0)(job.clone())
    }
    fn classify(&self, error: &Failure) -> orderbridge::outbox::RetryAction {
        match error {
            Failure::Retry(e) => orderbridge::outbox::RetryAction::retry(e.clone()),
            Failure::Permanent(e) => orderbridge::outbox::RetryAction::permanent(e.clone()),
        }
    }
}

/// Seeds the simulator with what a map names: its pipeline and stages, the
/// users of its roles, its lead fields and their options. `rename` swaps a
/// stage name, as an admin renaming a stage in amoCRM would.
pub fn seed_crm_from_map(
    sim: &orderbridge::sim::amocrm::AmoSim,
    path: &std::path::Path,
    rename: Option<(&str, &str)>,
) {
    let table: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    let mut stages: Vec<String> = Vec::new();
    for row in table["statuses"].as_table().unwrap().values() {
        if let Some(stage) = row.get("stage").and_then(|s| s.as_str()) {
            if !stages.iter().any(|s| s == stage) {
                stages.push(stage.to_string());
            }
        }
    }
    let stages: Vec<String> = stages
        .into_iter()
        .map(|s| match rename {
            Some((from, to)) if s == from => to.to_string(),
            _ => s,
        })
        .collect();
    let refs: Vec<&str> = stages.iter().map(String::as_str).collect();
    sim.seed_pipeline(table["pipeline"]["name"].as_str().unwrap(), &refs);
    for role in table["roles"].as_table().unwrap().values() {
        for user in role["users"].as_array().unwrap() {
            sim.seed_user(user.as_str().unwrap());
        }
    }
    let lead = table["lead"].as_table().unwrap();
    let enums = lead
        .get("enums")
        .and_then(|e| e.as_table())
        .cloned()
        .unwrap_or_default();
    for (slot, field) in lead["fields"].as_table().unwrap() {
        let options: Vec<String> = enums
            .get(slot)
            .and_then(|o| o.as_table())
            .map(|o| {
                o.values()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let refs: Vec<&str> = options.iter().map(String::as_str).collect();
        let kind = if options.is_empty() { "text" } else { "select" };
        sim.seed_lead_field(field.as_str().unwrap(), kind, &refs);
    }
}

/// Seeds one amoCRM account for several maps that share it, as the demo does
/// (each field once, a select with the union of the maps' options).
pub fn seed_crm_from_maps(sim: &orderbridge::sim::amocrm::AmoSim, paths: &[&std::path::Path]) {
    orderbridge::demo::seed_crm_from_maps(sim, paths).unwrap();
}

/// Queues the CRM sync of a stored order of the Kaspi shop `kaspi_main`
/// (CRM account `main`) with `flags` set in its payload, as a reconciliation's
/// repair or a creation's retry queues it.
pub async fn enqueue_kaspi_crm_sync(pool: &PgPool, order_id: i64, flags: serde_json::Value) {
    let (external_id, code): (String, String) =
        sqlx::query_as("SELECT external_id, code FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_one(pool)
            .await
            .unwrap();
    let mut job = orderbridge::sync::ingest::crm_sync_job_of(
        &orderbridge::sync::ingest::OrderRef {
            marketplace: "kaspi",
            account: "kaspi_main",
            external_id: &external_id,
            code: &code,
        },
        order_id,
        "amocrm:main",
    );
    if let (Some(payload), Some(extra)) = (job.payload.as_object_mut(), flags.as_object()) {
        payload.extend(extra.clone());
    }
    let mut conn = pool.acquire().await.unwrap();
    orderbridge::store::outbox::enqueue(&mut conn, &job)
        .await
        .unwrap();
}
