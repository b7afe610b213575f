//! `orderbridge bench amocrm`: the amoCRM client against the simulator at the
//! real limit (7 req/s): 10,000 lead status updates in batches of 50.
//! Prints `elapsed_s`, `requests` and `http_429`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use crate::config::{RateQuota, Settings};
use crate::connectors::amocrm::{AmoAccount, AmoAuth, AmoClient, AmoError, LeadUpdate, NewLead};
use crate::outbox::limits::Limiters;
use crate::sim::amocrm::{AmoSim, AmoSimConfig};
use crate::store::ScratchDatabase;

#[derive(Debug, Clone, clap::Args)]
pub struct AmoBenchArgs {
    /// Lead status updates to apply.
    #[arg(long, default_value_t = 10_000)]
    pub updates: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AmoBenchError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error("cannot start the simulator: {0}")]
    Sim(#[from] std::io::Error),
    #[error("{0}")]
    Incomplete(String),
}

/// Runs the benchmark and prints its figures.
pub async fn run(
    settings: &Settings,
    args: &AmoBenchArgs,
    out: &mut impl Write,
) -> Result<(), AmoBenchError> {
    let url = settings.database.url.expose_secret();
    crate::store::create_database_if_missing(url).await?;
    let db = ScratchDatabase::create(url, "orderbridge_bench", 4).await?;
    let result = measure(&db, args.updates).await;
    db.drop_now().await?;
    let (elapsed, requests, too_many) = result?;
    writeln!(out, "elapsed_s: {elapsed:.2}")?;
    writeln!(out, "requests: {requests}")?;
    writeln!(out, "http_429: {too_many}")?;
    Ok(())
}

async fn measure(
    db: &ScratchDatabase,
    updates: usize,
) -> Result<(f64, usize, usize), AmoBenchError> {
    let config = AmoSimConfig::default();
    let sim = AmoSim::start(config.clone()).await?;
    let pipeline = sim.seed_pipeline("Kaspi", &["New order", "Assembling"]);
    let (new, assembling) = (pipeline.stages[1].0, pipeline.stages[2].0);
    let quota = RateQuota {
        requests: 7,
        per: Duration::from_secs(1),
        burst: 1,
    };
    let limiters = Arc::new(Limiters::new([]).with_per_request("amocrm:bench", quota));
    let base_url = reqwest::Url::parse(&sim.base_url())
        .map_err(|e| AmoBenchError::Incomplete(format!("simulator URL: {e}")))?;
    let client = AmoClient::new(
        AmoAccount {
            name: "bench".into(),
            base_url,
            auth: AmoAuth::OAuth {
                client_id: config.client_id.clone(),
                client_secret: SecretString::from(config.client_secret.clone()),
                redirect_uri: config.redirect_uri.clone(),
            },
            timeout: Duration::from_secs(20),
            circuit_cooldown: Duration::from_secs(600),
        },
        db.pool.clone(),
        limiters.limiter("amocrm:bench"),
    )?;
    client
        .seed_refresh_token(&SecretString::from(config.initial_refresh_token.clone()))
        .await?;
    // Setup (not measured): the leads to move.
    let leads: Vec<NewLead> = (0..updates)
        .map(|i| NewLead {
            request_id: format!("KSP-{i}"),
            name: format!("Order KSP-{i}"),
            price: Some(1000),
            pipeline_id: pipeline.id,
            status_id: new,
            responsible_user_id: None,
            fields: vec![],
            tags: vec![],
            contact_ids: vec![],
        })
        .collect();
    let created = client.create_leads(&leads).await?;
    if created.done.len() != updates {
        return Err(AmoBenchError::Incomplete(format!(
            "created {} of {updates} leads",
            created.done.len()
        )));
    }
    let before = sim.requests().len();
    let moves: Vec<LeadUpdate> = created
        .done
        .iter()
        .map(|(_, id)| LeadUpdate {
            id: *id,
            stage: Some((pipeline.id, assembling)),
            ..LeadUpdate::default()
        })
        .collect();
    let started = Instant::now();
    let outcome = client.update_leads(&moves).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if outcome.done.len() != updates {
        return Err(AmoBenchError::Incomplete(format!(
            "updated {} of {updates} leads",
            outcome.done.len()
        )));
    }
    let moved = sim
        .leads()
        .iter()
        .filter(|l| l.status_id == assembling)
        .count();
    if moved != updates {
        return Err(AmoBenchError::Incomplete(format!(
            "the simulator shows {moved} of {updates} leads moved"
        )));
    }
    Ok((
        elapsed,
        sim.requests().len() - before,
        sim.count_status(429),
    ))
}
