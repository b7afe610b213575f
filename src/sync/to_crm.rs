//! Marketplace → CRM: the handler of `crm_sync_order` intents. Level-triggered:
//! it reads the order as stored now and makes its lead reflect it. A new order
//! becomes one lead (found again by its code after a crash, never created
//! twice) in the mapped stage, with its contact (de-duplicated by phone and
//! email: the local index first, then amoCRM's search checked field by field)
//! and the map's fields and tags; a later status moves the lead (status and
//! pipeline together). Creations and moves go through the account's
//! [`CrmWriter`], which batches them across orders (≤50 per request); the
//! contact comes from the local index ([`contact_index`]), so a new customer's
//! contact is created inside the lead's own `/leads/complex` request. What the
//! bridge sets is remembered, so its own changes echoed back by webhooks can be
//! told from a manager's.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;

use crate::connectors::amocrm::{
    AmoClient, AmoError, FieldInput, FieldValue, LeadUpdate, NewComplexLead, NewContact, NewLead,
    NewNote, NewTask,
};
use crate::domain::Order;
use crate::mapping::{MapRegistry, Route, RoutingMap};
use crate::outbox::{Handler, JobContext, RetryAction};
use crate::sla::SlaPolicy;
use crate::store::links::{self, Link};
use crate::store::{inbox, orders, timeline, StoreError};
use crate::sync::contact_index;
use crate::sync::crm_writer::{CrmWriter, WriteError};

#[derive(Debug, thiserror::Error)]
pub enum ToCrmError {
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Write(WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the job's payload is not an order intent: {0}")]
    BadPayload(String),
    #[error("order {0} is not in the store")]
    NoOrder(String),
    #[error("shop `{0}` has no map in force")]
    NoMap(String),
    /// Starts with [`crate::mapping::UNRESOLVED`]: released when the maps resolve.
    #[error("maps unresolved: the map of shop `{shop}` is not resolved against CRM account `{crm_account}` ({why}); nothing is written to it until it is")]
    MapOffline {
        shop: String,
        crm_account: String,
        why: String,
    },
    #[error("status `{status}` of order {code} has no row in the map of shop `{shop}`")]
    Unmapped {
        shop: String,
        code: String,
        status: String,
    },
    #[error("no CRM client for account `{0}`")]
    NoClient(String),
    #[error("amoCRM refused the lead of order {code}: {reason}")]
    Refused { code: String, reason: String },
}

/// Job kind of "make the stage's responsible the lead's responsible" (after a
/// manager's move into a stage with a role).
pub const ASSIGN_KIND: &str = "crm_assign_responsible";

/// What an assignment job carries.
pub struct Assign<'a> {
    pub order_id: i64,
    pub crm_account: &'a str,
    pub lead_id: i64,
    pub marketplace: &'a str,
    pub shop: &'a str,
    pub external_id: &'a str,
    pub role: &'a str,
    /// `None`: nobody in the role can be assigned (the supervisor is alerted).
    pub user: Option<u64>,
}

/// The job that sets (or, with nobody to set, alerts about) a lead's
/// responsible; ordered with the order's other jobs.
pub fn assign_job(assign: &Assign<'_>) -> crate::outbox::NewJob {
    crate::outbox::NewJob {
        kind: ASSIGN_KIND.to_string(),
        target: format!("amocrm:{}", assign.crm_account),
        ordering_key: crate::sync::ingest::order_key(
            assign.marketplace,
            assign.shop,
            assign.external_id,
        ),
        dedupe_key: None,
        payload: serde_json::json!({
            "order_id": assign.order_id, "crm_account": assign.crm_account, "lead_id": assign.lead_id,
            "marketplace": assign.marketplace, "account": assign.shop, "external_id": assign.external_id,
            "role": assign.role, "user": assign.user,
        }),
        run_at: None,
    }
}

/// The `crm_sync_order` handler (and, registered as a shared handler, the
/// `crm_assign_responsible` one).
pub struct CrmSyncHandler {
    pool: PgPool,
    /// CRM clients by CRM account name.
    clients: BTreeMap<String, AmoClient>,
    /// The batching writer of each CRM account.
    writers: BTreeMap<String, CrmWriter>,
    maps: Arc<MapRegistry>,
    /// Shop name → CRM account name.
    shop_crm: BTreeMap<String, String>,
    /// One customer, one contact: creations for the same phone wait for each
    /// other. Striped so the table never grows; all jobs of a CRM account run
    /// in the replica that holds its target lease, so an in-process lock is
    /// enough.
    contact_locks: Vec<tokio::sync::Mutex<()>>,
    /// Working time and warnings: each stage entry's SLA timers.
    sla: Arc<SlaPolicy>,
}

const CONTACT_LOCK_STRIPES: usize = 1024;

/// The tag of a lead nobody could be made responsible for.
pub const UNASSIGNED_TAG: &str = "без ответственного";
/// The map's role whose users get the tasks about unassigned orders.
pub const SUPERVISOR_ROLE: &str = "supervisor";

impl CrmSyncHandler {
    /// Restarts the accounts' writers holding each request up to the
    /// account's `fill` for more writes (accounts not named keep theirs).
    pub fn with_batch_fill(mut self, fill: &BTreeMap<String, std::time::Duration>) -> Self {
        for (name, client) in &self.clients {
            if let Some(fill) = fill.get(name) {
                self.writers.insert(
                    name.clone(),
                    CrmWriter::start_filling(client.clone(), *fill),
                );
            }
        }
        self
    }

