-- CRM → marketplace intake: what the bridge sets on leads (to recognise its own
-- echoes), which change from the CRM each link has applied last (to drop late
-- and duplicate deliveries), Kaspi's two-step completion, and why an inbox item
-- led to nothing. See src/store/{links,inbox}.rs.

-- Every stage the bridge is about to set on a lead, recorded BEFORE the request,
-- so that a webhook racing the PATCH is still recognised as an echo. Kept a day
-- (longer than any events-poll overlap), then pruned.
CREATE TABLE crm_pushes (
    id          BIGSERIAL   PRIMARY KEY,
    crm_account TEXT        NOT NULL,
    lead_id     BIGINT      NOT NULL,
    pipeline_id BIGINT      NOT NULL,
    status_id   BIGINT      NOT NULL,
    intended_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The reported change (its CRM time, Unix seconds) taken for this push's
    -- echo: further reports of that same change match it too, a later change
    -- of the lead does not.
    echo_change_at BIGINT,
    echoed_at      TIMESTAMPTZ
);
CREATE INDEX crm_pushes_lead_idx ON crm_pushes (crm_account, lead_id, intended_at);

ALTER TABLE crm_links
    -- Unix seconds of the newest CRM change applied to this link (webhook
    -- `last_modified` / event `created_at`): an older report is stale.
    ADD COLUMN crm_changed_at      BIGINT,
    -- When a manager's move was recorded (a bridge push that began earlier does
    -- not overwrite it).
    ADD COLUMN manager_moved_at    TIMESTAMPTZ,
    -- Kaspi completion step 1 was sent: waiting for the buyer's code in the lead.
    ADD COLUMN awaiting_code_since TIMESTAMPTZ,
    -- The last code the bridge tried (a wrong one is not tried twice).
    ADD COLUMN code_tried          TEXT;
CREATE INDEX crm_links_awaiting_code_idx ON crm_links (crm_account) WHERE awaiting_code_since IS NOT NULL;

-- What processing an inbox item led to: 'action', 'echo', 'duplicate', 'stale',
-- or 'ignored: <reason>'.
ALTER TABLE inbox ADD COLUMN outcome TEXT;
