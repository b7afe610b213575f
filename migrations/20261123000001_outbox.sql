-- The outbox engine's tables: jobs, their attempts, and per-target leases.
-- See src/store/outbox.rs for every query that touches them.

-- A unit of work: "make target X reflect the current state of ordering key Y".
-- Finished jobs are deleted (their history stays in outbox_attempts); dead
-- jobs stay here with state = 'dead' until replayed or discarded.
CREATE TABLE outbox_jobs (
    id            BIGSERIAL PRIMARY KEY,
    kind          TEXT        NOT NULL,           -- handler name
    target        TEXT        NOT NULL,           -- rate-limit and lease key, e.g. "amocrm:main"
    ordering_key  TEXT        NOT NULL,           -- jobs sharing it run one at a time, oldest first
    dedupe_key    TEXT,                           -- at most one pending job per key
    payload       JSONB       NOT NULL,
    state         TEXT        NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'running', 'dead')),
    attempts      INTEGER     NOT NULL DEFAULT 0, -- claims so far; also the fencing token
    failures      INTEGER     NOT NULL DEFAULT 0, -- failed attempts; drives the retry schedule
    run_at        TIMESTAMPTZ,                    -- NULL: due now
    locked_by     TEXT,                           -- replica id while running
    lease_until   TIMESTAMPTZ,
    started_at    TIMESTAMPTZ,                    -- start of the current attempt
    last_error    TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Claim scan: pending jobs of one target in enqueue order.
CREATE INDEX outbox_jobs_pending_idx ON outbox_jobs (target, id) WHERE state = 'pending';
-- Per-key FIFO check: is there an earlier unfinished job with the same ordering key?
CREATE INDEX outbox_jobs_ordering_idx ON outbox_jobs (ordering_key, id) WHERE state IN ('pending', 'running');
-- Dedupe: one pending job per dedupe key.
CREATE UNIQUE INDEX outbox_jobs_dedupe_idx ON outbox_jobs (dedupe_key) WHERE state = 'pending' AND dedupe_key IS NOT NULL;
-- Lease reaping and heartbeats.
CREATE INDEX outbox_jobs_running_idx ON outbox_jobs (target, lease_until) WHERE state = 'running';
-- Dead-letter listing.
CREATE INDEX outbox_jobs_dead_idx ON outbox_jobs (updated_at) WHERE state = 'dead';

-- One row per attempt: when it ran, how it ended, and why.
CREATE TABLE outbox_attempts (
    job_id       BIGINT      NOT NULL,
    attempt      INTEGER     NOT NULL,
    kind         TEXT        NOT NULL,
    target       TEXT        NOT NULL,
    ordering_key TEXT        NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ NOT NULL,
    outcome      TEXT        NOT NULL
                 CHECK (outcome IN ('success', 'retry', 'dead', 'lease_expired', 'released', 'discarded')),
    error        TEXT,
    PRIMARY KEY (job_id, attempt, outcome)
);
CREATE INDEX outbox_attempts_finished_idx ON outbox_attempts (finished_at);

-- A target (amoCRM account, Kaspi shop, Avito account/endpoint) is served by one
-- replica at a time so that its in-process rate limiter stays exact.
CREATE TABLE outbox_target_leases (
    target     TEXT PRIMARY KEY,
    owner      TEXT,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);

-- Live replicas, so that targets are shared fairly: each replica holds at most
-- ceil(targets / live replicas) target leases and gives back the excess.
CREATE TABLE outbox_replicas (
    owner     TEXT PRIMARY KEY,
    last_seen TIMESTAMPTZ NOT NULL
);
