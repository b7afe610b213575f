//! Leads: create (`POST /leads`, whole-request validation), complex create
//! (`POST /leads/complex`, bare-array answer), update (`PATCH /leads`,
//! `PATCH /leads/{id}`) and reads (`GET /leads`, `GET /leads/{id}`).

use serde_json::{json, Value};

use super::contacts::{self, NewContact};
use super::fields::{merge_fields, resolve_fields};
use super::server::Req;
use super::state::{now_ts, Company, Lead, LeadChange, State, LOST, WON};
use super::wire::{
    array_body, hal_page, object_body, request_id_of, self_link, Check, ItemErrors, Paging, Reply,
};

/// At most this many custom-field values per entity in `/leads/complex`.
const MAX_COMPLEX_FIELDS: usize = 40;

enum TagRef {
    Id(u64),
    Name(String),
}

/// An array of `{id}` or `{name}` tag objects.
fn tag_refs(raw: &Value, path: &str, st: &State, check: &mut Check) -> Vec<TagRef> {
    let Some(items) = raw.as_array() else {
        check.err("InvalidType", path, "This value should be of type array.");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, t) in items.iter().enumerate() {
        if let Some(id) = t.get("id").and_then(Value::as_u64) {
            if st.tag_name(id).is_some() {
                out.push(TagRef::Id(id));
            } else {
                check.not_choice(format!("{path}.{i}.id"));
            }
        } else if let Some(name) = t
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            out.push(TagRef::Name(name.to_string()));
        } else {
            check.err(
                "NotBlank",
                format!("{path}.{i}.name"),
                "This value should not be blank.",
            );
        }
    }
    out
}