    /// Builds the handler and starts one batching writer per CRM account
    /// (needs a tokio runtime).
    pub fn new(
        pool: PgPool,
        clients: BTreeMap<String, AmoClient>,
        maps: Arc<MapRegistry>,
        shop_crm: BTreeMap<String, String>,
    ) -> CrmSyncHandler {
        let writers = clients
            .iter()
            .map(|(name, client)| (name.clone(), CrmWriter::start(client.clone())))
            .collect();
        CrmSyncHandler {
            pool,
            clients,
            writers,
            maps,
            shop_crm,
            contact_locks: (0..CONTACT_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            sla: Arc::new(SlaPolicy::default()),
        }
    }

    /// The SLA policy of the stage entries it records (default: around the
    /// clock in Asia/Almaty, warnings at 80%).
    pub fn with_sla(mut self, sla: SlaPolicy) -> CrmSyncHandler {
        self.sla = Arc::new(sla);
        self
    }
}

/// Who is responsible for an order in the stage its status maps to.
struct Assignment {
    user: Option<u64>,
    role: Option<String>,
    /// The stage has a role but nobody in it can be assigned.
    unassigned: bool,
}

impl Handler for CrmSyncHandler {
    type Error = ToCrmError;

    async fn run(&self, job: &JobContext) -> Result<(), ToCrmError> {
        if job.kind == ASSIGN_KIND {
            return self.assign_responsible(job).await;
        }
        let field = |k: &str| {
            job.payload[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ToCrmError::BadPayload(format!("no `{k}`")))
        };
        let (marketplace, shop, external_id) = (
            field("marketplace")?,
            field("account")?,
            field("external_id")?,
        );
        // Ingest put the order's row id in the intent: read by primary key.
        let order_id = job.payload["order_id"]
            .as_i64()
            .ok_or_else(|| ToCrmError::BadPayload("no `order_id`".into()))?;
        let order = orders::snapshot_by_id(&self.pool, order_id)
            .await?
            .filter(|o| {
                o.marketplace.as_str() == marketplace
                    && o.account == shop
                    && o.external_id == external_id
            })
            .ok_or_else(|| ToCrmError::NoOrder(external_id.clone()))?;
        // The map this job started with stays in force for the whole job.
        let maps = self.maps.current();
        let map = maps
            .shops
            .get(&shop)
            .ok_or_else(|| ToCrmError::NoMap(shop.clone()))?;
        let crm_account = self
            .shop_crm
            .get(&shop)
            .ok_or_else(|| ToCrmError::NoClient(shop.clone()))?;
        let (Some(client), Some(writer)) =
            (self.clients.get(crm_account), self.writers.get(crm_account))
        else {
            return Err(ToCrmError::NoClient(crm_account.clone()));
        };
        if !map.online {
            return Err(ToCrmError::MapOffline {
                why: maps
                    .unresolved
                    .get(crm_account)
                    .cloned()
                    .unwrap_or_else(|| "not resolved yet".into()),
                shop,
                crm_account: crm_account.clone(),
            });
        }
        let route = map
            .route(order.status.as_str())
            .ok_or_else(|| ToCrmError::Unmapped {
                shop: shop.clone(),
                code: order.code.clone(),
                status: order.status.to_string(),
            })?;
        let stage = match route {
            Route::Stage {
                stage_id: Some(id), ..
            } => map.pipeline_id.map(|p| (p, *id)),
            Route::Stage { stage_id: None, .. } => {
                return Err(ToCrmError::MapOffline {
                    why: "a stage has no id".into(),
                    shop,
                    crm_account: crm_account.clone(),
                })
            }
            Route::Ignore => None,
        };
        match links::get(&self.pool, order_id).await? {
            Some(link) => {
                // A repair (reconciliation found the lead elsewhere) moves it
                // even when the bridge believes it set that stage already.
                let force_stage = job.payload["force_stage"].as_bool() == Some(true);
                if force_stage
                    && self
                        .moved_since_judged(job, &order, order_id, &link)
                        .await?
                {
                    return Ok(());
                }
                let link = if force_stage {
                    Link {
                        pushed_pipeline_id: None,
                        pushed_status_id: None,
                        ..link
                    }
                } else {
                    link
                };
                self.update(
                    client,
                    writer,
                    map,
                    &order,
                    order_id,
                    &link,
                    stage,
                    force_stage,
                )
                .await
            }
            None => {
                let Some(stage) = stage else {
                    // An ignored status before the order has a lead: nothing to show yet.
                    return Ok(());
                };
                // A retry (the previous attempt may have created the lead and
                // died before linking it) or a repair looks for the lead first.
                let recover = job.attempt > 1 || job.payload["recover"].as_bool() == Some(true);
                let target = Creation {
                    client,
                    writer,
                    crm_account,
                    map,
                    order_id,
                    stage,
                    replaces_lead: job.payload["replaces_lead"].as_i64(),
                    job,
                };
                self.create(&target, &order, recover).await
            }
        }
    }

