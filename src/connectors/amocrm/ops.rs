//! The operations the bridge needs, on top of the request plumbing: reads
//! (pipelines, fields, users, leads, contacts, events, webhooks) with all pages,
//! and batch writes of at most 50 items whose invalid items are reported one by
//! one while the rest go through, and whose 504s split the batch.

use std::collections::{BTreeMap, HashSet};

use futures::future::BoxFuture;
use futures::FutureExt;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::AmoClient;
use super::error::{AmoError, ItemRejection};
use super::wire;
use super::*;
use crate::domain::{Email, Phone};

/// amoCRM's recommended (and `/leads/complex`'s hard) batch size.
pub const BATCH: usize = 50;
/// An account's requests are spaced this much wider than its quota (7/s:
/// one every 157 ms instead of 143). amoCRM counts requests as they arrive,
/// and a large batch body's upload (or a busy host) can bring two of ours
/// closer together than they left; a 429 costs the whole account its
/// `retry_after`, and repeated ones an IP block that only support lifts.
/// Full batches make up the throughput given up.
pub const RATE_MARGIN: f64 = 1.10;
/// Largest page amoCRM returns.
const PAGE: usize = 250;

fn q(key: &str, value: impl ToString) -> (String, String) {
    (key.to_string(), value.to_string())
}

impl AmoClient {
    // ---- reference data ----------------------------------------------------

    /// Pipelines with their stages (cached; see [`AmoClient::stage`]).
    pub async fn pipelines(&self) -> Result<Vec<Pipeline>, AmoError> {
        if let Some(cached) = self.inner.pipelines.read().await.clone() {
            return Ok(cached);
        }
        self.reload_pipelines().await
    }

    /// Reads the pipelines again and caches them.
    pub async fn reload_pipelines(&self) -> Result<Vec<Pipeline>, AmoError> {
        let answer = self
            .call(Method::GET, "/api/v4/leads/pipelines", &[], None)
            .await?;
        let page: Option<wire::Hal<wire::Pipelines>> = answer.json("the pipelines")?;
        let pipelines: Vec<Pipeline> = page
            .map(|p| p.embedded.pipelines)
            .unwrap_or_default()
            .into_iter()
            .map(|p| Pipeline {
                id: p.id,
                name: p.name,
                is_main: p.is_main,
                is_archive: p.is_archive,
                stages: p
                    .embedded
                    .unwrap_or_default()
                    .statuses
                    .into_iter()
                    .map(|s| Stage {
                        kind: match (s.id, s.kind) {
                            (WON_STATUS_ID, _) => StageKind::Won,
                            (LOST_STATUS_ID, _) => StageKind::Lost,
                            (_, 1) => StageKind::Incoming,
                            _ => StageKind::Regular,
                        },
                        id: s.id,
                        name: s.name,
                        sort: s.sort,
                    })
                    .collect(),
            })
            .collect();
        *self.inner.pipelines.write().await = Some(pipelines.clone());
        Ok(pipelines)
    }

    /// A stage by ids; an id the cache does not know triggers one reload.
    pub async fn stage(&self, pipeline_id: u64, status_id: u64) -> Result<Option<Stage>, AmoError> {
        let find = |pipelines: &[Pipeline]| {
            pipelines
                .iter()
                .find(|p| p.id == pipeline_id)
                .and_then(|p| p.stages.iter().find(|s| s.id == status_id).cloned())
        };
        if let Some(stage) = find(&self.pipelines().await?) {
            return Ok(Some(stage));
        }
        Ok(find(&self.reload_pipelines().await?))
    }

    /// Every lead custom field (all pages).
    pub async fn lead_custom_fields(&self) -> Result<Vec<CustomField>, AmoError> {
        let mut fields = Vec::new();
        for page in 1.. {
            let answer = self
                .call(
                    Method::GET,
                    "/api/v4/leads/custom_fields",
                    &[q("page", page), q("limit", PAGE)],
                    None,
                )
                .await?;
            let Some(hal) = answer.json::<wire::Hal<wire::CustomFields>>("the custom fields")?
            else {
                break;
            };
            let more = hal.has_next();
            fields.extend(hal.embedded.custom_fields.into_iter().map(|f| {
                CustomField {
                    id: f.id,
                    name: f.name,
                    field_type: f.field_type,
                    code: f.code,
                    enums: f
                        .enums
                        .unwrap_or_default()
                        .into_iter()
                        .map(|e| (e.id, e.value))
                        .collect(),
                }
            }));
            if !more {
                break;
            }
        }
        Ok(fields)
    }

