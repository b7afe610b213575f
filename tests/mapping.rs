//! The status maps against a live CRM (the amoCRM simulator): online
//! resolution, renamed stages, and safe reloads.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use orderbridge::config::MarketplaceKind;
use orderbridge::connectors::amocrm::{AmoAccount, AmoAuth, AmoClient};
use orderbridge::mapping::{MapRegistry, MapSource, Route};
use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig};
use secrecy::SecretString;

const TOKEN: &str = "long-lived-mapping-token";

fn crm(sim: &AmoSim, pool: &sqlx::PgPool) -> BTreeMap<String, AmoClient> {
    let client = AmoClient::new(
        AmoAccount {
            name: "main".into(),
            base_url: reqwest::Url::parse(&sim.base_url()).unwrap(),
            auth: AmoAuth::LongLived(SecretString::from(TOKEN)),
            timeout: Duration::from_secs(5),
            circuit_cooldown: Duration::from_secs(60),
        },
        pool.clone(),
        None,
    )
    .unwrap();
    BTreeMap::from([("main".to_string(), client)])
}

fn source(shop: &str, kind: MarketplaceKind, path: PathBuf) -> MapSource {
    MapSource {
        shop: shop.into(),
        marketplace: kind,
        crm_account: "main".into(),
        path,
    }
}

