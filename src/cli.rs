//! The command line (clap): `run`, `migrate`, `check-config`, `dlq`, `bench`.
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
                let problems = match crate::mapping::MapRegistry::load(sources, &crm).await {
                    Err(problems) => problems,
                    Ok(registry) => registry
                        .current()
                        .shops
                        .iter()
                        .filter(|(_, map)| !map.online)
                        .map(|(shop, map)| format!("{}: the CRM account of shop `{shop}` did not answer; only the offline checks ran", map.file))
                        .collect(),
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
                "configuration is valid: {} CRM account(s), {} shop(s), their maps valid{}",
                settings.crm_accounts.len(),
                settings.shops.len(),
                if online { " against the live CRM" } else { "" }
            );
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
            let closed = crate::store::circuits::close(&pool, &target).await?;
            anyhow::ensure!(closed, "no circuit is open for {target}");
            println!("circuit of {target} closed; traffic resumes within seconds");
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
