//! `orderbridge demo`: the whole product in one command. The real daemon (the
//! same [`crate::daemon::run_until`]) runs against the three in-process
//! simulators on loopback ports, configured in memory with the shipped maps;
//! the amoCRM simulator is seeded from those maps. Around it: a generator of
//! Kaspi and Avito orders (and buyers' first messages in the Avito messenger),
//! simulated managers who move leads the way the seed's process goes (accept,
//! assemble, complete with the buyer's code; a few cancellations; now and then
//! a move the marketplace refuses), and marketplaces that move some orders
//! themselves (courier hand-over, Kaspi completing its deliveries, a buyer's
//! cancellation, Avito's delivery). A partner programme sends buyout requests
//! (used Apple devices) to the bridge's partner webhook; buyers move them
//! through the 15-stage buyout funnel (some lost on the way), and every stage
//! is reported back to the partner. Time is compressed by `speed`; a seed makes
//! runs repeatable. When it stops, [`Summary`] is read from the simulators.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::sim::amocrm::{AmoSim, AmoSimConfig};
use crate::sim::avito::{AvitoSim, AvitoSimConfig, SimAvitoItem, SimAvitoOrderSpec};
use crate::sim::kaspi::{KaspiSim, KaspiSimConfig, SimEntrySpec, SimOrderSpec};
use crate::sim::partner::{PartnerSim, PartnerSimConfig};

const AMO_TOKEN: &str = "demo-long-lived-token";
const HOOK_SECRET: &str = "demo-amocrm-hook-secret-01234567";
const KASPI_MAP: &str = "config/maps/kaspi.toml";
const AVITO_MAP: &str = "config/maps/avito.toml";
const BUYOUT_MAP: &str = "config/maps/buyout.toml";
const PARTNER_SECRET: &str = "demo-partner-hook-secret-0123456";
/// The buyout funnel a request goes through when nothing goes wrong (the
/// stages of `config/maps/buyout.toml`).
pub const BUYOUT_PATH: &[&str] = &[
    "Новая заявка",
    "Связались с продавцом",
    "Цена согласована",
    "Забор у продавца",
    "Доставка в магазин",
    "Проверка",
    "Выкуплено",
    "Предпродажная подготовка",
    "Реклама",
    "Продажа",
    "Отправка новому владельцу",
    "Продано",
];
const CODE_FIELD: &str = "Код выдачи";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("a simulator could not start: {0}")]
    Simulator(#[from] std::io::Error),
    #[error("the demo's configuration is invalid: {0}")]
    Config(String),
    #[error("cannot read the shipped map {path}: {error}")]
    Map { path: String, error: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the daemon failed: {0}")]
    Daemon(String),
    #[error("the daemon did not become ready within 60 s: {0}")]
    NotReady(String),
}

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Time compression for the generator, the managers and the marketplaces.
    pub speed: f64,
    pub seed: u64,
    /// Stop by itself after this long (real time).
    pub run_for: Option<Duration>,
    /// New orders per (demo) minute, across both marketplaces.
    pub orders_per_minute: f64,
    /// The PostgreSQL server; the demo uses a database of its own on it.
    pub database_url: String,
    /// The demo database's name (dropped at start unless `keep`).
    pub database: String,
    pub keep: bool,
    /// The daemon's HTTP side.
    pub listen: SocketAddr,
    /// Print a status line every few seconds.
    pub live: bool,
}

