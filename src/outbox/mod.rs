//! The outbox engine: durable jobs in PostgreSQL, run at least once, never two
//! of one ordering key at a time, never faster than the target allows.
//!
//! - [`enqueue`] inside the caller's transaction, deduplicated by key;
//! - [`Engine`]: claims due jobs of the targets whose lease this replica holds
//!   (`claim`), runs them through the target's rate limiter (`run`), and writes
//!   the outcomes in batches, fenced by attempt number (`finish`);
//! - `heartbeat`: target leases, job-lease renewal and reaping of jobs whose worker died;
//! - [`retry`]: what an outcome means and when the next attempt runs;
//! - [`limits`]: one governor limiter per target.
//!
//! All SQL is in [`crate::store::outbox`].

pub mod clock;
mod dispatch;
mod finish;
mod heartbeat;
pub mod limits;
pub mod retry;

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{OutboxSettings, RateQuota};
pub use crate::store::outbox::{Enqueued, NewJob};
use crate::store::StoreError;
use clock::{Clock, SystemClock};
use limits::Limiters;
pub use retry::{RetryAction, RetryCause, RetrySchedule};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no handler is registered for job kind `{0}`")]
    UnknownKind(String),
}

/// Enqueues a job in the caller's transaction: it becomes visible (and wakes the
/// workers) only when the caller commits.
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob) -> Result<Enqueued, OutboxError> {
    Ok(crate::store::outbox::enqueue(conn, job).await?)
}

