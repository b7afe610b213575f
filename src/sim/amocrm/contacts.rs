//! Contacts: `POST /contacts` (PHONE/EMAIL multitext values stored as
//! entered), `GET /contacts/{id}`, and `GET /contacts?query=…`, a fuzzy
//! full-text search that can return contacts whose phone does not match.

use serde_json::{json, Value};

use super::server::Req;
use super::state::{now_ts, Contact, State, EMAIL_ENUMS, PHONE_ENUMS};
use super::wire::{array_body, hal_page, request_id_of, self_link, Check, Paging, Reply};

/// A checked contact to create.
pub(super) struct NewContact {
    pub name: String,
    pub first_name: String,
    pub last_name: String,
    pub phones: Vec<(String, String)>,
    pub emails: Vec<(String, String)>,
    pub responsible_user_id: u64,
    pub company_id: Option<u64>,
}

/// Checks one contact of a write; `path` prefixes error paths (empty for `/contacts`).
pub(super) fn parse_new(
    st: &State,
    item: &Value,
    path: &str,
    check: &mut Check,
) -> Option<NewContact> {
    let at = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    if !item.is_object() {
        check.err("InvalidType", path, "This value should be of type object.");
        return None;
    }
    let name = check.opt_str(item, "name", &at("name"));
    let first = check
        .opt_str(item, "first_name", &at("first_name"))
        .unwrap_or_default();
    let last = check
        .opt_str(item, "last_name", &at("last_name"))
        .unwrap_or_default();
    let responsible = check.opt_u64(item, "responsible_user_id", &at("responsible_user_id"));
    if responsible.is_some_and(|u| !st.user_exists(u)) {
        check.not_choice(at("responsible_user_id"));
    }
    let mut phones = Vec::new();
    let mut emails = Vec::new();
    match item.get("custom_fields_values") {
        None | Some(Value::Null) => {}
        Some(Value::Array(entries)) => {
            for (i, entry) in entries.iter().enumerate() {
                let fpath = at(&format!("custom_fields_values.{i}"));
                let by_id = entry.get("field_id").and_then(Value::as_u64);
                let by_code = entry.get("field_code").and_then(Value::as_str);
                let field = st.contact_fields.iter().find(|f| match (by_id, by_code) {
                    (Some(id), _) => f.id == id,
                    (None, Some(code)) => f.code.as_deref() == Some(code),
                    (None, None) => false,
                });
                let Some(field) = field else {
                    check.not_choice(format!("{fpath}.field_id"));
                    continue;
                };
                let is_phone = field.code.as_deref() == Some("PHONE");
                let codes: &[&str] = if is_phone { &PHONE_ENUMS } else { &EMAIL_ENUMS };
                let values = entry
                    .get("values")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (j, v) in values.iter().enumerate() {
                    let vpath = format!("{fpath}.values.{j}");
                    let Some(text) = v.get("value").and_then(Value::as_str) else {
                        check.err(
                            "InvalidType",
                            format!("{vpath}.value"),
                            "This value should be of type string.",
                        );
                        continue;
                    };
                    let code = match (
                        v.get("enum_code").and_then(Value::as_str),
                        v.get("enum_id").and_then(Value::as_u64),
                    ) {
                        (Some(code), _) if codes.contains(&code) => Some(code.to_string()),
                        (Some(_), _) => None,
                        (None, Some(id)) => field
                            .enums
                            .iter()
                            .find(|(e, _)| *e == id)
                            .map(|(_, c)| c.clone()),
                        (None, None) => Some("WORK".to_string()),
                    };
                    let Some(code) = code else {
                        check.not_choice(format!("{vpath}.enum_code"));
                        continue;
                    };
                    let list = if is_phone { &mut phones } else { &mut emails };
                    list.push((text.to_string(), code));
                }
            }
        }
        Some(_) => check.err(
            "InvalidType",
            at("custom_fields_values"),
            "This value should be of type array.",
        ),
    }
    let full = format!("{first} {last}").trim().to_string();
    Some(NewContact {
        name: name.unwrap_or(full),
        first_name: first,
        last_name: last,
        phones,
        emails,
        responsible_user_id: responsible.unwrap_or_else(|| st.api_user()),
        company_id: None,
    })
}

pub(super) fn insert(st: &mut State, new: NewContact) -> u64 {
    let id = st.next_contact_id();
    let now = now_ts();
    let by = st.api_user();
    st.contacts.insert(
        id,
        Contact {
            id,
            name: new.name,
            first_name: new.first_name,
            last_name: new.last_name,
            phones: new.phones,
            emails: new.emails,
            responsible_user_id: new.responsible_user_id,
            created_by: by,
            created_at: now,
            updated_at: now,
            company_id: new.company_id,
        },
    );
    id
}

