//! The daemon (`orderbridge run`): connects and migrates the database, serves
//! the HTTP side, runs the outbox engine, and shuts everything down in order on
//! SIGTERM/SIGINT.

use tokio_util::sync::CancellationToken;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{CrmAuth, MarketplaceKind, Settings};
use crate::connectors::amocrm::{AmoAccount, AmoAuth, AmoClient, AmoError};
use crate::connectors::avito::{AvitoAccount, AvitoClient, AvitoLimiters};
use crate::connectors::kaspi::{KaspiClient, KaspiShop};
use crate::http::hooks::HookAccount;
use crate::outbox::limits::Limiters;
use crate::outbox::{Engine, EngineConfig, OutboxError};
use crate::store::StoreError;
use crate::sync::avito_poll::AvitoPoller;
use crate::sync::kaspi_poll::KaspiPoller;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid status map(s):\n  - {0}")]
    Maps(String),
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Runs until SIGTERM or SIGINT, then stops gracefully.
pub async fn run(settings: Settings, migrate: bool) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let result = run_until(settings, migrate, shutdown).await;
    signals.abort();
    result
}

/// Runs until `shutdown` is cancelled.
pub async fn run_until(
    settings: Settings,
    migrate: bool,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let metrics = crate::telemetry::metrics()?;
    let pool = open_database(&settings.database).await?;
    if migrate {
        crate::store::migrate(&pool).await?;
        tracing::info!("Database schema is current.");
    } else {
        crate::store::ensure_schema_current(&pool).await?;
    }
    let limiters = limiters(&settings);
    let sla = crate::sla::SlaPolicy::from_settings(&settings.sla)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let crm_clients = amocrm_clients(&settings, &pool, &limiters).await?;
    let maps = Arc::new(
        crate::mapping::MapRegistry::load_with_funnels(
            crate::mapping::MapSource::from_settings(&settings),
            crate::mapping::FunnelSource::from_settings(&settings),
            &crm_clients,
        )
        .await
        .map_err(|problems| DaemonError::Maps(problems.join("\n  - ")))?,
    );
    let releaser = tokio::spawn(release_when_resolved(
        maps.clone(),
        pool.clone(),
        shutdown.clone(),
    ));
    let watcher = {
        let (m, c, s) = (maps.clone(), crm_clients.clone(), shutdown.clone());
        tokio::spawn(crate::sync::supervise(
            "map_watcher".into(),
            shutdown.clone(),
            move || {
                m.clone()
                    .watch(c.clone(), std::time::Duration::from_secs(2), s.clone())
            },
        ))
    };
    let inbox_wake = Arc::new(tokio::sync::Notify::new());
    let listener = crate::http::bind(settings.http.listen).await?;
    tracing::info!(listen = %settings.http.listen, "Serving /healthz, /readyz and /metrics.");
    let state = crate::http::AppState {
        pool: pool.clone(),
        metrics,
        amocrm_hooks: std::sync::Arc::new(hook_accounts(&settings)),
        avito_hooks: std::sync::Arc::new(avito_hook_accounts(&settings)),
        partner_hooks: std::sync::Arc::new(partner_hook_sources(&settings)),
        webhook_body_limit: settings.http.webhook_body_limit_bytes,
        maps: Some(maps.clone()),
        inbox_wake: inbox_wake.clone(),
        dashboard: crate::http::Dashboard {
            access: crate::http::DashboardAccess::for_listen(
                settings.http.listen,
                settings.http.access_token.clone(),
            ),
            crm_urls: Arc::new(
                settings
                    .crm_accounts
                    .iter()
                    .map(|(name, crm)| (name.clone(), crm.base_url.clone()))
                    .collect(),
            ),
        },
    };
    if matches!(
        state.dashboard.access,
        crate::http::DashboardAccess::Refused
    ) {
        tracing::warn!(listen = %settings.http.listen,
            "http.listen is not a loopback address and no http.access_token is set: /api/kpi (and the dashboard) refuse every request.");
    }
    // Supervised: a failed server is served again on a fresh bind of the address.
    let http = {
        let first = Arc::new(std::sync::Mutex::new(Some(listener)));
        let (addr, stop) = (settings.http.listen, shutdown.clone());
        tokio::spawn(crate::sync::supervise(
            "http".into(),
            shutdown.clone(),
            move || {
                let (first, state, stop) = (first.clone(), state.clone(), stop.clone());
                async move {
                    let taken = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let listener = match taken {
                        Some(listener) => listener,
                        None => match crate::http::bind(addr).await {
                            Ok(listener) => listener,
                            Err(error) => {
                                tracing::error!(%error, "Cannot bind the HTTP side again.");
                                return;
                            }
                        },
                    };
                    if let Err(error) = crate::http::serve(listener, state, stop).await {
                        tracing::error!(%error, "The HTTP server stopped with an error.");
                    }
                }
            },
        ))
    };
    let owner = crate::outbox::default_owner();
    let started = start_pollers(&settings, &pool, &limiters, &owner, &shutdown).await?;
    let mut pollers = started.tasks;
    let partners = start_partners(&settings, &pool, &limiters, &owner, &shutdown).await?;
    pollers.extend(partners.tasks);
    pollers.extend(start_crm_tasks(
        &settings,
        &pool,
        &maps,
        &crm_clients,
        &inbox_wake,
        &Arc::new(sla.clone()),
        &shutdown,
    ));
    // One handler (one writer per account) for the CRM sync and the
    // responsible assignments.
    let crm_sync = Arc::new(
        crate::sync::to_crm::CrmSyncHandler::new(
            pool.clone(),
            crm_clients.clone(),
            maps.clone(),
            shop_crm(&settings),
        )
        .with_sla(sla.clone())
        .with_batch_fill(
            &settings
                .crm_accounts
                .iter()
                .map(|(name, crm)| (name.clone(), crm.batch_fill))
                .collect(),
        ),
    );
    // One handler creates partner leads and makes their stages' responsibles.
    let partner_leads = Arc::new(crate::sync::partner::PartnerLeadHandler::new(
        pool.clone(),
        crm_clients.clone(),
        maps.clone(),
    ));
    let engine = Engine::builder(pool.clone(), EngineConfig::from_settings(&settings.outbox))
        .owner(owner)
        .limiters(limiters.clone())
        .handler(crate::sync::to_crm::ASSIGN_KIND, crm_sync.clone())
        .handler(crate::sync::ingest::CRM_SYNC_KIND, crm_sync)
        // The account's writer sends up to 50 leads per request: let a batch fill.
        .batched(
            crate::sync::ingest::CRM_SYNC_KIND,
            3 * crate::connectors::amocrm::BATCH,
        )
        .handler(
            crate::sla::alerts::ALERT_KIND,
            crate::sla::alerts::AlertHandler::new(
                settings.alerts.url.clone(),
                settings.alerts.timeout,
            ),
        )
        .handler(
            crate::sla::timers::SLA_TASK_KIND,
            crate::sla::timers::SlaTaskHandler {
                pool: pool.clone(),
                clients: crm_clients.clone(),
                timezone: sla.calendar.timezone(),
            },
        )
        .handler(
            crate::sync::avito_leads::MESSENGER_LEAD_KIND,
            crate::sync::messenger_leads::MessengerLeadHandler {
                pool: pool.clone(),
                clients: crm_clients.clone(),
                maps: maps.clone(),
                shop_crm: settings
                    .shops
                    .iter()
                    .map(|(name, shop)| (name.clone(), shop.crm_account.clone()))
                    .collect(),
            },
        )
        .handler(
            crate::sync::partner::PARTNER_LEAD_KIND,
            partner_leads.clone(),
        )
        .handler(crate::sync::partner::PARTNER_ASSIGN_KIND, partner_leads)
        .handler(
            crate::sync::partner::PARTNER_REPORT_KIND,
            crate::sync::partner::PartnerReportHandler {
                pool: pool.clone(),
                clients: partners.clients,
            },
        )
        .handler(
            crate::sync::to_marketplace::MARKETPLACE_ACTION_KIND,
            crate::sync::to_marketplace::MarketplaceActionHandler {
                pool: pool.clone(),
                maps: maps.clone(),
                kaspi: started.kaspi.clone(),
                avito: started.avito.clone(),
                crm: crm_clients.clone(),
            },
        )
        .long_handler(
            crate::sync::reconcile::RECONCILE_KIND,
            crate::sync::reconcile::ReconcileHandler {
                sources: crate::sync::reconcile::Sources {
                    pool: pool.clone(),
                    maps: maps.clone(),
                    crm: crm_clients.clone(),
                    kaspi: started.kaspi,
                    avito: started.avito,
                    shop_crm: shop_crm(&settings),
                },
            },
            settings.reconcile.run_timeout,
        )
        .build();
    tracing::info!(clients = crm_clients.len(), "amoCRM clients ready.");
    tracing::info!(
        replica = engine.owner(),
        crm_accounts = settings.crm_accounts.len(),
        shops = settings.shops.len(),
        "orderbridge is running."
    );
    let engine_result = engine.run(shutdown.clone()).await;
    shutdown.cancel();
    for poller in pollers {
        let _ = poller.await;
    }
    let _ = watcher.await;
    let _ = releaser.await;
    if let Err(e) = http.await {
        tracing::error!(error = %e, "The HTTP server task failed.");
    }
    pool.close().await;
    engine_result?;
    tracing::info!("orderbridge stopped.");
    Ok(())
}