/// Enqueues a batch of jobs in the caller's transaction, in one statement.
pub async fn enqueue_many(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<u64, OutboxError> {
    Ok(crate::store::outbox::enqueue_many(conn, jobs).await?)
}

/// What a handler sees of its job.
#[derive(Debug)]
pub struct JobContext {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub ordering_key: String,
    pub payload: serde_json::Value,
    /// 1 for the first attempt.
    pub attempt: i32,
    /// What the handler asked to keep in the attempt's record.
    remarks: std::sync::Mutex<Vec<String>>,
}

impl Clone for JobContext {
    fn clone(&self) -> JobContext {
        JobContext {
            id: self.id,
            kind: self.kind.clone(),
            target: self.target.clone(),
            ordering_key: self.ordering_key.clone(),
            payload: self.payload.clone(),
            attempt: self.attempt,
            remarks: std::sync::Mutex::new(
                self.remarks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            ),
        }
    }
}

impl JobContext {
    pub fn new(
        id: i64,
        kind: String,
        target: String,
        ordering_key: String,
        payload: serde_json::Value,
        attempt: i32,
    ) -> JobContext {
        JobContext {
            id,
            kind,
            target,
            ordering_key,
            payload,
            attempt,
            remarks: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Keeps `text` in this attempt's record (`outbox_attempts.error` of a
    /// successful attempt): something went partly wrong and the job still
    /// succeeded, e.g. amoCRM refused the buyer's phone and the lead was made
    /// without it.
    pub fn remark(&self, text: impl Into<String>) {
        self.remarks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(text.into());
    }

    pub(crate) fn take_remarks(&self) -> Option<String> {
        let remarks = std::mem::take(&mut *self.remarks.lock().unwrap_or_else(|p| p.into_inner()));
        (!remarks.is_empty()).then(|| remarks.join("; "))
    }
}

/// Runs jobs of one kind. `run` does the work; `classify` says what an error
/// means (the connector's knowledge), separately from the backoff mechanics.
pub trait Handler: Send + Sync + 'static {
    type Error: Display + Send;
    fn run(&self, job: &JobContext) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn classify(&self, error: &Self::Error) -> RetryAction;
}

/// A shared handler runs jobs of several kinds (it may tell them apart by
/// `JobContext::kind`).
impl<H: Handler> Handler for Arc<H> {
    type Error = H::Error;
    fn run(&self, job: &JobContext) -> impl Future<Output = Result<(), Self::Error>> + Send {
        H::run(self, job)
    }
    fn classify(&self, error: &Self::Error) -> RetryAction {
        H::classify(self, error)
    }
}

/// Object-safe form of [`Handler`], used by the engine.
trait ErasedHandler: Send + Sync {
    fn call<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, RetryAction>;
}

impl<H: Handler> ErasedHandler for H {
    fn call<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, RetryAction> {
        async move {
            match self.run(job).await {
                Ok(()) => RetryAction::Success,
                Err(error) => self.classify(&error),
            }
        }
        .boxed()
    }
}

/// The engine's tunables (from `[outbox]` in config).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub concurrency: usize,
    pub claim_batch: u32,
    pub job_lease: Duration,
    pub poll_interval: Duration,
    pub handler_timeout: Duration,
    pub shutdown_deadline: Duration,
    pub target_lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Pending jobs of a kind without a handler here are dead-lettered after this.
    pub unhandled_grace: Duration,
    pub schedule: RetrySchedule,
}

impl EngineConfig {
    pub fn from_settings(settings: &OutboxSettings) -> Self {
        EngineConfig {
            concurrency: settings.concurrency,
            claim_batch: settings.claim_batch,
            job_lease: settings.job_lease,
            poll_interval: settings.poll_interval,
            handler_timeout: settings.handler_timeout,
            shutdown_deadline: settings.shutdown_deadline,
            target_lease_ttl: settings.target_lease_ttl,
            heartbeat_interval: settings.heartbeat_interval,
            unhandled_grace: settings.unhandled_grace,
            schedule: RetrySchedule::new(&settings.retry),
        }
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    pool: PgPool,
    config: EngineConfig,
    owner: String,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    timeouts: HashMap<String, Duration>,
    batched: HashMap<String, usize>,
    quotas: Vec<(String, RateQuota)>,
    limiters: Option<Arc<Limiters>>,
    clock: Arc<dyn Clock>,
}

impl EngineBuilder {
    /// Registers the handler of a job kind.
    pub fn handler<H: Handler>(mut self, kind: &str, handler: H) -> Self {
        self.handlers.insert(kind.to_string(), Arc::new(handler));
        self
    }

    /// Registers the handler of a job kind whose jobs may run longer than
    /// `handler_timeout` (e.g. a reconciliation run), up to `timeout`.
    pub fn long_handler<H: Handler>(mut self, kind: &str, handler: H, timeout: Duration) -> Self {
        self.timeouts.insert(kind.to_string(), timeout);
        self.handler(kind, handler)
    }

    /// Declares that jobs of `kind` are batched by their handler (e.g. the
    /// amoCRM writer sends up to 50 leads per request): up to `size` of them
    /// per target may be claimed and run at once, besides the target's usual
    /// claim cap (about two seconds of its quota) for its other kinds, so that
    /// a batch can fill and the other kinds are not starved by a backlog.
    /// Each job is still claimed, leased, fenced and finished on its own, one
    /// per ordering key, oldest first.
    pub fn batched(mut self, kind: &str, size: usize) -> Self {
        self.batched.insert(kind.to_string(), size.max(1));
        self
    }

    /// Limits a target to a quota.
    pub fn quota(mut self, target: &str, quota: RateQuota) -> Self {
        self.quotas.push((target.to_string(), quota));
        self
    }

    pub fn quotas(mut self, quotas: impl IntoIterator<Item = (String, RateQuota)>) -> Self {
        self.quotas.extend(quotas);
        self
    }

    /// Shares a limiter registry with the connectors' clients (replaces `quota`/`quotas`).
    pub fn limiters(mut self, limiters: Arc<Limiters>) -> Self {
        self.limiters = Some(limiters);
        self
    }

    /// This replica's name in leases (default: host name, pid and a random suffix).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn build(self) -> Engine {
        Engine {
            shared: Arc::new(Shared {
                pool: crate::store::outbox::engine_pool(&self.pool),
                config: self.config,
                owner: self.owner,
                kinds: self.handlers.keys().cloned().collect(),
                plain_kinds: self
                    .handlers
                    .keys()
                    .filter(|k| !self.batched.contains_key(*k))
                    .cloned()
                    .collect(),
                batch_kinds: self
                    .batched
                    .keys()
                    .filter(|k| self.handlers.contains_key(*k))
                    .cloned()
                    .collect(),
                batch_size: self.batched.values().copied().max().unwrap_or(0),
                handlers: self.handlers,
                timeouts: self.timeouts,
                limiters: self
                    .limiters
                    .unwrap_or_else(|| Arc::new(Limiters::new(self.quotas))),
                clock: self.clock,
                wake: tokio::sync::Notify::new(),
                beat_now: tokio::sync::Notify::new(),
                state: std::sync::Mutex::new(RunState::default()),
                round: std::sync::atomic::AtomicUsize::new(0),
                finisher_stalled: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }
}

/// A job this replica has claimed and not yet finished.
#[derive(Debug, Clone)]
struct InFlight {
    attempt: i32,
    target: String,
    kind: String,
    started_at: chrono::DateTime<chrono::Utc>,
    /// Its outcome has been handed to the finisher.
    reported: bool,
}

/// What the engine's tasks share in memory.
#[derive(Default)]
struct RunState {
    /// Targets whose lease this replica holds.
    held: Vec<String>,
    /// Held targets being handed over: no new claims, released once idle.
    draining: std::collections::HashSet<String>,
    in_flight: HashMap<i64, InFlight>,
    per_target: HashMap<String, usize>,
}

struct Shared {
    pool: PgPool,
    config: EngineConfig,
    owner: String,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    /// Kinds allowed longer than `config.handler_timeout`.
    timeouts: HashMap<String, Duration>,
    /// The kinds this replica claims (those it has handlers for).
    kinds: Vec<String>,
    /// The kinds claimed under the target's claim cap (all but the batched).
    plain_kinds: Vec<String>,
    /// Kinds whose handlers batch jobs ([`EngineBuilder::batched`]), and how
    /// many of them a target may have in flight besides the others.
    batch_kinds: Vec<String>,
    batch_size: usize,
    limiters: Arc<Limiters>,
    clock: Arc<dyn Clock>,
    /// Wakes the dispatcher (new work, freed capacity, new targets).
    wake: tokio::sync::Notify,
    /// Wakes the heartbeat (a notification named a target not held yet).
    beat_now: tokio::sync::Notify,
    state: std::sync::Mutex<RunState>,
    /// Claim rounds so far (rotates which target is served first).
    round: std::sync::atomic::AtomicUsize,
    /// The finisher cannot write outcomes: nothing new is claimed until it can.
    finisher_stalled: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_until(&self, ttl: Duration) -> chrono::DateTime<chrono::Utc> {
        self.clock.now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
    }
}

/// The outbox engine of one replica.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    pub fn builder(pool: PgPool, config: EngineConfig) -> EngineBuilder {
        EngineBuilder {
            pool,
            config,
            owner: default_owner(),
            handlers: HashMap::new(),
            timeouts: HashMap::new(),
            batched: HashMap::new(),
            quotas: Vec::new(),
            limiters: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// This replica's name in leases.
    pub fn owner(&self) -> &str {
        &self.shared.owner
    }

    /// Targets this replica holds now.
    pub fn held_targets(&self) -> Vec<String> {
        self.shared.state().held.clone()
    }

    /// Jobs claimed and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared.state().in_flight.len()
    }

    /// Asks the dispatcher to look for work now (as a notification would).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Runs until `shutdown` is cancelled: then stops claiming, lets running jobs
    /// finish within the shutdown deadline, releases the rest and the target
    /// leases, and returns.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), OutboxError> {
        let (finish_tx, finish_rx) = tokio::sync::mpsc::unbounded_channel();
        let stop_background = CancellationToken::new();
        // Aborted if this future is dropped (a killed worker takes its tasks with it).
        let mut finisher = AbortOnDrop(tokio::spawn(finish::run_finisher(
            self.shared.clone(),
            finish_rx,
        )));
        let heartbeat = AbortOnDrop(tokio::spawn(heartbeat::run_heartbeat(
            self.shared.clone(),
            stop_background.clone(),
        )));
        let listener = AbortOnDrop(tokio::spawn(heartbeat::run_listener_supervised(
            self.shared.clone(),
            stop_background.clone(),
        )));
        let result = dispatch::run_dispatcher(self.shared.clone(), finish_tx, shutdown).await;
        // The dispatcher dropped its sender once every job was finished or released:
        // the finisher writes what is left and ends. If the database is away it may
        // not manage; those jobs stay leased and are reaped once their lease expires.
        match tokio::time::timeout(self.shared.config.shutdown_deadline, &mut finisher.0).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "The outbox finisher task failed."),
            Err(_) => {
                finisher.0.abort();
                tracing::error!("Could not write the last job outcomes before the deadline; those jobs will run again after their lease expires.");
            }
        }
        stop_background.cancel();
        let _ = heartbeat.join().await;
        let _ = listener.join().await;
        if let Err(e) =
            crate::store::outbox::replica_gone(&self.shared.pool, &self.shared.owner).await
        {
            tracing::warn!(error = %e, "Could not deregister this replica; it will age out.");
        }
        match crate::store::outbox::release_targets(&self.shared.pool, &self.shared.owner).await {
            Ok(n) => tracing::info!(released_targets = n, "Outbox engine stopped."),
            Err(e) => {
                tracing::warn!(error = %e, "Could not release target leases; they will expire.")
            }
        }
        result
    }
}

/// A task handle that aborts its task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A replica name unique to this process: host name, pid and a random suffix.
pub fn default_owner() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_string());
    format!(
        "{host}:{}:{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}