fn tag_ids(st: &mut State, refs: Vec<TagRef>) -> Vec<u64> {
    let mut ids = Vec::new();
    for r in refs {
        let id = match r {
            TagRef::Id(id) => id,
            TagRef::Name(name) => st.tag_id(&name),
        };
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// A checked lead to create.
struct NewLead {
    name: Option<String>,
    price: i64,
    pipeline_id: u64,
    status_id: u64,
    responsible_user_id: u64,
    created_by: u64,
    loss_reason_id: Option<u64>,
    fields: Vec<(u64, Option<Value>)>,
    tags: Vec<TagRef>,
    contacts: Vec<(u64, bool)>,
    request_id: Option<String>,
}

fn check_price(obj: &Value, check: &mut Check) -> Option<i64> {
    let price = check.opt_i64(obj, "price", "price");
    if price.is_some_and(|p| p < 0) {
        check.err(
            "GreaterThanOrEqual",
            "price",
            "This value should be greater than or equal to 0.",
        );
    }
    price
}

fn check_user(st: &State, obj: &Value, check: &mut Check) -> Option<u64> {
    let user = check.opt_u64(obj, "responsible_user_id", "responsible_user_id");
    if let Some(u) = user.filter(|u| !st.user_exists(*u)) {
        let _ = u;
        check.not_choice("responsible_user_id");
        return None;
    }
    user
}

/// `complex`: contacts without an `id` are new ones, checked by the caller.
fn parse_new_lead(st: &State, item: &Value, complex: bool, check: &mut Check) -> Option<NewLead> {
    if !item.is_object() {
        check.err("InvalidType", "", "This value should be of type object.");
        return None;
    }
    let name = check.opt_str(item, "name", "name");
    let price = check_price(item, check);
    let pipeline_id = check.opt_u64(item, "pipeline_id", "pipeline_id");
    let status_id = check.opt_u64(item, "status_id", "status_id");
    let responsible = check_user(st, item, check);
    let created_by = check.opt_u64(item, "created_by", "created_by");
    let loss_reason_id = check.opt_u64(item, "loss_reason_id", "loss_reason_id");
    let stage = match (pipeline_id, status_id) {
        (Some(p), s) => match st.pipeline(p) {
            None => {
                check.not_choice("pipeline_id");
                None
            }
            Some(pl) => match s {
                None => Some((p, pl.first_regular())),
                Some(s) if pl.has_status(s) => Some((p, s)),
                Some(_) => {
                    check.not_choice("status_id");
                    None
                }
            },
        },
        (None, Some(s)) => {
            let pl = if s == WON || s == LOST {
                st.main_pipeline()
            } else {
                st.pipelines.iter().find(|p| p.has_status(s))
            };
            match pl {
                Some(pl) => Some((pl.id, s)),
                None => {
                    check.not_choice("status_id");
                    None
                }
            }
        }
        (None, None) => match st.main_pipeline() {
            Some(pl) => Some((pl.id, pl.first_regular())),
            None => {
                check.not_choice("pipeline_id");
                None
            }
        },
    };
    let fields = match item.get("custom_fields_values") {
        None | Some(Value::Null) => Vec::new(),
        Some(raw) => resolve_fields(&st.lead_fields, raw, check),
    };
    let embedded = item.get("_embedded").cloned().unwrap_or(Value::Null);
    let mut tags = match embedded.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(raw) => tag_refs(raw, "_embedded.tags", st, check),
    };
    if let Some(raw) = item.get("tags_to_add").filter(|v| !v.is_null()) {
        tags.extend(tag_refs(raw, "tags_to_add", st, check));
    }
    let mut contacts = Vec::new();
    if let Some(raw) = embedded.get("contacts").filter(|v| !v.is_null()) {
        match raw.as_array() {
            Some(list) => {
                for (i, c) in list.iter().enumerate() {
                    match c.get("id").and_then(Value::as_u64) {
                        Some(id) if st.contacts.contains_key(&id) => {
                            let main = c.get("is_main").and_then(Value::as_bool).unwrap_or(false);
                            contacts.push((id, main));
                        }
                        None if complex && c.get("id").is_none() => {}
                        _ => check.not_choice(format!("_embedded.contacts.{i}.id")),
                    }
                }
            }
            None => check.err(
                "InvalidType",
                "_embedded.contacts",
                "This value should be of type array.",
            ),
        }
    }
    let request_id = match item.get("request_id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let (pipeline_id, status_id) = stage?;
    Some(NewLead {
        name,
        price: price.unwrap_or(0),
        pipeline_id,
        status_id,
        responsible_user_id: responsible.unwrap_or_else(|| st.api_user()),
        created_by: created_by.unwrap_or_else(|| st.api_user()),
        loss_reason_id,
        fields,
        tags,
        contacts,
        request_id,
    })
}

fn insert_lead(st: &mut State, new: NewLead, changes: &mut Vec<LeadChange>) -> u64 {
    let id = st.next_lead_id();
    let now = now_ts();
    let tags = tag_ids(st, new.tags);
    let mut fields = Vec::new();
    merge_fields(&mut fields, new.fields);
    let closed = new.status_id == WON || new.status_id == LOST;
    st.leads.insert(
        id,
        Lead {
            id,
            name: new.name.unwrap_or_else(|| format!("Сделка #{id}")),
            price: new.price,
            pipeline_id: new.pipeline_id,
            status_id: new.status_id,
            responsible_user_id: new.responsible_user_id,
            created_by: new.created_by,
            updated_by: new.created_by,
            created_at: now,
            updated_at: now,
            closed_at: closed.then_some(now),
            loss_reason_id: new.loss_reason_id,
            fields,
            tags,
            company_id: None,
            request_id: new.request_id,
        },
    );
    for (contact, main) in new.contacts {
        st.link(id, contact, main);
    }
    changes.push(LeadChange {
        lead_id: id,
        created: true,
        status_changed: false,
        old_status: 0,
        old_pipeline: 0,
        by_user: new.created_by,
    });
    id
}

fn lead_href(st: &State, id: u64) -> String {
    format!("{}/api/v4/leads/{id}", st.base_url)
}

pub(super) fn create(st: &mut State, req: &Req, changes: &mut Vec<LeadChange>) -> Reply {
    let items = match array_body(req.body) {
        Ok(items) => items,
        Err(r) => return r,
    };
    if items.len() > 250 {
        return Reply::limit_250();
    }
    let mut plans = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut check = Check::default();
        let plan = parse_new_lead(st, item, false, &mut check);
        match check.finish(request_id_of(item, i)) {
            Some(e) => errors.push(e),
            None => plans.extend(plan.map(|p| (request_id_of(item, i), p))),
        }
    }
    if !errors.is_empty() {
        return Reply::validation(errors);
    }
    let rows: Vec<Value> = plans
        .into_iter()
        .map(|(rid, plan)| {
            let id = insert_lead(st, plan, changes);
            json!({"id": id, "request_id": rid, "_links": self_link(lead_href(st, id))})
        })
        .collect();
    Reply::hal(json!({
        "_links": self_link(format!("{}/api/v4/leads", st.base_url)),
        "_embedded": {"leads": rows},
    }))
}

/// `POST /leads/complex`: a lead with at most one new (or existing) contact and one company.
pub(super) fn complex(st: &mut State, req: &Req, changes: &mut Vec<LeadChange>) -> Reply {
    let items = match array_body(req.body) {
        Ok(items) => items,
        Err(r) => return r,
    };
    if items.len() > 50 {
        return Reply::limit("Limit 50 per request");
    }
    let mut plans = Vec::new();
    let mut errors: Vec<ItemErrors> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut check = Check::default();
        let mut plan = parse_new_lead(st, item, true, &mut check);
        if let Some(name) = item.get("name").and_then(Value::as_str) {
            if st
                .refused_lead_values
                .iter()
                .any(|v| name.contains(v.as_str()))
            {
                check.err("InvalidValue", "name", "This value is not valid.");
            }
        }
        // The contacts of a complex lead are new ones (or existing by id).
        let embedded = item.get("_embedded").cloned().unwrap_or(Value::Null);
        let mut contact = None;
        if let Some(list) = embedded.get("contacts").and_then(Value::as_array) {
            if list.len() > 1 {
                check.err(
                    "Count",
                    "_embedded.contacts",
                    "This collection should contain 1 element or less.",
                );
            }
            if let Some(c) = list.first() {
                let text = c.to_string();
                if st
                    .refused_contact_values
                    .iter()
                    .any(|v| text.contains(v.as_str()))
                {
                    check.err(
                        "InvalidValue",
                        "_embedded.contacts.0.custom_fields_values.0.values.0.value",
                        "This value is not valid.",
                    );
                }
                if c.get("id").is_none() {
                    contact = contacts::parse_new(st, c, "_embedded.contacts.0", &mut check);
                    if let Some(p) = plan.as_mut() {
                        p.contacts.clear();
                    }
                }
            }
        }
        let mut company = None;
        if let Some(list) = embedded.get("companies").and_then(Value::as_array) {
            if list.len() > 1 {
                check.err(
                    "Count",
                    "_embedded.companies",
                    "This collection should contain 1 element or less.",
                );
            }
            if let Some(c) = list.first() {
                company = Some(
                    check
                        .opt_str(c, "name", "_embedded.companies.0.name")
                        .unwrap_or_default(),
                );
            }
        }
        for (entity, path) in [
            (item, "custom_fields_values"),
            (
                embedded.pointer("/contacts/0").unwrap_or(&Value::Null),
                "_embedded.contacts.0.custom_fields_values",
            ),
        ] {
            let count = entity
                .get("custom_fields_values")
                .and_then(Value::as_array)
                .map_or(0, |a| a.len());
            if count > MAX_COMPLEX_FIELDS {
                check.err(
                    "Count",
                    path,
                    "This collection should contain 40 elements or less.",
                );
            }
        }
        // Incoming (unsorted) leads: any stage but the incoming one is ignored.
        if embedded.get("metadata").is_some_and(Value::is_object) {
            if let Some(p) = plan.as_mut() {
                let incoming = st
                    .pipeline(p.pipeline_id)
                    .and_then(|pl| pl.statuses.iter().find(|s| s.kind == 1))
                    .map(|s| s.id);
                if let Some(incoming) = incoming {
                    p.status_id = incoming;
                }
            }
        }
        let rid = request_id_of(item, i);
        match check.finish(rid.clone()) {
            Some(e) => errors.push(e),
            None => plans.extend(plan.map(|p| (rid, p, contact, company))),
        }
    }
    if !errors.is_empty() {
        return Reply::validation(errors);
    }
    let mut rows = Vec::new();
    for (rid, plan, contact, company) in plans {
        let existing_contact = plan.contacts.first().map(|c| c.0);
        let id = insert_lead(st, plan, changes);
        let company_id = company.map(|name| {
            let cid = st.next_company_id();
            st.companies.insert(cid, Company { id: cid, name });
            cid
        });
        if let Some(l) = st.leads.get_mut(&id) {
            l.company_id = company_id;
        }
        let contact_id = match contact {
            Some(new) => {
                let cid = contacts::insert(st, NewContact { company_id, ..new });
                st.link(id, cid, true);
                Some(cid)
            }
            None => existing_contact,
        };
        rows.push(json!({
            "id": id,
            "contact_id": contact_id,
            "company_id": company_id,
            "request_id": [rid],
            "merged": false,
        }));
    }
    Reply::hal(Value::Array(rows))
}