    /// The account's users (all pages).
    pub async fn users(&self) -> Result<Vec<User>, AmoError> {
        let mut users = Vec::new();
        for page in 1.. {
            let answer = self
                .call(
                    Method::GET,
                    "/api/v4/users",
                    &[q("page", page), q("limit", PAGE)],
                    None,
                )
                .await?;
            let Some(hal) = answer.json::<wire::Hal<wire::Users>>("the users")? else {
                break;
            };
            let more = hal.has_next();
            users.extend(hal.embedded.users.into_iter().map(|u| User {
                id: u.id,
                name: u.name,
                email: u.email,
                active: u.rights.is_none_or(|r| r.is_active),
            }));
            if !more {
                break;
            }
        }
        Ok(users)
    }

    // ---- leads ---------------------------------------------------------------

    /// Creates leads (batches of 50). Each item carries its `request_id`.
    pub async fn create_leads(&self, leads: &[NewLead]) -> Result<BatchOutcome, AmoError> {
        let items: Vec<(String, Value)> = leads
            .iter()
            .map(|l| (l.request_id.clone(), lead_json(l, true)))
            .collect();
        self.write_batches(Method::POST, "/api/v4/leads", items, "leads")
            .await
    }

    /// Creates leads with their new contacts through `/leads/complex` (≤ 50 per
    /// request; a bare-array answer with `request_id` arrays and `merged`).
    pub async fn create_leads_complex(
        &self,
        leads: &[NewComplexLead],
    ) -> Result<Vec<ComplexCreated>, AmoError> {
        let mut created = Vec::new();
        for chunk in leads.chunks(BATCH) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|item| {
                    let mut lead = lead_json(&item.lead, true);
                    if let Some(contact) = &item.contact {
                        lead["_embedded"]["contacts"] = json!([contact_json(contact, false)]);
                    }
                    lead
                })
                .collect();
            let answer = self
                .call(
                    Method::POST,
                    "/api/v4/leads/complex",
                    &[],
                    Some(&Value::Array(body)),
                )
                .await?;
            let rows: Vec<wire::ComplexCreatedWire> =
                answer.json("the complex create")?.unwrap_or_default();
            created.extend(rows.into_iter().map(|r| ComplexCreated {
                request_id: r.request_id.into_iter().next().unwrap_or_default(),
                lead_id: r.id,
                contact_id: r.contact_id,
                merged: r.merged,
            }));
        }
        Ok(created)
    }

    /// Updates leads (batches of 50): stage (status with pipeline, always
    /// together), name, price, responsible, fields, `tags_to_add`. The outcome's
    /// request ids are the lead ids.
    pub async fn update_leads(&self, updates: &[LeadUpdate]) -> Result<BatchOutcome, AmoError> {
        let items: Vec<(String, Value)> = updates
            .iter()
            .map(|u| {
                let mut item = json!({ "id": u.id });
                if let Some((pipeline_id, status_id)) = u.stage {
                    item["pipeline_id"] = json!(pipeline_id);
                    item["status_id"] = json!(status_id);
                }
                if let Some(name) = &u.name {
                    item["name"] = json!(name);
                }
                if let Some(price) = u.price {
                    item["price"] = json!(price);
                }
                if let Some(user) = u.responsible_user_id {
                    item["responsible_user_id"] = json!(user);
                }
                if !u.fields.is_empty() {
                    item["custom_fields_values"] = fields_json(&u.fields);
                }
                if !u.tags_to_add.is_empty() {
                    item["tags_to_add"] = json!(u
                        .tags_to_add
                        .iter()
                        .map(|t| json!({ "name": t }))
                        .collect::<Vec<_>>());
                }
                (u.id.to_string(), item)
            })
            .collect();
        self.write_batches(Method::PATCH, "/api/v4/leads", items, "leads")
            .await
    }

    /// One lead, or `None` when amoCRM does not have it (204).
    pub async fn lead(&self, id: u64) -> Result<Option<Lead>, AmoError> {
        let answer = self
            .call(
                Method::GET,
                &format!("/api/v4/leads/{id}"),
                &[q("with", "contacts")],
                None,
            )
            .await?;
        Ok(answer.json::<wire::LeadWire>("a lead")?.map(lead_from_wire))
    }

    /// Leads by ids (any number; 250 per request). Missing ids are simply absent.
    pub async fn leads_by_ids(&self, ids: &[u64]) -> Result<Vec<Lead>, AmoError> {
        let mut leads = Vec::new();
        for chunk in ids.chunks(PAGE) {
            let mut query = vec![q("limit", PAGE), q("with", "contacts")];
            query.extend(chunk.iter().map(|id| q("filter[id][]", id)));
            let answer = self
                .call(Method::GET, "/api/v4/leads", &query, None)
                .await?;
            if let Some(hal) = answer.json::<wire::Hal<wire::Leads>>("leads")? {
                leads.extend(hal.embedded.leads.into_iter().map(lead_from_wire));
            }
        }
        Ok(leads)
    }

    /// Leads amoCRM's full-text search finds for `query` (fuzzy: check the hits).
    pub async fn search_leads(&self, query: &str) -> Result<Vec<Lead>, AmoError> {
        let params = vec![q("query", query), q("limit", PAGE), q("with", "contacts")];
        let answer = self
            .call(Method::GET, "/api/v4/leads", &params, None)
            .await?;
        Ok(answer
            .json::<wire::Hal<wire::Leads>>("leads")?
            .map(|h| h.embedded.leads.into_iter().map(lead_from_wire).collect())
            .unwrap_or_default())
    }

    /// Leads updated at or after `from` (Unix seconds), oldest first, all pages.
    pub async fn leads_updated_since(&self, from: i64) -> Result<Vec<Lead>, AmoError> {
        let mut leads = Vec::new();
        for page in 1.. {
            let query = vec![
                q("filter[updated_at][from]", from),
                q("order[updated_at]", "asc"),
                q("limit", PAGE),
                q("page", page),
                q("with", "contacts"),
            ];
            let answer = self
                .call(Method::GET, "/api/v4/leads", &query, None)
                .await?;
            let Some(hal) = answer.json::<wire::Hal<wire::Leads>>("leads")? else {
                break;
            };
            let more = hal.has_next();
            leads.extend(hal.embedded.leads.into_iter().map(lead_from_wire));
            if !more {
                break;
            }
        }
        Ok(leads)
    }

    // ---- contacts ------------------------------------------------------------

    /// Contacts whose PHONE holds `phone` or whose EMAIL holds `email`. amoCRM's
    /// `query` is full-text and fuzzy, so every hit is checked field by field
    /// after normalisation; near misses are dropped.
    pub async fn find_contacts(
        &self,
        phone: Option<&Phone>,
        email: Option<&Email>,
    ) -> Result<Vec<Contact>, AmoError> {
        let mut found: BTreeMap<u64, Contact> = BTreeMap::new();
        if let Some(phone) = phone {
            for contact in self.search_contacts(phone.national_digits()).await? {
                let matches = contact
                    .phones
                    .iter()
                    .filter_map(|p| Phone::parse(p).ok())
                    .any(|p| &p == phone);
                if matches {
                    found.insert(contact.id, contact);
                }
            }
        }
        if let Some(email) = email {
            for contact in self.search_contacts(email.as_str()).await? {
                let matches = contact
                    .emails
                    .iter()
                    .filter_map(|e| Email::parse(e))
                    .any(|e| &e == email);
                if matches {
                    found.insert(contact.id, contact);
                }
            }
        }
        Ok(found.into_values().collect())
    }

    async fn search_contacts(&self, query: &str) -> Result<Vec<Contact>, AmoError> {
        self.contact_pages(vec![q("query", query)], None).await
    }

    /// Every contact changed since `since` (Unix seconds; `None`: all), in
    /// pages of 250, through `If-Modified-Since` as amoCRM recommends for
    /// lists. This feeds the bridge's local contact index.
    pub async fn contacts_modified_since(
        &self,
        since: Option<i64>,
    ) -> Result<Vec<Contact>, AmoError> {
        self.contact_pages(Vec::new(), since).await
    }

    /// All pages of `GET /api/v4/contacts` with `query` (plus paging).
    async fn contact_pages(
        &self,
        query: Vec<(String, String)>,
        modified_since: Option<i64>,
    ) -> Result<Vec<Contact>, AmoError> {
        let mut contacts = Vec::new();
        for page in 1.. {
            let mut params = query.clone();
            params.extend([q("limit", PAGE), q("page", page)]);
            let answer = self
                .call_since(
                    Method::GET,
                    "/api/v4/contacts",
                    &params,
                    None,
                    modified_since,
                )
                .await?;
            let Some(hal) = answer.json::<wire::Hal<wire::Contacts>>("contacts")? else {
                break;
            };
            let more = hal.has_next();
            contacts.extend(hal.embedded.contacts.into_iter().map(contact_from_wire));
            if !more {
                break;
            }
        }
        Ok(contacts)
    }

    /// Creates contacts (batches of 50).
    pub async fn create_contacts(&self, contacts: &[NewContact]) -> Result<BatchOutcome, AmoError> {
        let items = contacts
            .iter()
            .map(|c| (c.request_id.clone(), contact_json(c, true)))
            .collect();
        self.write_batches(Method::POST, "/api/v4/contacts", items, "contacts")
            .await
    }

    /// Links a contact to a lead (as its main contact when `main`).
    pub async fn link_contact(
        &self,
        lead_id: u64,
        contact_id: u64,
        main: bool,
    ) -> Result<(), AmoError> {
        let body = json!([{ "to_entity_id": contact_id, "to_entity_type": "contacts", "metadata": { "is_main": main } }]);
        self.call(
            Method::POST,
            &format!("/api/v4/leads/{lead_id}/link"),
            &[],
            Some(&body),
        )
        .await?;
        Ok(())
    }

    // ---- notes, tasks ----------------------------------------------------------

    /// Adds `common` notes to leads (batches of 50).
    pub async fn add_notes(&self, notes: &[NewNote]) -> Result<BatchOutcome, AmoError> {
        let items = notes
            .iter()
            .map(|n| {
                (
                    n.request_id.clone(),
                    json!({ "entity_id": n.lead_id, "note_type": "common", "params": { "text": n.text }, "request_id": n.request_id }),
                )
            })
            .collect();
        self.write_batches(Method::POST, "/api/v4/leads/notes", items, "notes")
            .await
    }

    /// Adds tasks (batches of 50).
    pub async fn add_tasks(&self, tasks: &[NewTask]) -> Result<BatchOutcome, AmoError> {
        let items = tasks
            .iter()
            .map(|t| {
                let mut item = json!({ "text": t.text, "complete_till": t.complete_till, "task_type_id": 1, "request_id": t.request_id });
                if let Some(user) = t.responsible_user_id {
                    item["responsible_user_id"] = json!(user);
                }
                if let Some(lead) = t.lead_id {
                    item["entity_id"] = json!(lead);
                    item["entity_type"] = json!("leads");
                }
                (t.request_id.clone(), item)
            })
            .collect();
        self.write_batches(Method::POST, "/api/v4/tasks", items, "tasks")
            .await
    }

    // ---- events, webhooks ------------------------------------------------------

    /// `lead_status_changed` events created at or after `from`, all pages.
    pub async fn status_changes_since(&self, from: i64) -> Result<Vec<StatusChange>, AmoError> {
        let mut events = Vec::new();
        for page in 1.. {
            let query = vec![
                q("filter[type]", "lead_status_changed"),
                q("filter[entity]", "lead"),
                q("filter[created_at][from]", from),
                q("limit", PAGE),
                q("page", page),
            ];
            let answer = self
                .call(Method::GET, "/api/v4/events", &query, None)
                .await?;
            let Some(hal) = answer.json::<wire::Hal<wire::Events>>("events")? else {
                break;
            };
            let more = hal.has_next();
            events.extend(
                hal.embedded
                    .events
                    .into_iter()
                    .filter(|e| e.kind == "lead_status_changed")
                    .map(|e| StatusChange {
                        id: wire::request_id_text(&e.id).unwrap_or_default(),
                        lead_id: e.entity_id,
                        created_by: e.created_by,
                        created_at: e.created_at,
                        before: lead_status(&e.value_before),
                        after: lead_status(&e.value_after),
                    }),
            );
            if !more {
                break;
            }
        }
        Ok(events)
    }

    /// The account's webhooks.
    pub async fn webhooks(&self) -> Result<Vec<Webhook>, AmoError> {
        let answer = self
            .call(Method::GET, "/api/v4/webhooks", &[], None)
            .await?;
        Ok(answer
            .json::<wire::Hal<wire::Webhooks>>("webhooks")?
            .map(|h| h.embedded.webhooks)
            .unwrap_or_default()
            .into_iter()
            .map(|w| Webhook {
                id: w.id,
                destination: w.destination,
                settings: w.settings,
                disabled: w.disabled,
            })
            .collect())
    }

    /// Subscribes (or re-subscribes, which re-enables) a destination.
    pub async fn subscribe_webhook(
        &self,
        destination: &str,
        settings: &[&str],
    ) -> Result<Webhook, AmoError> {
        let body = json!({ "destination": destination, "settings": settings, "sort": 10 });
        let answer = self
            .call(Method::POST, "/api/v4/webhooks", &[], Some(&body))
            .await?;
        let w: wire::WebhookWire = answer.json("the webhook")?.ok_or(AmoError::Decode {
            what: "the webhook",
            error: "empty body".into(),
        })?;
        Ok(Webhook {
            id: w.id,
            destination: w.destination,
            settings: w.settings,
            disabled: w.disabled,
        })
    }

    /// Makes sure `destination` is subscribed, enabled and has every setting;
    /// returns whether it had to (re-)subscribe.
    pub async fn ensure_webhook(
        &self,
        destination: &str,
        settings: &[&str],
    ) -> Result<bool, AmoError> {
        let existing = self.webhooks().await?;
        let healthy = existing.iter().any(|w| {
            w.destination == destination
                && !w.disabled
                && settings
                    .iter()
                    .all(|s| w.settings.iter().any(|have| have == s))
        });
        if healthy {
            return Ok(false);
        }
        if existing
            .iter()
            .any(|w| w.destination == destination && w.disabled)
        {
            tracing::warn!(target_key = %self.target(), "amoCRM disabled our webhook; subscribing again.");
        }
        self.subscribe_webhook(destination, settings).await?;
        Ok(true)
    }

    // ---- batch mechanics --------------------------------------------------------

    /// Writes items in batches of 50, each item keyed by its request id.
    async fn write_batches(
        &self,
        method: Method,
        path: &str,
        items: Vec<(String, Value)>,
        entity: &'static str,
    ) -> Result<BatchOutcome, AmoError> {
        let mut outcome = BatchOutcome::default();
        for chunk in items.chunks(BATCH) {
            let part = self
                .write_batch(method.clone(), path.to_string(), chunk.to_vec(), entity)
                .await?;
            outcome.done.extend(part.done);
            outcome.rejected.extend(part.rejected);
        }
        Ok(outcome)
    }

    /// One batch: invalid items are set aside and the rest sent again; a 504
    /// splits the batch in halves.
    fn write_batch(
        &self,
        method: Method,
        path: String,
        items: Vec<(String, Value)>,
        entity: &'static str,
    ) -> BoxFuture<'_, Result<BatchOutcome, AmoError>> {
        async move {
            let mut pending = items;
            let mut rejected: Vec<ItemRejection> = Vec::new();
            while !pending.is_empty() {
                // Without an explicit request_id amoCRM names items by index.
                let by_index: Vec<String> = pending.iter().map(|(id, _)| id.clone()).collect();
                let body = Value::Array(pending.iter().map(|(_, v)| v.clone()).collect());
                match self.call(method.clone(), &path, &[], Some(&body)).await {
                    Ok(answer) => {
                        let done = written_ids(&answer, entity, &by_index)?;
                        return Ok(BatchOutcome { done, rejected });
                    }
                    Err(AmoError::Validation(items)) => {
                        let refused: HashSet<String> = items
                            .iter()
                            .map(|r| resolve_request_id(&r.request_id, &by_index))
                            .collect();
                        let before = pending.len();
                        pending.retain(|(id, _)| !refused.contains(id));
                        if pending.len() == before {
                            // Nothing we can attribute: give up on the whole batch.
                            return Err(AmoError::Validation(items));
                        }
                        for item in items {
                            let request_id = resolve_request_id(&item.request_id, &by_index);
                            tracing::warn!(target_key = %self.target(), request_id = %request_id,
                                errors = ?item.errors, "amoCRM refused one item of a batch; sending the others.");
                            rejected.push(ItemRejection {
                                request_id,
                                errors: item.errors,
                            });
                        }
                    }
                    Err(AmoError::GatewayTimeout) if pending.len() > 1 => {
                        let second = pending.split_off(pending.len() / 2);
                        tracing::warn!(target_key = %self.target(), size = pending.len() + second.len(),
                            "amoCRM answered 504; splitting the batch.");
                        let a = self.write_batch(method.clone(), path.clone(), pending, entity).await?;
                        let b = self.write_batch(method.clone(), path.clone(), second, entity).await?;
                        rejected.extend(a.rejected);
                        rejected.extend(b.rejected);
                        let mut done = a.done;
                        done.extend(b.done);
                        return Ok(BatchOutcome { done, rejected });
                    }
                    Err(other) => return Err(other),
                }
            }
            Ok(BatchOutcome {
                done: Vec::new(),
                rejected,
            })
        }
        .boxed()
    }
}

