//! SQL of the outbox engine: enqueue (with dedupe), claim (FOR UPDATE SKIP
//! LOCKED, per-key FIFO, under a target lease), completion (fenced by attempt
//! number, batched), lease renewal and reaping, target leases, dead letters.

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::StoreError;

/// The channel enqueue notifies on; the payload is the job's target.
pub const NOTIFY_CHANNEL: &str = "orderbridge_outbox";

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Handler name.
    pub kind: String,
    /// Rate-limit and lease key: `amocrm:main`, `kaspi:shop1`, …
    pub target: String,
    /// Jobs sharing it run one at a time, oldest first (usually the order).
    pub ordering_key: String,
    /// While a job with this key is pending, enqueue refreshes its payload instead of adding one.
    pub dedupe_key: Option<String>,
    pub payload: Json,
    /// Not before this time (`None`: now).
    pub run_at: Option<DateTime<Utc>>,
}

/// What enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: i64,
    /// `false` when an existing pending job with the same dedupe key was refreshed.
    pub inserted: bool,
}

/// A job claimed by a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub ordering_key: String,
    pub payload: Json,
    /// This attempt's number (1-based); also the fencing token.
    pub attempts: i32,
    /// Failed attempts before this one.
    pub failures: i32,
}

/// How an attempt ended, as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Success,
    /// Back to pending, due at `run_at`.
    Retry {
        run_at: DateTime<Utc>,
        error: String,
    },
    Dead {
        error: String,
    },
    /// Given back unfinished (shutdown); not counted as a failure.
    Released,
    /// Back to pending until `run_at`, waiting for a precondition (stored as
    /// its last error); not counted as a failure.
    Waiting {
        run_at: DateTime<Utc>,
        reason: String,
    },
}

impl Finish {
    fn outcome(&self) -> &'static str {
        match self {
            Finish::Success => "success",
            Finish::Retry { .. } => "retry",
            Finish::Dead { .. } => "dead",
            Finish::Released | Finish::Waiting { .. } => "released",
        }
    }
}

/// The end of one attempt, written in batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub job_id: i64,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub finish: Finish,
    /// What a successful attempt wants remembered (e.g. "amoCRM refused the
    /// contact's phone: …"), kept in its attempt row's `error` column.
    pub remark: Option<String>,
}

/// A dead-lettered job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadJob {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub ordering_key: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One recorded attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRecord {
    pub job_id: i64,
    pub attempt: i32,
    pub kind: String,
    pub target: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: String,
    pub error: Option<String>,
}

/// A job's stored state (for the CLI and tests).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub ordering_key: String,
    pub dedupe_key: Option<String>,
    pub payload: Json,
    pub state: String,
    pub attempts: i32,
    pub failures: i32,
    pub run_at: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
    pub last_error: Option<String>,
}

/// Connections the engine itself uses (listener, claims, completions, heartbeat).
const ENGINE_CONNECTIONS: u32 = 6;

/// The engine's own small pool on the same database, with `synchronous_commit`
/// off: a claim or an outcome lost in a crash only means the job runs again
/// (at least once, and handlers are level-triggered), so the engine need not
/// wait for WAL flushes that enqueues (the callers' transactions) still wait for.
pub fn engine_pool(pool: &PgPool) -> PgPool {
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .options([("synchronous_commit", "off")]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(ENGINE_CONNECTIONS)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .connect_lazy_with(options)
}

/// Enqueues one job inside the caller's transaction (or on a plain connection).
/// Nothing is visible to workers until the caller commits; a rollback leaves no job.
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob) -> Result<Enqueued, StoreError> {
    let row: (i64, bool) = sqlx::query_as(
        "WITH target_row AS (
             INSERT INTO outbox_target_leases (target) VALUES ($2) ON CONFLICT DO NOTHING
         )
         INSERT INTO outbox_jobs (kind, target, ordering_key, dedupe_key, payload, run_at)
         SELECT $1, $2, $3, $4, $5, $6 FROM (SELECT pg_notify($7, $2)) AS wake
         ON CONFLICT (dedupe_key) WHERE state = 'pending' AND dedupe_key IS NOT NULL
         DO UPDATE SET payload = EXCLUDED.payload, updated_at = now()
         RETURNING id, (xmax = 0) AS inserted",
    )
    .bind(&job.kind)
    .bind(&job.target)
    .bind(&job.ordering_key)
    .bind(&job.dedupe_key)
    .bind(&job.payload)
    .bind(job.run_at)
    .bind(NOTIFY_CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Enqueued {
        id: row.0,
        inserted: row.1,
    })
}