/// A checked change to an existing lead.
struct LeadUpdate {
    id: u64,
    name: Option<String>,
    price: Option<i64>,
    stage: Option<(u64, u64)>,
    responsible_user_id: Option<u64>,
    loss_reason_id: Option<u64>,
    fields: Vec<(u64, Option<Value>)>,
    tags_replace: Option<Vec<TagRef>>,
    tags_add: Vec<TagRef>,
    tags_delete: Vec<TagRef>,
}

fn parse_update(
    st: &State,
    item: &Value,
    id: Option<u64>,
    check: &mut Check,
) -> Option<LeadUpdate> {
    if !item.is_object() {
        check.err("InvalidType", "", "This value should be of type object.");
        return None;
    }
    let id = match id {
        Some(id) => Some(id),
        None => {
            let id = check.opt_u64(item, "id", "id");
            if id.is_none() && !check.errors.iter().any(|e| e.path == "id") {
                check.err("NotBlank", "id", "This value should not be blank.");
            }
            id
        }
    };
    let lead = id.and_then(|id| st.leads.get(&id));
    if id.is_some() && lead.is_none() {
        check.err("NotFound", "id", "Entity not found.");
    }
    let name = check.opt_str(item, "name", "name");
    let price = check_price(item, check);
    let responsible = check_user(st, item, check);
    let loss_reason_id = check.opt_u64(item, "loss_reason_id", "loss_reason_id");
    let pipeline_id = check.opt_u64(item, "pipeline_id", "pipeline_id");
    let status_id = check.opt_u64(item, "status_id", "status_id");
    let mut stage = None;
    if let Some(lead) = lead {
        let target = pipeline_id.unwrap_or(lead.pipeline_id);
        match st.pipeline(target) {
            None if pipeline_id.is_some() => check.not_choice("pipeline_id"),
            None => {}
            Some(pl) => match status_id {
                Some(s) if pl.has_status(s) => stage = Some((target, s)),
                Some(_) => check.not_choice("status_id"),
                None if target != lead.pipeline_id => stage = Some((target, pl.first_regular())),
                None => {}
            },
        }
    }
    let fields = match item.get("custom_fields_values") {
        None | Some(Value::Null) => Vec::new(),
        Some(raw) => resolve_fields(&st.lead_fields, raw, check),
    };
    let tags_replace = match item.get("_embedded").and_then(|e| e.get("tags")) {
        None => None,
        Some(Value::Null) => Some(Vec::new()),
        Some(raw) => Some(tag_refs(raw, "_embedded.tags", st, check)),
    };
    let tags_add = match item.get("tags_to_add") {
        None | Some(Value::Null) => Vec::new(),
        Some(raw) => tag_refs(raw, "tags_to_add", st, check),
    };
    let tags_delete = match item.get("tags_to_delete") {
        None | Some(Value::Null) => Vec::new(),
        Some(raw) => tag_refs(raw, "tags_to_delete", st, check),
    };
    Some(LeadUpdate {
        id: id?,
        name,
        price,
        stage,
        responsible_user_id: responsible,
        loss_reason_id,
        fields,
        tags_replace,
        tags_add,
        tags_delete,
    })
}