pub(super) fn create(st: &mut State, req: &Req) -> Reply {
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
        let plan = parse_new(st, item, "", &mut check);
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
            let id = insert(st, plan);
            json!({"id": id, "request_id": rid, "_links": self_link(format!("{}/api/v4/contacts/{id}", st.base_url))})
        })
        .collect();
    Reply::hal(json!({
        "_links": self_link(format!("{}/api/v4/contacts", st.base_url)),
        "_embedded": {"contacts": rows},
    }))
}

fn multitext(st: &State, code: &str, values: &[(String, String)]) -> Option<Value> {
    let field = st
        .contact_fields
        .iter()
        .find(|f| f.code.as_deref() == Some(code))?;
    if values.is_empty() {
        return None;
    }
    let items: Vec<Value> = values
        .iter()
        .map(|(v, c)| {
            let enum_id = field.enums.iter().find(|(_, n)| n == c).map(|(id, _)| *id);
            json!({"value": v, "enum_id": enum_id, "enum_code": c})
        })
        .collect();
    Some(json!({
        "field_id": field.id,
        "field_name": field.name,
        "field_code": code,
        "field_type": "multitext",
        "values": items,
    }))
}

fn contact_json(st: &State, c: &Contact, with_leads: bool) -> Value {
    let fields: Vec<Value> = [
        multitext(st, "PHONE", &c.phones),
        multitext(st, "EMAIL", &c.emails),
    ]
    .into_iter()
    .flatten()
    .collect();
    let companies: Vec<Value> = c
        .company_id
        .map(|id| json!({"id": id}))
        .into_iter()
        .collect();
    let mut embedded = json!({"tags": [], "companies": companies});
    if with_leads {
        let leads: Vec<Value> = st
            .links
            .iter()
            .filter(|l| l.contact_id == c.id)
            .map(|l| json!({"id": l.lead_id, "_links": self_link(format!("{}/api/v4/leads/{}", st.base_url, l.lead_id))}))
            .collect();
        embedded["leads"] = Value::Array(leads);
    }
    json!({
        "id": c.id,
        "name": c.name,
        "first_name": c.first_name,
        "last_name": c.last_name,
        "responsible_user_id": c.responsible_user_id,
        "group_id": 0,
        "created_by": c.created_by,
        "updated_by": c.created_by,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
        "closest_task_at": null,
        "is_deleted": false,
        "is_unsorted": false,
        "custom_fields_values": if fields.is_empty() { Value::Null } else { Value::Array(fields) },
        "account_id": st.cfg.account_id,
        "_links": self_link(format!("{}/api/v4/contacts/{}", st.base_url, c.id)),
        "_embedded": embedded,
    })
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// The fuzzy full-text match: 5+ query digits inside the digits of any value,
/// or the query text inside the name or an email (case-insensitive).
fn matches(c: &Contact, query: &str) -> bool {
    let q_digits = digits(query);
    let values = c
        .phones
        .iter()
        .chain(c.emails.iter())
        .map(|(v, _)| v.as_str())
        .chain([c.name.as_str(), c.first_name.as_str(), c.last_name.as_str()]);
    if q_digits.len() >= 5 && values.clone().any(|v| digits(v).contains(&q_digits)) {
        return true;
    }
    let text = query.trim().to_lowercase();
    !text.is_empty()
        && (c.name.to_lowercase().contains(&text)
            || c.emails
                .iter()
                .any(|(e, _)| e.to_lowercase().contains(&text))
            || c.phones
                .iter()
                .any(|(p, _)| p.to_lowercase().contains(&text)))
}

pub(super) fn list(st: &State, req: &Req) -> Reply {
    let q = &req.query;
    let paging = match Paging::from_query(q) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let ids = match q.multi_u64("filter[id]") {
        Ok(ids) => ids,
        Err(r) => return r,
    };
    let query = q.get("query").unwrap_or_default();
    let found: Vec<&Contact> = st
        .contacts
        .values()
        .filter(|c| ids.is_empty() || ids.contains(&c.id))
        .filter(|c| query.is_empty() || matches(c, query))
        .filter(|c| req.if_modified_since.is_none_or(|t| c.updated_at >= t))
        .collect();
    let (page, next) = paging.slice(&found);
    let items: Vec<Value> = page
        .into_iter()
        .map(|c| contact_json(st, c, q.with("leads")))
        .collect();
    hal_page(
        &st.base_url,
        "/api/v4/contacts",
        q,
        &paging,
        "contacts",
        items,
        next,
    )
}

pub(super) fn get_one(st: &State, req: &Req, id: u64) -> Reply {
    match st.contacts.get(&id) {
        Some(c) => Reply::hal(contact_json(st, c, req.query.with("leads"))),
        None => Reply::no_content(),
    }
}

/// `GET /companies/{id}` (companies exist only as created by `/leads/complex`).
pub(super) fn company(st: &State, id: u64) -> Reply {
    match st.companies.get(&id) {
        Some(c) => Reply::hal(json!({
            "id": c.id,
            "name": c.name,
            "account_id": st.cfg.account_id,
            "_links": self_link(format!("{}/api/v4/companies/{}", st.base_url, c.id)),
        })),
        None => Reply::no_content(),
    }
}
