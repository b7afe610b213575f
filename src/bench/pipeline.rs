//! `orderbridge bench pipeline`: the daemon as deployed (`run_until` with the
//! real handlers) against the Kaspi and amoCRM simulators, amoCRM at its real
//! 7 requests a second. Three phases, one `key: value` line per figure:
//!
//! - backlog: `--backlog` (10,000) new Kaspi orders present at start, most of
//!   them new customers, one in five a repeat customer: `backlog_elapsed_s`
//!   (daemon start → every order has its lead), `backlog_requests`,
//!   `backlog_http_429`, `backlog_duplicate_leads`, `backlog_duplicate_contacts`;
//! - steady: orders arriving at `--rate` (5) a second for `--seconds` (60):
//!   `to_crm_p50_ms`, `to_crm_p99_ms` (the order visible at Kaspi → its lead
//!   made, minus the poll interval) and `requests_per_new_order`;
//! - CRM → marketplace: managers accept leads at 2 a second for `--seconds`:
//!   `to_marketplace_p50_ms`, `to_marketplace_p99_ms` (the move in amoCRM,
//!   delivered by webhook → the Kaspi call);
//!
//! and `peak_rss_mb`, the daemon's peak resident memory: the daemon runs as
//! its own process (`orderbridge --config FILE run`, as deployed), the
//! simulators in this one.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use super::{config_file, failed, in_scratch_database, BenchError, DaemonProcess, RemoveOnDrop};
use crate::config::Settings;
use crate::sim::amocrm::{AmoSim, AmoSimConfig};
use crate::sim::kaspi::{KaspiSim, KaspiSimConfig, SimOrderSpec};
use crate::store::ScratchDatabase;

const AMO_TOKEN: &str = "long-lived-bench-token";
const HOOK_SECRET: &str = "bench-amocrm-hook-secret-0123456";
const KASPI_MAP: &str = "config/maps/kaspi.toml";
/// The Kaspi poll interval (subtracted from the to-CRM latency).
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub struct PipelineBenchArgs {
    /// Orders waiting at start.
    #[arg(long, default_value_t = 10_000)]
    pub backlog: usize,
    /// New orders a second in the steady phase.
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Length of the steady and the CRM → marketplace phases.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Stop after the backlog.
    #[arg(long)]
    pub backlog_only: bool,
}

pub async fn run(
    settings: &Settings,
    args: &PipelineBenchArgs,
    out: &mut impl Write,
) -> Result<(), BenchError> {
    in_scratch_database(settings, out, async |admin, db| {
        measure(admin, db, args).await
    })
    .await
}