fn apply_update(st: &mut State, up: LeadUpdate, changes: &mut Vec<LeadChange>) -> Option<i64> {
    let by = st.api_user();
    let replace = up.tags_replace.map(|r| tag_ids(st, r));
    let add = tag_ids(st, up.tags_add);
    let delete: Vec<u64> = up
        .tags_delete
        .into_iter()
        .filter_map(|r| match r {
            TagRef::Id(id) => Some(id),
            TagRef::Name(n) => st
                .tags
                .iter()
                .find(|(_, t)| t.to_lowercase() == n.to_lowercase())
                .map(|(id, _)| *id),
        })
        .collect();
    let lead = st.leads.get_mut(&up.id)?;
    let before = (lead.status_id, lead.pipeline_id);
    if let Some(n) = up.name {
        lead.name = n;
    }
    if let Some(p) = up.price {
        lead.price = p;
    }
    if let Some(u) = up.responsible_user_id {
        lead.responsible_user_id = u;
    }
    if up.loss_reason_id.is_some() {
        lead.loss_reason_id = up.loss_reason_id;
    }
    merge_fields(&mut lead.fields, up.fields);
    if let Some(ids) = replace {
        lead.tags = ids;
    }
    for t in add {
        if !lead.tags.contains(&t) {
            lead.tags.push(t);
        }
    }
    lead.tags.retain(|t| !delete.contains(t));
    lead.updated_at = now_ts();
    lead.updated_by = by;
    let (pipeline, status) = match up.stage {
        Some((p, s)) => (p, s),
        None => (before.1, before.0),
    };
    let change = st.move_lead(up.id, pipeline, status, by)?;
    changes.push(change);
    st.leads.get(&up.id).map(|l| l.updated_at)
}