/// One limiter per target: amoCRM accounts are limited per request (a job may
/// make several calls), everything else per job.
pub fn limiters(settings: &Settings) -> Arc<Limiters> {
    let mut quotas = settings.outbox.limits.clone();
    // Alert deliveries: one a second unless configured.
    quotas
        .entry(crate::sla::alerts::ALERT_TARGET.to_string())
        .or_insert(crate::config::RateQuota {
            requests: 1,
            per: std::time::Duration::from_secs(1),
            burst: 3,
        });
    let mut limiters = Limiters::new(quotas);
    // Avito's clients take their permits per request, like amoCRM's.
    for (name, shop) in &settings.shops {
        if shop.marketplace == MarketplaceKind::Avito {
            for (key, quota) in shop.avito_limits.quotas(name) {
                limiters = limiters.with_per_request(key, quota);
            }
        }
    }
    for (name, crm) in &settings.crm_accounts {
        limiters = limiters
            .with_per_request(format!("amocrm:{name}"), crm.rate_limit)
            .with_margin(
                format!("amocrm:{name}"),
                crate::connectors::amocrm::RATE_MARGIN,
            );
    }
    // Partner reports and polls: a permit of both the per-second and the
    // per-minute limit per request, taken by the partner's client.
    for (name, partner) in &settings.partners {
        let (second, minute) = crate::connectors::partner::limiter_keys(name);
        limiters = limiters
            .with_per_request(
                second,
                crate::config::RateQuota {
                    requests: partner.report.per_second,
                    per: std::time::Duration::from_secs(1),
                    burst: 1,
                },
            )
            .with_per_request(
                minute,
                crate::config::RateQuota {
                    requests: partner.report.per_minute,
                    per: std::time::Duration::from_secs(60),
                    burst: 1,
                },
            );
    }
    Arc::new(limiters)
}