    fn classify(&self, error: &ToCrmError) -> RetryAction {
        match error {
            ToCrmError::Amo(e) => e.classify(),
            ToCrmError::Write(e) => e.classify(),
            ToCrmError::Store(e) => RetryAction::retry(e.to_string()),
            // The map may resolve once the CRM answers or an admin fixes it.
            // Not a failure: the job waits until the maps resolve (released then).
            ToCrmError::MapOffline { .. } => RetryAction::Wait {
                after: std::time::Duration::from_secs(30),
                reason: error.to_string(),
            },
            ToCrmError::NoMap(_) => RetryAction::retry(error.to_string()),
            ToCrmError::BadPayload(_)
            | ToCrmError::NoOrder(_)
            | ToCrmError::Unmapped { .. }
            | ToCrmError::NoClient(_)
            | ToCrmError::Refused { .. } => RetryAction::permanent(error.to_string()),
        }
    }
}

/// Where a new lead goes.
struct Creation<'a> {
    client: &'a AmoClient,
    writer: &'a CrmWriter,
    crm_account: &'a str,
    map: &'a RoutingMap,
    order_id: i64,
    stage: (u64, u64),
    /// The order's previous lead, deleted in the CRM (reconciliation recreates it).
    replaces_lead: Option<i64>,
    /// The job: what went partly wrong is kept in its attempt's record.
    job: &'a JobContext,
}

