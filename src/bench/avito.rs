//! `orderbridge bench avito`: 1,000 transitions queued at once against the
//! simulator's `applyTransition` limit. At Avito's real 100/min that would take
//! 10 minutes, so the limit is scaled (default 600/min, the same in the
//! simulator and the client). Prints `achieved_to_allowed` (achieved rate /
//! allowed rate), `requests` and `http_429`.

use std::io::Write;
use std::time::{Duration, Instant};

use chrono::Utc;
use secrecy::SecretString;

use crate::config::AvitoLimits;
use crate::connectors::avito::{AvitoAccount, AvitoClient, AvitoError, AvitoLimiters};
use crate::outbox::limits::Limiters;
use crate::sim::avito::{AvitoSim, AvitoSimConfig, SimAvitoOrderSpec};

#[derive(Debug, Clone, clap::Args)]
pub struct AvitoBenchArgs {
    /// Transitions to apply.
    #[arg(long, default_value_t = 1_000)]
    pub transitions: usize,
    /// The scaled `applyTransition` limit (per minute), in the simulator and the client.
    #[arg(long, default_value_t = 600)]
    pub per_minute: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AvitoBenchError {
    #[error(transparent)]
    Avito(#[from] AvitoError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

pub async fn run(args: &AvitoBenchArgs, out: &mut impl Write) -> Result<(), AvitoBenchError> {
    let per_minute = args.per_minute.max(1);
    let config = AvitoSimConfig {
        transitions_per_minute: per_minute,
        orders_per_minute: 1_000_000,
        global_per_second: 100_000,
        ..AvitoSimConfig::default()
    };
    let sim = AvitoSim::start(config.clone()).await?;
    let ids: Vec<String> = (0..args.transitions).map(|i| format!("5{i:016}")).collect();
    for id in &ids {
        sim.create_order(SimAvitoOrderSpec::new(id, Utc::now()));
    }
    let limits = AvitoLimits {
        orders_per_minute: 1_000_000,
        transitions_per_minute: per_minute,
        tracking_per_minute: 100,
        global_per_second: 100_000,
    };
    let mut registry = Limiters::new([]);
    for (key, quota) in limits.quotas("bench") {
        registry = registry.with_per_request(key, quota);
    }
    let client = AvitoClient::new(
        AvitoAccount {
            name: "bench".into(),
            base_url: sim.base_url(),
            client_id: config.client_id.clone(),
            client_secret: SecretString::from(config.client_secret.clone()),
            timeout: Duration::from_secs(30),
        },
        AvitoLimiters::from_registry(&registry, "bench"),
    )?;
    // Warm the token so the measurement is the transitions alone.
    client.webhook_subscriptions().await?;
    let before = sim.requests().len();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let client = client.clone();
        tasks.spawn(async move { client.apply_transition(&id, "confirm").await });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(_)) => done += 1,
            Ok(Err(error)) => return Err(error.into()),
            Err(error) => return Err(AvitoBenchError::Failed(error.to_string())),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let confirmed = ids
        .iter()
        .filter(|id| sim.order(id).is_some_and(|o| o.status == "ready_to_ship"))
        .count();
    if done != ids.len() || confirmed != ids.len() {
        return Err(AvitoBenchError::Failed(format!(
            "{done} transitions reported, {confirmed} orders confirmed, of {}",
            ids.len()
        )));
    }
    let allowed = f64::from(per_minute) / 60.0;
    let achieved = ids.len() as f64 / elapsed;
    writeln!(out, "achieved_to_allowed: {:.3}", achieved / allowed)?;
    writeln!(out, "requests: {}", sim.requests().len() - before)?;
    writeln!(out, "http_429: {}", sim.count_status(429))?;
    Ok(())
}
