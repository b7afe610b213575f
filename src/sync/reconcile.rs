//! Reconciliation: every marketplace order of a range compared with the store
//! and with its lead in amoCRM, and every difference repaired through the
//! outbox (never by writing to the CRM here, so a run shares the daemon's
//! budget and ordering).
//!
//! Phase 1, per shop, lists the marketplace (Kaspi in 14-day windows, Avito by
//! its listing from the range's start): an order the store never saw is
//! ingested (its CRM intent comes with it), one whose content the store has
//! stale is ingested again. Phase 2, per CRM account, reads the leads updated
//! since the range's start (pages of 250) and the linked leads not among them
//! by id (pages of 250), then judges each stored order: a lead in another
//! stage than the map gives (moved, unless an unfinished job, a Kaspi
//! completion waiting for its code, an unprocessed CRM change of the lead, or a
//! manager's move the bridge knows explains it), a lead whose link is missing
//! (found by the order-code field and linked), a linked lead deleted in the
//! CRM (recreated, with a note), an order without a lead (its sync queued).
//! `dry_run` reports without changing anything. A source's error is counted
//! and reported; the rest goes on. Runs are carried out by the `reconcile`
//! job of the CRM account's target ([`ReconcileHandler`]), or directly by the
//! command when no daemon serves the account.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::ingest::{self, OrderRef};
use crate::connectors::amocrm::{AmoClient, Lead};
use crate::connectors::avito::AvitoClient;
use crate::connectors::kaspi::{windows, KaspiClient, PageRun};
use crate::domain::Order;
use crate::mapping::{MapRegistry, Route};
use crate::outbox::{Handler, JobContext, NewJob, RetryAction};
use crate::store::reconcile::{self as store, StoredOrder};
use crate::store::{links, orders, StoreError};

/// Job kind of a reconciliation run.
pub const RECONCILE_KIND: &str = "reconcile";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bad reconcile payload: {0}")]
    BadPayload(String),
    #[error("no reconcile run {0}")]
    NoRun(i64),
    #[error("no amoCRM client for CRM account `{0}`")]
    NoClient(String),
}

/// What a run found and did. Each order lands in at most one drift category.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Orders compared (the marketplace's listing and the store's range).
    pub checked: u64,
    /// Orders the store never saw (ingested).
    pub missing_in_store: u64,
    /// Orders whose stored content was behind the marketplace (ingested again).
    pub stale_in_store: u64,
    /// Orders without a lead (their sync queued).
    pub missing_lead: u64,
    /// Leads in another stage than the map gives (moved).
    pub wrong_stage: u64,
    /// Leads off their mapped stage for a known reason (left alone).
    pub explained: u64,
    /// Leads found by the order code for orders without a link (linked).
    pub relinked: u64,
    /// Linked leads deleted in the CRM (recreated).
    pub recreated: u64,
    /// Repairs queued or stored (zero in a dry run).
    pub repaired: u64,
    /// Drift or sources that could not be handled.
    pub failed: u64,
    /// Why, one line each (the first 50).
    pub failures: Vec<String>,
    pub dry_run: bool,
    /// Stopped before the end (Ctrl-C); what was done is complete.
    pub cancelled: bool,
}

impl Summary {
    fn fail(&mut self, why: String) {
        self.failed += 1;
        tracing::warn!(reason = %why, "Reconciliation could not handle something.");
        if self.failures.len() < 50 {
            self.failures.push(why);
        }
    }

    /// Drift found (whether repaired or not).
    pub fn drift(&self) -> u64 {
        self.missing_in_store
            + self.stale_in_store
            + self.missing_lead
            + self.wrong_stage
            + self.relinked
            + self.recreated
    }

