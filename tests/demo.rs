//! `orderbridge demo` as a test: the real daemon against the three simulators,
//! orders generated and leads moved by simulated managers at high speed for a
//! bounded time; then what the simulators hold is checked.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::admin_url;
use orderbridge::demo::{DemoOptions, Finished};

/// Everything logged in this test binary (every crate, debug level; the
/// simulators' own lines left out), as JSON lines.
fn captured_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_env_filter("debug,orderbridge::sim=off")
        .with_writer(move || LogSink(sink.clone()))
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    logs
}

struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

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
async fn the_demo_at_high_speed_keeps_one_lead_per_order_and_one_action_per_move() {
    let logs = captured_logs();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let database = format!("ob_test_demo_{}", uuid::Uuid::new_v4().simple());
    let options = DemoOptions {
        speed: 120.0,
        seed: 7,
        run_for: Some(Duration::from_secs(30)),
        orders_per_minute: 2.0,
        database_url: admin_url(),
        database: database.clone(),
        keep: false,
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        live: false,
    };
    let Finished { summary, world } =
        orderbridge::demo::run(options, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
    println!("{summary}");
    assert!(summary.orders >= 20, "orders were generated: {summary}");
    assert_eq!(summary.duplicate_leads, 0, "{summary}");
    assert_eq!(
        summary.orders_without_lead, 0,
        "every order has a lead: {summary}"
    );
    assert_eq!(summary.jobs_dead, 0, "{summary}");
    assert!(
        summary.actions_sent > 0 && summary.actions_refused > 0,
        "{summary}"
    );
    assert!(summary.messenger_leads > 0, "{summary}");
    // The buyout flow: every request became one lead, its stages reached the
    // partner, never beyond its limit.
    assert!(summary.buyout_requests > 0, "{summary}");
    assert_eq!(summary.buyout_leads, summary.buyout_requests, "{summary}");
    assert!(
        summary.partner_reports > summary.buyout_leads,
        "intake and later stages reported: {summary}"
    );
    assert_eq!(summary.partner_http_429, 0, "{summary}");
    assert_eq!(world.partner.stats().out_of_order, 0, "{summary}");

    // One action per move: no Kaspi transition was applied twice to one order.
    let mut applied: BTreeMap<(String, String, bool), usize> = BTreeMap::new();
    for request in world.kaspi.requests() {
        if request.method != "POST" || request.status != 200 {
            continue;
        }
        let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
        let id = body["data"]["id"].as_str().unwrap_or_default().to_string();
        let status = body["data"]["attributes"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let with_code = request
            .headers
            .iter()
            .any(|(k, v)| k == "x-security-code" && !v.is_empty());
        *applied.entry((id, status, with_code)).or_default() += 1;
    }
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");

    // Every lead is where its order's marketplace status maps it (refused moves went back).
    let stage_names: BTreeMap<u64, String> = world
        .amo
        .pipelines()
        .into_iter()
        .flat_map(|p| p.stages)
        .collect();
    let kaspi_stage = |status: &str, state: &str, assembled: bool, courier: bool| match status {
        "APPROVED_BY_BANK" => Some("Новая заявка"),
        "ACCEPTED_BY_MERCHANT" if courier => Some("В доставке"),
        "ACCEPTED_BY_MERCHANT" if assembled && state == "KASPI_DELIVERY" => {
            Some("Готов к отгрузке")
        }
        "ACCEPTED_BY_MERCHANT" => None, // in work, or waiting for the buyer's code
        "COMPLETED" => Some("Успешно реализовано"),
        _ => Some("Закрыто и не реализовано"),
    };
    let mut checked = 0;
    let mut wrong = Vec::new();
    for order in world.kaspi.orders() {
        let Some(expected) = kaspi_stage(
            &order.status,
            &order.state,
            order.assembled,
            order.courier_transmission_date_ms.is_some(),
        ) else {
            continue;
        };
        let lead = world
            .amo
            .leads()
            .into_iter()
            .find(|l| {
                l.custom_fields_values
                    .to_string()
                    .contains(&format!("\"{}\"", order.code))
            })
            .unwrap_or_else(|| panic!("order {} has no lead", order.code));
        if stage_names[&lead.status_id] != expected {
            wrong.push(format!(
                "{} ({}/{}): lead in «{}», expected «{expected}»",
                order.code, order.state, order.status, stage_names[&lead.status_id]
            ));
        }
        checked += 1;
    }
    assert!(checked > 0, "leads follow their orders");
    assert!(
        wrong.is_empty(),
        "leads not in their order's stage: {wrong:#?}"
    );
    // No secret and no buyer's phone in any log line of the whole run.
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.lines().count() > 100,
        "the run was logged ({} lines)",
        logs.lines().count()
    );
    for secret in orderbridge::demo::configured_secrets() {
        assert!(!logs.contains(&secret), "a secret is in the logs");
    }
    let phones: Vec<String> = world
        .amo
        .contacts()
        .into_iter()
        .flat_map(|c| c.phones)
        .map(|p| p.chars().filter(char::is_ascii_digit).collect::<String>())
        .filter(|digits| digits.len() >= 10)
        .collect();
    assert!(phones.len() >= 10, "buyers' phones to look for");
    for digits in &phones {
        let national = &digits[digits.len() - 10..];
        assert!(
            !logs.contains(national),
            "a buyer's phone (…{}) is in the logs",
            &national[6..]
        );
    }
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    ))
    .execute(&admin)
    .await
    .unwrap();
}