impl CrmSyncHandler {
    /// Whether a manager moved the lead after the reconciliation that queued
    /// this repair judged it in the wrong stage (`judged_at`: the database's
    /// clock before it read the leads). The manager's move is the newer truth:
    /// forcing the map's stage would undo it (its action goes to the
    /// marketplace and the order's new status brings the lead's stage).
    async fn moved_since_judged(
        &self,
        job: &JobContext,
        order: &Order,
        order_id: i64,
        link: &Link,
    ) -> Result<bool, ToCrmError> {
        let Some(judged_at) = job.payload["judged_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        else {
            return Ok(false);
        };
        if !links::manager_moved_since(&self.pool, order_id, judged_at.with_timezone(&chrono::Utc))
            .await?
        {
            return Ok(false);
        }
        tracing::info!(order = %order.code, lead_id = link.lead_id,
            "A manager moved the lead after the reconciliation judged its stage; the repair is dropped and the manager's move stands.");
        timeline::record(
            &self.pool,
            order_id,
            "reconcile",
            "repair dropped: a manager moved the lead after the reconciliation judged it",
        )
        .await;
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    async fn update(
        &self,
        client: &AmoClient,
        writer: &CrmWriter,
        map: &RoutingMap,
        order: &Order,
        order_id: i64,
        link: &Link,
        stage: Option<(u64, u64)>,
        force_stage: bool,
    ) -> Result<(), ToCrmError> {
        // The lead's content: written again only when what the map puts in changed.
        let values = fields(map, order);
        let content = lead_content(order, &values);
        let content_changed = links::pushed_content(&self.pool, order_id)
            .await?
            .as_deref()
            != Some(content.as_str());
        let mut move_to = stage.filter(|(p, s)| {
            link.pushed_pipeline_id != Some(*p as i64) || link.pushed_status_id != Some(*s as i64)
        });
        if move_to.is_some()
            && !order.is_terminal
            && links::is_awaiting_code(&self.pool, order_id).await?
        {
            // Kaspi completion between its two steps: the lead stays in the
            // completion stage where the manager put it.
            move_to = None;
        }
        if move_to.is_some()
            && link.manager_moved
            && !order.is_terminal
            && crate::store::outbox::has_unfinished(
                &self.pool,
                crate::sync::to_marketplace::MARKETPLACE_ACTION_KIND,
                &crate::sync::ingest::order_key(
                    order.marketplace.as_str(),
                    &order.account,
                    &order.external_id,
                ),
            )
            .await?
        {
            // The manager's move is still being applied at the marketplace: its
            // outcome decides (the order changes, or a refusal moves the lead back).
            tracing::debug!(order = %order.code, "The manager's action is still on its way; the lead stays.");
            move_to = None;
        }
        if move_to.is_none() && !content_changed {
            return Ok(());
        }
        // Recorded before the request: its echo may arrive before the answer.
        let intended_at = match move_to {
            Some((pipeline_id, status_id)) => Some(
                links::record_push(
                    &self.pool,
                    &link.crm_account,
                    link.lead_id,
                    pipeline_id as i64,
                    status_id as i64,
                )
                .await?,
            ),
            None => None,
        };
        // A new stage gets its responsible from the stage's role.
        let assignment = match move_to {
            Some(_) => Some(self.assign(&link.crm_account, map, order).await?),
            None => None,
        };
        writer
            .update(LeadUpdate {
                id: link.lead_id as u64,
                stage: move_to,
                price: Some(order.total.major_rounded()),
                fields: if content_changed { values } else { Vec::new() },
                responsible_user_id: assignment.as_ref().and_then(|a| a.user),
                tags_to_add: if assignment.as_ref().is_some_and(|a| a.unassigned) {
                    vec![UNASSIGNED_TAG.to_string()]
                } else {
                    Vec::new()
                },
                ..LeadUpdate::default()
            })
            .await
            .map_err(|e| write_refused(order, e))?;
        if let (Some(stage), Some(assignment)) = (move_to, &assignment) {
            self.entered(
                order_id,
                &link.crm_account,
                link.lead_id,
                stage,
                map,
                order,
                assignment,
                if force_stage { "bridge" } else { "marketplace" },
            )
            .await?;
            if assignment.unassigned {
                self.alert_unassigned(
                    client,
                    map,
                    order,
                    order_id,
                    link.lead_id as u64,
                    assignment,
                )
                .await?;
            }
        }
        if content_changed {
            links::set_pushed_content(&self.pool, order_id, &content).await?;
        }
        let (Some((pipeline_id, status_id)), Some(intended_at)) = (move_to, intended_at) else {
            tracing::info!(order = %order.code, lead_id = link.lead_id, "The lead's fields follow the order's changed content.");
            timeline::record(
                &self.pool,
                order_id,
                "lead_updated",
                "the lead's fields and price follow the order's changed content",
            )
            .await;
            return Ok(());
        };
        timeline::record(
            &self.pool,
            order_id,
            "lead_moved",
            &format!(
                "lead {} moved to stage «{}» ({status_id}) for status {}{}",
                link.lead_id,
                stage_name(map, order),
                order.status,
                if content_changed {
                    ", fields updated"
                } else {
                    ""
                }
            ),
        )
        .await;
        if !links::set_pushed_since(
            &self.pool,
            order_id,
            pipeline_id as i64,
            status_id as i64,
            intended_at,
        )
        .await?
        {
            tracing::info!(order = %order.code, lead_id = link.lead_id,
                "A manager moved the lead while the bridge was moving it; the manager's move is kept on record.");
        }
        if order.is_terminal && link.manager_moved {
            // The marketplace's final state wins over a manager's move: say why.
            let stage = client
                .stage(pipeline_id, status_id)
                .await?
                .map(|s| s.name)
                .unwrap_or_else(|| status_id.to_string());
            client
                .add_notes(&[NewNote {
                    request_id: format!("terminal-{}", order.code),
                    lead_id: link.lead_id as u64,
                    text: format!(
                        "orderbridge: the order is {} at {}; the lead was moved back to «{stage}». A final marketplace status always wins.",
                        order.status,
                        order.marketplace.as_str()
                    ),
                }])
                .await?;
            metrics::counter!("orderbridge_conflicts_total", "marketplace" => order.marketplace.as_str()).increment(1);
            timeline::record(
                &self.pool,
                order_id,
                "conflict",
                &format!(
                    "a manager's move lost to the final status {}; noted on the lead",
                    order.status
                ),
            )
            .await;
        }
        tracing::info!(order = %order.code, lead_id = link.lead_id, status = %order.status, "Lead moved to the mapped stage.");
        Ok(())
    }

    async fn create(
        &self,
        to: &Creation<'_>,
        order: &Order,
        recover: bool,
    ) -> Result<(), ToCrmError> {
        let (pipeline_id, status_id) = to.stage;
        let e164 = order
            .customer
            .phone
            .as_ref()
            .map(|p| p.as_e164().to_string());
        let email = order
            .customer
            .email
            .as_ref()
            .map(|e| e.as_str().to_string());
        if recover {
            // After a crash between "lead created" and "link stored": find it again.
            let existing = find_lead_by_code(to.client, to.map, &order.code).await?;
            if let Some(lead) = existing {
                tracing::warn!(order = %order.code, lead_id = lead.id, "Found the order's lead by its code; linking it instead of creating a second one.");
                timeline::record(
                    &self.pool,
                    to.order_id,
                    "lead_found",
                    &format!("lead {} found again by the order code and linked", lead.id),
                )
                .await;
                // A manager may have moved the lead while it was not linked:
                // a change set aside then reported the stage it is in, a stage
                // the bridge never set on it (an earlier attempt's move whose
                // answer was lost is the bridge's own). The set-aside changes
                // are judged again once the lead is linked.
                let set_aside = crate::sync::to_marketplace::unlinked_outcome(lead.id as i64);
                let moved_while_unlinked = (lead.pipeline_id, lead.status_id)
                    != (pipeline_id, status_id)
                    && inbox::has_outcome_at_stage(
                        &self.pool,
                        to.crm_account,
                        &set_aside,
                        lead.status_id as i64,
                    )
                    .await?
                    && !links::was_pushed(
                        &self.pool,
                        to.crm_account,
                        lead.id as i64,
                        lead.pipeline_id as i64,
                        lead.status_id as i64,
                    )
                    .await?;
                if moved_while_unlinked {
                    tracing::info!(order = %order.code, lead_id = lead.id,
                        "The lead changed while it was not linked; those changes are judged now (a manager's move is kept).");
                    timeline::record(
                        &self.pool,
                        to.order_id,
                        "lead_found",
                        "changes made while the lead was not linked are judged again",
                    )
                    .await;
                } else if (lead.pipeline_id, lead.status_id) != (pipeline_id, status_id) {
                    // Brought to the order's current stage before it is linked.
                    links::record_push(
                        &self.pool,
                        to.crm_account,
                        lead.id as i64,
                        pipeline_id as i64,
                        status_id as i64,
                    )
                    .await?;
                    to.writer
                        .update(LeadUpdate {
                            id: lead.id,
                            stage: Some((pipeline_id, status_id)),
                            price: Some(order.total.major_rounded()),
                            ..LeadUpdate::default()
                        })
                        .await
                        .map_err(|e| write_refused(order, e))?;
                }
                let contact_id = lead.contact_ids.first().copied();
                if let Some(contact_id) = contact_id {
                    let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
                    links::remember_contact(
                        &mut conn,
                        to.crm_account,
                        contact_id as i64,
                        e164.as_deref(),
                        email.as_deref(),
                    )
                    .await?;
                }
                return self
                    .link(to, order, lead.id, contact_id, Some(&set_aside))
                    .await;
            }
        }
        // One customer, one contact: the same phone (or, without one, the
        // same email) waits here for the first order's creation to be remembered.
        let key = e164
            .clone()
            .or_else(|| email.clone())
            .or_else(|| order.customer.name.clone())
            .unwrap_or_else(|| order.code.clone());
        let _customer = self.contact_locks[stripe(to.crm_account, &key)]
            .lock()
            .await;
        let existing_contact = self
            .known_contact(to, order, e164.as_deref(), email.as_deref())
            .await?;
        let new_contact = match existing_contact {
            Some(_) => None,
            None if order.customer.phone.is_none()
                && order.customer.email.is_none()
                && order.customer.name.is_none() =>
            {
                None
            }
            None => Some(NewContact {
                request_id: format!("contact-{}", order.code),
                name: order
                    .customer
                    .name
                    .clone()
                    .unwrap_or_else(|| "Покупатель".to_string()),
                phone: order.customer.phone.clone(),
                email: order.customer.email.clone(),
            }),
        };
        let assignment = self.assign(to.crm_account, to.map, order).await?;
        let lead = NewLead {
            request_id: order.code.clone(),
            name: lead_name(to.map, order),
            price: Some(order.total.major_rounded()),
            pipeline_id,
            status_id,
            responsible_user_id: assignment.user,
            fields: fields(to.map, order),
            tags: {
                let mut tags = to.map.tags.clone();
                if assignment.unassigned {
                    tags.push(UNASSIGNED_TAG.to_string());
                }
                tags
            },
            contact_ids: existing_contact.into_iter().collect(),
        };
        let refused = |e: WriteError| write_refused(order, e);
        // The contact's fields without its phone and email: what is left when
        // amoCRM refuses one of those.
        let bare_contact = new_contact
            .as_ref()
            .filter(|c| c.phone.is_some() || c.email.is_some())
            .map(|c| NewContact {
                phone: None,
                email: None,
                ..c.clone()
            });
        let (created, contact_refused) = match to
            .writer
            .create(NewComplexLead {
                lead: lead.clone(),
                contact: new_contact,
            })
            .await
        {
            Ok(created) => (created, None),
            // amoCRM refused the item; with a new contact's fields in it, they
            // may be why: the lead is created with the contact's name only (or
            // without a contact), and a note says so.
            Err(WriteError::Refused(reason)) if bare_contact.is_some() => {
                metrics::counter!("orderbridge_contacts_refused_total").increment(1);
                tracing::warn!(order = %order.code, reason = %reason,
                    "amoCRM refused the lead with its new contact's fields; creating it with the contact's name only.");
                let created = match to
                    .writer
                    .create(NewComplexLead {
                        lead: lead.clone(),
                        contact: bare_contact,
                    })
                    .await
                {
                    Ok(created) => created,
                    Err(WriteError::Refused(_)) => to
                        .writer
                        .create(NewComplexLead {
                            lead,
                            contact: None,
                        })
                        .await
                        .map_err(refused)?,
                    Err(e) => return Err(refused(e)),
                };
                (created, Some(reason))
            }
            Err(e) => return Err(refused(e)),
        };
        if let Some(reason) = &contact_refused {
            to.client
                .add_notes(&[NewNote {
                    request_id: format!("contact-refused-{}", order.code),
                    lead_id: created.lead_id,
                    text: format!(
                        "orderbridge: amoCRM refused the buyer's phone/email in the contact ({reason}); the contact was created without them. Add them by hand."
                    ),
                }])
                .await?;
        }
        let contact_id = existing_contact.or(created.contact_id);
        if let (None, Some(new_id)) = (existing_contact, created.contact_id) {
            let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
            links::remember_contact(
                &mut conn,
                to.crm_account,
                new_id as i64,
                e164.as_deref(),
                email.as_deref(),
            )
            .await?;
        }
        self.link(to, order, created.lead_id, contact_id, None)
            .await?;
        self.entered(
            to.order_id,
            to.crm_account,
            created.lead_id as i64,
            to.stage,
            to.map,
            order,
            &assignment,
            "marketplace",
        )
        .await?;
        if assignment.unassigned {
            self.alert_unassigned(
                to.client,
                to.map,
                order,
                to.order_id,
                created.lead_id,
                &assignment,
            )
            .await?;
        }
        timeline::record(
            &self.pool,
            to.order_id,
            "lead_created",
            &format!(
                "lead {} in stage «{}» ({status_id}), contact {} ({})",
                created.lead_id,
                stage_name(to.map, order),
                contact_id
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "none".into()),
                if existing_contact.is_some() {
                    "existing"
                } else {
                    "new"
                }
            ),
        )
        .await;
        if let Some(reason) = &contact_refused {
            to.job.remark(format!(
                "amoCRM refused the new contact's phone/email ({reason}); lead {} has a contact with the name only",
                created.lead_id
            ));
            timeline::record(
                &self.pool,
                to.order_id,
                "contact_refused",
                &format!("amoCRM refused the contact's phone/email: {reason}; the contact has the name only"),
            )
            .await;
        }
        if let Some(previous) = to.replaces_lead {
            timeline::record(
                &self.pool,
                to.order_id,
                "lead_recreated",
                &format!(
                    "lead {previous} was deleted in amoCRM; lead {} replaces it (note written)",
                    created.lead_id
                ),
            )
            .await;
            tracing::warn!(order = %order.code, previous_lead = previous, lead_id = created.lead_id,
                "The order's lead had been deleted in amoCRM; recreated.");
            to.client
                .add_notes(&[NewNote {
                    request_id: format!("recreated-{}", order.code),
                    lead_id: created.lead_id,
                    text: format!(
                        "orderbridge: this order's lead {previous} was deleted in amoCRM; reconciliation recreated it in the order's current stage."
                    ),
                }])
                .await?;
        }
        // What the marketplace left out is said on the lead, not guessed.
        let mut missing = Vec::new();
        if order.customer.phone.is_none() {
            missing.push("the buyer's phone");
        }
        if order.items.is_empty() {
            missing.push("the items");
        }
        if !missing.is_empty() {
            tracing::info!(order = %order.code, missing = ?missing, "The order came without some parts; the lead says so.");
            timeline::record(
                &self.pool,
                to.order_id,
                "note",
                &format!(
                    "the order came without {}; noted on the lead",
                    missing.join(" and ")
                ),
            )
            .await;
            to.client
                .add_notes(&[NewNote {
                    request_id: format!("missing-{}", order.code),
                    lead_id: created.lead_id,
                    text: format!(
                        "orderbridge: {} sent this order without {}; the lead has what there is.",
                        order.marketplace.as_str(),
                        missing.join(" and ")
                    ),
                }])
                .await?;
        }
        Ok(())
    }