    /// The rows of the summary table, in order.
    pub fn rows(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("checked", self.checked),
            ("missing_in_store", self.missing_in_store),
            ("stale_in_store", self.stale_in_store),
            ("missing_lead", self.missing_lead),
            ("wrong_stage", self.wrong_stage),
            ("explained", self.explained),
            ("relinked", self.relinked),
            ("recreated", self.recreated),
            ("repaired", self.repaired),
            ("failed", self.failed),
        ]
    }

    fn add(&mut self, other: Summary) {
        self.checked += other.checked;
        self.missing_in_store += other.missing_in_store;
        self.stale_in_store += other.stale_in_store;
        self.missing_lead += other.missing_lead;
        self.wrong_stage += other.wrong_stage;
        self.explained += other.explained;
        self.relinked += other.relinked;
        self.recreated += other.recreated;
        self.repaired += other.repaired;
        self.failed += other.failed;
        self.failures.extend(other.failures);
        self.failures.truncate(50);
        self.dry_run |= other.dry_run;
        self.cancelled |= other.cancelled;
    }

    /// Adds up the summaries of several runs (one per CRM account).
    pub fn total(summaries: impl IntoIterator<Item = Summary>) -> Summary {
        let mut total = Summary::default();
        for s in summaries {
            total.add(s);
        }
        total
    }
}

/// What a run covers.
#[derive(Debug, Clone)]
pub struct Scope {
    pub crm_account: String,
    /// `None`: every shop of the account.
    pub shop: Option<String>,
    pub since: DateTime<Utc>,
    pub dry_run: bool,
}

/// Where a run is: its phase (e.g. `kaspi:shop`, `crm:main`), and how far.
pub type ProgressFn<'a> = dyn Fn(&str, u64, Option<u64>) + Send + Sync + 'a;

/// What a run reads from and writes to.
#[derive(Clone)]
pub struct Sources {
    pub pool: PgPool,
    pub maps: Arc<MapRegistry>,
    pub crm: BTreeMap<String, AmoClient>,
    pub kaspi: BTreeMap<String, KaspiClient>,
    pub avito: BTreeMap<String, AvitoClient>,
    /// Shop name → CRM account name.
    pub shop_crm: BTreeMap<String, String>,
}

/// The marketplace's view of an order, from phase 1.
struct Seen {
    status_key: String,
    /// Stored before this run (or ingested by it): phase 2 judges its lead.
    judge_lead: bool,
}

impl Sources {
    /// Carries out one run.
    pub async fn reconcile(
        &self,
        scope: &Scope,
        progress: &ProgressFn<'_>,
        cancel: &CancellationToken,
    ) -> Result<Summary, ReconcileError> {
        let mut summary = Summary {
            dry_run: scope.dry_run,
            ..Summary::default()
        };
        let shops: Vec<String> = self
            .shop_crm
            .iter()
            .filter(|(shop, crm)| {
                **crm == scope.crm_account && scope.shop.as_ref().is_none_or(|s| s == *shop)
            })
            .map(|(shop, _)| shop.clone())
            .collect();
        let mut seen: HashMap<(String, String), Seen> = HashMap::new();
        for shop in &shops {
            if cancel.is_cancelled() {
                summary.cancelled = true;
                return Ok(summary);
            }
            let crm_target = format!("amocrm:{}", scope.crm_account);
            let listed = if let Some(client) = self.kaspi.get(shop) {
                self.kaspi_phase(
                    client,
                    &crm_target,
                    scope,
                    &mut seen,
                    &mut summary,
                    progress,
                    cancel,
                )
                .await
            } else if let Some(client) = self.avito.get(shop) {
                self.avito_phase(
                    client,
                    &crm_target,
                    scope,
                    &mut seen,
                    &mut summary,
                    progress,
                )
                .await
            } else {
                Ok(())
            };
            if let Err(why) = listed {
                summary.fail(format!(
                    "shop `{shop}`: listing the marketplace failed: {why}"
                ));
            }
        }
        if cancel.is_cancelled() {
            summary.cancelled = true;
            return Ok(summary);
        }
        self.crm_phase(scope, &shops, &seen, &mut summary, progress, cancel)
            .await?;
        Ok(summary)
    }

    /// Compares one listed order with the store; ingests it when the store
    /// lacks it or is behind (unless dry).
    fn compare_listed(
        &self,
        order: &Order,
        content_hash: &str,
        known: Option<&orders::Known>,
        scope: &Scope,
        seen: &mut HashMap<(String, String), Seen>,
        summary: &mut Summary,
    ) -> Drift {
        summary.checked += 1;
        let key = (order.account.clone(), order.external_id.clone());
        let drift = match known {
            None => {
                summary.missing_in_store += 1;
                Drift::MissingInStore
            }
            Some(k) if k.content_hash != content_hash => {
                summary.stale_in_store += 1;
                Drift::Stale
            }
            Some(_) => Drift::None,
        };
        seen.insert(
            key,
            Seen {
                status_key: order.status.to_string(),
                // The store's intent fixes the lead of an order ingested now.
                judge_lead: drift == Drift::None,
            },
        );
        if drift != Drift::None && scope.dry_run {
            tracing::info!(order = %order.code, drift = ?drift, "Dry run: would ingest the order.");
        }
        drift
    }

