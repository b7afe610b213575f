//! `orderbridge bench partner`: the daemon as deployed (`run_until`) against
//! the partner and amoCRM simulators. `--leads` (500) partner leads arrive by
//! webhook at once; each becomes a CRM lead (its intake report is owed), then
//! managers move every lead `--moves` (5) times, a second apart: `--leads` ×
//! (1 + `--moves`) = 3,000 status reports through a partner limited to
//! `--per-second` (5). amoCRM is simulated at 100 req/s here (the CRM side is
//! not what is measured). Prints `reports`, `reports_elapsed_s` (first report
//! to last at the partner), `reports_http_429`, `achieved_to_allowed`
//! (achieved rate / allowed rate) and `out_of_order` (reports of a lead that
//! arrived out of sequence).

use std::io::Write;
use std::time::Duration;

use super::{config_file, failed, in_scratch_database, wait_until, BenchError};
use crate::config::Settings;
use crate::sim::amocrm::{AmoSim, AmoSimConfig};
use crate::sim::partner::{PartnerSim, PartnerSimConfig};
use crate::store::ScratchDatabase;

const AMO_TOKEN: &str = "long-lived-bench-token";
const SECRET: &str = "bench-partner-secret-0001";
/// The stages a lead is moved through after its intake, each reporting a
/// partner status (per the shipped map).
fn reporting_moves() -> Result<Vec<&'static str>, BenchError> {
    let path = std::path::Path::new("config/maps/buyout.toml");
    let (map, _) = crate::mapping::funnel::load_funnel(path).map_err(failed)?;
    let funnel = crate::mapping::FunnelMap::offline("config/maps/buyout.toml", &map);
    Ok(crate::demo::BUYOUT_PATH
        .iter()
        .skip(1)
        .copied()
        .filter(|stage| {
            funnel
                .stage_named(stage)
                .is_some_and(|s| s.report.is_some())
        })
        .collect())
}

#[derive(Debug, Clone, clap::Args)]
pub struct PartnerBenchArgs {
    /// Partner leads pushed at once.
    #[arg(long, default_value_t = 500)]
    pub leads: usize,
    /// Manager moves per lead (each into a stage that reports), at most 10.
    #[arg(long, default_value_t = 5)]
    pub moves: usize,
    /// The partner's limit per second (its per-minute limit is 60 times it).
    #[arg(long, default_value_t = 5)]
    pub per_second: u32,
}

pub async fn run(
    settings: &Settings,
    args: &PartnerBenchArgs,
    out: &mut impl Write,
) -> Result<(), BenchError> {
    in_scratch_database(settings, out, async |admin, db| {
        measure(admin, db, args).await
    })
    .await
}