fn run_updates(
    st: &mut State,
    items: &[Value],
    path_id: Option<u64>,
    changes: &mut Vec<LeadChange>,
) -> Result<Vec<(u64, i64)>, Reply> {
    if items.len() > 250 {
        return Err(Reply::limit_250());
    }
    let mut plans = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut check = Check::default();
        let plan = parse_update(st, item, path_id, &mut check);
        match check.finish(request_id_of(item, i)) {
            Some(e) => errors.push(e),
            None => plans.extend(plan),
        }
    }
    if !errors.is_empty() {
        return Err(Reply::validation(errors));
    }
    Ok(plans
        .into_iter()
        .filter_map(|p| {
            let id = p.id;
            apply_update(st, p, changes).map(|at| (id, at))
        })
        .collect())
}

pub(super) fn update_batch(st: &mut State, req: &Req, changes: &mut Vec<LeadChange>) -> Reply {
    let items = match array_body(req.body) {
        Ok(items) => items,
        Err(r) => return r,
    };
    match run_updates(st, &items, None, changes) {
        Ok(done) => {
            let rows: Vec<Value> = done
                .into_iter()
                .map(|(id, at)| json!({"id": id, "updated_at": at, "_links": self_link(lead_href(st, id))}))
                .collect();
            Reply::hal(json!({
                "_links": self_link(format!("{}/api/v4/leads", st.base_url)),
                "_embedded": {"leads": rows},
            }))
        }
        Err(r) => r,
    }
}

pub(super) fn update_one(
    st: &mut State,
    req: &Req,
    id: u64,
    changes: &mut Vec<LeadChange>,
) -> Reply {
    let item = match object_body(req.body) {
        Ok(map) => Value::Object(map),
        Err(r) => return r,
    };
    match run_updates(st, &[item], Some(id), changes) {
        Ok(done) => match done.first() {
            Some((id, at)) => Reply::hal(
                json!({"id": id, "updated_at": at, "_links": self_link(lead_href(st, *id))}),
            ),
            None => Reply::no_content(),
        },
        Err(r) => r,
    }
}

pub(super) fn lead_json(st: &State, l: &Lead, with_contacts: bool) -> Value {
    let tags: Vec<Value> = l
        .tags
        .iter()
        .filter_map(|t| {
            st.tag_name(*t)
                .map(|n| json!({"id": t, "name": n, "color": null}))
        })
        .collect();
    let companies: Vec<Value> = l
        .company_id
        .map(|c| json!({"id": c, "_links": self_link(format!("{}/api/v4/companies/{c}", st.base_url))}))
        .into_iter()
        .collect();
    let mut embedded = json!({"tags": tags, "companies": companies});
    if with_contacts {
        let contacts: Vec<Value> = st
            .lead_contacts(l.id)
            .into_iter()
            .map(|(c, main)| {
                json!({"id": c, "is_main": main, "_links": self_link(format!("{}/api/v4/contacts/{c}", st.base_url))})
            })
            .collect();
        embedded["contacts"] = Value::Array(contacts);
    }
    json!({
        "id": l.id,
        "name": l.name,
        "price": l.price,
        "responsible_user_id": l.responsible_user_id,
        "group_id": 0,
        "status_id": l.status_id,
        "pipeline_id": l.pipeline_id,
        "loss_reason_id": l.loss_reason_id,
        "created_by": l.created_by,
        "updated_by": l.updated_by,
        "created_at": l.created_at,
        "updated_at": l.updated_at,
        "closed_at": l.closed_at,
        "closest_task_at": null,
        "is_deleted": false,
        "custom_fields_values": if l.fields.is_empty() { Value::Null } else { Value::Array(l.fields.clone()) },
        "score": null,
        "account_id": st.cfg.account_id,
        "labor_cost": null,
        "_links": self_link(lead_href(st, l.id)),
        "_embedded": embedded,
    })
}

