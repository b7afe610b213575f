//! `orderbridge prove db-faults` and `orderbridge prove api-faults`: the
//! daemon (its own process) runs in the suites' [`World`] while its database
//! or the APIs misbehave on purpose; orders and managers' moves keep flowing.
//!
//! - **db-faults**: every connection of the daemon's database is killed
//!   (`pg_terminate_backend`) every 2 s for a phase, then PostgreSQL itself is
//!   stopped, kept down and started again (`--restart-command`, by default
//!   `scripts/restart-postgres.sh SECONDS`). While the server is down,
//!   `/readyz` must say so (503 naming the database) on every probe; once it
//!   is back, the daemon reconnects by itself and everything arrives.
//! - **api-faults**: the Kaspi simulator, then Avito's, then amoCRM's,
//!   answers every 5th request with a 500 (20 %), then holds every 5th until
//!   the client times out, then cuts every 5th connection, then answers
//!   everything with 429 (a storm); after each fault a new lead of that
//!   marketplace's orders (amoCRM: any) must be made; then amoCRM blocks the account (403 nginx page on every call):
//!   the daemon must stop all traffic to it at once (nothing more than the
//!   requests already in flight, within a second) and `/readyz` must name the
//!   open circuit, until support unblocks it and ops run `orderbridge circuit
//!   reset amocrm:main`, after which everything arrives.
//!
//! Both end like the crash suite ([`World::verdict`]): every order one lead
//! in its stage, no lead moved backwards, every move at Kaspi once, no job
//! left, never above 7 amoCRM requests in a second and no rate-limit 429
//! from amoCRM or Avito.

use std::io::Write;
use std::time::{Duration, Instant};

use super::world::{count, World, AMO_TARGET};
use super::ProveError;
use crate::bench::{failed, BenchError};
use crate::config::Settings;
use crate::sim::amocrm::Fault as AmoFault;
use crate::sim::avito::AvitoFault;
use crate::sim::kaspi::KaspiFault;

#[derive(Debug, Clone, clap::Args)]
pub struct FaultArgs {
    /// Seconds each fault lasts (the full run: 30; `.ci/run`: 6).
    #[arg(long, default_value_t = 30)]
    pub phase_secs: u64,
    /// New Kaspi orders a second.
    #[arg(long, default_value_t = 3.0)]
    pub rate: f64,
    /// Seeds the managers' choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// db-faults: how long PostgreSQL stays down.
    #[arg(long, default_value_t = 8)]
    pub down_secs: u64,
    /// db-faults: the command that restarts PostgreSQL, given the seconds to
    /// keep it down as its last argument.
    #[arg(long, default_value = "scripts/restart-postgres.sh")]
    pub restart_command: String,
}

#[derive(Clone, Copy, Debug)]
pub enum Suite {
    Database,
    Apis,
}

pub async fn run(
    settings: &Settings,
    suite: Suite,
    args: &FaultArgs,
    out: &mut impl Write,
) -> Result<(), ProveError> {
    super::in_scratch_database(settings, out, async |admin, db| {
        let mut world = World::start(admin, db, 1, args.seed, &[]).await?;
        let mut figures = match suite {
            Suite::Database => database_faults(&mut world, &db.name, args).await?,
            Suite::Apis => api_faults(&mut world, args).await?,
        };
        let converge_s = world.settle(Duration::from_secs(300)).await?;
        let (mut common, mut broken) = world.verdict().await?;
        common.push(("converge_s", format!("{converge_s:.1}")));
        common.append(&mut figures.0);
        broken.append(&mut figures.1);
        Ok((common, broken))
    })
    .await
}

