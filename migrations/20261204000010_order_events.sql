-- What the bridge did for an order beyond its stage history, jobs and inbox
-- (which `orderbridge order show` reads directly): leads created, found again
-- or moved, notes written, marketplace actions sent and their answers,
-- reconciliation repairs. Written best-effort after the fact.
CREATE TABLE order_events (
    id       BIGSERIAL   PRIMARY KEY,
    order_id BIGINT      NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    kind     TEXT        NOT NULL,
    detail   TEXT        NOT NULL
);
CREATE INDEX order_events_order_idx ON order_events (order_id, at);