/// One poller task per Kaspi shop, each polling at its shop's interval until shutdown.
/// What `start_pollers` started, and the marketplace clients it made.
pub struct Started {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub kaspi: BTreeMap<String, KaspiClient>,
    pub avito: BTreeMap<String, AvitoClient>,
}

/// The CRM side's long-running parts, each supervised: the amoCRM inbox
/// processor (every second), and per CRM account the events-API poll (always:
/// the safety net for lost webhooks, and the only intake without
/// `http.public_url`) with the check for typed Kaspi completion codes, the
/// webhook subscription keeper (with a public URL and a webhook secret), and
/// the contact index refresh.
pub fn start_crm_tasks(
    settings: &Settings,
    pool: &sqlx::PgPool,
    maps: &Arc<crate::mapping::MapRegistry>,
    crm_clients: &BTreeMap<String, AmoClient>,
    inbox_wake: &Arc<tokio::sync::Notify>,
    sla: &Arc<crate::sla::SlaPolicy>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    use crate::sync::{every, supervise};
    let mut tasks = Vec::new();
    let bridge_users: Arc<BTreeMap<String, u64>> = Arc::new(
        settings
            .crm_accounts
            .iter()
            .filter_map(|(name, crm)| Some((name.clone(), crm.api_user_id?)))
            .collect(),
    );
    let watch = crate::sla::alerts::Watch {
        poll_failing_after: settings.alerts.poll_failing_after,
        quiet_after: settings.alerts.quiet_after,
    };
    let (p, s, m, interval) = (
        pool.clone(),
        shutdown.clone(),
        maps.clone(),
        settings.alerts.check_interval,
    );
    tasks.push(tokio::spawn(supervise(
        "alert_watch".into(),
        shutdown.clone(),
        move || {
            let (pool, shutdown, maps, watch) = (p.clone(), s.clone(), m.clone(), watch.clone());
            async move {
                every(interval, shutdown, || async {
                    if let Err(error) = crate::sla::alerts::watch_round(
                        &pool,
                        &watch,
                        &maps.errors(),
                        chrono::Utc::now(),
                    )
                    .await
                    {
                        tracing::warn!(%error, "The alert watch failed; the next round tries again.");
                    }
                })
                .await
            }
        },
    )));
    let (p, s) = (pool.clone(), shutdown.clone());
    tasks.push(tokio::spawn(supervise(
        "kpi_metrics".into(),
        shutdown.clone(),
        move || {
            let (pool, shutdown) = (p.clone(), s.clone());
            async move {
                // The last 24 h as gauges, every minute.
                every(std::time::Duration::from_secs(60), shutdown, || async {
                    let now = chrono::Utc::now();
                    match crate::sla::kpi::compute(&pool, now - chrono::Duration::hours(24), now, None, now).await {
                        Ok(kpis) => crate::sla::kpi::publish(&kpis),
                        Err(error) => tracing::warn!(%error, "Computing the KPI metrics failed; the next minute tries again."),
                    }
                })
                .await
            }
        },
    )));
    let (p, s, interval) = (pool.clone(), shutdown.clone(), settings.sla.check_interval);
    tasks.push(tokio::spawn(supervise(
        "sla_timers".into(),
        shutdown.clone(),
        move || {
            let (pool, shutdown) = (p.clone(), s.clone());
            async move {
                every(interval, shutdown, || async {
                    if let Err(error) = crate::sla::timers::fire_due(&pool, chrono::Utc::now()).await {
                        tracing::warn!(%error, "Firing due SLA timers failed; the next round tries again.");
                    }
                })
                .await
            }
        },
    )));
    let (p, m, s, u, wake, policy) = (
        pool.clone(),
        maps.clone(),
        shutdown.clone(),
        bridge_users,
        inbox_wake.clone(),
        sla.clone(),
    );
    tasks.push(tokio::spawn(supervise(
        "amocrm_inbox".into(),
        shutdown.clone(),
        move || {
            let (pool, maps, shutdown, users, wake, policy) = (
                p.clone(),
                m.clone(),
                s.clone(),
                u.clone(),
                wake.clone(),
                policy.clone(),
            );
            async move {
                // Every second, and at once when a webhook stored something.
                loop {
                    if let Err(error) =
                        crate::sync::to_marketplace::process_amocrm_inbox(&pool, &maps, &users, &policy).await
                    {
                        tracing::warn!(%error, "Processing amoCRM changes failed; they stay in the inbox.");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        },
    )));
    for (name, client) in crm_clients {
        let Some(crm) = settings.crm_accounts.get(name) else {
            continue;
        };
        let destination = match (&settings.http.public_url, &crm.webhook_secret) {
            (Some(base), Some(secret)) => Some(webhook_destination(base, secret)),
            _ => None,
        };
        match &destination {
            Some(_) => {
                tracing::info!(crm_account = %name, every_s = crm.events_poll_interval.as_secs(),
                "Managers' moves arrive by amoCRM webhook (kept subscribed by the daemon); the events poll is the safety net.")
            }
            None => {
                tracing::info!(crm_account = %name, every_s = crm.events_poll_interval.as_secs(),
                "No http.public_url (or no webhook_secret) for this CRM account: the events poll is the only intake of managers' moves; they arrive within one poll interval.")
            }
        }
        let (c, p, m, s, interval, overlap) = (
            client.clone(),
            pool.clone(),
            maps.clone(),
            shutdown.clone(),
            crm.events_poll_interval,
            crm.events_poll_overlap,
        );
        tasks.push(tokio::spawn(supervise(
            format!("amocrm_events:{name}"),
            shutdown.clone(),
            move || {
                let (client, pool, maps, shutdown) = (c.clone(), p.clone(), m.clone(), s.clone());
                async move {
                    every(interval, shutdown, || async {
                        if let Err(error) =
                            crate::sync::to_marketplace::poll_amocrm_events(&client, &pool, overlap).await
                        {
                            tracing::warn!(crm_account = %client.account_name(), %error, "Polling amoCRM's events failed; the cursor stays, the next poll re-reads the window.");
                        }
                        if let Err(error) =
                            crate::sync::to_marketplace::check_completion_codes(&client, &pool, &maps).await
                        {
                            tracing::warn!(crm_account = %client.account_name(), %error, "Reading typed completion codes failed; the next poll tries again.");
                        }
                    })
                    .await
                }
            },
        )));
        if let Some(destination) = destination {
            let (c, s, interval) = (client.clone(), shutdown.clone(), crm.webhook_check_interval);
            tasks.push(tokio::spawn(supervise(
                format!("amocrm_webhook:{name}"),
                shutdown.clone(),
                move || {
                    let (client, shutdown, destination) =
                        (c.clone(), s.clone(), destination.clone());
                    async move {
                        every(interval, shutdown, || async {
                            keep_webhook(&client, &destination).await;
                        })
                        .await
                    }
                },
            )));
        }
        if !settings.reconcile.interval.is_zero() {
            let (p, s, account, interval, look_back) = (
                pool.clone(),
                shutdown.clone(),
                name.clone(),
                settings.reconcile.interval,
                settings.reconcile.look_back,
            );
            tasks.push(tokio::spawn(supervise(
                format!("reconcile_trigger:{name}"),
                shutdown.clone(),
                move || {
                    let (pool, shutdown, account) = (p.clone(), s.clone(), account.clone());
                    async move {
                        // The pollers have their first go before the first run.
                        let first = interval.min(std::time::Duration::from_secs(120));
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(first) => {}
                        }
                        every(interval, shutdown, || async {
                            if let Err(error) = crate::sync::reconcile::enqueue_periodic(
                                &pool, &account, interval, look_back,
                            )
                            .await
                            {
                                tracing::warn!(crm_account = %account, %error, "Could not queue the periodic reconciliation; the next round tries again.");
                            }
                        })
                        .await
                    }
                },
            )));
        }
        let (c, p, s, interval) = (
            client.clone(),
            pool.clone(),
            shutdown.clone(),
            crm.contacts_refresh_interval,
        );
        tasks.push(tokio::spawn(supervise(
            format!("contact_index:{name}"),
            shutdown.clone(),
            move || {
                let (client, pool, shutdown) = (c.clone(), p.clone(), s.clone());
                async move {
                    every(interval, shutdown, || async {
                        if let Err(error) =
                            crate::sync::contact_index::refresh(&client, &pool).await
                        {
                            tracing::warn!(crm_account = %client.account_name(), %error, "Refreshing the contact index failed; de-duplication searches amoCRM until it loads.");
                        }
                    })
                    .await
                }
            },
        )));
    }
    tasks
}

/// Jobs waiting for unresolved maps run at once when the maps resolve.
async fn release_when_resolved(
    maps: Arc<crate::mapping::MapRegistry>,
    pool: sqlx::PgPool,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = maps.resolved() => {}
        }
        match crate::store::outbox::release_waiting(&pool, crate::mapping::UNRESOLVED).await {
            Ok(n) => tracing::info!(jobs = n, "Released the jobs that waited for the maps."),
            Err(error) => {
                tracing::warn!(%error, "Could not release the jobs that waited for the maps; they run at their next try.")
            }
        }
    }
}

