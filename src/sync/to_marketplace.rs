//! CRM → marketplace. The amoCRM inbox processor claims stored lead changes
//! (webhooks and the events poll feed the one inbox; a change arriving both
//! ways is one item), judges each one and turns a manager's move into a stage
//! with a mapped action into one `marketplace_action` job. Judging, in order:
//! a change for a lead the bridge does not know is ignored with the reason; one
//! older than the newest change already applied to the lead is stale; one that
//! matches a move the bridge recorded before making it (any of them, within a
//! slack around the time) or that the bridge's own API user made is an echo; a
//! report of the stage the lead is already known to be in is a duplicate.
//! What remains is a manager's move: recorded; reverted (through the CRM sync)
//! when the order is already final at the marketplace; otherwise its stage's
//! action is queued. Its handler applies the action at Kaspi or Avito; one the
//! marketplace refuses or does not allow now is not sent but becomes a note on
//! the lead, a counted event, and a move of the lead back to the stage of the
//! order's marketplace status. Kaspi's completion takes two steps: the move
//! into the completion stage sends the buyer a code (step 1); the code the
//! manager types into the map's `completion_code` field completes the order
//! (step 2); Kaspi Delivery orders are completed by Kaspi, never by step 1.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;

use crate::connectors::amocrm::webhook::status_change_key;
use crate::connectors::amocrm::{AmoClient, AmoError, NewNote};
use crate::connectors::avito::{AvitoClient, AvitoError};
use crate::connectors::kaspi::{CancelReason, KaspiClient, KaspiError, Transition};
use crate::mapping::{MapRegistry, Route};
use crate::outbox::{Handler, JobContext, NewJob, RetryAction};
use crate::store::inbox::InboxRow;
use crate::store::{inbox, links, orders, StoreError};

/// Job kind of "apply this manager action at the marketplace".
pub const MARKETPLACE_ACTION_KIND: &str = "marketplace_action";

/// The action of Kaspi's completion step 2 (not a map action: the bridge
/// queues it when the buyer's code appears in the lead).
pub const COMPLETE_WITH_CODE: &str = "complete_with_code";

/// A reported change may precede the bridge's record of its push by this much
/// (clock skew between amoCRM and the bridge) ...
const ECHO_SLACK_BEFORE_S: i64 = 5;
/// ... and follow it by this much (the PATCH's own retries record again).
const ECHO_SLACK_AFTER_S: i64 = 120;

/// How many inbox items one claim takes.
const CLAIM: i64 = 200;

/// Processes stored amoCRM lead changes until none is left unclaimed; returns
/// how many marketplace actions were queued. `bridge_users` gives, per CRM
/// account, the user id the bridge's token acts as, where configured.
pub async fn process_amocrm_inbox(
    pool: &PgPool,
    maps: &MapRegistry,
    bridge_users: &BTreeMap<String, u64>,
    sla: &crate::sla::SlaPolicy,
) -> Result<usize, StoreError> {
    let mut queued = 0;
    loop {
        let mut tx = pool.begin().await?;
        let rows = inbox::claim_unprocessed(&mut tx, "amocrm", CLAIM).await?;
        if rows.is_empty() {
            return Ok(queued);
        }
        let mut deferred = false;
        for row in &rows {
            let judged = judge(&mut tx, pool, maps, bridge_users, sla, row).await?;
            if judged == Judged::Action {
                queued += 1;
            }
            metrics::counter!("orderbridge_crm_changes_total", "outcome" => judged.label())
                .increment(1);
            if judged == Judged::Deferred {
                deferred = true;
                continue;
            }
            inbox::mark_processed_as(&mut tx, row.id, Some(&judged.outcome())).await?;
        }
        tx.commit().await?;
        if deferred || (rows.len() as i64) < CLAIM {
            return Ok(queued);
        }
    }
}

