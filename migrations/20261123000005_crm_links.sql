-- The bridge's side of each CRM lead: which lead an order became, its contact,
-- and the stage the bridge itself last set (to tell its own changes from a
-- manager's). And the CRM contacts the bridge knows, by normalised phone/email.

CREATE TABLE crm_links (
    order_id           BIGINT      PRIMARY KEY REFERENCES orders (id) ON DELETE CASCADE,
    crm_account        TEXT        NOT NULL,
    lead_id            BIGINT      NOT NULL,
    contact_id         BIGINT,
    pushed_pipeline_id BIGINT,
    pushed_status_id   BIGINT,
    pushed_at          TIMESTAMPTZ,
    -- The last stage came from a manager's move (not from the bridge).
    manager_moved      BOOLEAN     NOT NULL DEFAULT false,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX crm_links_lead_idx ON crm_links (crm_account, lead_id);

CREATE TABLE crm_contacts (
    crm_account TEXT   NOT NULL,
    contact_id  BIGINT NOT NULL,
    phone       TEXT,          -- E.164
    email       TEXT,          -- lower-cased
    PRIMARY KEY (crm_account, contact_id)
);
CREATE INDEX crm_contacts_phone_idx ON crm_contacts (crm_account, phone) WHERE phone IS NOT NULL;
CREATE INDEX crm_contacts_email_idx ON crm_contacts (crm_account, email) WHERE email IS NOT NULL;