    async fn link(
        &self,
        to: &Creation<'_>,
        order: &Order,
        lead_id: u64,
        contact_id: Option<u64>,
        reopen_set_aside: Option<&str>,
    ) -> Result<(), ToCrmError> {
        let (pipeline_id, status_id) = to.stage;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        links::insert_in(
            &mut tx,
            &Link {
                order_id: to.order_id,
                crm_account: to.crm_account.to_string(),
                lead_id: lead_id as i64,
                contact_id: contact_id.map(|c| c as i64),
                pushed_pipeline_id: Some(pipeline_id as i64),
                pushed_status_id: Some(status_id as i64),
                manager_moved: false,
            },
        )
        .await?;
        // In the link's transaction: judged again only once the link is there.
        if let Some(outcome) = reopen_set_aside {
            let reopened = inbox::reopen_with_outcome(&mut tx, to.crm_account, outcome).await?;
            if reopened > 0 {
                tracing::info!(order = %order.code, lead_id, changes = reopened,
                    "Changes of the lead set aside while it was not linked go back to the inbox.");
            }
        }
        tx.commit().await.map_err(StoreError::from)?;
        links::set_pushed_content(
            &self.pool,
            to.order_id,
            &lead_content(order, &fields(to.map, order)),
        )
        .await?;
        metrics::counter!("orderbridge_leads_created_total", "marketplace" => order.marketplace.as_str()).increment(1);
        tracing::info!(order = %order.code, lead_id, contact_id, "Lead created for the order.");
        Ok(())
    }

