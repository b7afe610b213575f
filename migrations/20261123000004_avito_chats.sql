-- Avito messenger chats that became CRM leads: a buyer's first message on an
-- item creates one lead intent per chat, never two.
CREATE TABLE avito_chats (
    account          TEXT        NOT NULL,
    chat_id          TEXT        NOT NULL,
    item_id          BIGINT,
    buyer_id         BIGINT,
    first_message_id TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account, chat_id)
);
