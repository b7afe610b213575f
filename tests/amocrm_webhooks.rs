//! amoCRM webhook intake over real HTTP: secret, size limit, malformed bodies,
//! account check, deduplication into the inbox, and a delivery from the simulator.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use orderbridge::http::hooks::HookAccount;
use orderbridge::http::AppState;
use secrecy::SecretString;

const SECRET: &str = "s3cr3t-path-0123456789";

async fn serve(pool: sqlx::PgPool, limit: usize) -> (String, tokio_util::sync::CancellationToken) {
    let listener = orderbridge::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let state = AppState {
        pool,
        metrics: orderbridge::telemetry::metrics().unwrap(),
        amocrm_hooks: Arc::new(vec![HookAccount {
            name: "main".into(),
            secret: SecretString::from(SECRET),
            subdomain: "example".into(),
            account_id: 31361463,
        }]),
        webhook_body_limit: limit,
        avito_hooks: Default::default(),
        partner_hooks: Default::default(),
        maps: None,
        inbox_wake: Default::default(),
        dashboard: Default::default(),
    };
    tokio::spawn(orderbridge::http::serve(listener, state, shutdown.clone()));
    (format!("http://{addr}"), shutdown)
}

fn status_items(n: usize) -> Vec<(String, String)> {
    let mut form = Vec::new();
    for i in 0..n {
        for (key, value) in [
            ("id", (1000 + i).to_string()),
            ("status_id", "58141807".to_string()),
            ("old_status_id", "58141803".to_string()),
            ("pipeline_id", "6950551".to_string()),
            ("modified_user_id", "8375357".to_string()),
            ("last_modified", "1726572758".to_string()),
        ] {
            form.push((format!("leads[status][{i}][{key}]"), value));
        }
    }
    form.push(("account[subdomain]".into(), "example".into()));
    form.push(("account[id]".into(), "31361463".into()));
    form
}