/// The amoCRM webhook settings the bridge subscribes.
pub const WEBHOOK_SETTINGS: &[&str] = &["status_lead", "update_lead"];

/// `{public_url}/hooks/amocrm/{secret}`. Secret: never logged.
fn webhook_destination(public_url: &str, secret: &secrecy::SecretString) -> secrecy::SecretString {
    use secrecy::ExposeSecret;
    secrecy::SecretString::from(format!(
        "{}/hooks/amocrm/{}",
        public_url.trim_end_matches('/'),
        secret.expose_secret()
    ))
}

/// Makes sure amoCRM has the bridge's webhook, enabled, with every setting.
async fn keep_webhook(client: &AmoClient, destination: &secrecy::SecretString) {
    use secrecy::ExposeSecret;
    match client
        .ensure_webhook(destination.expose_secret(), WEBHOOK_SETTINGS)
        .await
    {
        Ok(true) => {
            metrics::counter!("orderbridge_webhook_subscriptions_total", "crm_account" => client.account_name().to_string()).increment(1);
            tracing::info!(crm_account = %client.account_name(), settings = ?WEBHOOK_SETTINGS,
                "Subscribed the bridge's amoCRM webhook (it was missing, incomplete or disabled).");
        }
        Ok(false) => {
            tracing::debug!(crm_account = %client.account_name(), "The bridge's amoCRM webhook is in place.")
        }
        Err(error) => tracing::warn!(crm_account = %client.account_name(), %error,
            "Could not check or subscribe the bridge's amoCRM webhook; the events poll carries managers' moves meanwhile, and the next check tries again."),
    }
}

