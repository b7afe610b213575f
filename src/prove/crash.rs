//! `orderbridge prove crash`: the daemon (its own process) runs against the
//! Kaspi and amoCRM simulators while orders arrive and managers accept leads;
//! it is killed with SIGKILL at random moments and started again each time.
//! At the end every order must have exactly one lead in the stage its status
//! maps to, every manager's move must have reached Kaspi exactly once, and no
//! job may be left pending, running or dead.
//!
//! A kill comes a random 0.5–4 s (seeded) after the daemon recovered from the
//! previous one; recovery is the kill → a lead made again (a restarted
//! daemon waits for the dead process's leases to expire, `job_lease`).
//!
//! With `--replicas N` (`orderbridge prove replicas` runs 3) N daemons share
//! the database, each kill takes a random one (started again at once), and
//! the others must take over its targets within the lease time without two
//! serving one target at once: amoCRM's log must never show more than 7
//! requests in a second, nor a 429.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use secrecy::ExposeSecret;

use super::{report, ProveError};
use crate::bench::pipeline::order_code;
use crate::bench::{config_file, failed, BenchError, DaemonProcess, RemoveOnDrop};
use crate::config::Settings;
use crate::sim::amocrm::{AmoSim, AmoSimConfig};
use crate::sim::kaspi::{KaspiSim, KaspiSimConfig, SimOrderSpec};
use crate::store::ScratchDatabase;

const KASPI_MAP: &str = "config/maps/kaspi.toml";
const AMO_TOKEN: &str = "prove-crash-token";
const HOOK_SECRET: &str = "prove-crash-hook-secret";
/// The stage whose entry means "accept the order" in the shipped Kaspi map.
const ACCEPT_STAGE: &str = "В работе / Сборка";
/// Where the shipped Kaspi map puts a new order's lead.
const NEW_STAGE: &str = "Новая заявка";

#[derive(Debug, Clone, clap::Args)]
pub struct CrashArgs {
    /// SIGKILLs (the full run: 50; `.ci/run`: 5).
    #[arg(long, default_value_t = 50)]
    pub kills: usize,
    /// New Kaspi orders a second.
    #[arg(long, default_value_t = 3.0)]
    pub rate: f64,
    /// Seeds the kill moments and the managers' choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Daemons sharing the database (each kill takes a random one).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
}

pub async fn run(
    settings: &Settings,
    args: &CrashArgs,
    out: &mut impl Write,
) -> Result<(), ProveError> {
    let admin = settings.database.url.expose_secret().to_string();
    crate::store::create_database_if_missing(&admin)
        .await
        .map_err(BenchError::from)?;
    let db = ScratchDatabase::create(&admin, "orderbridge_prove", 16)
        .await
        .map_err(BenchError::from)?;
    let result = exercise(&admin, &db, args).await;
    db.drop_now().await.map_err(BenchError::from)?;
    let (figures, broken) = result?;
    report(out, &figures, &broken)
}