async fn post(url: &str, form: &[(String, String)]) -> u16 {
    reqwest::Client::new()
        .post(url)
        .form(form)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_item_payload_is_stored_once_per_change() {
    let db = fresh_db().await;
    let (base, shutdown) = serve(db.pool.clone(), 1 << 20).await;
    let url = format!("{base}/hooks/amocrm/{SECRET}");
    assert_eq!(post(&url, &status_items(100)).await, 200);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 100);
    // amoCRM delivers again (it retries on timeouts): nothing doubles.
    assert_eq!(post(&url, &status_items(100)).await, 200);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 100);
    let rows = orderbridge::store::inbox::unprocessed(&db.pool, "amocrm", 1)
        .await
        .unwrap();
    assert_eq!(rows[0].kind, "lead_status");
    assert_eq!(rows[0].account, "main");
    assert_eq!(rows[0].payload["lead_id"], 1000);
    assert_eq!(rows[0].payload["status_id"], 58141807);
    assert_eq!(rows[0].payload["old_status_id"], 58141803);
    shutdown.cancel();
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deliveries_are_refused_and_store_nothing() {
    let db = fresh_db().await;
    let (base, shutdown) = serve(db.pool.clone(), 4096).await;
    let url = format!("{base}/hooks/amocrm/{SECRET}");
    // Wrong secret.
    assert_eq!(
        post(&format!("{base}/hooks/amocrm/guess"), &status_items(1)).await,
        404
    );
    // Oversized body.
    assert_eq!(post(&url, &status_items(200)).await, 413);
    // Malformed: no account block; a non-numeric id; garbage bytes.
    let mut no_account = status_items(1);
    no_account.truncate(6);
    assert_eq!(post(&url, &no_account).await, 400);
    let mut bad_id = status_items(1);
    bad_id[0].1 = "DROP TABLE".into();
    assert_eq!(post(&url, &bad_id).await, 400);
    let garbage = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(vec![0xff, 0xfe, b'=', b'[', 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    // Another account's payload under our secret.
    let mut other = status_items(1);
    let last = other.len() - 1;
    other[last].1 = "99999".into();
    assert_eq!(post(&url, &other).await, 400);
    // A well-formed payload sent as another content type: 415.
    let json = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(serde_urlencoded::to_string(status_items(1)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 415);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 0);
    shutdown.cancel();
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_s_webhook_for_a_status_change_lands_in_the_inbox() {
    use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig};
    let db = fresh_db().await;
    let (base, shutdown) = serve(db.pool.clone(), 1 << 20).await;
    let sim = AmoSim::start(AmoSimConfig::default()).await.unwrap();
    let pipeline = sim.seed_pipeline("Kaspi", &["New order", "Assembling"]);
    let manager = sim.seed_user("Manager");
    let client = reqwest::Client::new();
    // Subscribe our endpoint the way the bridge does, through the API.
    let token = AmoSimConfig::default();
    let tokens: serde_json::Value = client
        .post(format!("{}/oauth2/access_token", sim.base_url()))
        .json(&serde_json::json!({
            "client_id": token.client_id, "client_secret": token.client_secret,
            "grant_type": "refresh_token", "refresh_token": token.initial_refresh_token,
            "redirect_uri": token.redirect_uri,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = tokens["access_token"].as_str().unwrap().to_string();
    let subscribed = client
        .post(format!("{}/api/v4/webhooks", sim.base_url()))
        .bearer_auth(&bearer)
        .json(&serde_json::json!({ "destination": format!("{base}/hooks/amocrm/{SECRET}"), "settings": ["status_lead"] }))
        .send().await.unwrap();
    assert!(subscribed.status().is_success());
    let created: serde_json::Value = client
        .post(format!("{}/api/v4/leads", sim.base_url()))
        .bearer_auth(&bearer)
        .json(&serde_json::json!([{ "name": "Order KSP-1", "pipeline_id": pipeline.id, "status_id": pipeline.stages[1].0 }]))
        .send().await.unwrap().json().await.unwrap();
    let lead_id = created["_embedded"]["leads"][0]["id"].as_u64().unwrap();
    sim.manager_moves_lead(lead_id, pipeline.id, pipeline.stages[2].0, manager);
    wait_for("the webhook is stored", Duration::from_secs(10), || async {
        count(&db.pool, "SELECT count(*) FROM inbox").await >= 1
    })
    .await;
    let rows = orderbridge::store::inbox::unprocessed(&db.pool, "amocrm", 10)
        .await
        .unwrap();
    let change = rows.iter().find(|r| r.kind == "lead_status").unwrap();
    assert_eq!(change.payload["lead_id"], lead_id);
    assert_eq!(change.payload["status_id"], pipeline.stages[2].0);
    assert_eq!(change.payload["modified_user_id"], manager);
    shutdown.cancel();
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_open_circuit() {
    let db = fresh_db().await;
    let (base, shutdown) = serve(db.pool.clone(), 1024).await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let until = chrono::Utc::now() + chrono::Duration::minutes(30);
    orderbridge::store::circuits::open(&db.pool, "amocrm:main", until, "amoCRM answered 403")
        .await
        .unwrap();
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["open_circuits"][0]["target"], "amocrm:main");
    orderbridge::store::circuits::close(&db.pool, "amocrm:main")
        .await
        .unwrap();
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    shutdown.cancel();
    db.drop_now().await.unwrap();
}

/// Found by `orderbridge prove db-faults`: while PostgreSQL was down, /readyz
/// waited for a connection to list open circuits (the pool's 30 s) after its
/// 2 s database check had already failed, so probes timed out instead of
/// reading "database unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_promptly_while_the_database_does_not() {
    // A server that takes the connection and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/orderbridge"))
        .unwrap();
    let (base, shutdown) = serve(pool, 1024).await;
    let asked = std::time::Instant::now();
    let ready = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap();
    let took = asked.elapsed();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(
        body["checks"]["database"]
            .as_str()
            .is_some_and(|d| d.starts_with("unreachable")),
        "{body}"
    );
    assert!(took < Duration::from_secs(4), "/readyz took {took:?}");
    drop(silent);
    shutdown.cancel();
}

/// Webhooks arriving together are each stored (the load suite's flood, in
/// small); one PostgreSQL refuses (a NUL in a lead's name cannot be stored
/// in jsonb) fails alone with a 500 for amoCRM to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_arriving_together_are_each_stored_and_a_bad_one_fails_alone() {
    let db = fresh_db().await;
    let (base, shutdown) = serve(db.pool.clone(), 1 << 20).await;
    let url = format!("{base}/hooks/amocrm/{SECRET}");
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..200usize {
        let url = url.clone();
        sends.spawn(async move {
            let mut form = status_items(1);
            form[0].1 = (5000 + i).to_string();
            if i == 77 {
                form.push(("leads[status][0][name]".into(), "bad\0name".into()));
            }
            (i, post(&url, &form).await)
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = sends.join_next().await {
        answers.push(answer.unwrap());
    }
    answers.sort();
    for (i, status) in &answers {
        assert_eq!(*status, if *i == 77 { 500 } else { 200 }, "webhook {i}");
    }
    assert_eq!(count(&db.pool, "SELECT count(*) FROM inbox").await, 199);
    shutdown.cancel();
    db.drop_now().await.unwrap();
}