    #[allow(clippy::too_many_arguments)]
    async fn kaspi_phase(
        &self,
        client: &KaspiClient,
        crm_target: &str,
        scope: &Scope,
        seen: &mut HashMap<(String, String), Seen>,
        summary: &mut Summary,
        progress: &ProgressFn<'_>,
        cancel: &CancellationToken,
    ) -> Result<(), String> {
        let shop = client.shop().to_string();
        let poller =
            super::kaspi_poll::KaspiPoller::new(client.clone(), self.pool.clone(), crm_target);
        let phase = format!("kaspi:{shop}");
        let spans = windows(scope.since, Utc::now());
        let total = spans.len() as u64;
        for (done, (start, end)) in spans.into_iter().enumerate() {
            progress(&phase, done as u64, Some(total));
            let mut run = PageRun::First;
            loop {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                let asked = Utc::now();
                let (listed, more) = client
                    .list_pages(start, end, run)
                    .await
                    .map_err(|e| e.to_string())?;
                let ids: Vec<String> = listed.iter().map(|o| o.order.external_id.clone()).collect();
                let known = orders::known(&self.pool, "kaspi", &shop, &ids)
                    .await
                    .map_err(|e| e.to_string())?;
                for order in listed {
                    let k = known.get(&order.order.external_id);
                    let drift = self.compare_listed(
                        &order.order,
                        &order.content_hash,
                        k,
                        scope,
                        seen,
                        summary,
                    );
                    if drift == Drift::None || scope.dry_run {
                        continue;
                    }
                    let code = order.order.code.clone();
                    let have_items = k.is_some_and(|k| k.has_items);
                    match poller.store_listed(order, have_items, asked).await {
                        Ok(()) => summary.repaired += 1,
                        Err(e) => summary.fail(format!("order {code}: ingesting failed: {e}")),
                    }
                }
                match more {
                    Some(next) => run = next,
                    None => break,
                }
            }
        }
        progress(&phase, total, Some(total));
        Ok(())
    }

    async fn avito_phase(
        &self,
        client: &AvitoClient,
        crm_target: &str,
        scope: &Scope,
        seen: &mut HashMap<(String, String), Seen>,
        summary: &mut Summary,
        progress: &ProgressFn<'_>,
    ) -> Result<(), String> {
        let shop = client.account().to_string();
        let phase = format!("avito:{shop}");
        progress(&phase, 0, None);
        // Every page's reading counts from the listing's start.
        let asked = Utc::now();
        let listed = client
            .orders(&[], &[], Some(scope.since))
            .await
            .map_err(|e| e.to_string())?;
        let total = listed.len() as u64;
        let ids: Vec<String> = listed.iter().map(|o| o.order.external_id.clone()).collect();
        let known = orders::known(&self.pool, "avito", &shop, &ids)
            .await
            .map_err(|e| e.to_string())?;
        for (done, order) in listed.into_iter().enumerate() {
            progress(&phase, done as u64, Some(total));
            let drift = self.compare_listed(
                &order.order,
                &order.content_hash,
                known.get(&order.order.external_id),
                scope,
                seen,
                summary,
            );
            if drift == Drift::None || scope.dry_run {
                continue;
            }
            match ingest::write_order(
                &self.pool,
                &order.order,
                &order.content_hash,
                crm_target,
                asked,
            )
            .await
            {
                Ok(_) => summary.repaired += 1,
                Err(e) => {
                    summary.fail(format!("order {}: ingesting failed: {e}", order.order.code))
                }
            }
        }
        progress(&phase, total, Some(total));
        Ok(())
    }

