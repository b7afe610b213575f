//! Avito messenger leads, and Avito orders beside a Kaspi shop, through the
//! daemon as deployed (`run_until`): the Avito and amoCRM simulators over
//! HTTP, a real PostgreSQL, the shipped maps. No webhook is registered: the
//! unread-chats poll finds the messages. Also how both marketplaces' pollers
//! pace themselves through a 429 storm.

mod common;

use std::time::Duration;

use common::*;
use orderbridge::config::Settings;
use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig};
use orderbridge::sim::avito::{AvitoSim, AvitoSimConfig};
use orderbridge::sim::kaspi::{KaspiSim, KaspiSimConfig};

const AMO_TOKEN: &str = "long-lived-messenger-token";

fn settings(db: &str, amo: &AmoSim, avito: &AvitoSim) -> Settings {
    settings_with(db, amo, avito, None)
}

/// With `kaspi`, a Kaspi shop on the same CRM account too (the maps share fields).
fn settings_with(db: &str, amo: &AmoSim, avito: &AvitoSim, kaspi: Option<&str>) -> Settings {
    let base = admin_url();
    let (server, _) = base.rsplit_once('/').unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = AvitoSimConfig::default();
    let text = format!(
        r#"
[database]
url = "{server}/{db}"
max_connections = 8
[http]
listen = "127.0.0.1:{port}"
[telemetry]
log_filter = "warn"
[crm_accounts.main]
base_url = "{amo}"
events_poll_interval = "1s"
[crm_accounts.main.auth]
mode = "long_lived"
token = "{AMO_TOKEN}"
[shops.avito_main]
marketplace = "avito"
crm_account = "main"
map = "config/maps/avito.toml"
base_url = "{avito}"
poll_interval = "1s"
client_id = "{id}"
client_secret = "{secret}"
{kaspi_shop}
"#,
        kaspi_shop = kaspi
            .map(|url| format!("[shops.kaspi_main]\nmarketplace = \"kaspi\"\ncrm_account = \"main\"\nmap = \"config/maps/kaspi.toml\"\nbase_url = \"{url}\"\npoll_interval = \"1s\"\ntoken = \"kaspi-test-token\"\n"))
            .unwrap_or_default(),
        amo = amo.base_url(),
        avito = avito.base_url(),
        id = config.client_id,
        secret = config.client_secret,
    );
    let dir = std::env::temp_dir().join(format!("orderbridge-{db}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("messenger.toml");
    std::fs::write(&path, text).unwrap();
    Settings::load_from(Some(&path), Vec::<(String, String)>::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyers_first_message_becomes_one_lead_and_later_ones_notes_on_it() {
    let db = fresh_db().await;
    let avito = AvitoSim::start(AvitoSimConfig::default()).await.unwrap();
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(AMO_TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await
    .unwrap();
    seed_crm_from_map(&amo, std::path::Path::new("config/maps/avito.toml"), None);
    let (stop, daemon) = start_daemon(settings(&db.name, &amo, &avito));
    avito
        .buyer_writes(
            "u2i-chat-1",
            1768287444,
            "iPhone 13 Pro 256",
            141906442,
            "Ivan",
            "Выкупите?",
        )
        .await;
    wait_for("the chat's lead", Duration::from_secs(30), || async {
        amo.leads().len() == 1 && amo.notes().iter().any(|n| n.text.contains("Выкупите?"))
    })
    .await;
    let lead = amo.leads().remove(0);
    assert_eq!(lead.name, "Avito: iPhone 13 Pro 256");
    assert!(
        lead.tags.iter().any(|t| t == "messenger"),
        "{:?}",
        lead.tags
    );
    let new = amo
        .pipelines()
        .into_iter()
        .find(|p| p.name == "Avito")
        .unwrap()
        .stages
        .into_iter()
        .find(|(_, name)| name == "Новая заявка")
        .unwrap()
        .0;
    assert_eq!(lead.status_id, new, "the map's messenger stage");
    assert_eq!(lead.contact_ids.len(), 1, "linked to the buyer's contact");
    let fields = lead.custom_fields_values.to_string();
    assert!(
        fields.contains("iPhone 13 Pro 256"),
        "the item's title: {fields}"
    );

    // A later message in the chat: a note on the same lead, no second lead.
    avito
        .buyer_writes(
            "u2i-chat-1",
            1768287444,
            "iPhone 13 Pro 256",
            141906442,
            "Ivan",
            "Когда можно приехать?",
        )
        .await;
    wait_for(
        "the note on the same lead",
        Duration::from_secs(30),
        || async {
            amo.notes()
                .iter()
                .any(|n| n.entity_id == lead.id && n.text.contains("Когда можно приехать?"))
        },
    )
    .await;
    // The same buyer about another item: a second lead, the same contact.
    avito
        .buyer_writes(
            "u2i-chat-2",
            1768287555,
            "MacBook Air M2",
            141906442,
            "Ivan",
            "А этот?",
        )
        .await;
    wait_for(
        "the second chat's lead",
        Duration::from_secs(30),
        || async { amo.leads().len() == 2 },
    )
    .await;
    let second = amo.leads().into_iter().find(|l| l.id != lead.id).unwrap();
    assert_eq!(
        second.contact_ids, lead.contact_ids,
        "one contact per buyer"
    );
    assert_eq!(amo.contacts().len(), 1);
    wait_for("the queue drained", Duration::from_secs(20), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    stop.cancel();
    daemon.await.unwrap();
    db.drop_now().await.unwrap();
}

/// A daemon serving an Avito and a Kaspi shop on one amoCRM account seeded
/// from both shipped maps.
struct BothShops {
    db: orderbridge::store::ScratchDatabase,
    avito: AvitoSim,
    kaspi: KaspiSim,
    amo: AmoSim,
    stop: tokio_util::sync::CancellationToken,
    daemon: tokio::task::JoinHandle<()>,
}

async fn both_shops() -> BothShops {
    let db = fresh_db().await;
    let avito = AvitoSim::start(AvitoSimConfig::default()).await.unwrap();
    let kaspi = KaspiSim::start(KaspiSimConfig::default()).await.unwrap();
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(AMO_TOKEN.into()),
        ..AmoSimConfig::default()
    })
    .await
    .unwrap();
    seed_crm_from_maps(
        &amo,
        &[
            std::path::Path::new("config/maps/kaspi.toml"),
            std::path::Path::new("config/maps/avito.toml"),
        ],
    );
    let (stop, daemon) = start_daemon(settings_with(
        &db.name,
        &amo,
        &avito,
        Some(&kaspi.base_url()),
    ));
    BothShops {
        db,
        avito,
        kaspi,
        amo,
        stop,
        daemon,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_avito_order_becomes_a_lead_with_the_shipped_maps_sharing_one_crm_account() {
    use orderbridge::sim::avito::SimAvitoOrderSpec;
    // The Kaspi shop serves too (kept alive to the end), with nothing in it.
    let BothShops {
        db,
        avito,
        kaspi: _kaspi,
        amo,
        stop,
        daemon,
    } = both_shops().await;
    let mut spec = SimAvitoOrderSpec::new(
        "70000000001",
        chrono::Utc::now() - chrono::Duration::minutes(5),
    );
    spec.service_type = "pvz".into();
    avito.create_order(spec);
    wait_for(
        "the Avito order's lead",
        Duration::from_secs(30),
        || async { amo.leads().len() == 1 },
    )
    .await;
    wait_for("the queue drained", Duration::from_secs(20), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox_jobs WHERE state = 'dead'"
        )
        .await,
        0
    );
    let lead = amo.leads().remove(0);
    let fields = lead.custom_fields_values.to_string();
    assert!(
        fields.contains("Пункт выдачи"),
        "the delivery kind as the select's option: {fields}"
    );
    stop.cancel();
    daemon.await.unwrap();
    db.drop_now().await.unwrap();
}

/// The api-faults suite's finding: through a 429 storm both marketplace
/// pollers went on polling every second (Avito got 2.6 requests a second),
/// where both APIs' facts say to back off exponentially. A throttled round
/// now doubles the wait before the next; the first good round resets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_slows_both_marketplace_pollers_down_and_they_recover() {
    use orderbridge::sim::avito::{AvitoFault, SimAvitoOrderSpec};
    use orderbridge::sim::kaspi::KaspiFault;
    let BothShops {
        db,
        avito,
        kaspi,
        amo,
        stop,
        daemon,
    } = both_shops().await;
    wait_for("both shops polled", Duration::from_secs(30), || async {
        count(
            &db.pool,
            "SELECT count(*) FROM poll_cursors WHERE last_success_at IS NOT NULL",
        )
        .await
            == 2
    })
    .await;
    let avito_polls = |sim: &AvitoSim| {
        sim.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/order-management/1/orders")
            .count()
    };
    let kaspi_polls = |sim: &KaspiSim| {
        sim.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/orders"))
            .count()
    };
    avito.fault_every(AvitoFault::TooManyRequests, 1);
    kaspi.fault_every(KaspiFault::TooManyRequests, 1);
    let (avito_before, kaspi_before) = (avito_polls(&avito), kaspi_polls(&kaspi));
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (avito_storm, kaspi_storm) = (
        avito_polls(&avito) - avito_before,
        kaspi_polls(&kaspi) - kaspi_before,
    );
    // At the usual pace (1 s) 12 s are 12 rounds; waiting 2, 4, 8 s after
    // the throttled ones leaves at most 4.
    assert!(
        (1..=4).contains(&avito_storm),
        "Avito order polls during 12 s of 429s: {avito_storm}"
    );
    assert!(
        (1..=4).contains(&kaspi_storm),
        "Kaspi order polls during 12 s of 429s: {kaspi_storm}"
    );
    avito.lift_steady_fault();
    kaspi.lift_steady_fault();
    // Both come back by themselves: new orders at both get their leads.
    let mut spec = SimAvitoOrderSpec::new("70000000077", chrono::Utc::now());
    spec.buyer_phone = Some("79260000077".into());
    avito.create_order(spec);
    kaspi.create_order(orderbridge::sim::kaspi::SimOrderSpec::new(
        "700000077",
        chrono::Utc::now().timestamp_millis(),
    ));
    wait_for(
        "both new orders' leads",
        Duration::from_secs(60),
        || async { amo.leads().len() == 2 },
    )
    .await;
    stop.cancel();
    daemon.await.unwrap();
    db.drop_now().await.unwrap();
}
