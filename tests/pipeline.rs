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

/// The parts every pipeline test needs: both simulators (amoCRM seeded from the
/// shipped Kaspi map), the CRM client behind amoCRM's 7 req/s, the maps
/// resolved online, and the Kaspi client.
struct Bridge {
    db: orderbridge::store::ScratchDatabase,
    kaspi: KaspiSim,
    amo: AmoSim,
    clients: BTreeMap<String, AmoClient>,
    maps: Arc<MapRegistry>,
    kaspi_client: KaspiClient,
}

async fn bridge() -> Bridge {
    let db = fresh_db().await;
    let kaspi = KaspiSim::start(KaspiSimConfig::default()).await.unwrap();
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await
    .unwrap();
    seed_crm_from_map(&amo, std::path::Path::new("config/maps/kaspi.toml"), None);
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
    let kaspi_client = KaspiClient::new(
        KaspiShop {
            name: "kaspi_main".into(),
            base_url: kaspi.base_url(),
            token: SecretString::from("kaspi-test-token"),
            merchant_uid: None,
            timeout: Duration::from_secs(5),
        },
        None,
    )
    .unwrap();
    Bridge {
        db,
        kaspi,
        amo,
        clients,
        maps,
        kaspi_client,
    }
}

fn crm_sync(b: &Bridge) -> CrmSyncHandler {
    CrmSyncHandler::new(
        b.db.pool.clone(),
        b.clients.clone(),
        b.maps.clone(),
        BTreeMap::from([("kaspi_main".to_string(), "main".to_string())]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kaspi_orders_become_leads_with_one_contact_per_customer_and_follow_their_status() {
    let b = bridge().await;
    let (db, kaspi, amo, maps) = (&b.db, &b.kaspi, &b.amo, &b.maps);
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
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
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managers_move_accepts_at_kaspi_without_an_echo_loop() {
    use orderbridge::http::hooks::HookAccount;
    use orderbridge::sync::to_marketplace::{
        process_amocrm_inbox, MarketplaceActionHandler, MARKETPLACE_ACTION_KIND,
    };
    let b = bridge().await;
    let (db, kaspi, amo, maps, clients) = (&b.db, &b.kaspi, &b.amo, &b.maps, &b.clients);
    let client = clients["main"].clone();
    let manager = amo.seed_user("Менеджер смены");
    let kaspi_client = b.kaspi_client.clone();
    // Webhooks from the CRM into the bridge's inbox.
    let secret = "pipeline-hook-secret-0123456789";
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
            amocrm_hooks: Arc::new(vec![HookAccount {
                name: "main".into(),
                secret: SecretString::from(secret),
                subdomain: "example".into(),
                account_id: 31361463,
            }]),
            avito_hooks: Default::default(),
            partner_hooks: Default::default(),
            webhook_body_limit: 1 << 20,
            maps: Some(maps.clone()),
            inbox_wake: Default::default(),
            dashboard: Default::default(),
        },
        shutdown.clone(),
    ));
    client
        .ensure_webhook(
            &format!("http://{addr}/hooks/amocrm/{secret}"),
            &["status_lead"],
        )
        .await
        .unwrap();
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b))
            .handler(
                MARKETPLACE_ACTION_KIND,
                MarketplaceActionHandler {
                    pool: db.pool.clone(),
                    maps: maps.clone(),
                    kaspi: BTreeMap::from([("kaspi_main".to_string(), kaspi_client.clone())]),
                    avito: BTreeMap::new(),
                    crm: clients.clone(),
                },
            ),
    );
    let poller = KaspiPoller::new(kaspi_client, db.pool.clone(), "amocrm:main");
    let order = kaspi.create_order(SimOrderSpec::new(
        "620001",
        chrono::Utc::now().timestamp_millis() - 60_000,
    ));
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    let drained = || async { count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0 };
    wait_for("the lead exists", Duration::from_secs(30), drained).await;
    let lead = amo.leads().into_iter().next().unwrap();
    // The bridge's own create comes back as a webhook: an echo, no action.
    tokio::time::sleep(Duration::from_millis(300)).await;
    process_amocrm_inbox(&db.pool, maps, &BTreeMap::new(), &Default::default())
        .await
        .unwrap();
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await,
        0,
        "no action from an echo"
    );

    // A manager moves the lead into «В работе / Сборка»: Kaspi accepts.
    let routing = maps.current().shops["kaspi_main"].clone();
    let working = routing
        .action_for_stage(None, "В работе / Сборка")
        .unwrap()
        .stage_id
        .unwrap();
    amo.manager_moves_lead(lead.id, lead.pipeline_id, working, manager);
    wait_for(
        "the manager's move is stored",
        Duration::from_secs(10),
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM inbox WHERE processed_at IS NULL",
            )
            .await
                >= 1
        },
    )
    .await;
    assert_eq!(
        process_amocrm_inbox(&db.pool, maps, &BTreeMap::new(), &Default::default())
            .await
            .unwrap(),
        1
    );
    wait_for("Kaspi accepted", Duration::from_secs(30), || async {
        kaspi.order(&order.id).unwrap().status == "ACCEPTED_BY_MERCHANT"
    })
    .await;
    // The next poll sees ACCEPTED: the lead is already there, so no CRM write, no loop.
    let patches_before = amo
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the sync is done", Duration::from_secs(30), drained).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    process_amocrm_inbox(&db.pool, maps, &BTreeMap::new(), &Default::default())
        .await
        .unwrap();
    assert_eq!(
        amo.requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count(),
        patches_before,
        "no echo loop"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_jobs").await, 0);
    let accepts = kaspi
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(accepts, 1, "one accept at Kaspi");

    // A move Kaspi does not allow now (assemble on an order not delivered by Kaspi
    // would be refused): completing twice is refused by Kaspi's table; here: cancel
    // after Kaspi completed it.
    kaspi.kaspi_completes(&order.id);
    let closed = routing
        .action_for_stage(None, "Закрыто и не реализовано")
        .unwrap()
        .stage_id
        .unwrap();
    amo.manager_moves_lead(lead.id, lead.pipeline_id, closed, manager);
    wait_for("the move is stored", Duration::from_secs(10), || async {
        count(
            &db.pool,
            "SELECT count(*) FROM inbox WHERE processed_at IS NULL",
        )
        .await
            >= 1
    })
    .await;
    process_amocrm_inbox(&db.pool, maps, &BTreeMap::new(), &Default::default())
        .await
        .unwrap();
    wait_for("the refusal is noted", Duration::from_secs(30), || async {
        amo.notes()
            .iter()
            .any(|n| n.entity_id == lead.id && n.text.contains("was not applied"))
    })
    .await;
    assert_eq!(
        kaspi.order(&order.id).unwrap().status,
        "COMPLETED",
        "nothing was sent"
    );
    engine.stop().await;
    shutdown.cancel();
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_webhooks_are_caught_by_the_events_poll_and_a_final_status_wins_with_a_note() {
    use orderbridge::sync::to_marketplace::{
        poll_amocrm_events, process_amocrm_inbox, MarketplaceActionHandler, MARKETPLACE_ACTION_KIND,
    };
    let b = bridge().await;
    let (db, kaspi, amo, maps, clients) = (&b.db, &b.kaspi, &b.amo, &b.maps, &b.clients);
    let manager = amo.seed_user("Менеджер смены");
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b))
            .handler(
                MARKETPLACE_ACTION_KIND,
                MarketplaceActionHandler {
                    pool: db.pool.clone(),
                    maps: maps.clone(),
                    kaspi: BTreeMap::from([("kaspi_main".to_string(), b.kaspi_client.clone())]),
                    avito: BTreeMap::new(),
                    crm: clients.clone(),
                },
            ),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    let order = kaspi.create_order(SimOrderSpec::new(
        "630001",
        chrono::Utc::now().timestamp_millis() - 60_000,
    ));
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    let drained = || async { count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0 };
    wait_for("the lead exists", Duration::from_secs(30), drained).await;
    let lead = amo.leads().into_iter().next().unwrap();
    let routing = maps.current().shops["kaspi_main"].clone();
    let stage = |name: &str| {
        routing
            .action_for_stage(None, name)
            .unwrap()
            .stage_id
            .unwrap()
    };

    // No webhook is subscribed: the manager's move reaches the bridge through the events poll.
    amo.manager_moves_lead(
        lead.id,
        lead.pipeline_id,
        stage("В работе / Сборка"),
        manager,
    );
    assert!(
        poll_amocrm_events(&clients["main"], &db.pool, Duration::from_secs(300))
            .await
            .unwrap()
            >= 1
    );
    assert_eq!(
        poll_amocrm_events(&clients["main"], &db.pool, Duration::from_secs(300))
            .await
            .unwrap(),
        0,
        "deduplicated"
    );
    assert_eq!(
        process_amocrm_inbox(&db.pool, maps, &BTreeMap::new(), &Default::default())
            .await
            .unwrap(),
        1
    );
    wait_for("Kaspi accepted", Duration::from_secs(30), || async {
        kaspi.order(&order.id).unwrap().status == "ACCEPTED_BY_MERCHANT"
    })
    .await;

    // The manager closes the lead as lost, but the buyer's order completes at Kaspi:
    // the lead goes to the completed stage with a note saying why.
    amo.manager_moves_lead(
        lead.id,
        lead.pipeline_id,
        stage("Закрыто и не реализовано"),
        manager,
    );
    poll_amocrm_events(&clients["main"], &db.pool, Duration::from_secs(300))
        .await
        .unwrap();
    kaspi.kaspi_completes(&order.id);
    process_amocrm_inbox(&db.pool, maps, &BTreeMap::new(), &Default::default())
        .await
        .unwrap();
    wait_for(
        "the refused cancel is handled",
        Duration::from_secs(30),
        drained,
    )
    .await;
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the lead follows Kaspi", Duration::from_secs(30), drained).await;
    let done = match routing.route("completed") {
        Some(Route::Stage {
            stage_id: Some(id), ..
        }) => *id,
        other => panic!("{other:?}"),
    };
    assert_eq!(amo.lead(lead.id).unwrap().status_id, done);
    assert!(
        amo.notes()
            .iter()
            .any(|n| n.entity_id == lead.id
                && n.text.contains("moved back to «Успешно реализовано»")),
        "{:?}",
        amo.notes()
    );
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_created_before_a_crash_is_found_by_its_exact_code_not_by_a_lookalike() {
    use orderbridge::connectors::amocrm::{FieldInput, FieldValue, NewLead};
    let b = bridge().await;
    let (db, kaspi, amo, maps) = (&b.db, &b.kaspi, &b.amo, &b.maps);
    let routing = maps.current().shops["kaspi_main"].clone();
    let code_field = routing.fields["order_code"].1.unwrap();
    let new_stage = match routing.route("new") {
        Some(Route::Stage {
            stage_id: Some(id), ..
        }) => *id,
        other => panic!("{other:?}"),
    };
    // A decoy: another order's lead whose name and code contain "1234".
    b.clients["main"]
        .create_leads(&[NewLead {
            request_id: "decoy".into(),
            name: "Kaspi 12345".into(),
            price: None,
            pipeline_id: routing.pipeline_id.unwrap(),
            status_id: new_stage,
            responsible_user_id: None,
            fields: vec![FieldValue {
                field_id: code_field,
                values: vec![FieldInput::Text("12345".into())],
            }],
            tags: vec![],
            contact_ids: vec![],
        }])
        .await
        .unwrap();
    let decoy = amo.leads()[0].id;
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    kaspi.create_order(SimOrderSpec {
        customer_phone: String::new(),
        ..SimOrderSpec::new("1234", chrono::Utc::now().timestamp_millis() - 60_000)
    });
    // amoCRM creates the lead, but its answer is lost: the job cannot know.
    amo.inject(orderbridge::sim::amocrm::Fault::LoseAnswer, 1);
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the intent is done", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    let leads = amo.leads();
    assert_eq!(
        leads.len(),
        2,
        "the decoy and one lead for order 1234: {leads:?}"
    );
    let mine = leads.iter().find(|l| l.id != decoy).unwrap();
    let linked: i64 = sqlx::query_scalar("SELECT lead_id FROM crm_links")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        linked as u64, mine.id,
        "linked to its own lead, not the decoy"
    );
    let attempts: i64 = count(&db.pool, "SELECT count(*) FROM outbox_attempts").await;
    assert!(
        attempts >= 2,
        "the first attempt failed, a retry found the lead"
    );
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

