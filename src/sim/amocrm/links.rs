//! Lead ↔ contact links: `POST /leads/{id}/link`, `POST /leads/{id}/unlink`
//! and `GET /leads/{id}/links`.

use serde_json::{json, Value};

use super::server::Req;
use super::state::{now_ts, State};
use super::wire::{array_body, request_id_of, self_link, Check, Reply};

fn link_json(lead_id: u64, contact_id: u64, main: bool) -> Value {
    json!({
        "entity_id": lead_id,
        "entity_type": "leads",
        "to_entity_id": contact_id,
        "to_entity_type": "contacts",
        "metadata": {"main_contact": main},
    })
}

/// `POST /leads/{id}/link`; a missing lead is 404 "Lead not found".
pub(super) fn link(st: &mut State, req: &Req, lead_id: u64) -> Reply {
    if !st.leads.contains_key(&lead_id) {
        return Reply::not_found("Lead not found");
    }
    let items = match array_body(req.body) {
        Ok(items) => items,
        Err(r) => return r,
    };
    let mut errors = Vec::new();
    let mut plans = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut check = Check::default();
        let to = check.opt_u64(item, "to_entity_id", "to_entity_id");
        let kind = item.get("to_entity_type").and_then(Value::as_str);
        if kind != Some("contacts") {
            check.not_choice("to_entity_type");
        } else if !to.is_some_and(|c| st.contacts.contains_key(&c)) {
            check.not_choice("to_entity_id");
        }
        let main = item
            .pointer("/metadata/is_main")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match check.finish(request_id_of(item, i)) {
            Some(e) => errors.push(e),
            None => plans.extend(to.map(|c| (c, main))),
        }
    }
    if !errors.is_empty() {
        return Reply::validation(errors);
    }
    let rows: Vec<Value> = plans
        .into_iter()
        .map(|(c, main)| {
            let main = st.link(lead_id, c, main);
            link_json(lead_id, c, main)
        })
        .collect();
    if let Some(l) = st.leads.get_mut(&lead_id) {
        l.updated_at = now_ts();
    }
    Reply::hal(json!({
        "_total_items": rows.len(),
        "_links": self_link(format!("{}/api/v4/leads/{lead_id}/link", st.base_url)),
        "_embedded": {"links": rows},
    }))
}

/// `POST /leads/{id}/unlink`: 204.
pub(super) fn unlink(st: &mut State, req: &Req, lead_id: u64) -> Reply {
    if !st.leads.contains_key(&lead_id) {
        return Reply::not_found("Lead not found");
    }
    let items = match array_body(req.body) {
        Ok(items) => items,
        Err(r) => return r,
    };
    for item in &items {
        if let Some(c) = item.get("to_entity_id").and_then(Value::as_u64) {
            st.links
                .retain(|l| !(l.lead_id == lead_id && l.contact_id == c));
        }
    }
    Reply::no_content()
}

pub(super) fn links(st: &State, lead_id: u64) -> Reply {
    if !st.leads.contains_key(&lead_id) {
        return Reply::no_content();
    }
    let rows: Vec<Value> = st
        .lead_contacts(lead_id)
        .into_iter()
        .map(|(c, main)| link_json(lead_id, c, main))
        .collect();
    if rows.is_empty() {
        return Reply::no_content();
    }
    Reply::hal(json!({
        "_total_items": rows.len(),
        "_links": self_link(format!("{}/api/v4/leads/{lead_id}/links", st.base_url)),
        "_embedded": {"links": rows},
    }))
}