/// Enqueues many jobs in one statement (same semantics as [`enqueue`]; among
/// jobs of this batch sharing a dedupe key, the last payload wins).
pub async fn enqueue_many(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<u64, StoreError> {
    if jobs.is_empty() {
        return Ok(0);
    }
    // ON CONFLICT cannot touch one row twice in a statement: fold duplicates first.
    let mut position: std::collections::HashMap<&str, usize> = Default::default();
    let mut batch: Vec<&NewJob> = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job.dedupe_key.as_deref() {
            Some(key) => match position.get(key) {
                Some(&i) => batch[i] = job,
                None => {
                    position.insert(key, batch.len());
                    batch.push(job);
                }
            },
            None => batch.push(job),
        }
    }
    let kinds: Vec<&str> = batch.iter().map(|j| j.kind.as_str()).collect();
    let targets: Vec<&str> = batch.iter().map(|j| j.target.as_str()).collect();
    let ordering: Vec<&str> = batch.iter().map(|j| j.ordering_key.as_str()).collect();
    let dedupe: Vec<Option<&str>> = batch.iter().map(|j| j.dedupe_key.as_deref()).collect();
    let payloads: Vec<&Json> = batch.iter().map(|j| &j.payload).collect();
    let run_at: Vec<Option<DateTime<Utc>>> = batch.iter().map(|j| j.run_at).collect();
    let result = sqlx::query(
        "WITH target_rows AS (
             INSERT INTO outbox_target_leases (target)
             SELECT DISTINCT t FROM unnest($2::text[]) AS t ON CONFLICT DO NOTHING
         ), wake AS (
             SELECT count(pg_notify($7, t)) AS n FROM (SELECT DISTINCT unnest($2::text[]) AS t) AS d
         )
         INSERT INTO outbox_jobs (kind, target, ordering_key, dedupe_key, payload, run_at)
         SELECT k, t, o, d, p, r
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::timestamptz[])
              WITH ORDINALITY AS j(k, t, o, d, p, r, n), wake
         ORDER BY j.n
         ON CONFLICT (dedupe_key) WHERE state = 'pending' AND dedupe_key IS NOT NULL
         DO UPDATE SET payload = EXCLUDED.payload, updated_at = now()",
    )
    .bind(&kinds)
    .bind(&targets)
    .bind(&ordering)
    .bind(&dedupe)
    .bind(&payloads)
    .bind(&run_at)
    .bind(NOTIFY_CHANNEL)
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected())
}

/// Claims up to `limit` due jobs of `target` for `owner`, but only while `owner`
/// holds the target's lease, and only of the `kinds` it has handlers for (a job
/// no replica can run yet waits, e.g. during a rolling upgrade). A job is due
/// when it is pending, its `run_at` has passed, and no earlier job with its
/// ordering key is still pending or running.
pub async fn claim(
    pool: &PgPool,
    target: &str,
    owner: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: i64,
    kinds: &[String],
) -> Result<Vec<ClaimedJob>, StoreError> {
    let jobs = sqlx::query_as::<_, ClaimedJob>(
        "WITH candidates AS (
             SELECT j.id FROM outbox_jobs j
             WHERE j.target = $1 AND j.state = 'pending' AND j.kind = ANY($6)
               AND (j.run_at IS NULL OR j.run_at <= $3)
               AND EXISTS (SELECT 1 FROM outbox_target_leases l
                           WHERE l.target = $1 AND l.owner = $2 AND l.expires_at > $3)
               AND NOT EXISTS (SELECT 1 FROM outbox_jobs e
                               WHERE e.ordering_key = j.ordering_key AND e.id < j.id
                                 AND e.state IN ('pending', 'running'))
             ORDER BY j.id
             LIMIT $5
             FOR UPDATE SKIP LOCKED
         )
         UPDATE outbox_jobs j
         SET state = 'running', attempts = j.attempts + 1, locked_by = $2,
             lease_until = $4, started_at = $3, updated_at = now()
         FROM candidates c WHERE j.id = c.id
         RETURNING j.id, j.kind, j.target, j.ordering_key, j.payload, j.attempts, j.failures",
    )
    .bind(target)
    .bind(owner)
    .bind(now)
    .bind(lease_until)
    .bind(limit)
    .bind(kinds)
    .fetch_all(pool)
    .await?;
    Ok(jobs)
}

