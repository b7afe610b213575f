//! The world every suite but bad-input runs in: the Kaspi, Avito and amoCRM
//! simulators (amoCRM seeded from the shipped Kaspi and Avito maps), a
//! scratch database, the daemon as deployed (one or more child processes,
//! `--config FILE run`, one Kaspi shop and one Avito shop), and the traffic:
//! new orders at a steady rate (one in three at Avito, one in four Kaspi
//! orders from a repeat customer), managers accepting leads, and the
//! marketplaces moving some orders along themselves (accepted in the cabinet,
//! later cancelled by the buyer), so a lead gets several changes whose order
//! matters. At the end [`World::verdict`] checks from the simulators and the
//! database that every order has exactly one lead in the stage its status
//! maps to, every manager's move reached its marketplace exactly once, no
//! lead ever moved backwards (changes applied out of order), no job is left,
//! amoCRM never saw more than 7 requests in a second or a 429, and Avito
//! never answered a rate limit's 429.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::bench::pipeline::order_code;
use crate::bench::{config_file, failed, BenchError, DaemonProcess, RemoveOnDrop};
use crate::sim::amocrm::{AmoSim, AmoSimConfig, SimPipeline};
use crate::sim::avito::{AvitoSim, AvitoSimConfig, SimAvitoItem, SimAvitoOrderSpec};
use crate::sim::kaspi::{KaspiSim, KaspiSimConfig};
use crate::store::ScratchDatabase;

const KASPI_MAP: &str = "config/maps/kaspi.toml";
const AVITO_MAP: &str = "config/maps/avito.toml";
/// Every `AVITO_EVERY`-th new order is an Avito one.
const AVITO_EVERY: usize = 3;
/// The Avito order status a new order has, and the one its buyer cancels to.
const AVITO_NEW: &str = "on_confirmation";
const AVITO_CANCELLED: &str = "canceled";
pub(crate) const AMO_TOKEN: &str = "prove-token";
pub(crate) const KASPI_TOKEN: &str = "kaspi-test-token";
pub(crate) const HOOK_SECRET: &str = "prove-hook-secret";
/// The amoCRM account's circuit key (`orderbridge circuit reset TARGET`).
pub(crate) const AMO_TARGET: &str = "amocrm:main";
/// The stage whose entry means "accept the order" in the shipped Kaspi map.
const ACCEPT_STAGE: &str = "В работе / Сборка";
/// Where the shipped Kaspi map puts a new order's lead.
const NEW_STAGE: &str = "Новая заявка";
/// The shipped maps' stages (the same names in the Kaspi and the Avito
/// pipeline) in the order an order goes through them (both endings last): a
/// lead never moves to a lower rank by itself.
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

/// Which marketplace an order of the world is at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Market {
    Kaspi,
    Avito,
}

/// One marketplace's pipeline in amoCRM, as its shipped map resolves.
struct Funnel {
    pipeline: SimPipeline,
    /// The stage a new order's lead lands in.
    new_stage: u64,
    /// The stage whose entry means "accept the order".
    accept: u64,
}

impl Funnel {
    fn find(amo: &AmoSim, name: &str) -> Result<Funnel, BenchError> {
        let pipeline = amo
            .pipelines()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| failed(format!("pipeline {name} is not in the simulator")))?;
        let stage = |wanted: &str| {
            pipeline
                .stages
                .iter()
                .find(|(_, n)| n == wanted)
                .map(|(id, _)| *id)
                .ok_or_else(|| failed(format!("no stage {wanted} in pipeline {name}")))
        };
        Ok(Funnel {
            new_stage: stage(NEW_STAGE)?,
            accept: stage(ACCEPT_STAGE)?,
            pipeline,
        })
    }
}