    async fn crm_phase(
        &self,
        scope: &Scope,
        shops: &[String],
        seen: &HashMap<(String, String), Seen>,
        summary: &mut Summary,
        progress: &ProgressFn<'_>,
        cancel: &CancellationToken,
    ) -> Result<(), ReconcileError> {
        let phase = format!("crm:{}", scope.crm_account);
        let client = self
            .crm
            .get(&scope.crm_account)
            .ok_or_else(|| ReconcileError::NoClient(scope.crm_account.clone()))?;
        let stored = store::orders_in_range(&self.pool, shops, scope.since).await?;
        // Orders the marketplace listed but the store lacks were counted in
        // phase 1; their leads come with their ingest.
        let stored: Vec<StoredOrder> = stored
            .into_iter()
            .filter(|o| {
                seen.get(&(o.account.clone(), o.external_id.clone()))
                    .is_none_or(|s| s.judge_lead)
            })
            .collect();
        // Stored orders the marketplace listing did not cover (older, active) count as checked too.
        summary.checked += stored
            .iter()
            .filter(|o| !seen.contains_key(&(o.account.clone(), o.external_id.clone())))
            .count() as u64;
        let total = stored.len() as u64;
        progress(&phase, 0, Some(total));
        // A repair of a lead found in another stage is dropped when a manager
        // moved it after this moment (its reading may not show the move).
        let judged_at = links::database_now(&self.pool).await?;
        let leads = match self.read_leads(client, scope.since, &stored).await {
            Ok(leads) => leads,
            Err(why) => {
                summary.fail(format!(
                    "CRM account `{}`: reading leads failed: {why}",
                    scope.crm_account
                ));
                return Ok(());
            }
        };
        let keys: Vec<String> = stored
            .iter()
            .map(|o| ingest::order_key(&o.marketplace, &o.account, &o.external_id))
            .collect();
        let ids: Vec<i64> = stored.iter().map(|o| o.order_id).collect();
        let explained = store::explanations(&self.pool, &scope.crm_account, &keys, &ids).await?;
        let maps = self.maps.current();
        let target = format!("amocrm:{}", scope.crm_account);
        for (done, order) in stored.iter().enumerate() {
            if cancel.is_cancelled() {
                summary.cancelled = true;
                return Ok(());
            }
            if done % 50 == 0 {
                progress(&phase, done as u64, Some(total));
            }
            let Some(map) = maps.shops.get(&order.account) else {
                summary.fail(format!(
                    "order {}: shop `{}` has no map",
                    order.code, order.account
                ));
                continue;
            };
            if !map.online {
                summary.fail(format!(
                    "order {}: the map of shop `{}` is not resolved against amoCRM",
                    order.code, order.account
                ));
                continue;
            }
            let status = seen
                .get(&(order.account.clone(), order.external_id.clone()))
                .map(|s| s.status_key.as_str())
                .unwrap_or(order.status_key.as_str());
            let expected = match map.route(status) {
                Some(Route::Stage {
                    stage_id: Some(id), ..
                }) => map.pipeline_id.map(|p| (p, *id)),
                Some(Route::Ignore) => None,
                _ => {
                    summary.fail(format!(
                        "order {}: status `{status}` has no stage in the map",
                        order.code
                    ));
                    continue;
                }
            };
            let key = ingest::order_key(&order.marketplace, &order.account, &order.external_id);
            let busy = explained.busy_keys.contains(&key);
            let repair = match (order.lead_id, expected) {
                (_, None) => None,
                (Some(lead_id), Some(stage)) => match leads.by_id.get(&(lead_id as u64)) {
                    None => {
                        summary.recreated += 1;
                        Some(Repair::Recreate { previous: lead_id })
                    }
                    Some(lead) if (lead.pipeline_id, lead.status_id) == stage => None,
                    Some(lead) => {
                        // The stored rows were read before the leads: a manager
                        // may have moved this lead since (found by the api-faults
                        // suite: such a move was "repaired" back). Judge the
                        // link as it is now.
                        let link = links::get(&self.pool, order.order_id).await?;
                        let known_manager_move = link.as_ref().is_some_and(|l| {
                            l.manager_moved
                                && l.pushed_pipeline_id == Some(lead.pipeline_id as i64)
                                && l.pushed_status_id == Some(lead.status_id as i64)
                        }) && !order.is_terminal;
                        if busy
                            || known_manager_move
                            || explained.awaiting_code.contains(&order.order_id)
                            || explained.unprocessed_leads.contains(&lead_id)
                        {
                            summary.explained += 1;
                            None
                        } else {
                            summary.wrong_stage += 1;
                            Some(Repair::Move)
                        }
                    }
                },
                (None, Some(_)) => {
                    let found = map
                        .fields
                        .get("order_code")
                        .and_then(|(_, id)| *id)
                        .and_then(|field| leads.by_code.get(&(field, order.code.clone())));
                    match found {
                        Some(lead) => {
                            summary.relinked += 1;
                            Some(Repair::Relink(lead.clone()))
                        }
                        None if busy => {
                            summary.explained += 1;
                            None
                        }
                        None => {
                            summary.missing_lead += 1;
                            Some(Repair::Create)
                        }
                    }
                }
            };
            let Some(repair) = repair else { continue };
            if scope.dry_run {
                tracing::info!(order = %order.code, repair = %repair.describe(), "Dry run: would repair.");
                continue;
            }
            match self
                .repair(order, &target, &scope.crm_account, repair, judged_at)
                .await
            {
                Ok(()) => summary.repaired += 1,
                Err(e) => summary.fail(format!("order {}: repair failed: {e}", order.code)),
            }
        }
        progress(&phase, total, Some(total));
        Ok(())
    }

