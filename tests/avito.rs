//! Contract tests of the Avito client against the Avito simulator, the order
//! poller, and the messenger lead intake (webhook and polling fallback).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use orderbridge::config::AvitoLimits;
use orderbridge::connectors::avito::*;
use orderbridge::http::hooks::AvitoHookAccount;
use orderbridge::http::AppState;
use orderbridge::outbox::limits::Limiters;
use orderbridge::outbox::RetryAction;
use orderbridge::sim::avito::{AvitoFault, AvitoSim, AvitoSimConfig, SimAvitoOrderSpec};
use orderbridge::sync::avito_poll::AvitoPoller;
use secrecy::SecretString;

const SECRET: &str = "avito-hook-secret-0123456789";

fn client_with(sim: &AvitoSim, limits: AvitoLimits) -> AvitoClient {
    let mut registry = Limiters::new([]);
    for (key, quota) in limits.quotas("main") {
        registry = registry.with_per_request(key, quota);
    }
    let config = AvitoSimConfig::default();
    AvitoClient::new(
        AvitoAccount {
            name: "main".into(),
            base_url: sim.base_url(),
            client_id: config.client_id,
            client_secret: SecretString::from(config.client_secret),
            timeout: Duration::from_secs(2),
        },
        AvitoLimiters::from_registry(&registry, "main"),
    )
    .unwrap()
}

fn client(sim: &AvitoSim) -> AvitoClient {
    client_with(sim, AvitoLimits::default())
}

async fn sim() -> AvitoSim {
    AvitoSim::start(AvitoSimConfig::default()).await.unwrap()
}