async fn measure(
    admin: &str,
    db: &ScratchDatabase,
    args: &PartnerBenchArgs,
) -> Result<Vec<(&'static str, String)>, BenchError> {
    let all_moves = reporting_moves()?;
    let moves = args.moves.min(all_moves.len());
    let per_second = args.per_second.max(1);
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(AMO_TOKEN.into()),
        rate_per_second: 100,
        ..AmoSimConfig::default()
    })
    .await?;
    crate::demo::seed_crm_from_maps(&amo, &[std::path::Path::new("config/maps/buyout.toml")])
        .map_err(failed)?;
    let partner = PartnerSim::start(PartnerSimConfig {
        per_second: per_second as usize,
        per_minute: per_second as usize * 60,
        ..PartnerSimConfig::default()
    })
    .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let settings = bench_config(admin, &db.name, &amo, &partner, port)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(crate::daemon::run_until(settings, true, stop.clone()));
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_until("the daemon", Duration::from_secs(60), || async {
        reqwest::get(&ready)
            .await
            .is_ok_and(|a| a.status().is_success())
    })
    .await?;
    let hook = format!("http://127.0.0.1:{port}/hooks/partner/buyout/{SECRET}");
    let leads: Vec<serde_json::Value> = (0..args.leads).map(|_| partner.new_lead()).collect();
    let mut pushes = tokio::task::JoinSet::new();
    for chunk in leads.chunks(25) {
        let (partner, hook, chunk) = (partner.clone(), hook.clone(), chunk.to_vec());
        pushes.spawn(async move {
            let mut ok = 0;
            for lead in &chunk {
                if partner
                    .push_lead(&hook, lead)
                    .await
                    .is_ok_and(|(s, _)| s == 200)
                {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut pushed = 0;
    while let Some(ok) = pushes.join_next().await {
        pushed += ok.map_err(failed)?;
    }
    if pushed != args.leads {
        return Err(failed(format!(
            "only {pushed} of {} leads were taken",
            args.leads
        )));
    }
    let pool = &db.pool;
    wait_until("the CRM leads", Duration::from_secs(600), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM partner_leads WHERE lead_id IS NOT NULL")
            .fetch_one(pool)
            .await
            .is_ok_and(|n| n as usize == args.leads)
    })
    .await?;
    let crm_leads: Vec<i64> = sqlx::query_scalar("SELECT lead_id FROM partner_leads ORDER BY id")
        .fetch_all(pool)
        .await
        .map_err(failed)?;
    let pipeline = amo
        .pipelines()
        .into_iter()
        .find(|p| p.name == "Выкуп техники")
        .ok_or_else(|| failed("no buyout pipeline in the simulator"))?;
    let manager = amo.user_id("Закупщик").unwrap_or(1);
    for stage in &all_moves[..moves] {
        let status = pipeline
            .stages
            .iter()
            .find(|(_, n)| n == stage)
            .map(|(id, _)| *id)
            .ok_or_else(|| failed(format!("no stage {stage}")))?;
        for lead in &crm_leads {
            amo.manager_moves_lead(*lead as u64, pipeline.id, status, manager);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let expected = args.leads * (1 + moves);
    let limit = Duration::from_secs((expected as u64 / u64::from(per_second)) * 2 + 120);
    wait_until("every report at the partner", limit, || async {
        partner.stats().accepted >= expected
    })
    .await?;
    let stats = partner.stats();
    let ledger = partner.ledger();
    let first = ledger.iter().map(|e| e.received_at).min();
    let last = ledger.iter().map(|e| e.received_at).max();
    let elapsed = match (first, last) {
        (Some(a), Some(b)) => (b - a).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    };
    // n reports take (n - 1) intervals at the allowed rate.
    let achieved = if elapsed > 0.0 {
        (stats.accepted.saturating_sub(1)) as f64 / elapsed
    } else {
        0.0
    };
    stop.cancel();
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(failed(e)),
        Err(e) => return Err(failed(e)),
    }
    Ok(vec![
        ("reports", stats.accepted.to_string()),
        ("reports_elapsed_s", format!("{elapsed:.2}")),
        ("reports_http_429", stats.http_429.to_string()),
        (
            "achieved_to_allowed",
            format!("{:.3}", achieved / f64::from(per_second)),
        ),
        ("out_of_order", stats.out_of_order.to_string()),
        ("max_in_any_1s", stats.max_in_any_second.to_string()),
    ])
}

fn bench_config(
    admin: &str,
    database: &str,
    amo: &AmoSim,
    partner: &PartnerSim,
    port: u16,
) -> Result<Settings, BenchError> {
    let text = format!(
        r#"
[http]
listen = "127.0.0.1:{port}"
[telemetry]
log_filter = "error"
[outbox]
concurrency = 32
[crm_accounts.main]
base_url = "{amo}"
events_poll_interval = "1s"
rate_limit = {{ requests = 90 }}
[crm_accounts.main.auth]
mode = "long_lived"
token = "{AMO_TOKEN}"
{partner_toml}
"#,
        amo = amo.base_url(),
        partner_toml = partner.source_toml("buyout", "main", "config/maps/buyout.toml", SECRET, ""),
    );
    let path = config_file("partner", admin, database, &text)?;
    let settings = Settings::load_from(Some(&path), Vec::<(String, String)>::new()).map_err(failed);
    let _ = std::fs::remove_file(&path);
    settings
}