/// A validation error names an item by our request id, or by its index when
/// the item had none.
pub(crate) fn resolve_request_id(named: &str, by_index: &[String]) -> String {
    if by_index.iter().any(|id| id == named) {
        return named.to_string();
    }
    named
        .parse::<usize>()
        .ok()
        .and_then(|i| by_index.get(i).cloned())
        .unwrap_or_else(|| named.to_string())
}

/// (request id, id) of each written entity in a HAL answer.
fn written_ids(
    answer: &super::client::Answer,
    entity: &'static str,
    by_index: &[String],
) -> Result<Vec<(String, u64)>, AmoError> {
    let Some(body) = answer.json::<Value>(entity)? else {
        return Ok(Vec::new());
    };
    let rows = body["_embedded"][entity]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut done = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        let Some(id) = row["id"].as_u64() else {
            return Err(AmoError::Decode {
                what: entity,
                error: format!("item {index} has no id"),
            });
        };
        let request_id = match row.get("request_id").and_then(wire::request_id_text) {
            Some(named) => resolve_request_id(&named, by_index),
            // Updates are echoed by id.
            None => by_index
                .iter()
                .find(|r| **r == id.to_string())
                .or_else(|| by_index.get(index))
                .cloned()
                .unwrap_or_default(),
        };
        done.push((request_id, id));
    }
    Ok(done)
}