type Outcome = (Vec<(&'static str, String)>, Vec<String>);

async fn exercise(
    admin: &str,
    db: &ScratchDatabase,
    args: &CrashArgs,
) -> Result<Outcome, BenchError> {
    let kaspi = KaspiSim::start(KaspiSimConfig::default()).await?;
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(AMO_TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await?;
    crate::demo::seed_crm_from_maps(&amo, &[std::path::Path::new(KASPI_MAP)]).map_err(failed)?;
    let pipeline = amo
        .pipelines()
        .into_iter()
        .find(|p| p.stages.iter().any(|(_, name)| name == ACCEPT_STAGE))
        .ok_or_else(|| failed("the Kaspi map's pipeline is not in the simulator"))?;
    let accept = pipeline
        .stages
        .iter()
        .find(|(_, name)| name == ACCEPT_STAGE)
        .map(|(id, _)| *id)
        .ok_or_else(|| failed("no accept stage"))?;
    let new_stage = pipeline
        .stages
        .iter()
        .find(|(_, name)| name == NEW_STAGE)
        .map(|(id, _)| *id)
        .ok_or_else(|| failed("no new-order stage"))?;
    let manager = amo.seed_user("Менеджер проверки");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = config_file("crash", admin, &db.name, &daemon_config(&amo, &kaspi, port))?;
    let _config = RemoveOnDrop(config.clone());
    let pool = db.pool.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);

    // Each replica its own HTTP port; the webhook goes to the first one's.
    let replicas = args.replicas.max(1);
    let mut ports = vec![port];
    for _ in 1..replicas {
        ports.push(
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port(),
        );
    }
    let start = |i: usize| {
        DaemonProcess::start(
            &config,
            &[(
                "ORDERBRIDGE__HTTP__LISTEN",
                format!("127.0.0.1:{}", ports[i]),
            )],
        )
    };
    let mut daemons = Vec::with_capacity(replicas);
    for i in 0..replicas {
        daemons.push(start(i)?);
    }
    let started = Instant::now();
    let mut created = 0usize;
    let mut moved: BTreeSet<u64> = BTreeSet::new();
    let mut kills = 0usize;
    let mut recoveries: Vec<Duration> = Vec::new();
    // (when killed, leads linked then) while the restarted daemon recovers.
    let mut recovering: Option<(Instant, i64)> = None;
    let mut next_kill = Instant::now() + kill_gap(&mut rng);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.1)));
    while kills < args.kills || recovering.is_some() {
        tick.tick().await;
        if started.elapsed() > Duration::from_secs(60 * 60) {
            return Err(failed("the run did not finish within an hour"));
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        kaspi.create_order(order(created, now_ms));
        created += 1;
        // A manager accepts one of the leads still in their first stage.
        if rng.random_bool(0.6) {
            let candidates: Vec<u64> = amo
                .leads()
                .into_iter()
                .filter(|l| l.status_id == new_stage && !moved.contains(&l.id))
                .map(|l| l.id)
                .collect();
            if !candidates.is_empty() {
                let lead = candidates[rng.random_range(0..candidates.len())];
                amo.manager_moves_lead(lead, pipeline.id, accept, manager);
                moved.insert(lead);
            }
        }
        let linked = count(&pool, "SELECT count(*) FROM crm_links").await?;
        match recovering {
            Some((killed_at, linked_then)) if linked > linked_then => {
                recoveries.push(killed_at.elapsed());
                recovering = None;
                next_kill = Instant::now() + kill_gap(&mut rng);
            }
            Some(_) => {}
            None if kills < args.kills && Instant::now() >= next_kill => {
                let victim = rng.random_range(0..replicas);
                daemons[victim].kill_now();
                kills += 1;
                let killed_at = Instant::now();
                daemons[victim] = start(victim)?;
                recovering = Some((killed_at, linked));
            }
            None => {
                for daemon in &mut daemons {
                    daemon.check()?;
                }
            }
        }
    }
    eprintln!(
        "prove crash: {kills} kills done after {:.0} s; waiting for the daemon to catch up",
        started.elapsed().as_secs_f64()
    );

    // Every order linked, every move at Kaspi, no job left.
    let converging = Instant::now();
    let moved_codes: BTreeSet<String> = amo
        .leads()
        .into_iter()
        .filter(|l| moved.contains(&l.id))
        .filter_map(|l| order_code(&l.custom_fields_values))
        .collect();
    loop {
        for daemon in &mut daemons {
            daemon.check()?;
        }
        let linked = count(&pool, "SELECT count(*) FROM crm_links").await?;
        let open = count(
            &pool,
            "SELECT count(*) FROM outbox_jobs WHERE state IN ('pending', 'running')",
        )
        .await?;
        let accepted = kaspi
            .orders()
            .iter()
            .filter(|o| moved_codes.contains(&o.code) && o.status != "APPROVED_BY_BANK")
            .count();
        // A lead the manager moved waits in its stage until the next poll
        // stores Kaspi's new status: settled only when every lead matches.
        if linked >= created as i64
            && open == 0
            && accepted == moved_codes.len()
            && wrong_stages(&amo, &pool, &pipeline).await? == 0
        {
            break;
        }
        if converging.elapsed() > Duration::from_secs(240) {
            eprintln!(
                "prove crash: after 240 s {linked} of {created} orders linked, {open} jobs open, {accepted} of {} moves at Kaspi",
                moved_codes.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converge_s = converging.elapsed().as_secs_f64();
    for daemon in &mut daemons {
        daemon.stop();
    }

    // What the simulators and the database say.
    let codes: BTreeMap<String, String> = kaspi
        .orders()
        .into_iter()
        .map(|o| (o.id.clone(), o.code.clone()))
        .collect();
    let mut leads_per_code: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let leads = amo.leads();
    for lead in &leads {
        if let Some(code) = order_code(&lead.custom_fields_values) {
            leads_per_code.entry(code).or_default().push(lead.status_id);
        }
    }
    let duplicate_leads: usize = leads_per_code
        .values()
        .map(|l| l.len().saturating_sub(1))
        .sum();
    let lost = codes
        .values()
        .filter(|code| !leads_per_code.contains_key(*code))
        .count();
    let wrong_stage = wrong_stages(&amo, &pool, &pipeline).await?;
    // Accepts that Kaspi carried out (2xx) per order: one each.
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    for request in kaspi.requests() {
        if request.method == "POST" && (200..300).contains(&request.status) {
            if let Some((_, code)) = codes
                .iter()
                .find(|(id, _)| request.body.contains(id.as_str()))
            {
                *applied.entry(code.clone()).or_default() += 1;
            }
        }
    }
    let actions_applied = moved_codes
        .iter()
        .filter(|c| applied.contains_key(*c))
        .count();
    let duplicate_actions: usize = applied.values().map(|n| n.saturating_sub(1)).sum();
    let stuck = count(
        &pool,
        "SELECT count(*) FROM outbox_jobs WHERE state IN ('pending', 'running')",
    )
    .await?;
    let dead = count(
        &pool,
        "SELECT count(*) FROM outbox_jobs WHERE state = 'dead'",
    )
    .await?;
    let longest = recoveries.iter().max().copied().unwrap_or_default();
    // Never two serving one account: amoCRM's own count of each second.
    let busiest = amo.max_requests_in_any_second();
    let http_429 = amo.count_status(429);

    let mut broken = Vec::new();
    for (what, n) in [
        ("duplicate leads", duplicate_leads),
        ("orders without a lead", lost),
        ("leads in the wrong stage", wrong_stage),
        ("moves applied twice", duplicate_actions),
        (
            "moves that never reached Kaspi",
            moved_codes.len() - actions_applied,
        ),
        ("jobs left pending or running", stuck as usize),
        ("dead jobs", dead as usize),
        ("amoCRM 429s", http_429),
        (
            "requests above amoCRM's 7 in one second",
            busiest.saturating_sub(7),
        ),
    ] {
        if n > 0 {
            broken.push(format!("{n} {what}"));
        }
    }
    Ok((
        vec![
            ("orders", created.to_string()),
            ("leads", leads.len().to_string()),
            ("duplicate_leads", duplicate_leads.to_string()),
            ("lost", lost.to_string()),
            ("wrong_stage", wrong_stage.to_string()),
            ("actions", moved_codes.len().to_string()),
            ("actions_applied", actions_applied.to_string()),
            ("duplicate_actions", duplicate_actions.to_string()),
            ("stuck_jobs", stuck.to_string()),
            ("dead_jobs", dead.to_string()),
            ("replicas", replicas.to_string()),
            ("kills", kills.to_string()),
            ("longest_recovery_ms", longest.as_millis().to_string()),
            (
                "mean_recovery_ms",
                (recoveries.iter().map(Duration::as_millis).sum::<u128>()
                    / recoveries.len().max(1) as u128)
                    .to_string(),
            ),
            ("converge_s", format!("{converge_s:.1}")),
            ("amocrm_max_in_any_1s", busiest.to_string()),
            ("amocrm_http_429", http_429.to_string()),
        ],
        broken,
    ))
}

/// 0.5–4 s.
fn kill_gap(rng: &mut impl Rng) -> Duration {
    Duration::from_millis(rng.random_range(500..4_000))
}

/// One order in four from a repeat customer (a pool of 50 phones).
fn order(i: usize, created_ms: i64) -> SimOrderSpec {
    crate::bench::generated_order(i, created_ms, 4, 50, 700_000_000)
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> Result<i64, BenchError> {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .map_err(failed)
}

/// Leads not in the stage their order's stored status maps to.
async fn wrong_stages(
    amo: &AmoSim,
    pool: &sqlx::PgPool,
    pipeline: &crate::sim::amocrm::SimPipeline,
) -> Result<usize, BenchError> {
    let expected = expected_stages(pool, pipeline).await?;
    Ok(amo
        .leads()
        .iter()
        .filter(|lead| {
            order_code(&lead.custom_fields_values)
                .and_then(|code| expected.get(&code).copied())
                .is_some_and(|want| want != Some(lead.status_id))
        })
        .count())
}

/// Each stored order's code → the stage id its status maps to in the shipped
/// Kaspi map (`None`: ignored status, no lead expected to be anywhere).
async fn expected_stages(
    pool: &sqlx::PgPool,
    pipeline: &crate::sim::amocrm::SimPipeline,
) -> Result<BTreeMap<String, Option<u64>>, BenchError> {
    let (map, _) = crate::mapping::model::load(std::path::Path::new(KASPI_MAP)).map_err(failed)?;
    let stage_of: BTreeMap<String, Option<u64>> = map
        .statuses
        .iter()
        .map(|(status, row)| {
            let stage = row
                .get_ref()
                .stage
                .as_ref()
                .and_then(|s| s.get_ref().as_str())
                .and_then(|name| {
                    pipeline
                        .stages
                        .iter()
                        .find(|(_, n)| n == name)
                        .map(|(id, _)| *id)
                });
            (status.get_ref().clone(), stage)
        })
        .collect();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT code, status_key FROM orders")
        .fetch_all(pool)
        .await
        .map_err(failed)?;
    Ok(rows
        .into_iter()
        .filter_map(|(code, status)| stage_of.get(&status).map(|s| (code, *s)))
        .collect())
}

fn daemon_config(amo: &AmoSim, kaspi: &KaspiSim, port: u16) -> String {
    format!(
        r#"
[http]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
[crm_accounts.main]
base_url = "{amo}"
subdomain = "example"
account_id = 31361463
webhook_secret = "{HOOK_SECRET}"
events_poll_interval = "3s"
[crm_accounts.main.auth]
mode = "long_lived"
token = "{AMO_TOKEN}"
[shops.kaspi_prove]
marketplace = "kaspi"
crm_account = "main"
map = "{KASPI_MAP}"
base_url = "{kaspi}"
poll_interval = "1s"
token = "kaspi-test-token"
"#,
        amo = amo.base_url(),
        kaspi = kaspi.base_url(),
    )
}
