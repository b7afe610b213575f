-- amoCRM connector state: OAuth token pairs, circuit breakers, and the inbox of
-- received webhooks. See src/store/{tokens,circuits,inbox}.rs.

-- The rotating OAuth pair of one CRM account. A refresh runs under this row's
-- lock and commits the new pair before anything uses it.
CREATE TABLE oauth_tokens (
    account                 TEXT PRIMARY KEY,
    access_token            TEXT,
    access_expires_at       TIMESTAMPTZ,
    refresh_token           TEXT NOT NULL,
    -- The pair's predecessor: amoCRM accepts it until the new one is first used.
    previous_refresh_token  TEXT,
    refreshed_at            TIMESTAMPTZ,
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- An open circuit stops all traffic to a target (e.g. amoCRM answered 403: the
-- IP is blocked). Deleting the row (orderbridge circuit reset) closes it.
CREATE TABLE circuits (
    target     TEXT PRIMARY KEY,
    opened_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    open_until TIMESTAMPTZ NOT NULL,
    reason     TEXT NOT NULL
);

-- What arrived from outside (webhooks, polled events), stored before it is acted on.
CREATE TABLE inbox (
    id           BIGSERIAL PRIMARY KEY,
    source       TEXT        NOT NULL,          -- 'amocrm', 'avito', …
    account      TEXT        NOT NULL,          -- configured account name
    kind         TEXT        NOT NULL,          -- e.g. 'lead_status', 'lead_update'
    dedupe_key   TEXT        NOT NULL UNIQUE,
    payload      JSONB       NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at TIMESTAMPTZ
);
CREATE INDEX inbox_unprocessed_idx ON inbox (id) WHERE processed_at IS NULL;