pub(super) fn get_one(st: &State, req: &Req, id: u64) -> Reply {
    match st.leads.get(&id) {
        Some(l) => Reply::hal(lead_json(st, l, req.query.with("contacts"))),
        None => Reply::no_content(),
    }
}

fn range(q: &super::wire::Query, key: &str) -> Result<(Option<i64>, Option<i64>), Reply> {
    Ok((
        q.i64_of(&format!("{key}[from]"))?,
        q.i64_of(&format!("{key}[to]"))?,
    ))
}

fn in_range(v: i64, r: (Option<i64>, Option<i64>)) -> bool {
    r.0.is_none_or(|f| v >= f) && r.1.is_none_or(|t| v <= t)
}

pub(super) fn list(st: &State, req: &Req) -> Reply {
    let q = &req.query;
    let paging = match Paging::from_query(q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let filters = (|| -> Result<_, Reply> {
        Ok((
            q.multi_u64("filter[id]")?,
            q.multi_u64("filter[pipeline_id]")?,
            q.multi_u64("filter[responsible_user_id]")?,
            range(q, "filter[updated_at]")?,
            range(q, "filter[created_at]")?,
            q.i64_of("filter[statuses][0][pipeline_id]")?,
            q.i64_of("filter[statuses][0][status_id]")?,
        ))
    })();
    let (ids, pipelines, users, updated, created, st_pipeline, st_status) = match filters {
        Ok(f) => f,
        Err(r) => return r,
    };
    let text = q
        .get("query")
        .map(str::to_lowercase)
        .filter(|s| !s.is_empty());
    let mut found: Vec<&Lead> = st
        .leads
        .values()
        .filter(|l| ids.is_empty() || ids.contains(&l.id))
        .filter(|l| pipelines.is_empty() || pipelines.contains(&l.pipeline_id))
        .filter(|l| users.is_empty() || users.contains(&l.responsible_user_id))
        .filter(|l| in_range(l.updated_at, updated) && in_range(l.created_at, created))
        .filter(|l| req.if_modified_since.is_none_or(|t| l.updated_at >= t))
        .filter(|l| st_pipeline.is_none_or(|p| l.pipeline_id as i64 == p))
        .filter(|l| st_status.is_none_or(|s| l.status_id as i64 == s))
        .filter(|l| {
            // Full-text: the name, the id, and the custom fields' values.
            text.as_ref().is_none_or(|t| {
                l.name.to_lowercase().contains(t)
                    || l.id.to_string() == *t
                    || l.fields.iter().any(|f| {
                        f["values"].as_array().is_some_and(|values| {
                            values.iter().any(|v| {
                                v["value"]
                                    .as_str()
                                    .is_some_and(|s| s.to_lowercase().contains(t))
                            })
                        })
                    })
            })
        })
        .collect();
    for (key, get) in [
        (
            "order[updated_at]",
            (|l: &Lead| l.updated_at) as fn(&Lead) -> i64,
        ),
        ("order[created_at]", |l: &Lead| l.created_at),
        ("order[id]", |l: &Lead| l.id as i64),
    ] {
        if let Some(dir) = q.get(key) {
            found.sort_by_key(|l| (get(l), l.id));
            if dir.eq_ignore_ascii_case("desc") {
                found.reverse();
            }
            break;
        }
    }
    let with_contacts = q.with("contacts");
    let (page, next) = paging.slice(&found);
    let items: Vec<Value> = page
        .into_iter()
        .map(|l| lead_json(st, l, with_contacts))
        .collect();
    hal_page(
        &st.base_url,
        "/api/v4/leads",
        q,
        &paging,
        "leads",
        items,
        next,
    )
}