    /// The leads of the range: those updated since its start (pages of 250),
    /// plus linked leads not among them, by id (pages of 250).
    async fn read_leads(
        &self,
        client: &AmoClient,
        since: DateTime<Utc>,
        stored: &[StoredOrder],
    ) -> Result<LeadIndex, crate::connectors::amocrm::AmoError> {
        let mut index = LeadIndex::default();
        let updated = read_with_retries("leads updated since the range's start", || {
            client.leads_updated_since(since.timestamp())
        })
        .await?;
        for lead in updated {
            index.add(lead);
        }
        let missing: Vec<u64> = stored
            .iter()
            .filter_map(|o| o.lead_id)
            .map(|id| id as u64)
            .filter(|id| !index.by_id.contains_key(id))
            .collect();
        if !missing.is_empty() {
            let by_id =
                read_with_retries("linked leads by id", || client.leads_by_ids(&missing)).await?;
            for lead in by_id {
                index.add(lead);
            }
        }
        Ok(index)
    }

    async fn repair(
        &self,
        order: &StoredOrder,
        target: &str,
        crm_account: &str,
        repair: Repair,
        judged_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut job = ingest::crm_sync_job_of(
            &OrderRef {
                marketplace: &order.marketplace,
                account: &order.account,
                external_id: &order.external_id,
                code: &order.code,
            },
            order.order_id,
            target,
        );
        let mut tx = self.pool.begin().await?;
        match &repair {
            Repair::Create => {
                // A lead may exist that the range's reads did not show: look first.
                job.payload["recover"] = true.into();
            }
            Repair::Move => {
                job.payload["force_stage"] = true.into();
                job.payload["judged_at"] = judged_at.to_rfc3339().into();
            }
            Repair::Recreate { previous } => {
                store::drop_link(&mut tx, order.order_id).await?;
                job.payload["replaces_lead"] = (*previous).into();
            }
            Repair::Relink(lead) => {
                links::insert_in(
                    &mut tx,
                    &links::Link {
                        order_id: order.order_id,
                        crm_account: crm_account.to_string(),
                        lead_id: lead.id as i64,
                        contact_id: lead.contact_ids.first().map(|c| *c as i64),
                        pushed_pipeline_id: Some(lead.pipeline_id as i64),
                        pushed_status_id: Some(lead.status_id as i64),
                        manager_moved: false,
                    },
                )
                .await?;
            }
        }
        crate::store::outbox::enqueue(&mut tx, &job).await?;
        tx.commit().await?;
        let what = repair.describe();
        tracing::info!(order = %order.code, repair = %what, "Reconciliation queued a repair.");
        crate::store::timeline::record(&self.pool, order.order_id, "reconcile", &what).await;
        Ok(())
    }
}