/// The marketplace pollers, one per shop (Avito: orders and messenger), each
/// supervised and polling only while this replica (`owner`) holds the shop's
/// outbox target lease, so several replicas never poll one shop at once.
pub async fn start_pollers(
    settings: &Settings,
    pool: &sqlx::PgPool,
    limiters: &Limiters,
    owner: &str,
    shutdown: &CancellationToken,
) -> Result<Started, DaemonError> {
    let targets: Vec<String> = settings
        .shops
        .iter()
        .map(|(name, shop)| format!("{}:{name}", shop.marketplace.as_str()))
        .collect();
    crate::store::outbox::ensure_targets(pool, &targets).await?;
    let lease = |name: &str, kind: MarketplaceKind| crate::sync::ShopLease {
        pool: pool.clone(),
        target: format!("{}:{name}", kind.as_str()),
        owner: owner.to_string(),
    };
    let mut tasks = Vec::new();
    let mut kaspi = BTreeMap::new();
    let mut avito = BTreeMap::new();
    for (name, shop) in &settings.shops {
        match shop.marketplace {
            MarketplaceKind::Kaspi => {
                let client = kaspi_client(name, shop, limiters)?;
                kaspi.insert(name.clone(), client.clone());
                let (pool, target, interval, stop, lease) = (
                    pool.clone(),
                    format!("amocrm:{}", shop.crm_account),
                    shop.poll_interval,
                    shutdown.clone(),
                    lease(name, MarketplaceKind::Kaspi),
                );
                tracing::info!(shop = %name, every_s = shop.poll_interval.as_secs(), "Kaspi poller started (it polls while this replica holds the shop's lease).");
                tasks.push(tokio::spawn(crate::sync::supervise(
                    format!("kaspi_poller:{name}"),
                    shutdown.clone(),
                    move || {
                        let poller = KaspiPoller::new(client.clone(), pool.clone(), target.clone())
                            .with_newest_every(interval);
                        let (lease, stop) = (lease.clone(), stop.clone());
                        async move {
                            crate::sync::every_while_leased(lease, interval, stop, || async {
                                // A failure is logged and recorded in the cursor; the next round
                                // resumes (later, while Kaspi throttles).
                                match poller.poll_once(chrono::Utc::now()).await {
                                    Err(crate::sync::kaspi_poll::PollError::Kaspi(error)) => {
                                        crate::sync::Round::after(&error.classify())
                                    }
                                    _ => crate::sync::Round::Done,
                                }
                            })
                            .await
                        }
                    },
                )));
            }
            MarketplaceKind::Avito => {
                let client = avito_client(name, shop, limiters)?;
                let crm_target = format!("amocrm:{}", shop.crm_account);
                avito.insert(name.clone(), client.clone());
                tracing::info!(shop = %name, every_s = shop.poll_interval.as_secs(), "Avito poller started.");
                let (c, p, t, interval, stop, shop_lease) = (
                    client.clone(),
                    pool.clone(),
                    crm_target.clone(),
                    shop.poll_interval,
                    shutdown.clone(),
                    lease(name, MarketplaceKind::Avito),
                );
                tasks.push(tokio::spawn(crate::sync::supervise(
                    format!("avito_poller:{name}"),
                    shutdown.clone(),
                    move || {
                        let poller = AvitoPoller::new(c.clone(), p.clone(), t.clone());
                        let (lease, stop) = (shop_lease.clone(), stop.clone());
                        async move {
                            crate::sync::every_while_leased(lease, interval, stop, || async {
                                // A failure is logged and recorded in the cursor; the next round
                                // resumes (later, while Avito throttles).
                                match poller.poll_once().await {
                                    Err(crate::sync::avito_poll::AvitoPollError::Avito(error)) => {
                                        crate::sync::Round::after(&error.classify())
                                    }
                                    _ => crate::sync::Round::Done,
                                }
                            })
                            .await
                        }
                    },
                )));
                let (p, stop, shop_lease) = (
                    pool.clone(),
                    shutdown.clone(),
                    lease(name, MarketplaceKind::Avito),
                );
                tasks.push(tokio::spawn(crate::sync::supervise(
                    format!("avito_messenger:{name}"),
                    shutdown.clone(),
                    move || {
                        run_messenger(
                            client.clone(),
                            p.clone(),
                            crm_target.clone(),
                            interval,
                            shop_lease.clone(),
                            stop.clone(),
                        )
                    },
                )));
            }
        }
    }
    Ok(Started {
        tasks,
        kaspi,
        avito,
    })
}

