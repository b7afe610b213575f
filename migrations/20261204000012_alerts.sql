-- Alerts to on-call through the configured webhook, grouped by key: a
-- condition (a circuit open, a shop's polls failing, a refused map reload)
-- or a kind of event (SLA breaches, unassigned orders, dead letters) opens an
-- alert once; later occurrences only count; it is resolved once when the
-- condition ends (or no event of the kind came for a while). Each "open" and
-- "resolved" is one outbox job, queued in the transaction that changes the row.
CREATE TABLE alerts (
    key          TEXT        PRIMARY KEY,
    kind         TEXT        NOT NULL,
    opened_at    TIMESTAMPTZ NOT NULL,
    last_seen_at TIMESTAMPTZ NOT NULL,
    occurrences  BIGINT      NOT NULL DEFAULT 1,
    text         TEXT        NOT NULL,
    resolved_at  TIMESTAMPTZ
);
CREATE INDEX alerts_open_idx ON alerts (kind) WHERE resolved_at IS NULL;

-- How far the dead-letter watch has looked.
CREATE TABLE alert_cursors (
    name TEXT PRIMARY KEY,
    at   TIMESTAMPTZ NOT NULL
);