/// Writes a batch of attempt endings. Each is fenced: it applies only while the
/// job is still running under `owner` with the same attempt number, so a worker
/// that lost its lease cannot overwrite the new owner's outcome. Returns the ids
/// whose completion was applied.
pub async fn complete(
    pool: &PgPool,
    owner: &str,
    completions: &[Completion],
) -> Result<Vec<i64>, StoreError> {
    let (successes, others): (Vec<&Completion>, Vec<&Completion>) = completions
        .iter()
        .partition(|c| matches!(c.finish, Finish::Success));
    let mut applied = Vec::with_capacity(completions.len());
    if !successes.is_empty() {
        let ids: Vec<i64> = successes.iter().map(|c| c.job_id).collect();
        let attempts: Vec<i32> = successes.iter().map(|c| c.attempt).collect();
        let started: Vec<DateTime<Utc>> = successes.iter().map(|c| c.started_at).collect();
        let finished: Vec<DateTime<Utc>> = successes.iter().map(|c| c.finished_at).collect();
        let remarks: Vec<Option<&str>> = successes.iter().map(|c| c.remark.as_deref()).collect();
        let done: Vec<i64> = sqlx::query_scalar(
            "WITH f AS (
                 SELECT * FROM unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::timestamptz[], $6::text[])
                     AS f(id, attempt, started_at, finished_at, remark)
             ), d AS (
                 DELETE FROM outbox_jobs j USING f
                 WHERE j.id = f.id AND j.attempts = f.attempt AND j.state = 'running' AND j.locked_by = $5
                 RETURNING j.id, j.attempts, j.kind, j.target, j.ordering_key
             )
             INSERT INTO outbox_attempts (job_id, attempt, kind, target, ordering_key, started_at, finished_at, outcome, error)
             SELECT d.id, d.attempts, d.kind, d.target, d.ordering_key, f.started_at, f.finished_at, 'success', f.remark
             FROM d JOIN f ON f.id = d.id
             RETURNING job_id",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&started)
        .bind(&finished)
        .bind(owner)
        .bind(&remarks)
        .fetch_all(pool)
        .await?;
        applied.extend(done);
    }
    if !others.is_empty() {
        let mut tx = pool.begin().await?;
        applied.extend(finish_unsuccessful(&mut tx, owner, &others).await?);
        tx.commit().await?;
    }
    Ok(applied)
}