fn kaspi_client(
    name: &str,
    shop: &crate::config::Shop,
    limiters: &Limiters,
) -> Result<KaspiClient, DaemonError> {
    let token = shop
        .token
        .clone()
        .ok_or_else(|| DaemonError::Config(format!("shops.{name}.token is missing")))?;
    KaspiClient::new(
        KaspiShop {
            name: name.to_string(),
            base_url: shop.base_url.clone(),
            token,
            merchant_uid: shop.merchant_uid.clone(),
            timeout: shop.request_timeout,
        },
        limiters.limiter(&format!("kaspi:{name}")),
    )
    .map_err(|e| DaemonError::Config(format!("shops.{name}: {e}")))
}

fn avito_client(
    name: &str,
    shop: &crate::config::Shop,
    limiters: &Limiters,
) -> Result<AvitoClient, DaemonError> {
    let (Some(client_id), Some(client_secret)) =
        (shop.client_id.clone(), shop.client_secret.clone())
    else {
        return Err(DaemonError::Config(format!(
            "shops.{name}: client_id and client_secret are required"
        )));
    };
    AvitoClient::new(
        AvitoAccount {
            name: name.to_string(),
            base_url: shop.base_url.clone(),
            client_id,
            client_secret,
            timeout: shop.request_timeout,
        },
        AvitoLimiters::from_registry(limiters, name),
    )
    .map_err(|e| DaemonError::Config(format!("shops.{name}: {e}")))
}

