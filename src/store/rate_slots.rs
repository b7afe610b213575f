//! SQL of `rate_slots`: request slots of a rate-limited target shared by all
//! replicas on one database (amoCRM counts an account's requests, whoever
//! sends them).

use std::time::Duration;

use sqlx::PgPool;

use super::StoreError;

/// Reserves the target's next request slot, `spacing` after the previous one
/// (or now, when the target has been quiet); returns how long to wait for it.
/// One statement on the database's clock, committed without waiting for the
/// WAL flush (a slot lost in a crash is only a slot skipped).
pub async fn reserve(
    pool: &PgPool,
    target: &str,
    spacing: Duration,
) -> Result<Duration, StoreError> {
    let spacing_us = i64::try_from(spacing.as_micros()).unwrap_or(i64::MAX);
    let wait_us: i64 = sqlx::query_scalar(
        "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)),
         slot AS (
             INSERT INTO rate_slots (target, next_at)
             SELECT $1, clock_timestamp() + make_interval(secs => $2::float8 / 1e6) FROM relaxed
             ON CONFLICT (target) DO UPDATE
             SET next_at = GREATEST(rate_slots.next_at, clock_timestamp())
                           + make_interval(secs => $2::float8 / 1e6)
             RETURNING next_at
         )
         SELECT GREATEST(0, (EXTRACT(EPOCH FROM (next_at - clock_timestamp())) * 1e6)::bigint - $2)
         FROM slot",
    )
    .bind(target)
    .bind(spacing_us)
    .fetch_one(pool)
    .await?;
    Ok(Duration::from_micros(wait_us.max(0) as u64))
}

/// Pushes the target's next slot to at least `pause` from now (a 429: every
/// replica waits); earlier reservations keep their slots.
pub async fn pause(pool: &PgPool, target: &str, pause: Duration) -> Result<(), StoreError> {
    let pause_us = i64::try_from(pause.as_micros()).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO rate_slots (target, next_at)
         VALUES ($1, clock_timestamp() + make_interval(secs => $2::float8 / 1e6))
         ON CONFLICT (target) DO UPDATE
         SET next_at = GREATEST(rate_slots.next_at, EXCLUDED.next_at)",
    )
    .bind(target)
    .bind(pause_us)
    .execute(pool)
    .await?;
    Ok(())
}