async fn finish_unsuccessful(
    tx: &mut Transaction<'_, Postgres>,
    owner: &str,
    batch: &[&Completion],
) -> Result<Vec<i64>, StoreError> {
    let ids: Vec<i64> = batch.iter().map(|c| c.job_id).collect();
    let attempts: Vec<i32> = batch.iter().map(|c| c.attempt).collect();
    let started: Vec<DateTime<Utc>> = batch.iter().map(|c| c.started_at).collect();
    let finished: Vec<DateTime<Utc>> = batch.iter().map(|c| c.finished_at).collect();
    let outcomes: Vec<&str> = batch.iter().map(|c| c.finish.outcome()).collect();
    let run_at: Vec<Option<DateTime<Utc>>> = batch
        .iter()
        .map(|c| match &c.finish {
            Finish::Retry { run_at, .. } | Finish::Waiting { run_at, .. } => Some(*run_at),
            _ => None,
        })
        .collect();
    let errors: Vec<Option<&str>> = batch
        .iter()
        .map(|c| match &c.finish {
            Finish::Retry { error, .. } | Finish::Dead { error } => Some(error.as_str()),
            Finish::Waiting { reason, .. } => Some(reason.as_str()),
            Finish::Success | Finish::Released => None,
        })
        .collect();

    let arrays = FinishArrays {
        ids,
        attempts,
        started,
        finished,
        outcomes,
        run_at,
        errors,
        owner,
    };
    // A job going back to pending while a newer pending job holds its dedupe key
    // is folded into that job (same intent, level-triggered): the newer job takes
    // over the backoff and failure count, the older one is removed.
    let mut applied: Vec<i64> = bind_unsuccessful(sqlx::query_scalar(
        "WITH f AS (
             SELECT * FROM unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::timestamptz[],
                                  $5::text[], $6::timestamptz[], $7::text[])
                 AS f(id, attempt, started_at, finished_at, outcome, run_at, error)
         ), dup AS (
             SELECT j.id AS mine, p.id AS sibling, f.run_at, f.error,
                    j.failures + CASE WHEN f.outcome = 'released' THEN 0 ELSE 1 END AS failures
             FROM f
             JOIN outbox_jobs j ON j.id = f.id AND j.attempts = f.attempt
                               AND j.state = 'running' AND j.locked_by = $8
             JOIN outbox_jobs p ON p.dedupe_key = j.dedupe_key AND p.state = 'pending' AND p.id <> j.id
             WHERE f.outcome IN ('retry', 'released')
         ), merged AS (
             UPDATE outbox_jobs p
             SET run_at = CASE WHEN dup.run_at IS NULL THEN p.run_at
                               ELSE GREATEST(COALESCE(p.run_at, '-infinity'), dup.run_at) END,
                 -- The reason of the wait it takes over goes with it (a circuit
                 -- reset finds the jobs it put off by their last error).
                 last_error = CASE WHEN dup.run_at IS NOT NULL
                                        AND dup.run_at >= COALESCE(p.run_at, '-infinity')
                                   THEN COALESCE(dup.error, p.last_error)
                                   ELSE p.last_error END,
                 failures = GREATEST(p.failures, dup.failures), updated_at = now()
             FROM dup WHERE p.id = dup.sibling
         ), removed AS (
             DELETE FROM outbox_jobs j USING dup WHERE j.id = dup.mine
             RETURNING j.id, j.attempts, j.kind, j.target, j.ordering_key
         )
         INSERT INTO outbox_attempts (job_id, attempt, kind, target, ordering_key, started_at, finished_at, outcome, error)
         SELECT r.id, r.attempts, r.kind, r.target, r.ordering_key, f.started_at, f.finished_at, f.outcome,
                concat_ws(' ', f.error, '(folded into a newer pending job with the same dedupe key)')
         FROM removed r JOIN f ON f.id = r.id
         RETURNING job_id",
        ),
        &arrays,
    )
    .fetch_all(&mut **tx)
    .await?;

    let rest: Vec<i64> = bind_unsuccessful(sqlx::query_scalar(
        "WITH f AS (
             SELECT * FROM unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::timestamptz[],
                                  $5::text[], $6::timestamptz[], $7::text[])
                 AS f(id, attempt, started_at, finished_at, outcome, run_at, error)
         ), u AS (
             UPDATE outbox_jobs j
             SET state = CASE WHEN f.outcome = 'dead' THEN 'dead' ELSE 'pending' END,
                 failures = j.failures + CASE WHEN f.outcome = 'released' THEN 0 ELSE 1 END,
                 run_at = f.run_at,
                 last_error = COALESCE(f.error, j.last_error),
                 locked_by = NULL, lease_until = NULL, updated_at = now()
             FROM f
             WHERE j.id = f.id AND j.attempts = f.attempt AND j.state = 'running' AND j.locked_by = $8
             RETURNING j.id, j.attempts, j.kind, j.target, j.ordering_key
         )
         INSERT INTO outbox_attempts (job_id, attempt, kind, target, ordering_key, started_at, finished_at, outcome, error)
         SELECT u.id, u.attempts, u.kind, u.target, u.ordering_key, f.started_at, f.finished_at, f.outcome, f.error
         FROM u JOIN f ON f.id = u.id
         RETURNING job_id",
        ),
        &arrays,
    )
    .fetch_all(&mut **tx)
    .await?;
    applied.extend(rest);
    Ok(applied)
}