fn post_count(sim: &AvitoSim, path: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with(path))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_cached_and_replaced_when_it_expires_mid_run() {
    let sim = sim().await;
    let client = client(&sim);
    sim.create_order(SimAvitoOrderSpec::new("50000000000000001", Utc::now()));
    assert_eq!(
        client
            .orders(ACTIVE_STATUSES, &[], None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        client
            .orders(ACTIVE_STATUSES, &[], None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(sim.token_calls(), 1, "one token for many calls");
    // The token expires: Avito answers 403; one new token, one retry.
    sim.expire_tokens();
    assert_eq!(
        client
            .orders(ACTIVE_STATUSES, &[], None)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(sim.token_calls(), 2);
    assert_eq!(sim.count_status(403), 1);
    // Wrong credentials: a permanent, alerting failure.
    let config = AvitoSimConfig::default();
    let wrong = AvitoClient::new(
        AvitoAccount {
            name: "main".into(),
            base_url: sim.base_url(),
            client_id: config.client_id,
            client_secret: SecretString::from("nope"),
            timeout: Duration::from_secs(2),
        },
        AvitoLimiters::default(),
    )
    .unwrap();
    let error = wrong.orders(ACTIVE_STATUSES, &[], None).await.unwrap_err();
    assert!(matches!(error, AvitoError::Auth { .. }), "{error}");
    assert!(error.is_alert());
    assert!(matches!(error.classify(), RetryAction::Permanent { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_read_page_by_page_and_converted() {
    let sim = sim().await;
    let created = Utc::now() - chrono::Duration::hours(2);
    for i in 0..45 {
        sim.create_order(SimAvitoOrderSpec::new(
            &format!("5000000000000{i:04}"),
            created + chrono::Duration::seconds(i),
        ));
    }
    sim.create_order(SimAvitoOrderSpec {
        status: "closed".into(),
        ..SimAvitoOrderSpec::new("59999999999999999", created)
    });
    let client = client(&sim);
    let orders = client.orders(ACTIVE_STATUSES, &[], None).await.unwrap();
    assert_eq!(orders.len(), 45, "the closed one is not active");
    let lists: Vec<String> = sim
        .requests()
        .iter()
        .filter(|r| r.path == "/order-management/1/orders")
        .map(|r| r.query.clone())
        .collect();
    assert_eq!(lists.len(), 3, "20 per page while hasMore");
    assert!(lists[0].contains("limit=20"));
    assert!(
        lists[0].contains("statuses=on_confirmation") && lists[0].contains("statuses=in_transit")
    );
    let first = &orders[0];
    assert_eq!(first.order.status.as_str(), "on_confirmation");
    assert!(first
        .available_actions
        .iter()
        .any(|(a, required)| a == "confirm" && *required));
    assert_eq!(first.commission.0, 2_000);
    assert_eq!(first.order.total.0, 100_000);
    assert!(first.confirm_till.is_some());
    // On confirmation, Avito's confirmTill is the order's own deadline (it
    // tightens the stage's SLA when earlier); a closed order has none.
    assert_eq!(first.order.marketplace_deadline, first.confirm_till);
    assert_eq!(
        first.order.customer.phone.as_ref().unwrap().as_e164(),
        "+79876543210"
    );
    assert_eq!(first.order.items[0].name, "Кеды Venice");
    // By ids.
    let one = client.order("59999999999999999").await.unwrap().unwrap();
    assert_eq!(one.order.status.as_str(), "closed");
    assert!(one.order.is_terminal);
    assert_eq!(one.order.marketplace_deadline, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_go_out_only_when_available_and_success_false_is_a_failure() {
    let sim = sim().await;
    let client = client(&sim);
    let id = "50000000000000010";
    sim.create_order(SimAvitoOrderSpec::new(id, Utc::now()));
    // Not offered now: never sent.
    let error = client.apply_transition(id, "receive").await.unwrap_err();
    assert!(matches!(error, AvitoError::NotAvailable { .. }), "{error}");
    assert!(matches!(error.classify(), RetryAction::Permanent { .. }));
    assert_eq!(post_count(&sim, "applyTransition"), 0);
    // Avito answers 200 {success: false}: not a success.
    sim.inject(AvitoFault::SuccessFalse, 1);
    let error = client.apply_transition(id, "confirm").await.unwrap_err();
    assert!(
        matches!(error, AvitoError::TransitionRefused { .. }),
        "{error}"
    );
    assert_eq!(sim.order(id).unwrap().status, "on_confirmation");
    // Offered and applied: the order is re-read afterwards.
    let after = client.apply_transition(id, "confirm").await.unwrap();
    assert_eq!(after.order.status.as_str(), "ready_to_ship");
    assert_eq!(
        sim.order(id).unwrap().transitions,
        vec!["confirm".to_string()]
    );
    let after = client.apply_transition(id, "perform").await.unwrap();
    assert_eq!(after.order.status.as_str(), "in_transit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_numbers_report_avitos_in_200_errors() {
    let sim = sim().await;
    let client = client(&sim);
    let id = "50000000000000020";
    sim.create_order(SimAvitoOrderSpec {
        status: "ready_to_ship".into(),
        service_type: "dbs".into(),
        ..SimAvitoOrderSpec::new(id, Utc::now())
    });
    let bad = client.set_tracking_number(id, "1").await.unwrap_err();
    assert!(
        matches!(&bad, AvitoError::TrackingRefused { code, .. } if code == "incorrect_number"),
        "{bad}"
    );
    client
        .set_tracking_number(id, "01-01031002199")
        .await
        .unwrap();
    assert_eq!(
        sim.order(id).unwrap().tracking_number.as_deref(),
        Some("01-01031002199")
    );
    let again = client
        .set_tracking_number(id, "01-01031002199")
        .await
        .unwrap_err();
    assert!(
        matches!(again, AvitoError::TrackingRefused { .. }),
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_classified() {
    let sim = sim().await;
    let client = client(&sim);
    client.orders(ACTIVE_STATUSES, &[], None).await.unwrap();
    sim.inject(AvitoFault::ServerError, 1);
    let e = client.orders(ACTIVE_STATUSES, &[], None).await.unwrap_err();
    assert!(matches!(e, AvitoError::Server { status: 500, .. }), "{e}");
    assert!(matches!(e.classify(), RetryAction::Retry { .. }));
    sim.inject(AvitoFault::TooManyRequests, 1);
    let e = client.orders(ACTIVE_STATUSES, &[], None).await.unwrap_err();
    assert!(matches!(e, AvitoError::RateLimited { .. }), "{e}");
    assert!(matches!(
        e.classify(),
        RetryAction::Retry { .. } | RetryAction::RetryAfter { .. }
    ));
    sim.inject(AvitoFault::ConnectionReset, 1);
    let e = client.orders(ACTIVE_STATUSES, &[], None).await.unwrap_err();
    assert!(matches!(e, AvitoError::Network(_)), "{e}");
    client.orders(ACTIVE_STATUSES, &[], None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_calls_make_no_429() {
    // Scaled-up limits (same on both sides) keep the test short.
    let config = AvitoSimConfig {
        orders_per_minute: 1200,
        transitions_per_minute: 600,
        global_per_second: 40,
        ..AvitoSimConfig::default()
    };
    let sim = AvitoSim::start(config).await.unwrap();
    sim.create_order(SimAvitoOrderSpec::new("50000000000000030", Utc::now()));
    let client = client_with(
        &sim,
        AvitoLimits {
            orders_per_minute: 1200,
            transitions_per_minute: 600,
            tracking_per_minute: 100,
            global_per_second: 40,
        },
    );
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..10 {
        let client = client.clone();
        tasks.spawn(async move {
            for i in 0..100 {
                if (worker + i) % 3 == 0 {
                    client.webhook_subscriptions().await.unwrap();
                } else {
                    client.orders(ACTIVE_STATUSES, &[], None).await.unwrap();
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        sim.count_status(429),
        0,
        "the limiters kept every window under the limits"
    );
    let calls = sim.requests().iter().filter(|r| r.path != "/token").count();
    assert_eq!(calls, 1000);
    assert!(
        started.elapsed() > Duration::from_secs(25),
        "orders at 20/s cannot go faster"
    );
}

// ---- poller ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_diffs_on_status_and_updated_at_and_follows_held_orders_by_id() {
    let db = fresh_db().await;
    let sim = sim().await;
    let poller = AvitoPoller::new(client(&sim), db.pool.clone(), "amocrm:main");
    let a = "50000000000000040";
    sim.create_order(SimAvitoOrderSpec::new(a, Utc::now()));
    sim.create_order(SimAvitoOrderSpec::new("50000000000000041", Utc::now()));
    let report = poller.poll_once().await.unwrap();
    assert_eq!((report.listed, report.new), (2, 2));
    let report = poller.poll_once().await.unwrap();
    assert_eq!((report.unchanged, report.new, report.changed), (2, 0, 0));
    // Avito closes one: it leaves the active statuses and is read by id.
    sim.set_status(a, "closed");
    let report = poller.poll_once().await.unwrap();
    assert_eq!((report.by_id, report.changed), (1, 1));
    let stored = orderbridge::store::orders::snapshot(&db.pool, "avito", "main", a)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status.as_str(), "closed");
    assert!(stored.is_terminal);
    let report = poller.poll_once().await.unwrap();
    assert_eq!(report.by_id, 0, "terminal orders are no longer followed");
    let jobs = orderbridge::store::outbox::jobs_in_state(&db.pool, "pending")
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2, "one CRM intent per order");
    db.drop_now().await.unwrap();
}

// ---- messenger --------------------------------------------------------------------

async fn serve(pool: sqlx::PgPool, limit: usize) -> (String, tokio_util::sync::CancellationToken) {
    let listener = orderbridge::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let state = AppState {
        pool,
        metrics: orderbridge::telemetry::metrics().unwrap(),
        amocrm_hooks: Default::default(),
        avito_hooks: Arc::new(vec![AvitoHookAccount {
            name: "main".into(),
            secret: SecretString::from(SECRET),
        }]),
        partner_hooks: Default::default(),
        webhook_body_limit: limit,
        maps: None,
        inbox_wake: Default::default(),
        dashboard: Default::default(),
    };
    tokio::spawn(orderbridge::http::serve(listener, state, shutdown.clone()));
    (format!("http://{addr}"), shutdown)
}

fn delivery(message_id: &str, author_id: u64, kind: &str) -> serde_json::Value {
    serde_json::json!({
        "id": format!("env-{message_id}"), "version": "v3.0.0", "timestamp": 1754382000,
        "payload": { "type": "message", "value": {
            "id": message_id, "chat_id": "u2i-chat-1", "chat_type": "u2i", "user_id": 94235311,
            "author_id": author_id, "item_id": 1768287444, "created": 1754382000,
            "published_at": "2026-08-05T07:00:00Z", "read": null, "type": kind,
            "content": { "text": "Здравствуйте, выкупите iPhone 13 Pro?" } } }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_intake_answers_fast_and_stores_only_buyer_messages_once() {
    let db = fresh_db().await;
    let (base, shutdown) = serve(db.pool.clone(), 4096).await;
    let url = format!("{base}/hooks/avito/{SECRET}");
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| http.post(&url).json(&body).send();
    // Avito's probe.
    let probe = post(serde_json::json!({})).await.unwrap();
    assert_eq!(probe.status(), 200);
    // The account's own message and a system message: 200, not stored.
    assert_eq!(
        post(delivery("own-1", 94235311, "text"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post(delivery("sys-1", 0, "system")).await.unwrap().status(),
        200
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 0);
    // A buyer's message, delivered twice: stored once.
    let started = Instant::now();
    assert_eq!(
        post(delivery("buyer-1", 141906442, "text"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within Avito's 2 s"
    );
    assert_eq!(
        post(delivery("buyer-1", 141906442, "text"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 1);
    // Wrong secret, oversized, malformed.
    let wrong = http
        .post(format!("{base}/hooks/avito/guess"))
        .json(&delivery("x", 1, "text"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 404);
    let huge = http
        .post(&url)
        .body(vec![b' '; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
    let broken = http.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(broken.status(), 400);
    // A well-formed delivery sent as another content type: 415.
    let form = http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_json::to_vec(&delivery("m-415", 1, "text")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 1);
    shutdown.cancel();
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyers_first_message_becomes_one_lead_with_the_item_and_the_buyer() {
    use orderbridge::sync::avito_leads;
    let db = fresh_db().await;
    let (base, shutdown) = serve(db.pool.clone(), 1 << 20).await;
    let sim = sim().await;
    let client = client(&sim);
    client
        .subscribe_webhook(&format!("{base}/hooks/avito/{SECRET}"))
        .await
        .unwrap();
    assert_eq!(client.webhook_subscriptions().await.unwrap().len(), 1);
    sim.buyer_writes(
        "u2i-chat-7",
        1768287444,
        "iPhone 13 Pro 256",
        141906442,
        "Ivan",
        "Выкупите?",
    )
    .await;
    sim.seller_writes("u2i-chat-7", "Да, приезжайте").await;
    sim.buyer_writes(
        "u2i-chat-7",
        1768287444,
        "iPhone 13 Pro 256",
        141906442,
        "Ivan",
        "Когда?",
    )
    .await;
    wait_for(
        "two buyer messages stored",
        Duration::from_secs(10),
        || async { count(&db.pool, "SELECT count(*) FROM inbox").await == 2 },
    )
    .await;
    assert_eq!(
        avito_leads::process_inbox(&client, &db.pool, "amocrm:main")
            .await
            .unwrap(),
        1
    );
    let jobs = orderbridge::store::outbox::jobs_in_state(&db.pool, "pending")
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2, "one lead intent and one note intent");
    let (leads, notes): (Vec<_>, Vec<_>) = jobs
        .iter()
        .partition(|j| j.payload["note_only"].as_bool() != Some(true));
    assert_eq!((leads.len(), notes.len()), (1, 1), "one lead per chat");
    assert_eq!(notes[0].payload["text"], "Когда?");
    assert_eq!(
        notes[0].ordering_key, leads[0].ordering_key,
        "the note runs after the lead"
    );
    let lead = &leads[0].payload;
    assert_eq!(leads[0].kind, avito_leads::MESSENGER_LEAD_KIND);
    assert_eq!(lead["chat_id"], "u2i-chat-7");
    assert_eq!(lead["item_title"], "iPhone 13 Pro 256");
    assert!(lead["item_url"].as_str().is_some_and(|u| !u.is_empty()));
    assert_eq!(lead["buyer_name"], "Ivan");
    assert_eq!(lead["text"], "Выкупите?");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM inbox WHERE processed_at IS NULL"
        )
        .await,
        0
    );
    shutdown.cancel();
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_chats_are_polled_when_webhooks_are_missed() {
    use orderbridge::sync::avito_leads;
    let db = fresh_db().await;
    let sim = sim().await;
    let client = client(&sim);
    // No subscription: the webhook is lost.
    sim.buyer_writes("u2i-chat-9", 42, "Samsung S23", 555, "Dana", "Продаёте?")
        .await;
    sim.seller_writes("u2i-chat-9", "Да").await;
    assert_eq!(
        avito_leads::poll_unread(&client, &db.pool).await.unwrap(),
        1,
        "the buyer's message only"
    );
    assert_eq!(
        avito_leads::poll_unread(&client, &db.pool).await.unwrap(),
        0,
        "deduplicated"
    );
    assert_eq!(
        avito_leads::process_inbox(&client, &db.pool, "amocrm:main")
            .await
            .unwrap(),
        1
    );
    db.drop_now().await.unwrap();
}

/// The account-wide pause after 429s (as for Kaspi): queued actions and the
/// poll of one account wait it out together, one probe at a time while the
/// storm lasts, instead of each retrying on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_pauses_every_call_of_the_account_until_an_answer_comes() {
    let sim = sim().await;
    let client = client(&sim);
    client.orders(ACTIVE_STATUSES, &[], None).await.unwrap();
    sim.fault_every(AvitoFault::TooManyRequests, 1);
    let before = sim.requests().len();
    let started = Instant::now();
    let lift = {
        let sim = sim.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(6)).await;
            sim.lift_steady_fault();
        })
    };
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    if client.orders(ACTIVE_STATUSES, &[], None).await.is_ok() {
                        return started.elapsed();
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        let done = caller.await.unwrap();
        assert!(done < Duration::from_secs(15), "answered after {done:?}");
    }
    lift.await.unwrap();
    let throttled = sim.requests()[before..]
        .iter()
        .filter(|r| r.status == 429)
        .count();
    // At most the first wave (the account's limiter spaces it), then one probe
    // after ~1 s and ~3 s.
    assert!(
        (1..=11).contains(&throttled),
        "{throttled} requests answered 429 in a 6 s storm"
    );
}