/// What one reported change led to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Judged {
    /// A manager's move: its marketplace action was queued.
    Action,
    /// A manager's move of a lead whose order is final: moved back.
    Reverted,
    /// The bridge's own move reported back.
    Echo,
    /// The stage the lead is already known to be in.
    Duplicate,
    /// Older than the newest change already applied to the lead.
    Stale,
    /// The buyer's completion code may have been typed: checked at Kaspi.
    CodeCheck,
    /// Nothing to do, and why.
    Ignored(String),
    /// Not judged now (the shop's map is not resolved): stays in the inbox.
    Deferred,
    /// A partner lead's stage change: its status report is queued.
    PartnerReport,
}

impl Judged {
    fn label(&self) -> &'static str {
        match self {
            Judged::Action => "action",
            Judged::Reverted => "reverted",
            Judged::Echo => "echo",
            Judged::Duplicate => "duplicate",
            Judged::Stale => "stale",
            Judged::CodeCheck => "code_check",
            Judged::Ignored(_) => "ignored",
            Judged::Deferred => "deferred",
            Judged::PartnerReport => "partner_report",
        }
    }

    fn outcome(&self) -> String {
        match self {
            Judged::Ignored(reason) => format!("ignored: {reason}"),
            other => other.label().to_string(),
        }
    }
}

/// Why a change of a lead no order is linked to is set aside. A lead the
/// bridge created and then died before linking is linked by the retry, which
/// has such changes (a manager's move meanwhile) judged again.
fn unlinked_reason(lead_id: i64) -> String {
    format!("lead {lead_id} is not linked to any order")
}

/// The inbox outcome of a change set aside by [`unlinked_reason`].
pub fn unlinked_outcome(lead_id: i64) -> String {
    Judged::Ignored(unlinked_reason(lead_id)).outcome()
}

