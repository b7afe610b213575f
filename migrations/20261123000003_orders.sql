-- Marketplace orders as the bridge last saw them, their stage history, and the
-- pollers' cursors. See src/store/orders.rs.

CREATE TABLE orders (
    id               BIGSERIAL PRIMARY KEY,
    marketplace      TEXT        NOT NULL,          -- 'kaspi', 'avito'
    account          TEXT        NOT NULL,          -- shop name in config
    external_id      TEXT        NOT NULL,          -- the marketplace's opaque id
    code             TEXT        NOT NULL,          -- the number people see
    status_key       TEXT        NOT NULL,          -- derived connector status key (see the maps)
    raw_state        TEXT,
    raw_status       TEXT,
    is_terminal      BOOLEAN     NOT NULL,
    content_hash     TEXT        NOT NULL,          -- hash of the order minus volatile fields
    snapshot         JSONB       NOT NULL,          -- the domain order
    source_created_at TIMESTAMPTZ NOT NULL,
    first_seen_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (marketplace, account, external_id)
);
CREATE INDEX orders_active_idx ON orders (marketplace, account, source_created_at) WHERE NOT is_terminal;
CREATE INDEX orders_code_idx ON orders (marketplace, account, code);

-- Every status key an order has been seen in, in order.
CREATE TABLE order_stage_history (
    id          BIGSERIAL PRIMARY KEY,
    order_id    BIGINT      NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    from_key    TEXT,
    to_key      TEXT        NOT NULL,
    raw_state   TEXT,
    raw_status  TEXT,
    observed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX order_stage_history_order_idx ON order_stage_history (order_id, id);

-- Where each poller is: the last window it fully listed, and how the last poll ended.
CREATE TABLE poll_cursors (
    marketplace      TEXT NOT NULL,
    account          TEXT NOT NULL,
    listed_until     TIMESTAMPTZ,                  -- end of the last fully listed window
    last_started_at  TIMESTAMPTZ,
    last_success_at  TIMESTAMPTZ,
    last_error       TEXT,
    PRIMARY KEY (marketplace, account)
);
