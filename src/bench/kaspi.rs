//! `orderbridge bench kaspi`: the Kaspi poller against the simulator holding
//! 5,000 orders in the window with ~50 ms latency per request: a first poll
//! (all orders new) and a steady poll (nothing changed). Prints
//! `first_poll_s`, `first_poll_requests`, `steady_poll_s`,
//! `steady_poll_requests` and `cpu_s` (CPU time of the polling thread only:
//! the simulator runs on a thread of its own, PostgreSQL in its own process).

use std::io::Write;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use crate::config::Settings;
use crate::connectors::kaspi::{KaspiClient, KaspiShop};
use crate::sim::kaspi::{KaspiSim, KaspiSimConfig, SimOrderSpec};
use crate::store::ScratchDatabase;
use crate::sync::kaspi_poll::KaspiPoller;

#[derive(Debug, Clone, clap::Args)]
pub struct KaspiBenchArgs {
    /// Orders in the window.
    #[arg(long, default_value_t = 5_000)]
    pub orders: usize,
    /// Simulated latency per request (ms).
    #[arg(long, default_value_t = 50)]
    pub latency_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KaspiBenchError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Poll(#[from] crate::sync::kaspi_poll::PollError),
    #[error(transparent)]
    Kaspi(#[from] crate::connectors::kaspi::KaspiError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

struct Figures {
    first_s: f64,
    first_requests: usize,
    steady_s: f64,
    steady_requests: usize,
    cpu_s: f64,
}

/// Runs the benchmark on threads of its own and prints its figures.
pub fn run(
    settings: &Settings,
    args: &KaspiBenchArgs,
    out: &mut impl Write,
) -> Result<(), KaspiBenchError> {
    let url = settings.database.url.expose_secret().to_string();
    let args = args.clone();
    // The simulator: its own thread and runtime, so its CPU is not counted.
    let (sim_tx, sim_rx) = std::sync::mpsc::channel::<KaspiSim>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let orders = args.orders;
    let latency = Duration::from_millis(args.latency_ms);
    let sim_thread = std::thread::spawn(move || -> Result<(), KaspiBenchError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let sim = KaspiSim::start(KaspiSimConfig::default()).await?;
            let now = chrono::Utc::now().timestamp_millis();
            for i in 0..orders {
                // Spread over the last 13 days.
                let created = now - 13 * 24 * 3600 * 1000
                    + (i as i64) * (13 * 24 * 3600 * 1000 / orders.max(1) as i64);
                sim.create_order(SimOrderSpec::new(&format!("{}", 100_000_000 + i), created));
            }
            sim.set_latency(latency);
            sim_tx
                .send(sim)
                .map_err(|_| KaspiBenchError::Failed("the poll thread went away".into()))?;
            let _ = stop_rx.await;
            Ok(())
        })
    });
    let sim = sim_rx
        .recv()
        .map_err(|_| KaspiBenchError::Failed("the simulator did not start".into()))?;
    let poll_thread = std::thread::spawn(move || -> Result<Figures, KaspiBenchError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(measure(&url, sim))
    });
    let figures = poll_thread
        .join()
        .map_err(|_| KaspiBenchError::Failed("the poll thread panicked".into()))??;
    let _ = stop_tx.send(());
    let _ = sim_thread.join();
    writeln!(out, "first_poll_s: {:.2}", figures.first_s)?;
    writeln!(out, "first_poll_requests: {}", figures.first_requests)?;
    writeln!(out, "steady_poll_s: {:.2}", figures.steady_s)?;
    writeln!(out, "steady_poll_requests: {}", figures.steady_requests)?;
    writeln!(out, "cpu_s: {:.2}", figures.cpu_s)?;
    Ok(())
}

async fn measure(url: &str, sim: KaspiSim) -> Result<Figures, KaspiBenchError> {
    crate::store::create_database_if_missing(url).await?;
    let db = ScratchDatabase::create(url, "orderbridge_bench", 12).await?;
    let result = polls(&db, &sim).await;
    db.drop_now().await?;
    result
}

async fn polls(db: &ScratchDatabase, sim: &KaspiSim) -> Result<Figures, KaspiBenchError> {
    let client = KaspiClient::new(
        KaspiShop {
            name: "bench".into(),
            base_url: sim.base_url(),
            token: SecretString::from(KaspiSimConfig::default().token),
            merchant_uid: None,
            timeout: Duration::from_secs(30),
        },
        None,
    )?;
    let poller = KaspiPoller::new(client, db.pool.clone(), "amocrm:bench");
    let cpu_start = thread_cpu_seconds();
    let before = sim.requests().len();
    let started = Instant::now();
    let first = poller.poll_once(chrono::Utc::now()).await?;
    let first_s = started.elapsed().as_secs_f64();
    let first_requests = sim.requests().len() - before;
    let before = sim.requests().len();
    let started = Instant::now();
    let steady = poller.poll_once(chrono::Utc::now()).await?;
    let steady_s = started.elapsed().as_secs_f64();
    let steady_requests = sim.requests().len() - before;
    let cpu_s = thread_cpu_seconds() - cpu_start;
    if first.new != first.listed
        || steady.unchanged != steady.listed
        || steady.listed != first.listed
    {
        return Err(KaspiBenchError::Failed(format!(
            "unexpected polls: first {first:?}, steady {steady:?}"
        )));
    }
    Ok(Figures {
        first_s,
        first_requests,
        steady_s,
        steady_requests,
        cpu_s,
    })
}

/// CPU time (user + system) of the calling thread, from `/proc/thread-self/stat`
/// (Linux; 0 elsewhere). Clock ticks are 100 per second on Linux.
fn thread_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
