//! Buyout leads from a partner programme through the daemon as deployed
//! (`run_until`): the partner and amoCRM simulators over HTTP, a real
//! PostgreSQL, the shipped buyout funnel map. Leads arrive by the partner's
//! webhook (and by polling), managers move them in amoCRM (taken by the events
//! poll, no webhook registered), every move is reported back in order under
//! the partner's limits, and the week is settled and compared with the
//! partner's own report.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use orderbridge::config::Settings;
use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig};
use orderbridge::sim::partner::{PartnerSim, PartnerSimConfig};
use serde_json::json;

const AMO_TOKEN: &str = "long-lived-buyout-token";
const SECRET: &str = "partner-webhook-secret-0001";
const BUYOUT_MAP: &str = "config/maps/buyout.toml";

struct World {
    db: orderbridge::store::ScratchDatabase,
    amo: AmoSim,
    partner: PartnerSim,
    port: u16,
}

async fn world(amo_rate: u32, partner: PartnerSimConfig) -> World {
    let db = fresh_db().await;
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some(AMO_TOKEN.into()),
        rate_per_second: amo_rate,
        ..AmoSimConfig::default()
    })
    .await
    .unwrap();
    seed_crm_from_maps(&amo, &[Path::new(BUYOUT_MAP)]);
    let partner = PartnerSim::start(partner).await.unwrap();
    World {
        db,
        amo,
        partner,
        port: free_port(),
    }
}

/// The daemon's settings: one CRM account, the partner source `buyout` with
/// the simulator's format; `extra` is appended (e.g. a poll URL).
fn settings(w: &World, crm_rate: u32, extra: &str) -> Settings {
    let text = format!(
        r#"
[database]
url = "{db}"
max_connections = 8
[http]
listen = "127.0.0.1:{port}"
[telemetry]
log_filter = "warn"
[outbox]
concurrency = 32
[crm_accounts.main]
base_url = "{amo}"
events_poll_interval = "1s"
rate_limit = {{ requests = {crm_rate} }}
[crm_accounts.main.auth]
mode = "long_lived"
token = "{AMO_TOKEN}"
{partner_toml}
"#,
        db = database_url(&w.db),
        port = w.port,
        amo = w.amo.base_url(),
        partner_toml =
            w.partner
                .source_toml("buyout", "main", "config/maps/buyout.toml", SECRET, extra),
    );
    settings_from(
        &std::env::temp_dir().join(format!("orderbridge-{}", w.db.name)),
        "partner.toml",
        &text,
    )
}

fn hook_url(w: &World, secret: &str) -> String {
    format!("http://127.0.0.1:{}/hooks/partner/buyout/{secret}", w.port)
}

async fn wait_ready(w: &World) {
    let url = format!("http://127.0.0.1:{}/readyz", w.port);
    wait_for("the daemon ready", Duration::from_secs(60), || async {
        reqwest::get(&url)
            .await
            .is_ok_and(|a| a.status().is_success())
    })
    .await;
}

fn stage_id(amo: &AmoSim, name: &str) -> (u64, u64) {
    let pipeline = amo
        .pipelines()
        .into_iter()
        .find(|p| p.name == "Выкуп техники")
        .unwrap();
    let stage = pipeline
        .stages
        .iter()
        .find(|(_, n)| n == name)
        .unwrap_or_else(|| panic!("no stage {name}"))
        .0;
    (pipeline.id, stage)
}