    /// An `crm_assign_responsible` job: the stage's responsible becomes the
    /// lead's; nobody to assign: the supervisor's task, the tag, the alert.
    async fn assign_responsible(&self, job: &JobContext) -> Result<(), ToCrmError> {
        let p = &job.payload;
        let text = |k: &str| {
            p[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| ToCrmError::BadPayload(format!("no `{k}`")))
        };
        let (crm_account, shop, marketplace, external_id, role) = (
            text("crm_account")?,
            text("account")?,
            text("marketplace")?,
            text("external_id")?,
            text("role")?,
        );
        let (Some(order_id), Some(lead_id)) = (p["order_id"].as_i64(), p["lead_id"].as_u64())
        else {
            return Err(ToCrmError::BadPayload("no `order_id` or `lead_id`".into()));
        };
        let (Some(client), Some(writer)) = (
            self.clients.get(&crm_account),
            self.writers.get(&crm_account),
        ) else {
            return Err(ToCrmError::NoClient(crm_account));
        };
        match p["user"].as_u64() {
            Some(user) => {
                writer
                    .update(LeadUpdate {
                        id: lead_id,
                        responsible_user_id: Some(user),
                        ..LeadUpdate::default()
                    })
                    .await
                    .map_err(ToCrmError::Write)?;
                timeline::record(
                    &self.pool,
                    order_id,
                    "responsible",
                    &format!("user {user} of role «{role}» is responsible in the manager's stage"),
                )
                .await;
            }
            None => {
                let order = orders::snapshot(&self.pool, &marketplace, &shop, &external_id)
                    .await?
                    .ok_or_else(|| ToCrmError::NoOrder(external_id.clone()))?;
                let maps = self.maps.current();
                let map = maps
                    .shops
                    .get(&shop)
                    .ok_or_else(|| ToCrmError::NoMap(shop.clone()))?;
                writer
                    .update(LeadUpdate {
                        id: lead_id,
                        tags_to_add: vec![UNASSIGNED_TAG.to_string()],
                        ..LeadUpdate::default()
                    })
                    .await
                    .map_err(ToCrmError::Write)?;
                let assignment = Assignment {
                    user: None,
                    role: Some(role),
                    unassigned: true,
                };
                self.alert_unassigned(client, map, &order, order_id, lead_id, &assignment)
                    .await?;
            }
        }
        Ok(())
    }