/// A read retried through transient failures (a 429 because another process
/// spent the account's second, a 5xx, a timeout): up to 5 tries, honouring
/// `retry_after`.
async fn read_with_retries<T, F, Fut>(
    what: &str,
    mut read: F,
) -> Result<T, crate::connectors::amocrm::AmoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::connectors::amocrm::AmoError>>,
{
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let error = match read().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let wait = match error.classify() {
            RetryAction::RetryAfter { after, .. } => after.min(std::time::Duration::from_secs(30)),
            RetryAction::Retry { .. } => std::time::Duration::from_secs(attempt),
            _ => return Err(error),
        };
        if attempt >= 5 {
            return Err(error);
        }
        tracing::warn!(%error, what, retry_in_ms = wait.as_millis() as u64, "Reading amoCRM failed; retrying.");
        tokio::time::sleep(wait).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drift {
    None,
    MissingInStore,
    Stale,
}

#[derive(Debug)]
enum Repair {
    Create,
    Move,
    Recreate { previous: i64 },
    Relink(Lead),
}

impl Repair {
    fn describe(&self) -> String {
        match self {
            Repair::Create => "no lead in amoCRM: its creation is queued".into(),
            Repair::Move => "the lead was in another stage than the map gives: moved back".into(),
            Repair::Recreate { previous } => {
                format!("lead {previous} was deleted in amoCRM: a new one is queued")
            }
            Repair::Relink(lead) => format!("lead {} found by the order code and linked", lead.id),
        }
    }
}

/// The leads read in phase 2, by id and by (field id, value) of their fields.
#[derive(Default)]
struct LeadIndex {
    by_id: HashMap<u64, Lead>,
    by_code: HashMap<(u64, String), Lead>,
}

impl LeadIndex {
    fn add(&mut self, lead: Lead) {
        for (field, values) in &lead.fields {
            for value in values {
                self.by_code
                    .entry((*field, value.trim().to_string()))
                    .or_insert_with(|| lead.clone());
            }
        }
        self.by_id.insert(lead.id, lead);
    }
}

/// Logs a finished run as one structured line and counts its outcomes.
pub fn report(scope: &Scope, summary: &Summary) {
    for (outcome, n) in summary.rows() {
        if outcome != "checked" {
            metrics::counter!("orderbridge_reconcile_total", "crm_account" => scope.crm_account.clone(), "outcome" => outcome)
                .increment(n);
        }
    }
    tracing::info!(
        crm_account = %scope.crm_account,
        shop = scope.shop.as_deref().unwrap_or("*"),
        since = %scope.since.to_rfc3339(),
        dry_run = summary.dry_run,
        checked = summary.checked,
        missing_in_store = summary.missing_in_store,
        stale_in_store = summary.stale_in_store,
        missing_lead = summary.missing_lead,
        wrong_stage = summary.wrong_stage,
        explained = summary.explained,
        relinked = summary.relinked,
        recreated = summary.recreated,
        repaired = summary.repaired,
        failed = summary.failed,
        cancelled = summary.cancelled,
        "Reconciliation done."
    );
}

/// The `reconcile` job: carries out the run its payload names, writing its
/// progress and summary to the run's row; stops early when the run's
/// cancellation is requested (by the command's Ctrl-C).
pub struct ReconcileHandler {
    pub sources: Sources,
}

/// The job that carries out run `run_id` on the CRM account's target.
pub fn job(crm_account: &str, run_id: i64) -> NewJob {
    NewJob {
        kind: RECONCILE_KIND.to_string(),
        target: format!("amocrm:{crm_account}"),
        ordering_key: format!("reconcile:{crm_account}"),
        dedupe_key: Some(format!("{RECONCILE_KIND}:run:{run_id}")),
        payload: serde_json::json!({ "run_id": run_id }),
        run_at: None,
    }
}

impl Handler for ReconcileHandler {
    type Error = ReconcileError;

    async fn run(&self, job: &JobContext) -> Result<(), ReconcileError> {
        let run_id = job.payload["run_id"]
            .as_i64()
            .ok_or_else(|| ReconcileError::BadPayload("no `run_id`".into()))?;
        let pool = &self.sources.pool;
        let run = store::run(pool, run_id)
            .await?
            .ok_or(ReconcileError::NoRun(run_id))?;
        if run.finished_at.is_some() {
            return Ok(());
        }
        store::mark_started(pool, run_id).await?;
        let scope = Scope {
            crm_account: run.crm_account,
            shop: run.shop,
            since: run.since,
            dry_run: run.dry_run,
        };
        let cancel = CancellationToken::new();
        // The command asks to stop through the run's row.
        let watcher = {
            let (pool, cancel) = (pool.clone(), cancel.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    if let Ok(Some(run)) = store::run(&pool, run_id).await {
                        if run.cancel_requested {
                            cancel.cancel();
                            return;
                        }
                    }
                }
            })
        };
        let progress = row_progress(pool.clone(), run_id);
        let result = self.sources.reconcile(&scope, &*progress, &cancel).await;
        watcher.abort();
        let summary = result?;
        report(&scope, &summary);
        let value = serde_json::to_value(&summary)
            .map_err(|e| ReconcileError::BadPayload(e.to_string()))?;
        store::finish(pool, run_id, &value).await?;
        Ok(())
    }

    fn classify(&self, error: &ReconcileError) -> RetryAction {
        match error {
            ReconcileError::Store(e) => RetryAction::retry(e.to_string()),
            ReconcileError::NoClient(_) => RetryAction::retry(error.to_string()),
            ReconcileError::BadPayload(_) | ReconcileError::NoRun(_) => {
                RetryAction::permanent(error.to_string())
            }
        }
    }
}