async fn judge(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    pool: &PgPool,
    maps: &MapRegistry,
    bridge_users: &BTreeMap<String, u64>,
    sla: &crate::sla::SlaPolicy,
    row: &InboxRow,
) -> Result<Judged, StoreError> {
    let p = &row.payload;
    let Some(lead_id) = p["lead_id"].as_i64() else {
        return Ok(Judged::Ignored("the change names no lead".into()));
    };
    let Some((marketplace, shop, external_id, link)) =
        links::by_lead_in(tx, &row.account, lead_id).await?
    else {
        if let Some(judged) =
            crate::sync::partner::judge_change(tx, pool, maps, row, lead_id).await?
        {
            return Ok(match judged {
                crate::sync::partner::Judged::Reported => Judged::PartnerReport,
                crate::sync::partner::Judged::Duplicate => Judged::Duplicate,
                crate::sync::partner::Judged::Stale => Judged::Stale,
                crate::sync::partner::Judged::Ignored(why) => Judged::Ignored(why),
                crate::sync::partner::Judged::Deferred => Judged::Deferred,
            });
        }
        tracing::debug!(crm_account = %row.account, lead_id, "A change of a lead the bridge does not know; ignored.");
        return Ok(Judged::Ignored(unlinked_reason(lead_id)));
    };
    if maps.current().shops.get(&shop).is_some_and(|m| !m.online) {
        // The map cannot tell stages apart yet: judged once it resolves.
        return Ok(Judged::Deferred);
    }
    // Changes of one lead are judged one after another, across replicas.
    let Some(state) = links::lock_state(tx, link.order_id).await? else {
        return Ok(Judged::Ignored("the link vanished".into()));
    };
    if row.kind == "lead_update" && state.awaiting_code_since.is_some() {
        // The buyer's code may have been typed. A move in the same change
        // arrives as its own status item and is judged there.
        queue_code_check(
            tx,
            &row.account,
            lead_id,
            &marketplace,
            &shop,
            &external_id,
            link.order_id,
            None,
        )
        .await?;
        return Ok(Judged::CodeCheck);
    }
    let changed_at = p["last_modified"].as_i64();
    let (Some(status_id), Some(pipeline_id)) = (p["status_id"].as_i64(), p["pipeline_id"].as_i64())
    else {
        return Ok(Judged::Ignored("the change carries no stage".into()));
    };
    if let (Some(at), Some(newest)) = (changed_at, state.crm_changed_at) {
        if at < newest {
            return Ok(Judged::Stale);
        }
    }
    let author = p["modified_user_id"].as_u64();
    let by_bridge = match (bridge_users.get(&row.account), author) {
        (Some(bridge), Some(author)) => Some(*bridge == author),
        _ => None,
    };
    // The author settles it where known; the record of pushes otherwise. A
    // change by someone else never consumes a push record.
    let echo = by_bridge != Some(false)
        && links::take_echo(
            tx,
            &row.account,
            lead_id,
            pipeline_id,
            status_id,
            changed_at,
            (ECHO_SLACK_BEFORE_S, ECHO_SLACK_AFTER_S),
        )
        .await?
        || by_bridge == Some(true);
    // A change makes earlier ones stale, except an update of the lead's
    // fields known (by its author) to be the bridge's own: that says nothing
    // about the stage, and a manager's earlier move heard after it (through
    // the events poll, its webhook lost) is still the lead's last move. Where
    // the author is unknown, an update item is what keeps an echo's late
    // twin (its push record taken by the update) from counting as a move.
    let bridges_own_update = row.kind == "lead_update" && by_bridge == Some(true);
    if let Some(at) = changed_at.filter(|_| !bridges_own_update) {
        links::set_crm_changed_at(tx, link.order_id, at).await?;
    }
    if echo {
        metrics::counter!("orderbridge_echoes_ignored_total").increment(1);
        return Ok(Judged::Echo);
    }
    let known_stage =
        link.pushed_pipeline_id == Some(pipeline_id) && link.pushed_status_id == Some(status_id);
    if known_stage {
        return Ok(Judged::Duplicate);
    }
    // A manager's move.
    links::set_manager_moved(tx, link.order_id, pipeline_id, status_id).await?;
    let order = orders::snapshot(pool, &marketplace, &shop, &external_id).await?;
    if let Some(order) = order.as_ref().filter(|o| o.is_terminal) {
        // The marketplace's final state wins: the CRM sync moves the lead back
        // and writes a note saying why.
        let job = crate::sync::ingest::crm_sync_job(
            order,
            link.order_id,
            &format!("amocrm:{}", row.account),
        );
        crate::store::outbox::enqueue(tx, &job).await?;
        metrics::counter!("orderbridge_conflicts_total", "marketplace" => marketplace.clone())
            .increment(1);
        tracing::info!(order = %order.code, lead_id, status = %order.status,
            "A manager moved the lead of an order that is final at the marketplace; moving it back.");
        return Ok(Judged::Reverted);
    }
    let map = maps.current().shops.get(&shop).cloned();
    // The stage history: the manager's move is an entry of its own, with the
    // SLA the map gives that stage; the manager who moved it is responsible.
    if let Some(Route::Stage {
        stage,
        role,
        sla: stage_sla,
        ..
    }) = map.as_ref().and_then(|m| m.stage_route(status_id as u64))
    {
        let now = chrono::Utc::now();
        let (warn_at, deadline) = sla.timers(
            now,
            *stage_sla,
            order.as_ref().and_then(|o| o.marketplace_deadline),
        );
        // One responsible per stage: the stage's role picks one (the CRM
        // write is a job of its own); without a role the manager who moved it.
        let picked = match (role, map.as_ref()) {
            (Some(role), Some(map)) => match map.roles.get(role) {
                Some(def) => {
                    Some(crate::sla::pick_responsible(pool, &row.account, role, def).await?)
                }
                None => None,
            },
            _ => None,
        };
        let responsible = match picked {
            Some(user) => user,
            None => author,
        };
        if let (Some(user), Some(role)) = (picked, role) {
            if user != author || user.is_none() {
                crate::store::outbox::enqueue(
                    tx,
                    &crate::sync::to_crm::assign_job(&crate::sync::to_crm::Assign {
                        order_id: link.order_id,
                        crm_account: &row.account,
                        lead_id,
                        marketplace: &marketplace,
                        shop: &shop,
                        external_id: &external_id,
                        role,
                        user,
                    }),
                )
                .await?;
            }
        }
        crate::store::sla::enter(
            tx,
            &crate::store::sla::NewEntry {
                order_id: link.order_id,
                crm_account: row.account.clone(),
                lead_id,
                pipeline_id,
                status_id,
                stage: stage.clone(),
                role: role.clone(),
                source: "manager",
                responsible_user_id: responsible.map(|a| a as i64),
                entered_at: now,
                warn_at,
                deadline,
            },
        )
        .await?;
    }
    let action = map
        .as_ref()
        .and_then(|m| m.action_for_stage(Some(status_id as u64), "").cloned());
    let Some(action) = action else {
        tracing::debug!(crm_account = %row.account, lead_id, status_id, "A manager's move into a stage with no marketplace action.");
        return Ok(Judged::Ignored(format!(
            "stage {status_id} has no marketplace action"
        )));
    };
    // Derived from the change: the same move seen twice queues one action.
    let change = changed_at
        .map(|at| at.to_string())
        .unwrap_or_else(|| format!("item{}", row.id));
    let job = NewJob {
        kind: MARKETPLACE_ACTION_KIND.into(),
        target: format!("{marketplace}:{shop}"),
        ordering_key: crate::sync::ingest::order_key(&marketplace, &shop, &external_id),
        dedupe_key: Some(format!(
            "{MARKETPLACE_ACTION_KIND}:{}:{lead_id}:{pipeline_id}:{status_id}:{change}",
            row.account
        )),
        payload: serde_json::json!({
            "order_id": link.order_id, "marketplace": marketplace, "account": shop,
            "external_id": external_id, "crm_account": row.account, "lead_id": lead_id,
            "action": action.action, "reason": action.reason, "comment": action.comment,
            "spaces": action.spaces,
        }),
        run_at: None,
    };
    crate::store::outbox::enqueue(tx, &job).await?;
    tracing::info!(order = %external_id, lead_id, action = %action.action, "A manager's move becomes a marketplace action.");
    Ok(Judged::Action)
}

