//! Partner programmes' leads (buyout / trade-in requests) through the bridge:
//!
//! - intake ([`accept_lead`]): a lead from the partner's webhook or poll is
//!   read through the source's field map and stored with its CRM creation job
//!   in one transaction; a repeated partner lead id stores nothing;
//! - creation (`crm_create_partner_lead`, [`PartnerLeadHandler`]): one amoCRM
//!   lead in the funnel's intake stage with every mapped field, the seller as
//!   its contact (one per phone), the defects and prices as a note; the intake
//!   stage's report is owed to the partner from then on;
//! - stage changes ([`judge_change`], called by the amoCRM inbox processor for
//!   leads that are not marketplace orders): a move into a stage whose map
//!   row names a partner status stores a report and queues it, in the order
//!   the changes happened (one ordering key per partner lead); the stage's
//!   role picks the lead's responsible (`crm_assign_partner_responsible`);
//! - reports (`partner_report`, [`PartnerReportHandler`]): sent under the
//!   partner's own limits, retried on 5xx/429/timeouts, the answer kept;
//! - polling ([`poll_source`]) for sources with a `poll_url`.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;

use crate::config::PartnerSource;
use crate::connectors::amocrm::{
    AmoClient, AmoError, FieldInput, FieldValue, NewComplexLead, NewContact, NewLead, NewNote,
};
use crate::connectors::partner::{
    classify, read_lead, PartnerClient, PartnerError, PartnerLead, Report,
};
use crate::mapping::{FunnelMap, MapRegistry};
use crate::outbox::{Handler, JobContext, NewJob, RetryAction};
use crate::store::inbox::InboxRow;
use crate::store::partner::{self as store, NewPartnerLead, NewReport};
use crate::store::{links, StoreError};

/// Creates a partner lead's amoCRM lead.
pub const PARTNER_LEAD_KIND: &str = "crm_create_partner_lead";
/// Sends one status report to the partner.
pub const PARTNER_REPORT_KIND: &str = "partner_report";
/// Makes the user the stage's role picked responsible for a partner lead.
pub const PARTNER_ASSIGN_KIND: &str = "crm_assign_partner_responsible";

/// The outbox target (and limiter key) of a partner's reports.
pub fn report_target(source: &str) -> String {
    crate::connectors::partner::limiter_keys(source).0
}