/// The columns of a batch of unsuccessful attempt endings, bound as arrays.
struct FinishArrays<'a> {
    ids: Vec<i64>,
    attempts: Vec<i32>,
    started: Vec<DateTime<Utc>>,
    finished: Vec<DateTime<Utc>>,
    outcomes: Vec<&'a str>,
    run_at: Vec<Option<DateTime<Utc>>>,
    errors: Vec<Option<&'a str>>,
    owner: &'a str,
}

/// Binds `$1..$8` of the two statements of [`finish_unsuccessful`].
fn bind_unsuccessful<'q>(
    query: sqlx::query::QueryScalar<'q, Postgres, i64, sqlx::postgres::PgArguments>,
    a: &'q FinishArrays<'q>,
) -> sqlx::query::QueryScalar<'q, Postgres, i64, sqlx::postgres::PgArguments> {
    query
        .bind(&a.ids)
        .bind(&a.attempts)
        .bind(&a.started)
        .bind(&a.finished)
        .bind(&a.outcomes)
        .bind(&a.run_at)
        .bind(&a.errors)
        .bind(a.owner)
}

/// Extends the leases of jobs `owner` is still running (id, attempt pairs).
pub async fn renew_job_leases(
    pool: &PgPool,
    owner: &str,
    running: &[(i64, i32)],
    lease_until: DateTime<Utc>,
) -> Result<u64, StoreError> {
    if running.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = running.iter().map(|r| r.0).collect();
    let attempts: Vec<i32> = running.iter().map(|r| r.1).collect();
    // Rows are locked in id order, and a row another statement holds (the
    // finisher ending it) is skipped: no deadlock with a batch of completions,
    // and a job being finished needs no longer lease.
    let result = sqlx::query(
        "WITH mine AS MATERIALIZED (
             SELECT j.id FROM outbox_jobs j
             WHERE j.id = ANY($1) AND j.state = 'running' AND j.locked_by = $3
               AND (j.id, j.attempts) IN (SELECT * FROM unnest($1::bigint[], $2::int[]))
             ORDER BY j.id
             FOR UPDATE OF j SKIP LOCKED
         )
         UPDATE outbox_jobs j SET lease_until = $4 FROM mine WHERE j.id = mine.id",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(owner)
    .bind(lease_until)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Returns jobs of `targets` whose lease expired to pending, recording the
/// lost attempt: as a failure when its worker's replica lived on without
/// renewing it, as a lost worker (not a failure) when the replica died
/// first; a job out of attempts (`max_failures` failures, or three times as
/// many lost workers) is dead-lettered. Returns how many jobs were reaped.
pub async fn reap_expired(
    pool: &PgPool,
    targets: &[String],
    now: DateTime<Utc>,
    max_failures: i32,
) -> Result<u64, StoreError> {
    if targets.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    // Expired jobs whose dedupe key has a newer pending job are folded into it.
    let folded = sqlx::query(
        "WITH x AS (
             SELECT j.id, p.id AS sibling, j.failures + 1 AS failures
             FROM outbox_jobs j
             JOIN outbox_jobs p ON p.dedupe_key = j.dedupe_key AND p.state = 'pending' AND p.id <> j.id
             WHERE j.target = ANY($1) AND j.state = 'running' AND j.lease_until < $2
             FOR UPDATE OF j SKIP LOCKED
         ), merged AS (
             UPDATE outbox_jobs p SET failures = GREATEST(p.failures, x.failures), updated_at = now()
             FROM x WHERE p.id = x.sibling
         ), removed AS (
             DELETE FROM outbox_jobs j USING x WHERE j.id = x.id
             RETURNING j.id, j.attempts, j.kind, j.target, j.ordering_key, j.started_at
         )
         INSERT INTO outbox_attempts (job_id, attempt, kind, target, ordering_key, started_at, finished_at, outcome, error)
         SELECT id, attempts, kind, target, ordering_key, COALESCE(started_at, $2), $2, 'lease_expired',
                'lease expired: the worker stopped renewing it (folded into a newer pending job)'
         FROM removed",
    )
    .bind(targets)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // A lease runs out either because its worker's process died (its
    // replica's last heartbeat came before the lease's end: not the job's
    // failure, counted in lost_workers) or because the process lived on
    // without renewing it (a failure).
    let reaped = sqlx::query(
        "WITH x AS (
             SELECT j.id, NOT EXISTS (
                 SELECT 1 FROM outbox_replicas r
                 WHERE r.owner = j.locked_by AND r.last_seen >= j.lease_until
             ) AS died
             FROM outbox_jobs j
             WHERE j.target = ANY($1) AND j.state = 'running' AND j.lease_until < $2
             FOR UPDATE OF j SKIP LOCKED
         ), u AS (
             UPDATE outbox_jobs j
             SET state = CASE WHEN (NOT x.died AND j.failures + 1 >= $3)
                               OR (x.died AND j.lost_workers + 1 >= $3 * 3)
                              THEN 'dead' ELSE 'pending' END,
                 failures = j.failures + CASE WHEN x.died THEN 0 ELSE 1 END,
                 lost_workers = j.lost_workers + CASE WHEN x.died THEN 1 ELSE 0 END,
                 last_error = CASE WHEN x.died
                     THEN 'lease expired: the process running attempt ' || j.attempts
                          || ' died (' || (j.lost_workers + 1) || ' such losses; not a failure of the job)'
                     ELSE 'lease expired: the worker running attempt ' || j.attempts
                          || ' stopped renewing it' END,
                 locked_by = NULL, lease_until = NULL, run_at = NULL, updated_at = now()
             FROM x WHERE j.id = x.id
             RETURNING j.id, j.attempts, j.kind, j.target, j.ordering_key, j.started_at, j.last_error
         )
         INSERT INTO outbox_attempts (job_id, attempt, kind, target, ordering_key, started_at, finished_at, outcome, error)
         SELECT id, attempts, kind, target, ordering_key, COALESCE(started_at, $2), $2, 'lease_expired', last_error
         FROM u",
    )
    .bind(targets)
    .bind(now)
    .bind(max_failures)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(folded + reaped)
}

