-- One reconciliation run (from `orderbridge reconcile` or the daemon's
-- periodic one): what it covers, how far it got, and what it found. The run is
-- carried out by the `reconcile` outbox job of the CRM account's target (so
-- its amoCRM reads share the daemon's limiter), or by the command itself when
-- no daemon serves the account.
CREATE TABLE reconcile_runs (
    id               BIGSERIAL   PRIMARY KEY,
    crm_account      TEXT        NOT NULL,
    shop             TEXT,                          -- NULL: every shop of the account
    since            TIMESTAMPTZ NOT NULL,
    dry_run          BOOLEAN     NOT NULL,
    origin           TEXT        NOT NULL CHECK (origin IN ('command', 'periodic')),
    requested_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    phase            TEXT,
    done             BIGINT      NOT NULL DEFAULT 0,
    total            BIGINT,
    summary          JSONB,
    cancel_requested BOOLEAN     NOT NULL DEFAULT false
);
CREATE INDEX reconcile_runs_account_idx ON reconcile_runs (crm_account, finished_at);
