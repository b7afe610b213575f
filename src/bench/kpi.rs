//! `orderbridge bench kpi`: the KPIs computed over a seeded history of
//! 100,000 orders (over a day, three shops; accepted, completed and cancelled
//! ones, each with its status history, lead and stage entry), as the
//! dashboard's refresh computes them. Prints `kpi_orders`,
//! `kpi_compute_ms` (the median of 5 runs) and `kpi_compute_max_ms`.

use std::io::Write;
use std::time::Instant;

use secrecy::ExposeSecret;

use crate::config::Settings;
use crate::store::ScratchDatabase;

#[derive(Debug, Clone, clap::Args)]
pub struct KpiBenchArgs {
    #[arg(long, default_value_t = 100_000)]
    pub orders: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum KpiBenchError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub async fn run(
    settings: &Settings,
    args: &KpiBenchArgs,
    out: &mut impl Write,
) -> Result<(), KpiBenchError> {
    let admin = settings.database.url.expose_secret().to_string();
    crate::store::create_database_if_missing(&admin).await?;
    let db = ScratchDatabase::create(&admin, "orderbridge_bench", 4).await?;
    let result = measure(&db, args).await;
    db.drop_now().await?;
    let (median, max) = result?;
    writeln!(out, "kpi_orders: {}", args.orders)?;
    writeln!(out, "kpi_compute_ms: {median:.1}")?;
    writeln!(out, "kpi_compute_max_ms: {max:.1}")?;
    Ok(())
}

async fn measure(db: &ScratchDatabase, args: &KpiBenchArgs) -> Result<(f64, f64), KpiBenchError> {
    let pool = &db.pool;
    sqlx::query(
        "INSERT INTO orders (marketplace, account, external_id, code, status_key, is_terminal,
                             content_hash, snapshot, source_created_at, first_seen_at)
         SELECT 'kaspi', 'shop' || (g % 3), 'e' || g, 'c' || g,
                CASE WHEN g % 10 = 0 THEN 'cancelled' WHEN g % 10 < 6 THEN 'completed' ELSE 'accepted' END,
                g % 10 < 6, 'h',
                jsonb_build_object('cancellation_reason', CASE WHEN g % 10 = 0 THEN 'OUT_OF_STOCK' END),
                now() - (g % 1440) * interval '1 minute', now() - (g % 1440) * interval '1 minute'
         FROM generate_series(1, $1) g",
    )
    .bind(args.orders)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO order_stage_history (order_id, from_key, to_key, observed_at)
         SELECT id, NULL, 'new', first_seen_at FROM orders
         UNION ALL
         SELECT id, 'new', 'accepted', first_seen_at + ((id % 30) + 1) * interval '1 minute' FROM orders
         WHERE status_key <> 'cancelled'
         UNION ALL
         SELECT id, 'accepted', status_key, first_seen_at + ((id % 40) + 20) * interval '1 hour' FROM orders
         WHERE status_key IN ('completed', 'cancelled')",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO crm_links (order_id, crm_account, lead_id, created_at)
         SELECT id, 'main', id, first_seen_at + interval '2 seconds' FROM orders",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO stage_entries (order_id, crm_account, lead_id, pipeline_id, status_id, stage, role,
                                    source, responsible_user_id, entered_at, deadline, left_at)
         SELECT id, 'main', id, 1, 1, 'Новая заявка', 'sales', 'marketplace', 7, first_seen_at,
                first_seen_at + interval '15 minutes', first_seen_at + ((id % 30) + 1) * interval '1 minute'
         FROM orders",
    )
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let now = chrono::Utc::now();
        let started = Instant::now();
        crate::sla::kpi::compute(pool, now - chrono::Duration::hours(24), now, None, now).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() - 1]))
}