/// Queues Kaspi completion step 2 for an order whose lead waits for the code:
/// the handler reads the code (from `code`, or from the lead) and completes.
#[allow(clippy::too_many_arguments)]
async fn queue_code_check(
    conn: &mut sqlx::PgConnection,
    crm_account: &str,
    lead_id: i64,
    marketplace: &str,
    shop: &str,
    external_id: &str,
    order_id: i64,
    code: Option<&str>,
) -> Result<(), StoreError> {
    let job = NewJob {
        kind: MARKETPLACE_ACTION_KIND.into(),
        target: format!("{marketplace}:{shop}"),
        ordering_key: crate::sync::ingest::order_key(marketplace, shop, external_id),
        dedupe_key: Some(format!(
            "{MARKETPLACE_ACTION_KIND}:{COMPLETE_WITH_CODE}:{order_id}"
        )),
        payload: serde_json::json!({
            "order_id": order_id, "marketplace": marketplace, "account": shop,
            "external_id": external_id, "crm_account": crm_account, "lead_id": lead_id,
            "action": COMPLETE_WITH_CODE, "code": code,
        }),
        run_at: None,
    };
    crate::store::outbox::enqueue(conn, &job).await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ToMarketplaceError {
    #[error(transparent)]
    Kaspi(#[from] KaspiError),
    #[error(transparent)]
    Avito(#[from] AvitoError),
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the job's payload is not a marketplace action: {0}")]
    BadPayload(String),
    #[error("no client for shop `{0}`")]
    NoClient(String),
}

/// The `marketplace_action` handler.
pub struct MarketplaceActionHandler {
    pub pool: PgPool,
    pub maps: Arc<MapRegistry>,
    pub kaspi: BTreeMap<String, KaspiClient>,
    pub avito: BTreeMap<String, AvitoClient>,
    pub crm: BTreeMap<String, AmoClient>,
}

/// What applying an action came to.
enum Applied {
    /// Done (or the order was already there).
    Done,
    /// Not sent, or refused: the reason, for the note; the lead goes back.
    Refused(String),
    /// Nothing to do (e.g. no completion code typed yet).
    Nothing,
}

impl Handler for MarketplaceActionHandler {
    type Error = ToMarketplaceError;

    async fn run(&self, job: &JobContext) -> Result<(), ToMarketplaceError> {
        let text = |k: &str| job.payload[k].as_str().map(str::to_string);
        let need =
            |k: &str| text(k).ok_or_else(|| ToMarketplaceError::BadPayload(format!("no `{k}`")));
        let (marketplace, shop, external_id, action) = (
            need("marketplace")?,
            need("account")?,
            need("external_id")?,
            need("action")?,
        );
        let applied = match marketplace.as_str() {
            "kaspi" => self.kaspi(job, &shop, &external_id, &action).await?,
            "avito" => {
                let client = self
                    .avito
                    .get(&shop)
                    .ok_or_else(|| ToMarketplaceError::NoClient(shop.clone()))?;
                match client.apply_transition(&external_id, &action).await {
                    Ok(_) => Applied::Done,
                    Err(
                        error @ (AvitoError::NotAvailable { .. }
                        | AvitoError::TransitionRefused { .. }),
                    ) => Applied::Refused(error.to_string()),
                    Err(error) => return Err(error.into()),
                }
            }
            other => {
                return Err(ToMarketplaceError::BadPayload(format!(
                    "unknown marketplace `{other}`"
                )))
            }
        };
        if let Some(order_id) = job.payload["order_id"].as_i64() {
            let timeline = crate::store::timeline::record;
            match &applied {
                Applied::Done => {
                    timeline(
                        &self.pool,
                        order_id,
                        "action_applied",
                        &format!("«{action}» applied at {marketplace}"),
                    )
                    .await
                }
                Applied::Refused(reason) => {
                    timeline(
                        &self.pool,
                        order_id,
                        "action_refused",
                        &format!(
                            "«{action}» not applied at {marketplace}: {reason}; the lead goes back"
                        ),
                    )
                    .await
                }
                Applied::Nothing => {}
            }
        }
        if let Applied::Refused(reason) = applied {
            // Not sent (or refused): the manager learns why on the lead, and
            // the lead goes back to the stage of the order's marketplace status.
            metrics::counter!("orderbridge_actions_not_allowed_total", "marketplace" => marketplace.clone()).increment(1);
            tracing::warn!(order = %external_id, action = %action, reason = %reason, "A manager's action is not allowed now; noted on the lead, which is moved back.");
            self.note(
                job,
                &format!("not-allowed-{}", job.id),
                &format!("orderbridge: «{action}» was not applied at {marketplace}: {reason}. The lead goes back to the stage of the order's current status."),
            )
            .await?;
            self.move_back(job, &marketplace, &shop, &external_id)
                .await?;
        }
        Ok(())
    }

    fn classify(&self, error: &ToMarketplaceError) -> RetryAction {
        match error {
            ToMarketplaceError::Kaspi(e) => e.classify(),
            ToMarketplaceError::Avito(e) => e.classify(),
            ToMarketplaceError::Amo(e) => e.classify(),
            ToMarketplaceError::Store(e) => RetryAction::retry(e.to_string()),
            ToMarketplaceError::BadPayload(_) | ToMarketplaceError::NoClient(_) => {
                RetryAction::permanent(error.to_string())
            }
        }
    }
}

impl MarketplaceActionHandler {
    async fn kaspi(
        &self,
        job: &JobContext,
        shop: &str,
        external_id: &str,
        action: &str,
    ) -> Result<Applied, ToMarketplaceError> {
        let text = |k: &str| job.payload[k].as_str().map(str::to_string);
        let client = self
            .kaspi
            .get(shop)
            .ok_or_else(|| ToMarketplaceError::NoClient(shop.to_string()))?;
        let order_id = job.payload["order_id"].as_i64().unwrap_or_default();
        let transition = match action {
            "accept" => Transition::Accept,
            "assemble" => Transition::Assemble {
                spaces: job.payload["spaces"].as_u64().unwrap_or(1) as u32,
            },
            "complete" => {
                let order = orders::snapshot(&self.pool, "kaspi", shop, external_id).await?;
                if order.as_ref().is_some_and(|o| o.delivery.by_marketplace) {
                    return Ok(Applied::Refused(
                        "Kaspi Delivery orders are completed by Kaspi when the courier hands them over; no code is sent".into(),
                    ));
                }
                Transition::SendCompletionCode
            }
            COMPLETE_WITH_CODE => {
                let Some(code) = self.typed_code(job, shop).await? else {
                    return Ok(Applied::Nothing);
                };
                return self
                    .complete_with_code(job, client, external_id, order_id, &code)
                    .await;
            }
            "cancel" => Transition::Cancel {
                reason: text("reason")
                    .as_deref()
                    .and_then(CancelReason::parse)
                    .ok_or_else(|| {
                        ToMarketplaceError::BadPayload("cancel without a valid reason".into())
                    })?,
                comment: text("comment"),
            },
            other => {
                return Err(ToMarketplaceError::BadPayload(format!(
                    "Kaspi has no action `{other}`"
                )))
            }
        };
        match client.transition(external_id, &transition).await {
            Ok(outcome) => {
                if matches!(transition, Transition::SendCompletionCode)
                    && outcome == crate::connectors::kaspi::TransitionOutcome::Done
                {
                    links::set_awaiting_code(&self.pool, order_id, true).await?;
                    let field = self
                        .code_field(shop)
                        .map(|(name, _)| format!("«{name}»"))
                        .unwrap_or_else(|| "the completion code field".into());
                    self.note(
                        job,
                        &format!("code-sent-{}", job.id),
                        &format!("orderbridge: Kaspi sent the buyer a completion code (step 1 of 2). When the buyer reads it out, type it into {field}: the bridge then completes the order at Kaspi."),
                    )
                    .await?;
                    tracing::info!(order = %external_id, "Kaspi completion step 1: the buyer got a code.");
                }
                Ok(Applied::Done)
            }
            Err(error @ KaspiError::TransitionNotAllowed { .. }) => {
                Ok(Applied::Refused(error.to_string()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Step 2: completes with the buyer's code; a wrong code is a note and
    /// the order stays where it is.
    async fn complete_with_code(
        &self,
        job: &JobContext,
        client: &KaspiClient,
        external_id: &str,
        order_id: i64,
        code: &str,
    ) -> Result<Applied, ToMarketplaceError> {
        {
            let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
            links::set_code_tried(&mut conn, order_id, code).await?;
        }
        let transition = Transition::Complete {
            security_code: code.to_string(),
        };
        match client.transition(external_id, &transition).await {
            Ok(_) => {
                links::set_awaiting_code(&self.pool, order_id, false).await?;
                self.note(
                    job,
                    &format!("completed-{}", job.id),
                    "orderbridge: the buyer's code was accepted; the order is completed at Kaspi.",
                )
                .await?;
                tracing::info!(order = %external_id, "Kaspi completion step 2: completed with the buyer's code.");
                Ok(Applied::Done)
            }
            Err(KaspiError::BadRequest(reason)) => {
                metrics::counter!("orderbridge_completion_codes_refused_total").increment(1);
                tracing::warn!(order = %external_id, reason = %reason, "Kaspi refused the completion code; noted on the lead.");
                self.note(
                    job,
                    &format!("code-refused-{}", job.id),
                    &format!("orderbridge: Kaspi did not accept the code typed into the lead ({reason}). The order is not completed; type the code the buyer reads out from the Kaspi app."),
                )
                .await?;
                Ok(Applied::Nothing)
            }
            Err(error @ KaspiError::TransitionNotAllowed { .. }) => {
                links::set_awaiting_code(&self.pool, order_id, false).await?;
                Ok(Applied::Refused(error.to_string()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The map's completion-code field of a shop: (name, id).
    fn code_field(&self, shop: &str) -> Option<(String, Option<u64>)> {
        self.maps
            .current()
            .shops
            .get(shop)
            .and_then(|m| m.fields.get("completion_code").cloned())
    }

    /// The code the manager typed: from the job, or read from the lead; `None`
    /// when empty or already tried.
    async fn typed_code(
        &self,
        job: &JobContext,
        shop: &str,
    ) -> Result<Option<String>, ToMarketplaceError> {
        let order_id = job.payload["order_id"].as_i64().unwrap_or_default();
        let code = match job.payload["code"].as_str() {
            Some(code) => Some(code.to_string()),
            None => {
                let Some((_, Some(field_id))) = self.code_field(shop) else {
                    return Ok(None);
                };
                let crm_account = job.payload["crm_account"].as_str().unwrap_or_default();
                let crm = self
                    .crm
                    .get(crm_account)
                    .ok_or_else(|| ToMarketplaceError::NoClient(crm_account.to_string()))?;
                let lead_id = job.payload["lead_id"].as_u64().unwrap_or_default();
                crm.lead(lead_id)
                    .await?
                    .and_then(|lead| completion_code(&lead.fields, field_id))
            }
        };
        let Some(code) = code.map(|c| c.trim().to_string()).filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let tried = links::awaiting_code_of(&self.pool, order_id).await?;
        match tried {
            // Not waiting (completed, or step 1 never sent): nothing to do.
            None => Ok(None),
            Some(Some(previous)) if previous == code => Ok(None),
            Some(_) => Ok(Some(code)),
        }
    }

    async fn note(
        &self,
        job: &JobContext,
        request_id: &str,
        text: &str,
    ) -> Result<(), ToMarketplaceError> {
        let crm_account = job.payload["crm_account"].as_str().unwrap_or_default();
        let lead_id = job.payload["lead_id"].as_u64().unwrap_or_default();
        let crm = self
            .crm
            .get(crm_account)
            .ok_or_else(|| ToMarketplaceError::NoClient(crm_account.to_string()))?;
        crm.add_notes(&[NewNote {
            request_id: request_id.to_string(),
            lead_id,
            text: text.to_string(),
        }])
        .await?;
        Ok(())
    }

    /// Re-reads the order at the marketplace and stores what it is now, which
    /// queues the CRM sync of the order: the lead goes to the stage of the
    /// order's current marketplace status (after this job: same ordering key).
    /// If the marketplace cannot be read now, the stored order is synced.
    async fn move_back(
        &self,
        job: &JobContext,
        marketplace: &str,
        shop: &str,
        external_id: &str,
    ) -> Result<(), ToMarketplaceError> {
        let crm_account = job.payload["crm_account"].as_str().unwrap_or_default();
        let crm_target = format!("amocrm:{crm_account}");
        let stored = orders::snapshot(&self.pool, marketplace, shop, external_id).await?;
        let asked = chrono::Utc::now();
        let fresh = match marketplace {
            "kaspi" => match self.kaspi.get(shop).map(|c| c.order(external_id)) {
                Some(read) => read
                    .await
                    .map(|o| o.map(|o| (o.order, o.content_hash, o.items_included))),
                None => Ok(None),
            }
            .map_err(|e| e.to_string()),
            "avito" => match self.avito.get(shop).map(|c| c.order(external_id)) {
                Some(read) => read
                    .await
                    .map(|o| o.map(|o| (o.order, o.content_hash, true))),
                None => Ok(None),
            }
            .map_err(|e| e.to_string()),
            _ => Ok(None),
        };
        match fresh {
            Ok(Some((mut order, content_hash, items_included))) => {
                if !items_included {
                    // A read by id does not carry the lines: keep the stored ones.
                    if let Some(stored) = &stored {
                        order.items = stored.items.clone();
                    }
                }
                let written = crate::sync::ingest::write_order(
                    &self.pool,
                    &order,
                    &content_hash,
                    &crm_target,
                    asked,
                )
                .await?;
                if written != crate::sync::ingest::Written::Older {
                    // Its CRM sync came with it.
                    return Ok(());
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(order = %external_id, %error, "Could not re-read the order after a refused action; the lead follows the stored status.");
            }
        }
        // The stored order (read again: a poll may have stored a newer one).
        let Some(order) = orders::snapshot(&self.pool, marketplace, shop, external_id).await?
        else {
            return Ok(());
        };
        let order_id = job.payload["order_id"].as_i64().unwrap_or_default();
        let intent = crate::sync::ingest::crm_sync_job(&order, order_id, &crm_target);
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        crate::store::outbox::enqueue(&mut conn, &intent).await?;
        Ok(())
    }
}

/// The first value of a lead's custom field, as text.
fn completion_code(fields: &[(u64, Vec<String>)], field_id: u64) -> Option<String> {
    fields
        .iter()
        .find(|(id, _)| *id == field_id)
        .and_then(|(_, values)| values.first().cloned())
}

/// The fallback for lost webhooks, and the only intake without a public URL:
/// amoCRM's `lead_status_changed` events since the cursor (minus `overlap`) go
/// into the inbox under the same key a webhook of that change gets, so a
/// change seen both ways is one item. The cursor moves only after every page
/// was read and stored: a malformed page fails the round, and the next one
/// re-reads the window. Returns how many items were new.
pub async fn poll_amocrm_events(
    client: &AmoClient,
    pool: &PgPool,
    overlap: std::time::Duration,
) -> Result<u64, EventsError> {
    let account = client.account_name().to_string();
    let started = chrono::Utc::now();
    let overlap = chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::minutes(5));
    let cursor = crate::store::orders::cursor(pool, "amocrm_events", &account).await?;
    let from = cursor
        .and_then(|c| c.listed_until)
        .map(|until| until - overlap)
        .unwrap_or(started - chrono::Duration::hours(1));
    crate::store::orders::poll_started(pool, "amocrm_events", &account).await?;
    let events = client.status_changes_since(from.timestamp()).await?;
    let items: Vec<inbox::NewInboxItem> = events
        .iter()
        .filter_map(|e| {
            let (pipeline_id, status_id) = e.after?;
            Some(inbox::NewInboxItem {
                source: "amocrm".into(),
                account: account.clone(),
                kind: "lead_status".into(),
                dedupe_key: status_change_key(&account, e.lead_id, pipeline_id, status_id, e.created_at),
                payload: serde_json::json!({
                    "lead_id": e.lead_id, "status_id": status_id, "pipeline_id": pipeline_id,
                    "modified_user_id": e.created_by, "last_modified": e.created_at, "via": "events",
                    "event_id": e.id,
                }),
            })
        })
        .collect();
    let new = inbox::insert(pool, &items).await?;
    crate::store::orders::poll_succeeded(pool, "amocrm_events", &account, started).await?;
    if new > 0 {
        tracing::info!(crm_account = %account, new, "The events poll found lead changes.");
    }
    Ok(new)
}

/// Kaspi completion step 2 without webhooks: reads the leads that wait for the
/// buyer's code (≤250 per request) and queues the completion for each one
/// whose code field holds a code not tried yet. Returns how many were queued.
pub async fn check_completion_codes(
    client: &AmoClient,
    pool: &PgPool,
    maps: &MapRegistry,
) -> Result<usize, EventsError> {
    let account = client.account_name().to_string();
    let waiting = links::awaiting_code(pool, &account).await?;
    if waiting.is_empty() {
        return Ok(0);
    }
    let ids: Vec<u64> = waiting.iter().map(|(id, _)| *id as u64).collect();
    let leads = client.leads_by_ids(&ids).await?;
    let current = maps.current();
    let mut queued = 0;
    for lead in leads {
        let Some((marketplace, shop, external_id, link)) =
            links::by_lead(pool, &account, lead.id as i64).await?
        else {
            continue;
        };
        let Some((_, Some(field_id))) = current
            .shops
            .get(&shop)
            .and_then(|m| m.fields.get("completion_code"))
        else {
            continue;
        };
        let Some(code) = completion_code(&lead.fields, *field_id)
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
        else {
            continue;
        };
        let tried = waiting
            .iter()
            .find(|(id, _)| *id == lead.id as i64)
            .and_then(|(_, tried)| tried.as_deref());
        if tried == Some(code.as_str()) {
            continue;
        }
        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
        queue_code_check(
            &mut conn,
            &account,
            lead.id as i64,
            &marketplace,
            &shop,
            &external_id,
            link.order_id,
            Some(&code),
        )
        .await?;
        queued += 1;
    }
    Ok(queued)
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
