//! SLA timers, responsibles and the unassigned-order alert through the daemon
//! as deployed (`run_until`), against the Kaspi and amoCRM simulators over
//! HTTP and a real PostgreSQL. A copy of the shipped Kaspi map gives the new
//! stage a 4 s SLA so that warnings and breaches come within a test.

mod common;

use std::time::Duration;

use common::*;
use orderbridge::config::Settings;
use orderbridge::sim::amocrm::{AmoSim, SimTask};
use orderbridge::sim::kaspi::{KaspiSim, SimOrderSpec};
use tokio_util::sync::CancellationToken;

const AMO_TOKEN: &str = "long-lived-sla-token";

struct World {
    db: orderbridge::store::ScratchDatabase,
    kaspi: KaspiSim,
    amo: AmoSim,
    settings: Settings,
}

async fn world() -> World {
    world_with("").await
}

/// A world whose config carries `extra` (TOML sections) too.
async fn world_with(extra: &str) -> World {
    let (db, kaspi, amo) = kaspi_and_amocrm(AMO_TOKEN).await;
    let dir = std::env::temp_dir().join(format!("orderbridge-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    // The shipped map, with a 4 s SLA for new orders.
    let shipped = std::fs::read_to_string("config/maps/kaspi.toml").unwrap();
    let marker =
        "[statuses.new]\nstage = \"Новая заявка\"\nrole = \"sales_manager\"\nsla = \"15m\"";
    assert!(
        shipped.contains(marker),
        "the shipped map's new row changed"
    );
    let map = dir.join("kaspi.toml");
    std::fs::write(&map, shipped.replace(marker, &marker.replace("15m", "4s"))).unwrap();
    let port = free_port();
    let text = format!(
        r#"
[database]
url = "{db}"
max_connections = 8
[http]
listen = "127.0.0.1:{port}"
[telemetry]
log_filter = "warn"
[sla]
working_hours = "always"
warn_fraction = 0.5
check_interval = "200ms"
[reconcile]
interval = "0s"
{extra}
[crm_accounts.main]
base_url = "{amo}"
subdomain = "example"
account_id = 31361463
events_poll_interval = "1s"
[crm_accounts.main.auth]
mode = "long_lived"
token = "{AMO_TOKEN}"
[shops.kaspi_main]
marketplace = "kaspi"
crm_account = "main"
map = "{map}"
base_url = "{kaspi}"
poll_interval = "1s"
token = "kaspi-test-token"
"#,
        db = database_url(&db),
        amo = amo.base_url(),
        kaspi = kaspi.base_url(),
        map = map.display(),
    );
    let settings = settings_from(&dir, "sla.toml", &text);
    World {
        db,
        kaspi,
        amo,
        settings,
    }
}

impl World {
    fn start_daemon(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        start_daemon(self.settings.clone())
    }

    async fn lead_of(&self, code: &str) -> u64 {
        wait_for("the order's lead", Duration::from_secs(30), || async {
            count(
                &self.db.pool,
                &format!("SELECT count(*) FROM crm_links l JOIN orders o ON o.id = l.order_id WHERE o.code = '{code}'"),
            )
            .await
                == 1
        })
        .await;
        sqlx::query_scalar::<_, i64>(
            "SELECT l.lead_id FROM crm_links l JOIN orders o ON o.id = l.order_id WHERE o.code = $1",
        )
        .bind(code)
        .fetch_one(&self.db.pool)
        .await
        .unwrap() as u64
    }

    fn tasks_of(&self, lead: u64, needle: &str) -> Vec<SimTask> {
        self.amo
            .tasks()
            .into_iter()
            .filter(|t| t.entity_id == Some(lead) && t.text.contains(needle))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_and_a_breach_each_make_one_task_for_the_responsible_across_a_restart() {
    let w = world().await;
    let manager = w.amo.user_id("Менеджер по продажам").unwrap();
    let (stop, task) = w.start_daemon();
    let now = chrono::Utc::now().timestamp_millis();
    w.kaspi
        .create_order(SimOrderSpec::new("76000001", now - 1_000));
    let lead = w.lead_of("76000001").await;
    assert_eq!(
        w.amo.lead(lead).unwrap().responsible_user_id,
        manager,
        "the stage's role gives the responsible"
    );
    wait_for("the warning task", Duration::from_secs(20), || async {
        !w.tasks_of(lead, "SLA: заказ 76000001").is_empty()
    })
    .await;
    // The daemon stops and stays down past the deadline; the timers wait in
    // PostgreSQL (a fired timer and its task's job are one transaction).
    stop.cancel();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (stop, task) = w.start_daemon();
    wait_for("the breach task", Duration::from_secs(40), || async {
        !w.tasks_of(lead, "SLA нарушен: заказ 76000001").is_empty()
    })
    .await;
    // A few more rounds of the timer loop: nothing fires twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warnings = w.tasks_of(lead, "SLA: заказ 76000001");
    let breaches = w.tasks_of(lead, "SLA нарушен: заказ 76000001");
    assert_eq!(
        (warnings.len(), breaches.len()),
        (1, 1),
        "{:?}",
        w.amo.tasks()
    );
    assert_eq!(warnings[0].responsible_user_id, manager);
    assert_eq!(breaches[0].responsible_user_id, manager);
    assert!(
        warnings[0].text.contains("«Новая заявка»"),
        "{}",
        warnings[0].text
    );
    let entries: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT stage, source, responsible_user_id FROM stage_entries ORDER BY id")
            .fetch_all(&w.db.pool)
            .await
            .unwrap();
    assert_eq!(
        entries,
        vec![(
            "Новая заявка".to_string(),
            "marketplace".to_string(),
            Some(manager as i64)
        )]
    );
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_the_stage_in_time_cancels_its_timers_and_a_managers_move_is_an_entry_of_its_own() {
    let w = world().await;
    let manager = w.amo.seed_user("Менеджер смены");
    let (stop, task) = w.start_daemon();
    let now = chrono::Utc::now().timestamp_millis();
    let order = w
        .kaspi
        .create_order(SimOrderSpec::new("76000002", now - 1_000));
    let lead = w.lead_of("76000002").await;
    // The manager accepts at once: the lead leaves «Новая заявка» before its warning.
    let accepted = w
        .amo
        .pipelines()
        .iter()
        .flat_map(|p| {
            p.stages
                .iter()
                .map(move |(id, name)| (p.id, *id, name.clone()))
        })
        .find(|(_, _, name)| name == "В работе / Сборка")
        .unwrap();
    w.amo
        .manager_moves_lead(lead, accepted.0, accepted.1, manager);
    wait_for("Kaspi accepts", Duration::from_secs(20), || async {
        w.kaspi
            .order(&order.id)
            .is_some_and(|o| o.status == "ACCEPTED_BY_MERCHANT")
    })
    .await;
    // One responsible per stage: the stage's role («warehouse») takes over.
    let warehouse = w.amo.user_id("Склад").unwrap();
    wait_for(
        "the warehouse is responsible",
        Duration::from_secs(20),
        || async { w.amo.lead(lead).unwrap().responsible_user_id == warehouse },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        w.tasks_of(lead, "SLA").is_empty(),
        "no SLA task for a stage left in time: {:?}",
        w.amo.tasks()
    );
    let entries: Vec<(String, String, bool, Option<i64>)> = sqlx::query_as(
        "SELECT stage, source, left_at IS NOT NULL, responsible_user_id FROM stage_entries ORDER BY id",
    )
    .fetch_all(&w.db.pool)
    .await
    .unwrap();
    let sales = w.amo.user_id("Менеджер по продажам").unwrap() as i64;
    assert_eq!(
        entries,
        vec![
            (
                "Новая заявка".to_string(),
                "marketplace".to_string(),
                true,
                Some(sales)
            ),
            (
                "В работе / Сборка".to_string(),
                "manager".to_string(),
                false,
                Some(warehouse as i64)
            ),
        ]
    );
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_nobody_can_take_alerts_the_supervisor_once_and_tags_the_lead() {
    let w = world().await;
    // The role's only user is deactivated in amoCRM.
    w.amo
        .deactivate_user(w.amo.user_id("Менеджер по продажам").unwrap());
    let supervisor = w.amo.user_id("Руководитель").unwrap();
    let (stop, task) = w.start_daemon();
    let now = chrono::Utc::now().timestamp_millis();
    w.kaspi
        .create_order(SimOrderSpec::new("76000003", now - 1_000));
    let lead = w.lead_of("76000003").await;
    wait_for("the supervisor's task", Duration::from_secs(20), || async {
        !w.tasks_of(lead, "без ответственного").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alerts = w.tasks_of(lead, "без ответственного");
    assert_eq!(alerts.len(), 1, "{:?}", w.amo.tasks());
    assert_eq!(alerts[0].responsible_user_id, supervisor);
    assert!(
        alerts[0].text.contains("sales_manager"),
        "{}",
        alerts[0].text
    );
    assert!(
        w.amo
            .lead(lead)
            .unwrap()
            .tags
            .iter()
            .any(|t| t == "без ответственного"),
        "the lead is tagged"
    );
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

/// An alert relay: records every POSTed body, answers with `status`.
struct Relay {
    url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

async fn relay() -> Relay {
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::{Arc, Mutex};
    let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let status = Arc::new(AtomicU16::new(200));
    let (b, st) = (bodies.clone(), status.clone());
    let app = axum::Router::new().route(
        "/alerts",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let (b, st) = (b.clone(), st.clone());
            async move {
                b.lock().unwrap().push(body);
                let code = st.load(Ordering::SeqCst);
                (
                    axum::http::StatusCode::from_u16(code).unwrap(),
                    if code == 200 {
                        "ok"
                    } else {
                        "nope: bad chat id"
                    },
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Relay {
        url,
        bodies,
        status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kaspi_outage_sends_one_alert_and_one_resolved_and_a_refusing_relay_dead_letters() {
    let relay = relay().await;
    let w = world_with(&format!(
        "[alerts]\nurl = \"{}\"\npoll_failing_after = \"2s\"\nquiet_after = \"2s\"\ncheck_interval = \"300ms\"\n",
        relay.url
    ))
    .await;
    let (stop, task) = w.start_daemon();
    wait_for("a first good poll", Duration::from_secs(20), || async {
        count(
            &w.db.pool,
            "SELECT count(*) FROM poll_cursors WHERE marketplace = 'kaspi' AND last_success_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    // Kaspi answers 500 to the next 10 polls (about 10 s, polling every second):
    // the outage of the test, standing for a long one.
    w.kaspi
        .inject(orderbridge::sim::kaspi::KaspiFault::ServerError, 10);
    let of_outage = |bodies: &[serde_json::Value]| {
        bodies
            .iter()
            .filter(|b| b["key"] == "poll_failing:kaspi:kaspi_main")
            .map(|b| b["state"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    wait_for("the resolved alert", Duration::from_secs(40), || async {
        of_outage(&relay.bodies.lock().unwrap()).contains(&"resolved".to_string())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bodies = relay.bodies.lock().unwrap().clone();
    assert_eq!(of_outage(&bodies), vec!["open", "resolved"], "{bodies:#?}");
    let open = bodies
        .iter()
        .find(|b| b["key"] == "poll_failing:kaspi:kaspi_main")
        .unwrap();
    assert_eq!(open["kind"], "poll_failing");
    assert_eq!(open["ids"]["shop"], "kaspi_main");
    assert!(
        open["text"]
            .as_str()
            .unwrap()
            .contains("kaspi shop `kaspi_main`"),
        "{open}"
    );
    println!("sample alert body: {open}");

    // A relay that refuses (4xx): the delivery is dead-lettered with its answer.
    relay.status.store(400, std::sync::atomic::Ordering::SeqCst);
    w.kaspi
        .inject(orderbridge::sim::kaspi::KaspiFault::ServerError, 5);
    wait_for(
        "the refused delivery dead-lettered",
        Duration::from_secs(40),
        || async {
            count(
                &w.db.pool,
                "SELECT count(*) FROM outbox_jobs WHERE kind = 'alert' AND state = 'dead'
               AND last_error LIKE '%answered 400: nope: bad chat id%'",
            )
            .await
                >= 1
        },
    )
    .await;
    assert_eq!(
        count(
            &w.db.pool,
            "SELECT count(*) FROM alerts WHERE kind = 'dead_letter'"
        )
        .await,
        0,
        "a dead alert delivery raises no alert of its own"
    );
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_order_gets_no_sla_timers_whatever_the_map_says() {
    let w = world().await;
    let (stop, task) = w.start_daemon();
    let now = chrono::Utc::now().timestamp_millis();
    // Cancelled at Kaspi before the bridge saw it: the map gives its stage an
    // SLA, but the lead never leaves a final stage.
    w.kaspi.create_order(SimOrderSpec {
        status: "CANCELLED".into(),
        state: "ARCHIVE".into(),
        ..SimOrderSpec::new("76000004", now - 1_000)
    });
    w.lead_of("76000004").await;
    let timers: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT stage, deadline FROM stage_entries")
            .fetch_all(&w.db.pool)
            .await
            .unwrap();
    assert_eq!(timers, vec![("Закрыто и не реализовано".to_string(), None)]);
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}
