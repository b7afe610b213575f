//! `orderbridge prove crash`: the daemon (its own process) runs against the
//! Kaspi and amoCRM simulators while orders arrive and managers accept leads;
//! it is killed with SIGKILL at random moments and started again each time.
//! At the end every order must have exactly one lead in the stage its status
//! maps to, every manager's move must have reached Kaspi exactly once, and no
//! job may be left pending, running or dead.
//!
//! A kill comes a random 0.5–4 s (seeded) after the daemon recovered from the
//! previous one; recovery is the kill → a lead made again (a restarted
//! daemon waits for the dead process's leases to expire, `job_lease`).
//!
//! With `--replicas N` (`orderbridge prove replicas` runs 3) N daemons share
//! the database, each kill takes a random one (started again at once), and
//! the others must take over its targets within the lease time without two
//! serving one target at once: amoCRM's log must never show more than 7
//! requests in a second, nor a 429.

use std::io::Write;
use std::time::{Duration, Instant};

use rand::Rng;

use super::world::World;
use super::ProveError;
use crate::bench::{failed, BenchError};
use crate::config::Settings;
use crate::store::ScratchDatabase;

#[derive(Debug, Clone, clap::Args)]
pub struct CrashArgs {
    /// SIGKILLs (the full run: 50; `.ci/run`: 5).
    #[arg(long, default_value_t = 50)]
    pub kills: usize,
    /// New Kaspi orders a second.
    #[arg(long, default_value_t = 3.0)]
    pub rate: f64,
    /// Seeds the kill moments and the managers' choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Daemons sharing the database (each kill takes a random one).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
}

pub async fn run(
    settings: &Settings,
    args: &CrashArgs,
    out: &mut impl Write,
) -> Result<(), ProveError> {
    super::in_scratch_database(settings, out, async |admin, db| {
        exercise(admin, db, args).await
    })
    .await
}

async fn exercise(
    admin: &str,
    db: &ScratchDatabase,
    args: &CrashArgs,
) -> Result<super::world::Outcome, BenchError> {
    let replicas = args.replicas.max(1);
    let mut world = World::start(admin, db, replicas, args.seed, &[]).await?;
    let mut kills = 0usize;
    let mut recoveries: Vec<Duration> = Vec::new();
    // (when killed, leads linked then) while the restarted daemon recovers.
    let mut recovering: Option<(Instant, i64)> = None;
    let mut next_kill = Instant::now() + kill_gap(&mut world.rng);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.1)));
    while kills < args.kills || recovering.is_some() {
        tick.tick().await;
        if world.started.elapsed() > Duration::from_secs(60 * 60) {
            return Err(failed("the run did not finish within an hour"));
        }
        world.step();
        let linked = world.linked().await?;
        match recovering {
            Some((killed_at, linked_then)) if linked > linked_then => {
                recoveries.push(killed_at.elapsed());
                recovering = None;
                next_kill = Instant::now() + kill_gap(&mut world.rng);
            }
            Some(_) => {}
            None if kills < args.kills && Instant::now() >= next_kill => {
                let victim = world.rng.random_range(0..replicas);
                world.daemons[victim].kill_now();
                kills += 1;
                let killed_at = Instant::now();
                world.daemons[victim] = world.start_daemon(victim)?;
                recovering = Some((killed_at, linked));
            }
            None => world.check_daemons()?,
        }
    }
    eprintln!(
        "prove crash: {kills} kills done after {:.0} s; waiting for the daemon to catch up",
        world.started.elapsed().as_secs_f64()
    );
    let converge_s = world.settle(Duration::from_secs(240)).await?;
    let (mut figures, broken) = world.verdict().await?;
    let longest = recoveries.iter().max().copied().unwrap_or_default();
    figures.extend([
        ("kills", kills.to_string()),
        ("longest_recovery_ms", longest.as_millis().to_string()),
        (
            "mean_recovery_ms",
            (recoveries.iter().map(Duration::as_millis).sum::<u128>()
                / recoveries.len().max(1) as u128)
                .to_string(),
        ),
        ("converge_s", format!("{converge_s:.1}")),
    ]);
    Ok((figures, broken))
}

/// 0.5–4 s.
fn kill_gap(rng: &mut impl Rng) -> Duration {
    Duration::from_millis(rng.random_range(500..4_000))
}
