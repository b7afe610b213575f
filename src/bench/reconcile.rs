//! `orderbridge bench reconcile`: 5,000 Kaspi orders made into leads through
//! the real pipeline (poller → outbox → `crm_sync_order` → amoCRM simulator),
//! then 200 drifts planted in equal kinds (orders the store never saw, orders
//! moved at Kaspi, leads moved behind the bridge's back, lost links, deleted
//! leads, leads gone with their links), then one reconciliation run, timed.
//! Prints `reconcile_elapsed_s`, `reconcile_crm_requests`,
//! `reconcile_marketplace_requests`, `drift_found`, `drift_planted`,
//! `repaired`, `setup_s`.

use std::io::Write;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;

use crate::config::Settings;
use crate::outbox::{Engine, EngineConfig};
use crate::sim::amocrm::{AmoSim, AmoSimConfig};
use crate::sim::kaspi::{KaspiSim, KaspiSimConfig, SimOrderSpec};
use crate::store::ScratchDatabase;

const AMO_TOKEN: &str = "bench-reconcile-token";
const KASPI_MAP: &str = "config/maps/kaspi.toml";

#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileBenchArgs {
    /// Orders with leads before the drift.
    #[arg(long, default_value_t = 5_000)]
    pub orders: usize,
    /// Drifts planted (in six kinds; a multiple of 10 splits evenly).
    #[arg(long, default_value_t = 200)]
    pub drift: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileBenchError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

pub async fn run(
    settings: &Settings,
    args: &ReconcileBenchArgs,
    out: &mut impl Write,
) -> Result<(), ReconcileBenchError> {
    let admin = settings.database.url.expose_secret().to_string();
    crate::store::create_database_if_missing(&admin).await?;
    let db = ScratchDatabase::create(&admin, "orderbridge_bench", 16).await?;
    let result = measure(&admin, &db, args).await;
    db.drop_now().await?;
    let figures = result?;
    for (key, value) in figures {
        writeln!(out, "{key}: {value}")?;
    }
    Ok(())
}

fn failed(what: impl std::fmt::Display) -> ReconcileBenchError {
    ReconcileBenchError::Failed(what.to_string())
}

