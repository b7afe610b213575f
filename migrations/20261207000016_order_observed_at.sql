-- When the stored snapshot of an order was asked of its marketplace (the
-- request's start). A reading asked earlier than the stored one is older news
-- and is not written: a reconciliation page fetched before a poll's, or a
-- poll's page whose lines took a while, never turns an order back to a
-- status it has left. NULL: stored before this column (any reading wins).
ALTER TABLE orders ADD COLUMN observed_at TIMESTAMPTZ;