/// Progress written to the run's row, at most every 250 ms (and at each
/// phase's start and end).
fn row_progress(pool: PgPool, run_id: i64) -> Arc<ProgressFn<'static>> {
    let last = std::sync::Mutex::new((String::new(), std::time::Instant::now()));
    Arc::new(move |phase: &str, done: u64, total: Option<u64>| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let edge = last.0 != phase || Some(done) == total || done == 0;
        if !edge && last.1.elapsed() < std::time::Duration::from_millis(250) {
            return;
        }
        *last = (phase.to_string(), std::time::Instant::now());
        let (pool, phase) = (pool.clone(), phase.to_string());
        tokio::spawn(async move {
            if let Err(error) = store::set_progress(&pool, run_id, &phase, done, total).await {
                tracing::debug!(%error, "Could not record reconciliation progress.");
            }
        });
    })
}

/// How far back a periodic run reaches: its look-back, or further back to
/// the start of the last complete run when that is older (the daemon was down
/// longer than the look-back), less an overlap.
pub fn periodic_since(
    now: DateTime<Utc>,
    look_back: std::time::Duration,
    last_complete_start: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    let window = now - chrono::Duration::from_std(look_back).unwrap_or(chrono::Duration::days(2));
    match last_complete_start {
        Some(last) => {
            let from_last = last - chrono::Duration::minutes(10);
            from_last.min(window)
        }
        None => window,
    }
}

/// The daemon's periodic reconciliation of one CRM account: every `interval`,
/// unless a periodic run of the account is unfinished or finished within it,
/// records a run and enqueues its job (whichever replica holds the account's
/// target carries it out).
pub async fn enqueue_periodic(
    pool: &PgPool,
    crm_account: &str,
    interval: std::time::Duration,
    look_back: std::time::Duration,
) -> Result<Option<i64>, StoreError> {
    if store::recent_run(pool, crm_account, interval).await? {
        return Ok(None);
    }
    let last = store::last_complete_start(pool, crm_account).await?;
    let since = periodic_since(Utc::now(), look_back, last);
    let mut tx = pool.begin().await?;
    let run_id = store::create_run(&mut tx, crm_account, None, since, false, "periodic").await?;
    crate::store::outbox::enqueue(&mut tx, &job(crm_account, run_id)).await?;
    tx.commit().await?;
    tracing::info!(crm_account, since = %since.to_rfc3339(), run_id, "Periodic reconciliation queued.");
    Ok(Some(run_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_longer_than_the_look_back_is_covered_whole() {
        let now = DateTime::parse_from_rfc3339("2026-12-07T09:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap();
        let two_days = std::time::Duration::from_secs(2 * 86_400);
        // Down since Friday evening: the run reaches back to the last run's start.
        let friday = DateTime::parse_from_rfc3339("2026-12-04T18:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap();
        assert_eq!(
            periodic_since(now, two_days, Some(friday)),
            friday - chrono::Duration::minutes(10)
        );
        // A recent run: the look-back decides.
        let an_hour_ago = now - chrono::Duration::hours(1);
        assert_eq!(
            periodic_since(now, two_days, Some(an_hour_ago)),
            now - chrono::Duration::days(2)
        );
        assert_eq!(
            periodic_since(now, two_days, None),
            now - chrono::Duration::days(2)
        );
    }
}