async fn sim() -> AmoSim {
    AmoSim::start(AmoSimConfig {
        long_lived_token: Some(TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await
    .unwrap()
}

/// A private copy of a shipped map.
fn copy_of(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("orderbridge-maps-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::copy(Path::new("config/maps").join(name), &path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_maps_validate_online_and_resolve_every_name() {
    let db = fresh_db().await;
    let sim = sim().await;
    seed_crm_from_maps(
        &sim,
        &[
            Path::new("config/maps/kaspi.toml"),
            Path::new("config/maps/avito.toml"),
        ],
    );
    let registry = MapRegistry::load(
        vec![
            source(
                "kaspi_main",
                MarketplaceKind::Kaspi,
                "config/maps/kaspi.toml".into(),
            ),
            source(
                "avito_main",
                MarketplaceKind::Avito,
                "config/maps/avito.toml".into(),
            ),
        ],
        &crm(&sim, &db.pool),
    )
    .await
    .unwrap();
    let maps = registry.current();
    let kaspi = &maps.shops["kaspi_main"];
    assert!(kaspi.online);
    assert!(kaspi.pipeline_id.is_some());
    for (key, route) in &kaspi.statuses {
        match route {
            Route::Stage { stage_id, .. } => assert!(stage_id.is_some(), "{key} unresolved"),
            Route::Ignore => {}
        }
    }
    assert!(kaspi.roles.values().all(|r| !r.user_ids.is_empty()));
    assert!(kaspi.fields.values().all(|(_, id)| id.is_some()));
    assert!(kaspi.enums["delivery_mode"]
        .values()
        .all(|(_, id)| id.is_some()));
    let assemble = kaspi.action_for_stage(None, "Готов к отгрузке").unwrap();
    assert_eq!(assemble.action, "assemble");
    assert!(assemble.stage_id.is_some());
    let avito = &maps.shops["avito_main"];
    assert!(avito.online);
    assert!(avito.enums["delivery_mode"]
        .values()
        .all(|(_, id)| id.is_some()));
    assert!(avito
        .messenger
        .as_ref()
        .is_some_and(|m| m.stage_id.is_some()));
    db.drop_now().await.unwrap();
}

/// The shipped Avito map without its delivery options: raw values into a select.
fn avito_writing_raw_delivery_values() -> PathBuf {
    let path = copy_of("avito.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("[lead.enums.delivery_mode]").unwrap();
    let end = text[start..]
        .find("\n\n")
        .map(|e| start + e)
        .unwrap_or(text.len());
    std::fs::write(&path, format!("{}{}", &text[..start], &text[end..])).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_sharing_a_select_field_must_both_map_onto_its_options() {
    let db = fresh_db().await;
    let avito = avito_writing_raw_delivery_values();
    let sources = || {
        vec![
            source(
                "kaspi_main",
                MarketplaceKind::Kaspi,
                "config/maps/kaspi.toml".into(),
            ),
            source("avito_main", MarketplaceKind::Avito, avito.clone()),
        ]
    };
    // Offline: the two maps disagree about the field.
    let problems = MapRegistry::load(sources(), &BTreeMap::new())
        .await
        .err()
        .expect("refused offline");
    let problem = problems
        .iter()
        .find(|p| p.contains("Способ доставки"))
        .unwrap_or_else(|| panic!("{problems:?}"));
    assert!(
        problem.contains("avito.toml")
            && problem.contains("kaspi.toml")
            && problem.contains("Kaspi Postomat"),
        "names both maps, the field and the options: {problem}"
    );
    // Online: the field is a select in amoCRM; the raw values cannot go in.
    let sim = sim().await;
    seed_crm_from_maps(
        &sim,
        &[
            Path::new("config/maps/kaspi.toml"),
            Path::new("config/maps/avito.toml"),
        ],
    );
    let problems = MapRegistry::load(
        vec![source("avito_main", MarketplaceKind::Avito, avito.clone())],
        &crm(&sim, &db.pool),
    )
    .await
    .err()
    .expect("refused online");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("lead.fields.delivery_mode")
                && p.contains("is a select in amoCRM")
                && p.contains("Пункт выдачи")),
        "{problems:?}"
    );
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_renamed_in_the_crm_is_reported_with_file_line_key_and_the_real_stages() {
    let db = fresh_db().await;
    let sim = sim().await;
    seed_crm_from_map(
        &sim,
        Path::new("config/maps/kaspi.toml"),
        Some(("Готов к отгрузке", "Готово к выдаче")),
    );
    let problems = MapRegistry::load(
        vec![source(
            "kaspi_main",
            MarketplaceKind::Kaspi,
            "config/maps/kaspi.toml".into(),
        )],
        &crm(&sim, &db.pool),
    )
    .await
    .err()
    .expect("the map names a stage the CRM does not have");
    let text = std::fs::read_to_string("config/maps/kaspi.toml").unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("stage = \"Готов к отгрузке\""))
        .unwrap()
        + 1;
    let expected = format!("config/maps/kaspi.toml:{line}: `statuses.assembled.stage`: pipeline `Kaspi Магазин` has no stage `Готов к отгрузке`; its stages are:");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&expected) && p.contains("Готово к выдаче")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("actions.\"Готов к отгрузке\"")),
        "the action's stage too: {problems:#?}"
    );
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_keeps_the_old_map_and_a_good_one_reroutes_the_next_job() {
    let db = fresh_db().await;
    let sim = sim().await;
    seed_crm_from_map(&sim, Path::new("config/maps/kaspi.toml"), None);
    let path = copy_of("kaspi.toml");
    let crm = crm(&sim, &db.pool);
    let registry = Arc::new(
        MapRegistry::load(
            vec![source("kaspi_main", MarketplaceKind::Kaspi, path.clone())],
            &crm,
        )
        .await
        .unwrap(),
    );
    let stage_of =
        |maps: &orderbridge::mapping::MapSet| match maps.shops["kaspi_main"].route("accepted") {
            Some(Route::Stage { stage, .. }) => stage.clone(),
            other => panic!("unexpected {other:?}"),
        };
    let in_flight = registry.current();
    assert_eq!(stage_of(&in_flight), "В работе / Сборка");

    // A broken edit: refused, the old map stays, the problem is kept for /readyz.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replacen("[statuses.accepted]", "[statuses.acepted]", 1),
    )
    .unwrap();
    let problems = registry.reload(&crm).await.unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains("statuses.acepted")),
        "{problems:?}"
    );
    assert_eq!(stage_of(&registry.current()), "В работе / Сборка");
    assert!(!registry.errors().is_empty());

    // A good edit, noticed on disk by the watcher: the next job routes by it.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(registry.clone().watch(
        crm.clone(),
        Duration::from_millis(100),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        &path,
        good.replacen(
            "[statuses.accepted]\nstage = \"В работе / Сборка\"",
            "[statuses.accepted]\nstage = \"Готов к отгрузке\"",
            1,
        ),
    )
    .unwrap();
    wait_for(
        "the watcher reloads the map",
        Duration::from_secs(10),
        || async { stage_of(&registry.current()) == "Готов к отгрузке" },
    )
    .await;
    assert!(
        registry.errors().is_empty(),
        "a good reload clears the errors"
    );
    // A job that started before the reload finishes under its map.
    assert_eq!(stage_of(&in_flight), "В работе / Сборка");
    shutdown.cancel();
    watcher.await.unwrap();
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_shows_a_refused_reload() {
    let db = fresh_db().await;
    let path = copy_of("kaspi.toml");
    // No CRM configured: validated offline.
    let registry = Arc::new(
        MapRegistry::load(
            vec![source("kaspi_main", MarketplaceKind::Kaspi, path.clone())],
            &BTreeMap::new(),
        )
        .await
        .unwrap(),
    );
    assert!(!registry.current().shops["kaspi_main"].online);
    let listener = orderbridge::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(orderbridge::http::serve(
        listener,
        orderbridge::http::AppState {
            pool: db.pool.clone(),
            metrics: orderbridge::telemetry::metrics().unwrap(),
            amocrm_hooks: Default::default(),
            avito_hooks: Default::default(),
            partner_hooks: Default::default(),
            webhook_body_limit: 1024,
            maps: Some(registry.clone()),
            inbox_wake: Default::default(),
            dashboard: Default::default(),
        },
        shutdown.clone(),
    ));
    let body: serde_json::Value = reqwest::get(format!("http://{addr}/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["checks"]["maps"], "ok");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("sla = \"2h\"", "sla = \"soon\"", 1)).unwrap();
    registry.reload(&BTreeMap::new()).await.unwrap_err();
    let response = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "the previous maps are still in force"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    let refused = body["checks"]["maps"]["reload_refused"][0]
        .as_str()
        .unwrap();
    assert!(
        refused.contains("statuses.accepted.sla") && refused.contains("`soon` is not a duration"),
        "{refused}"
    );
    shutdown.cancel();
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_names_what_the_crm_lacks() {
    let sim = sim().await;
    seed_crm_from_map(
        &sim,
        Path::new("config/maps/kaspi.toml"),
        Some(("В доставке", "Доставка")),
    );
    let dir = std::env::temp_dir().join(format!("orderbridge-online-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("orderbridge.toml");
    std::fs::write(
        &file,
        format!(
            "[crm_accounts.main]\nbase_url = \"{}\"\nauth = {{ mode = \"long_lived\", token = \"{TOKEN}\" }}\n\
             [shops.k]\nmarketplace = \"kaspi\"\ncrm_account = \"main\"\nmap = \"config/maps/kaspi.toml\"\nbase_url = \"https://kaspi.kz/shop/api/v2\"\ntoken = \"x\"\n",
            sim.base_url()
        ),
    )
    .unwrap();
    let name = format!("ob_test_{}", uuid::Uuid::new_v4().simple());
    let mut url = reqwest::Url::parse(&admin_url()).unwrap();
    url.set_path(&format!("/{name}"));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orderbridge"))
        .args([
            "--config",
            file.to_str().unwrap(),
            "check-config",
            "--online",
        ])
        .env("DATABASE_URL", url.as_str())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(said.contains("`statuses.handed_to_courier.stage`: pipeline `Kaspi Магазин` has no stage `В доставке`"), "{said}");
    assert!(
        said.contains("Доставка"),
        "names the stages the pipeline has: {said}"
    );
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
}