/// Records that `owner` is alive and returns (live replicas, known targets).
pub async fn replica_heartbeat(
    pool: &PgPool,
    owner: &str,
    now: DateTime<Utc>,
    alive_since: DateTime<Utc>,
) -> Result<(i64, i64), StoreError> {
    let row: (i64, i64) = sqlx::query_as(
        "WITH me AS (
             INSERT INTO outbox_replicas (owner, last_seen) VALUES ($1, $2)
             ON CONFLICT (owner) DO UPDATE SET last_seen = EXCLUDED.last_seen
         )
         SELECT (SELECT count(*) FROM outbox_replicas WHERE last_seen > $3 AND owner <> $1) + 1,
                (SELECT count(*) FROM outbox_target_leases)",
    )
    .bind(owner)
    .bind(now)
    .bind(alive_since)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// Forgets a replica (graceful shutdown).
pub async fn replica_gone(pool: &PgPool, owner: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM outbox_replicas WHERE owner = $1")
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// Renews `owner`'s unexpired target leases, then takes free or expired ones
/// until it holds `share`. Returns every target `owner` holds afterwards.
pub async fn acquire_targets(
    pool: &PgPool,
    owner: &str,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    share: i64,
) -> Result<Vec<String>, StoreError> {
    let mut held: Vec<String> = sqlx::query_scalar(
        "UPDATE outbox_target_leases SET expires_at = $3
         WHERE owner = $1 AND expires_at > $2
         RETURNING target",
    )
    .bind(owner)
    .bind(now)
    .bind(expires_at)
    .fetch_all(pool)
    .await?;
    let room = share - held.len() as i64;
    if room > 0 {
        let taken: Vec<String> = sqlx::query_scalar(
            "WITH free AS (
                 SELECT target FROM outbox_target_leases
                 WHERE owner IS NULL OR expires_at <= $2
                 ORDER BY target LIMIT $4
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE outbox_target_leases l SET owner = $1, expires_at = $3
             FROM free WHERE l.target = free.target
             RETURNING l.target",
        )
        .bind(owner)
        .bind(now)
        .bind(expires_at)
        .bind(room)
        .fetch_all(pool)
        .await?;
        held.extend(taken);
    }
    held.sort();
    Ok(held)
}

/// Gives up some of `owner`'s target leases (its share shrank).
pub async fn release_some_targets(
    pool: &PgPool,
    owner: &str,
    targets: &[String],
) -> Result<u64, StoreError> {
    let result = sqlx::query(
        "UPDATE outbox_target_leases SET owner = NULL, expires_at = '-infinity'
         WHERE owner = $1 AND target = ANY($2)",
    )
    .bind(owner)
    .bind(targets)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Gives up every target lease of `owner` at once (graceful shutdown).
pub async fn release_targets(pool: &PgPool, owner: &str) -> Result<u64, StoreError> {
    let result = sqlx::query(
        "UPDATE outbox_target_leases SET owner = NULL, expires_at = '-infinity' WHERE owner = $1",
    )
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Dead-letters pending jobs of `targets` whose kind none of `kinds` is, once
/// they are older than `grace` (a rolling deploy's newer replica, which has
/// the handler, had that long to take them), with a reason that says so.
/// Returns how many.
pub async fn dead_letter_unhandled(
    pool: &PgPool,
    targets: &[String],
    kinds: &[String],
    grace: std::time::Duration,
) -> Result<u64, StoreError> {
    let grace_s = grace.as_secs_f64();
    let rows: Vec<i64> = sqlx::query_scalar(
        "WITH dead AS (
             UPDATE outbox_jobs
             SET state = 'dead', updated_at = now(),
                 last_error = format('no handler for kind `%s` in this build: no replica ran it within %s s of its creation', kind, $3::float8::text)
             WHERE state = 'pending' AND target = ANY($1) AND NOT (kind = ANY($2))
               AND created_at < now() - make_interval(secs => $3)
             RETURNING id, attempts, kind, target, ordering_key, last_error
         )
         INSERT INTO outbox_attempts (job_id, attempt, kind, target, ordering_key, started_at, finished_at, outcome, error)
         SELECT id, attempts, kind, target, ordering_key, now(), now(), 'dead', last_error FROM dead
         ON CONFLICT DO NOTHING
         RETURNING job_id",
    )
    .bind(targets)
    .bind(kinds)
    .bind(grace_s)
    .fetch_all(pool)
    .await?;
    Ok(rows.len() as u64)
}

/// Makes pending jobs that wait with a reason starting with `reason_prefix`
/// due now (their precondition came true). Returns how many.
pub async fn release_waiting(pool: &PgPool, reason_prefix: &str) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE outbox_jobs SET run_at = NULL, updated_at = now()
         WHERE state = 'pending' AND run_at IS NOT NULL AND starts_with(last_error, $1)",
    )
    .bind(reason_prefix)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Whether a job of `kind` with this ordering key is pending or running.
pub async fn has_unfinished(
    pool: &PgPool,
    kind: &str,
    ordering_key: &str,
) -> Result<bool, StoreError> {
    let found: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox_jobs
                        WHERE ordering_key = $2 AND kind = $1 AND state IN ('pending', 'running'))",
    )
    .bind(kind)
    .bind(ordering_key)
    .fetch_one(pool)
    .await?;
    Ok(found)
}