pub(crate) struct World {
    pub kaspi: KaspiSim,
    pub avito: AvitoSim,
    pub amo: AmoSim,
    pub pool: sqlx::PgPool,
    pub config: std::path::PathBuf,
    _config: RemoveOnDrop,
    kaspi_funnel: Funnel,
    avito_funnel: Funnel,
    manager: u64,
    ports: Vec<u16>,
    env: Vec<(&'static str, String)>,
    /// What every daemon is started through (empty: directly).
    wrapper: Vec<String>,
    pub daemons: Vec<DaemonProcess>,
    pub rng: rand::rngs::StdRng,
    /// Orders made so far, at both marketplaces.
    pub created: usize,
    /// The Avito orders among them (their ids, which are also their codes).
    avito_ids: Vec<String>,
    /// Leads a manager accepted.
    moved: BTreeSet<u64>,
    /// Leads whose order the marketplace moves itself (never touched by a
    /// manager).
    marketplace_side: BTreeSet<u64>,
    /// Orders a marketplace accepted in the cabinet, to be cancelled by
    /// their buyer.
    to_cancel: VecDeque<(Instant, Market, String)>,
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
        let avito = AvitoSim::start(AvitoSimConfig::default()).await?;
        let amo = AmoSim::start(AmoSimConfig {
            long_lived_token: Some(AMO_TOKEN.into()),
            ..AmoSimConfig::default()
        })
        .await?;
        crate::demo::seed_crm_from_maps(
            &amo,
            &[
                std::path::Path::new(KASPI_MAP),
                std::path::Path::new(AVITO_MAP),
            ],
        )
        .map_err(failed)?;
        let kaspi_funnel = Funnel::find(&amo, &map_pipeline(KASPI_MAP)?)?;
        let avito_funnel = Funnel::find(&amo, &map_pipeline(AVITO_MAP)?)?;
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
            &daemon_config(&amo, &kaspi, &avito, ports[0]),
        )?;
        let mut world = World {
            kaspi,
            avito,
            amo,
            pool: db.pool.clone(),
            _config: RemoveOnDrop(config.clone()),
            config,
            kaspi_funnel,
            avito_funnel,
            manager,
            ports,
            env: env.to_vec(),
            wrapper: wrapper.to_vec(),
            daemons: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            created: 0,
            avito_ids: Vec::new(),
            moved: BTreeSet::new(),
            marketplace_side: BTreeSet::new(),
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
        &self.kaspi_funnel.pipeline
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

    /// One tick of traffic: a new order (every third at Avito); sometimes a
    /// manager accepts a lead still in its first stage, or the marketplace
    /// accepts one in the cabinet (its buyer cancels it a few seconds later).
    pub fn step(&mut self) {
        if self.created % AVITO_EVERY == AVITO_EVERY - 1 {
            self.new_avito_order();
        } else {
            let now_ms = chrono::Utc::now().timestamp_millis();
            self.kaspi.create_order(crate::bench::generated_order(
                self.created,
                now_ms,
                4,
                50,
                700_000_000,
            ));
        }
        self.created += 1;
        let roll: f64 = self.rng.random();
        if roll < 0.7 {
            let mut candidates: Vec<(u64, Market)> = Vec::new();
            for market in [Market::Kaspi, Market::Avito] {
                let stage = self.funnel(market).new_stage;
                candidates.extend(
                    self.amo
                        .lead_ids_in_stage(stage)
                        .into_iter()
                        .filter(|id| {
                            !self.moved.contains(id) && !self.marketplace_side.contains(id)
                        })
                        .map(|id| (id, market)),
                );
            }
            if !candidates.is_empty() {
                let (lead, market) = candidates[self.rng.random_range(0..candidates.len())];
                if roll < 0.55 {
                    let (pipeline, accept) = {
                        let funnel = self.funnel(market);
                        (funnel.pipeline.id, funnel.accept)
                    };
                    self.amo
                        .manager_moves_lead(lead, pipeline, accept, self.manager);
                    self.moved.insert(lead);
                } else if let Some(id) = self.marketplace_accepts(lead, market) {
                    self.marketplace_side.insert(lead);
                    self.to_cancel
                        .push_back((Instant::now() + CANCEL_AFTER, market, id));
                }
            }
        }
        self.buyers_cancel(false);
    }

    fn funnel(&self, market: Market) -> &Funnel {
        match market {
            Market::Kaspi => &self.kaspi_funnel,
            Market::Avito => &self.avito_funnel,
        }
    }

    /// A new Avito order (one in four from a repeat buyer), as a marketplace
    /// poll finds it.
    fn new_avito_order(&mut self) {
        let n = self.avito_ids.len();
        let id = format!("{}", 70_000_000_000_000_000u64 + self.created as u64);
        let mut spec = SimAvitoOrderSpec::new(&id, chrono::Utc::now());
        spec.buyer_name = Some(format!("Покупатель Авито {n}"));
        spec.buyer_phone = Some(if n % 4 == 3 {
            format!("7916{:07}", n % 50)
        } else {
            format!("7926{n:07}")
        });
        spec.items = vec![SimAvitoItem {
            avito_id: format!("{}", 2_799_000_000u64 + n as u64),
            sku: None,
            title: format!("Товар {n}"),
            count: 1,
            price: spec.price,
            commission: spec.commission,
            chat_id: None,
        }];
        self.avito.create_order(spec);
        self.avito_ids.push(id);
    }

    /// The marketplace accepts the order of `lead` in its cabinet; the
    /// order's id.
    fn marketplace_accepts(&self, lead: u64, market: Market) -> Option<String> {
        let code = self
            .amo
            .lead(lead)
            .and_then(|l| order_code(&l.custom_fields_values))?;
        match market {
            Market::Kaspi => {
                let order = self.kaspi.order_by_code(&code)?;
                self.kaspi.kaspi_accepts_order(&order.id);
                Some(order.id)
            }
            Market::Avito => {
                let order = self.avito.order(&code)?;
                self.avito.set_status(&order.id, "ready_to_ship");
                Some(order.id)
            }
        }
    }

    /// Buyers cancel the orders accepted in a cabinet whose time has come
    /// (`all`: every one now).
    fn buyers_cancel(&mut self, all: bool) {
        while self
            .to_cancel
            .front()
            .is_some_and(|(when, _, _)| all || *when <= Instant::now())
        {
            match self.to_cancel.pop_front() {
                Some((_, Market::Kaspi, id)) => self
                    .kaspi
                    .buyer_cancels(&id, "BUYER_CANCELLATION_BY_MERCHANT"),
                Some((_, Market::Avito, id)) => self.avito.set_status(&id, AVITO_CANCELLED),
                None => {}
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

    /// Orders of `marketplace` (`kaspi`, `avito`) linked to a lead so far.
    pub async fn linked_at(&self, marketplace: &str) -> Result<i64, BenchError> {
        sqlx::query_scalar(
            "SELECT count(*) FROM crm_links l JOIN orders o ON o.id = l.order_id \
             WHERE o.marketplace = $1",
        )
        .bind(marketplace)
        .fetch_one(&self.pool)
        .await
        .map_err(failed)
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
        self.buyers_cancel(true);
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
            let accepted = self.accepted(&moved_codes);
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
                    "prove: after {} s {linked} of {} orders linked, {open} jobs open, {accepted} of {} moves at their marketplace",
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

    /// Orders the managers moved that their marketplace has accepted.
    fn accepted(&self, moved_codes: &BTreeSet<String>) -> usize {
        let at_kaspi = self
            .kaspi
            .orders()
            .iter()
            .filter(|o| moved_codes.contains(&o.code) && o.status != "APPROVED_BY_BANK")
            .count();
        let at_avito = self
            .avito
            .orders()
            .iter()
            .filter(|o| moved_codes.contains(&o.id) && o.status != AVITO_NEW)
            .count();
        at_kaspi + at_avito
    }

    /// Orders whose status at their marketplace differs from the stored one
    /// (or that are not stored yet).
    async fn unseen_changes(&self) -> Result<usize, BenchError> {
        let stored: BTreeMap<String, Option<String>> =
            sqlx::query_as::<_, (String, Option<String>)>("SELECT code, raw_status FROM orders")
                .fetch_all(&self.pool)
                .await
                .map_err(failed)?
                .into_iter()
                .collect();
        let differs = |code: &str, status: &str| {
            stored
                .get(code)
                .is_none_or(|s| s.as_deref() != Some(status))
        };
        let kaspi = self
            .kaspi
            .orders()
            .iter()
            .filter(|o| differs(&o.code, &o.status))
            .count();
        let avito = self
            .avito
            .orders()
            .iter()
            .filter(|o| differs(&o.id, &o.status))
            .count();
        Ok(kaspi + avito)
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
            .chain(self.avito_ids.iter())
            .filter(|code| !leads_per_code.contains_key(*code))
            .count();
        let wrong_stage = self.wrong_stages().await?;
        // Accepts that the marketplace carried out (Kaspi: a 2xx POST; Avito:
        // an applied transition) per order: one each.
        let mut applied: BTreeMap<String, usize> = BTreeMap::new();
        for order in self.avito.orders() {
            if !order.transitions.is_empty() {
                applied.insert(order.id, order.transitions.len());
            }
        }
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
        for code in moved_codes.iter().filter(|c| !applied.contains_key(*c)) {
            self.explain_unapplied(code).await?;
        }
        // The integration's own stage changes, in the order amoCRM made them:
        // one to an earlier stage means changes were applied out of order.
        let stages: Vec<&(u64, String)> = [&self.kaspi_funnel, &self.avito_funnel]
            .iter()
            .flat_map(|f| f.pipeline.stages.iter())
            .collect();
        let position: BTreeMap<u64, usize> = stages
            .iter()
            .filter_map(|(id, name)| {
                FUNNEL
                    .iter()
                    .find(|(stage, _)| stage == name)
                    .map(|(_, rank)| (*id, *rank))
            })
            .collect();
        let name = |id: &u64| {
            stages
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
            let mut explained = std::collections::BTreeSet::new();
            for (lead, before, after, by) in self.amo.stage_changes() {
                let backwards = by != self.manager
                    && matches!((position.get(&before), position.get(&after)), (Some(b), Some(a)) if a < b);
                if backwards && explained.insert(lead) {
                    self.explain_backward(lead, &name).await?;
                }
            }
        }
        let marketplace_side_changes = self
            .amo
            .stage_changes()
            .iter()
            .filter(|(lead, _, _, by)| *by != self.manager && self.marketplace_side.contains(lead))
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
        if dead > 0 {
            // What they died of, to start the diagnosis.
            let why: Vec<(String, String, Option<String>)> = sqlx::query_as(
                "SELECT kind, ordering_key, left(last_error, 300) FROM outbox_jobs
                 WHERE state = 'dead' ORDER BY id LIMIT 12",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(failed)?;
            for (kind, key, error) in why {
                eprintln!("prove: dead job {kind} ({key}): {error:?}");
            }
        }
        // Never two serving one account: amoCRM's own count of each second.
        let busiest = self.amo.max_requests_in_any_second();
        let http_429 = self.amo.rate_limited();
        let avito_429 = self.avito.rate_limited();

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
                "moves that never reached their marketplace",
                moved_codes.len() - actions_applied,
            ),
            ("jobs left pending or running", stuck as usize),
            ("dead jobs", dead as usize),
            ("amoCRM rate-limit 429s", http_429),
            ("Avito rate-limit 429s", avito_429),
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
                ("avito_orders", self.avito_ids.len().to_string()),
                ("leads", leads.len().to_string()),
                ("duplicate_leads", duplicate_leads.to_string()),
                ("lost", lost.to_string()),
                ("wrong_stage", wrong_stage.to_string()),
                ("backward_moves", backward_moves.to_string()),
                (
                    "marketplace_side_changes",
                    marketplace_side_changes.to_string(),
                ),
                ("actions", moved_codes.len().to_string()),
                ("actions_applied", actions_applied.to_string()),
                ("duplicate_actions", duplicate_actions.to_string()),
                ("stuck_jobs", stuck.to_string()),
                ("dead_jobs", dead.to_string()),
                ("replicas", self.ports.len().to_string()),
                ("amocrm_max_in_any_1s", busiest.to_string()),
                ("amocrm_http_429", http_429.to_string()),
                ("avito_http_429", avito_429.to_string()),
            ],
            broken,
        ))
    }

    /// What the database knows of a manager's move that never reached the
    /// marketplace (to start the diagnosis): the order's timeline, the CRM
    /// changes of its lead as judged, and its jobs' attempts.
    async fn explain_unapplied(&self, code: &str) -> Result<(), BenchError> {
        let lead: Option<(i64, i64, String)> = sqlx::query_as(
            "SELECT l.lead_id, o.id, o.ordering FROM (SELECT id, marketplace || ':' || account || ':' || external_id AS ordering, code FROM orders) o
             JOIN crm_links l ON l.order_id = o.id WHERE o.code = $1",
        )
        .bind(code)
        .fetch_optional(&self.pool)
        .await
        .map_err(failed)?;
        let Some((lead_id, order_id, ordering)) = lead else {
            eprintln!("prove: move of {code} never reached its marketplace; no link stored");
            return Ok(());
        };
        eprintln!("prove: move of order {code} (lead {lead_id}) never reached its marketplace:");
        self.explain(lead_id, order_id, &ordering).await
    }

    /// What the database and amoCRM know of a lead the integration moved to
    /// an earlier stage: every stage change of the lead, then as
    /// [`World::explain_unapplied`].
    async fn explain_backward(
        &self,
        lead_id: u64,
        name: &impl Fn(&u64) -> String,
    ) -> Result<(), BenchError> {
        let order: Option<(i64, String, String)> = sqlx::query_as(
            "SELECT o.id, o.marketplace || ':' || o.account || ':' || o.external_id, o.code
             FROM orders o JOIN crm_links l ON l.order_id = o.id WHERE l.lead_id = $1",
        )
        .bind(lead_id as i64)
        .fetch_optional(&self.pool)
        .await
        .map_err(failed)?;
        let Some((order_id, ordering, code)) = order else {
            eprintln!("prove: lead {lead_id} moved backwards; no link stored");
            return Ok(());
        };
        eprintln!("prove: lead {lead_id} (order {code}) moved backwards; its stage changes:");
        for (lead, before, after, by) in self.amo.stage_changes() {
            if lead == lead_id {
                let who = if by == self.manager {
                    "manager"
                } else {
                    "bridge"
                };
                eprintln!("prove:   {} → {} by {who}", name(&before), name(&after));
            }
        }
        self.explain(lead_id as i64, order_id, &ordering).await
    }

    /// The order's timeline, the CRM changes of its lead as judged, and its
    /// jobs' attempts.
    async fn explain(&self, lead_id: i64, order_id: i64, ordering: &str) -> Result<(), BenchError> {
        let events: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT to_char(at, 'HH24:MI:SS.MS'), kind, detail FROM order_events
             WHERE order_id = $1 ORDER BY at",
        )
        .bind(order_id)
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        for (at, kind, detail) in events {
            eprintln!("prove:   {at} event {kind}: {detail}");
        }
        let changes: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
            "SELECT to_char(received_at, 'HH24:MI:SS.MS'), kind, payload::text, outcome FROM inbox
             WHERE source = 'amocrm' AND payload->>'lead_id' = $1 ORDER BY id",
        )
        .bind(lead_id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        for (at, kind, payload, outcome) in changes {
            eprintln!("prove:   {at} CRM {kind} → {outcome:?}: {payload}");
        }
        let attempts: Vec<(String, String, i32, String, Option<String>)> = sqlx::query_as(
            "SELECT to_char(started_at, 'HH24:MI:SS.MS'), kind, attempt, outcome, error
             FROM outbox_attempts WHERE ordering_key = $1 ORDER BY started_at",
        )
        .bind(format!("order:{ordering}"))
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        for (at, kind, attempt, outcome, error) in attempts {
            eprintln!("prove:   {at} job {kind} attempt {attempt} {outcome} {error:?}");
        }
        Ok(())
    }

    /// Leads not in the stage their order's stored status maps to.
    pub async fn wrong_stages(&self) -> Result<usize, BenchError> {
        let expected = expected_stages(
            &self.pool,
            &[
                ("kaspi", KASPI_MAP, &self.kaspi_funnel.pipeline),
                ("avito", AVITO_MAP, &self.avito_funnel.pipeline),
            ],
        )
        .await?;
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

/// Each stored order's code → the stage id its status maps to in its
/// marketplace's shipped map (`None`: ignored status, no lead expected to be
/// anywhere); `maps`: (marketplace, map file, the pipeline it resolves to).
async fn expected_stages(
    pool: &sqlx::PgPool,
    maps: &[(&str, &str, &SimPipeline)],
) -> Result<BTreeMap<String, Option<u64>>, BenchError> {
    let mut stage_of: BTreeMap<(String, String), Option<u64>> = BTreeMap::new();
    for (marketplace, path, pipeline) in maps {
        let (map, _) = crate::mapping::model::load(std::path::Path::new(path)).map_err(failed)?;
        for (status, row) in &map.statuses {
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
            stage_of.insert((marketplace.to_string(), status.get_ref().clone()), stage);
        }
    }
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT code, marketplace, status_key FROM orders")
            .fetch_all(pool)
            .await
            .map_err(failed)?;
    Ok(rows
        .into_iter()
        .filter_map(|(code, marketplace, status)| {
            stage_of.get(&(marketplace, status)).map(|s| (code, *s))
        })
        .collect())
}

/// The `[pipeline] name` of a shipped map.
fn map_pipeline(path: &str) -> Result<String, BenchError> {
    let (map, _) = crate::mapping::model::load(std::path::Path::new(path)).map_err(failed)?;
    map.pipeline
        .get_ref()
        .name
        .get_ref()
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| failed(format!("{path}: the pipeline is not named")))
}

fn daemon_config(amo: &AmoSim, kaspi: &KaspiSim, avito: &AvitoSim, port: u16) -> String {
    let kaspi_and_amo = crate::bench::KaspiAmoDaemon {
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
    .config_text();
    let sim = AvitoSimConfig::default();
    format!(
        r#"{kaspi_and_amo}
[shops.avito_prove]
marketplace = "avito"
crm_account = "main"
map = "{AVITO_MAP}"
base_url = "{avito}"
poll_interval = "1s"
client_id = "{client_id}"
client_secret = "{client_secret}"
"#,
        avito = avito.base_url(),
        client_id = sim.client_id,
        client_secret = sim.client_secret,
    )
}
