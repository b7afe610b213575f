//! The simulated account's data, the id counters and the few operations that
//! several endpoints share (moving a lead, linking, building webhook forms).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    AmoSimConfig, Fault, SimDelivery, SimField, SimLead, SimLink, SimNote, SimPipeline, SimRequest,
    SimTask,
};

pub(super) const WON: u64 = 142;
pub(super) const LOST: u64 = 143;

/// Account timezone offset (Europe/Moscow, no DST) used by `date` fields.
pub(super) const TZ_OFFSET_SECS: i64 = 3 * 3600;

pub(super) const PHONE_ENUMS: [&str; 6] = ["WORK", "WORKDD", "MOB", "FAX", "HOME", "OTHER"];
pub(super) const EMAIL_ENUMS: [&str; 3] = ["WORK", "PRIV", "OTHER"];

pub(super) fn now_ts() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(super) struct Status {
    pub id: u64,
    pub name: String,
    pub sort: u64,
    pub kind: u8,
    pub editable: bool,
    pub color: &'static str,
}

pub(super) struct Pipeline {
    pub id: u64,
    pub name: String,
    pub sort: u64,
    pub is_main: bool,
    pub statuses: Vec<Status>,
}

impl Pipeline {
    pub fn has_status(&self, status_id: u64) -> bool {
        self.statuses.iter().any(|s| s.id == status_id)
    }

    /// The first stage after the incoming one that is not 142/143.
    pub fn first_regular(&self) -> u64 {
        self.statuses
            .iter()
            .find(|s| s.kind == 0 && s.id != WON && s.id != LOST)
            .or_else(|| self.statuses.first())
            .map(|s| s.id)
            .unwrap_or(WON)
    }
}

pub(super) struct User {
    pub id: u64,
    pub name: String,
    /// `rights.is_active`: a deactivated user stays in the list.
    pub active: bool,
}

pub(super) struct Field {
    pub id: u64,
    pub name: String,
    pub field_type: String,
    pub code: Option<String>,
    pub sort: u64,
    pub enums: Vec<(u64, String)>,
}

pub(super) struct Lead {
    pub id: u64,
    pub name: String,
    pub price: i64,
    pub pipeline_id: u64,
    pub status_id: u64,
    pub responsible_user_id: u64,
    pub created_by: u64,
    pub updated_by: u64,
    pub created_at: i64,
    pub updated_at: i64,
    pub closed_at: Option<i64>,
    pub loss_reason_id: Option<u64>,
    /// Read-form entries `{field_id, field_name, field_code, field_type, values}`.
    pub fields: Vec<Value>,
    pub tags: Vec<u64>,
    pub company_id: Option<u64>,
    pub request_id: Option<String>,
}

pub(super) struct Contact {
    pub id: u64,
    pub name: String,
    pub first_name: String,
    pub last_name: String,
    /// (value as entered, enum code)
    pub phones: Vec<(String, String)>,
    pub emails: Vec<(String, String)>,
    pub responsible_user_id: u64,
    pub created_by: u64,
    pub created_at: i64,
    pub updated_at: i64,
    pub company_id: Option<u64>,
}

pub(super) struct Company {
    pub id: u64,
    pub name: String,
}

pub(super) struct Event {
    pub id: String,
    pub entity_id: u64,
    pub created_by: u64,
    pub created_at: i64,
    /// (status_id, pipeline_id)
    pub before: (u64, u64),
    pub after: (u64, u64),
}

pub(super) struct Webhook {
    pub id: u64,
    pub destination: String,
    pub settings: Vec<String>,
    pub sort: i64,
    pub disabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub created_by: u64,
    /// When deliveries failed, for the auto-disable rule.
    pub failures: VecDeque<Instant>,
}

#[derive(Default)]
pub(super) struct Tokens {
    access: HashMap<String, Instant>,
    current_refresh: Option<String>,
    previous_refresh: Option<String>,
    long_lived: Option<String>,
}

impl Tokens {
    pub fn access_valid(&self, token: &str, now: Instant) -> bool {
        if self.long_lived.as_deref() == Some(token) {
            return true;
        }
        self.access.get(token).is_some_and(|exp| *exp > now)
    }