/// Makes sure targets have lease rows (so the engine shares and leases them
/// even before their first job: a shop's poller runs under its lease).
pub async fn ensure_targets(pool: &PgPool, targets: &[String]) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO outbox_target_leases (target) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(targets)
    .execute(pool)
    .await?;
    Ok(())
}

/// Who holds a target's lease, if anyone holds it now.
pub async fn target_owner(
    pool: &PgPool,
    target: &str,
    now: DateTime<Utc>,
) -> Result<Option<String>, StoreError> {
    let owner: Option<Option<String>> = sqlx::query_scalar(
        "SELECT owner FROM outbox_target_leases WHERE target = $1 AND expires_at > $2",
    )
    .bind(target)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    Ok(owner.flatten())
}

/// Jobs by state (`pending`, `running`, `dead`).
/// Every state is listed, with 0 where there are none, so gauges never go stale.
pub async fn depth(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT s.state, count(j.id)
         FROM (VALUES ('pending'), ('running'), ('dead')) AS s(state)
         LEFT JOIN outbox_jobs j ON j.state = s.state
         GROUP BY s.state ORDER BY s.state",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Whether no job is left at all (pending, running or dead).
pub async fn is_empty(pool: &PgPool) -> Result<bool, StoreError> {
    let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox_jobs)")
        .fetch_one(pool)
        .await?;
    Ok(!any)
}

