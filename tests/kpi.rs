//! The KPIs on a seeded history, checked against hand-computed values; the
//! JSON API equals the command's figures; the API's access rules on a public
//! address. Real PostgreSQL.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use common::*;
use orderbridge::http::{AppState, Dashboard, DashboardAccess};
use secrecy::SecretString;
use sqlx::PgPool;

/// An order first seen at `seen`, with its marketplace status history.
async fn order(
    pool: &PgPool,
    shop: &str,
    code: &str,
    seen: DateTime<Utc>,
    history: &[(&str, i64)],
    reason: Option<&str>,
) -> i64 {
    let status = history.last().map(|(k, _)| *k).unwrap_or("new");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (marketplace, account, external_id, code, status_key, is_terminal,
                             content_hash, snapshot, source_created_at, first_seen_at)
         VALUES ('kaspi', $1, $2, $2, $3, $4, 'h', $5, $6, $6) RETURNING id",
    )
    .bind(shop)
    .bind(code)
    .bind(status)
    .bind(matches!(status, "completed" | "cancelled"))
    .bind(serde_json::json!({ "cancellation_reason": reason }))
    .bind(seen)
    .fetch_one(pool)
    .await
    .unwrap();
    let mut from: Option<&str> = None;
    sqlx::query(
        "INSERT INTO order_stage_history (order_id, to_key, observed_at) VALUES ($1, 'new', $2)",
    )
    .bind(id)
    .bind(seen)
    .execute(pool)
    .await
    .unwrap();
    for (key, after_s) in history {
        sqlx::query(
            "INSERT INTO order_stage_history (order_id, from_key, to_key, observed_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(from.unwrap_or("new"))
        .bind(key)
        .bind(seen + Duration::seconds(*after_s))
        .execute(pool)
        .await
        .unwrap();
        from = Some(key);
    }
    id
}

async fn link(pool: &PgPool, order_id: i64, lead: i64, at: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO crm_links (order_id, crm_account, lead_id, created_at) VALUES ($1, 'main', $2, $3)",
    )
    .bind(order_id)
    .bind(lead)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
}

#[allow(clippy::too_many_arguments)]
async fn entry(
    pool: &PgPool,
    order_id: i64,
    stage: &str,
    role: Option<&str>,
    responsible: Option<i64>,
    entered: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
    left: Option<DateTime<Utc>>,
) {
    sqlx::query(
        "INSERT INTO stage_entries (order_id, crm_account, lead_id, pipeline_id, status_id, stage, role,
                                    source, responsible_user_id, entered_at, deadline, left_at)
         VALUES ($1, 'main', $1, 1, 1, $2, $3, 'marketplace', $4, $5, $6, $7)",
    )
    .bind(order_id)
    .bind(stage)
    .bind(role)
    .bind(responsible)
    .bind(entered)
    .bind(deadline)
    .bind(left)
    .execute(pool)
    .await
    .unwrap();
}

const MIN: i64 = 60;
const HOUR: i64 = 3600;

/// Five orders of two shops; A completes, B skips «accepted», C is cancelled
/// while new, D after acceptance, E stays open.
async fn seed(pool: &PgPool, t0: DateTime<Utc>) {
    let a = order(
        pool,
        "s1",
        "A",
        t0,
        &[("accepted", 10 * MIN), ("completed", 30 * HOUR)],
        None,
    )
    .await;
    let b = order(
        pool,
        "s1",
        "B",
        t0,
        &[("assembled", 20 * MIN), ("completed", 20 * HOUR)],
        None,
    )
    .await;
    order(
        pool,
        "s1",
        "C",
        t0,
        &[("cancelled", 5 * MIN)],
        Some("BUYER_CANCELLATION_BY_MERCHANT"),
    )
    .await;
    let d = order(
        pool,
        "s1",
        "D",
        t0,
        &[("accepted", 30 * MIN), ("cancelled", 2 * HOUR)],
        Some("OUT_OF_STOCK"),
    )
    .await;
    let e = order(pool, "s2", "E", t0, &[], None).await;
    link(pool, a, 1, t0 + Duration::seconds(2)).await;
    link(pool, b, 2, t0 + Duration::seconds(4)).await;
    let new = "Новая заявка";
    let work = "В работе / Сборка";
    // Left in time; left late; still there past the deadline; still there
    // before it (not judged yet, and nobody responsible); no SLA.
    entry(
        pool,
        a,
        new,
        Some("sales"),
        Some(7),
        t0,
        Some(t0 + Duration::minutes(15)),
        Some(t0 + Duration::minutes(10)),
    )
    .await;
    entry(
        pool,
        d,
        new,
        Some("sales"),
        Some(7),
        t0,
        Some(t0 + Duration::minutes(15)),
        Some(t0 + Duration::minutes(20)),
    )
    .await;
    entry(
        pool,
        d,
        work,
        Some("warehouse"),
        Some(8),
        t0 + Duration::minutes(20),
        Some(t0 + Duration::hours(2)),
        None,
    )
    .await;
    entry(
        pool,
        e,
        work,
        Some("warehouse"),
        None,
        Utc::now(),
        Some(Utc::now() + Duration::hours(2)),
        None,
    )
    .await;
    entry(pool, b, "Готов к отгрузке", None, Some(9), t0, None, None).await;
}

