//! Notes (`POST /leads/notes`), tasks (`POST`/`GET /tasks`), the events list
//! (`GET /events`, `lead_status_changed`), and the webhooks API
//! (`POST`/`GET`/`DELETE /webhooks`).

use std::collections::BTreeMap;
use std::collections::VecDeque;

use serde_json::{json, Value};

use super::server::Req;
use super::state::{now_ts, Event, State, Webhook};
use super::wire::{
    array_body, hal_page, object_body, request_id_of, self_link, Check, Paging, Reply,
};
use super::{SimNote, SimTask};

const NOTE_TYPES: [&str; 9] = [
    "common",
    "call_in",
    "call_out",
    "service_message",
    "extended_service_message",
    "sms_in",
    "sms_out",
    "geolocation",
    "attachment",
];

pub(super) fn add_notes(st: &mut State, req: &Req) -> Reply {
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
        let entity = check.opt_u64(item, "entity_id", "entity_id");
        match entity {
            Some(id) if st.leads.contains_key(&id) => {}
            Some(_) => check.not_choice("entity_id"),
            None if !check.errors.iter().any(|e| e.path == "entity_id") => {
                check.err("NotBlank", "entity_id", "This value should not be blank.")
            }
            None => {}
        }
        let note_type = check.opt_str(item, "note_type", "note_type");
        if !note_type
            .as_deref()
            .is_some_and(|t| NOTE_TYPES.contains(&t))
        {
            check.not_choice("note_type");
        }
        let params = item.get("params").cloned().unwrap_or(Value::Null);
        let text = check
            .opt_str(&params, "text", "params.text")
            .unwrap_or_default();
        let rid = request_id_of(item, i);
        match check.finish(rid.clone()) {
            Some(e) => errors.push(e),
            None => {
                if let (Some(entity_id), Some(note_type)) = (entity, note_type) {
                    plans.push((rid, entity_id, note_type, text));
                }
            }
        }
    }
    if !errors.is_empty() {
        return Reply::validation(errors);
    }
    let rows: Vec<Value> = plans
        .into_iter()
        .map(|(rid, entity_id, note_type, text)| {
            let id = st.next_note_id();
            st.notes.push(SimNote {
                id,
                entity_id,
                note_type,
                text,
            });
            json!({
                "id": id,
                "entity_id": entity_id,
                "request_id": rid,
                "_links": self_link(format!("{}/api/v4/leads/{entity_id}/notes/{id}", st.base_url)),
            })
        })
        .collect();
    Reply::hal(json!({
        "_links": self_link(format!("{}/api/v4/leads/notes", st.base_url)),
        "_embedded": {"notes": rows},
    }))
}

const TASK_ENTITIES: [&str; 4] = ["leads", "contacts", "companies", "customers"];

pub(super) fn add_tasks(st: &mut State, req: &Req) -> Reply {
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
        let text = check
            .opt_str(item, "text", "text")
            .filter(|t| !t.trim().is_empty());
        if text.is_none() && !check.errors.iter().any(|e| e.path == "text") {
            check.err("NotBlank", "text", "This value should not be blank.");
        }
        let till = check.opt_i64(item, "complete_till", "complete_till");
        if till.is_none() && !check.errors.iter().any(|e| e.path == "complete_till") {
            check.err(
                "NotBlank",
                "complete_till",
                "This value should not be blank.",
            );
        }
        let user = check.opt_u64(item, "responsible_user_id", "responsible_user_id");
        if user.is_some_and(|u| !st.user_exists(u)) {
            check.not_choice("responsible_user_id");
        }
        let entity_id = check.opt_u64(item, "entity_id", "entity_id");
        let entity_type = check.opt_str(item, "entity_type", "entity_type");
        match (&entity_id, entity_type.as_deref()) {
            (None, None) => {}
            (Some(_), None) => {
                check.err("NotBlank", "entity_type", "This value should not be blank.")
            }
            (None, Some(_)) => {
                check.err("NotBlank", "entity_id", "This value should not be blank.")
            }
            (Some(id), Some(t)) => {
                if !TASK_ENTITIES.contains(&t) {
                    check.not_choice("entity_type");
                } else if (t == "leads" && !st.leads.contains_key(id))
                    || (t == "contacts" && !st.contacts.contains_key(id))
                {
                    check.not_choice("entity_id");
                }
            }
        }
        check.opt_u64(item, "task_type_id", "task_type_id");
        let rid = request_id_of(item, i);
        match check.finish(rid.clone()) {
            Some(e) => errors.push(e),
            None => {
                if let (Some(text), Some(complete_till)) = (text, till) {
                    plans.push((rid, text, complete_till, user, entity_id, entity_type));
                }
            }
        }
    }
    if !errors.is_empty() {
        return Reply::validation(errors);
    }
    let rows: Vec<Value> = plans
        .into_iter()
        .map(|(rid, text, complete_till, user, entity_id, entity_type)| {
            let id = st.next_task_id();
            let responsible_user_id = user.unwrap_or_else(|| st.api_user());
            st.tasks.push(SimTask {
                id,
                text,
                complete_till,
                entity_id,
                entity_type,
                responsible_user_id,
            });
            json!({
                "id": id,
                "request_id": rid,
                "_links": self_link(format!("{}/api/v4/tasks/{id}", st.base_url)),
            })
        })
        .collect();
    Reply::hal(json!({
        "_links": self_link(format!("{}/api/v4/tasks", st.base_url)),
        "_embedded": {"tasks": rows},
    }))
}