fn field_item(input: &FieldInput) -> Value {
    match input {
        FieldInput::Text(s) => json!({ "value": s }),
        FieldInput::Number(n) => json!({ "value": n }),
        FieldInput::Enum(id) => json!({ "enum_id": id }),
        FieldInput::Flag(b) => json!({ "value": b }),
        FieldInput::Timestamp(t) => json!({ "value": t }),
    }
}

fn fields_json(fields: &[FieldValue]) -> Value {
    json!(fields
        .iter()
        .map(|f| json!({ "field_id": f.field_id, "values": f.values.iter().map(field_item).collect::<Vec<_>>() }))
        .collect::<Vec<_>>())
}

fn lead_json(lead: &NewLead, with_request_id: bool) -> Value {
    let mut item = json!({
        "name": lead.name,
        "pipeline_id": lead.pipeline_id,
        "status_id": lead.status_id,
    });
    if with_request_id {
        item["request_id"] = json!(lead.request_id);
    }
    if let Some(price) = lead.price {
        item["price"] = json!(price);
    }
    if let Some(user) = lead.responsible_user_id {
        item["responsible_user_id"] = json!(user);
    }
    if !lead.fields.is_empty() {
        item["custom_fields_values"] = fields_json(&lead.fields);
    }
    let mut embedded = serde_json::Map::new();
    if !lead.tags.is_empty() {
        embedded.insert(
            "tags".into(),
            json!(lead
                .tags
                .iter()
                .map(|t| json!({ "name": t }))
                .collect::<Vec<_>>()),
        );
    }
    if !lead.contact_ids.is_empty() {
        embedded.insert(
            "contacts".into(),
            json!(lead
                .contact_ids
                .iter()
                .map(|id| json!({ "id": id }))
                .collect::<Vec<_>>()),
        );
    }
    item["_embedded"] = Value::Object(embedded);
    item
}

