//! Reconciliation after an outage, through `orderbridge reconcile` (the
//! command's own function) and the daemon as deployed (`run_until`), against
//! the Kaspi and amoCRM simulators over HTTP and a real PostgreSQL: drift
//! planted while the daemon is down is counted exactly, a dry run writes
//! nothing anywhere, the repairs leave every order with exactly one lead in
//! its right stage, and a run while the daemon runs goes through its outbox
//! without exceeding amoCRM's 7 requests per second.

mod common;

use std::time::{Duration, Instant};

use common::*;
use orderbridge::cli::ReconcileArgs;
use orderbridge::config::Settings;
use orderbridge::sim::amocrm::AmoSim;
use orderbridge::sim::kaspi::{KaspiSim, SimOrderSpec};
use tokio_util::sync::CancellationToken;

const AMO_TOKEN: &str = "long-lived-reconcile-token";
const CODE_FIELD: &str = "Номер заказа";

struct World {
    db: orderbridge::store::ScratchDatabase,
    kaspi: KaspiSim,
    amo: AmoSim,
    settings: Settings,
}

async fn world() -> World {
    world_reconciling_every("0s").await
}

async fn world_reconciling_every(interval: &str) -> World {
    let (db, kaspi, amo) = kaspi_and_amocrm(AMO_TOKEN).await;
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
[reconcile]
interval = "{interval}"
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
map = "config/maps/kaspi.toml"
base_url = "{kaspi}"
poll_interval = "1s"
token = "kaspi-test-token"
merchant_uid = "30001"
"#,
        db = database_url(&db),
        amo = amo.base_url(),
        kaspi = kaspi.base_url(),
    );
    let dir = std::env::temp_dir().join(format!("orderbridge-{}", db.name));
    let settings = settings_from(&dir, "reconcile.toml", &text);
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

    async fn reconcile(&self, dry_run: bool) -> orderbridge::sync::reconcile::Summary {
        orderbridge::cli::reconcile(
            &self.settings,
            &ReconcileArgs {
                since: Some("1d".into()),
                shop: None,
                dry_run,
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap()
    }

    /// The stage id the shipped map gives each status key, by stage name.
    fn stage_id(&self, name: &str) -> u64 {
        self.amo
            .pipelines()
            .iter()
            .flat_map(|p| p.stages.iter())
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
            .unwrap_or_else(|| panic!("no stage «{name}»"))
    }

    /// The leads whose order-code field holds `code`.
    fn leads_of(&self, code: &str) -> Vec<orderbridge::sim::amocrm::SimLead> {
        self.amo
            .leads()
            .into_iter()
            .filter(|l| {
                l.custom_fields_values.as_array().is_some_and(|fields| {
                    fields.iter().any(|f| {
                        f["field_name"] == CODE_FIELD
                            && f["values"]
                                .as_array()
                                .is_some_and(|vs| vs.iter().any(|v| v["value"] == code))
                    })
                })
            })
            .collect()
    }

    async fn link_of(&self, code: &str) -> Option<i64> {
        sqlx::query_scalar(
            "SELECT l.lead_id FROM crm_links l JOIN orders o ON o.id = l.order_id WHERE o.code = $1",
        )
        .bind(code)
        .fetch_optional(&self.db.pool)
        .await
        .unwrap()
    }

    /// The largest number of amoCRM requests in any one-second window since `from`.
    fn peak_rate_since(&self, from: Instant) -> usize {
        let times: Vec<Instant> = self
            .amo
            .requests()
            .iter()
            .filter(|r| r.at >= from)
            .map(|r| r.at)
            .collect();
        let mut peak = 0;
        for (i, start) in times.iter().enumerate() {
            let n = times[i..]
                .iter()
                .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
                .count();
            peak = peak.max(n);
        }
        peak
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_planted_during_an_outage_is_counted_exactly_and_repaired_to_one_lead_per_order() {
    let w = world().await;
    let now = chrono::Utc::now().timestamp_millis();
    let codes: Vec<String> = (0..10).map(|i| format!("7100{i:04}")).collect();
    let ids: Vec<String> = codes
        .iter()
        .enumerate()
        .map(|(i, code)| {
            w.kaspi
                .create_order(SimOrderSpec {
                    customer_phone: format!("7011000{i:04}"),
                    ..SimOrderSpec::new(code, now - 3_600_000 + i as i64)
                })
                .id
        })
        .collect();
    // Before the outage: the daemon makes the ten leads.
    let (stop, task) = w.start_daemon();
    wait_for("the first ten leads", Duration::from_secs(60), || async {
        count(&w.db.pool, "SELECT count(*) FROM crm_links").await == 10
            && count(&w.db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    stop.cancel();
    task.await.unwrap();

    // The outage: 200 new orders, moves and cancellations at Kaspi, a lead
    // deleted in amoCRM, a link lost, a lead moved behind the bridge's back,
    // and a lead gone together with its link.
    for i in 0..200 {
        w.kaspi.create_order(SimOrderSpec {
            customer_phone: format!("7012{:06}", i % 150),
            ..SimOrderSpec::new(&format!("7200{i:04}"), now - 1_800_000 + i)
        });
    }
    for id in &ids[0..3] {
        w.kaspi.kaspi_accepts_order(id);
    }
    for id in &ids[3..5] {
        w.kaspi.buyer_cancels(id, "BUYER_CANCELLATION_BY_MERCHANT");
        w.kaspi.cancellation_confirmed(id);
    }
    let deleted = w.link_of(&codes[5]).await.unwrap() as u64;
    w.amo.delete_lead(deleted);
    let unlinked = w.link_of(&codes[6]).await.unwrap() as u64;
    sqlx::query("DELETE FROM crm_links WHERE lead_id = $1")
        .bind(unlinked as i64)
        .execute(&w.db.pool)
        .await
        .unwrap();
    let drifted = w.link_of(&codes[7]).await.unwrap() as u64;
    let before_drift = w.amo.lead(drifted).unwrap();
    let elsewhere = w.stage_id("В доставке");
    assert_ne!(before_drift.status_id, elsewhere);
    w.amo
        .drift_lead_stage(drifted, before_drift.pipeline_id, elsewhere);
    let gone = w.link_of(&codes[8]).await.unwrap() as u64;
    w.amo.delete_lead(gone);
    sqlx::query("DELETE FROM crm_links WHERE lead_id = $1")
        .bind(gone as i64)
        .execute(&w.db.pool)
        .await
        .unwrap();

    // A dry run counts it all and changes nothing anywhere.
    let amo_writes = |amo: &AmoSim| amo.requests().iter().filter(|r| r.method != "GET").count();
    let kaspi_writes = |k: &KaspiSim| k.requests().iter().filter(|r| r.method != "GET").count();
    let (amo_before, kaspi_before) = (amo_writes(&w.amo), kaspi_writes(&w.kaspi));
    let store_before = (
        count(&w.db.pool, "SELECT count(*) FROM orders").await,
        count(&w.db.pool, "SELECT count(*) FROM crm_links").await,
        count(&w.db.pool, "SELECT count(*) FROM outbox_jobs").await,
    );
    let dry = w.reconcile(true).await;
    println!("{}", orderbridge::cli::summary_table(&dry));
    let planted = |s: &orderbridge::sync::reconcile::Summary| {
        (
            s.missing_in_store,
            s.stale_in_store,
            s.recreated,
            s.relinked,
            s.wrong_stage,
            s.missing_lead,
            s.failed,
        )
    };
    assert_eq!(planted(&dry), (200, 5, 1, 1, 1, 1, 0), "{dry:?}");
    assert_eq!(dry.checked, 210);
    assert_eq!(dry.repaired, 0);
    assert_eq!(
        amo_writes(&w.amo),
        amo_before,
        "a dry run writes nothing to amoCRM"
    );
    assert_eq!(kaspi_writes(&w.kaspi), kaspi_before, "nor to Kaspi");
    let store_after = (
        count(&w.db.pool, "SELECT count(*) FROM orders").await,
        count(&w.db.pool, "SELECT count(*) FROM crm_links").await,
        count(&w.db.pool, "SELECT count(*) FROM outbox_jobs").await,
    );
    assert_eq!(store_after, store_before, "nor to the store");

    // The real run (no daemon serves the account: the command runs it itself)
    // queues the repairs; the restarted daemon carries them out.
    let lead_reads = |amo: &AmoSim| {
        amo.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/api/v4/leads")
            .count()
    };
    let lead_reads_before = lead_reads(&w.amo);
    let real = w.reconcile(false).await;
    println!("{}", orderbridge::cli::summary_table(&real));
    assert_eq!(planted(&real), (200, 5, 1, 1, 1, 1, 0), "{real:?}");
    assert_eq!(real.repaired, 209);
    // Leads updated since the range's start (one page of 250), then the
    // linked ones not among them (the deleted one), by id.
    assert_eq!(
        lead_reads(&w.amo) - lead_reads_before,
        2,
        "the leads are read in pages, not one by one"
    );
    assert_eq!(
        amo_writes(&w.amo),
        amo_before,
        "the command itself writes nothing to amoCRM"
    );
    let (stop, task) = w.start_daemon();
    // While the daemon carries out the repairs, a dry run goes through its
    // outbox: the two share the account's 7 requests per second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let busy_from = Instant::now();
    let during = w.reconcile(true).await;
    assert_eq!(during.failed, 0, "{during:?}");
    let peak = w.peak_rate_since(busy_from);
    let throttled = w
        .amo
        .requests()
        .iter()
        .filter(|r| r.at >= busy_from && r.status == 429)
        .count();
    println!(
        "peak_amocrm_requests_per_second_while_repairing: {peak} ({} requests)",
        w.amo
            .requests()
            .iter()
            .filter(|r| r.at >= busy_from)
            .count()
    );
    assert!(peak <= 7, "{peak} requests in one second");
    assert_eq!(
        throttled, 0,
        "no 429 while the daemon repaired and reconciled"
    );
    wait_for("the repairs", Duration::from_secs(120), || async {
        count(&w.db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
            && count(&w.db.pool, "SELECT count(*) FROM crm_links").await == 210
    })
    .await;
    for code in codes.iter().chain(
        (0..200)
            .map(|i| format!("7200{i:04}"))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        assert_eq!(
            w.leads_of(code).len(),
            1,
            "order {code} has exactly one lead"
        );
    }
    let accepted_stage = w.stage_id("В работе / Сборка");
    let cancelled_stage = w.stage_id("Закрыто и не реализовано");
    for code in &codes[0..3] {
        assert_eq!(
            w.leads_of(code)[0].status_id,
            accepted_stage,
            "{code} accepted"
        );
    }
    for code in &codes[3..5] {
        assert_eq!(
            w.leads_of(code)[0].status_id,
            cancelled_stage,
            "{code} cancelled"
        );
    }
    assert_eq!(
        w.amo.lead(drifted).unwrap().status_id,
        before_drift.status_id,
        "the drifted lead is back in its mapped stage"
    );
    assert_eq!(
        w.link_of(&codes[6]).await,
        Some(unlinked as i64),
        "relinked, not recreated"
    );
    let recreated = w.leads_of(&codes[5])[0].id;
    assert!(
        w.amo
            .notes()
            .iter()
            .any(|n| n.entity_id == recreated && n.text.contains("was deleted")),
        "the recreated lead says why"
    );

    // With the daemon running, a run goes through its outbox and finds nothing left.
    let from = Instant::now();
    let again = w.reconcile(false).await;
    println!("{}", orderbridge::cli::summary_table(&again));
    assert_eq!(again.drift(), 0, "{again:?}");
    assert_eq!(again.failed, 0);
    assert_eq!(again.checked, 210);
    let runs = count(
        &w.db.pool,
        "SELECT count(*) FROM outbox_attempts WHERE kind = 'reconcile' AND outcome = 'success'",
    )
    .await;
    assert_eq!(runs, 2, "the daemon carried both runs out as jobs");
    let peak = w.peak_rate_since(from);
    println!("peak_amocrm_requests_per_second_during_reconcile: {peak}");
    assert!(peak <= 7, "{peak} requests in one second");
    let throttled = w
        .amo
        .requests()
        .iter()
        .filter(|r| r.at >= from && r.status == 429)
        .count();
    assert_eq!(
        throttled, 0,
        "no 429 while the daemon ran the reconciliation"
    );
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

#[tokio::test]
async fn a_since_in_the_future_or_unparsable_is_refused_with_what_is_accepted() {
    let now = chrono::Utc::now();
    for bad in ["tomorrow", "2099-01-01", "12 parsecs"] {
        let error = orderbridge::cli::parse_since(bad, now)
            .unwrap_err()
            .to_string();
        assert!(error.contains("give a date"), "{bad}: {error}");
    }
    let back = orderbridge::cli::parse_since("36h", now).unwrap();
    assert_eq!(now - back, chrono::Duration::hours(36));
    let day = orderbridge::cli::parse_since("2026-12-01", now).unwrap();
    assert_eq!(
        day.to_rfc3339(),
        "2026-11-30T19:00:00+00:00",
        "the day starts in Almaty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_show_tells_a_retried_job_and_a_managers_action_step_by_step() {
    let w = world().await;
    let manager = w.amo.seed_user("Менеджер смены");
    let now = chrono::Utc::now().timestamp_millis();
    let (stop, task) = w.start_ready_daemon().await;
    // The first lead creation meets a 500 and is retried.
    w.amo.inject_on(
        "/api/v4/leads/complex",
        orderbridge::sim::amocrm::Fault::ServerError,
        1,
    );
    let order = w
        .kaspi
        .create_order(SimOrderSpec::new("73000001", now - 60_000));
    wait_for("the lead", Duration::from_secs(60), || async {
        w.link_of("73000001").await.is_some()
    })
    .await;
    let lead = w.link_of("73000001").await.unwrap() as u64;
    let accepted = w.stage_id("В работе / Сборка");
    let pipeline = w.amo.lead(lead).unwrap().pipeline_id;
    w.amo.manager_moves_lead(lead, pipeline, accepted, manager);
    wait_for("Kaspi accepts", Duration::from_secs(30), || async {
        w.kaspi
            .order(&order.id)
            .is_some_and(|o| o.status == "ACCEPTED_BY_MERCHANT")
    })
    .await;
    wait_for("the poll sees it", Duration::from_secs(30), || async {
        count(
            &w.db.pool,
            "SELECT count(*) FROM orders WHERE status_key = 'accepted'",
        )
        .await
            == 1
            && count(&w.db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    let text = orderbridge::cli::order_show(&w.settings, "73000001", None, false)
        .await
        .unwrap()
        .unwrap();
    println!("{text}");
    let json: serde_json::Value = serde_json::from_str(
        &orderbridge::cli::order_show(&w.settings, "73000001", None, true)
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["crm"]["lead_id"], lead);
    let steps: Vec<(String, String)> = json["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["what"].as_str().unwrap().to_string(),
                e["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let position = |what: &str, detail: &str| {
        steps
            .iter()
            .position(|(w, d)| w.contains(what) && d.contains(detail))
            .unwrap_or_else(|| panic!("no step {what} / {detail} in {steps:#?}"))
    };
    let seen = position("status", "new");
    let failed = position("crm_sync_order attempt 1", "retry");
    let created = position("lead_created", &format!("lead {lead}"));
    let move_seen = position("lead_status", &format!("stage {accepted}"));
    let applied = position("action_applied", "accept");
    let kaspi_status = position("status", "new → accepted");
    assert!(seen < failed && failed < created, "{steps:#?}");
    assert!(
        created < move_seen && move_seen < applied && applied < kaspi_status,
        "{steps:#?}"
    );
    position("marketplace_action attempt 1", "success");
    assert!(
        orderbridge::cli::order_show(&w.settings, "99999999", None, false)
            .await
            .unwrap()
            .is_none(),
        "an unknown code is said so"
    );
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reconciles_by_itself_and_a_stopped_run_changes_nothing() {
    let w = world_reconciling_every("2s").await;
    let now = chrono::Utc::now().timestamp_millis();
    for i in 0..3 {
        w.kaspi
            .create_order(SimOrderSpec::new(&format!("7400000{i}"), now - 60_000 + i));
    }
    let (stop, task) = w.start_daemon();
    wait_for("three leads", Duration::from_secs(60), || async {
        count(&w.db.pool, "SELECT count(*) FROM crm_links").await == 3
    })
    .await;
    // A lead deleted in amoCRM while the daemon runs: no webhook tells it.
    let deleted = w.link_of("74000001").await.unwrap() as u64;
    w.amo.delete_lead(deleted);
    wait_for(
        "the periodic run recreates it",
        Duration::from_secs(30),
        || async { w.leads_of("74000001").len() == 1 },
    )
    .await;
    let periodic = count(
        &w.db.pool,
        "SELECT count(*) FROM reconcile_runs WHERE origin = 'periodic' AND finished_at IS NOT NULL
           AND (summary->>'recreated')::int = 1",
    )
    .await;
    assert_eq!(periodic, 1, "one periodic run found the deleted lead");
    stop.cancel();
    task.await.unwrap();

    // Ctrl-C before anything was read: a summary that says so, nothing changed.
    let sources = orderbridge::daemon::reconcile_sources(&w.settings, &w.db.pool)
        .await
        .unwrap();
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    w.amo
        .delete_lead(w.link_of("74000002").await.unwrap() as u64);
    let jobs_before = count(&w.db.pool, "SELECT count(*) FROM outbox_jobs").await;
    let summary = sources
        .reconcile(
            &orderbridge::sync::reconcile::Scope {
                crm_account: "main".into(),
                shop: None,
                since: chrono::Utc::now() - chrono::Duration::days(1),
                dry_run: false,
            },
            &|_: &str, _: u64, _: Option<u64>| {},
            &cancelled,
        )
        .await
        .unwrap();
    assert!(summary.cancelled);
    assert_eq!(summary.repaired, 0);
    assert_eq!(
        count(&w.db.pool, "SELECT count(*) FROM outbox_jobs").await,
        jobs_before
    );

    // Kaspi failing: the marketplace phase reports it, the CRM phase goes on.
    w.kaspi
        .inject(orderbridge::sim::kaspi::KaspiFault::ServerError, 3);
    let summary = sources
        .reconcile(
            &orderbridge::sync::reconcile::Scope {
                crm_account: "main".into(),
                shop: None,
                since: chrono::Utc::now() - chrono::Duration::days(1),
                dry_run: false,
            },
            &|_: &str, _: u64, _: Option<u64>| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(summary.failed, 1, "{summary:?}");
    assert!(
        summary.failures[0].contains("kaspi_main") && summary.failures[0].contains("500"),
        "{:?}",
        summary.failures
    );
    assert_eq!(summary.recreated, 1, "the CRM phase still ran: {summary:?}");
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

impl World {
    /// Starts the daemon and waits until `/readyz` says the maps resolved.
    async fn start_ready_daemon(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let started = self.start_daemon();
        let readyz = format!("http://{}/readyz", self.settings.http.listen);
        wait_for(
            "the daemon ready (maps resolved)",
            Duration::from_secs(30),
            || async {
                reqwest::get(&readyz)
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        started
    }

    async fn settled(&self) -> bool {
        count(&self.db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
            && count(
                &self.db.pool,
                "SELECT count(*) FROM inbox WHERE processed_at IS NULL",
            )
            .await
                == 0
    }

    async fn order_id(&self, code: &str) -> i64 {
        sqlx::query_scalar("SELECT id FROM orders WHERE code = $1")
            .bind(code)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn manager_moved(&self, code: &str) -> bool {
        sqlx::query_scalar(
            "SELECT l.manager_moved FROM crm_links l JOIN orders o ON o.id = l.order_id WHERE o.code = $1",
        )
        .bind(code)
        .fetch_optional(&self.db.pool)
        .await
        .unwrap()
        .unwrap_or(false)
    }

    fn scope_of_a_day(&self) -> orderbridge::sync::reconcile::Scope {
        orderbridge::sync::reconcile::Scope {
            crm_account: "main".into(),
            shop: None,
            since: chrono::Utc::now() - chrono::Duration::days(1),
            dry_run: false,
        }
    }
}

/// Found by `prove api-faults`: the reconciliation read the stored orders
/// (whether a manager moved each lead), then the leads. A manager who accepted
/// an order in between left a lead in "another stage" with no known manager's
/// move, and the reconciliation moved it back to «Новая заявка».
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managers_move_made_while_the_reconciliation_reads_the_leads_is_not_moved_back() {
    let w = world().await;
    let manager = w.amo.seed_user("Менеджер смены");
    let now = chrono::Utc::now().timestamp_millis();
    let order = w
        .kaspi
        .create_order(SimOrderSpec::new("75000001", now - 60_000));
    let (stop, task) = w.start_ready_daemon().await;
    wait_for("the lead, settled", Duration::from_secs(60), || async {
        w.link_of("75000001").await.is_some() && w.settled().await
    })
    .await;
    let lead = w.link_of("75000001").await.unwrap() as u64;
    let pipeline = w.amo.lead(lead).unwrap().pipeline_id;
    let accepted = w.stage_id("В работе / Сборка");

    // The reconciliation's reading of the leads waits at amoCRM, after it read
    // the Kaspi listing and the stored orders.
    let mut reading = w
        .amo
        .hold_next("GET", "/api/v4/leads", "filter[updated_at][from]");
    let sources = orderbridge::daemon::reconcile_sources(&w.settings, &w.db.pool)
        .await
        .unwrap();
    let scope = w.scope_of_a_day();
    let run = tokio::spawn(async move {
        sources
            .reconcile(
                &scope,
                &|_: &str, _: u64, _: Option<u64>| {},
                &CancellationToken::new(),
            )
            .await
    });
    assert!(
        reading.reached(Duration::from_secs(30)).await,
        "the reconciliation reads the leads"
    );
    // Meanwhile the manager accepts the order; Kaspi applies it and the poll
    // stores it, all before the reading's answer.
    w.amo.manager_moves_lead(lead, pipeline, accepted, manager);
    wait_for(
        "Kaspi accepts and the daemon settles",
        Duration::from_secs(30),
        || async {
            w.kaspi
                .order(&order.id)
                .is_some_and(|o| o.status == "ACCEPTED_BY_MERCHANT")
                && count(
                    &w.db.pool,
                    "SELECT count(*) FROM orders WHERE status_key = 'accepted'",
                )
                .await
                    == 1
                && w.manager_moved("75000001").await
                && w.settled().await
        },
    )
    .await;
    reading.release();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(
        (summary.wrong_stage, summary.repaired, summary.explained),
        (0, 0, 1),
        "the lead is where the manager put it, and that is known: {summary:?}"
    );
    wait_for("the daemon settles", Duration::from_secs(30), || async {
        w.settled().await
    })
    .await;
    assert_eq!(w.amo.lead(lead).unwrap().status_id, accepted);
    let back = w
        .amo
        .stage_changes()
        .into_iter()
        .filter(|(id, from, _, _)| *id == lead && *from == accepted)
        .count();
    assert_eq!(back, 0, "the lead never left the manager's stage");
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}

/// A repair the reconciliation queued ("the lead is in another stage than
/// the map gives: move it") is dropped when a manager moved the lead after the
/// reconciliation judged it; one judged after the manager's move still moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_repair_judged_before_a_managers_move_does_not_undo_it() {
    let w = world().await;
    let manager = w.amo.seed_user("Менеджер смены");
    let now = chrono::Utc::now().timestamp_millis();
    w.kaspi
        .create_order(SimOrderSpec::new("75000002", now - 60_000));
    let (stop, task) = w.start_ready_daemon().await;
    wait_for("the lead, settled", Duration::from_secs(60), || async {
        w.link_of("75000002").await.is_some() && w.settled().await
    })
    .await;
    let lead = w.link_of("75000002").await.unwrap() as u64;
    let pipeline = w.amo.lead(lead).unwrap().pipeline_id;
    let first = w.stage_id("Новая заявка");
    // A stage with no marketplace action: the order stays new at Kaspi.
    let delivering = w.stage_id("В доставке");
    let order_id = w.order_id("75000002").await;
    // The job the reconciliation queues for a lead it found in another stage.
    let enqueue = |judged_at: chrono::DateTime<chrono::Utc>| {
        enqueue_kaspi_crm_sync(
            &w.db.pool,
            order_id,
            serde_json::json!({"force_stage": true, "judged_at": judged_at.to_rfc3339()}),
        )
    };

    let judged_before = orderbridge::store::links::database_now(&w.db.pool)
        .await
        .unwrap();
    w.amo
        .manager_moves_lead(lead, pipeline, delivering, manager);
    wait_for(
        "the manager's move recorded",
        Duration::from_secs(30),
        || async { w.manager_moved("75000002").await && w.settled().await },
    )
    .await;
    enqueue(judged_before).await;
    wait_for("the repair done", Duration::from_secs(30), || async {
        w.settled().await
    })
    .await;
    assert_eq!(
        w.amo.lead(lead).unwrap().status_id,
        delivering,
        "the manager's later move stands"
    );
    let dropped = count(
        &w.db.pool,
        "SELECT count(*) FROM order_events WHERE kind = 'reconcile' AND detail LIKE 'repair dropped%'",
    )
    .await;
    assert_eq!(dropped, 1, "the order's timeline says why");

    // Judged after the manager's move: the reconciliation knew of it.
    let judged_after = orderbridge::store::links::database_now(&w.db.pool)
        .await
        .unwrap();
    enqueue(judged_after).await;
    wait_for("the repair done", Duration::from_secs(30), || async {
        w.settled().await && w.amo.lead(lead).is_some_and(|l| l.status_id == first)
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    let World { db, .. } = w;
    db.drop_now().await.unwrap();
}