type Figures = (Vec<(&'static str, String)>, Vec<String>);

/// What `/readyz` answered: its status and its database check.
async fn readyz(http: &reqwest::Client, url: &str) -> (Option<u16>, String) {
    match http.get(url).send().await {
        Ok(answer) => {
            let status = answer.status().as_u16();
            let body: serde_json::Value = answer.json().await.unwrap_or_default();
            (Some(status), body.to_string())
        }
        Err(error) => (None, error.to_string()),
    }
}

async fn database_faults(
    world: &mut World,
    database: &str,
    args: &FaultArgs,
) -> Result<Figures, BenchError> {
    let phase = Duration::from_secs(args.phase_secs);
    let mut broken = Vec::new();
    world.flow(args.rate, phase / 2).await?;

    // Connections killed every 2 s.
    let mut killed = 0i64;
    let until = Instant::now() + phase;
    let mut next_kill = Instant::now();
    while Instant::now() < until {
        if Instant::now() >= next_kill {
            killed += sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid() \
                 AND application_name = 'orderbridge') killed",
            )
            .bind(database)
            .fetch_one(&world.pool)
            .await
            .map_err(failed)?;
            next_kill += Duration::from_secs(2);
        }
        world.pump(args.rate);
        world.check_daemons()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let linked_before = world.linked().await?;
    eprintln!("prove db-faults: {killed} connections killed; restarting PostgreSQL");

    // PostgreSQL stopped, kept down, started again.
    let mut parts = args.restart_command.split_whitespace();
    let program = parts
        .next()
        .ok_or_else(|| failed("--restart-command is empty"))?;
    let mut restart = std::process::Command::new(program)
        .args(parts)
        .arg(args.down_secs.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(failed)?;
    let url = world.readyz_url(0);
    let admin_probe = world.pool.connect_options();
    let (mut probes_down, mut truthful_down, mut ready_while_down, mut unanswered) =
        (0usize, 0usize, 0usize, 0usize);
    let mut down_seen: Option<Instant> = None;
    let restarted = Instant::now();
    let status = loop {
        world.pump(args.rate);
        world.check_daemons()?;
        // Is the server down (our own connection attempt) before and after
        // the probe? A probe while it came back or went away proves nothing.
        let server_down = || async {
            tokio::time::timeout(
                Duration::from_secs(1),
                sqlx::ConnectOptions::connect(admin_probe.as_ref()),
            )
            .await
            .map_or(true, |c| c.is_err())
        };
        if server_down().await {
            down_seen.get_or_insert_with(Instant::now);
            let (status, body) = readyz(&http, &url).await;
            if server_down().await {
                probes_down += 1;
                match status {
                    Some(503) if body.contains("database") && body.contains("unreachable") => {
                        truthful_down += 1
                    }
                    Some(200) => ready_while_down += 1,
                    None => unanswered += 1,
                    _ => {}
                }
            }
        }
        if let Some(status) = restart.try_wait()? {
            break status;
        }
        if restarted.elapsed() > Duration::from_secs(args.down_secs + 120) {
            return Err(failed("the restart command did not finish in time"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    if !status.success() {
        return Err(failed(format!(
            "`{} {}` failed ({status}): cannot restart PostgreSQL here",
            args.restart_command, args.down_secs
        )));
    }
    let back = Instant::now();
    let outage_s = down_seen.map_or(0.0, |d| d.elapsed().as_secs_f64());
    // Ready again, and a new lead made, after the server came back.
    let mut ready_after: Option<Duration> = None;
    let mut lead_after: Option<Duration> = None;
    while (ready_after.is_none() || lead_after.is_none())
        && back.elapsed() < Duration::from_secs(90)
    {
        world.pump(args.rate);
        world.check_daemons()?;
        if ready_after.is_none() && readyz(&http, &url).await.0 == Some(200) {
            ready_after = Some(back.elapsed());
        }
        if lead_after.is_none() && world.linked().await.unwrap_or(0) > linked_before {
            lead_after = Some(back.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    world.flow(args.rate, phase / 2).await?;

    if probes_down == 0 {
        broken.push("the restart was never seen (the server answered throughout)".into());
    }
    if ready_while_down > 0 {
        broken.push(format!(
            "/readyz said ready {ready_while_down} times while PostgreSQL was down"
        ));
    }
    if unanswered > 0 {
        broken.push(format!(
            "/readyz did not answer within 5 s {unanswered} times while PostgreSQL was down"
        ));
    }
    if truthful_down == 0 && probes_down > 0 {
        broken.push("/readyz never named the database while it was down".into());
    }
    if ready_after.is_none() {
        broken.push("/readyz not ready 90 s after PostgreSQL came back".into());
    }
    if lead_after.is_none() {
        broken.push("no lead made within 90 s after PostgreSQL came back".into());
    }
    let ms = |d: Option<Duration>| d.map_or("never".to_string(), |d| d.as_millis().to_string());
    Ok((
        vec![
            ("connections_killed", killed.to_string()),
            ("postgres_restarts", "1".into()),
            ("outage_s", format!("{outage_s:.1}")),
            ("readyz_probes_while_down", probes_down.to_string()),
            (
                "readyz_naming_database_while_down",
                truthful_down.to_string(),
            ),
            ("readyz_ready_while_down", ready_while_down.to_string()),
            ("readyz_unanswered_while_down", unanswered.to_string()),
            ("readyz_ready_after_ms", ms(ready_after)),
            ("first_lead_after_ms", ms(lead_after)),
        ],
        broken,
    ))
}

/// One fault for a phase, on one simulator.
#[derive(Clone, Copy, Debug)]
enum Trouble {
    ServerErrors,
    Timeouts,
    Resets,
    Storm429,
}

impl Trouble {
    const ALL: [Trouble; 4] = [
        Trouble::ServerErrors,
        Trouble::Timeouts,
        Trouble::Resets,
        Trouble::Storm429,
    ];

    fn name(self) -> &'static str {
        match self {
            Trouble::ServerErrors => "500s",
            Trouble::Timeouts => "timeouts",
            Trouble::Resets => "resets",
            Trouble::Storm429 => "429_storm",
        }
    }

    /// Every n-th request gets it.
    fn every(self) -> usize {
        match self {
            Trouble::Storm429 => 1,
            _ => 5,
        }
    }
}

async fn api_faults(world: &mut World, args: &FaultArgs) -> Result<Figures, BenchError> {
    let phase = Duration::from_secs(args.phase_secs);
    let mut figures: Vec<(&'static str, String)> = Vec::new();
    let mut broken = Vec::new();
    world.flow(args.rate, phase / 2).await?;
    for api in ["kaspi", "avito", "amocrm"] {
        for trouble in Trouble::ALL {
            eprintln!("prove api-faults: {api} {}", trouble.name());
            let faults_before = faulted(world, api);
            match (api, trouble) {
                ("kaspi", t) => world.kaspi.fault_every(
                    match t {
                        Trouble::ServerErrors => KaspiFault::ServerError,
                        Trouble::Timeouts => KaspiFault::Timeout,
                        Trouble::Resets => KaspiFault::ConnectionReset,
                        Trouble::Storm429 => KaspiFault::TooManyRequests,
                    },
                    t.every(),
                ),
                ("avito", t) => world.avito.fault_every(
                    match t {
                        Trouble::ServerErrors => AvitoFault::ServerError,
                        Trouble::Timeouts => AvitoFault::Timeout,
                        Trouble::Resets => AvitoFault::ConnectionReset,
                        Trouble::Storm429 => AvitoFault::TooManyRequests,
                    },
                    t.every(),
                ),
                (_, t) => world.amo.fault_every(
                    match t {
                        Trouble::ServerErrors => AmoFault::ServerError,
                        Trouble::Timeouts => AmoFault::Timeout,
                        Trouble::Resets => AmoFault::ConnectionReset,
                        Trouble::Storm429 => AmoFault::TooManyRequests,
                    },
                    t.every(),
                ),
            }
            let requests_before = requests(world, api);
            world.flow(args.rate, phase).await?;
            world.kaspi.lift_steady_fault();
            world.avito.lift_steady_fault();
            world.amo.lift_steady_fault();
            let sent = requests(world, api) - requests_before;
            let hit = faulted(world, api) - faults_before;
            if hit == 0 {
                broken.push(format!(
                    "{api} {}: no request met the fault",
                    trouble.name()
                ));
            }
            if matches!(trouble, Trouble::Storm429) {
                figures.push((
                    match api {
                        "kaspi" => "kaspi_requests_per_s_in_429_storm",
                        "avito" => "avito_requests_per_s_in_429_storm",
                        _ => "amocrm_requests_per_s_in_429_storm",
                    },
                    format!("{:.2}", sent as f64 / phase.as_secs_f64()),
                ));
            }
            // Recovered before the next fault: a new lead made (of this
            // marketplace's orders).
            let linked = linked_of(world, api).await?;
            let lifted = Instant::now();
            while linked_of(world, api).await? <= linked {
                if lifted.elapsed() > Duration::from_secs(120) {
                    broken.push(format!(
                        "{api} {}: no lead made within 120 s after the fault ended",
                        trouble.name()
                    ));
                    break;
                }
                world.pump(args.rate);
                world.check_daemons()?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // amoCRM blocks the account.
    eprintln!("prove api-faults: amocrm 403 block");
    let before = world.amo.requests().len();
    world.amo.block();
    world.flow(args.rate, phase).await?;
    let during: Vec<_> = world.amo.requests().into_iter().skip(before).collect();
    let first_403 = during.iter().find(|r| r.status == 403).map(|r| r.at);
    let late = first_403.map_or(0, |first| {
        during
            .iter()
            .filter(|r| r.at.duration_since(first) > Duration::from_secs(1))
            .count()
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(failed)?;
    let (status, body) = readyz(&http, &world.readyz_url(0)).await;
    if first_403.is_none() {
        broken.push("amoCRM's block was never met".into());
    }
    if late > 0 {
        broken.push(format!(
            "{late} requests reached the blocked amoCRM account more than 1 s after its first 403"
        ));
    }
    if !(status == Some(503) && body.contains(AMO_TARGET)) {
        broken.push(format!(
            "/readyz did not name the open circuit during the block: {status:?} {body}"
        ));
    }
    // Support unblocks the account; ops reset the circuit.
    world.amo.unblock();
    let linked = world.linked().await?;
    let reset_at = Instant::now();
    let reset = std::process::Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(&world.config)
        .args(["circuit", "reset", AMO_TARGET])
        .env("RUST_LOG", "error")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .status()?;
    if !reset.success() {
        broken.push(format!(
            "`orderbridge circuit reset {AMO_TARGET}` failed: {reset}"
        ));
    }
    let mut resumed: Option<Duration> = None;
    while resumed.is_none() && reset_at.elapsed() < Duration::from_secs(60) {
        world.pump(args.rate);
        world.check_daemons()?;
        if world.linked().await? > linked {
            resumed = Some(reset_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if resumed.is_none() {
        broken.push("no lead made within 60 s after the circuit reset".into());
    }
    world.flow(args.rate, phase / 2).await?;
    let waiting = count(
        &world.pool,
        "SELECT count(*) FROM outbox_jobs WHERE state IN ('pending', 'running')",
    )
    .await?;
    figures.extend([
        ("amocrm_requests_while_blocked", during.len().to_string()),
        ("amocrm_requests_1s_after_first_403", late.to_string()),
        (
            "leads_after_reset_ms",
            resumed.map_or("never".into(), |d| d.as_millis().to_string()),
        ),
        ("jobs_open_before_settling", waiting.to_string()),
        ("kaspi_http_500", world.kaspi.count_status(500).to_string()),
        ("kaspi_http_429", world.kaspi.count_status(429).to_string()),
        ("avito_http_500", world.avito.count_status(500).to_string()),
        ("avito_dropped", world.avito.count_status(0).to_string()),
        ("amocrm_http_500", world.amo.count_status(500).to_string()),
        ("amocrm_http_403", world.amo.count_status(403).to_string()),
    ]);
    Ok((figures, broken))
}

/// Orders linked to a lead so far: of the marketplace `api`, or (amoCRM) all.
async fn linked_of(world: &World, api: &str) -> Result<i64, BenchError> {
    match api {
        "kaspi" | "avito" => world.linked_at(api).await,
        _ => world.linked().await,
    }
}

/// Requests the simulator of `api` received so far.
fn requests(world: &World, api: &str) -> usize {
    match api {
        "kaspi" => world.kaspi.requests().len(),
        "avito" => world.avito.requests().len(),
        _ => world.amo.requests().len(),
    }
}

/// Requests of `api` answered with a fault so far (5xx, 429, or no answer).
fn faulted(world: &World, api: &str) -> usize {
    let statuses: Vec<u16> = match api {
        "kaspi" => world.kaspi.requests().iter().map(|r| r.status).collect(),
        "avito" => world.avito.requests().iter().map(|r| r.status).collect(),
        _ => world.amo.requests().iter().map(|r| r.status).collect(),
    };
    statuses
        .iter()
        .filter(|s| **s >= 500 || **s == 429 || **s == 0)
        .count()
}
