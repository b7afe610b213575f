-- Whose turn it is in a round-robin role: one counter per CRM account and
-- role, taken atomically (no count over the stage history per assignment).
CREATE TABLE role_turns (
    crm_account TEXT   NOT NULL,
    role        TEXT   NOT NULL,
    turn        BIGINT NOT NULL,
    PRIMARY KEY (crm_account, role)
);