pub(super) fn list_tasks(st: &State, req: &Req) -> Reply {
    let q = &req.query;
    let paging = match Paging::from_query(q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (entity_ids, users) = match (
        q.multi_u64("filter[entity_id]"),
        q.multi_u64("filter[responsible_user_id]"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let entity_type = q.get("filter[entity_type]");
    let all: Vec<Value> = st
        .tasks
        .iter()
        .filter(|t| entity_ids.is_empty() || t.entity_id.is_some_and(|e| entity_ids.contains(&e)))
        .filter(|t| users.is_empty() || users.contains(&t.responsible_user_id))
        .filter(|t| entity_type.is_none() || t.entity_type.as_deref() == entity_type)
        .map(|t| {
            json!({
                "id": t.id,
                "responsible_user_id": t.responsible_user_id,
                "group_id": 0,
                "entity_id": t.entity_id,
                "entity_type": t.entity_type,
                "is_completed": false,
                "task_type_id": 1,
                "text": t.text,
                "duration": 0,
                "complete_till": t.complete_till,
                "result": [],
                "account_id": st.cfg.account_id,
                "_links": self_link(format!("{}/api/v4/tasks/{}", st.base_url, t.id)),
            })
        })
        .collect();
    let (items, next) = paging.slice(&all);
    hal_page(
        &st.base_url,
        "/api/v4/tasks",
        q,
        &paging,
        "tasks",
        items,
        next,
    )
}

fn event_json(st: &State, e: &Event) -> Value {
    json!({
        "id": e.id,
        "type": "lead_status_changed",
        "entity_id": e.entity_id,
        "entity_type": "lead",
        "created_by": e.created_by,
        "created_at": e.created_at,
        "value_after": [{"lead_status": {"id": e.after.0, "pipeline_id": e.after.1}}],
        "value_before": [{"lead_status": {"id": e.before.0, "pipeline_id": e.before.1}}],
        "account_id": st.cfg.account_id,
        "_links": self_link(format!("{}/api/v4/events/{}", st.base_url, e.id)),
        "_embedded": {"entity": {"id": e.entity_id, "_links": self_link(format!("{}/api/v4/leads/{}", st.base_url, e.entity_id))}},
    })
}

/// `filter[value_after][leads_statuses][N][pipeline_id|status_id]` pairs.
fn target_stages(req: &Req) -> Vec<(Option<u64>, Option<u64>)> {
    let mut by_index: BTreeMap<String, (Option<u64>, Option<u64>)> = BTreeMap::new();
    for (k, v) in &req.query.0 {
        let Some(rest) = k.strip_prefix("filter[value_after][leads_statuses][") else {
            continue;
        };
        let Some((index, field)) = rest.split_once("][") else {
            continue;
        };
        let entry = by_index.entry(index.to_string()).or_default();
        match field {
            "pipeline_id]" => entry.0 = v.parse().ok(),
            "status_id]" => entry.1 = v.parse().ok(),
            _ => {}
        }
    }
    by_index.into_values().collect()
}

pub(super) fn events(st: &State, req: &Req) -> Reply {
    let q = &req.query;
    let paging = match Paging::from_query(q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let types = q.multi("filter[type]");
    let entities = q.multi("filter[entity]");
    let ids = q.multi("filter[id]");
    let parsed = (|| -> Result<_, Reply> {
        let after = q.i64_of("filter[created_at]")?;
        let from = q.i64_of("filter[created_at][from]")?;
        let to = q.i64_of("filter[created_at][to]")?;
        Ok((
            after.or(from),
            to,
            q.multi_u64("filter[entity_id]")?,
            q.multi_u64("filter[created_by]")?,
        ))
    })();
    let (from, to, entity_ids, creators) = match parsed {
        Ok(p) => p,
        Err(r) => return r,
    };
    let stages = target_stages(req);
    let found: Vec<&Event> = st
        .events
        .iter()
        .rev()
        .filter(|_| types.is_empty() || types.iter().any(|t| t == "lead_status_changed"))
        .filter(|_| entities.is_empty() || entities.iter().any(|e| e == "lead" || e == "leads"))
        .filter(|e| ids.is_empty() || ids.contains(&e.id))
        .filter(|e| from.is_none_or(|f| e.created_at >= f) && to.is_none_or(|t| e.created_at <= t))
        .filter(|e| entity_ids.is_empty() || entity_ids.contains(&e.entity_id))
        .filter(|e| creators.is_empty() || creators.contains(&e.created_by))
        .filter(|e| {
            stages.is_empty()
                || stages.iter().any(|(p, s)| {
                    p.is_none_or(|p| p == e.after.1) && s.is_none_or(|s| s == e.after.0)
                })
        })
        .collect();
    let (page, next) = paging.slice(&found);
    let items: Vec<Value> = page.into_iter().map(|e| event_json(st, e)).collect();
    hal_page(
        &st.base_url,
        "/api/v4/events",
        q,
        &paging,
        "events",
        items,
        next,
    )
}

/// `{action}_{entity}` as amoCRM names webhook events (`status_lead`, `add_contact`, …).
fn known_setting(s: &str) -> bool {
    const ACTIONS: [&str; 7] = [
        "add",
        "update",
        "delete",
        "restore",
        "status",
        "responsible",
        "note",
    ];
    const ENTITIES: [&str; 5] = ["lead", "contact", "company", "customer", "task"];
    s.split_once('_')
        .is_some_and(|(a, e)| ACTIONS.contains(&a) && ENTITIES.contains(&e))
        || ["add_talk", "update_talk", "add_chat_template_review"].contains(&s)
}

fn webhook_json(st: &State, w: &Webhook) -> Value {
    json!({
        "id": w.id,
        "destination": w.destination,
        "created_at": w.created_at,
        "updated_at": w.updated_at,
        "account_id": st.cfg.account_id,
        "created_by": w.created_by,
        "sort": w.sort,
        "disabled": w.disabled,
        "settings": w.settings,
    })
}

pub(super) fn list_webhooks(st: &State, req: &Req) -> Reply {
    let dest = req.query.get("filter[destination]");
    let list: Vec<Value> = st
        .webhooks
        .iter()
        .filter(|w| dest.is_none_or(|d| w.destination == d))
        .map(|w| webhook_json(st, w))
        .collect();
    if list.is_empty() {
        return Reply::no_content();
    }
    Reply::hal(json!({
        "_total_items": list.len(),
        "_links": self_link(format!("{}/api/v4/webhooks", st.base_url)),
        "_embedded": {"webhooks": list},
    }))
}

/// `POST /webhooks`: subscribes, or updates and re-enables the hook with the same destination.
pub(super) fn subscribe(st: &mut State, req: &Req) -> Reply {
    let body = match object_body(req.body) {
        Ok(map) => Value::Object(map),
        Err(r) => return r,
    };
    let mut check = Check::default();
    let destination = check
        .opt_str(&body, "destination", "destination")
        .unwrap_or_default();
    if !(destination.starts_with("http://") || destination.starts_with("https://")) {
        check.err(
            "InvalidUrl",
            "destination",
            "This value is not a valid URL.",
        );
    }
    let settings: Vec<String> = match body.get("settings").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    if settings.is_empty() {
        check.err("NotBlank", "settings", "This value should not be blank.");
    }
    for (i, setting) in settings.iter().enumerate() {
        if !known_setting(setting) {
            check.not_choice(format!("settings.{i}"));
        }
    }
    let sort = check.opt_i64(&body, "sort", "sort").unwrap_or(0);
    if let Some(e) = check.finish("0".to_string()) {
        return Reply::validation(vec![e]);
    }
    let now = now_ts();
    let by = st.api_user();
    let index = match st
        .webhooks
        .iter()
        .position(|w| w.destination == destination)
    {
        Some(i) => {
            let w = &mut st.webhooks[i];
            w.settings = settings;
            w.sort = sort;
            w.disabled = false;
            w.updated_at = now;
            w.failures.clear();
            i
        }
        None => {
            if st.webhooks.len() >= 100 {
                return Reply::limit("Limit 100 webhooks per account");
            }
            let id = st.next_webhook_id();
            st.webhooks.push(Webhook {
                id,
                destination,
                settings,
                sort,
                disabled: false,
                created_at: now,
                updated_at: now,
                created_by: by,
                failures: VecDeque::new(),
            });
            st.webhooks.len() - 1
        }
    };
    Reply::hal(webhook_json(st, &st.webhooks[index]))
}

/// `DELETE /webhooks` with `{destination}`: 204.
pub(super) fn unsubscribe(st: &mut State, req: &Req) -> Reply {
    let body = match object_body(req.body) {
        Ok(map) => Value::Object(map),
        Err(r) => return r,
    };
    let Some(destination) = body.get("destination").and_then(Value::as_str) else {
        let mut check = Check::default();
        check.err("NotBlank", "destination", "This value should not be blank.");
        return Reply::validation(check.finish("0".to_string()).into_iter().collect());
    };
    st.webhooks.retain(|w| w.destination != destination);
    Reply::no_content()
}
