-- One request slot per rate-limited target, shared by every replica: a
-- request reserves the next free moment (`next_at` moves one spacing on),
-- so replicas on one database together stay within the target's quota.
CREATE TABLE rate_slots (
    target  TEXT        PRIMARY KEY,
    next_at TIMESTAMPTZ NOT NULL
);