fn full_lead(id: &str) -> serde_json::Value {
    json!({
        "id": id,
        "status": "new",
        "device": {
            "model": "iPhone 13 Pro",
            "memory": "256 ГБ",
            "color": "графитовый",
            "condition": "хорошее",
            "defects": ["скол на экране", "аккумулятор 81%"]
        },
        "prices": { "buyout": 41000, "client": "47 500" },
        "seller": { "name": "Ирина", "phone": "+7 916 123-45-67" },
        "city": "Казань"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_lead_becomes_a_full_lead_and_every_move_is_reported_in_order() {
    let w = world(7, PartnerSimConfig::default()).await;
    let (stop, daemon) = start_daemon(settings(&w, 7, ""));
    wait_ready(&w).await;
    let lead = full_lead("AV-77001");
    w.partner.offer(lead.clone());
    let (status, body) = w
        .partner
        .push_lead(&hook_url(&w, SECRET), &lead)
        .await
        .unwrap();
    assert_eq!(
        (status, body["repeated"].as_bool()),
        (200, Some(false)),
        "{body}"
    );

    wait_for("the CRM lead", Duration::from_secs(30), || async {
        w.amo.leads().len() == 1
    })
    .await;
    let crm = w.amo.leads().remove(0);
    assert_eq!(crm.name, "Выкуп: iPhone 13 Pro 256 ГБ (Казань)");
    assert_eq!(crm.price, 41000);
    assert_eq!(
        (crm.pipeline_id, crm.status_id),
        stage_id(&w.amo, "Новая заявка")
    );
    assert_eq!(
        w.amo.user_id("Закупщик"),
        Some(crm.responsible_user_id),
        "the intake stage's role"
    );
    let fields = crm.custom_fields_values.to_string();
    for value in [
        "AV-77001",
        "iPhone 13 Pro",
        "256 ГБ",
        "графитовый",
        "хорошее",
        "скол на экране, аккумулятор 81%",
        "41000",
        "47500",
        "Казань",
    ] {
        assert!(fields.contains(value), "{value} not in {fields}");
    }
    assert!(crm.tags.iter().any(|t| t == "выкуп"), "{:?}", crm.tags);
    let contacts = w.amo.contacts();
    assert_eq!(contacts.len(), 1);
    assert_eq!(crm.contact_ids, vec![contacts[0].id]);
    assert!(
        contacts[0].phones.iter().any(|p| p.contains("9161234567")),
        "the seller's phone on the contact: {:?}",
        contacts[0].phones
    );
    wait_for(
        "the note with the defects",
        Duration::from_secs(10),
        || async {
            w.amo
                .notes()
                .iter()
                .any(|n| n.entity_id == crm.id && n.text.contains("Дефекты: скол на экране"))
        },
    )
    .await;

    // The same lead again: 200, nothing new.
    let (status, body) = w
        .partner
        .push_lead(&hook_url(&w, SECRET), &lead)
        .await
        .unwrap();
    assert_eq!(
        (status, body["repeated"].as_bool()),
        (200, Some(true)),
        "{body}"
    );

    // Bad input: each refused with its reasons, nothing stored.
    let mut missing = full_lead("AV-77002");
    missing["device"].as_object_mut().unwrap().remove("model");
    missing["prices"]["buyout"] = json!("дорого");
    let (status, body) = w
        .partner
        .push_lead(&hook_url(&w, SECRET), &missing)
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    let problems = body["problems"].to_string();
    assert!(
        problems.contains("`model` (/device/model) is required"),
        "{problems}"
    );
    assert!(problems.contains("`buyout_price`"), "{problems}");
    let mut sold = full_lead("AV-77003");
    sold["status"] = json!("sold");
    let (status, body) = w
        .partner
        .push_lead(&hook_url(&w, SECRET), &sold)
        .await
        .unwrap();
    assert_eq!(status, 422, "an unknown intake status: {body}");
    let (status, _) = w
        .partner
        .push_lead(&hook_url(&w, "wrong-secret-wrong-secret"), &lead)
        .await
        .unwrap();
    assert_eq!(status, 404);
    let http = reqwest::Client::new();
    let not_json = http
        .post(hook_url(&w, SECRET))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 400);
    let form = http
        .post(hook_url(&w, SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("id=1")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 415);
    let huge = http
        .post(hook_url(&w, SECRET))
        .header("content-type", "application/json")
        .body(format!("{{\"id\": \"{}\"}}", "x".repeat(2_000_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 413);
    assert_eq!(
        count(&w.db.pool, "SELECT count(*) FROM partner_leads").await,
        1
    );

    // Managers move the lead; an internal stage reports nothing.
    let manager = w.amo.user_id("Закупщик").unwrap();
    for stage in [
        "Связались с продавцом",
        "Цена согласована",
        "Выкуплено",
        "Предпродажная подготовка",
        "Реклама",
    ] {
        let (pipeline, status) = stage_id(&w.amo, stage);
        w.amo.manager_moves_lead(crm.id, pipeline, status, manager);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let expected = ["accepted", "contacted", "price_agreed", "bought", "listed"];
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        while w.partner.statuses_of("AV-77001").len() < expected.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "the partner has {:?}; inbox: {:?}; reports: {:?}",
        w.partner.statuses_of("AV-77001"),
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT kind, outcome FROM inbox ORDER BY id"
        )
        .fetch_all(&w.db.pool)
        .await
        .unwrap(),
        sqlx::query_as::<_, (String, Option<String>, Option<i32>)>(
            "SELECT partner_status, answer, http_status FROM partner_reports ORDER BY id"
        )
        .fetch_all(&w.db.pool)
        .await
        .unwrap(),
    );
    assert_eq!(w.partner.statuses_of("AV-77001"), expected);
    let stats = w.partner.stats();
    assert_eq!((stats.http_429, stats.out_of_order), (0, 0), "{stats:?}");
    // One responsible per stage: «Реклама» belongs to the sales role.
    let sales = w.amo.user_id("Менеджер по продажам").unwrap();
    wait_for(
        "the sales role responsible",
        Duration::from_secs(10),
        || async {
            w.amo
                .lead(crm.id)
                .is_some_and(|l| l.responsible_user_id == sales)
        },
    )
    .await;

    // The week settled here and at the partner agree.
    let tz = chrono_tz::Asia::Almaty;
    let now = chrono::Utc::now().with_timezone(&tz);
    let week_name = format!(
        "{}-W{:02}",
        chrono::Datelike::iso_week(&now).year(),
        chrono::Datelike::iso_week(&now).week()
    );
    let week = orderbridge::reports::parse_week(&week_name, tz).unwrap();
    let settings = settings(&w, 7, "");
    let ours = orderbridge::reports::settle(&w.db.pool, &settings, "buyout", &week)
        .await
        .unwrap();
    assert_eq!(ours.lines.len(), 1);
    assert_eq!(
        (ours.lines[0].status.as_str(), ours.lines[0].commission),
        ("listed", 2050.0)
    );
    let theirs_csv = w.partner.weekly_csv(week.from, week.to);
    let theirs = orderbridge::reports::read_partner_csv(
        "partner.csv",
        &theirs_csv,
        &orderbridge::reports::PartnerColumns::from_settings(&settings, "buyout"),
    )
    .unwrap();
    assert_eq!(
        orderbridge::reports::compare(&ours, &theirs),
        vec![],
        "{theirs_csv}"
    );

    stop.cancel();
    daemon.await.unwrap();
    w.db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_leads_in_a_burst_are_all_reported_in_order_without_a_429() {
    // amoCRM is made faster than its real 7/s so the test takes seconds, not
    // minutes; the partner's own limit (25/s, 1,200/min) is what is tested.
    let w = world(
        60,
        PartnerSimConfig {
            per_second: 25,
            per_minute: 1200,
            ..PartnerSimConfig::default()
        },
    )
    .await;
    let (stop, daemon) = start_daemon(settings(&w, 55, ""));
    wait_ready(&w).await;
    let leads: Vec<serde_json::Value> = (0..500).map(|_| w.partner.new_lead()).collect();
    let url = hook_url(&w, SECRET);
    let pushes = futures::future::join_all(leads.chunks(50).map(|chunk| {
        let (partner, url) = (w.partner.clone(), url.clone());
        let chunk = chunk.to_vec();
        async move {
            let mut ok = 0;
            for lead in &chunk {
                if partner
                    .push_lead(&url, lead)
                    .await
                    .is_ok_and(|(s, _)| s == 200)
                {
                    ok += 1;
                }
            }
            ok
        }
    }))
    .await;
    assert_eq!(pushes.iter().sum::<i32>(), 500);
    wait_for("500 CRM leads", Duration::from_secs(120), || async {
        count(
            &w.db.pool,
            "SELECT count(*) FROM partner_leads WHERE lead_id IS NOT NULL",
        )
        .await
            == 500
    })
    .await;
    // Managers move 100 of them three times, quickly.
    let manager = w.amo.user_id("Закупщик").unwrap();
    let moved: Vec<(String, u64)> = sqlx::query_as::<_, (String, i64)>(
        "SELECT partner_lead_id, lead_id FROM partner_leads ORDER BY id LIMIT 100",
    )
    .fetch_all(&w.db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(p, l)| (p, l as u64))
    .collect();
    for stage in [
        "Связались с продавцом",
        "Цена согласована",
        "Нет связи с продавцом",
    ] {
        let (pipeline, status) = stage_id(&w.amo, stage);
        for (_, lead) in &moved {
            w.amo.manager_moves_lead(*lead, pipeline, status, manager);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    wait_for(
        "800 reports at the partner",
        Duration::from_secs(120),
        || async { w.partner.stats().accepted >= 800 },
    )
    .await;
    let stats = w.partner.stats();
    assert_eq!(stats.accepted, 800, "{stats:?}");
    assert_eq!(stats.http_429, 0, "{stats:?}");
    assert_eq!(stats.out_of_order, 0, "{stats:?}");
    assert!(stats.max_in_any_second <= 25, "{stats:?}");
    for (partner_id, _) in &moved {
        assert_eq!(
            w.partner.statuses_of(partner_id),
            ["accepted", "contacted", "price_agreed", "no_contact"],
            "{partner_id}"
        );
    }
    assert_eq!(w.amo.leads().len(), 500, "one CRM lead per partner lead");
    stop.cancel();
    daemon.await.unwrap();
    w.db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_leads_arrive_and_a_failing_partner_is_retried_until_it_takes_the_report() {
    let w = world(7, PartnerSimConfig::default()).await;
    let poll = format!(
        "poll_url = \"{}/leads\"\npoll_interval = \"1s\"",
        w.partner.base_url()
    );
    let (stop, daemon) = start_daemon(settings(&w, 7, &poll));
    w.partner.fail_next(3);
    for _ in 0..3 {
        w.partner.new_lead();
    }
    wait_for(
        "three CRM leads from the poll",
        Duration::from_secs(60),
        || async { w.amo.leads().len() == 3 },
    )
    .await;
    wait_for(
        "three reports through the 500s",
        Duration::from_secs(60),
        || async { w.partner.stats().accepted == 3 },
    )
    .await;
    let attempts = count(
        &w.db.pool,
        "SELECT count(*) FROM partner_reports WHERE sent_at IS NOT NULL AND http_status = 200",
    )
    .await;
    assert_eq!(attempts, 3);
    // Polled again: the cursor moved, nothing twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&w.db.pool, "SELECT count(*) FROM partner_leads").await,
        3
    );
    assert!(w.partner.stats().poll_requests >= 2);
    stop.cancel();
    daemon.await.unwrap();
    w.db.drop_now().await.unwrap();
}

/// A seeded week: leads and reports written as the bridge writes them, with
/// chosen change times; totals computed by hand.
#[tokio::test]
async fn a_seeded_week_settles_to_hand_computed_totals_and_planted_discrepancies_are_found() {
    use orderbridge::store::partner as store;
    let db = fresh_db().await;
    let week = orderbridge::reports::parse_week("2026-W47", chrono_tz::Asia::Almaty).unwrap();
    let at = |days: i64, hours: i64| {
        week.from + chrono::Duration::days(days) + chrono::Duration::hours(hours)
    };
    // (partner id, buyout price, [(status, at)])
    type Reports<'a> = Vec<(&'a str, chrono::DateTime<chrono::Utc>)>;
    let seeded: Vec<(&str, f64, Reports)> = vec![
        // Bought this week: counts, 5 % of 40,000.
        (
            "L1",
            40_000.0,
            vec![("accepted", at(0, 1)), ("bought", at(2, 3))],
        ),
        // Bought last week, sold this week: paid last week, 0 now.
        (
            "L2",
            30_000.0,
            vec![
                ("accepted", at(-3, 0)),
                ("bought", at(-2, 0)),
                ("sold", at(1, 0)),
            ],
        ),
        // Lost this week.
        (
            "L3",
            20_000.0,
            vec![("accepted", at(0, 2)), ("no_contact", at(3, 0))],
        ),
        // Bought, then rejected in the same week: its last status does not count.
        (
            "L4",
            25_000.0,
            vec![
                ("accepted", at(1, 0)),
                ("bought", at(2, 0)),
                ("rejected", at(4, 0)),
            ],
        ),
        // Sold this week, bought this week too: counts once, 5 % of 18,500.
        (
            "L5",
            18_500.0,
            vec![
                ("accepted", at(0, 5)),
                ("bought", at(1, 5)),
                ("sold", at(6, 23)),
            ],
        ),
        // Next week only: not in this settlement.
        ("L6", 10_000.0, vec![("accepted", at(7, 1))]),
    ];
    for (id, price, reports) in &seeded {
        let mut conn = db.pool.acquire().await.unwrap();
        let row = store::insert_lead(
            &mut conn,
            &store::NewPartnerLead {
                source: "buyout",
                partner_lead_id: id,
                crm_account: "main",
                payload: &json!({"id": id}),
                fields: &json!({}),
                buyout_price: Some(*price),
                client_price: None,
            },
        )
        .await
        .unwrap()
        .unwrap();
        for (status, when) in reports {
            let report = store::insert_report(
                &mut conn,
                &store::NewReport {
                    partner_lead: row,
                    source: "buyout",
                    stage_id: 1,
                    stage: "stage",
                    partner_status: status,
                    changed_at: *when,
                },
            )
            .await
            .unwrap();
            store::record_report_answer(&db.pool, report, Some(200), "{}", true)
                .await
                .unwrap();
        }
    }
    let dir = std::env::temp_dir().join(format!("orderbridge-{}", db.name));
    let settings = settings_from(
        &dir,
        "settle.toml",
        &format!(
            r#"
[crm_accounts.main]
base_url = "http://127.0.0.1:9"
[crm_accounts.main.auth]
mode = "long_lived"
token = "t"
[partners.buyout]
crm_account = "main"
map = "{BUYOUT_MAP}"
webhook_secret = "{SECRET}"
[partners.buyout.fields]
lead_id = "/id"
model = "/m"
seller_phone = "/p"
buyout_price = "/b"
[partners.buyout.report]
url = "http://127.0.0.1:9/{{lead_id}}"
body = '{{"s": "{{status}}"}}'
per_second = 5
per_minute = 100
[partners.buyout.commission]
counts_when = ["bought", "listed", "reserved", "shipped", "sold"]
rate = 0.05
[partners.buyout.settlement]
lead_id_column = "Заявка"
status_column = "Статус"
amount_column = "Комиссия"
"#
        ),
    );
    let ours = orderbridge::reports::settle(&db.pool, &settings, "buyout", &week)
        .await
        .unwrap();
    let got: Vec<(&str, &str, bool, f64)> = ours
        .lines
        .iter()
        .map(|l| (l.id.as_str(), l.status.as_str(), l.counts, l.commission))
        .collect();
    assert_eq!(
        got,
        vec![
            ("L1", "bought", true, 2000.0),
            ("L2", "sold", false, 0.0),
            ("L3", "no_contact", false, 0.0),
            ("L4", "rejected", false, 0.0),
            ("L5", "sold", true, 925.0),
        ]
    );
    assert_eq!((ours.counted(), ours.total()), (2, 2925.0));
    let csv = ours.to_csv();
    assert!(
        csv.starts_with("lead_id,crm_lead_id,status,counts,base,commission\n"),
        "{csv}"
    );
    assert!(csv.trim_end().ends_with("total,,,,,2925.00"), "{csv}");

    // The partner's report with planted differences: L2 they pay again, L3
    // they missed, L4's status differs, L9 is unknown here.
    let theirs = "Статус,Заявка,Комиссия\nbought,L1,2000\nsold,L2,1500\nbought,L4,0\nsold,L5,\"925,00\"\nsold,L9,300\n";
    let columns = orderbridge::reports::PartnerColumns::from_settings(&settings, "buyout");
    let lines = orderbridge::reports::read_partner_csv("partner.csv", theirs, &columns).unwrap();
    let found: Vec<(String, &str)> = orderbridge::reports::compare(&ours, &lines)
        .iter()
        .map(|d| (d.id().to_string(), d.kind()))
        .collect();
    assert_eq!(
        found,
        vec![
            ("L2".to_string(), "amount"),
            ("L3".to_string(), "missing_at_partner"),
            ("L4".to_string(), "status"),
            ("L9".to_string(), "missing_here"),
        ]
    );
    // The partner's file with a bad number names its line and column.
    let error = orderbridge::reports::read_partner_csv(
        "partner.csv",
        "Статус,Заявка,Комиссия\nbought,L1,2000\nsold,L2,много\n",
        &columns,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        error,
        "partner.csv: line 3, column `Комиссия`: `много` is not a number"
    );
    db.drop_now().await.unwrap();
}

/// Avito orders settle by their own `prices.commission`: closed orders count.
#[tokio::test]
async fn avito_orders_settle_by_their_own_commission() {
    use orderbridge::domain::{Customer, Delivery, Marketplace, Money, Order, StatusKey};
    let db = fresh_db().await;
    let order = |code: &str, status: &str, commission: i64| Order {
        marketplace: Marketplace::Avito,
        account: "avito_main".into(),
        external_id: code.into(),
        code: code.into(),
        status: StatusKey(status.into()),
        is_terminal: status == "closed",
        raw_state: None,
        raw_status: Some(status.into()),
        created_at: chrono::Utc::now(),
        total: Money(100_000),
        customer: Customer::default(),
        delivery: Delivery::default(),
        payment_mode: None,
        pre_order: false,
        cancellation_reason: None,
        items: Vec::new(),
        marketplace_deadline: None,
        commission: Some(Money(commission)),
    };
    for o in [
        order("A1", "ready_to_ship", 2_000),
        order("A1", "closed", 2_000),
        order("A2", "closed", 1_050),
        order("A3", "canceled", 3_000),
    ] {
        let hash = format!("{}{}", o.code, o.status);
        orderbridge::sync::ingest::write_order(
            &db.pool,
            &o,
            &hash,
            "amocrm:main",
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("orderbridge-{}", db.name));
    let settings = settings_from(
        &dir,
        "avito.toml",
        r#"
[crm_accounts.main]
base_url = "http://127.0.0.1:9"
[crm_accounts.main.auth]
mode = "long_lived"
token = "t"
[shops.avito_main]
marketplace = "avito"
crm_account = "main"
map = "config/maps/avito.toml"
base_url = "http://127.0.0.1:9"
client_id = "id"
client_secret = "secret"
"#,
    );
    let tz = chrono_tz::Asia::Almaty;
    let now = chrono::Utc::now().with_timezone(&tz);
    let iso = chrono::Datelike::iso_week(&now);
    let week = orderbridge::reports::parse_week(&format!("{}-W{:02}", iso.year(), iso.week()), tz)
        .unwrap();
    let ours = orderbridge::reports::settle(&db.pool, &settings, "avito_main", &week)
        .await
        .unwrap();
    let got: Vec<(&str, &str, f64)> = ours
        .lines
        .iter()
        .map(|l| (l.id.as_str(), l.status.as_str(), l.commission))
        .collect();
    assert_eq!(
        got,
        vec![
            ("A1", "closed", 20.0),
            ("A2", "closed", 10.5),
            ("A3", "canceled", 0.0)
        ]
    );
    assert_eq!(ours.total(), 30.5);
    let kaspi = orderbridge::reports::settle(&db.pool, &settings, "nobody", &week)
        .await
        .unwrap_err()
        .to_string();
    assert!(kaspi.contains("Avito shops: avito_main"), "{kaspi}");
    db.drop_now().await.unwrap();
}