async fn measure(
    admin: &str,
    db: &ScratchDatabase,
    args: &ReconcileBenchArgs,
) -> Result<Vec<(&'static str, String)>, ReconcileBenchError> {
    let kaspi = KaspiSim::start(KaspiSimConfig::default())
        .await
        .map_err(failed)?;
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(AMO_TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await
    .map_err(failed)?;
    crate::demo::seed_crm_from_maps(&amo, &[std::path::Path::new(KASPI_MAP)]).map_err(failed)?;
    let settings = bench_settings(admin, &db.name, &amo, &kaspi)?;
    let pool = db.pool.clone();

    // Before: orders with their leads, made the way the daemon makes them.
    let setup = Instant::now();
    let now = chrono::Utc::now().timestamp_millis();
    let order = |i: usize| SimOrderSpec {
        customer_phone: format!("701{:07}", i),
        ..SimOrderSpec::new(
            &format!("{}", 300_000_000 + i),
            now - 36 * 3_600_000 + i as i64 * 10_000,
        )
    };
    let per_kind = (args.drift / 10).max(1);
    let missing_in_store = 2 * per_kind;
    let before_outage = args.orders.saturating_sub(missing_in_store);
    let ids: Vec<String> = (0..before_outage)
        .map(|i| kaspi.create_order(order(i)).id)
        .collect();
    let limiters = crate::daemon::limiters(&settings);
    let crm = crate::daemon::amocrm_clients(&settings, &pool, &limiters)
        .await
        .map_err(failed)?;
    let client = crm
        .get("main")
        .cloned()
        .ok_or_else(|| failed("no CRM client"))?;
    crate::sync::contact_index::refresh(&client, &pool)
        .await
        .map_err(failed)?;
    let maps = std::sync::Arc::new(
        crate::mapping::MapRegistry::load(
            crate::mapping::MapSource::from_settings(&settings),
            &crm,
        )
        .await
        .map_err(|p| failed(p.join("; ")))?,
    );
    let kaspi_client = crate::daemon::reconcile_sources(&settings, &pool)
        .await
        .map_err(failed)?
        .kaspi
        .get("kaspi_bench")
        .cloned()
        .ok_or_else(|| failed("no Kaspi client"))?;
    let poller =
        crate::sync::kaspi_poll::KaspiPoller::new(kaspi_client, pool.clone(), "amocrm:main");
    poller.poll_once(chrono::Utc::now()).await.map_err(failed)?;
    let engine = Engine::builder(pool.clone(), EngineConfig::from_settings(&settings.outbox))
        .limiters(limiters.clone())
        .handler(
            crate::sync::ingest::CRM_SYNC_KIND,
            crate::sync::to_crm::CrmSyncHandler::new(
                pool.clone(),
                crm.clone(),
                maps,
                crate::daemon::shop_crm(&settings),
            ),
        )
        .build();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { engine.run(stop).await })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_jobs")
            .fetch_one(&pool)
            .await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "{left} jobs still pending after 10 minutes"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let _ = running.await;
    let linked: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_links")
        .fetch_one(&pool)
        .await?;
    if linked != before_outage as i64 {
        return Err(failed(format!(
            "{linked} of {before_outage} orders have leads"
        )));
    }
    let setup_s = setup.elapsed().as_secs_f64();

    // The outage: drift of every kind.
    let lead_of = |i: usize| {
        let pool = pool.clone();
        let code = format!("{}", 300_000_000 + i);
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT l.lead_id FROM crm_links l JOIN orders o ON o.id = l.order_id WHERE o.code = $1",
            )
            .bind(code)
            .fetch_one(&pool)
            .await
        }
    };
    for i in before_outage..args.orders {
        kaspi.create_order(order(i));
    }
    let moved_at_kaspi = 0..2 * per_kind;
    for id in &ids[moved_at_kaspi.clone()] {
        kaspi.kaspi_accepts_order(id);
    }
    let off_stage = amo
        .pipelines()
        .iter()
        .flat_map(|p| {
            p.stages
                .iter()
                .map(move |(id, name)| (p.id, *id, name.clone()))
        })
        .find(|(_, _, name)| name == "В доставке")
        .ok_or_else(|| failed("no stage «В доставке»"))?;
    let mut i = moved_at_kaspi.end;
    for _ in 0..2 * per_kind {
        amo.drift_lead_stage(lead_of(i).await? as u64, off_stage.0, off_stage.1);
        i += 1;
    }
    for _ in 0..2 * per_kind {
        sqlx::query("DELETE FROM crm_links WHERE lead_id = $1")
            .bind(lead_of(i).await?)
            .execute(&pool)
            .await?;
        i += 1;
    }
    for _ in 0..per_kind {
        amo.delete_lead(lead_of(i).await? as u64);
        i += 1;
    }
    for _ in 0..per_kind {
        let lead = lead_of(i).await?;
        amo.delete_lead(lead as u64);
        sqlx::query("DELETE FROM crm_links WHERE lead_id = $1")
            .bind(lead)
            .execute(&pool)
            .await?;
        i += 1;
    }
    let planted = 10 * per_kind;

    // One run, as `orderbridge reconcile` runs it without a daemon.
    let sources = crate::daemon::reconcile_sources(&settings, &pool)
        .await
        .map_err(failed)?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let scope = crate::sync::reconcile::Scope {
        crm_account: "main".into(),
        shop: None,
        since: chrono::Utc::now() - chrono::Duration::days(3),
        dry_run: false,
    };
    let (amo_before, kaspi_before) = (amo.requests().len(), kaspi.requests().len());
    let started = Instant::now();
    let summary = sources
        .reconcile(
            &scope,
            &|_: &str, _: u64, _: Option<u64>| {},
            &Default::default(),
        )
        .await
        .map_err(failed)?;
    let elapsed = started.elapsed().as_secs_f64();
    let crm_requests = amo.requests().len() - amo_before;
    let marketplace_requests = kaspi.requests().len() - kaspi_before;
    if summary.failed > 0 {
        return Err(failed(format!("the run failed: {:?}", summary.failures)));
    }
    Ok(vec![
        ("reconcile_elapsed_s", format!("{elapsed:.2}")),
        ("reconcile_crm_requests", crm_requests.to_string()),
        (
            "reconcile_marketplace_requests",
            marketplace_requests.to_string(),
        ),
        ("drift_found", summary.drift().to_string()),
        ("drift_planted", planted.to_string()),
        ("repaired", summary.repaired.to_string()),
        ("checked", summary.checked.to_string()),
        ("setup_s", format!("{setup_s:.2}")),
    ])
}

fn bench_settings(
    admin: &str,
    database: &str,
    amo: &AmoSim,
    kaspi: &KaspiSim,
) -> Result<Settings, ReconcileBenchError> {
    let mut url = reqwest::Url::parse(admin).map_err(failed)?;
    url.set_path(&format!("/{database}"));
    let text = format!(
        r#"
[database]
url = "{url}"
max_connections = 16
[crm_accounts.main]
base_url = "{amo}"
subdomain = "example"
account_id = 31361463
[crm_accounts.main.auth]
mode = "long_lived"
token = "{AMO_TOKEN}"
[shops.kaspi_bench]
marketplace = "kaspi"
crm_account = "main"
map = "{KASPI_MAP}"
base_url = "{kaspi}"
token = "kaspi-test-token"
"#,
        amo = amo.base_url(),
        kaspi = kaspi.base_url(),
    );
    let path = std::env::temp_dir().join(format!(
        "orderbridge-bench-reconcile-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text)?;
    let settings = Settings::load_from(Some(&path), Vec::<(String, String)>::new()).map_err(failed);
    let _ = std::fs::remove_file(&path);
    settings
}
