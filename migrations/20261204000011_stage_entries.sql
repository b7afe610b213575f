-- Every stage a lead entered, with its source (marketplace: the order's status
-- moved it; manager: a manager's move; bridge: the bridge's own repair), its
-- responsible, when it was left, and its SLA timers: the warning and the
-- breach instants, and when each fired (set in the same transaction that
-- queues the amoCRM task, so each fires exactly once, across restarts and
-- replicas). Leaving the stage ends its timers.
CREATE TABLE stage_entries (
    id                  BIGSERIAL   PRIMARY KEY,
    order_id            BIGINT      NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    crm_account         TEXT        NOT NULL,
    lead_id             BIGINT      NOT NULL,
    pipeline_id         BIGINT      NOT NULL,
    status_id           BIGINT      NOT NULL,
    stage               TEXT        NOT NULL,
    role                TEXT,
    source              TEXT        NOT NULL CHECK (source IN ('marketplace', 'manager', 'bridge')),
    responsible_user_id BIGINT,
    entered_at          TIMESTAMPTZ NOT NULL,
    left_at             TIMESTAMPTZ,
    warn_at             TIMESTAMPTZ,
    deadline            TIMESTAMPTZ,
    warned_at           TIMESTAMPTZ,
    breached_at         TIMESTAMPTZ
);
CREATE UNIQUE INDEX stage_entries_open_idx ON stage_entries (order_id) WHERE left_at IS NULL;
CREATE INDEX stage_entries_warn_idx ON stage_entries (warn_at) WHERE left_at IS NULL AND warned_at IS NULL;
CREATE INDEX stage_entries_deadline_idx ON stage_entries (deadline) WHERE left_at IS NULL AND breached_at IS NULL;
CREATE INDEX stage_entries_load_idx ON stage_entries (crm_account, responsible_user_id) WHERE left_at IS NULL;