fn ordering_key(source: &str, partner_lead_id: &str) -> String {
    format!("partner:{source}:{partner_lead_id}")
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("the partner lead is invalid: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What became of a lead offered by a partner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Stored (row id); its CRM lead follows.
    Stored(i64),
    /// The source already has a lead with this id: nothing stored.
    Repeated,
}

/// Reads, stores and queues one partner lead, all in one transaction.
pub async fn accept_lead(
    pool: &PgPool,
    source: &str,
    config: &PartnerSource,
    body: &serde_json::Value,
) -> Result<(Intake, PartnerLead), IntakeError> {
    let lead = read_lead(&config.fields, &config.required, body).map_err(IntakeError::Invalid)?;
    if let Some(status) = &lead.status {
        if !config.intake_statuses.iter().any(|s| s == status) {
            return Err(IntakeError::Invalid(vec![format!(
                "`status` is `{status}`, which a new lead cannot have; accepted: {}",
                config.intake_statuses.join(", ")
            )]));
        }
    }
    let fields = serde_json::to_value(&lead)
        .map_err(|e| IntakeError::Invalid(vec![format!("cannot keep the lead: {e}")]))?;
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let stored = store::insert_lead(
        &mut tx,
        &NewPartnerLead {
            source,
            partner_lead_id: &lead.lead_id,
            crm_account: &config.crm_account,
            payload: body,
            fields: &fields,
            buyout_price: lead.buyout_price,
            client_price: lead.client_price,
        },
    )
    .await?;
    let Some(row_id) = stored else {
        return Ok((Intake::Repeated, lead));
    };
    crate::store::outbox::enqueue(
        &mut tx,
        &NewJob {
            kind: PARTNER_LEAD_KIND.into(),
            target: format!("amocrm:{}", config.crm_account),
            ordering_key: ordering_key(source, &lead.lead_id),
            dedupe_key: Some(format!("{PARTNER_LEAD_KIND}:{source}:{}", lead.lead_id)),
            payload: serde_json::json!({ "partner_lead": row_id, "source": source }),
            run_at: None,
        },
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    metrics::counter!("orderbridge_partner_leads_total", "source" => source.to_string())
        .increment(1);
    Ok((Intake::Stored(row_id), lead))
}

/// Stores a report owed to the partner and queues it, in the caller's transaction.
async fn owe_report(
    tx: &mut sqlx::PgConnection,
    lead: &store::StoredPartnerLead,
    stage_id: i64,
    stage: &str,
    status: &str,
    changed_at: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    let report = store::insert_report(
        tx,
        &NewReport {
            partner_lead: lead.id,
            source: &lead.source,
            stage_id,
            stage,
            partner_status: status,
            changed_at,
        },
    )
    .await?;
    crate::store::outbox::enqueue(
        tx,
        &NewJob {
            kind: PARTNER_REPORT_KIND.into(),
            target: report_target(&lead.source),
            ordering_key: ordering_key(&lead.source, &lead.partner_lead_id),
            dedupe_key: Some(format!("{PARTNER_REPORT_KIND}:{report}")),
            payload: serde_json::json!({ "report": report, "source": lead.source }),
            run_at: None,
        },
    )
    .await?;
    Ok(())
}

/// What a CRM change of a partner lead came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// A report to the partner is queued.
    Reported,
    /// The stage the bridge already knows (a second delivery, or our own creation).
    Duplicate,
    /// Older than a change already judged.
    Stale,
    /// Nothing to send, and why.
    Ignored(String),
    /// The funnel map is not resolved yet: judged later.
    Deferred,
}

/// Judges an amoCRM change of `lead_id` when it is a partner lead; `None` when it is not.
pub async fn judge_change(
    tx: &mut sqlx::PgConnection,
    pool: &PgPool,
    maps: &MapRegistry,
    row: &InboxRow,
    lead_id: i64,
) -> Result<Option<Judged>, StoreError> {
    let Some(lead) = store::by_crm_lead_locked(tx, &row.account, lead_id).await? else {
        return Ok(None);
    };
    let p = &row.payload;
    let (Some(status_id), Some(pipeline_id)) = (p["status_id"].as_i64(), p["pipeline_id"].as_i64())
    else {
        return Ok(Some(Judged::Ignored(
            "the change carries no stage (a field change of a partner lead)".into(),
        )));
    };
    let sets = maps.current();
    let Some(funnel) = sets.funnels.get(&lead.source).cloned() else {
        return Ok(Some(Judged::Ignored(format!(
            "partner source `{}` has no funnel map in this configuration",
            lead.source
        ))));
    };
    if !funnel.online {
        return Ok(Some(Judged::Deferred));
    }
    let changed_at = p["last_modified"].as_i64();
    if let (Some(at), Some(newest)) = (changed_at, lead.changed_at) {
        if at < newest {
            return Ok(Some(Judged::Stale));
        }
    }
    if lead.status_id == Some(status_id) {
        return Ok(Some(Judged::Duplicate));
    }
    store::set_stage(tx, lead.id, status_id, changed_at).await?;
    let stage = funnel.stage_by_id(pipeline_id as u64, status_id as u64);
    // One responsible per stage: the stage's role picks one (its own job).
    if let Some((role, def)) = stage
        .and_then(|s| s.role.as_ref())
        .and_then(|r| funnel.roles.get(r).map(|def| (r, def)))
    {
        let author = row.payload["modified_user_id"].as_u64();
        match crate::sla::pick_responsible(pool, &row.account, role, def).await? {
            Some(user) if Some(user) != author => {
                crate::store::outbox::enqueue(
                    tx,
                    &NewJob {
                        kind: PARTNER_ASSIGN_KIND.into(),
                        target: format!("amocrm:{}", row.account),
                        ordering_key: ordering_key(&lead.source, &lead.partner_lead_id),
                        dedupe_key: None,
                        payload: serde_json::json!({
                            "crm_account": row.account, "lead_id": lead_id, "user": user, "role": role,
                        }),
                        run_at: None,
                    },
                )
                .await?;
            }
            Some(_) => {}
            None => {
                tracing::error!(source = %lead.source, lead_id, role = %role,
                    "Nobody of the stage's role can be made responsible for a partner lead (no active user).");
                metrics::counter!("orderbridge_unassigned_total").increment(1);
            }
        }
    }
    let Some(stage) = stage else {
        tracing::debug!(crm_account = %row.account, lead_id, status_id, "A partner lead moved into a stage its funnel map does not list; nothing reported.");
        return Ok(Some(Judged::Ignored(format!(
            "stage {status_id} of pipeline {pipeline_id} is not in the funnel map"
        ))));
    };
    let Some(status) = stage.report.clone() else {
        return Ok(Some(Judged::Ignored(format!(
            "stage «{}» reports no partner status",
            stage.name
        ))));
    };
    let at = changed_at
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .unwrap_or(row.received_at);
    owe_report(tx, &lead, status_id, &stage.name, &status, at).await?;
    tracing::info!(source = %lead.source, partner_lead = %lead.partner_lead_id, lead_id,
        stage = %stage.name, partner_status = %status, "A partner lead changed stage; its report is queued.");
    Ok(Some(Judged::Reported))
}

#[derive(Debug, thiserror::Error)]
pub enum PartnerLeadError {
    #[error(transparent)]
    Amo(#[from] AmoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Partner(#[from] PartnerError),
    #[error("the job's payload names no partner lead or report: {0}")]
    BadPayload(String),
    #[error("no CRM client for account `{0}`")]
    NoClient(String),
    #[error("no partner source `{0}` in this configuration")]
    NoSource(String),
    /// Starts with [`crate::mapping::UNRESOLVED`].
    #[error("maps unresolved: the funnel map of partner source `{source_name}` is not resolved against CRM account `{crm_account}` ({why}); nothing is written to it until it is")]
    MapOffline {
        source_name: String,
        crm_account: String,
        why: String,
    },
    #[error("amoCRM created no lead for partner lead {0}")]
    Refused(String),
}

fn classify_lead_error(error: &PartnerLeadError) -> RetryAction {
    match error {
        PartnerLeadError::Amo(e) => e.classify(),
        PartnerLeadError::Store(e) => RetryAction::retry(e.to_string()),
        PartnerLeadError::Partner(e) => classify(e),
        PartnerLeadError::MapOffline { .. } => RetryAction::Wait {
            after: std::time::Duration::from_secs(30),
            reason: error.to_string(),
        },
        PartnerLeadError::BadPayload(_)
        | PartnerLeadError::NoClient(_)
        | PartnerLeadError::NoSource(_)
        | PartnerLeadError::Refused(_) => RetryAction::permanent(error.to_string()),
    }
}

/// The handler of [`PARTNER_LEAD_KIND`].
pub struct PartnerLeadHandler {
    pub pool: PgPool,
    pub clients: BTreeMap<String, AmoClient>,
    pub maps: Arc<MapRegistry>,
    /// Serialises contact creation per seller phone (all of an account's jobs
    /// run on the replica holding its target lease).
    contact_locks: Vec<tokio::sync::Mutex<()>>,
}

impl PartnerLeadHandler {
    pub fn new(
        pool: PgPool,
        clients: BTreeMap<String, AmoClient>,
        maps: Arc<MapRegistry>,
    ) -> PartnerLeadHandler {
        PartnerLeadHandler {
            pool,
            clients,
            maps,
            contact_locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }
}

impl PartnerLeadHandler {
    /// Runs a [`PARTNER_ASSIGN_KIND`] job.
    async fn assign(&self, job: &JobContext) -> Result<(), PartnerLeadError> {
        let p = &job.payload;
        let (Some(account), Some(lead_id), Some(user)) = (
            p["crm_account"].as_str(),
            p["lead_id"].as_u64(),
            p["user"].as_u64(),
        ) else {
            return Err(PartnerLeadError::BadPayload(p.to_string()));
        };
        let client = self
            .clients
            .get(account)
            .ok_or_else(|| PartnerLeadError::NoClient(account.to_string()))?;
        client
            .update_leads(&[crate::connectors::amocrm::LeadUpdate {
                id: lead_id,
                responsible_user_id: Some(user),
                ..Default::default()
            }])
            .await?;
        Ok(())
    }
}

/// The lead's name from the funnel's template.
fn lead_name(funnel: &FunnelMap, source: &str, lead: &PartnerLead) -> String {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let name = funnel
        .lead_name
        .replace("{model}", &text(&lead.model))
        .replace("{memory}", &text(&lead.memory))
        .replace("{colour}", &text(&lead.colour))
        .replace("{city}", &text(&lead.city))
        .replace("{seller}", &text(&lead.seller_name))
        .replace("{lead_id}", &lead.lead_id)
        .replace("{source}", source);
    let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
    if name.is_empty() {
        format!("{source} {}", lead.lead_id)
    } else {
        name
    }
}

/// The lead's custom fields from the funnel's `[lead.fields]`.
fn lead_fields(funnel: &FunnelMap, source: &str, lead: &PartnerLead) -> Vec<FieldValue> {
    let number = |v: Option<f64>| v.map(FieldInput::Number);
    let text = |v: &Option<String>| v.clone().map(FieldInput::Text);
    let mut fields = Vec::new();
    for (slot, (_, id)) in &funnel.fields {
        let Some(field_id) = id else { continue };
        let value = match slot.as_str() {
            "partner_lead_id" => Some(FieldInput::Text(lead.lead_id.clone())),
            "model" => text(&lead.model),
            "memory" => text(&lead.memory),
            "colour" => text(&lead.colour),
            "condition" => text(&lead.condition),
            "defects" => {
                (!lead.defects.is_empty()).then(|| FieldInput::Text(lead.defects.join(", ")))
            }
            "buyout_price" => number(lead.buyout_price),
            "client_price" => number(lead.client_price),
            "city" => text(&lead.city),
            "source" => Some(FieldInput::Text(source.to_string())),
            _ => None,
        };
        if let Some(value) = value {
            fields.push(FieldValue {
                field_id: *field_id,
                values: vec![value],
            });
        }
    }
    fields
}

fn note_text(source: &str, lead: &PartnerLead) -> String {
    let mut lines = vec![format!("Заявка партнёра {source} №{}", lead.lead_id)];
    let mut add = |label: &str, value: Option<String>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            lines.push(format!("{label}: {v}"));
        }
    };
    add("Устройство", lead.model.clone());
    add("Память", lead.memory.clone());
    add("Цвет", lead.colour.clone());
    add("Состояние", lead.condition.clone());
    add(
        "Дефекты",
        (!lead.defects.is_empty()).then(|| lead.defects.join(", ")),
    );
    add("Цена выкупа", lead.buyout_price.map(|v| format!("{v:.0}")));
    add("Цена клиента", lead.client_price.map(|v| format!("{v:.0}")));
    add("Город", lead.city.clone());
    lines.join("\n")
}

impl Handler for PartnerLeadHandler {
    type Error = PartnerLeadError;

    async fn run(&self, job: &JobContext) -> Result<(), PartnerLeadError> {
        if job.kind == PARTNER_ASSIGN_KIND {
            return self.assign(job).await;
        }
        let row_id = job.payload["partner_lead"]
            .as_i64()
            .ok_or_else(|| PartnerLeadError::BadPayload(job.payload.to_string()))?;
        let Some(stored) = store::lead(&self.pool, row_id).await? else {
            return Err(PartnerLeadError::BadPayload(format!(
                "partner lead {row_id} is not stored"
            )));
        };
        if stored.lead_id.is_some() {
            return Ok(());
        }
        let lead: PartnerLead = serde_json::from_value(stored.fields.clone())
            .map_err(|e| PartnerLeadError::BadPayload(e.to_string()))?;
        let client = self
            .clients
            .get(&stored.crm_account)
            .ok_or_else(|| PartnerLeadError::NoClient(stored.crm_account.clone()))?;
        let maps = self.maps.current();
        let funnel = maps
            .funnels
            .get(&stored.source)
            .cloned()
            .ok_or_else(|| PartnerLeadError::NoSource(stored.source.clone()))?;
        let offline = |why: String| PartnerLeadError::MapOffline {
            source_name: stored.source.clone(),
            crm_account: stored.crm_account.clone(),
            why,
        };
        if !funnel.online {
            return Err(offline(
                maps.unresolved
                    .get(&stored.crm_account)
                    .cloned()
                    .unwrap_or_else(|| "not resolved yet".into()),
            ));
        }
        let (Some(pipeline_id), Some(intake)) = (funnel.pipeline_id, funnel.intake().cloned())
        else {
            return Err(offline("the intake stage has no id".into()));
        };
        let Some(status_id) = intake.stage_id else {
            return Err(offline("the intake stage has no id".into()));
        };
        let request_id = format!("partner-{}-{}", stored.source, lead.lead_id);
        // A retry may follow a creation whose answer was lost: look first.
        let found = if job.attempt > 1 {
            find_by_partner_id(client, &funnel, &lead.lead_id).await?
        } else {
            None
        };
        let phone = lead.seller_phone.as_ref().map(|p| p.as_e164().to_string());
        let _seller = match &phone {
            Some(phone) => Some(
                self.contact_locks[crate::sync::to_crm::stripe(&stored.crm_account, phone)
                    % self.contact_locks.len()]
                .lock()
                .await,
            ),
            None => None,
        };
        let (lead_id, contact_id) = match found {
            Some(found) => {
                tracing::warn!(source = %stored.source, partner_lead = %lead.lead_id, lead_id = found.id,
                    "Found the partner lead's CRM lead by its id; linking it instead of creating a second one.");
                (found.id, found.contact_ids.first().copied())
            }
            None => {
                let known = match &phone {
                    Some(phone) => {
                        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
                        links::find_contact(&mut conn, &stored.crm_account, Some(phone), None)
                            .await?
                    }
                    None => None,
                };
                let responsible = match intake
                    .role
                    .as_ref()
                    .and_then(|r| funnel.roles.get(r).map(|def| (r, def)))
                {
                    Some((name, def)) => {
                        crate::sla::pick_responsible(&self.pool, &stored.crm_account, name, def)
                            .await?
                    }
                    None => None,
                };
                let seller = lead
                    .seller_name
                    .clone()
                    .unwrap_or_else(|| "Продавец".to_string());
                let new = NewComplexLead {
                    lead: NewLead {
                        request_id: request_id.clone(),
                        name: lead_name(&funnel, &stored.source, &lead),
                        price: lead.buyout_price.map(|v| v.round() as i64),
                        pipeline_id,
                        status_id,
                        responsible_user_id: responsible,
                        fields: lead_fields(&funnel, &stored.source, &lead),
                        tags: funnel.tags.clone(),
                        contact_ids: known.map(|c| c as u64).into_iter().collect(),
                    },
                    contact: known.is_none().then(|| NewContact {
                        request_id: format!("contact-{request_id}"),
                        name: seller,
                        phone: lead.seller_phone.clone(),
                        email: None,
                    }),
                };
                let created = client.create_leads_complex(&[new]).await?;
                let created = created
                    .into_iter()
                    .next()
                    .ok_or_else(|| PartnerLeadError::Refused(lead.lead_id.clone()))?;
                let contact = known.map(|c| c as u64).or(created.contact_id);
                if let (Some(contact), Some(phone), None) = (contact, &phone, known) {
                    let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
                    links::remember_contact(
                        &mut conn,
                        &stored.crm_account,
                        contact as i64,
                        Some(phone),
                        None,
                    )
                    .await?;
                }
                (created.lead_id, contact)
            }
        };
        client
            .add_notes(&[NewNote {
                request_id: format!("{request_id}-note"),
                lead_id,
                text: note_text(&stored.source, &lead),
            }])
            .await?;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        store::set_crm_lead(
            &mut tx,
            stored.id,
            lead_id as i64,
            contact_id.map(|c| c as i64),
            status_id as i64,
        )
        .await?;
        if let Some(status) = &intake.report {
            owe_report(
                &mut tx,
                &stored,
                status_id as i64,
                &intake.name,
                status,
                chrono::Utc::now(),
            )
            .await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        tracing::info!(source = %stored.source, partner_lead = %lead.lead_id, lead_id,
            stage = %intake.name, "A partner lead became a CRM lead.");
        Ok(())
    }

    fn classify(&self, error: &PartnerLeadError) -> RetryAction {
        classify_lead_error(error)
    }
}

/// The CRM lead whose partner-id field holds `partner_lead_id`.
async fn find_by_partner_id(
    client: &AmoClient,
    funnel: &FunnelMap,
    partner_lead_id: &str,
) -> Result<Option<crate::connectors::amocrm::Lead>, AmoError> {
    let Some((_, Some(field_id))) = funnel.fields.get("partner_lead_id") else {
        return Ok(None);
    };
    Ok(client
        .search_leads(partner_lead_id)
        .await?
        .into_iter()
        .find(|lead| {
            lead.fields.iter().any(|(id, values)| {
                id == field_id && values.iter().any(|v| v.trim() == partner_lead_id)
            })
        }))
}

/// The handler of [`PARTNER_REPORT_KIND`].
pub struct PartnerReportHandler {
    pub pool: PgPool,
    /// Clients by partner source.
    pub clients: BTreeMap<String, PartnerClient>,
}

impl Handler for PartnerReportHandler {
    type Error = PartnerLeadError;

    async fn run(&self, job: &JobContext) -> Result<(), PartnerLeadError> {
        let id = job.payload["report"]
            .as_i64()
            .ok_or_else(|| PartnerLeadError::BadPayload(job.payload.to_string()))?;
        let Some(report) = store::report(&self.pool, id).await? else {
            return Err(PartnerLeadError::BadPayload(format!(
                "report {id} is not stored"
            )));
        };
        if report.sent_at.is_some() {
            return Ok(());
        }
        let client = self
            .clients
            .get(&report.source)
            .ok_or_else(|| PartnerLeadError::NoSource(report.source.clone()))?;
        let sent = client
            .report(&Report {
                partner_lead_id: report.partner_lead_id.clone(),
                status: report.partner_status.clone(),
                stage: report.stage.clone(),
                crm_lead_id: report.crm_lead_id,
                changed_at: report.changed_at,
                seq: report.seq,
            })
            .await;
        match sent {
            Ok(answer) => {
                store::record_report_answer(
                    &self.pool,
                    id,
                    Some(i32::from(answer.status)),
                    crate::connectors::partner::clipped(&answer.body, 500),
                    true,
                )
                .await?;
                metrics::counter!("orderbridge_partner_reports_total", "source" => report.source.clone(), "result" => "sent").increment(1);
                Ok(())
            }
            Err(error) => {
                let status = match &error {
                    PartnerError::Server { status, .. } | PartnerError::Refused { status, .. } => {
                        Some(i32::from(*status))
                    }
                    PartnerError::RateLimited { .. } => Some(429),
                    _ => None,
                };
                store::record_report_answer(&self.pool, id, status, &error.to_string(), false)
                    .await?;
                metrics::counter!("orderbridge_partner_reports_total", "source" => report.source.clone(), "result" => "failed").increment(1);
                tracing::warn!(source = %report.source, partner_lead = %report.partner_lead_id,
                    partner_status = %report.partner_status, attempt = job.attempt, %error,
                    "A status report to the partner failed.");
                Err(error.into())
            }
        }
    }

    fn classify(&self, error: &PartnerLeadError) -> RetryAction {
        classify_lead_error(error)
    }
}

/// One poll of a source: pages of new leads until the partner has none, each
/// page's leads stored with the cursor after it in one transaction per lead
/// (the cursor moves once every lead of the page is stored). Invalid leads are
/// logged with every reason and counted, never stored.
pub async fn poll_source(
    pool: &PgPool,
    client: &PartnerClient,
) -> Result<(u64, u64), PartnerLeadError> {
    let source = client.source().to_string();
    let mut cursor = store::cursor(pool, &source).await?;
    let (mut stored, mut refused) = (0, 0);
    for _ in 0..100 {
        let (leads, next) = match client.poll(cursor.as_deref()).await {
            Ok(page) => page,
            Err(error) => {
                store::poll_failed(pool, &source, &error.to_string()).await?;
                return Err(error.into());
            }
        };
        for body in &leads {
            match accept_lead(pool, &source, client.config(), body).await {
                Ok((Intake::Stored(_), _)) => stored += 1,
                Ok((Intake::Repeated, _)) => {}
                Err(IntakeError::Invalid(problems)) => {
                    refused += 1;
                    metrics::counter!("orderbridge_partner_leads_refused_total", "source" => source.clone()).increment(1);
                    tracing::error!(source = %source, problems = %problems.join("; "),
                        "A polled partner lead is invalid; not stored.");
                }
                Err(IntakeError::Store(e)) => return Err(e.into()),
            }
        }
        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
        store::set_cursor(&mut conn, &source, next.as_deref()).await?;
        if leads.is_empty() || next == cursor {
            break;
        }
        cursor = next;
    }
    Ok((stored, refused))
}
