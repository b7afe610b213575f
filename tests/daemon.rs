//! The binary as operators use it: `run` (database created and migrated,
//! health, readiness and metrics served, SIGTERM exits 0), `run --no-migrate`
//! on a behind schema, `check-config` on a bad file, and `dlq`.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use orderbridge::store::outbox as store;

const BIN: &str = env!("CARGO_BIN_EXE_orderbridge");

/// A database URL on the test server naming a database that does not exist yet.
fn new_database_url() -> (String, String) {
    let name = format!("ob_test_{}", uuid::Uuid::new_v4().simple());
    let mut url = reqwest::Url::parse(&admin_url()).unwrap();
    url.set_path(&format!("/{name}"));
    (url.to_string(), name)
}

async fn drop_database(name: &str) {
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn orderbridge(args: &[&str], database_url: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env("DATABASE_URL", database_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_creates_the_database_serves_health_and_stops_on_sigterm() {
    let (url, name) = new_database_url();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut daemon = Daemon(
        orderbridge(&["run"], &url)
            .env("ORDERBRIDGE__HTTP__LISTEN", &listen)
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let base = format!("http://{listen}");
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "daemon did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "ok");
    // The heartbeat sets its gauges on its first beat.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("orderbridge_outbox_targets_held"),
        "{metrics}"
    );
    assert!(
        metrics.contains("orderbridge_outbox_jobs{state=\"dead\"} 0"),
        "{metrics}"
    );

    // The database was created and migrated.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox_jobs").await, 0);
    pool.close().await;

    let pid = daemon.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    use std::io::Read;
    daemon
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    for line in logs.lines() {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "log line is not JSON: {line}");
    }
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(!logs.contains(&url), "the database URL must not be logged");
    drop_database(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_no_migrate_refuses_a_schema_that_is_behind() {
    let (url, name) = new_database_url();
    let output = orderbridge(&["run", "--no-migrate"], &url)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output).contains("schema is behind"),
        "{}",
        text(&output)
    );

    let output = orderbridge(&["migrate"], &url).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    drop_database(&name).await;
}

#[test]
fn an_invalid_config_file_stops_everything_with_exit_code_2() {
    let dir = std::env::temp_dir().join(format!("orderbridge-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[shops.k]\nmarketplace = \"kaspi\"\ncrm_account = \"main\"\nmap = \"m.toml\"\nbase_url = \"https://kaspi.kz/shop/api/v2\"\n",
    )
    .unwrap();
    let output = orderbridge(
        &["--config", file.to_str().unwrap(), "check-config"],
        "postgres://127.0.0.1:1/none",
    )
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let said = text(&output);
    assert!(said.contains("`shops.k.token`"), "{said}");
    assert!(said.contains("secret is missing"), "{said}");
    assert!(said.contains(&file.display().to_string()), "{said}");

    let output = orderbridge(&["check-config"], "postgres://127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_replays_and_discards_dead_jobs() {
    let db = fresh_db().await;
    let mut url = reqwest::Url::parse(&admin_url()).unwrap();
    url.set_path(&format!("/{}", db.name));
    let url = url.to_string();
    enqueue_all(
        &db.pool,
        &[
            job("push", "t", "order-1", serde_json::json!({})),
            job("push", "t", "order-2", serde_json::json!({})),
        ],
    )
    .await;
    sqlx::query(
        "UPDATE outbox_jobs SET state = 'dead', attempts = 3, last_error = '402 Payment Required'",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let output = orderbridge(&["dlq", "list"], &url).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let listed = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed.contains("402 Payment Required") && listed.contains("order-2"),
        "{listed}"
    );

    let output = orderbridge(&["dlq", "retry", "1"], &url).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        store::job(&db.pool, 1).await.unwrap().unwrap().state,
        "pending"
    );

    let output = orderbridge(&["dlq", "discard", "2"], &url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(store::job(&db.pool, 2).await.unwrap().is_none());

    let output = orderbridge(&["dlq", "discard", "2"], &url)
        .output()
        .unwrap();
    assert!(!output.status.success(), "discarding twice is an error");
    let output = orderbridge(&["dlq", "list"], &url).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("no dead-lettered jobs"));
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_unreachable_database() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    let listener = orderbridge::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(orderbridge::http::serve(
        listener,
        orderbridge::http::AppState {
            pool,
            metrics: orderbridge::telemetry::metrics().unwrap(),
            amocrm_hooks: Default::default(),
            webhook_body_limit: 1024,
            avito_hooks: Default::default(),
            partner_hooks: Default::default(),
            maps: None,
            inbox_wake: Default::default(),
            dashboard: Default::default(),
        },
        shutdown.clone(),
    ));
    let response = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["ready"], false);
    assert!(body["checks"]["database"]
        .as_str()
        .unwrap()
        .starts_with("unreachable"));
    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "alive even when not ready");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_polls_a_kaspi_shop_and_queues_crm_intents() {
    use orderbridge::sim::kaspi::{KaspiSim, KaspiSimConfig, SimOrderSpec};
    let sim = KaspiSim::start(KaspiSimConfig::default()).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    sim.create_order(SimOrderSpec::new("900001", now - 3_600_000));
    sim.create_order(SimOrderSpec::new("900002", now - 7_200_000));
    let (url, name) = new_database_url();
    let dir = std::env::temp_dir().join(format!("orderbridge-run-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("orderbridge.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[http]
listen = "127.0.0.1:{port}"

[crm_accounts.main]
base_url = "http://127.0.0.1:9"
[crm_accounts.main.auth]
mode = "long_lived"
token = "unused-in-this-test"

[shops.kaspi_main]
marketplace = "kaspi"
crm_account = "main"
map = "config/maps/kaspi.toml"
base_url = "{base}"
poll_interval = "1s"
token = "kaspi-test-token"
"#,
            port = free_port(),
            base = sim.base_url()
        ),
    )
    .unwrap();
    let _daemon = Daemon(
        orderbridge(&["--config", file.to_str().unwrap(), "run"], &url)
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let pool = loop {
        if let Ok(pool) = sqlx::PgPool::connect(&url).await {
            if sqlx::query("SELECT 1 FROM orders LIMIT 1")
                .execute(&pool)
                .await
                .is_ok()
            {
                break pool;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "daemon did not migrate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    wait_for("both orders ingested", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM orders").await == 2
    })
    .await;
    // The CRM does not answer, so the maps are unresolved: the intents wait with
    // that reason (pending, not dead), and nothing is written.
    wait_for("two waiting intents", Duration::from_secs(10), || async {
        count(&pool, "SELECT count(*) FROM outbox_jobs WHERE state = 'pending' AND kind = 'crm_sync_order' AND target = 'amocrm:main' AND starts_with(last_error, 'maps unresolved')").await == 2
    })
    .await;
    pool.close().await;
    drop(_daemon);
    drop_database(&name).await;
}

#[test]
fn check_config_refuses_a_map_with_a_typo_naming_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("orderbridge-map-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = std::fs::read_to_string("config/maps/kaspi.toml").unwrap();
    let map = dir.join("kaspi.toml");
    std::fs::write(
        &map,
        shipped.replacen("sla = \"2h\"", "sla = \"two hours\"", 1),
    )
    .unwrap();
    let line = shipped
        .lines()
        .position(|l| l.contains("sla = \"2h\""))
        .unwrap()
        + 1;
    let file = dir.join("orderbridge.toml");
    std::fs::write(
        &file,
        format!(
            "[crm_accounts.main]\nbase_url = \"https://example.amocrm.ru\"\nauth = {{ mode = \"long_lived\", token = \"t\" }}\n\
             [shops.k]\nmarketplace = \"kaspi\"\ncrm_account = \"main\"\nmap = \"{}\"\nbase_url = \"https://kaspi.kz/shop/api/v2\"\ntoken = \"x\"\n",
            map.display()
        ),
    )
    .unwrap();
    let output = orderbridge(
        &["--config", file.to_str().unwrap(), "check-config"],
        "postgres://127.0.0.1:1/none",
    )
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let said = text(&output);
    let expected = format!(
        "{}:{line}: `statuses.accepted.sla`: `two hours` is not a duration",
        map.display()
    );
    assert!(said.contains(&expected), "{said}");
    // The shipped map is fine.
    std::fs::write(&map, shipped).unwrap();
    let output = orderbridge(
        &["--config", file.to_str().unwrap(), "check-config"],
        "postgres://127.0.0.1:1/none",
    )
    .output()
    .unwrap();
    assert!(output.status.success(), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_and_restart_in_flight_jobs_run_again_within_fifteen_seconds() {
    use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig};
    use orderbridge::sim::kaspi::{KaspiSim, KaspiSimConfig, SimOrderSpec};
    let kaspi = KaspiSim::start(KaspiSimConfig::default()).await.unwrap();
    let amo = AmoSim::start(AmoSimConfig {
        long_lived_token: Some("kill-test-token".into()),
        ..AmoSimConfig::default()
    })
    .await
    .unwrap();
    seed_crm_from_map(&amo, std::path::Path::new("config/maps/kaspi.toml"), None);
    let (url, name) = new_database_url();
    let dir = std::env::temp_dir().join(format!("orderbridge-kill-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("orderbridge.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[http]
listen = "127.0.0.1:{port}"

[crm_accounts.main]
base_url = "{amo}"
events_poll_interval = "1s"
[crm_accounts.main.auth]
mode = "long_lived"
token = "kill-test-token"

[shops.kaspi_main]
marketplace = "kaspi"
crm_account = "main"
map = "config/maps/kaspi.toml"
base_url = "{kaspi}"
poll_interval = "1s"
token = "kaspi-test-token"
"#,
            port = free_port(),
            amo = amo.base_url(),
            kaspi = kaspi.base_url()
        ),
    )
    .unwrap();
    let run = || orderbridge(&["--config", file.to_str().unwrap(), "run"], &url);
    let mut first = Daemon(run().spawn().unwrap());
    let started = Instant::now();
    let pool = loop {
        if let Ok(pool) = sqlx::PgPool::connect(&url).await {
            if sqlx::query("SELECT 1 FROM crm_pushes LIMIT 1")
                .execute(&pool)
                .await
                .is_ok()
            {
                break pool;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "daemon did not migrate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let order = kaspi.create_order(SimOrderSpec::new(
        "910001",
        chrono::Utc::now().timestamp_millis() - 60_000,
    ));
    wait_for("the lead exists", Duration::from_secs(30), || async {
        amo.leads().len() == 1 && count(&pool, "SELECT count(*) FROM crm_links").await == 1
    })
    .await;
    let lead = amo.leads().remove(0);
    let manager = amo.seed_user("Менеджер");
    let working = amo
        .pipelines()
        .into_iter()
        .flat_map(|p| p.stages)
        .find(|(_, name)| name == "В работе / Сборка")
        .unwrap()
        .0;
    // Kaspi turns slow: the accept is in flight when the daemon is killed.
    kaspi.set_latency(Duration::from_secs(25));
    amo.manager_moves_lead(lead.id, lead.pipeline_id, working, manager);
    wait_for("the accept is in flight", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM outbox_jobs WHERE state = 'running' AND kind = 'marketplace_action'").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.0.kill().unwrap();
    let _ = first.0.wait();
    kaspi.set_latency(Duration::ZERO);
    let _second = Daemon(run().spawn().unwrap());
    let restarted = Instant::now();
    wait_for("the accept ran again", Duration::from_secs(30), || async {
        kaspi.order(&order.id).unwrap().status == "ACCEPTED_BY_MERCHANT"
    })
    .await;
    let resumed = restarted.elapsed();
    println!("resume_after_sigkill_ms: {}", resumed.as_millis());
    assert!(
        resumed < Duration::from_secs(15),
        "resumed after {resumed:?}"
    );
    wait_for("the queue drained", Duration::from_secs(20), || async {
        count(&pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    let accepts = kaspi
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.status == 200)
        .count();
    assert_eq!(accepts, 1, "accepted once");
    pool.close().await;
    drop(_second);
    drop_database(&name).await;
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so read after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}

/// Whether the process is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn prove_databases() -> Vec<String> {
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    let names = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'orderbridge\\_prove\\_%'",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    admin.close().await;
    names
}

/// A proof suite stopped from outside (SIGTERM, or Ctrl-C) stops its daemon
/// children and drops its scratch database, as a finished run does; before,
/// both were left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_suite_stopped_by_sigterm_leaves_no_daemon_and_no_database_behind() {
    let before = prove_databases().await;
    let mut suite = Daemon(
        orderbridge(
            &["prove", "crash", "--kills", "50", "--rate", "2"],
            &admin_url(),
        )
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap(),
    );
    let pid = suite.0.id();
    let started = Instant::now();
    let daemons = loop {
        let daemons = children_of(pid);
        if !daemons.is_empty() {
            break daemons;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the suite started no daemon"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ours: Vec<String> = prove_databases()
        .await
        .into_iter()
        .filter(|name| !before.contains(name))
        .collect();
    assert_eq!(ours.len(), 1, "the suite's scratch database: {ours:?}");
    let mut daemons = daemons;
    daemons.extend(children_of(pid));
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = loop {
        if let Some(status) = suite.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !status.success(),
        "a stopped suite proves nothing: {status:?}"
    );
    let mut output = String::new();
    use std::io::Read;
    suite
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    assert!(output.contains("stopped by SIGTERM"), "{output}");
    for daemon in daemons {
        let waited = Instant::now();
        while !gone(daemon) {
            assert!(
                waited.elapsed() < Duration::from_secs(5),
                "daemon {daemon} still runs after its suite stopped"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        !prove_databases().await.contains(&ours[0]),
        "{} was left behind",
        ours[0]
    );
}
