-- Avito messenger leads: which CRM lead (and contact) each chat became, so the
-- buyer's later messages become notes on it and a returning buyer keeps one
-- contact. See src/store/inbox.rs and src/sync/messenger_leads.rs.
ALTER TABLE avito_chats
    ADD COLUMN crm_account TEXT,
    ADD COLUMN lead_id     BIGINT,
    ADD COLUMN contact_id  BIGINT;
CREATE INDEX avito_chats_buyer_idx ON avito_chats (account, buyer_id) WHERE contact_id IS NOT NULL;