/// What the simulators hold when the demo stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub orders: usize,
    pub leads: usize,
    pub messenger_leads: usize,
    pub contacts: usize,
    pub duplicate_leads: usize,
    /// Generated orders without a lead.
    pub orders_without_lead: usize,
    pub actions_sent: usize,
    pub actions_refused: usize,
    pub jobs_pending: i64,
    pub jobs_dead: i64,
    /// SLA tasks the bridge gave slow managers in amoCRM.
    pub sla_warnings: usize,
    pub sla_breaches: usize,
    /// Buyout requests the partner sent, and the CRM leads they became.
    pub buyout_requests: usize,
    pub buyout_leads: usize,
    /// Status reports the partner took, and its 429s.
    pub partner_reports: usize,
    pub partner_http_429: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "orders: {}", self.orders)?;
        writeln!(f, "leads: {}", self.leads)?;
        writeln!(f, "messenger_leads: {}", self.messenger_leads)?;
        writeln!(f, "contacts: {}", self.contacts)?;
        writeln!(f, "duplicate_leads: {}", self.duplicate_leads)?;
        writeln!(f, "orders_without_lead: {}", self.orders_without_lead)?;
        writeln!(f, "actions_sent: {}", self.actions_sent)?;
        writeln!(f, "actions_refused: {}", self.actions_refused)?;
        writeln!(f, "jobs_pending: {}", self.jobs_pending)?;
        writeln!(f, "jobs_dead: {}", self.jobs_dead)?;
        writeln!(f, "sla_warnings: {}", self.sla_warnings)?;
        writeln!(f, "sla_breaches: {}", self.sla_breaches)?;
        writeln!(f, "buyout_requests: {}", self.buyout_requests)?;
        writeln!(f, "buyout_leads: {}", self.buyout_leads)?;
        writeln!(f, "partner_reports: {}", self.partner_reports)?;
        write!(f, "partner_http_429: {}", self.partner_http_429)
    }
}

/// The three simulators the demo's daemon talks to.
pub struct World {
    pub kaspi: KaspiSim,
    pub avito: AvitoSim,
    pub amo: AmoSim,
    pub partner: PartnerSim,
    /// Avito order ids the generator made (the simulator has no listing handle).
    avito_orders: std::sync::Mutex<Vec<String>>,
}

/// How a demo run ended: the summary, and the simulators for a closer look.
pub struct Finished {
    pub summary: Summary,
    pub world: std::sync::Arc<World>,
}

/// Runs the demo until `run_for` passes or `stop` is cancelled; returns what
/// the simulators hold then.
pub async fn run(options: DemoOptions, stop: CancellationToken) -> Result<Finished, DemoError> {
    let world = std::sync::Arc::new(World {
        kaspi: KaspiSim::start(KaspiSimConfig::default()).await?,
        avito: AvitoSim::start(AvitoSimConfig::default()).await?,
        amo: AmoSim::start(AmoSimConfig {
            long_lived_token: Some(AMO_TOKEN.into()),
            ..AmoSimConfig::default()
        })
        .await?,
        partner: PartnerSim::start(PartnerSimConfig {
            seed: options.seed,
            ..PartnerSimConfig::default()
        })
        .await?,
        avito_orders: std::sync::Mutex::new(Vec::new()),
    });
    seed_crm_from_maps(
        &world.amo,
        &[
            Path::new(KASPI_MAP),
            Path::new(AVITO_MAP),
            Path::new(BUYOUT_MAP),
        ],
    )?;
    let database_url = prepare_database(&options).await?;
    let maps = scaled_maps(options.speed)?;
    let settings = settings(&options, &world, &database_url, &maps)?;
    let daemon_stop = CancellationToken::new();
    let daemon = tokio::spawn(crate::daemon::run_until(
        settings,
        true,
        daemon_stop.clone(),
    ));
    wait_ready(options.listen).await?;
    let pool = crate::store::connect(&database_url, 2, Duration::from_secs(5)).await?;
    if options.live {
        println!(
            "orderbridge demo: the daemon serves http://{}/readyz and /metrics",
            options.listen
        );
        println!(
            "  simulated Kaspi {}  Avito {}  amoCRM {}  buyout partner {}",
            world.kaspi.base_url(),
            world.avito.base_url(),
            world.amo.base_url(),
            world.partner.base_url()
        );
        println!(
            "  speed ×{}, seed {}, {} orders a minute; Ctrl-C stops it and prints a summary",
            options.speed, options.seed, options.orders_per_minute
        );
    }
    let actors = CancellationToken::new();
    let mut tasks = vec![
        tokio::spawn(generate(world.clone(), options.clone(), actors.clone())),
        tokio::spawn(act(world.clone(), options.clone(), actors.clone())),
    ];
    if options.live {
        tasks.push(tokio::spawn(live_status(
            world.clone(),
            pool.clone(),
            actors.clone(),
        )));
    }
    match options.run_for {
        Some(limit) => {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(limit) => {}
            }
        }
        None => stop.cancelled().await,
    }
    actors.cancel();
    for task in tasks {
        let _ = task.await;
    }
    // Let the bridge finish what is in flight before reading the summary: the
    // last orders need a poll (every 2 s), their leads a drained outbox.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settle = std::time::Instant::now();
    while settle.elapsed() < Duration::from_secs(30) {
        let busy: i64 = crate::store::outbox::depth(&pool)
            .await?
            .into_iter()
            .filter(|(state, _)| state != "dead")
            .map(|(_, n)| n)
            .sum();
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = summarize(&world, &pool).await?;
    daemon_stop.cancel();
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(DemoError::Daemon(error.to_string())),
        Err(error) => return Err(DemoError::Daemon(error.to_string())),
    }
    pool.close().await;
    Ok(Finished { summary, world })
}