    /// The responsible for the stage the order's status maps to, by the
    /// stage role's rule. A role nobody in it can take: `unassigned`.
    async fn assign(
        &self,
        crm_account: &str,
        map: &RoutingMap,
        order: &Order,
    ) -> Result<Assignment, ToCrmError> {
        let Some(Route::Stage {
            role: Some(role), ..
        }) = map.route(order.status.as_str())
        else {
            return Ok(Assignment {
                user: None,
                role: None,
                unassigned: false,
            });
        };
        let user = match map.roles.get(role) {
            Some(def) => crate::sla::pick_responsible(&self.pool, crm_account, role, def).await?,
            None => None,
        };
        Ok(Assignment {
            user,
            role: Some(role.clone()),
            unassigned: user.is_none(),
        })
    }

    /// Records the stage entry with its responsible and SLA timers.
    #[allow(clippy::too_many_arguments)]
    async fn entered(
        &self,
        order_id: i64,
        crm_account: &str,
        lead_id: i64,
        stage: (u64, u64),
        map: &RoutingMap,
        order: &Order,
        assignment: &Assignment,
        source: &'static str,
    ) -> Result<(), ToCrmError> {
        let (name, sla) = match map.route(order.status.as_str()) {
            // A final order never leaves its stage: no timers there.
            Some(Route::Stage { stage, .. }) if order.is_terminal => (stage.clone(), None),
            Some(Route::Stage { stage, sla, .. }) => (stage.clone(), *sla),
            _ => ("?".to_string(), None),
        };
        crate::sla::enter_stage(
            &self.pool,
            &self.sla,
            &crate::sla::StageEntered {
                order_id,
                crm_account,
                lead_id,
                stage,
                stage_name: &name,
                role: assignment.role.as_deref(),
                source,
                responsible_user_id: assignment.user,
                sla,
                marketplace_deadline: order.marketplace_deadline,
                at: chrono::Utc::now(),
            },
        )
        .await?;
        Ok(())
    }

    /// Nobody could be made responsible: an emergency. A log event, a
    /// metric, the lead tagged (done by the caller's write), and a task for
    /// the map's `supervisor` role.
    async fn alert_unassigned(
        &self,
        client: &AmoClient,
        map: &RoutingMap,
        order: &Order,
        order_id: i64,
        lead_id: u64,
        assignment: &Assignment,
    ) -> Result<(), ToCrmError> {
        let role = assignment.role.as_deref().unwrap_or("?");
        metrics::counter!("orderbridge_unassigned_total", "marketplace" => order.marketplace.as_str())
            .increment(1);
        tracing::error!(order = %order.code, lead_id, role,
            "Nobody can be made responsible for the order: the role has no active user. The supervisor gets a task.");
        let supervisor = match map.roles.get(SUPERVISOR_ROLE) {
            Some(def) => {
                crate::sla::pick_responsible(
                    &self.pool,
                    client.account_name(),
                    SUPERVISOR_ROLE,
                    def,
                )
                .await?
            }
            None => None,
        };
        client
            .add_tasks(&[NewTask {
                request_id: format!("unassigned-{}-{lead_id}", order.code),
                text: format!(
                    "Заказ {} без ответственного: в роли «{role}» нет активных пользователей amoCRM. Назначьте ответственного.",
                    order.code
                ),
                complete_till: chrono::Utc::now().timestamp() + 3600,
                responsible_user_id: supervisor,
                lead_id: Some(lead_id),
            }])
            .await?;
        {
            let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
            crate::sla::alerts::event(
                &mut conn,
                "unassigned",
                &format!(
                    "{} order {} has no responsible: nobody in role «{role}» is active in amoCRM",
                    order.marketplace.as_str(),
                    order.code
                ),
                serde_json::json!({ "order": order.code, "lead_id": lead_id, "crm_account": client.account_name() }),
            )
            .await?;
        }
        timeline::record(
            &self.pool,
            order_id,
            "unassigned",
            &format!("nobody in role «{role}» can be responsible; a task for the supervisor, the lead tagged «{UNASSIGNED_TAG}»"),
        )
        .await;
        Ok(())
    }

