//! The command line (clap): `run`, `demo`, `migrate`, `check-config`,
//! `reconcile`, `kpi`, `order`, `settle`, `dlq`, `circuit`, `map`, `bench`, `prove`.
//! Each command loads and validates the configuration first; nothing starts on
//! an invalid one.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "orderbridge",
    version,
    about = "Kaspi.kz / Avito <-> amoCRM order bridge"
)]
pub struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, short, global = true, env = "ORDERBRIDGE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (migrates the database first unless --no-migrate).
    Run {
        /// Do not migrate; refuse to start if the schema is behind.
        #[arg(long)]
        no_migrate: bool,
    },
    /// The whole product against in-process simulators of Kaspi, Avito and
    /// amoCRM: generated orders, simulated managers; prints a summary at the end.
    Demo {
        /// Time compression for the orders, the managers and the marketplaces.
        #[arg(long, default_value_t = 10.0)]
        speed: f64,
        /// Seed of the generated orders and moves (repeatable runs).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Stop by itself after this long (e.g. 2m); default: until Ctrl-C.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        run_for: Option<std::time::Duration>,
        /// New orders per demo minute, across both marketplaces.
        #[arg(long, default_value_t = 4.0)]
        orders_per_minute: f64,
        /// Keep the demo database from the last run instead of starting afresh.
        #[arg(long)]
        keep: bool,
        /// Where the daemon's HTTP side listens.
        #[arg(long, default_value = "127.0.0.1:8088")]
        listen: std::net::SocketAddr,
    },
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Validate the configuration and exit.
    CheckConfig {
        /// Also check every map against the live CRM (pipelines, stages, users,
        /// fields, options); needs the database for the CRM tokens.
        #[arg(long)]
        online: bool,
    },
    /// Compare the marketplaces' orders with the store and the leads in amoCRM,
    /// and repair every difference through the outbox. Exit code 1 when
    /// something could not be repaired.
    Reconcile(ReconcileArgs),
    /// The KPIs a manager watches (confirmation time, SLA compliance, full
    /// cycle, cancellations, the sync's health) for a range, as tables or JSON.
    Kpi {
        /// Range start: a moment, a date (its start in Almaty) or a duration back (7d). Default: 24h.
        #[arg(long)]
        from: Option<String>,
        /// Range end (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Only this shop.
        #[arg(long)]
        shop: Option<String>,
        /// JSON (the same as `GET /api/kpi`).
        #[arg(long)]
        json: bool,
    },
    /// The weekly commission settlement of a partner source (its leads' last
    /// status of the week, what counts, the commission) or of an Avito shop
    /// (`prices.commission` of its closed orders); a summary table, the lines
    /// as CSV with --out, and every difference from the partner's own report
    /// with --compare. Exit code 1 when --compare finds a difference.
    Settle {
        /// A partner source (`partners.<name>`) or an Avito shop.
        #[arg(long)]
        source: String,
        /// The ISO week, e.g. 2026-W47 (Monday 00:00 to Monday 00:00 in `sla.timezone`).
        #[arg(long)]
        week: String,
        /// Write the settlement's lines here as CSV.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// The partner's own weekly report (CSV; its column names from
        /// `partners.<source>.settlement`) to compare with.
        #[arg(long)]
        compare: Option<std::path::PathBuf>,
    },
    /// One order's story across the marketplace, the bridge and amoCRM.
    Order {
        #[command(subcommand)]
        action: OrderAction,
    },
    /// Inspect and replay dead-lettered jobs.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Inspect and reset circuit breakers (traffic stopped after e.g. amoCRM's 403).
    Circuit {
        #[command(subcommand)]
        action: CircuitAction,
    },
    /// Status maps: what the bridge would do.
    Map {
        #[command(subcommand)]
        action: MapAction,
    },
    /// Measure performance; prints `key: value` lines.
    Bench {
        #[command(subcommand)]
        which: BenchWhich,
    },
    /// Prove a promise under fire (crashes, faults, load); prints `key:
    /// value` lines and exits 1 naming every promise broken.
    Prove {
        #[command(subcommand)]
        which: ProveWhich,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProveWhich {
    /// SIGKILL the daemon at random moments while orders and managers' moves
    /// flow; every order one lead in its stage, every move at Kaspi once.
    /// `--replicas 3`: three daemons on one database, a random one killed.
    Crash(crate::prove::crash::CrashArgs),
    /// Kill the daemon's database connections, then restart PostgreSQL:
    /// `/readyz` tells the outage, the daemon reconnects, nothing is lost.
    DbFaults(crate::prove::faults::FaultArgs),
    /// Kaspi, then amoCRM: 20 % 500s, timeouts, resets, a 429 storm; then
    /// amoCRM's 403 block (all traffic stops until `circuit reset`).
    ApiFaults(crate::prove::faults::FaultArgs),
    /// A 72-hour outage's backlog (1,200, then 10,000 orders) caught up
    /// after a restart, then 1,000 amoCRM webhooks a second for 10 s.
    Load(crate::prove::load::LoadArgs),
    /// The daemon as its container runs it: non-root, read-only root
    /// filesystem; no secret in the configuration's Debug output.
    Security(crate::prove::security::SecurityArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// From when: a date (2026-12-01, the start of that day in Almaty), a
    /// moment (RFC 3339), or a duration back from now (36h, 3d). Default: the
    /// configured look-back (`reconcile.look_back`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only this shop (its name in config); default: every shop.
    #[arg(long)]
    pub shop: Option<String>,
    /// Report what differs without changing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum OrderAction {
    /// The order's timeline, oldest first: marketplace statuses, the bridge's
    /// moves and notes, jobs and every attempt, the CRM changes of its lead,
    /// marketplace actions and their answers.
    Show {
        /// The order's code (the number people see).
        code: String,
        /// The shop, when several have an order with this code.
        #[arg(long)]
        shop: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead-lettered jobs, newest first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Put a dead job (or all of them) back in the queue with a fresh schedule.
    Retry {
        /// Job id.
        id: Option<i64>,
        /// Replay every dead job.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Remove a dead job for good (its attempt history stays).
    Discard { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum MapAction {
    /// Explains a marketplace status (where the lead goes) or a CRM stage (what a
    /// manager's move there does at the marketplace), for one shop's map.
    Explain {
        /// The shop (its name in config).
        #[arg(long)]
        shop: String,
        /// A status key, e.g. `accepted`.
        #[arg(long, conflicts_with = "stage")]
        status: Option<String>,
        /// A CRM stage name, e.g. "Готов к отгрузке".
        #[arg(long)]
        stage: Option<String>,
        /// Resolve names to ids in the live CRM.
        #[arg(long)]
        online: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CircuitAction {
    /// Open circuits, with their reason and cool-down.
    List,
    /// Close a target's circuit now (e.g. `amocrm:main`, once support has unblocked the IP).
    Reset { target: String },
}

#[derive(Debug, Subcommand)]
pub enum BenchWhich {
    /// The outbox engine: drain throughput, latency, rate-limit accuracy.
    Outbox(crate::bench::outbox::OutboxBenchArgs),
    /// The amoCRM client against the simulator at 7 req/s: 10,000 status updates.
    Amocrm(crate::bench::amocrm::AmoBenchArgs),
    /// The Kaspi poller against the simulator: 5,000 orders, first and steady polls.
    Kaspi(crate::bench::kaspi::KaspiBenchArgs),
    /// Avito transitions against the simulator's (scaled) per-minute limit.
    Avito(crate::bench::avito::AvitoBenchArgs),
    /// The KPIs over a seeded history of 100,000 orders.
    Kpi(crate::bench::kpi::KpiBenchArgs),
    /// Reconciliation: 5,000 orders with leads, 200 drifts planted, one run.
    Reconcile(crate::bench::reconcile::ReconcileBenchArgs),
    /// Partner status reports: 500 leads, 3,000 reports through a partner limited to 5/s.
    Partner(crate::bench::partner::PartnerBenchArgs),
    /// The daemon end to end at amoCRM's 7 req/s: a 10,000-order backlog, steady
    /// arrivals, managers' moves back to Kaspi.
    Pipeline(crate::bench::pipeline::PipelineBenchArgs),
}

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: i32 = 2;

/// Runs the parsed command.
pub async fn execute(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    if matches!(
        cli.command,
        Command::Run { .. } | Command::CheckConfig { .. }
    ) {
        let problems = crate::mapping::check_shop_maps(&settings);
        if !problems.is_empty() {
            eprintln!("orderbridge: invalid status map(s):");
            for problem in &problems {
                eprintln!("  - {problem}");
            }
            std::process::exit(EXIT_CONFIG);
        }
    }
    match cli.command {
        Command::Run { no_migrate } => crate::daemon::run(settings, !no_migrate).await?,
        Command::Demo {
            speed,
            seed,
            run_for,
            orders_per_minute,
            keep,
            listen,
        } => {
            use secrecy::ExposeSecret;
            let stop = tokio_util::sync::CancellationToken::new();
            let on_signal = {
                let stop = stop.clone();
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        stop.cancel();
                    }
                })
            };
            let options = crate::demo::DemoOptions {
                speed,
                seed,
                run_for,
                orders_per_minute,
                database_url: settings.database.url.expose_secret().to_string(),
                database: "orderbridge_demo".into(),
                keep,
                listen,
                live: std::io::IsTerminal::is_terminal(&std::io::stdout()) || run_for.is_none(),
            };
            let finished = crate::demo::run(options, stop).await?;
            on_signal.abort();
            println!("{}", finished.summary);
        }
        Command::Migrate => {
            let pool = crate::daemon::open_database(&settings.database).await?;
            crate::store::migrate(&pool).await?;
            println!("database schema is current");
        }
        Command::CheckConfig { online } => {
            if online {
                let pool = crate::daemon::open_database(&settings.database).await?;
                crate::store::migrate(&pool).await?;
                let limiters = crate::daemon::limiters(&settings);
                let crm = crate::daemon::amocrm_clients(&settings, &pool, &limiters).await?;
                let sources = crate::mapping::MapSource::from_settings(&settings);
                let funnels = crate::mapping::FunnelSource::from_settings(&settings);
                let problems = match crate::mapping::MapRegistry::load_with_funnels(
                    sources, funnels, &crm,
                )
                .await
                {
                    Err(problems) => problems,
                    Ok(registry) => {
                        let set = registry.current();
                        set.shops
                            .iter()
                            .filter(|(_, map)| !map.online)
                            .map(|(shop, map)| format!("{}: the CRM account of shop `{shop}` did not answer; only the offline checks ran", map.file))
                            .chain(set.funnels.iter().filter(|(_, map)| !map.online).map(|(source, map)| format!("{}: the CRM account of partner source `{source}` did not answer; only the offline checks ran", map.file)))
                            .collect()
                    }
                };
                if !problems.is_empty() {
                    eprintln!("orderbridge: the maps do not match the live CRM:");
                    for problem in &problems {
                        eprintln!("  - {problem}");
                    }
                    std::process::exit(EXIT_CONFIG);
                }
            }
            println!(
                "configuration is valid: {} CRM account(s), {} shop(s), {} partner source(s), their maps valid{}",
                settings.crm_accounts.len(),
                settings.shops.len(),
                settings.partners.len(),
                if online { " against the live CRM" } else { "" }
            );
        }
        Command::Reconcile(args) => {
            let stop = tokio_util::sync::CancellationToken::new();
            let on_signal = {
                let stop = stop.clone();
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        stop.cancel();
                    }
                })
            };
            let summary = reconcile(&settings, &args, &stop).await?;
            on_signal.abort();
            println!("{}", summary_table(&summary));
            if summary.failed > 0 {
                std::process::exit(1);
            }
        }
        Command::Kpi {
            from,
            to,
            shop,
            json,
        } => {
            let kpis = kpi(&settings, from.as_deref(), to.as_deref(), shop.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&kpis)?);
            } else {
                println!("{}", crate::sla::kpi::render(&kpis));
            }
        }
        Command::Order {
            action: OrderAction::Show { code, shop, json },
        } => match order_show(&settings, &code, shop.as_deref(), json).await? {
            Some(text) => println!("{text}"),
            None => {
                eprintln!(
                    "orderbridge: no order with code {code}{}",
                    shop.map(|s| format!(" in shop `{s}`")).unwrap_or_default()
                );
                std::process::exit(1);
            }
        },
        Command::Settle {
            source,
            week,
            out,
            compare,
        } => {
            let differences = settle(
                &settings,
                &source,
                &week,
                out.as_deref(),
                compare.as_deref(),
            )
            .await?;
            if differences > 0 {
                std::process::exit(1);
            }
        }
        Command::Dlq { action } => dlq(&settings, action).await?,
        Command::Circuit { action } => circuit(&settings, action).await?,
        Command::Map {
            action:
                MapAction::Explain {
                    shop,
                    status,
                    stage,
                    online,
                },
        } => {
            let text = explain(
                &settings,
                &shop,
                status.as_deref(),
                stage.as_deref(),
                online,
            )
            .await?;
            println!("{text}");
        }
        Command::Bench {
            which: BenchWhich::Outbox(args),
        } => {
            crate::bench::outbox::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Bench {
            which: BenchWhich::Kpi(args),
        } => {
            crate::bench::kpi::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Bench {
            which: BenchWhich::Reconcile(args),
        } => {
            crate::bench::reconcile::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Prove {
            which: ProveWhich::Crash(args),
        } => {
            crate::prove::crash::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Prove {
            which: ProveWhich::DbFaults(args),
        } => {
            let suite = crate::prove::faults::Suite::Database;
            crate::prove::faults::run(&settings, suite, &args, &mut std::io::stdout()).await?;
        }
        Command::Prove {
            which: ProveWhich::ApiFaults(args),
        } => {
            let suite = crate::prove::faults::Suite::Apis;
            crate::prove::faults::run(&settings, suite, &args, &mut std::io::stdout()).await?;
        }
        Command::Prove {
            which: ProveWhich::Load(args),
        } => {
            crate::prove::load::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Prove {
            which: ProveWhich::Security(args),
        } => {
            crate::prove::security::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Bench {
            which: BenchWhich::Pipeline(args),
        } => {
            crate::bench::pipeline::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Bench {
            which: BenchWhich::Partner(args),
        } => {
            crate::bench::partner::run(&settings, &args, &mut std::io::stdout()).await?;
        }
        Command::Bench {
            which: BenchWhich::Avito(args),
        } => {
            crate::bench::avito::run(&args, &mut std::io::stdout()).await?;
        }
        Command::Bench {
            which: BenchWhich::Kaspi(args),
        } => {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || {
                crate::bench::kaspi::run(&settings, &args, &mut std::io::stdout())
            })
            .await??;
        }
        Command::Bench {
            which: BenchWhich::Amocrm(args),
        } => {
            crate::bench::amocrm::run(&settings, &args, &mut std::io::stdout()).await?;
        }
    }
    Ok(())
}

/// `orderbridge settle`: prints the summary (and the differences), writes
/// the CSV; returns how many differences `--compare` found.
pub async fn settle(
    settings: &Settings,
    source: &str,
    week: &str,
    out: Option<&std::path::Path>,
    compare: Option<&std::path::Path>,
) -> anyhow::Result<usize> {
    let timezone: chrono_tz::Tz = settings
        .sla
        .timezone
        .parse()
        .map_err(|e| anyhow::anyhow!("sla.timezone: {e}"))?;
    let week = crate::reports::parse_week(week, timezone)?;
    // The partner's file is read (and refused) before anything else.
    let theirs = match compare {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            Some(crate::reports::read_partner_csv(
                &path.display().to_string(),
                &text,
                &crate::reports::PartnerColumns::from_settings(settings, source),
            )?)
        }
        None => None,
    };
    let pool = crate::daemon::open_database(&settings.database).await?;
    crate::store::ensure_schema_current(&pool).await?;
    let settlement = crate::reports::settle(&pool, settings, source, &week).await?;
    if let Some(path) = out {
        std::fs::write(path, settlement.to_csv())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    println!("{}", settlement_table(&settlement));
    let Some(theirs) = theirs else {
        return Ok(0);
    };
    let differences = crate::reports::compare(&settlement, &theirs);
    if differences.is_empty() {
        println!(
            "the partner's report agrees: {} line(s), no difference",
            theirs.len()
        );
    } else {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        table.set_header(["lead", "difference", "detail"]);
        for d in &differences {
            table.add_row([d.id().to_string(), d.kind().to_string(), d.detail()]);
        }
        println!(
            "{} difference(s) from the partner's report:\n{table}",
            differences.len()
        );
    }
    Ok(differences.len())
}

/// The settlement's summary as a table.
pub fn settlement_table(settlement: &crate::reports::Settlement) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["settlement", "value"]);
    let mut statuses: std::collections::BTreeMap<&str, usize> = Default::default();
    for line in &settlement.lines {
        *statuses.entry(line.status.as_str()).or_default() += 1;
    }
    let rows: Vec<(String, String)> = [
        (
            "source".to_string(),
            format!("{} ({})", settlement.source, settlement.kind),
        ),
        (
            "week".to_string(),
            format!(
                "{} ({} – {} UTC)",
                settlement.week.name,
                settlement.week.from.format("%Y-%m-%d %H:%M"),
                settlement.week.to.format("%Y-%m-%d %H:%M")
            ),
        ),
        ("leads".to_string(), settlement.lines.len().to_string()),
    ]
    .into_iter()
    .chain(
        statuses
            .into_iter()
            .map(|(status, n)| (format!("  last status {status}"), n.to_string())),
    )
    .chain([
        ("counted".to_string(), settlement.counted().to_string()),
        (
            "commission".to_string(),
            format!("{:.2}", settlement.total()),
        ),
        (
            "reports not yet taken".to_string(),
            settlement.unsent().to_string(),
        ),
    ])
    .collect();
    for (k, v) in rows {
        table.add_row([k, v]);
    }
    table.to_string()
}

/// Parses `--since`: a date (the start of that day in Almaty, UTC+5), an RFC
/// 3339 moment, or a duration back from `now`; a moment in the future is refused.
pub fn parse_since(
    text: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let at =
        crate::sla::kpi::parse_moment(text, now).map_err(|why| anyhow::anyhow!("--since {why}"))?;
    anyhow::ensure!(
        at <= now,
        "--since `{}`: that is in the future; {}",
        text.trim(),
        crate::sla::kpi::MOMENTS_ACCEPTED
    );
    Ok(at)
}

/// `orderbridge reconcile`: one run per CRM account (or the shop's). A run
/// goes to the daemon through the outbox when a live replica serves the
/// account (its amoCRM reads then share the daemon's limiter), and the
/// command follows it; otherwise the command carries it out itself. Progress
/// bars on a terminal; `stop` (Ctrl-C) ends the runs early, keeping what is
/// done.
pub async fn reconcile(
    settings: &Settings,
    args: &ReconcileArgs,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<crate::sync::reconcile::Summary> {
    use crate::store::reconcile as runs;
    use crate::sync::reconcile::{Scope, Summary};
    let now = chrono::Utc::now();
    let since = match &args.since {
        Some(text) => parse_since(text, now)?,
        None => {
            now - chrono::Duration::from_std(settings.reconcile.look_back)
                .unwrap_or(chrono::Duration::days(2))
        }
    };
    let scopes: Vec<Scope> = match &args.shop {
        Some(shop) => {
            let Some(found) = settings.shops.get(shop) else {
                anyhow::bail!(
                    "no shop `{shop}` in the configuration (shops: {})",
                    settings
                        .shops
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            vec![Scope {
                crm_account: found.crm_account.clone(),
                shop: Some(shop.clone()),
                since,
                dry_run: args.dry_run,
            }]
        }
        None => {
            let accounts: std::collections::BTreeSet<&String> =
                settings.shops.values().map(|s| &s.crm_account).collect();
            accounts
                .into_iter()
                .map(|account| Scope {
                    crm_account: account.clone(),
                    shop: None,
                    since,
                    dry_run: args.dry_run,
                })
                .collect()
        }
    };
    let pool = crate::daemon::open_database(&settings.database).await?;
    crate::store::ensure_schema_current(&pool).await?;
    let bars = Bars::new();
    let mut summaries = Vec::new();
    let mut direct: Option<crate::sync::reconcile::Sources> = None;
    for scope in scopes {
        let target = format!("amocrm:{}", scope.crm_account);
        let served = runs::target_served(&pool, &target).await?;
        // The run, and (when a daemon serves the account) its job, in one transaction.
        let mut tx = pool.begin().await?;
        let run_id = runs::create_run(
            &mut tx,
            &scope.crm_account,
            scope.shop.as_deref(),
            scope.since,
            scope.dry_run,
            "command",
        )
        .await?;
        if served {
            crate::store::outbox::enqueue(
                &mut tx,
                &crate::sync::reconcile::job(&scope.crm_account, run_id),
            )
            .await?;
        }
        tx.commit().await?;
        if served {
            eprintln!(
                "reconcile: the daemon serves `{}`; run {run_id} goes through its outbox (sharing its amoCRM budget)",
                scope.crm_account
            );
            let mut cancel_sent = false;
            let summary = loop {
                if stop.is_cancelled() && !cancel_sent {
                    runs::request_cancel(&pool, run_id).await?;
                    cancel_sent = true;
                }
                let run = runs::run(&pool, run_id)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("run {run_id} disappeared"))?;
                if let Some(phase) = &run.phase {
                    bars.show(
                        phase,
                        u64::try_from(run.done).unwrap_or(0),
                        run.total.and_then(|t| u64::try_from(t).ok()),
                    );
                }
                if let (Some(_), Some(summary)) = (run.finished_at, run.summary) {
                    break serde_json::from_value::<Summary>(summary)?;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            };
            summaries.push(summary);
        } else {
            if direct.is_none() {
                direct = Some(crate::daemon::reconcile_sources(settings, &pool).await?);
                // amoCRM counts each account's requests per second; a fresh
                // limiter cannot know what a just-stopped daemon spent, so
                // the first request waits out one window.
                tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            }
            let Some(sources) = direct.as_ref() else {
                continue;
            };
            runs::mark_started(&pool, run_id).await?;
            let progress =
                |phase: &str, done: u64, total: Option<u64>| bars.show(phase, done, total);
            let summary = sources.reconcile(&scope, &progress, stop).await?;
            crate::sync::reconcile::report(&scope, &summary);
            runs::finish(&pool, run_id, &serde_json::to_value(&summary)?).await?;
            summaries.push(summary);
        }
    }
    bars.finish();
    Ok(Summary::total(summaries))
}

/// One progress bar per reconciliation phase (drawn only on a terminal).
struct Bars {
    multi: indicatif::MultiProgress,
    current: std::sync::Mutex<Option<(String, indicatif::ProgressBar)>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            multi: indicatif::MultiProgress::new(),
            current: std::sync::Mutex::new(None),
        }
    }

    fn show(&self, phase: &str, done: u64, total: Option<u64>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_none_or(|(name, _)| name != phase) {
            if let Some((_, bar)) = current.take() {
                bar.finish();
            }
            let bar = self
                .multi
                .add(indicatif::ProgressBar::new(total.unwrap_or(0)));
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>16} [{bar:40}] {pos}/{len} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(phase.to_string());
            *current = Some((phase.to_string(), bar));
        }
        if let Some((_, bar)) = current.as_ref() {
            if let Some(total) = total {
                bar.set_length(total);
            }
            bar.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some((_, bar)) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            bar.finish();
        }
    }
}

/// `orderbridge kpi`: the KPIs of `[from, to)` (default: the last 24 h).
pub async fn kpi(
    settings: &Settings,
    from: Option<&str>,
    to: Option<&str>,
    shop: Option<&str>,
) -> anyhow::Result<crate::sla::kpi::Kpis> {
    let now = chrono::Utc::now();
    let parse = |v: Option<&str>, default| match v {
        None => Ok(default),
        Some(text) => crate::sla::kpi::parse_moment(text, now).map_err(anyhow::Error::msg),
    };
    let from = parse(from, now - chrono::Duration::hours(24))?;
    let to = parse(to, now)?;
    anyhow::ensure!(from < to, "--from must be before --to");
    let pool = crate::daemon::open_database(&settings.database).await?;
    crate::store::ensure_schema_current(&pool).await?;
    Ok(crate::sla::kpi::compute(&pool, from, to, shop, now).await?)
}

/// `orderbridge order show`: the order's timeline as a table (or JSON);
/// `None` when no order has the code. Several shops with the code and no
/// `--shop`: an error naming them.
pub async fn order_show(
    settings: &Settings,
    code: &str,
    shop: Option<&str>,
    json: bool,
) -> anyhow::Result<Option<String>> {
    use crate::store::timeline;
    let pool = crate::daemon::open_database(&settings.database).await?;
    crate::store::ensure_schema_current(&pool).await?;
    let found = timeline::find_by_code(&pool, code, shop).await?;
    let order = match found.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        many => anyhow::bail!(
            "order {code} exists in several shops ({}); give --shop",
            many.iter()
                .map(|o| o.account.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let key =
        crate::sync::ingest::order_key(&order.marketplace, &order.account, &order.external_id);
    let entries = timeline::entries(&pool, &order, &key).await?;
    let lead_url = match (&order.crm_account, order.lead_id) {
        (Some(account), Some(lead)) => settings
            .crm_accounts
            .get(account)
            .map(|crm| format!("{}/leads/detail/{lead}", crm.base_url.trim_end_matches('/'))),
        _ => None,
    };
    if json {
        let value = serde_json::json!({
            "order": {
                "code": order.code,
                "marketplace": order.marketplace,
                "shop": order.account,
                "external_id": order.external_id,
                "status": order.status_key,
                "final": order.is_terminal,
                "created_at": order.source_created_at,
            },
            "crm": {
                "account": order.crm_account,
                "lead_id": order.lead_id,
                "contact_id": order.contact_id,
                "lead_url": lead_url,
            },
            "timeline": entries,
        });
        return Ok(Some(serde_json::to_string_pretty(&value)?));
    }
    let mut text = format!(
        "order {} ({} shop `{}`, id {}): {}{}\n",
        order.code,
        order.marketplace,
        order.account,
        order.external_id,
        order.status_key,
        if order.is_terminal { " (final)" } else { "" }
    );
    match (order.lead_id, &lead_url) {
        (Some(lead), Some(url)) => text.push_str(&format!(
            "lead {lead}, contact {}: {url}\n",
            order
                .contact_id
                .map(|c| c.to_string())
                .unwrap_or_else(|| "none".into())
        )),
        _ => text.push_str("no lead yet\n"),
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(vec!["at (UTC)", "where", "what", "detail"]);
    for entry in &entries {
        table.add_row(vec![
            entry.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
            entry.source.clone(),
            entry.what.clone(),
            entry.detail.clone(),
        ]);
    }
    text.push_str(&table.to_string());
    Ok(Some(text))
}

/// The summary as a table, then the failures' reasons.
pub fn summary_table(summary: &crate::sync::reconcile::Summary) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(vec!["outcome", "orders"]);
    for (outcome, n) in summary.rows() {
        table.add_row(vec![outcome.to_string(), n.to_string()]);
    }
    let mut text = table.to_string();
    if summary.dry_run {
        text.push_str("\ndry run: nothing was changed");
    }
    if summary.cancelled {
        text.push_str("\nstopped early: what is counted was done completely; run again to finish");
    }
    for why in &summary.failures {
        text.push_str(&format!("\nfailed: {why}"));
    }
    text
}

/// What the bridge would do for a status or a stage of one shop's map.
pub async fn explain(
    settings: &Settings,
    shop: &str,
    status: Option<&str>,
    stage: Option<&str>,
    online: bool,
) -> anyhow::Result<String> {
    use crate::mapping::{MapRegistry, MapSource, Route};
    let Some(source) = MapSource::from_settings(settings)
        .into_iter()
        .find(|s| s.shop == shop)
    else {
        anyhow::bail!(
            "no shop `{shop}` in the configuration (shops: {})",
            settings
                .shops
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let crm = if online {
        let pool = crate::daemon::open_database(&settings.database).await?;
        crate::store::migrate(&pool).await?;
        let limiters = crate::daemon::limiters(settings);
        crate::daemon::amocrm_clients(settings, &pool, &limiters)
            .await?
            .into_iter()
            .filter(|(name, _)| *name == source.crm_account)
            .collect()
    } else {
        Default::default()
    };
    let registry = MapRegistry::load(vec![source.clone()], &crm)
        .await
        .map_err(|problems| anyhow::anyhow!("invalid map:\n  - {}", problems.join("\n  - ")))?;
    let set = registry.current();
    let map = set
        .shops
        .get(shop)
        .ok_or_else(|| anyhow::anyhow!("the map of `{shop}` did not load"))?;
    let id = |id: Option<u64>| id.map(|i| format!(" (id {i})")).unwrap_or_default();
    if let Some(status) = status {
        let Some(route) = map.route(status) else {
            anyhow::bail!(
                "`{status}` is not a status key of this map; keys: {}",
                map.statuses.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        return Ok(match route {
            Route::Ignore => {
                format!("{shop}: status `{status}` is ignored: the lead's stage does not change")
            }
            Route::Stage {
                stage,
                stage_id,
                role,
                sla,
            } => {
                let who = match role
                    .as_ref()
                    .and_then(|r| map.roles.get(r).map(|def| (r, def)))
                {
                    Some((name, def)) => {
                        format!("role `{name}` ({}; {})", def.users.join(", "), def.pick)
                    }
                    None => "the lead's current responsible".to_string(),
                };
                let sla = match sla {
                    None => "no SLA".to_string(),
                    Some(None) => "SLA until the end of the day".to_string(),
                    Some(Some(d)) => format!("SLA {}", humantime::format_duration(*d)),
                };
                format!(
                    "{shop}: status `{status}` → stage «{stage}»{} of pipeline «{}»{}; responsible: {who}; {sla}",
                    id(*stage_id),
                    map.pipeline,
                    id(map.pipeline_id)
                )
            }
        });
    }
    if let Some(stage) = stage {
        return Ok(match map.action_for_stage(None, stage) {
            Some(action) => {
                let mut params = Vec::new();
                if let Some(reason) = &action.reason {
                    params.push(format!("reason {reason}"));
                }
                if let Some(spaces) = action.spaces {
                    params.push(format!("{spaces} parcel(s)"));
                }
                if let Some(comment) = &action.comment {
                    params.push(format!("comment «{comment}»"));
                }
                format!(
                    "{shop}: a manager's move into «{}»{} → {} action `{}`{}",
                    action.stage,
                    id(action.stage_id),
                    source.marketplace,
                    action.action,
                    if params.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", params.join(", "))
                    }
                )
            }
            None => format!(
                "{shop}: a manager's move into «{stage}» does nothing at {}",
                source.marketplace
            ),
        });
    }
    anyhow::bail!("give --status KEY or --stage NAME")
}

async fn circuit(settings: &Settings, action: CircuitAction) -> anyhow::Result<()> {
    let pool = crate::daemon::open_database(&settings.database).await?;
    crate::store::ensure_schema_current(&pool).await?;
    match action {
        CircuitAction::List => {
            let open = crate::store::circuits::list_open(&pool, chrono::Utc::now()).await?;
            if open.is_empty() {
                println!("no open circuits");
            }
            for c in open {
                println!(
                    "{}\topened={}\tuntil={}\t{}",
                    c.target,
                    c.opened_at.to_rfc3339(),
                    c.open_until.to_rfc3339(),
                    c.reason
                );
            }
        }
        CircuitAction::Reset { target } => {
            let (closed, woken) = crate::store::circuits::close(&pool, &target).await?;
            anyhow::ensure!(closed, "no circuit is open for {target}");
            println!(
                "circuit of {target} closed; traffic resumes within seconds ({woken} jobs it put off are due now)"
            );
        }
    }
    Ok(())
}

async fn dlq(settings: &Settings, action: DlqAction) -> anyhow::Result<()> {
    use crate::store::outbox::{self as store, Replay};
    let pool = crate::daemon::open_database(&settings.database).await?;
    crate::store::ensure_schema_current(&pool).await?;
    match action {
        DlqAction::List { limit } => {
            let dead = store::list_dead(&pool, limit).await?;
            if dead.is_empty() {
                println!("no dead-lettered jobs");
            }
            for job in dead {
                println!(
                    "{id}\t{kind}\t{target}\t{key}\tattempts={attempts}\tdead_since={since}\t{error}",
                    id = job.id,
                    kind = job.kind,
                    target = job.target,
                    key = job.ordering_key,
                    attempts = job.attempts,
                    since = job.updated_at.to_rfc3339(),
                    error = job.last_error.unwrap_or_default(),
                );
            }
        }
        DlqAction::Retry { id: Some(id), .. } => match store::replay_dead(&pool, id).await? {
            Replay::Requeued => println!("job {id} is back in the queue"),
            Replay::Superseded { by } => {
                println!("job {id} removed: pending job {by} carries the same intent")
            }
            Replay::NotFound => anyhow::bail!("no dead-lettered job with id {id}"),
        },
        DlqAction::Retry { id: None, all } => {
            anyhow::ensure!(all, "give a job id or --all");
            let (requeued, superseded) = store::replay_all_dead(&pool).await?;
            println!(
                "{requeued} job(s) back in the queue, {superseded} superseded by pending jobs"
            );
        }
        DlqAction::Discard { id } => {
            let found = store::discard_dead(&pool, id)
                .await
                .with_context(|| format!("discarding job {id}"))?;
            anyhow::ensure!(found, "no dead-lettered job with id {id}");
            println!("job {id} discarded");
        }
    }
    Ok(())
}