/// Dead-lettered jobs, newest first.
pub async fn list_dead(pool: &PgPool, limit: i64) -> Result<Vec<DeadJob>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT id, kind, target, ordering_key, attempts, last_error, created_at, updated_at
         FROM outbox_jobs WHERE state = 'dead' ORDER BY updated_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// What replaying a dead job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Back in the queue with a fresh retry schedule.
    Requeued,
    /// A pending job with the same dedupe key already carries the same intent;
    /// the dead one was removed.
    Superseded {
        by: i64,
    },
    NotFound,
}

/// Puts one dead job back in the queue.
pub async fn replay_dead(pool: &PgPool, id: i64) -> Result<Replay, StoreError> {
    let mut tx = pool.begin().await?;
    let row: Option<(Option<String>, String)> = sqlx::query_as(
        "SELECT dedupe_key, target FROM outbox_jobs WHERE id = $1 AND state = 'dead' FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((dedupe_key, target)) = row else {
        return Ok(Replay::NotFound);
    };
    if let Some(key) = dedupe_key {
        let sibling: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM outbox_jobs WHERE dedupe_key = $1 AND state = 'pending'",
        )
        .bind(&key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(by) = sibling {
            record_and_delete(&mut tx, id, "superseded by pending job on replay").await?;
            tx.commit().await?;
            return Ok(Replay::Superseded { by });
        }
    }
    sqlx::query(
        "UPDATE outbox_jobs SET state = 'pending', failures = 0, run_at = NULL, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(&target)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Replay::Requeued)
}

/// Replays every dead job; returns (requeued, superseded).
pub async fn replay_all_dead(pool: &PgPool) -> Result<(u64, u64), StoreError> {
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM outbox_jobs WHERE state = 'dead' ORDER BY id")
            .fetch_all(pool)
            .await?;
    let (mut requeued, mut superseded) = (0, 0);
    for id in ids {
        match replay_dead(pool, id).await? {
            Replay::Requeued => requeued += 1,
            Replay::Superseded { .. } => superseded += 1,
            Replay::NotFound => {}
        }
    }
    Ok((requeued, superseded))
}

/// Removes a dead job for good (its attempts stay, plus a `discarded` record).
pub async fn discard_dead(pool: &PgPool, id: i64) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let found = record_and_delete(&mut tx, id, "discarded by an operator").await?;
    tx.commit().await?;
    Ok(found)
}

async fn record_and_delete(
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
    why: &str,
) -> Result<bool, StoreError> {
    let deleted = sqlx::query(
        "WITH d AS (
             DELETE FROM outbox_jobs WHERE id = $1 AND state = 'dead'
             RETURNING id, attempts, kind, target, ordering_key, last_error
         )
         INSERT INTO outbox_attempts (job_id, attempt, kind, target, ordering_key, started_at, finished_at, outcome, error)
         SELECT id, attempts, kind, target, ordering_key, now(), now(), 'discarded',
                $2 || COALESCE(' (last error: ' || last_error || ')', '')
         FROM d",
    )
    .bind(id)
    .bind(why)
    .execute(&mut **tx)
    .await?;
    Ok(deleted.rows_affected() > 0)
}

/// One job's stored row.
pub async fn job(pool: &PgPool, id: i64) -> Result<Option<JobRow>, StoreError> {
    let row = sqlx::query_as(
        "SELECT id, kind, target, ordering_key, dedupe_key, payload, state, attempts, failures,
                run_at, locked_by, last_error
         FROM outbox_jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Every job in the table with `state`, oldest first.
pub async fn jobs_in_state(pool: &PgPool, state: &str) -> Result<Vec<JobRow>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT id, kind, target, ordering_key, dedupe_key, payload, state, attempts, failures,
                run_at, locked_by, last_error
         FROM outbox_jobs WHERE state = $1 ORDER BY id",
    )
    .bind(state)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The recorded attempts of one job, in order.
pub async fn attempts_of(pool: &PgPool, job_id: i64) -> Result<Vec<AttemptRecord>, StoreError> {
    let rows = sqlx::query_as(
        "SELECT job_id, attempt, kind, target, started_at, finished_at, outcome, error
         FROM outbox_attempts WHERE job_id = $1 ORDER BY attempt, finished_at",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