/// Everything the crate logs in this test binary, as JSON lines.
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter("debug")
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
    .clone()
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_on_contact_searches_leave_no_phone_in_attempts_or_logs() {
    let logs = captured_logs();
    let b = bridge().await;
    let (db, kaspi, amo) = (&b.db, &b.kaspi, &b.amo);
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    let phones = ["7027770011", "7027770022", "7027770033"];
    let now = chrono::Utc::now().timestamp_millis();
    for (i, phone) in phones.iter().enumerate() {
        kaspi.create_order(SimOrderSpec {
            customer_phone: phone.to_string(),
            ..SimOrderSpec::new(&format!("66000{i}"), now - 60_000)
        });
    }
    // The first amoCRM calls (the contact searches, their URLs holding the
    // phones) lose their connections.
    amo.inject(orderbridge::sim::amocrm::Fault::ConnectionReset, 3);
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the intents are done", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    assert_eq!(amo.leads().len(), 3);
    let errors: Vec<Option<String>> =
        sqlx::query_scalar("SELECT error FROM outbox_attempts WHERE error IS NOT NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(!errors.is_empty(), "the faults failed some attempts");
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(logs.contains("amoCRM"), "logs were captured");
    for phone in phones {
        for text in errors.iter().flatten() {
            assert!(
                !text.contains(phone),
                "a phone in an attempt's error: {text}"
            );
        }
        assert!(!logs.contains(phone), "a phone in the logs");
    }
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_address_updates_the_lead_once_and_an_unchanged_order_sends_nothing() {
    let b = bridge().await;
    let (db, kaspi, amo) = (&b.db, &b.kaspi, &b.amo);
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    let order = kaspi.create_order(SimOrderSpec {
        delivery_address: Some("Алматы, Абая, 1".into()),
        ..SimOrderSpec::new("670001", chrono::Utc::now().timestamp_millis() - 60_000)
    });
    let drained = || async { count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0 };
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the lead exists", Duration::from_secs(30), drained).await;
    let lead = amo.leads().remove(0);
    assert!(lead
        .custom_fields_values
        .to_string()
        .contains("Алматы, Абая, 1"));
    let patches = || {
        amo.requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count()
    };
    let before = patches();

    // The buyer changes the address at Kaspi: one update with the new address.
    kaspi.set_field(
        &order.id,
        "deliveryAddress",
        serde_json::json!({ "formattedAddress": "Алматы, Достык, 5" }),
    );
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the update is done", Duration::from_secs(30), drained).await;
    assert_eq!(patches(), before + 1, "one update for one change");
    let fields = amo.lead(lead.id).unwrap().custom_fields_values.to_string();
    assert!(fields.contains("Алматы, Достык, 5"), "{fields}");
    assert_eq!(
        amo.lead(lead.id).unwrap().status_id,
        lead.status_id,
        "the stage stays"
    );

    // Nothing changed: nothing is sent.
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the sync is done", Duration::from_secs(30), drained).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(patches(), before + 1, "no update without a change");
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

/// Samples how many of the pool's connections are in use (every 2 ms) until
/// stopped; the samples come back when the returned task ends.
fn watch_pool(
    pool: sqlx::PgPool,
) -> (
    tokio::task::JoinHandle<Vec<u32>>,
    tokio_util::sync::CancellationToken,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let samples = tokio::spawn(async move {
        let mut samples = Vec::new();
        while !s.is_cancelled() {
            samples.push(pool.size().saturating_sub(pool.num_idle() as u32));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples
    });
    (samples, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_orders_of_one_new_customer_at_once_make_one_contact_without_exhausting_the_pool() {
    let b = bridge().await;
    let (db, kaspi, amo) = (&b.db, &b.kaspi, &b.amo);
    let mut config = test_config();
    config.concurrency = 64;
    let engine = start(
        Engine::builder(db.pool.clone(), config)
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    let now = chrono::Utc::now().timestamp_millis();
    for i in 0..20 {
        kaspi.create_order(SimOrderSpec {
            customer_phone: "7019998877".into(),
            ..SimOrderSpec::new(&format!("68{i:04}"), now - 60_000 + i)
        });
    }
    // A real account's latency: the other nineteen jobs wait for the first
    // one's contact for seconds, and must not hold a connection meanwhile.
    amo.set_answer_delay(Duration::from_millis(150));
    let (samples, stop_watch) = watch_pool(db.pool.clone());
    let before = amo.requests().len();
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the leads exist", Duration::from_secs(60), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    stop_watch.cancel();
    amo.set_answer_delay(Duration::ZERO);
    let mut samples = samples.await.unwrap();
    let requests = amo.requests().len() - before;
    assert_eq!(amo.leads().len(), 20);
    assert_eq!(amo.contacts().len(), 1, "one contact for one customer");
    assert!(amo
        .leads()
        .iter()
        .all(|l| l.contact_ids == amo.leads()[0].contact_ids));
    let max = db.pool.options().get_max_connections();
    samples.sort_unstable();
    let peak = samples.last().copied().unwrap_or(0);
    let median = samples[samples.len() / 2];
    let busy_share = samples.iter().filter(|&&n| n >= 10).count() as f64 / samples.len() as f64;
    println!("largest_pool_use: {peak} of {max}");
    println!("median_pool_use: {median} of {max}");
    println!("share_of_time_with_10_or_more_in_use: {busy_share:.3}");
    println!(
        "amocrm_requests_per_new_order_one_customer: {:.2}",
        requests as f64 / 20.0
    );
    // Twenty jobs starting at once may fill the pool for a few milliseconds
    // with their first short queries; a waiting job holding a connection (an
    // advisory-lock transaction across amoCRM calls) would keep nineteen in
    // use for the whole run.
    assert!(
        samples.len() > 100,
        "the run lasted long enough to judge ({} samples)",
        samples.len()
    );
    assert!(
        median <= 2,
        "waiting jobs hold no connection: median {median} in use"
    );
    assert!(
        busy_share < 0.1,
        "ten or more connections in use {:.0}% of the time",
        busy_share * 100.0
    );

    // Twenty new customers, then twenty orders of known ones.
    let before = amo.requests().len();
    for i in 0..20 {
        kaspi.create_order(SimOrderSpec {
            customer_phone: format!("70133{i:05}"),
            ..SimOrderSpec::new(&format!("69{i:04}"), now - 30_000 + i)
        });
    }
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for(
        "the new customers' leads",
        Duration::from_secs(60),
        || async { count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0 },
    )
    .await;
    let new_customers = amo.requests().len() - before;
    let before = amo.requests().len();
    for i in 0..20 {
        kaspi.create_order(SimOrderSpec {
            customer_phone: format!("70133{i:05}"),
            ..SimOrderSpec::new(&format!("71{i:04}"), now - 20_000 + i)
        });
    }
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for(
        "the repeat customers' leads",
        Duration::from_secs(60),
        || async { count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0 },
    )
    .await;
    let repeat = amo.requests().len() - before;
    assert_eq!(amo.contacts().len(), 21);
    println!(
        "amocrm_requests_per_new_order_new_customer: {:.2}",
        new_customers as f64 / 20.0
    );
    println!(
        "amocrm_requests_per_new_order_repeat_customer: {:.2}",
        repeat as f64 / 20.0
    );
    assert!(
        new_customers <= 40 && repeat <= 40,
        "at most two requests per new order"
    );
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_without_phone_or_items_still_becomes_a_lead_with_a_note_naming_what_is_missing() {
    let b = bridge().await;
    let (db, kaspi, amo) = (&b.db, &b.kaspi, &b.amo);
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    kaspi.create_order(SimOrderSpec {
        customer_phone: String::new(),
        entries: vec![],
        ..SimOrderSpec::new("672001", chrono::Utc::now().timestamp_millis() - 60_000)
    });
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the lead and its note", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    let lead = amo.leads().remove(0);
    let note = amo
        .notes()
        .into_iter()
        .find(|n| n.entity_id == lead.id)
        .expect("a note on the lead");
    assert!(
        note.text.contains("the buyer's phone") && note.text.contains("the items"),
        "{}",
        note.text
    );
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_amocrm_refuses_never_loses_the_lead() {
    let b = bridge().await;
    let (db, kaspi, amo) = (&b.db, &b.kaspi, &b.amo);
    amo.refuse_contact_value("7015550101");
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    kaspi.create_order(SimOrderSpec {
        customer_phone: "7015550101".into(),
        ..SimOrderSpec::new("673001", chrono::Utc::now().timestamp_millis() - 60_000)
    });
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("the lead and its note", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    let leads = amo.leads();
    assert_eq!(leads.len(), 1, "the lead was created");
    assert_eq!(
        leads[0].contact_ids.len(),
        1,
        "with the contact, its name only"
    );
    let contacts = amo.contacts();
    assert_eq!(contacts.len(), 1);
    assert!(
        !format!("{:?}", contacts[0]).contains("7015550101"),
        "the refused phone was dropped"
    );
    assert!(amo
        .notes()
        .iter()
        .any(|n| n.entity_id == leads[0].id && n.text.contains("refused the buyer's phone")));
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox_jobs WHERE state = 'dead'"
        )
        .await,
        0
    );
    // The job's record keeps the reason, without the phone.
    let remark: String = sqlx::query_scalar(
        "SELECT error FROM outbox_attempts WHERE kind = 'crm_sync_order' AND outcome = 'success' AND error IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        remark.contains("refused the new contact's phone/email"),
        "{remark}"
    );
    assert!(!remark.contains("7015550101"), "{remark}");
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_with_an_email_and_no_phone_are_matched_by_email() {
    let b = bridge().await;
    let (db, kaspi, amo) = (&b.db, &b.kaspi, &b.amo);
    let known = amo.seed_contact("Айгерим", &[], &["Aigerim@Example.kz"]);
    let engine = start(
        Engine::builder(db.pool.clone(), test_config())
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            // A manager's move into a stage with a role reassigns the responsible.
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b)),
    );
    let now = chrono::Utc::now().timestamp_millis();
    // Orders as a source that gives an email and no phone would give them.
    let emails = [
        "aigerim@example.kz",
        "new.buyer@example.kz",
        "NEW.buyer@example.kz",
    ];
    for (i, email) in emails.iter().enumerate() {
        let created = kaspi.create_order(SimOrderSpec::new(
            &format!("75000{i}"),
            now - 60_000 + i as i64,
        ));
        let mut order = b.kaspi_client.order(&created.id).await.unwrap().unwrap();
        order.order.customer.phone = None;
        order.order.customer.email = orderbridge::domain::Email::parse(email);
        orderbridge::sync::ingest::write_order(
            &db.pool,
            &order.order,
            &order.content_hash,
            "amocrm:main",
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    }
    wait_for("three leads", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) FROM crm_links").await == 3
            && count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    let contacts = amo.contacts();
    assert_eq!(
        contacts.len(),
        2,
        "the known buyer matched, the new one created once: {contacts:?}"
    );
    let new = contacts.iter().find(|c| c.id != known).unwrap();
    assert_eq!(new.emails, vec!["new.buyer@example.kz".to_string()]);
    let leads = amo.leads();
    let with = |contact: u64| {
        leads
            .iter()
            .filter(|l| l.contact_ids == vec![contact])
            .count()
    };
    assert_eq!((with(known), with(new.id)), (1, 2));
    engine.stop().await;
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}

/// A backlog goes to amoCRM in batches, as the daemon declares them: 120 new
/// orders (ten new customers with two orders each, one lead amoCRM refuses)
/// → `/leads/complex` requests of at most 50 leads, never more than 7
/// requests in any second, 119 leads, the refused one dead with amoCRM's
/// reason while the others of its batch are created, one contact per customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_goes_in_batches_and_a_refused_lead_fails_alone() {
    let b = bridge().await;
    let (db, kaspi, amo) = (&b.db, &b.kaspi, &b.amo);
    let quota = orderbridge::config::RateQuota {
        requests: 7,
        per: Duration::from_secs(1),
        burst: 1,
    };
    let mut config = test_config();
    config.concurrency = 200;
    let engine = start(
        Engine::builder(db.pool.clone(), config)
            .limiters(Arc::new(
                orderbridge::outbox::limits::Limiters::new([])
                    .with_per_request("amocrm:main", quota),
            ))
            .handler(orderbridge::sync::ingest::CRM_SYNC_KIND, crm_sync(&b))
            .handler(orderbridge::sync::to_crm::ASSIGN_KIND, crm_sync(&b))
            .batched(
                orderbridge::sync::ingest::CRM_SYNC_KIND,
                3 * orderbridge::connectors::amocrm::BATCH,
            ),
    );
    let now = chrono::Utc::now().timestamp_millis();
    let phone = |i: i64| {
        if i < 20 {
            format!("70155{:05}", i / 2)
        } else {
            format!("70166{i:05}")
        }
    };
    for i in 0..120 {
        kaspi.create_order(SimOrderSpec {
            customer_phone: phone(i),
            ..SimOrderSpec::new(&format!("72{i:04}"), now - 60_000 + i)
        });
    }
    amo.refuse_lead_value("720057");
    // As the daemon does at start: the account's contacts indexed locally,
    // so de-duplication costs no request.
    orderbridge::sync::contact_index::refresh(&b.clients["main"], &db.pool)
        .await
        .unwrap();
    let poller = KaspiPoller::new(b.kaspi_client.clone(), db.pool.clone(), "amocrm:main");
    poller.poll_once(chrono::Utc::now()).await.unwrap();
    wait_for("every job finished", Duration::from_secs(90), || async {
        count(
            &db.pool,
            "SELECT count(*) FROM outbox_jobs WHERE state <> 'dead'",
        )
        .await
            == 0
    })
    .await;
    engine.stop().await;

    let leads = amo.leads();
    assert_eq!(leads.len(), 119, "every lead but the refused one");
    assert!(leads.iter().all(|l| !l.name.contains("720057")));
    let dead = orderbridge::store::outbox::jobs_in_state(&db.pool, "dead")
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "the refused lead's job alone is dead");
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("name") && reason.contains("not valid"),
        "amoCRM's reason: {reason}"
    );
    // One contact per customer (the refused order's customer has none).
    let contacts = amo.contacts();
    assert_eq!(contacts.len(), 10 + 99);
    for pair in 0..10 {
        let codes = [
            format!("72{:04}", 2 * pair),
            format!("72{:04}", 2 * pair + 1),
        ];
        let ids: Vec<Vec<u64>> = leads
            .iter()
            .filter(|l| codes.iter().any(|c| l.name.contains(c.as_str())))
            .map(|l| l.contact_ids.clone())
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(
            ids[0] == ids[1] && ids[0].len() == 1,
            "customer {pair}'s two orders share one contact: {ids:?}"
        );
    }
    let requests = amo.requests();
    let complex: Vec<usize> = requests
        .iter()
        .filter(|r| r.path == "/api/v4/leads/complex")
        .map(|r| {
            serde_json::from_str::<Vec<serde_json::Value>>(&r.body)
                .map(|v| v.len())
                .unwrap_or(0)
        })
        .collect();
    println!("complex_request_sizes: {complex:?}");
    assert!(complex.iter().all(|n| (1..=50).contains(n)), "{complex:?}");
    assert!(
        complex.len() <= 20,
        "120 leads in batches, not one request each: {} requests",
        complex.len()
    );
    let busiest = amo.max_requests_in_any_second();
    assert!(busiest <= 7, "{busiest} requests in one second");
    assert_eq!(amo.count_status(429), 0);
    let Bridge { db, .. } = b;
    db.drop_now().await.unwrap();
}
