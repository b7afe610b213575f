//! `orderbridge bench outbox`: the engine against the configured PostgreSQL
//! (in a scratch database that is dropped afterwards).
//!
//! - drain: enqueue N jobs (~200-byte payloads), then run a no-op handler until
//!   all are done: `enqueue_jobs_per_s`, `drain_jobs_per_s`;
//! - latency: an open-loop producer at R jobs/s for S seconds, enqueue to handler
//!   start: `latency_p50_ms`, `latency_p95_ms`, `latency_p99_ms`;
//! - rate-limited: 4 targets at 7 jobs/s, 560 jobs: `limited_min_rate_per_s`,
//!   `limited_max_in_any_1s`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::{RateQuota, RetrySettings, Settings};
use crate::outbox::{
    Engine, EngineConfig, Handler, JobContext, NewJob, RetryAction, RetrySchedule,
};
use crate::store::ScratchDatabase;

#[derive(Debug, Clone, clap::Args)]
pub struct OutboxBenchArgs {
    /// Jobs for the drain phase.
    #[arg(long, default_value_t = 50_000)]
    pub jobs: usize,
    /// Producer rate for the latency phase (jobs/s).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Duration of the latency phase (s).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Jobs for the rate-limited phase (spread over 4 targets at 7/s).
    #[arg(long, default_value_t = 560)]
    pub limited_jobs: usize,
    /// Run only these phases (drain, latency, limited); all by default.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("the {phase} phase did not finish within {secs} s ({done} of {total} jobs)")]
    Stalled {
        phase: &'static str,
        secs: u64,
        done: u64,
        total: u64,
    },
    #[error("cannot print: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the phases and prints one `key: value` line per figure.
pub async fn run(
    settings: &Settings,
    args: &OutboxBenchArgs,
    out: &mut impl Write,
) -> Result<(), BenchError> {
    crate::store::create_database_if_missing(settings.database.url.expose_secret()).await?;
    let wants = |phase: &str| args.only.is_empty() || args.only.iter().any(|p| p == phase);
    let url = settings.database.url.expose_secret();
    if wants("drain") {
        let db = ScratchDatabase::create(url, "orderbridge_bench", 8).await?;
        let result = drain(&db, args.jobs).await;
        db.drop_now().await?;
        let (enqueue_rate, drain_rate) = result?;
        writeln!(out, "enqueue_jobs_per_s: {enqueue_rate:.0}")?;
        writeln!(out, "drain_jobs_per_s: {drain_rate:.0}")?;
    }
    if wants("latency") {
        let db = ScratchDatabase::create(url, "orderbridge_bench", 24).await?;
        let result = latency(&db, args.rate, Duration::from_secs(args.seconds)).await;
        db.drop_now().await?;
        let (p50, p95, p99) = result?;
        writeln!(out, "latency_p50_ms: {p50:.2}")?;
        writeln!(out, "latency_p95_ms: {p95:.2}")?;
        writeln!(out, "latency_p99_ms: {p99:.2}")?;
    }
    if wants("limited") {
        let db = ScratchDatabase::create(url, "orderbridge_bench", 8).await?;
        let result = limited(&db, args.limited_jobs).await;
        db.drop_now().await?;
        let (min_rate, max_in_1s) = result?;
        writeln!(out, "limited_min_rate_per_s: {min_rate:.2}")?;
        writeln!(out, "limited_max_in_any_1s: {max_in_1s}")?;
    }
    Ok(())
}

/// Engine settings for benchmarking: wide concurrency, big claims.
pub fn bench_engine_config(concurrency: usize, claim_batch: u32) -> EngineConfig {
    EngineConfig {
        concurrency,
        claim_batch,
        job_lease: Duration::from_secs(60),
        poll_interval: Duration::from_millis(500),
        handler_timeout: Duration::from_secs(30),
        shutdown_deadline: Duration::from_secs(5),
        target_lease_ttl: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(5),
        unhandled_grace: Duration::from_secs(15 * 60),
        schedule: RetrySchedule::new(&RetrySettings {
            schedule: vec![Duration::from_secs(1)],
            jitter: 0.0,
            throttle_floor: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(1),
        }),
    }
}

/// A payload of about 200 bytes, like an order-sync intent.
fn payload(i: usize, sent_us: u64) -> serde_json::Value {
    serde_json::json!({
        "order": format!("KSP-{i:09}"),
        "shop": "kaspi_main",
        "crm": "main",
        "status": "ACCEPTED_BY_MERCHANT",
        "sent_us": sent_us,
        "note": "level-triggered sync of one order into its amoCRM lead",
    })
}

/// Counts handler runs.
struct CountingHandler {
    done: Arc<AtomicU64>,
}

impl Handler for CountingHandler {
    type Error = std::convert::Infallible;
    async fn run(&self, _job: &JobContext) -> Result<(), Self::Error> {
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn classify(&self, error: &Self::Error) -> RetryAction {
        match *error {}
    }
}

async fn drain(db: &ScratchDatabase, jobs: usize) -> Result<(f64, f64), BenchError> {
    let started = Instant::now();
    for chunk_start in (0..jobs).step_by(1000) {
        let batch: Vec<NewJob> = (chunk_start..(chunk_start + 1000).min(jobs))
            .map(|i| NewJob {
                kind: "noop".into(),
                target: "bench".into(),
                ordering_key: format!("order-{i}"),
                dedupe_key: Some(format!("sync:order-{i}")),
                payload: payload(i, 0),
                run_at: None,
            })
            .collect();
        let mut tx = db.pool.begin().await?;
        crate::outbox::enqueue_many(&mut tx, &batch).await?;
        tx.commit().await?;
    }
    let enqueue_rate = jobs as f64 / started.elapsed().as_secs_f64();

    let done = Arc::new(AtomicU64::new(0));
    let engine = Engine::builder(db.pool.clone(), bench_engine_config(1024, 500))
        .handler("noop", CountingHandler { done: done.clone() })
        .build();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn({
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        async move { engine.run(shutdown).await }
    });
    wait_until_empty(db, "drain", &done, jobs as u64, Duration::from_secs(600)).await?;
    let drain_rate = jobs as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = running.await;
    Ok((enqueue_rate, drain_rate))
}

/// Waits until every job has run and its outcome is written.
async fn wait_until_empty(
    db: &ScratchDatabase,
    phase: &'static str,
    done: &AtomicU64,
    total: u64,
    limit: Duration,
) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        if done.load(Ordering::Relaxed) >= total && crate::store::outbox::is_empty(&db.pool).await?
        {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(BenchError::Stalled {
                phase,
                secs: limit.as_secs(),
                done: done.load(Ordering::Relaxed),
                total,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records enqueue-to-start latency.
struct LatencyHandler {
    epoch: Instant,
    histogram: Arc<Mutex<Histogram<u64>>>,
    done: Arc<AtomicU64>,
}

impl Handler for LatencyHandler {
    type Error = std::convert::Infallible;
    async fn run(&self, job: &JobContext) -> Result<(), Self::Error> {
        let now_us = self.epoch.elapsed().as_micros() as u64;
        // The warm-up job carries no send time and is not measured.
        if let Some(sent_us) = job.payload["sent_us"].as_u64() {
            if let Ok(mut h) = self.histogram.lock() {
                let _ = h.record(now_us.saturating_sub(sent_us).max(1));
            }
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn classify(&self, error: &Self::Error) -> RetryAction {
        match *error {}
    }
}

async fn latency(
    db: &ScratchDatabase,
    rate: u32,
    duration: Duration,
) -> Result<(f64, f64, f64), BenchError> {
    let epoch = Instant::now();
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| BenchError::Io(std::io::Error::other(e.to_string())))?,
    ));
    let done = Arc::new(AtomicU64::new(0));
    let engine = Engine::builder(db.pool.clone(), bench_engine_config(256, 100))
        .handler(
            "noop",
            LatencyHandler {
                epoch,
                histogram: histogram.clone(),
                done: done.clone(),
            },
        )
        .build();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        async move { engine.run(shutdown).await }
    });
    // Let the engine take its target lease and start listening.
    warm_up(db, &done).await?;

    let total = (f64::from(rate.max(1)) * duration.as_secs_f64()) as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut producers = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let pool = db.pool.clone();
        producers.spawn(async move {
            let sent_us = epoch.elapsed().as_micros() as u64;
            let job = NewJob {
                kind: "noop".into(),
                target: "bench".into(),
                ordering_key: format!("order-{i}"),
                dedupe_key: Some(format!("sync:order-{i}")),
                payload: payload(i, sent_us),
                run_at: None,
            };
            let mut tx = pool.begin().await?;
            crate::outbox::enqueue(&mut tx, &job).await?;
            tx.commit().await?;
            Ok::<(), BenchError>(())
        });
        while let Some(result) = producers.try_join_next() {
            if let Ok(Err(e)) = result {
                return Err(e);
            }
        }
    }
    while let Some(result) = producers.join_next().await {
        if let Ok(Err(e)) = result {
            return Err(e);
        }
    }
    wait_until_empty(db, "latency", &done, total as u64, Duration::from_secs(120)).await?;
    shutdown.cancel();
    let _ = running.await;
    let h = histogram
        .lock()
        .map_err(|_| BenchError::Io(std::io::Error::other("latency histogram poisoned")))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok((ms(0.50), ms(0.95), ms(0.99)))
}

/// Runs one job through the engine so that leases and LISTEN are in place.
async fn warm_up(db: &ScratchDatabase, done: &AtomicU64) -> Result<(), BenchError> {
    let mut conn = db.pool.acquire().await?;
    crate::outbox::enqueue(
        &mut conn,
        &NewJob {
            kind: "noop".into(),
            target: "bench".into(),
            ordering_key: "warmup".into(),
            dedupe_key: None,
            payload: serde_json::json!({ "warmup": true }),
            run_at: None,
        },
    )
    .await?;
    drop(conn);
    wait_until_empty(db, "warm-up", done, 1, Duration::from_secs(30)).await?;
    done.store(0, Ordering::Relaxed);
    Ok(())
}

/// Records start instants per target.
struct StampingHandler {
    stamps: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
    done: Arc<AtomicU64>,
}

impl Handler for StampingHandler {
    type Error = std::convert::Infallible;
    async fn run(&self, job: &JobContext) -> Result<(), Self::Error> {
        let now = Instant::now();
        if let Ok(mut stamps) = self.stamps.lock() {
            stamps.entry(job.target.clone()).or_default().push(now);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn classify(&self, error: &Self::Error) -> RetryAction {
        match *error {}
    }
}

const LIMITED_TARGETS: usize = 4;
const LIMITED_QUOTA: RateQuota = RateQuota {
    requests: 7,
    per: Duration::from_secs(1),
    burst: 1,
};

async fn limited(db: &ScratchDatabase, jobs: usize) -> Result<(f64, usize), BenchError> {
    let targets: Vec<String> = (0..LIMITED_TARGETS)
        .map(|t| format!("limited:{t}"))
        .collect();
    let batch: Vec<NewJob> = (0..jobs)
        .map(|i| NewJob {
            kind: "stamp".into(),
            target: targets[i % LIMITED_TARGETS].clone(),
            ordering_key: format!("order-{i}"),
            dedupe_key: None,
            payload: payload(i, 0),
            run_at: None,
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    crate::outbox::enqueue_many(&mut tx, &batch).await?;
    tx.commit().await?;

    let stamps = Arc::new(Mutex::new(HashMap::new()));
    let done = Arc::new(AtomicU64::new(0));
    let mut builder = Engine::builder(db.pool.clone(), bench_engine_config(64, 50)).handler(
        "stamp",
        StampingHandler {
            stamps: stamps.clone(),
            done: done.clone(),
        },
    );
    for target in &targets {
        builder = builder.quota(target, LIMITED_QUOTA);
    }
    let engine = builder.build();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        async move { engine.run(shutdown).await }
    });
    wait_until_empty(db, "limited", &done, jobs as u64, Duration::from_secs(600)).await?;
    shutdown.cancel();
    let _ = running.await;
    let stamps = stamps
        .lock()
        .map_err(|_| BenchError::Io(std::io::Error::other("stamps poisoned")))?
        .clone();
    Ok(rate_figures(&stamps))
}

/// The slowest target's achieved rate and the most starts any target had in a
/// 1-second window.
pub fn rate_figures(stamps: &HashMap<String, Vec<Instant>>) -> (f64, usize) {
    let mut min_rate = f64::INFINITY;
    let mut max_in_window = 0;
    for times in stamps.values() {
        let mut times = times.clone();
        times.sort();
        if let (Some(first), Some(last)) = (times.first(), times.last()) {
            let span = last.duration_since(*first).as_secs_f64();
            if times.len() > 1 && span > 0.0 {
                min_rate = min_rate.min((times.len() - 1) as f64 / span);
            }
        }
        max_in_window = max_in_window.max(max_in_any_window(&times, Duration::from_secs(1)));
    }
    if min_rate.is_infinite() {
        min_rate = 0.0;
    }
    (min_rate, max_in_window)
}

/// The most events of a sorted list that fall in any half-open window `[t, t + width)`.
pub fn max_in_any_window(sorted: &[Instant], width: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end].duration_since(sorted[start]) >= width {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events_in_sliding_windows() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let times = vec![at(0), at(100), at(999), at(1000), at(1500), at(1600)];
        // [0, 1000) holds 0, 100, 999; [999, 1999) holds 999, 1000, 1500, 1600.
        assert_eq!(max_in_any_window(&times, Duration::from_secs(1)), 4);
        assert_eq!(max_in_any_window(&[], Duration::from_secs(1)), 0);
    }
}