/// Everything a reconciliation run reads from, built like the daemon's own
/// (for `orderbridge reconcile` when no daemon serves the account).
pub async fn reconcile_sources(
    settings: &Settings,
    pool: &sqlx::PgPool,
) -> Result<crate::sync::reconcile::Sources, DaemonError> {
    let limiters = limiters(settings);
    let crm = amocrm_clients(settings, pool, &limiters).await?;
    let maps = Arc::new(
        crate::mapping::MapRegistry::load(crate::mapping::MapSource::from_settings(settings), &crm)
            .await
            .map_err(|problems| DaemonError::Maps(problems.join("\n  - ")))?,
    );
    // amoCRM may refuse the first reads (a 429 while another process's
    // requests are still in its window): resolve again a few times.
    for _ in 0..3 {
        if !maps.any_offline() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        maps.reload(&crm)
            .await
            .map_err(|problems| DaemonError::Maps(problems.join("\n  - ")))?;
    }
    let mut kaspi = BTreeMap::new();
    let mut avito = BTreeMap::new();
    for (name, shop) in &settings.shops {
        match shop.marketplace {
            MarketplaceKind::Kaspi => {
                kaspi.insert(name.clone(), kaspi_client(name, shop, &limiters)?);
            }
            MarketplaceKind::Avito => {
                avito.insert(name.clone(), avito_client(name, shop, &limiters)?);
            }
        }
    }
    Ok(crate::sync::reconcile::Sources {
        pool: pool.clone(),
        maps,
        crm,
        kaspi,
        avito,
        shop_crm: shop_crm(settings),
    })
}

/// Shop name → CRM account name.
pub fn shop_crm(settings: &Settings) -> BTreeMap<String, String> {
    settings
        .shops
        .iter()
        .map(|(name, shop)| (name.clone(), shop.crm_account.clone()))
        .collect()
}

/// Avito messenger leads: the polling fallback over unread chats and the inbox
/// processor, every `interval`.
async fn run_messenger(
    client: AvitoClient,
    pool: sqlx::PgPool,
    crm_target: String,
    interval: std::time::Duration,
    lease: crate::sync::ShopLease,
    shutdown: CancellationToken,
) {
    crate::sync::every_while_leased(lease, interval, shutdown, || async {
        let mut pace = crate::sync::Round::Done;
        if let Err(error) = crate::sync::avito_leads::poll_unread(&client, &pool).await {
            tracing::warn!(account = %client.account(), %error, "Polling Avito's unread chats failed.");
            if let crate::sync::avito_leads::LeadError::Avito(error) = &error {
                pace = crate::sync::Round::after(&error.classify());
            }
        }
        if let Err(error) =
            crate::sync::avito_leads::process_inbox(&client, &pool, &crm_target).await
        {
            tracing::warn!(account = %client.account(), %error, "Processing Avito messages failed; they stay in the inbox.");
        }
        pace
    })
    .await
}

/// The Avito accounts that accept messenger webhooks.
pub fn avito_hook_accounts(settings: &Settings) -> Vec<crate::http::hooks::AvitoHookAccount> {
    settings
        .shops
        .iter()
        .filter(|(_, s)| s.marketplace == MarketplaceKind::Avito)
        .filter_map(|(name, s)| {
            Some(crate::http::hooks::AvitoHookAccount {
                name: name.clone(),
                secret: s.webhook_secret.clone()?,
            })
        })
        .collect()
}

/// The partner sources that accept leads by webhook.
pub fn partner_hook_sources(settings: &Settings) -> Vec<crate::http::hooks::PartnerHookSource> {
    settings
        .partners
        .iter()
        .filter_map(|(name, p)| {
            Some(crate::http::hooks::PartnerHookSource {
                name: name.clone(),
                secret: p.webhook_secret.clone()?,
                config: Arc::new(p.clone()),
            })
        })
        .collect()
}

/// What `start_partners` started: the pollers of sources with a `poll_url`
/// (each under the source's outbox target lease), and a client per source.
pub struct StartedPartners {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub clients: BTreeMap<String, crate::connectors::partner::PartnerClient>,
}

/// A client per partner source, and a poller for each with a `poll_url`.
pub async fn start_partners(
    settings: &Settings,
    pool: &sqlx::PgPool,
    limiters: &Limiters,
    owner: &str,
    shutdown: &CancellationToken,
) -> Result<StartedPartners, DaemonError> {
    let targets: Vec<String> = settings
        .partners
        .keys()
        .map(|name| crate::sync::partner::report_target(name))
        .collect();
    crate::store::outbox::ensure_targets(pool, &targets).await?;
    let mut started = StartedPartners {
        tasks: Vec::new(),
        clients: BTreeMap::new(),
    };
    for (name, partner) in &settings.partners {
        let client =
            crate::connectors::partner::PartnerClient::new(name, partner.clone(), limiters)
                .map_err(|e| DaemonError::Config(format!("partners.{name}: {e}")))?;
        started.clients.insert(name.clone(), client.clone());
        if partner.poll_url.is_none() {
            continue;
        }
        let lease = crate::sync::ShopLease {
            pool: pool.clone(),
            target: crate::sync::partner::report_target(name),
            owner: owner.to_string(),
        };
        let (p, interval, stop) = (pool.clone(), partner.poll_interval, shutdown.clone());
        tracing::info!(source = %name, every_s = interval.as_secs(), "Partner lead poller started (it polls while this replica holds the source's lease).");
        started.tasks.push(tokio::spawn(crate::sync::supervise(
            format!("partner_poller:{name}"),
            shutdown.clone(),
            move || {
                let (client, pool, lease, stop) =
                    (client.clone(), p.clone(), lease.clone(), stop.clone());
                async move {
                    crate::sync::every_while_leased(lease, interval, stop, || async {
                        match crate::sync::partner::poll_source(&pool, &client).await {
                            Ok((stored, refused)) if stored + refused > 0 => {
                                tracing::info!(source = %client.source(), stored, refused, "Partner leads polled.");
                                crate::sync::Round::Done
                            }
                            Ok(_) => crate::sync::Round::Done,
                            Err(error) => {
                                tracing::warn!(source = %client.source(), %error, "Polling the partner's leads failed; the cursor stays, the next round resumes.");
                                match &error {
                                    crate::sync::partner::PartnerLeadError::Partner(error) => {
                                        crate::sync::Round::after(&crate::connectors::partner::classify(error))
                                    }
                                    _ => crate::sync::Round::Done,
                                }
                            }
                        }
                    })
                    .await
                }
            },
        )));
    }
    Ok(started)
}