#[tokio::test]
async fn the_figures_equal_the_hand_computed_ones() {
    let db = fresh_db().await;
    let t0 = Utc::now() - Duration::days(3);
    seed(&db.pool, t0).await;
    let now = Utc::now();
    let kpis = orderbridge::sla::kpi::compute(&db.pool, t0 - Duration::hours(1), now, None, now)
        .await
        .unwrap();
    let all = &kpis.orders[0];
    assert_eq!(
        (all.marketplace.as_deref(), all.shop.as_deref()),
        (None, None)
    );
    assert_eq!(all.orders, 5);
    // Confirmed: A at 10 min, B at 20 (it skipped «accepted»), D at 30.
    assert_eq!(all.confirmed, 3);
    assert_eq!(all.confirmation_p50_s, Some(1200.0));
    assert_eq!(all.confirmation_p90_s, Some(1680.0), "1200 + 0.8 × 600");
    // Completed: B after 20 h, A after 30 h.
    assert_eq!(all.completed, 2);
    assert_eq!(all.full_cycle_p50_s, Some(25.0 * 3600.0));
    assert_eq!(all.full_cycle_p90_s, Some(72_000.0 + 0.9 * 36_000.0));
    assert_eq!(all.cancelled, 2);
    assert_eq!((all.with_lead, all.lead_lag_p50_s), (2, Some(3.0)));
    let s1 = kpis
        .orders
        .iter()
        .find(|o| o.shop.as_deref() == Some("s1"))
        .unwrap();
    let s2 = kpis
        .orders
        .iter()
        .find(|o| o.shop.as_deref() == Some("s2"))
        .unwrap();
    assert_eq!((s1.orders, s2.orders, s2.confirmed), (4, 1, 0));
    // SLA: «Новая заявка» 1 in time, 1 late; «В работе» 1 past its deadline
    // (the other is not due yet); overall 1 of 3.
    let stage = |name: Option<&str>| {
        kpis.sla
            .iter()
            .find(|s| s.stage.as_deref() == name)
            .unwrap()
    };
    assert_eq!((stage(None).within, stage(None).breached), (1, 2));
    assert_eq!(
        (
            stage(Some("Новая заявка")).within,
            stage(Some("Новая заявка")).breached
        ),
        (1, 1)
    );
    assert_eq!(
        (
            stage(Some("В работе / Сборка")).within,
            stage(Some("В работе / Сборка")).breached
        ),
        (0, 1)
    );
    assert!(
        kpis.sla
            .iter()
            .all(|s| s.stage.as_deref() != Some("Готов к отгрузке")),
        "no SLA, not judged"
    );
    let tile = |name: &str| kpis.tiles.iter().find(|t| t.name == name).unwrap();
    assert_eq!(tile("confirmation_p50").value, Some(20.0));
    assert_eq!(
        tile("confirmation_p50").standing,
        orderbridge::sla::kpi::Standing::Amber
    );
    let compliance = tile("sla_compliance").value.unwrap();
    assert!((compliance - 100.0 / 3.0).abs() < 1e-9, "{compliance}");
    assert_eq!(tile("full_cycle_p50").value, Some(25.0));
    assert_eq!(
        tile("full_cycle_p50").standing,
        orderbridge::sla::kpi::Standing::Green
    );
    assert_eq!(tile("cancellation_rate").value, Some(40.0));
    assert_eq!(
        tile("cancellation_rate").standing,
        orderbridge::sla::kpi::Standing::Red
    );
    let reasons: Vec<(Option<String>, i64)> = kpis
        .cancellations
        .iter()
        .map(|c| (c.reason.clone(), c.orders))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (Some("BUYER_CANCELLATION_BY_MERCHANT".into()), 1),
            (Some("OUT_OF_STOCK".into()), 1)
        ]
    );
    assert_eq!(kpis.health.unassigned_now, 1);
    // One shop.
    let s2_only =
        orderbridge::sla::kpi::compute(&db.pool, t0 - Duration::hours(1), now, Some("s2"), now)
            .await
            .unwrap();
    assert_eq!(s2_only.orders[0].orders, 1);
    assert_eq!(s2_only.health.unassigned_now, 1);
    println!("{}", orderbridge::sla::kpi::render(&kpis));
    // The same figures as Prometheus gauges with low-cardinality labels.
    let handle = orderbridge::telemetry::metrics().unwrap();
    orderbridge::sla::kpi::publish(&kpis);
    let text = handle.render();
    for line in [
        r#"orderbridge_kpi_confirmation_p50_seconds{marketplace="all",shop="all"} 1200"#,
        r#"orderbridge_kpi_cancellation_ratio{marketplace="kaspi",shop="s1"} 0.5"#,
        r#"orderbridge_kpi_sla_compliance_ratio{stage="Новая заявка"} 0.5"#,
        "orderbridge_kpi_unassigned_orders 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    db.drop_now().await.unwrap();
}

