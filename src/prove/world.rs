//! The world every suite but bad-input runs in: the Kaspi and amoCRM
//! simulators seeded from the shipped Kaspi map, a scratch database, the
//! daemon as deployed (one or more child processes, `--config FILE run`), and
//! the traffic: new orders at a steady rate (one in four from a repeat
//! customer), managers accepting leads, and Kaspi itself moving some orders
//! along (accepted in the cabinet, later cancelled by the buyer), so a lead
//! gets several changes whose order matters. At the end [`World::verdict`]
//! checks from the simulators and the database that every order has exactly
//! one lead in the stage its status maps to, every manager's move reached
//! Kaspi exactly once, no lead ever moved backwards (changes applied out of
//! order), no job is left, and amoCRM never saw more than 7 requests in a
//! second or a 429.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::bench::pipeline::order_code;
use crate::bench::{config_file, failed, BenchError, DaemonProcess, RemoveOnDrop};
use crate::sim::amocrm::{AmoSim, AmoSimConfig, SimPipeline};
use crate::sim::kaspi::{KaspiSim, KaspiSimConfig};
use crate::store::ScratchDatabase;

const KASPI_MAP: &str = "config/maps/kaspi.toml";
pub(crate) const AMO_TOKEN: &str = "prove-token";
pub(crate) const KASPI_TOKEN: &str = "kaspi-test-token";
pub(crate) const HOOK_SECRET: &str = "prove-hook-secret";
/// The amoCRM account's circuit key (`orderbridge circuit reset TARGET`).
pub(crate) const AMO_TARGET: &str = "amocrm:main";
/// The stage whose entry means "accept the order" in the shipped Kaspi map.
const ACCEPT_STAGE: &str = "В работе / Сборка";
/// Where the shipped Kaspi map puts a new order's lead.
const NEW_STAGE: &str = "Новая заявка";
/// The shipped Kaspi map's stages in the order an order goes through them
/// (both endings last): a lead never moves to a lower rank by itself.
const FUNNEL: [(&str, usize); 6] = [
    (NEW_STAGE, 0),
    (ACCEPT_STAGE, 1),
    ("Готов к отгрузке", 2),
    ("В доставке", 3),
    ("Успешно реализовано", 4),
    ("Закрыто и не реализовано", 4),
];
/// How long after Kaspi accepted an order in the cabinet its buyer cancels it.
const CANCEL_AFTER: Duration = Duration::from_secs(3);

/// kind, state, failures, due in seconds, last error, how many.
type OpenJobs = (String, String, i32, Option<i64>, Option<String>, i64);