/// The webhook-accepting CRM accounts.
pub fn hook_accounts(settings: &Settings) -> Vec<HookAccount> {
    settings
        .crm_accounts
        .iter()
        .filter_map(|(name, crm)| {
            Some(HookAccount {
                name: name.clone(),
                secret: crm.webhook_secret.clone()?,
                subdomain: crm.subdomain.clone()?,
                account_id: crm.account_id?,
            })
        })
        .collect()
}

/// One amoCRM client per configured account, sharing the limiters; OAuth
/// accounts get their first refresh token seeded.
pub async fn amocrm_clients(
    settings: &Settings,
    pool: &sqlx::PgPool,
    limiters: &Limiters,
) -> Result<BTreeMap<String, AmoClient>, DaemonError> {
    let mut clients = BTreeMap::new();
    for (name, crm) in &settings.crm_accounts {
        let base_url = reqwest::Url::parse(&crm.base_url)
            .map_err(|e| DaemonError::Config(format!("crm_accounts.{name}.base_url: {e}")))?;
        let (auth, seed) = match &crm.auth {
            CrmAuth::LongLived { token: Some(token) } => (AmoAuth::LongLived(token.clone()), None),
            CrmAuth::LongLived { token: None } => {
                return Err(DaemonError::Config(format!(
                    "crm_accounts.{name}.auth.token is missing"
                )))
            }
            CrmAuth::Oauth {
                client_id,
                client_secret: Some(secret),
                redirect_uri,
                initial_refresh_token,
            } => (
                AmoAuth::OAuth {
                    client_id: client_id.clone(),
                    client_secret: secret.clone(),
                    redirect_uri: redirect_uri.clone(),
                },
                initial_refresh_token.clone(),
            ),
            CrmAuth::Oauth {
                client_secret: None,
                ..
            } => {
                return Err(DaemonError::Config(format!(
                    "crm_accounts.{name}.auth.client_secret is missing"
                )))
            }
        };
        let account = AmoAccount {
            name: name.clone(),
            base_url,
            auth,
            timeout: crm.request_timeout,
            circuit_cooldown: crm.circuit_cooldown,
        };
        // Every replica on this database shares the account's request slots:
        // amoCRM counts the account's requests, whichever process sends them.
        let spacing = crm
            .rate_limit
            .per
            .mul_f64(crate::connectors::amocrm::RATE_MARGIN)
            / crm.rate_limit.requests.max(1);
        let client = AmoClient::new(
            account.clone(),
            pool.clone(),
            limiters.limiter(&account.target()),
        )?
        .with_shared_slots(spacing);
        if let Some(refresh) = seed {
            if client.seed_refresh_token(&refresh).await? {
                tracing::info!(account = %name, "Seeded the OAuth token table from auth.initial_refresh_token.");
            }
        }
        clients.insert(name.clone(), client);
    }
    Ok(clients)
}

/// Opens the configured database (creating it when missing).
pub async fn open_database(
    settings: &crate::config::DatabaseSettings,
) -> Result<sqlx::PgPool, StoreError> {
    use secrecy::ExposeSecret;
    crate::store::connect(
        settings.url.expose_secret(),
        settings.max_connections,
        settings.connect_timeout,
    )
    .await
}

async fn cancel_on_signal(shutdown: CancellationToken) -> Result<(), DaemonError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down."),
            r = tokio::signal::ctrl_c() => {
                r.map_err(DaemonError::Signal)?;
                tracing::info!("SIGINT received; shutting down.");
            }
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(DaemonError::Signal)?;
        tracing::info!("Interrupt received; shutting down.");
    }
    shutdown.cancel();
    Ok(())
}