fn contact_json(contact: &NewContact, with_request_id: bool) -> Value {
    let mut fields = Vec::new();
    if let Some(phone) = &contact.phone {
        fields.push(json!({ "field_code": "PHONE", "values": [{ "value": phone.as_e164(), "enum_code": "MOB" }] }));
    }
    if let Some(email) = &contact.email {
        fields.push(json!({ "field_code": "EMAIL", "values": [{ "value": email.as_str(), "enum_code": "WORK" }] }));
    }
    let mut item = json!({ "name": contact.name, "custom_fields_values": fields });
    if with_request_id {
        item["request_id"] = json!(contact.request_id);
    }
    item
}

fn lead_from_wire(l: wire::LeadWire) -> Lead {
    let embedded = l.embedded.unwrap_or_default();
    Lead {
        id: l.id,
        name: l.name.unwrap_or_default(),
        price: l.price.as_ref().and_then(wire::as_i64),
        pipeline_id: l.pipeline_id.unwrap_or_default(),
        status_id: l.status_id.unwrap_or_default(),
        responsible_user_id: l.responsible_user_id,
        updated_at: l.updated_at.unwrap_or_default(),
        fields: l
            .custom_fields_values
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| Some((f.field_id?, f.values.iter().map(field_text).collect())))
            .collect(),
        tags: embedded.tags.into_iter().filter_map(|t| t.name).collect(),
        contact_ids: embedded.contacts.into_iter().map(|c| c.id).collect(),
    }
}

