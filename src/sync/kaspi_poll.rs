//! The Kaspi poller. Kaspi has no webhooks and no "changed since" filter, so
//! each poll lists the current 14-day creation window (all pages, lines
//! included), diffs every order against its stored snapshot by content hash
//! (the re-signed waybill URL left out), fetches lines only for new orders that
//! came without them, and refreshes by id every active order older than the
//! window until it is terminal. After an outage longer than the window, the
//! gap since the cursor is listed first. Each listed page's changes are
//! committed together (ingest), so a poll that fails part-way keeps what it
//! saw; the cursor moves only when a poll completes.
//!
//! With many active orders a sweep takes longer than the poll interval (100
//! per page: 10,000 active orders are 100 pages). So that a new order is not
//! held up by the sweep, a poller given [`KaspiPoller::with_newest_every`]
//! lists the newest window (from a little before the newest time already
//! listed up to now) between the sweep's pages whenever that interval has
//! passed: new orders arrive within about one interval however long the
//! sweep. The listings run one after another in one task, so no order is
//! written from an older listing after a newer one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::ingest::{self, Written};
use crate::connectors::kaspi::{windows, KaspiClient, KaspiError, KaspiOrder, PageRun, MAX_WINDOW};
use crate::store::{orders, StoreError};

/// How far back a poll re-lists before the cursor after a gap.
const GAP_OVERLAP: chrono::Duration = chrono::Duration::minutes(10);
/// The list window stays this far inside Kaspi's 14-day limit (clock skew).
const WINDOW_MARGIN: chrono::Duration = chrono::Duration::minutes(1);
/// The newest-window listing starts this far before the newest time already
/// listed (an order's creation date may trail its visibility a little; the
/// sweep catches anything older).
const NEWEST_OVERLAP: chrono::Duration = chrono::Duration::seconds(30);

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Kaspi(#[from] KaspiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Orders written at the same time during a poll (each in its own transaction).
const WRITE_CONCURRENCY: usize = 8;

/// One order written.
struct WriteDone {
    written: Written,
    entries_fetched: bool,
}

impl PollReport {
    fn add(&mut self, done: WriteDone) {
        match done.written {
            Written::New => self.new += 1,
            Written::Changed { .. } => self.changed += 1,
            Written::Older => {}
        }
        if done.entries_fetched {
            self.entries_fetched += 1;
        }
    }
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    pub listed: usize,
    pub new: usize,
    pub changed: usize,
    pub unchanged: usize,
    /// Active orders older than the window, read one by one.
    pub refreshed: usize,
    /// Orders whose lines needed their own request.
    pub entries_fetched: usize,
    /// Newest-window listings made during the sweep.
    pub newest_listings: usize,
}

/// When the newest window was last listed, and up to when.
struct NewestWindow {
    every: Duration,
    state: std::sync::Mutex<NewestState>,
}

#[derive(Clone, Copy)]
struct NewestState {
    /// The newest creation time a listing has covered.
    covered_until: Option<DateTime<Utc>>,
    /// When a listing of the newest window is due next.
    due: tokio::time::Instant,
}

pub struct KaspiPoller {
    client: KaspiClient,
    pool: PgPool,
    /// Outbox target of the CRM sync intents (`amocrm:<account>`).
    crm_target: String,
    newest: Option<NewestWindow>,
}

impl KaspiPoller {
    pub fn new(client: KaspiClient, pool: PgPool, crm_target: impl Into<String>) -> Self {
        KaspiPoller {
            client,
            pool,
            crm_target: crm_target.into(),
            newest: None,
        }
    }

    /// Lists the newest window between a sweep's pages every `every` (the
    /// daemon gives its poll interval): see the module doc.
    pub fn with_newest_every(mut self, every: Duration) -> Self {
        self.newest = Some(NewestWindow {
            every,
            state: std::sync::Mutex::new(NewestState {
                covered_until: None,
                due: tokio::time::Instant::now() + every,
            }),
        });
        self
    }

    fn newest_state(&self) -> Option<(Duration, NewestState)> {
        self.newest.as_ref().map(|n| {
            let state = *n.state.lock().unwrap_or_else(|p| p.into_inner());
            (n.every, state)
        })
    }

    fn set_newest_state(&self, state: NewestState) {
        if let Some(n) = &self.newest {
            *n.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        }
    }

    /// Lists the newest window when it is due (see the module doc).
    async fn list_newest_if_due(&self, report: &mut PollReport) -> Result<(), PollError> {
        let Some((every, state)) = self.newest_state() else {
            return Ok(());
        };
        let Some(covered) = state.covered_until else {
            return Ok(());
        };
        if tokio::time::Instant::now() < state.due {
            return Ok(());
        }
        let now = Utc::now();
        let from = covered - NEWEST_OVERLAP;
        for (start, end) in windows(from, now) {
            let mut run = PageRun::First;
            loop {
                let asked = Utc::now();
                let (listed, more) = self.client.list_pages(start, end, run).await?;
                self.ingest(listed, asked, report).await?;
                match more {
                    Some(next) => run = next,
                    None => break,
                }
            }
        }
        report.newest_listings += 1;
        self.set_newest_state(NewestState {
            covered_until: Some(now.max(covered)),
            due: tokio::time::Instant::now() + every,
        });
        Ok(())
    }

    /// The sweep has listed up to `until`: the newest window starts from there.
    fn covered(&self, until: DateTime<Utc>) {
        if let Some((_, state)) = self.newest_state() {
            self.set_newest_state(NewestState {
                covered_until: Some(state.covered_until.map_or(until, |c| c.max(until))),
                ..state
            });
        }
    }

    /// One poll at `now`.
    #[tracing::instrument(skip_all, fields(marketplace = "kaspi", account = %self.client.shop()))]
    pub async fn poll_once(&self, now: DateTime<Utc>) -> Result<PollReport, PollError> {
        let shop = self.client.shop().to_string();
        orders::poll_started(&self.pool, "kaspi", &shop).await?;
        let result = self.poll(now).await;
        match &result {
            Ok(report) => {
                orders::poll_succeeded(&self.pool, "kaspi", &shop, now).await?;
                tracing::info!(
                    listed = report.listed,
                    new = report.new,
                    changed = report.changed,
                    refreshed = report.refreshed,
                    "Kaspi poll done."
                );
            }
            Err(error) => {
                orders::poll_failed(&self.pool, "kaspi", &shop, &error.to_string()).await?;
                tracing::warn!(%error, "Kaspi poll failed part-way; what it saw is kept, the next poll resumes.");
            }
        }
        result
    }

    async fn poll(&self, now: DateTime<Utc>) -> Result<PollReport, PollError> {
        let shop = self.client.shop().to_string();
        let window = chrono::Duration::from_std(MAX_WINDOW).unwrap_or(chrono::Duration::days(14));
        let window_from = now - window + WINDOW_MARGIN;
        let mut report = PollReport::default();
        // A gap longer than the window (an outage): list it first.
        let cursor = orders::cursor(&self.pool, "kaspi", &shop).await?;
        if let Some(until) = cursor.and_then(|c| c.listed_until) {
            let gap_from = until - GAP_OVERLAP;
            if gap_from < window_from {
                tracing::warn!(from = %gap_from, to = %window_from, "Listing the gap since the last complete poll.");
                self.list_and_ingest(gap_from, window_from, false, &mut report)
                    .await?;
            }
        }
        self.list_and_ingest(window_from, now, true, &mut report)
            .await?;
        // Active orders that left the window: one by one until terminal.
        for known in orders::active_created_before(&self.pool, "kaspi", &shop, window_from).await? {
            self.list_newest_if_due(&mut report).await?;
            let asked = Utc::now();
            match self.client.order(&known.external_id).await? {
                Some(order) => {
                    report.refreshed += 1;
                    if order.content_hash != known.content_hash {
                        let done = self.write(order, true, asked).await?;
                        report.add(done);
                    }
                }
                None => {
                    tracing::warn!(order = %known.external_id, "An active order is no longer known to Kaspi.")
                }
            }
        }
        Ok(report)
    }

    /// Lists `[from, to]` window by window and page run by page run, storing
    /// each run before reading the next: a failure keeps what came before it.
    /// `to_now`: `to` is the sweep's now (its last window's pages cover the
    /// newest edge).
    async fn list_and_ingest(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        to_now: bool,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        for (start, end) in windows(from, to) {
            let mut run = PageRun::First;
            loop {
                let asked = Utc::now();
                let (listed, more) = self.client.list_pages(start, end, run).await?;
                self.ingest(listed, asked, report).await?;
                if to_now && end >= to {
                    // The window that ends now: the newest window starts here.
                    self.covered(to);
                }
                self.list_newest_if_due(report).await?;
                match more {
                    Some(next) => run = next,
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Stores a listed page asked of Kaspi at `asked`.
    async fn ingest(
        &self,
        listed: Vec<KaspiOrder>,
        asked: DateTime<Utc>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        report.listed += listed.len();
        let ids: Vec<String> = listed.iter().map(|o| o.order.external_id.clone()).collect();
        let known = orders::known(&self.pool, "kaspi", self.client.shop(), &ids).await?;
        let mut changed = Vec::new();
        for order in listed {
            match known.get(&order.order.external_id) {
                Some(k)
                    if k.content_hash == order.content_hash
                        && (k.has_items || order.order.items.is_empty()) =>
                {
                    report.unchanged += 1;
                }
                Some(k) => changed.push((order, k.has_items)),
                None => changed.push((order, false)),
            }
        }
        // Lines first (several requests at once), then the page's changes in
        // one transaction; an order whose lines could not be read waits for
        // the next poll, the others are written.
        let mut prepared = futures::stream::iter(
            changed
                .into_iter()
                .map(|(order, have_items)| self.prepare(order, have_items)),
        )
        .buffer_unordered(WRITE_CONCURRENCY);
        let mut ready = Vec::new();
        let mut first_error = None;
        while let Some(outcome) = prepared.next().await {
            match outcome {
                Ok(done) => ready.push(done),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        let rows: Vec<(&crate::domain::Order, &str)> = ready
            .iter()
            .map(|(order, _)| (&order.order, order.content_hash.as_str()))
            .collect();
        let written = ingest::write_orders(&self.pool, &rows, &self.crm_target, asked).await?;
        let fetched: std::collections::HashMap<&str, (&KaspiOrder, bool)> = ready
            .iter()
            .map(|(order, fetched)| (order.order.external_id.as_str(), (order, *fetched)))
            .collect();
        for (external_id, written) in written {
            let Some((order, entries_fetched)) = fetched.get(external_id.as_str()) else {
                continue;
            };
            log_change(order, &written);
            report.add(WriteDone {
                written,
                entries_fetched: *entries_fetched,
            });
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Stores one listed order (asked of Kaspi at `asked`) the way a poll
    /// does (its lines fetched when neither the listing nor the store has
    /// them): for reconciliation.
    pub(crate) async fn store_listed(
        &self,
        order: KaspiOrder,
        have_items: bool,
        asked: DateTime<Utc>,
    ) -> Result<(), PollError> {
        self.write(order, have_items, asked).await.map(|_| ())
    }

    /// An order with its lines: fetched when neither the listing nor the
    /// store has them (and whether they were fetched).
    async fn prepare(
        &self,
        mut order: KaspiOrder,
        have_items: bool,
    ) -> Result<(KaspiOrder, bool), PollError> {
        let mut entries_fetched = false;
        if !order.items_included && !have_items {
            order.order.items = self.client.entries(&order.order.external_id).await?;
            entries_fetched = true;
        } else if !order.items_included && have_items {
            // Keep the stored lines: a read by id does not carry them.
            if let Some(stored) = orders::snapshot(
                &self.pool,
                "kaspi",
                self.client.shop(),
                &order.order.external_id,
            )
            .await?
            {
                order.order.items = stored.items;
            }
        }
        Ok((order, entries_fetched))
    }

    /// Writes one order asked of Kaspi at `asked` (fetching its lines first
    /// when it has none yet).
    async fn write(
        &self,
        order: KaspiOrder,
        have_items: bool,
        asked: DateTime<Utc>,
    ) -> Result<WriteDone, PollError> {
        let (order, entries_fetched) = self.prepare(order, have_items).await?;
        let written = ingest::write_order(
            &self.pool,
            &order.order,
            &order.content_hash,
            &self.crm_target,
            asked,
        )
        .await?;
        log_change(&order, &written);
        Ok(WriteDone {
            written,
            entries_fetched,
        })
    }

    /// Polls every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        super::every(interval, shutdown, || async {
            // A failure is logged and recorded in the cursor; the next round resumes.
            let _ = self.poll_once(Utc::now()).await;
        })
        .await
    }
}

fn log_change(order: &KaspiOrder, written: &Written) {
    if let Written::Changed {
        status_from: Some(from),
    } = written
    {
        tracing::info!(order = %order.order.code, from = %from, to = %order.order.status,
            "Kaspi order changed stage.");
    }
}