/// Creates the demo's database afresh (unless `keep`); returns its URL.
async fn prepare_database(options: &DemoOptions) -> Result<String, DemoError> {
    let mut url = reqwest::Url::parse(&options.database_url)
        .map_err(|e| DemoError::Config(format!("database URL: {e}")))?;
    url.set_path(&format!("/{}", options.database));
    if !options.keep {
        crate::store::drop_database(url.as_str()).await?;
    }
    Ok(url.to_string())
}

/// The shipped maps with every stage's SLA divided by the demo's speed (as
/// the managers' and marketplaces' delays are), so that slow managers meet
/// SLA warnings and breaches within minutes. Returns the Kaspi, Avito and
/// buyout maps.
fn scaled_maps(speed: f64) -> Result<(String, String, String), DemoError> {
    let dir = std::env::temp_dir().join(format!("orderbridge-demo-maps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Config(e.to_string()))?;
    let mut paths = Vec::new();
    for (source, name) in [
        (KASPI_MAP, "kaspi.toml"),
        (AVITO_MAP, "avito.toml"),
        (BUYOUT_MAP, "buyout.toml"),
    ] {
        let text = std::fs::read_to_string(source)
            .map_err(|e| DemoError::Config(format!("{source}: {e}")))?;
        let scaled: Vec<String> = text
            .lines()
            .map(|line| scale_sla_line(line, speed))
            .collect();
        let path = dir.join(name);
        std::fs::write(&path, scaled.join("\n") + "\n")
            .map_err(|e| DemoError::Config(e.to_string()))?;
        paths.push(path.display().to_string());
    }
    Ok((paths[0].clone(), paths[1].clone(), paths[2].clone()))
}

/// `sla = "15m"` at speed 10 becomes `sla = "1m 30s"`; other lines (and
/// `end_of_day`) stay.
fn scale_sla_line(line: &str, speed: f64) -> String {
    let Some(value) = line
        .trim()
        .strip_prefix("sla = \"")
        .and_then(|v| v.strip_suffix('"'))
    else {
        return line.to_string();
    };
    match humantime::parse_duration(value) {
        Ok(duration) if speed > 0.0 => {
            let scaled = Duration::from_secs_f64((duration.as_secs_f64() / speed).max(1.0));
            format!(
                "sla = \"{}\"",
                humantime::format_duration(Duration::from_secs(scaled.as_secs()))
            )
        }
        _ => line.to_string(),
    }
}

fn settings(
    options: &DemoOptions,
    world: &World,
    database_url: &str,
    maps: &(String, String, String),
) -> Result<Settings, DemoError> {
    let avito = AvitoSimConfig::default();
    let text = format!(
        r#"
[database]
url = "{database_url}"
max_connections = 16
[http]
listen = "{listen}"
public_url = "http://{listen}"
[crm_accounts.main]
base_url = "{amo}"
subdomain = "example"
account_id = 31361463
webhook_secret = "{HOOK_SECRET}"
events_poll_interval = "5s"
[crm_accounts.main.auth]
mode = "long_lived"
token = "{AMO_TOKEN}"
[shops.kaspi_demo]
marketplace = "kaspi"
crm_account = "main"
map = "{kaspi_map}"
base_url = "{kaspi}"
poll_interval = "2s"
token = "kaspi-test-token"
[shops.avito_demo]
marketplace = "avito"
crm_account = "main"
map = "{avito_map}"
base_url = "{avito_url}"
poll_interval = "2s"
client_id = "{client_id}"
client_secret = "{client_secret}"
{partner}
"#,
        listen = options.listen,
        kaspi_map = maps.0,
        avito_map = maps.1,
        amo = world.amo.base_url(),
        kaspi = world.kaspi.base_url(),
        avito_url = world.avito.base_url(),
        client_id = avito.client_id,
        client_secret = avito.client_secret,
        partner = world
            .partner
            .source_toml("avito_buyout", "main", &maps.2, PARTNER_SECRET, ""),
    );
    let path = std::env::temp_dir().join(format!("orderbridge-demo-{}.toml", std::process::id()));
    std::fs::write(&path, text).map_err(|e| DemoError::Config(e.to_string()))?;
    let settings = Settings::load_from(Some(&path), Vec::<(String, String)>::new())
        .map_err(|e| DemoError::Config(e.to_string()));
    let _ = std::fs::remove_file(&path);
    settings
}

/// Every secret the demo configures (tokens, the Avito client secret, the
/// webhook path secrets): what must never appear in a log line.
pub fn configured_secrets() -> Vec<String> {
    vec![
        AMO_TOKEN.to_string(),
        HOOK_SECRET.to_string(),
        "kaspi-test-token".to_string(),
        AvitoSimConfig::default().client_secret,
        PARTNER_SECRET.to_string(),
    ]
}

async fn wait_ready(listen: SocketAddr) -> Result<(), DemoError> {
    let started = std::time::Instant::now();
    let mut last = String::from("no answer");
    while started.elapsed() < Duration::from_secs(60) {
        match reqwest::get(format!("http://{listen}/readyz")).await {
            Ok(answer) if answer.status().is_success() => return Ok(()),
            Ok(answer) => last = answer.text().await.unwrap_or_default(),
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(DemoError::NotReady(last))
}

/// Seeds the amoCRM simulator as an admin would for these maps: each map's
/// pipeline and stages, every role's users, each lead field once (a select
/// with the union of the options the maps name), Kaspi's code field.
pub fn seed_crm_from_maps(amo: &AmoSim, paths: &[&Path]) -> Result<(), DemoError> {
    let mut users: Vec<String> = Vec::new();
    let mut fields: Vec<(String, Vec<String>)> = Vec::new();
    for path in paths {
        let bad = |error: String| DemoError::Map {
            path: path.display().to_string(),
            error,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(e.to_string()))?;
        let text_of = |v: &toml::Value| v.as_str().map(str::to_string);
        let mut stages: Vec<String> = Vec::new();
        for row in table
            .get("statuses")
            .and_then(|s| s.as_table())
            .into_iter()
            .flat_map(|t| t.values())
        {
            if let Some(stage) = row.get("stage").and_then(text_of) {
                if !stages.contains(&stage) {
                    stages.push(stage);
                }
            }
        }
        // A funnel map (partner leads) lists its stages as [stages."<name>"].
        for stage in table
            .get("stages")
            .and_then(|s| s.as_table())
            .into_iter()
            .flat_map(|t| t.keys())
        {
            if !stages.contains(stage) {
                stages.push(stage.clone());
            }
        }
        let refs: Vec<&str> = stages.iter().map(String::as_str).collect();
        let pipeline = table
            .get("pipeline")
            .and_then(|p| p.get("name"))
            .and_then(text_of)
            .ok_or_else(|| bad("no pipeline name".into()))?;
        amo.seed_pipeline(&pipeline, &refs);
        for role in table
            .get("roles")
            .and_then(|r| r.as_table())
            .into_iter()
            .flat_map(|t| t.values())
        {
            for user in role
                .get("users")
                .and_then(|u| u.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(user) = text_of(user) {
                    if !users.contains(&user) {
                        users.push(user);
                    }
                }
            }
        }
        let lead = table.get("lead").and_then(|l| l.as_table());
        let enums = lead.and_then(|l| l.get("enums")).and_then(|e| e.as_table());
        for (slot, field) in lead
            .and_then(|l| l.get("fields"))
            .and_then(|f| f.as_table())
            .into_iter()
            .flatten()
        {
            let Some(name) = text_of(field) else { continue };
            let options: Vec<String> = enums
                .and_then(|e| e.get(slot))
                .and_then(|o| o.as_table())
                .map(|o| o.values().filter_map(text_of).collect())
                .unwrap_or_default();
            match fields.iter_mut().find(|(n, _)| *n == name) {
                Some((_, known)) => {
                    for option in options {
                        if !known.contains(&option) {
                            known.push(option);
                        }
                    }
                }
                None => fields.push((name, options)),
            }
        }
    }
    for user in users {
        amo.seed_user(&user);
    }
    for (name, options) in fields {
        let refs: Vec<&str> = options.iter().map(String::as_str).collect();
        let kind = if options.is_empty() { "text" } else { "select" };
        amo.seed_lead_field(&name, kind, &refs);
    }
    Ok(())
}

const NAMES: &[&str] = &[
    "Айгерим",
    "Марат",
    "Дана",
    "Ержан",
    "Алия",
    "Тимур",
    "Асель",
    "Нурлан",
    "Жанна",
    "Бауыржан",
];
const KASPI_ITEMS: &[(&str, f64)] = &[
    ("Крышка Tefal 28 см", 5990.0),
    ("Чайник Xiaomi Mi Kettle", 14990.0),
    ("Наушники Samsung Galaxy Buds2", 39990.0),
    ("Пылесос Dreame V10", 89990.0),
    ("Фен Dyson Supersonic", 249990.0),
];
const AVITO_ITEMS: &[(&str, i64)] = &[
    ("Кеды Venice", 1000),
    ("iPhone 13 Pro 256", 64990),
    ("Велосипед Stels", 15500),
    ("Кресло офисное", 7200),
];

/// New orders (and now and then a buyer's message) at the configured rate.
async fn generate(world: std::sync::Arc<World>, options: DemoOptions, stop: CancellationToken) {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let per_second = (options.orders_per_minute * options.speed / 60.0).max(0.01);
    let mut n: u64 = 0;
    // Phones repeat: a pool a little smaller than the orders.
    let phones: Vec<String> = (0..12)
        .map(|i| format!("70{:08}", 21_234_567 + i * 1_111))
        .collect();
    loop {
        let wait = Duration::from_secs_f64((1.0 / per_second) * rng.random_range(0.5..1.5));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        n += 1;
        let name = NAMES[rng.random_range(0..NAMES.len())];
        if rng.random_bool(0.7) {
            let (item, price) = KASPI_ITEMS[rng.random_range(0..KASPI_ITEMS.len())];
            let mut spec = SimOrderSpec::new(
                &format!("{}", 500_000_000 + n),
                chrono::Utc::now().timestamp_millis() - 30_000,
            );
            spec.customer_name = name.to_string();
            spec.customer_phone = phones[rng.random_range(0..phones.len())].clone();
            spec.total_price = price;
            spec.entries = vec![SimEntrySpec {
                sku: format!("SKU-{}", item.len()),
                name: item.to_string(),
                quantity: 1,
                base_price: price,
            }];
            if rng.random_bool(0.4) {
                // The merchant's own pickup: completed with the buyer's code.
                spec.is_kaspi_delivery = false;
                spec.state = "PICKUP".into();
                spec.delivery_mode = "DELIVERY_PICKUP".into();
            }
            world.kaspi.create_order(spec);
        } else {
            let (item, price) = AVITO_ITEMS[rng.random_range(0..AVITO_ITEMS.len())];
            let id = format!("{}", 70_000_000_000u64 + n);
            let mut spec =
                SimAvitoOrderSpec::new(&id, chrono::Utc::now() - chrono::Duration::minutes(1));
            spec.service_type =
                ["pvz", "rdbs", "dbs", "courier"][rng.random_range(0..4)].to_string();
            spec.buyer_name = Some(name.to_string());
            spec.price = price;
            spec.items = vec![SimAvitoItem {
                avito_id: format!("{}", 2_799_000_000u64 + n),
                sku: None,
                title: item.to_string(),
                count: 1,
                price,
                commission: price / 20,
                chat_id: None,
            }];
            world.avito.create_order(spec);
            if let Ok(mut ids) = world.avito_orders.lock() {
                ids.push(id);
            }
        }
        if rng.random_bool(0.3) {
            // A buyout request from the partner programme, pushed to the bridge.
            let lead = world.partner.new_lead();
            let url = format!(
                "http://{}/hooks/partner/avito_buyout/{PARTNER_SECRET}",
                options.listen
            );
            if let Err(error) = world.partner.push_lead(&url, &lead).await {
                tracing::warn!(%error, "The demo partner could not push a buyout request.");
            }
        }
        if rng.random_bool(0.15) {
            let (item, _) = AVITO_ITEMS[rng.random_range(0..AVITO_ITEMS.len())];
            world
                .avito
                .buyer_writes(
                    &format!("u2i-demo-{n}"),
                    1_768_000_000 + n,
                    item,
                    140_000_000 + rng.random_range(0..8),
                    name,
                    "Здравствуйте! Ещё продаётся?",
                )
                .await;
        }
    }
}

/// The simulated people and marketplaces: every tick, each lead whose stage
/// has waited its (random, demo-time) delay gets its next step.
async fn act(world: std::sync::Arc<World>, options: DemoOptions, stop: CancellationToken) {
    let mut rng = StdRng::seed_from_u64(options.seed ^ 0x5eed);
    let manager = world.amo.seed_user("Менеджер демо");
    let started = tokio::time::Instant::now();
    // lead id → (stage it was in, demo seconds when first seen there, delay in demo seconds)
    let mut seen: HashMap<u64, (u64, f64, f64)> = HashMap::new();
    let stages: BTreeMap<u64, (u64, String)> = world
        .amo
        .pipelines()
        .into_iter()
        .flat_map(|p| {
            p.stages
                .into_iter()
                .map(move |(id, name)| (id, (p.id, name)))
        })
        .collect();
    let buyout_pipeline = world
        .amo
        .pipelines()
        .into_iter()
        .find(|p| p.name == "Выкуп техники")
        .map(|p| p.id);
    let stage_named = |pipeline: u64, name: &str| {
        stages
            .iter()
            .find(|(_, (p, n))| *p == pipeline && n == name)
            .map(|(id, _)| *id)
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let now = started.elapsed().as_secs_f64() * options.speed;
        for lead in world.amo.leads() {
            let entry = seen.entry(lead.id).or_insert((lead.status_id, now, 0.0));
            if entry.0 != lead.status_id || entry.2 == 0.0 {
                *entry = (lead.status_id, now, manager_delay(&mut rng));
            }
            if now - entry.1 < entry.2 {
                continue;
            }
            // Due: the next step, then wait again.
            entry.1 = now;
            entry.2 = manager_delay(&mut rng);
            let Some((pipeline, stage)) = stages.get(&lead.status_id).cloned() else {
                continue;
            };
            let code = order_code(&lead.custom_fields_values);
            let mv = |name: &str| {
                if let Some(to) = stage_named(pipeline, name) {
                    world.amo.manager_moves_lead(lead.id, pipeline, to, manager);
                }
            };
            let buyout = BUYOUT_PATH
                .iter()
                .position(|s| *s == stage)
                .filter(|_| Some(pipeline) == buyout_pipeline);
            if let Some(at) = buyout {
                // A buyout request: the next step of the funnel, or lost.
                let lost = match stage.as_str() {
                    "Связались с продавцом" => Some("Нет связи с продавцом"),
                    "Цена согласована" => Some("Продавец отказался"),
                    "Проверка" => Some("Не прошло проверку"),
                    _ => None,
                };
                match (lost, BUYOUT_PATH.get(at + 1)) {
                    (Some(lost), _) if rng.random_bool(0.12) => mv(lost),
                    (_, Some(next)) => mv(next),
                    _ => {}
                }
                continue;
            }
            if let Some(order) = code.as_deref().and_then(|c| world.kaspi.order_by_code(c)) {
                let delivery = order.state == "KASPI_DELIVERY";
                match (stage.as_str(), order.status.as_str()) {
                    ("Новая заявка", "APPROVED_BY_BANK") => {
                        let roll: f64 = rng.random();
                        if roll < 0.05 {
                            mv("Закрыто и не реализовано");
                        } else if roll < 0.20 {
                            // Too early: Kaspi refuses assembling an order not accepted yet.
                            // (One first move in seven: the slow sixth of the managers
                            // makes fewer moves within a short run.)
                            mv("Готов к отгрузке");
                        } else if roll < 0.23 {
                            world.kaspi.buyer_cancels(&order.id, "BUYER_CANCELLATION");
                        } else {
                            mv("В работе / Сборка");
                        }
                    }
                    ("В работе / Сборка", "ACCEPTED_BY_MERCHANT") if delivery => {
                        mv("Готов к отгрузке")
                    }
                    ("В работе / Сборка", "ACCEPTED_BY_MERCHANT") => {
                        mv("Успешно реализовано")
                    }
                    ("Готов к отгрузке", "ACCEPTED_BY_MERCHANT") if order.assembled =>
                    {
                        world
                            .kaspi
                            .courier_picks_up(&order.id, chrono::Utc::now().timestamp_millis());
                    }
                    ("В доставке", "ACCEPTED_BY_MERCHANT") => {
                        world.kaspi.kaspi_completes(&order.id)
                    }
                    ("Успешно реализовано", "ACCEPTED_BY_MERCHANT") => {
                        if let Some(code) = world.kaspi.security_code(&order.id) {
                            world
                                .amo
                                .manager_sets_lead_field(lead.id, CODE_FIELD, &code, manager);
                        }
                    }
                    (_, "CANCELLING") => world.kaspi.cancellation_confirmed(&order.id),
                    _ => {}
                }
            } else if let Some(order) = code.as_deref().and_then(|c| world.avito.order(c)) {
                match (stage.as_str(), order.status.as_str()) {
                    ("Новая заявка", "on_confirmation") => {
                        if rng.random_bool(0.05) {
                            world.avito.set_status(&order.id, "canceled");
                        } else {
                            mv("В работе / Сборка");
                        }
                    }
                    (_, "ready_to_ship") => world.avito.set_status(&order.id, "in_transit"),
                    (_, "in_transit") => world.avito.set_status(&order.id, "delivered"),
                    (_, "delivered") => world.avito.set_status(&order.id, "closed"),
                    _ => {}
                }
            }
        }
    }
}

/// The order code a lead carries in its order-code field.
fn order_code(fields: &serde_json::Value) -> Option<String> {
    fields.as_array()?.iter().find_map(|f| {
        (f["field_name"].as_str() == Some("Номер заказа"))
            .then(|| f["values"][0]["value"].as_str().map(str::to_string))
            .flatten()
    })
}

async fn live_status(world: std::sync::Arc<World>, pool: sqlx::PgPool, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
        if let Ok(s) = summarize(&world, &pool).await {
            let last_error: Option<String> = crate::store::outbox::list_dead(&pool, 1)
                .await
                .ok()
                .and_then(|d| d.into_iter().next())
                .and_then(|d| d.last_error);
            println!(
                "orders {:>4} | leads {:>4} (+{} messenger, +{} buyout) | contacts {:>3} | actions sent {:>4}, refused {:>3} | partner reports {:>4} | jobs pending {:>3}, dead {:>2}{}",
                s.orders, s.leads, s.messenger_leads, s.buyout_leads, s.contacts, s.actions_sent, s.actions_refused, s.partner_reports, s.jobs_pending, s.jobs_dead,
                last_error.map(|e| format!(" | last dead: {e}")).unwrap_or_default()
            );
        }
    }
}

/// How long a simulated manager takes with a lead, in demo seconds: mostly
/// 1–8 minutes, now and then (one in six) 10–25, past the new stage's SLA, so
/// that the bridge's SLA warnings and breaches show.
fn manager_delay(rng: &mut impl rand::Rng) -> f64 {
    if rng.random_bool(1.0 / 6.0) {
        rng.random_range(600.0..1500.0)
    } else {
        rng.random_range(60.0..480.0)
    }
}

/// What the simulators (and the outbox) hold now.
pub async fn summarize(world: &World, pool: &sqlx::PgPool) -> Result<Summary, DemoError> {
    let leads = world.amo.leads();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut messenger = 0;
    for lead in &leads {
        match order_code(&lead.custom_fields_values) {
            Some(code) if code.starts_with("avito-chat-") => messenger += 1,
            Some(code) => *codes.entry(code).or_default() += 1,
            None => {}
        }
    }
    let kaspi_codes: Vec<String> = world.kaspi.orders().into_iter().map(|o| o.code).collect();
    let avito_ids: Vec<String> = world
        .avito_orders
        .lock()
        .map(|ids| ids.clone())
        .unwrap_or_default();
    let orders = kaspi_codes.len() + avito_ids.len();
    let partner = world.partner.stats();
    let buyout_pipeline = world
        .amo
        .pipelines()
        .into_iter()
        .find(|p| p.name == "Выкуп техники")
        .map(|p| p.id);
    let without = kaspi_codes
        .iter()
        .chain(avito_ids.iter())
        .filter(|c| !codes.contains_key(*c))
        .count();
    let kaspi_sent = world
        .kaspi
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 200)
        .count();
    let avito_sent = world
        .avito
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("applyTransition") && r.status == 200)
        .count();
    let depth: BTreeMap<String, i64> = crate::store::outbox::depth(pool)
        .await?
        .into_iter()
        .collect();
    Ok(Summary {
        orders,
        leads: codes.values().sum(),
        messenger_leads: messenger,
        contacts: world.amo.contacts().len(),
        duplicate_leads: codes.values().map(|n| n.saturating_sub(1)).sum(),
        orders_without_lead: without,
        actions_sent: kaspi_sent + avito_sent,
        actions_refused: world
            .amo
            .notes()
            .iter()
            .filter(|n| n.text.contains("was not applied"))
            .count(),
        jobs_pending: depth.get("pending").copied().unwrap_or(0)
            + depth.get("running").copied().unwrap_or(0),
        jobs_dead: depth.get("dead").copied().unwrap_or(0),
        sla_warnings: world
            .amo
            .tasks()
            .iter()
            .filter(|t| t.text.starts_with("SLA:"))
            .count(),
        sla_breaches: world
            .amo
            .tasks()
            .iter()
            .filter(|t| t.text.starts_with("SLA нарушен"))
            .count(),
        buyout_requests: partner.leads_made,
        buyout_leads: leads
            .iter()
            .filter(|l| Some(l.pipeline_id) == buyout_pipeline)
            .count(),
        partner_reports: partner.accepted,
        partner_http_429: partner.http_429,
    })
}