pub(crate) type Outcome = (Vec<(&'static str, String)>, Vec<String>);

pub(crate) struct World {
    pub kaspi: KaspiSim,
    pub amo: AmoSim,
    pub pool: sqlx::PgPool,
    pub config: std::path::PathBuf,
    _config: RemoveOnDrop,
    pipeline: SimPipeline,
    accept: u64,
    new_stage: u64,
    manager: u64,
    ports: Vec<u16>,
    env: Vec<(&'static str, String)>,
    /// What every daemon is started through (empty: directly).
    wrapper: Vec<String>,
    pub daemons: Vec<DaemonProcess>,
    pub rng: rand::rngs::StdRng,
    pub created: usize,
    /// Leads a manager accepted.
    moved: BTreeSet<u64>,
    /// Leads whose order Kaspi moves itself (never touched by a manager).
    kaspi_side: BTreeSet<u64>,
    /// Orders Kaspi accepted in the cabinet, to be cancelled by their buyer.
    to_cancel: VecDeque<(Instant, String)>,
    pub started: Instant,
    /// When [`World::pump`] makes its next order.
    next_order: Instant,
}

impl World {
    /// Simulators, configuration and `replicas` daemons started; `env`
    /// overrides settings of every daemon (`ORDERBRIDGE__…`).
    pub async fn start(
        admin: &str,
        db: &ScratchDatabase,
        replicas: usize,
        seed: u64,
        env: &[(&'static str, String)],
    ) -> Result<World, BenchError> {
        World::start_wrapped(admin, db, replicas, seed, env, &[]).await
    }

    /// As [`World::start`], every daemon started through `wrapper` (see
    /// [`DaemonProcess::start_wrapped`]).
    pub async fn start_wrapped(
        admin: &str,
        db: &ScratchDatabase,
        replicas: usize,
        seed: u64,
        env: &[(&'static str, String)],
        wrapper: &[String],
    ) -> Result<World, BenchError> {
        let kaspi = KaspiSim::start(KaspiSimConfig::default()).await?;
        let amo = AmoSim::start(AmoSimConfig {
            long_lived_token: Some(AMO_TOKEN.into()),
            ..AmoSimConfig::default()
        })
        .await?;
        crate::demo::seed_crm_from_maps(&amo, &[std::path::Path::new(KASPI_MAP)])
            .map_err(failed)?;
        let pipeline = amo
            .pipelines()
            .into_iter()
            .find(|p| p.stages.iter().any(|(_, name)| name == ACCEPT_STAGE))
            .ok_or_else(|| failed("the Kaspi map's pipeline is not in the simulator"))?;
        let stage = |wanted: &str| {
            pipeline
                .stages
                .iter()
                .find(|(_, name)| name == wanted)
                .map(|(id, _)| *id)
                .ok_or_else(|| failed(format!("no stage {wanted}")))
        };
        let (accept, new_stage) = (stage(ACCEPT_STAGE)?, stage(NEW_STAGE)?);
        let manager = amo.seed_user("Менеджер проверки");
        // Each replica its own HTTP port; the webhook goes to the first one's.
        let mut ports = Vec::new();
        for _ in 0..replicas.max(1) {
            ports.push(
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port(),
            );
        }
        let config = config_file(
            "prove",
            admin,
            &db.name,
            &daemon_config(&amo, &kaspi, ports[0]),
        )?;
        let mut world = World {
            kaspi,
            amo,
            pool: db.pool.clone(),
            _config: RemoveOnDrop(config.clone()),
            config,
            pipeline,
            accept,
            new_stage,
            manager,
            ports,
            env: env.to_vec(),
            wrapper: wrapper.to_vec(),
            daemons: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            created: 0,
            moved: BTreeSet::new(),
            kaspi_side: BTreeSet::new(),
            to_cancel: VecDeque::new(),
            started: Instant::now(),
            next_order: Instant::now(),
        };
        for i in 0..world.ports.len() {
            let daemon = world.start_daemon(i)?;
            world.daemons.push(daemon);
        }
        Ok(world)
    }

    /// Starts replica `i` (its own HTTP port).
    pub fn start_daemon(&self, i: usize) -> Result<DaemonProcess, BenchError> {
        let mut env = self.env.clone();
        env.push((
            "ORDERBRIDGE__HTTP__LISTEN",
            format!("127.0.0.1:{}", self.ports[i]),
        ));
        DaemonProcess::start_wrapped(&self.config, &env, &self.wrapper)
    }

    /// Replica `i`'s HTTP address (`http://127.0.0.1:PORT`).
    pub fn base_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// The pipeline the shipped Kaspi map resolves to.
    pub fn pipeline(&self) -> &SimPipeline {
        &self.pipeline
    }

    /// What piles up while the daemon is down: `n` orders created evenly
    /// over the last `span` (one in ten of them already cancelled by its
    /// buyer when the daemon comes back).
    pub fn backlog(&mut self, n: usize, span: Duration) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let step_ms = span.as_millis() as i64 / n.max(1) as i64;
        for k in 0..n {
            let created_ms = now_ms - span.as_millis() as i64 + k as i64 * step_ms;
            let order = self.kaspi.create_order(crate::bench::generated_order(
                self.created,
                created_ms,
                4,
                50,
                700_000_000,
            ));
            self.created += 1;
            if self.rng.random_bool(0.1) {
                self.kaspi
                    .buyer_cancels(&order.id, "BUYER_CANCELLATION_BY_MERCHANT");
            }
        }
    }

    /// Replica `i`'s `/readyz`.
    pub fn readyz_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/readyz", self.ports[i])
    }

    /// One tick of traffic: a new order; sometimes a manager accepts a lead
    /// still in its first stage, or Kaspi accepts one in the cabinet (its
    /// buyer cancels it a few seconds later).
    pub fn step(&mut self) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        self.kaspi.create_order(crate::bench::generated_order(
            self.created,
            now_ms,
            4,
            50,
            700_000_000,
        ));
        self.created += 1;
        let roll: f64 = self.rng.random();
        if roll < 0.7 {
            let candidates: Vec<u64> = self
                .amo
                .lead_ids_in_stage(self.new_stage)
                .into_iter()
                .filter(|id| !self.moved.contains(id) && !self.kaspi_side.contains(id))
                .collect();
            if !candidates.is_empty() {
                let lead = candidates[self.rng.random_range(0..candidates.len())];
                let code = self
                    .amo
                    .lead(lead)
                    .and_then(|l| order_code(&l.custom_fields_values));
                if roll < 0.55 {
                    self.amo
                        .manager_moves_lead(lead, self.pipeline.id, self.accept, self.manager);
                    self.moved.insert(lead);
                } else if let Some(order) = code.and_then(|c| self.kaspi.order_by_code(&c)) {
                    self.kaspi.kaspi_accepts_order(&order.id);
                    self.kaspi_side.insert(lead);
                    self.to_cancel
                        .push_back((Instant::now() + CANCEL_AFTER, order.id));
                }
            }
        }
        while self
            .to_cancel
            .front()
            .is_some_and(|(when, _)| *when <= Instant::now())
        {
            if let Some((_, id)) = self.to_cancel.pop_front() {
                self.kaspi
                    .buyer_cancels(&id, "BUYER_CANCELLATION_BY_MERCHANT");
            }
        }
    }

    /// The traffic due since the last call at `rate` orders a second (call
    /// it often; a suite does its own work between calls).
    pub fn pump(&mut self, rate: f64) {
        let gap = Duration::from_secs_f64(1.0 / rate.max(0.1));
        while self.next_order <= Instant::now() {
            self.step();
            self.next_order += gap;
        }
    }

    /// Traffic for `span`, checking the daemons are alive.
    pub async fn flow(&mut self, rate: f64, span: Duration) -> Result<(), BenchError> {
        let until = Instant::now() + span;
        while Instant::now() < until {
            self.pump(rate);
            self.check_daemons()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Orders linked to a lead so far.
    pub async fn linked(&self) -> Result<i64, BenchError> {
        count(&self.pool, "SELECT count(*) FROM crm_links").await
    }

    pub fn check_daemons(&mut self) -> Result<(), BenchError> {
        for daemon in &mut self.daemons {
            daemon.check()?;
        }
        Ok(())
    }

    /// Jobs pending or running.
    pub async fn open_jobs(&self) -> Result<i64, BenchError> {
        count(
            &self.pool,
            "SELECT count(*) FROM outbox_jobs WHERE state IN ('pending', 'running')",
        )
        .await
    }

    /// Waits (at most `limit`) until every order is linked, every move is at
    /// Kaspi, no job is open and every lead is in its stage; the seconds it took.
    pub async fn settle(&mut self, limit: Duration) -> Result<f64, BenchError> {
        for (_, id) in std::mem::take(&mut self.to_cancel) {
            self.kaspi
                .buyer_cancels(&id, "BUYER_CANCELLATION_BY_MERCHANT");
        }
        let converging = Instant::now();
        let moved_codes = self.moved_codes();
        loop {
            self.check_daemons()?;
            let linked = self.linked().await?;
            let open = count(
                &self.pool,
                "SELECT count(*) FROM outbox_jobs WHERE state IN ('pending', 'running')",
            )
            .await?;
            let accepted = self
                .kaspi
                .orders()
                .iter()
                .filter(|o| moved_codes.contains(&o.code) && o.status != "APPROVED_BY_BANK")
                .count();
            // A lead the manager moved waits in its stage until the next poll
            // stores Kaspi's new status, and a change Kaspi made itself is
            // seen when the poll's sweep reaches its order: settled only when
            // every order is stored as Kaspi has it and every lead matches.
            if linked >= self.created as i64
                && open == 0
                && accepted == moved_codes.len()
                && self.unseen_changes().await? == 0
                && self.wrong_stages().await? == 0
            {
                break;
            }
            if converging.elapsed() > limit {
                eprintln!(
                    "prove: after {} s {linked} of {} orders linked, {open} jobs open, {accepted} of {} moves at Kaspi",
                    limit.as_secs(),
                    self.created,
                    moved_codes.len()
                );
                // What the open jobs wait for, to start the diagnosis.
                let open: Vec<OpenJobs> = sqlx::query_as(
                    "SELECT kind, state, failures, extract(epoch FROM run_at - now())::bigint,
                            left(last_error, 200), count(*)
                     FROM outbox_jobs WHERE state IN ('pending', 'running')
                     GROUP BY 1, 2, 3, 4, 5 ORDER BY 6 DESC LIMIT 12",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(failed)?;
                for (kind, state, failures, due_in_s, error, n) in open {
                    eprintln!(
                        "prove: {n} × {kind} {state}, {failures} failures, due in {due_in_s:?} s, last error {error:?}"
                    );
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(converging.elapsed().as_secs_f64())
    }

    /// Orders whose status at Kaspi differs from the stored one (or that are
    /// not stored yet).
    async fn unseen_changes(&self) -> Result<usize, BenchError> {
        let stored: BTreeMap<String, Option<String>> =
            sqlx::query_as::<_, (String, Option<String>)>("SELECT code, raw_status FROM orders")
                .fetch_all(&self.pool)
                .await
                .map_err(failed)?
                .into_iter()
                .collect();
        Ok(self
            .kaspi
            .orders()
            .iter()
            .filter(|o| {
                stored
                    .get(&o.code)
                    .is_none_or(|s| s.as_deref() != Some(o.status.as_str()))
            })
            .count())
    }

    fn moved_codes(&self) -> BTreeSet<String> {
        self.amo
            .leads()
            .into_iter()
            .filter(|l| self.moved.contains(&l.id))
            .filter_map(|l| order_code(&l.custom_fields_values))
            .collect()
    }

    /// Stops the daemons and judges what the simulators and the database
    /// hold: the common figures and every broken promise.
    pub async fn verdict(&mut self) -> Result<Outcome, BenchError> {
        for daemon in &mut self.daemons {
            daemon.stop();
        }
        let codes: BTreeMap<String, String> = self
            .kaspi
            .orders()
            .into_iter()
            .map(|o| (o.id.clone(), o.code.clone()))
            .collect();
        let leads = self.amo.leads();
        let mut leads_per_code: BTreeMap<String, usize> = BTreeMap::new();
        for lead in &leads {
            if let Some(code) = order_code(&lead.custom_fields_values) {
                *leads_per_code.entry(code).or_default() += 1;
            }
        }
        let duplicate_leads: usize = leads_per_code.values().map(|n| n - 1).sum();
        let lost = codes
            .values()
            .filter(|code| !leads_per_code.contains_key(*code))
            .count();
        let wrong_stage = self.wrong_stages().await?;
        // Accepts that Kaspi carried out (2xx) per order: one each.
        let mut applied: BTreeMap<String, usize> = BTreeMap::new();
        for request in self.kaspi.requests() {
            if request.method == "POST" && (200..300).contains(&request.status) {
                if let Some((_, code)) = codes
                    .iter()
                    .find(|(id, _)| request.body.contains(id.as_str()))
                {
                    *applied.entry(code.clone()).or_default() += 1;
                }
            }
        }
        let moved_codes = self.moved_codes();
        let actions_applied = moved_codes
            .iter()
            .filter(|c| applied.contains_key(*c))
            .count();
        let duplicate_actions: usize = applied.values().map(|n| n.saturating_sub(1)).sum();
        // The integration's own stage changes, in the order amoCRM made them:
        // one to an earlier stage means changes were applied out of order.
        let position: BTreeMap<u64, usize> = self
            .pipeline
            .stages
            .iter()
            .filter_map(|(id, name)| {
                FUNNEL
                    .iter()
                    .find(|(stage, _)| stage == name)
                    .map(|(_, rank)| (*id, *rank))
            })
            .collect();
        let name = |id: &u64| {
            self.pipeline
                .stages
                .iter()
                .find(|(s, _)| s == id)
                .map_or_else(|| id.to_string(), |(_, n)| n.clone())
        };
        let backward: Vec<String> = self
            .amo
            .stage_changes()
            .iter()
            .filter(|(_, _, _, by)| *by != self.manager)
            .filter(|(_, before, after, _)| {
                matches!((position.get(before), position.get(after)), (Some(b), Some(a)) if a < b)
            })
            .map(|(lead, before, after, _)| {
                format!("lead {lead} {} → {}", name(before), name(after))
            })
            .collect();
        let backward_moves = backward.len();
        if !backward.is_empty() {
            eprintln!("prove: leads moved backwards: {}", backward.join("; "));
        }
        let kaspi_side_moves = self
            .amo
            .stage_changes()
            .iter()
            .filter(|(lead, _, _, by)| *by != self.manager && self.kaspi_side.contains(lead))
            .count();
        let stuck = count(
            &self.pool,
            "SELECT count(*) FROM outbox_jobs WHERE state IN ('pending', 'running')",
        )
        .await?;
        let dead = count(
            &self.pool,
            "SELECT count(*) FROM outbox_jobs WHERE state = 'dead'",
        )
        .await?;
        // Never two serving one account: amoCRM's own count of each second.
        let busiest = self.amo.max_requests_in_any_second();
        let http_429 = self.amo.rate_limited();

        let mut broken = Vec::new();
        for (what, n) in [
            ("duplicate leads", duplicate_leads),
            ("orders without a lead", lost),
            ("leads in the wrong stage", wrong_stage),
            (
                "leads moved backwards (changes out of order)",
                backward_moves,
            ),
            ("moves applied twice", duplicate_actions),
            (
                "moves that never reached Kaspi",
                moved_codes.len() - actions_applied,
            ),
            ("jobs left pending or running", stuck as usize),
            ("dead jobs", dead as usize),
            ("amoCRM rate-limit 429s", http_429),
            (
                "requests above amoCRM's 7 in one second",
                busiest.saturating_sub(7),
            ),
        ] {
            if n > 0 {
                broken.push(format!("{n} {what}"));
            }
        }
        Ok((
            vec![
                ("orders", self.created.to_string()),
                ("leads", leads.len().to_string()),
                ("duplicate_leads", duplicate_leads.to_string()),
                ("lost", lost.to_string()),
                ("wrong_stage", wrong_stage.to_string()),
                ("backward_moves", backward_moves.to_string()),
                ("kaspi_side_changes", kaspi_side_moves.to_string()),
                ("actions", moved_codes.len().to_string()),
                ("actions_applied", actions_applied.to_string()),
                ("duplicate_actions", duplicate_actions.to_string()),
                ("stuck_jobs", stuck.to_string()),
                ("dead_jobs", dead.to_string()),
                ("replicas", self.ports.len().to_string()),
                ("amocrm_max_in_any_1s", busiest.to_string()),
                ("amocrm_http_429", http_429.to_string()),
            ],
            broken,
        ))
    }

    /// Leads not in the stage their order's stored status maps to.
    pub async fn wrong_stages(&self) -> Result<usize, BenchError> {
        let expected = expected_stages(&self.pool, &self.pipeline).await?;
        Ok(self
            .amo
            .leads()
            .iter()
            .filter(|lead| {
                order_code(&lead.custom_fields_values)
                    .and_then(|code| expected.get(&code).copied())
                    .is_some_and(|want| want != Some(lead.status_id))
            })
            .count())
    }
}

pub(crate) async fn count(pool: &sqlx::PgPool, sql: &str) -> Result<i64, BenchError> {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .map_err(failed)
}

/// Each stored order's code → the stage id its status maps to in the shipped
/// Kaspi map (`None`: ignored status, no lead expected to be anywhere).
async fn expected_stages(
    pool: &sqlx::PgPool,
    pipeline: &SimPipeline,
) -> Result<BTreeMap<String, Option<u64>>, BenchError> {
    let (map, _) = crate::mapping::model::load(std::path::Path::new(KASPI_MAP)).map_err(failed)?;
    let stage_of: BTreeMap<String, Option<u64>> = map
        .statuses
        .iter()
        .map(|(status, row)| {
            let stage = row
                .get_ref()
                .stage
                .as_ref()
                .and_then(|s| s.get_ref().as_str())
                .and_then(|name| {
                    pipeline
                        .stages
                        .iter()
                        .find(|(_, n)| n == name)
                        .map(|(id, _)| *id)
                });
            (status.get_ref().clone(), stage)
        })
        .collect();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT code, status_key FROM orders")
        .fetch_all(pool)
        .await
        .map_err(failed)?;
    Ok(rows
        .into_iter()
        .filter_map(|(code, status)| stage_of.get(&status).map(|s| (code, *s)))
        .collect())
}

fn daemon_config(amo: &AmoSim, kaspi: &KaspiSim, port: u16) -> String {
    crate::bench::KaspiAmoDaemon {
        amo,
        kaspi,
        port,
        shop: "kaspi_prove",
        hook_secret: HOOK_SECRET,
        amo_token: AMO_TOKEN,
        kaspi_token: KASPI_TOKEN,
        poll: Duration::from_secs(1),
        events_poll: Duration::from_secs(3),
    }
    .config_text()
}