fn field_text(item: &wire::FieldItemWire) -> String {
    match (&item.value, item.enum_id) {
        (Some(Value::String(s)), _) => s.clone(),
        (Some(other), _) if !other.is_null() => other.to_string(),
        (_, Some(id)) => id.to_string(),
        _ => String::new(),
    }
}

fn contact_from_wire(c: wire::ContactWire) -> Contact {
    let mut phones = Vec::new();
    let mut emails = Vec::new();
    for field in c.custom_fields_values.unwrap_or_default() {
        let values = field.values.iter().map(field_text);
        match field.field_code.as_deref() {
            Some("PHONE") => phones.extend(values),
            Some("EMAIL") => emails.extend(values),
            _ => {}
        }
    }
    Contact {
        id: c.id,
        name: c.name.unwrap_or_default(),
        phones,
        emails,
        updated_at: c.updated_at.unwrap_or_default(),
    }
}

/// `[{"lead_status": {"id": …, "pipeline_id": …}}]` → (pipeline, status).
fn lead_status(values: &[Value]) -> Option<(u64, u64)> {
    values.iter().find_map(|v| {
        let status = v.get("lead_status")?;
        Some((
            status.get("pipeline_id").and_then(wire::as_i64)? as u64,
            status.get("id").and_then(wire::as_i64)? as u64,
        ))
    })
}