    /// Rotates: accepts the current refresh token, or the previous one while the
    /// current one has not been used yet. Returns (access, refresh).
    pub fn refresh(&mut self, presented: &str, ttl: Duration) -> Option<(String, String)> {
        let known = self.current_refresh.as_deref() == Some(presented)
            || self.previous_refresh.as_deref() == Some(presented);
        if !known {
            return None;
        }
        let access = format!(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.{}.{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let refresh = format!("def50200{}", uuid::Uuid::new_v4().simple());
        self.previous_refresh = Some(presented.to_string());
        self.current_refresh = Some(refresh.clone());
        self.access.insert(access.clone(), Instant::now() + ttl);
        Some((access, refresh))
    }

    pub fn revoke_all(&mut self) {
        self.access.clear();
        self.current_refresh = None;
        self.previous_refresh = None;
        self.long_lived = None;
    }
}

/// One lead change, for webhooks.
pub(super) struct LeadChange {
    pub lead_id: u64,
    pub created: bool,
    pub status_changed: bool,
    pub old_status: u64,
    pub old_pipeline: u64,
    pub by_user: u64,
}

/// One webhook POST to make.
pub(super) struct HookJob {
    pub webhook_id: u64,
    pub destination: String,
    pub form: Vec<(String, String)>,
}

#[derive(Default)]
struct Ids {
    pipeline: u64,
    status: u64,
    user: u64,
    field: u64,
    enum_: u64,
    lead: u64,
    contact: u64,
    company: u64,
    note: u64,
    task: u64,
    webhook: u64,
    tag: u64,
    event: u64,
}

fn bump(counter: &mut u64) -> u64 {
    let v = *counter;
    *counter += 1;
    v
}

pub(super) struct State {
    pub cfg: AmoSimConfig,
    /// Values amoCRM refuses in a new contact's fields (validation error).
    pub refused_contact_values: Vec<String>,
    /// Values that make a lead item of `/leads/complex` invalid.
    pub refused_lead_values: Vec<String>,
    pub base_url: String,
    ids: Ids,
    pub pipelines: Vec<Pipeline>,
    pub users: Vec<User>,
    pub lead_fields: Vec<Field>,
    pub contact_fields: Vec<Field>,
    pub leads: BTreeMap<u64, Lead>,
    pub contacts: BTreeMap<u64, Contact>,
    pub companies: BTreeMap<u64, Company>,
    pub links: Vec<SimLink>,
    pub notes: Vec<SimNote>,
    pub tasks: Vec<SimTask>,
    pub tags: Vec<(u64, String)>,
    pub events: Vec<Event>,
    pub webhooks: Vec<Webhook>,
    pub tokens: Tokens,
    pub window: VecDeque<Instant>,
    pub too_many: u32,
    /// Every 429 the rate limit gave (never reset; injected ones not counted).
    pub rate_limited: usize,
    pub blocked: bool,
    pub faults: VecDeque<Fault>,
    /// Faults for requests whose path starts with the prefix (first match first).
    pub path_faults: Vec<(String, Fault)>,
    /// Every n-th request gets this fault until lifted (after queued ones).
    pub steady_fault: Option<crate::sim::support::SteadyFault<Fault>>,
    /// How long every answer takes (a real account answers in 100–500 ms).
    pub answer_delay: std::time::Duration,
    /// Requests to keep waiting before they are carried out (first match first).
    pub holds: Vec<PendingHold>,
    pub requests: Vec<SimRequest>,
    pub deliveries: Vec<SimDelivery>,
    pub refresh_calls: usize,
}

/// A request the front keeps waiting, before carrying it out, until the
/// test releases it ([`super::AmoSim::hold_next`]).
pub struct PendingHold {
    pub method: String,
    pub path: String,
    /// A query parameter the request must carry (decoded name).
    pub query_key: String,
    pub reached: tokio::sync::oneshot::Sender<()>,
    pub release: tokio::sync::oneshot::Receiver<()>,
}

impl PendingHold {
    pub fn matches(&self, method: &str, path: &str, query: &super::wire::Query) -> bool {
        self.method == method && self.path == path && query.get(&self.query_key).is_some()
    }
}

impl State {
    pub fn new(cfg: AmoSimConfig, base_url: String) -> State {
        let tokens = Tokens {
            current_refresh: Some(cfg.initial_refresh_token.clone()),
            long_lived: cfg.long_lived_token.clone(),
            ..Tokens::default()
        };
        let mut st = State {
            cfg,
            base_url,
            ids: Ids {
                pipeline: 6_950_551,
                status: 58_141_803,
                user: 8_375_357,
                field: 184_994,
                enum_: 867_968,
                lead: 152_462,
                contact: 583_338,
                company: 771_001,
                note: 310_001,
                task: 420_001,
                webhook: 1_001,
                tag: 50_001,
                event: 1,
            },
            pipelines: Vec::new(),
            users: Vec::new(),
            refused_contact_values: Vec::new(),
            refused_lead_values: Vec::new(),
            lead_fields: Vec::new(),
            contact_fields: Vec::new(),
            leads: BTreeMap::new(),
            contacts: BTreeMap::new(),
            companies: BTreeMap::new(),
            links: Vec::new(),
            notes: Vec::new(),
            tasks: Vec::new(),
            tags: Vec::new(),
            events: Vec::new(),
            webhooks: Vec::new(),
            tokens,
            window: VecDeque::new(),
            too_many: 0,
            blocked: false,
            faults: VecDeque::new(),
            path_faults: Vec::new(),
            steady_fault: None,
            rate_limited: 0,
            answer_delay: std::time::Duration::ZERO,
            holds: Vec::new(),
            requests: Vec::new(),
            deliveries: Vec::new(),
            refresh_calls: 0,
        };
        for (name, code, enums) in [
            ("Phone", "PHONE", &PHONE_ENUMS[..]),
            ("Email", "EMAIL", &EMAIL_ENUMS[..]),
        ] {
            let field = st.new_field(name, "multitext", Some(code.to_string()), enums);
            st.contact_fields.push(field);
        }
        st
    }

    fn new_field(
        &mut self,
        name: &str,
        field_type: &str,
        code: Option<String>,
        enums: &[&str],
    ) -> Field {
        let id = bump(&mut self.ids.field);
        let enums = enums
            .iter()
            .map(|e| (bump(&mut self.ids.enum_), e.to_string()))
            .collect();
        Field {
            id,
            name: name.to_string(),
            field_type: field_type.to_string(),
            code,
            sort: 500,
            enums,
        }
    }

    /// The user API changes are made as.
    pub fn api_user(&self) -> u64 {
        self.users.first().map(|u| u.id).unwrap_or(1)
    }

    pub fn next_lead_id(&mut self) -> u64 {
        bump(&mut self.ids.lead)
    }
    pub fn next_contact_id(&mut self) -> u64 {
        bump(&mut self.ids.contact)
    }
    pub fn next_company_id(&mut self) -> u64 {
        bump(&mut self.ids.company)
    }
    pub fn next_note_id(&mut self) -> u64 {
        bump(&mut self.ids.note)
    }
    pub fn next_task_id(&mut self) -> u64 {
        bump(&mut self.ids.task)
    }
    pub fn next_webhook_id(&mut self) -> u64 {
        bump(&mut self.ids.webhook)
    }

    pub fn main_pipeline(&self) -> Option<&Pipeline> {
        self.pipelines
            .iter()
            .find(|p| p.is_main)
            .or(self.pipelines.first())
    }

    pub fn pipeline(&self, id: u64) -> Option<&Pipeline> {
        self.pipelines.iter().find(|p| p.id == id)
    }

    pub fn add_pipeline(&mut self, name: &str, stages: &[&str]) -> SimPipeline {
        let id = bump(&mut self.ids.pipeline);
        let mut statuses = vec![Status {
            id: bump(&mut self.ids.status),
            name: "Incoming leads".to_string(),
            sort: 10,
            kind: 1,
            editable: false,
            color: "#c1c1c1",
        }];
        for (i, stage) in stages.iter().enumerate() {
            statuses.push(Status {
                id: bump(&mut self.ids.status),
                name: stage.to_string(),
                sort: 20 + 10 * i as u64,
                kind: 0,
                editable: true,
                color: "#99ccff",
            });
        }
        statuses.push(Status {
            id: WON,
            name: "Closed - won".to_string(),
            sort: 10000,
            kind: 0,
            editable: false,
            color: "#CCFF66",
        });
        statuses.push(Status {
            id: LOST,
            name: "Closed - lost".to_string(),
            sort: 11000,
            kind: 0,
            editable: false,
            color: "#D5D8DB",
        });
        let sim = SimPipeline {
            id,
            name: name.to_string(),
            stages: statuses.iter().map(|s| (s.id, s.name.clone())).collect(),
        };
        let is_main = self.pipelines.is_empty();
        self.pipelines.push(Pipeline {
            id,
            name: name.to_string(),
            sort: self.pipelines.len() as u64 + 1,
            is_main,
            statuses,
        });
        sim
    }

    pub fn add_user(&mut self, name: &str) -> u64 {
        let id = bump(&mut self.ids.user);
        self.users.push(User {
            id,
            name: name.to_string(),
            active: true,
        });
        id
    }

    pub fn user_exists(&self, id: u64) -> bool {
        id == self.api_user() || self.users.iter().any(|u| u.id == id)
    }

    pub fn add_lead_field(&mut self, name: &str, field_type: &str, enums: &[&str]) -> SimField {
        let field = self.new_field(name, field_type, None, enums);
        let sim = SimField {
            id: field.id,
            name: field.name.clone(),
            enums: field.enums.clone(),
        };
        self.lead_fields.push(field);
        sim
    }

    pub fn add_seed_contact(&mut self, name: &str, phones: &[&str], emails: &[&str]) -> u64 {
        let id = self.next_contact_id();
        let now = now_ts();
        let by = self.api_user();
        self.contacts.insert(
            id,
            Contact {
                id,
                name: name.to_string(),
                first_name: name.to_string(),
                last_name: String::new(),
                phones: phones
                    .iter()
                    .map(|p| (p.to_string(), "WORK".to_string()))
                    .collect(),
                emails: emails
                    .iter()
                    .map(|e| (e.to_string(), "WORK".to_string()))
                    .collect(),
                responsible_user_id: by,
                created_by: by,
                created_at: now,
                updated_at: now,
                company_id: None,
            },
        );
        id
    }

    /// The id of the tag with this name (case-insensitive), created if new.
    pub fn tag_id(&mut self, name: &str) -> u64 {
        if let Some((id, _)) = self
            .tags
            .iter()
            .find(|(_, n)| n.to_lowercase() == name.to_lowercase())
        {
            return *id;
        }
        let id = bump(&mut self.ids.tag);
        self.tags.push((id, name.to_string()));
        id
    }

    pub fn tag_name(&self, id: u64) -> Option<&str> {
        self.tags
            .iter()
            .find(|(t, _)| *t == id)
            .map(|(_, n)| n.as_str())
    }

    pub fn lead_contacts(&self, lead_id: u64) -> Vec<(u64, bool)> {
        self.links
            .iter()
            .filter(|l| l.lead_id == lead_id)
            .map(|l| (l.contact_id, l.main))
            .collect()
    }

    /// Links a contact to a lead; the first contact of a lead is its main one.
    pub fn link(&mut self, lead_id: u64, contact_id: u64, main: bool) -> bool {
        let first = !self.links.iter().any(|l| l.lead_id == lead_id);
        let main = main || first;
        if main {
            for l in self.links.iter_mut().filter(|l| l.lead_id == lead_id) {
                l.main = false;
            }
        }
        if let Some(l) = self
            .links
            .iter_mut()
            .find(|l| l.lead_id == lead_id && l.contact_id == contact_id)
        {
            l.main = l.main || main;
            return l.main;
        }
        self.links.push(SimLink {
            lead_id,
            contact_id,
            main,
        });
        main
    }

    pub fn sim_lead(&self, id: u64) -> Option<SimLead> {
        let l = self.leads.get(&id)?;
        Some(SimLead {
            id: l.id,
            name: l.name.clone(),
            price: l.price,
            pipeline_id: l.pipeline_id,
            status_id: l.status_id,
            responsible_user_id: l.responsible_user_id,
            custom_fields_values: if l.fields.is_empty() {
                Value::Null
            } else {
                Value::Array(l.fields.clone())
            },
            tags: l
                .tags
                .iter()
                .filter_map(|t| self.tag_name(*t).map(str::to_string))
                .collect(),
            contact_ids: self.lead_contacts(id).into_iter().map(|c| c.0).collect(),
            created_at: l.created_at,
            updated_at: l.updated_at,
            request_id: l.request_id.clone(),
        })
    }

    /// Sets a lead's stage, records the `lead_status_changed` event if it changed.
    /// Returns the change, or None for an unknown lead.
    pub fn move_lead(
        &mut self,
        lead_id: u64,
        pipeline_id: u64,
        status_id: u64,
        by_user: u64,
    ) -> Option<LeadChange> {
        let now = now_ts();
        let lead = self.leads.get_mut(&lead_id)?;
        let before = (lead.status_id, lead.pipeline_id);
        lead.status_id = status_id;
        lead.pipeline_id = pipeline_id;
        lead.updated_at = now;
        lead.updated_by = by_user;
        let changed = before != (status_id, pipeline_id);
        if changed {
            lead.closed_at = (status_id == WON || status_id == LOST).then_some(now);
            let n = bump(&mut self.ids.event);
            self.events.push(Event {
                id: format!("01j{n:023x}"),
                entity_id: lead_id,
                created_by: by_user,
                created_at: now,
                before,
                after: (status_id, pipeline_id),
            });
        }
        Some(LeadChange {
            lead_id,
            created: false,
            status_changed: changed,
            old_status: before.0,
            old_pipeline: before.1,
            by_user,
        })
    }

    /// A manager types `value` into the lead's text field `field_name`: the lead
    /// changes (`updated_at`, `updated_by`); an `update` change is returned for
    /// the webhooks. `None` for an unknown lead or field.
    pub fn set_lead_text_field(
        &mut self,
        lead_id: u64,
        field_name: &str,
        value: &str,
        by_user: u64,
    ) -> Option<LeadChange> {
        let field = self.lead_fields.iter().find(|f| f.name == field_name)?;
        let entry = serde_json::json!({
            "field_id": field.id, "field_name": field.name, "field_code": field.code,
            "field_type": field.field_type, "values": [{ "value": value }],
        });
        let id = field.id;
        let lead = self.leads.get_mut(&lead_id)?;
        super::fields::merge_fields(&mut lead.fields, vec![(id, Some(entry))]);
        lead.updated_at = now_ts();
        lead.updated_by = by_user;
        Some(LeadChange {
            lead_id,
            created: false,
            status_changed: false,
            old_status: lead.status_id,
            old_pipeline: lead.pipeline_id,
            by_user,
        })
    }

    /// The webhook POSTs these changes cause: one per enabled webhook that
    /// subscribed to any of them, items numbered `[0]`, `[1]`, … per action.
    pub fn hook_jobs(&self, changes: &[LeadChange]) -> Vec<HookJob> {
        let mut jobs = Vec::new();
        for hook in self.webhooks.iter().filter(|w| !w.disabled) {
            let wants = |s: &str| hook.settings.iter().any(|x| x == s);
            let mut form = Vec::new();
            for (action, setting) in [
                ("add", "add_lead"),
                ("update", "update_lead"),
                ("status", "status_lead"),
            ] {
                if !wants(setting) {
                    continue;
                }
                let selected = changes.iter().filter(|c| match action {
                    "add" => c.created,
                    "update" => !c.created,
                    _ => c.status_changed,
                });
                for (i, change) in selected.enumerate() {
                    self.lead_form(&mut form, action, i, change);
                }
            }
            if form.is_empty() {
                continue;
            }
            form.push(("account[subdomain]".into(), self.cfg.subdomain.clone()));
            form.push(("account[id]".into(), self.cfg.account_id.to_string()));
            form.push((
                "account[_links][self]".into(),
                format!("https://{}.amocrm.ru", self.cfg.subdomain),
            ));
            jobs.push(HookJob {
                webhook_id: hook.id,
                destination: hook.destination.clone(),
                form,
            });
        }
        jobs
    }

    fn lead_form(
        &self,
        form: &mut Vec<(String, String)>,
        action: &str,
        i: usize,
        change: &LeadChange,
    ) {
        let Some(l) = self.leads.get(&change.lead_id) else {
            return;
        };
        let p = format!("leads[{action}][{i}]");
        let mut put = |k: &str, v: String| form.push((format!("{p}[{k}]"), v));
        put("id", l.id.to_string());
        put("name", l.name.clone());
        put("status_id", l.status_id.to_string());
        if action == "status" {
            put("old_status_id", change.old_status.to_string());
        }
        put("pipeline_id", l.pipeline_id.to_string());
        if action == "status" {
            put("old_pipeline_id", change.old_pipeline.to_string());
        }
        put("price", l.price.to_string());
        put("responsible_user_id", l.responsible_user_id.to_string());
        put("last_modified", l.updated_at.to_string());
        put("modified_user_id", change.by_user.to_string());
        put("created_user_id", l.created_by.to_string());
        put("date_create", l.created_at.to_string());
        put("created_at", l.created_at.to_string());
        put("updated_at", l.updated_at.to_string());
        put("account_id", self.cfg.account_id.to_string());
        for (fi, f) in l.fields.iter().enumerate() {
            put(
                &format!("custom_fields][{fi}][id"),
                f["field_id"].to_string(),
            );
            put(
                &format!("custom_fields][{fi}][name"),
                f["field_name"].as_str().unwrap_or_default().to_string(),
            );
            let values = f["values"].as_array().cloned().unwrap_or_default();
            for (vi, v) in values.iter().enumerate() {
                let text = match &v["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                put(&format!("custom_fields][{fi}][values][{vi}][value"), text);
                if let Some(e) = v.get("enum_id").and_then(Value::as_u64) {
                    put(
                        &format!("custom_fields][{fi}][values][{vi}][enum"),
                        e.to_string(),
                    );
                }
            }
        }
    }
}