/// The amoCRM requests by method and path (ids folded), with their count and
/// the mean number of items in their JSON array bodies: where a run's
/// requests went.
fn request_breakdown(requests: &[crate::sim::amocrm::SimRequest]) -> String {
    let mut by_route: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for request in requests {
        let path: String = request
            .path
            .split('/')
            .map(|part| {
                if !part.is_empty() && part.chars().all(|c| c.is_ascii_digit()) {
                    "{id}"
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let items = serde_json::from_str::<Vec<serde_json::Value>>(&request.body)
            .map(|v| v.len())
            .unwrap_or(0);
        let entry = by_route
            .entry(format!("{} {path} ({})", request.method, request.status))
            .or_default();
        entry.0 += 1;
        entry.1 += items;
    }
    by_route
        .iter()
        .map(|(route, (n, items))| {
            format!(
                "  {route}: {n} requests, {:.1} items each",
                *items as f64 / *n as f64
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// The peak resident set (VmHWM) of process `pid`, in MB.
pub(crate) fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// One order in five from a repeat customer (a pool of 200 phones).
fn order(i: usize, created_ms: i64) -> SimOrderSpec {
    super::generated_order(i, created_ms, 5, 200, 600_000_000)
}

async fn linked(pool: &sqlx::PgPool) -> Result<i64, BenchError> {
    sqlx::query_scalar("SELECT count(*) FROM crm_links")
        .fetch_one(pool)
        .await
        .map_err(failed)
}

async fn stored_orders(pool: &sqlx::PgPool) -> Result<i64, BenchError> {
    sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(pool)
        .await
        .map_err(failed)
}

async fn measure(
    admin: &str,
    db: &ScratchDatabase,
    args: &PipelineBenchArgs,
) -> Result<Vec<(&'static str, String)>, BenchError> {
    let kaspi = KaspiSim::start(KaspiSimConfig::default()).await?;
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(AMO_TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await?;
    crate::demo::seed_crm_from_maps(&amo, &[std::path::Path::new(KASPI_MAP)]).map_err(failed)?;
    let now = chrono::Utc::now().timestamp_millis();
    for i in 0..args.backlog {
        kaspi.create_order(order(i, now - 3_600_000 + i as i64));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = bench_config(admin, &db.name, &amo, &kaspi, port)?;
    let pool = db.pool.clone();

    // Backlog.
    let started = Instant::now();
    let mut daemon = DaemonProcess::start(&config, &[])?;
    let _config = RemoveOnDrop(config.clone());
    let limit = Duration::from_secs(1800);
    let mut ingested_s = None;
    while linked(&pool).await? < args.backlog as i64 {
        daemon.check()?;
        if ingested_s.is_none() && stored_orders(&pool).await? >= args.backlog as i64 {
            ingested_s = Some(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > limit {
            return Err(failed("the backlog was not done within 30 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backlog_s = started.elapsed().as_secs_f64();
    let backlog_requests = amo.requests().len();
    let backlog_429 = amo.count_status(429);
    let mut per_code: BTreeMap<String, usize> = BTreeMap::new();
    for lead in amo.leads() {
        if let Some(code) = order_code(&lead.custom_fields_values) {
            *per_code.entry(code).or_default() += 1;
        }
    }
    let duplicate_leads: usize = per_code.values().map(|n| n.saturating_sub(1)).sum();
    let mut per_phone: BTreeMap<String, usize> = BTreeMap::new();
    for contact in amo.contacts() {
        for phone in contact.phones {
            let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
            *per_phone.entry(digits).or_default() += 1;
        }
    }
    let duplicate_contacts: usize = per_phone.values().map(|n| n.saturating_sub(1)).sum();
    eprintln!(
        "bench pipeline: backlog of {} done in {backlog_s:.2} s ({backlog_requests} amoCRM requests, {backlog_429} × 429); steady arrivals next",
        args.backlog
    );
    eprintln!(
        "  every order stored after {:.2} s",
        ingested_s.unwrap_or(backlog_s)
    );
    eprintln!("{}", request_breakdown(&amo.requests()));

    let mut figures = vec![
        ("backlog_orders", args.backlog.to_string()),
        ("backlog_elapsed_s", format!("{backlog_s:.2}")),
        ("backlog_requests", backlog_requests.to_string()),
        ("backlog_http_429", backlog_429.to_string()),
        ("backlog_duplicate_leads", duplicate_leads.to_string()),
        ("backlog_duplicate_contacts", duplicate_contacts.to_string()),
    ];
    if args.backlog_only {
        daemon.stop();
        return Ok(figures);
    }
    // Steady arrivals.
    let before = amo.requests().len();
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.1));
    let steady_count = (args.rate * args.seconds as f64).round() as usize;
    let mut visible: BTreeMap<String, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    let mut tick = tokio::time::interval(interval);
    for n in 0..steady_count {
        tick.tick().await;
        let i = args.backlog + n;
        let at = chrono::Utc::now();
        let spec = order(i, at.timestamp_millis());
        visible.insert(spec.code.clone(), at);
        kaspi.create_order(spec);
    }
    let total = (args.backlog + steady_count) as i64;
    let wait = Instant::now();
    while linked(&pool).await? < total {
        if wait.elapsed() > Duration::from_secs(120) {
            return Err(failed("the steady orders did not all get leads"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let steady_requests = amo.requests().len() - before;
    let rows: Vec<(String, chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "SELECT o.code, l.created_at, l.lead_id FROM crm_links l JOIN orders o ON o.id = l.order_id
         WHERE o.code = ANY($1)",
    )
    .bind(visible.keys().cloned().collect::<Vec<_>>())
    .fetch_all(&pool)
    .await
    .map_err(failed)?;
    let mut to_crm: Vec<f64> = rows
        .iter()
        .filter_map(|(code, linked_at, _)| {
            let shown = visible.get(code)?;
            let ms = (*linked_at - *shown).num_milliseconds() as f64 - POLL.as_millis() as f64;
            Some(ms.max(0.0))
        })
        .collect();
    to_crm.sort_by(f64::total_cmp);

    // Managers' moves at 2 a second → Kaspi accepts.
    // The pipeline the shipped Kaspi map puts its leads in.
    let first_lead = rows
        .first()
        .and_then(|(_, _, lead)| amo.lead(*lead as u64))
        .ok_or_else(|| failed("no steady lead in the simulator"))?;
    let pipeline = amo
        .pipelines()
        .into_iter()
        .find(|p| p.id == first_lead.pipeline_id)
        .ok_or_else(|| failed("the steady leads' pipeline is not in the simulator"))?;
    let accept = pipeline
        .stages
        .iter()
        .find(|(_, n)| n == "В работе / Сборка")
        .map(|(id, _)| *id)
        .ok_or_else(|| failed("no accept stage"))?;
    let manager = amo.seed_user("Менеджер бенчмарка");
    let moves = (2 * args.seconds) as usize;
    let mut moved: Vec<(String, Instant)> = Vec::new();
    let kaspi_before = kaspi.requests().len();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for (code, _, lead) in rows.iter().take(moves) {
        tick.tick().await;
        moved.push((code.clone(), Instant::now()));
        amo.manager_moves_lead(*lead as u64, pipeline.id, accept, manager);
    }
    let order_ids: BTreeMap<String, String> = kaspi
        .orders()
        .into_iter()
        .map(|o| (o.code.clone(), o.id.clone()))
        .collect();
    let wait = Instant::now();
    let mut to_marketplace: Vec<f64> = Vec::new();
    while wait.elapsed() < Duration::from_secs(60) {
        let calls: Vec<_> = kaspi.requests()[kaspi_before..]
            .iter()
            .filter(|r| r.method == "POST")
            .cloned()
            .collect();
        to_marketplace = moved
            .iter()
            .filter_map(|(code, at)| {
                let id = order_ids.get(code)?;
                let call = calls.iter().find(|r| r.body.contains(id.as_str()))?;
                Some(call.at.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        if to_marketplace.len() == moved.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    to_marketplace.sort_by(f64::total_cmp);
    let rss = peak_rss_mb(daemon.pid());
    daemon.stop();
    figures.extend([
        ("to_crm_p50_ms", format!("{:.0}", percentile(&to_crm, 0.5))),
        ("to_crm_p99_ms", format!("{:.0}", percentile(&to_crm, 0.99))),
        (
            "to_marketplace_p50_ms",
            format!("{:.0}", percentile(&to_marketplace, 0.5)),
        ),
        (
            "to_marketplace_p99_ms",
            format!("{:.0}", percentile(&to_marketplace, 0.99)),
        ),
        (
            "to_marketplace_moves",
            format!("{}/{}", to_marketplace.len(), moved.len()),
        ),
        ("peak_rss_mb", format!("{rss:.1}")),
        (
            "requests_per_new_order",
            format!("{:.3}", steady_requests as f64 / steady_count.max(1) as f64),
        ),
    ]);
    Ok(figures)
}

/// The order code a lead carries in its order-code field.
/// The order code a lead carries in the shipped maps' «Номер заказа» field.
pub(crate) fn order_code(fields: &serde_json::Value) -> Option<String> {
    fields.as_array()?.iter().find_map(|f| {
        (f["field_name"].as_str() == Some("Номер заказа"))
            .then(|| f["values"][0]["value"].as_str().map(str::to_string))
            .flatten()
    })
}

/// Writes the daemon's configuration file; its path.
fn bench_config(
    admin: &str,
    database: &str,
    amo: &AmoSim,
    kaspi: &KaspiSim,
    port: u16,
) -> Result<std::path::PathBuf, BenchError> {
    let text = super::KaspiAmoDaemon {
        amo,
        kaspi,
        port,
        shop: "kaspi_bench",
        hook_secret: HOOK_SECRET,
        amo_token: AMO_TOKEN,
        kaspi_token: "kaspi-test-token",
        poll: POLL,
        // The daemon's default.
        events_poll: Duration::from_secs(60),
    }
    .config_text();
    config_file("pipeline", admin, database, &text)
}
