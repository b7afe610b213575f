-- Buyout (trade-in) leads from a marketplace partner programme (src/store/partner.rs,
-- src/sync/partner.rs). `partner_leads`: one row per partner lead (source + the
-- partner's lead id, unique: a repeated lead is idempotent), what the partner sent
-- (as received and as read through the source's field map) and the amoCRM lead it
-- became. `partner_reports`: every status report owed to the partner, in the
-- order the stage changes happened, with the partner's answer (kept for the
-- weekly settlement).
CREATE TABLE partner_leads (
    id               BIGSERIAL PRIMARY KEY,
    source           TEXT        NOT NULL,
    partner_lead_id  TEXT        NOT NULL,
    crm_account      TEXT        NOT NULL,
    payload          JSONB       NOT NULL,
    fields           JSONB       NOT NULL,
    buyout_price     NUMERIC(14, 2),
    client_price     NUMERIC(14, 2),
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    lead_id          BIGINT,
    contact_id       BIGINT,
    -- The stage the lead is known to be in, and when it changed last (CRM time).
    status_id        BIGINT,
    changed_at       BIGINT,
    UNIQUE (source, partner_lead_id)
);
CREATE UNIQUE INDEX partner_leads_lead_idx ON partner_leads (crm_account, lead_id) WHERE lead_id IS NOT NULL;

CREATE TABLE partner_reports (
    id               BIGSERIAL PRIMARY KEY,
    partner_lead     BIGINT      NOT NULL REFERENCES partner_leads (id) ON DELETE CASCADE,
    source           TEXT        NOT NULL,
    stage_id         BIGINT      NOT NULL,
    stage            TEXT        NOT NULL,
    partner_status   TEXT        NOT NULL,
    -- When the stage changed in the CRM (or the lead was created), UTC.
    changed_at       TIMESTAMPTZ NOT NULL,
    sent_at          TIMESTAMPTZ,
    http_status      INTEGER,
    answer           TEXT,
    attempts         INTEGER     NOT NULL DEFAULT 0
);
CREATE INDEX partner_reports_lead_idx ON partner_reports (partner_lead, id);
CREATE INDEX partner_reports_week_idx ON partner_reports (source, changed_at);

-- Where each polled partner source is: the partner's cursor after the last page stored.
CREATE TABLE partner_cursors (
    source           TEXT PRIMARY KEY,
    cursor           TEXT,
    last_success_at  TIMESTAMPTZ,
    last_error       TEXT
);