async fn serve(pool: PgPool, dashboard: DashboardAccess) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState {
        pool,
        metrics: orderbridge::telemetry::metrics().unwrap(),
        amocrm_hooks: Default::default(),
        avito_hooks: Default::default(),
        partner_hooks: Default::default(),
        webhook_body_limit: 1 << 20,
        maps: None,
        inbox_wake: Arc::default(),
        dashboard: Dashboard {
            access: dashboard,
            crm_urls: Arc::new(
                [("main".to_string(), "https://example.amocrm.ru".to_string())].into(),
            ),
        },
    };
    tokio::spawn(orderbridge::http::serve(
        listener,
        state,
        tokio_util::sync::CancellationToken::new(),
    ));
    url
}

#[tokio::test]
async fn the_json_api_gives_the_commands_figures_and_a_public_address_needs_a_token() {
    let db = fresh_db().await;
    let t0 = Utc::now() - Duration::days(3);
    seed(&db.pool, t0).await;
    let (from, to) = (
        (t0 - Duration::hours(1)).to_rfc3339(),
        Utc::now().to_rfc3339(),
    );
    let url = serve(db.pool.clone(), DashboardAccess::Loopback).await;
    let api: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/api/kpi"))
        .query(&[("from", from.as_str()), ("to", to.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let settings = orderbridge::config::Settings::load_from(
        None,
        vec![(
            "DATABASE_URL".to_string(),
            format!("{}/{}", admin_url().rsplit_once('/').unwrap().0, db.name),
        )],
    )
    .unwrap();
    let cli = serde_json::to_value(
        orderbridge::cli::kpi(&settings, Some(&from), Some(&to), None)
            .await
            .unwrap(),
    )
    .unwrap();
    for part in ["from", "to", "tiles", "orders", "sla", "cancellations"] {
        assert_eq!(api[part], cli[part], "{part}");
    }
    assert_eq!(api["orders"][0]["orders"], 5);

    // A public address: refused without a token, bearer or basic with one.
    let refused = serve(
        db.pool.clone(),
        DashboardAccess::for_listen("0.0.0.0:8080".parse().unwrap(), None),
    )
    .await;
    assert_eq!(
        reqwest::get(format!("{refused}/api/kpi"))
            .await
            .unwrap()
            .status(),
        403
    );
    let token = DashboardAccess::for_listen(
        "0.0.0.0:8080".parse().unwrap(),
        Some(SecretString::from("s3cret-token")),
    );
    let guarded = serve(db.pool.clone(), token).await;
    let client = reqwest::Client::new();
    let status =
        |r: reqwest::RequestBuilder| async move { r.send().await.unwrap().status().as_u16() };
    assert_eq!(status(client.get(format!("{guarded}/api/kpi"))).await, 401);
    assert_eq!(
        status(
            client
                .get(format!("{guarded}/api/kpi"))
                .bearer_auth("wrong")
        )
        .await,
        401
    );
    assert_eq!(
        status(
            client
                .get(format!("{guarded}/api/kpi"))
                .bearer_auth("s3cret-token")
        )
        .await,
        200
    );
    assert_eq!(
        status(
            client
                .get(format!("{guarded}/api/kpi"))
                .basic_auth("ops", Some("s3cret-token"))
        )
        .await,
        200
    );
    assert_eq!(
        status(
            client
                .get(format!("{guarded}/api/kpi?from=soon"))
                .bearer_auth("s3cret-token")
        )
        .await,
        400
    );
    db.drop_now().await.unwrap();
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_daemon_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("deploy/grafana/orderbridge.json").unwrap())
            .unwrap();
    let mut sources = String::new();
    let mut dirs = vec![std::path::PathBuf::from("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("orderbridge_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    sources.contains(&format!("\"{name}\"")),
                    "{name} is not exported"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "{checked}");
}

/// Debian's Chromium, headless (installed by scripts/test.sh when missing).
fn chromium() -> Option<std::path::PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

/// Runs headless Chromium on `url` at `width` px: the DOM after load, and a
/// screenshot at `shot`.
fn browse(chromium: &std::path::Path, url: &str, width: u32, shot: &std::path::Path) -> String {
    let profile =
        std::env::temp_dir().join(format!("orderbridge-chromium-{}", uuid::Uuid::new_v4()));
    let base = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ];
    let run = |extra: Vec<String>| {
        let output = std::process::Command::new(chromium)
            .args(base)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={width},1400"))
            .arg("--virtual-time-budget=10000")
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    run(vec![format!("--screenshot={}", shot.display())]);
    let dom = run(vec!["--dump-dom".into()]);
    let _ = std::fs::remove_dir_all(&profile);
    dom
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_kpis_in_a_real_browser_and_fits_a_phone() {
    let db = fresh_db().await;
    seed(&db.pool, Utc::now() - Duration::hours(20)).await;
    let url = serve(db.pool.clone(), DashboardAccess::Loopback).await;
    let page = reqwest::get(format!("{url}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("data-kpi=\"confirmation_p50\""), "{page}");
    let part = reqwest::get(format!("{url}/?part=main"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !part.contains("<html") && part.contains("data-kpi"),
        "the refresh fetches <main> only"
    );
    let Some(chromium) = chromium() else {
        println!("SKIPPED the browser part: no Chromium (scripts/test.sh installs Debian's chromium when it can)");
        db.drop_now().await.unwrap();
        return;
    };
    let artifacts = std::path::Path::new("target/test-artifacts");
    std::fs::create_dir_all(artifacts).unwrap();
    let page_url = format!("{url}/");
    let (c, u) = (chromium.clone(), page_url.clone());
    let desktop = tokio::task::spawn_blocking(move || {
        browse(
            &c,
            &u,
            1280,
            std::path::Path::new("target/test-artifacts/dashboard-desktop.png"),
        )
    })
    .await
    .unwrap();
    // Headless Chromium's window is at least 500 px wide: a phone is a
    // 390 px frame around the page, which reports its layout to the frame's host.
    let frame =
        std::env::temp_dir().join(format!("orderbridge-phone-{}.html", uuid::Uuid::new_v4()));
    std::fs::write(
        &frame,
        format!(
            r#"<!doctype html><body style="margin:0"><iframe src="{page_url}" style="width:390px;height:1400px;border:0"></iframe>
<pre id="layout"></pre><script>addEventListener('message', e => {{ if (e.data.orderbridgeLayout && e.data.orderbridgeLayout.viewportWidth > 0) document.getElementById('layout').textContent = JSON.stringify(e.data); }});</script></body>"#
        ),
    )
    .unwrap();
    // The frame loads in real time; a dump taken before its load has no
    // report yet (an empty <pre>: the host's own script names the message,
    // so only the filled element counts): try again (a few times at most;
    // a fresh machine's first Chromium runs are slow).
    let mut phone_frame = String::new();
    for attempt in 0..10 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let (c, u) = (chromium.clone(), format!("file://{}", frame.display()));
        phone_frame = tokio::task::spawn_blocking(move || {
            browse(
                &c,
                &u,
                500,
                std::path::Path::new("target/test-artifacts/dashboard-phone.png"),
            )
        })
        .await
        .unwrap();
        if phone_frame.contains("<pre id=\"layout\">{") {
            break;
        }
    }
    let _ = std::fs::remove_file(&frame);
    let start = phone_frame
        .find("<pre id=\"layout\">")
        .expect("the frame host's report")
        + "<pre id=\"layout\">".len();
    let report = phone_frame[start..]
        .split("</pre>")
        .next()
        .unwrap()
        .replace("&quot;", "\"");
    let layout: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("the framed page reported no layout ({e}): {report:?}"));
    let (scroll, viewport) = (
        layout["orderbridgeLayout"]["scrollWidth"].as_u64().unwrap(),
        layout["orderbridgeLayout"]["viewportWidth"]
            .as_u64()
            .unwrap(),
    );
    println!("phone: viewport {viewport} px, content {scroll} px");
    assert_eq!(viewport, 390);
    assert!(
        scroll <= viewport,
        "the phone layout scrolls sideways: {scroll} > {viewport}"
    );
    for dom in [&desktop] {
        // The visible figures of the seeded day: confirmation 20 min, one SLA of three kept, 40 % cancelled.
        for value in [
            "20.0 min",
            "33.3 %",
            "40.0 %",
            "В работе / Сборка",
            "overdue by",
        ] {
            assert!(dom.contains(value), "no {value} in the rendered page");
        }
    }
    for shot in ["dashboard-desktop.png", "dashboard-phone.png"] {
        let size = std::fs::metadata(artifacts.join(shot)).unwrap().len();
        assert!(size > 5_000, "{shot}: {size} bytes");
    }
    db.drop_now().await.unwrap();
}
