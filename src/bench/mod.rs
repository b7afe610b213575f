//! `orderbridge bench …`: performance figures printed one per line as
//! `key: value`. Benchmarks run against the configured PostgreSQL in scratch
//! databases that are dropped afterwards.

pub mod amocrm;
pub mod avito;
pub mod kaspi;
pub mod kpi;
pub mod outbox;
pub mod partner;
pub mod pipeline;
pub mod reconcile;

use std::io::Write;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;

use crate::store::ScratchDatabase;

/// What a benchmark of the daemon as deployed can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

pub(crate) fn failed(what: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(what.to_string())
}

/// Runs a benchmark in a scratch database on the configured server (dropped
/// afterwards, also when the benchmark fails) and prints its figures.
pub(crate) async fn in_scratch_database(
    settings: &crate::config::Settings,
    out: &mut impl Write,
    measure: impl AsyncFnOnce(&str, &ScratchDatabase) -> Result<Vec<(&'static str, String)>, BenchError>,
) -> Result<(), BenchError> {
    let admin = settings.database.url.expose_secret().to_string();
    crate::store::create_database_if_missing(&admin).await?;
    let db = ScratchDatabase::create(&admin, "orderbridge_bench", 16).await?;
    let result = measure(&admin, &db).await;
    db.drop_now().await?;
    for (key, value) in result? {
        writeln!(out, "{key}: {value}")?;
    }
    Ok(())
}

/// The configuration text of a daemon with one amoCRM account (`main`, long-
/// lived token) and one Kaspi shop on the shipped map, against the
/// simulators, listening on `port` (also its public URL, so it subscribes
/// its webhook): shared by `bench pipeline` and the proof suites.
pub(crate) struct KaspiAmoDaemon<'a> {
    pub amo: &'a crate::sim::amocrm::AmoSim,
    pub kaspi: &'a crate::sim::kaspi::KaspiSim,
    pub port: u16,
    pub shop: &'a str,
    pub hook_secret: &'a str,
    pub amo_token: &'a str,
    pub kaspi_token: &'a str,
    pub poll: Duration,
    pub events_poll: Duration,
}

impl KaspiAmoDaemon<'_> {
    pub(crate) fn config_text(&self) -> String {
        format!(
            r#"
[http]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
[crm_accounts.main]
base_url = "{amo}"
subdomain = "example"
account_id = 31361463
webhook_secret = "{hook_secret}"
events_poll_interval = "{events}s"
[crm_accounts.main.auth]
mode = "long_lived"
token = "{amo_token}"
[shops.{shop}]
marketplace = "kaspi"
crm_account = "main"
map = "config/maps/kaspi.toml"
base_url = "{kaspi}"
poll_interval = "{poll}s"
token = "{kaspi_token}"
"#,
            port = self.port,
            amo = self.amo.base_url(),
            kaspi = self.kaspi.base_url(),
            hook_secret = self.hook_secret,
            amo_token = self.amo_token,
            kaspi_token = self.kaspi_token,
            shop = self.shop,
            poll = self.poll.as_secs(),
            events = self.events_poll.as_secs(),
        )
    }
}

/// Writes a benchmark daemon's configuration (`[database]` pointing at
/// `database` on the server of `admin`, then `text`), checked by loading it;
/// its path.
pub(crate) fn config_file(
    tag: &str,
    admin: &str,
    database: &str,
    text: &str,
) -> Result<std::path::PathBuf, BenchError> {
    let mut url = reqwest::Url::parse(admin).map_err(failed)?;
    url.set_path(&format!("/{database}"));
    let path = std::env::temp_dir().join(format!(
        "orderbridge-bench-{tag}-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &path,
        format!("[database]\nurl = \"{url}\"\nmax_connections = 16\n{text}"),
    )?;
    crate::config::Settings::load_from(Some(&path), Vec::<(String, String)>::new())
        .map_err(failed)?;
    Ok(path)
}

/// Polls `done` every 100 ms until it holds, or fails after `limit`.
pub(crate) async fn wait_until<F, Fut>(
    what: &str,
    limit: Duration,
    mut done: F,
) -> Result<(), BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        if started.elapsed() > limit {
            return Err(failed(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The daemon as deployed: `orderbridge --config FILE run` as a child process
/// (the running executable), its logs at `error` to this process's stderr;
/// stopped (SIGTERM, then killed) when dropped.
pub(crate) struct DaemonProcess {
    child: std::process::Child,
}

impl DaemonProcess {
    /// Starts it with `env` set on top of this process's environment.
    pub(crate) fn start(
        config: &std::path::Path,
        env: &[(&str, String)],
    ) -> Result<DaemonProcess, BenchError> {
        DaemonProcess::start_wrapped(config, env, &[])
    }

    /// Starts it through `wrapper` (a program and its arguments that ends by
    /// exec-ing the command appended to it, e.g. one confining the process),
    /// so the child's pid is the daemon's.
    pub(crate) fn start_wrapped(
        config: &std::path::Path,
        env: &[(&str, String)],
        wrapper: &[String],
    ) -> Result<DaemonProcess, BenchError> {
        let exe = std::env::current_exe()?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = std::process::Command::new(program);
                command.args(args).arg(exe);
                command
            }
            None => std::process::Command::new(exe),
        };
        command
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "error")
            .env_remove("DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        Ok(DaemonProcess {
            child: command.spawn()?,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the daemon exited.
    pub(crate) fn check(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait()? {
            Some(status) => Err(failed(format!("the daemon exited: {status}"))),
            None => Ok(()),
        }
    }

    /// SIGKILL: no shutdown, no cleanup, as a crash or the OOM killer.
    pub(crate) fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub(crate) fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill_now();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A file removed when this goes out of scope (a daemon's configuration).
pub(crate) struct RemoveOnDrop(pub std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The `i`-th generated Kaspi order of a benchmark or proof: every
/// `repeat_every`-th from a repeat customer (a pool of `pool` phones), the
/// others from new ones; codes from `code_base` on.
pub(crate) fn generated_order(
    i: usize,
    created_ms: i64,
    repeat_every: usize,
    pool: usize,
    code_base: usize,
) -> crate::sim::kaspi::SimOrderSpec {
    let phone = if i % repeat_every == repeat_every - 1 {
        format!("707{:07}", i % pool)
    } else {
        format!("70{:08}", 10_000_000 + code_base / 100 + i)
    };
    crate::sim::kaspi::SimOrderSpec {
        customer_phone: phone,
        customer_name: format!("Покупатель {i}"),
        ..crate::sim::kaspi::SimOrderSpec::new(&format!("{}", code_base + i), created_ms)
    }
}
