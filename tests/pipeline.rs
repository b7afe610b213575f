//! Marketplace → CRM end to end: the Kaspi simulator, the poller, the outbox
//! engine with the CRM sync handler, the mapping engine, and the amoCRM
//! simulator, over real HTTP and a real PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use orderbridge::config::MarketplaceKind;
use orderbridge::connectors::amocrm::{AmoAccount, AmoAuth, AmoClient};
use orderbridge::connectors::kaspi::{KaspiClient, KaspiShop};
use orderbridge::mapping::{MapRegistry, MapSource, Route};
use orderbridge::outbox::Engine;
use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig};
use orderbridge::sim::kaspi::{KaspiSim, KaspiSimConfig, SimOrderSpec};
use orderbridge::sync::kaspi_poll::KaspiPoller;
use orderbridge::sync::to_crm::CrmSyncHandler;
use secrecy::SecretString;

const TOKEN: &str = "long-lived-pipeline-token";

fn seed_crm(sim: &AmoSim) {
    let table: toml::Table = std::fs::read_to_string("config/maps/kaspi.toml")
        .unwrap()
        .parse()
        .unwrap();
    let mut stages: Vec<String> = Vec::new();
    for row in table["statuses"].as_table().unwrap().values() {
        if let Some(stage) = row.get("stage").and_then(|s| s.as_str()) {
            if !stages.iter().any(|s| s == stage) {
                stages.push(stage.to_string());
            }
        }
    }
    let refs: Vec<&str> = stages.iter().map(String::as_str).collect();
    sim.seed_pipeline(table["pipeline"]["name"].as_str().unwrap(), &refs);
    for role in table["roles"].as_table().unwrap().values() {
        for user in role["users"].as_array().unwrap() {
            sim.seed_user(user.as_str().unwrap());
        }
    }
    let lead = table["lead"].as_table().unwrap();
    let enums = lead["enums"].as_table().unwrap();
    for (slot, field) in lead["fields"].as_table().unwrap() {
        let options: Vec<String> = enums
            .get(slot)
            .and_then(|o| o.as_table())
            .map(|o| {
                o.values()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let refs: Vec<&str> = options.iter().map(String::as_str).collect();
        sim.seed_lead_field(
            field.as_str().unwrap(),
            if refs.is_empty() { "text" } else { "select" },
            &refs,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kaspi_orders_become_leads_with_one_contact_per_customer_and_follow_their_status() {
    let db = fresh_db().await;
    let kaspi = KaspiSim::start(KaspiSimConfig::default()).await.unwrap();
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await
    .unwrap();
    seed_crm(&amo);
    let client = AmoClient::new(
        AmoAccount {
            name: "main".into(),
            base_url: reqwest::Url::parse(&amo.base_url()).unwrap(),
            auth: AmoAuth::LongLived(SecretString::from(TOKEN)),
            timeout: Duration::from_secs(5),
            circuit_cooldown: Duration::from_secs(60),
        },
        db.pool.clone(),
        // amoCRM's 7 req/s, shared as in the daemon.
        orderbridge::outbox::limits::Limiters::new([])
            .with_per_request(
                "amocrm:main",
                orderbridge::config::RateQuota {
                    requests: 7,
                    per: Duration::from_secs(1),
                    burst: 1,
                },
            )
            .limiter("amocrm:main"),
    )
    .unwrap();
    let clients = BTreeMap::from([("main".to_string(), client)]);
    let maps = Arc::new(
        MapRegistry::load(
            vec![MapSource {
                shop: "kaspi_main".into(),
                marketplace: MarketplaceKind::Kaspi,
                crm_account: "main".into(),
                path: "config/maps/kaspi.toml".into(),
            }],
            &clients,
        )
        .await
        .unwrap(),
    );
    let engine = start(Engine::builder(db.pool.clone(), test_config()).handler(
        orderbridge::sync::ingest::CRM_SYNC_KIND,
        CrmSyncHandler {
            pool: db.pool.clone(),
            clients: clients.clone(),
            maps: maps.clone(),
            shop_crm: BTreeMap::from([("kaspi_main".to_string(), "main".to_string())]),
        },
    ));
    let poller = KaspiPoller::new(
        KaspiClient::new(
            KaspiShop {
                name: "kaspi_main".into(),
                base_url: kaspi.base_url(),
                token: SecretString::from("kaspi-test-token"),
                merchant_uid: None,
                timeout: Duration::from_secs(5),
            },
            None,
        )
        .unwrap(),
        db.pool.clone(),
        "amocrm:main",
    );
    let now = chrono::Utc::now().timestamp_millis();
    let first = kaspi.create_order(SimOrderSpec::new("610001", now - 60_000));
    // The same customer again (the phone in another spelling) and a new one.
    kaspi.create_order(SimOrderSpec {
        customer_phone: "87021234567".into(),
        ..SimOrderSpec::new("610002", now - 50_000)
    });
    kaspi.create_order(SimOrderSpec {
        customer_phone: "7051112233".into(),
        customer_name: "Дана".into(),
        ..SimOrderSpec::new("610003", now - 40_000)
    });
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    let drained = || async { count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0 };
    wait_for("the CRM intents are done", Duration::from_secs(30), drained).await;

    let routing = maps.current().shops["kaspi_main"].clone();
    let stage_id = |key: &str| match routing.route(key) {
        Some(Route::Stage {
            stage_id: Some(id), ..
        }) => *id,
        other => panic!("{key}: {other:?}"),
    };
    let leads = amo.leads();
    assert_eq!(leads.len(), 3, "one lead per order");
    for lead in &leads {
        assert_eq!(lead.status_id, stage_id("new"));
        assert_eq!(Some(lead.pipeline_id), routing.pipeline_id);
        assert_eq!(lead.tags, vec!["kaspi".to_string()]);
        assert!(lead.name.starts_with("Kaspi 6100"), "{}", lead.name);
        assert!(
            lead.custom_fields_values.to_string().contains("6100"),
            "the order code field is set"
        );
    }
    let contacts = amo.contacts();
    assert_eq!(contacts.len(), 2, "a repeat customer keeps one contact");
    let contact_of = |code: &str| {
        leads
            .iter()
            .find(|l| l.name.contains(code))
            .unwrap()
            .contact_ids
            .clone()
    };
    assert_eq!(contact_of("610001"), contact_of("610002"));
    assert_ne!(contact_of("610001"), contact_of("610003"));

    // The merchant accepts at Kaspi: the lead follows to the mapped stage.
    kaspi.kaspi_accepts_order(&first.id);
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the move is pushed", Duration::from_secs(30), drained).await;
    let lead = amo
        .leads()
        .into_iter()
        .find(|l| l.name.contains("610001"))
        .unwrap();
    assert_eq!(lead.status_id, stage_id("accepted"));
    assert_eq!(amo.leads().len(), 3, "no second lead");
    assert_eq!(amo.count_status(429), 0, "never faster than amoCRM allows");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox_attempts WHERE outcome <> 'success'"
        )
        .await,
        0
    );
    engine.stop().await;
    db.drop_now().await.unwrap();
}