    /// The order's existing contact: from the local index, or (while the
    /// account's index has never been loaded) from amoCRM's search, checked
    /// field by field. `None` when the customer is new.
    async fn known_contact(
        &self,
        to: &Creation<'_>,
        order: &Order,
        e164: Option<&str>,
        email: Option<&str>,
    ) -> Result<Option<u64>, ToCrmError> {
        // By phone; a buyer without one by email.
        let (phone, email, email_key) = match (&order.customer.phone, &order.customer.email) {
            (Some(phone), _) => (Some(phone), None, None),
            (None, Some(address)) => (None, Some(address), email),
            (None, None) => return Ok(None),
        };
        if let Some(id) =
            links::find_contact_by(&self.pool, to.crm_account, e164, email_key).await?
        {
            return Ok(Some(id as u64));
        }
        if contact_index::is_loaded(&self.pool, to.crm_account).await? {
            return Ok(None);
        }
        let found = to.client.find_contacts(phone, email).await?;
        let Some(contact) = found.first() else {
            return Ok(None);
        };
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        links::remember_contact(
            &mut conn,
            to.crm_account,
            contact.id as i64,
            e164,
            email_key,
        )
        .await?;
        Ok(Some(contact.id))
    }
}

/// The name of the stage the map gives the order's status (for the timeline).
fn stage_name(map: &RoutingMap, order: &Order) -> String {
    match map.route(order.status.as_str()) {
        Some(Route::Stage { stage, .. }) => stage.clone(),
        _ => "?".into(),
    }
}

/// The contact lock stripe of a customer key.
pub(crate) fn stripe(crm_account: &str, key: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (crm_account, key).hash(&mut hasher);
    (hasher.finish() % CONTACT_LOCK_STRIPES as u64) as usize
}

/// The writer's error as this handler's: a refused item names the order.
fn write_refused(order: &Order, error: WriteError) -> ToCrmError {
    match error {
        WriteError::Refused(reason) => ToCrmError::Refused {
            code: order.code.clone(),
            reason,
        },
        other => ToCrmError::Write(other),
    }
}

/// A hash of what the map puts into the lead (its fields and price): equal
/// hashes mean nothing mapped changed.
fn lead_content(order: &Order, fields: &[FieldValue]) -> String {
    use sha2::{Digest, Sha256};
    let text = format!("{:?}|{:?}", order.total.major_rounded(), fields);
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The lead whose order-code field (the map's `order_code` slot) holds exactly
/// `code`: amoCRM's full-text search narrows, the field decides ("1234" never
/// matches a lead of order "12345", nor one whose name merely contains it).
/// `None` when no lead has it, or the map names no order-code field.
pub async fn find_lead_by_code(
    client: &AmoClient,
    map: &RoutingMap,
    code: &str,
) -> Result<Option<crate::connectors::amocrm::Lead>, AmoError> {
    let Some((_, Some(field_id))) = map.fields.get("order_code") else {
        tracing::warn!(
            code,
            "The map names no order-code field: a lead cannot be found again by its code."
        );
        return Ok(None);
    };
    Ok(client.search_leads(code).await?.into_iter().find(|lead| {
        lead.fields
            .iter()
            .any(|(id, values)| id == field_id && values.iter().any(|v| v.trim() == code))
    }))
}

/// The lead's name from the map's template.
fn lead_name(map: &RoutingMap, order: &Order) -> String {
    let template = map
        .lead_name
        .clone()
        .unwrap_or_else(|| "{marketplace} {code}".into());
    template
        .replace("{code}", &order.code)
        .replace("{total}", &format!("{}", order.total.major_rounded()))
        .replace("{customer}", order.customer.name.as_deref().unwrap_or(""))
        .replace("{marketplace}", order.marketplace.as_str())
        .replace("{shop}", &order.account)
}

/// The responsible user: the stage role's users, taken in turn by order.
/// The map's lead fields filled from the order.
fn fields(map: &RoutingMap, order: &Order) -> Vec<FieldValue> {
    let mut values = Vec::new();
    for (slot, (_, field_id)) in &map.fields {
        let Some(field_id) = *field_id else { continue };
        let input = match slot.as_str() {
            "order_code" => Some(FieldInput::Text(order.code.clone())),
            "items" => Some(FieldInput::Text(
                order
                    .items
                    .iter()
                    .map(|i| {
                        format!(
                            "{} × {} ({})",
                            i.name,
                            i.quantity,
                            i.sku.as_deref().unwrap_or("—")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ))
            .filter(|_| !order.items.is_empty()),
            "total" => Some(FieldInput::Number(order.total.0 as f64 / 100.0)),
            "delivery_address" => order.delivery.address.clone().map(FieldInput::Text),
            "planned_date" => order
                .delivery
                .planned_date
                .map(|d| FieldInput::Timestamp(d.timestamp())),
            "payment_mode" => order.payment_mode.clone().map(FieldInput::Text),
            "delivery_mode" => order.delivery.mode.as_ref().and_then(|mode| {
                match map.enums.get(slot).map(|options| options.get(mode)) {
                    Some(Some((_, Some(enum_id)))) => Some(FieldInput::Enum(*enum_id)),
                    Some(Some((_, None))) => None,
                    // A select field takes only its options: an unmapped value
                    // leaves it empty rather than making amoCRM refuse the lead.
                    Some(None) => {
                        tracing::warn!(order = %order.code, slot = %slot, value = %mode,
                            "A value the map does not map onto the field's options; the field is left empty.");
                        None
                    }
                    None => Some(FieldInput::Text(mode.clone())),
                }
            }),
            _ => None,
        };
        if let Some(input) = input {
            values.push(FieldValue {
                field_id,
                values: vec![input],
            });
        }
    }
    values
}
