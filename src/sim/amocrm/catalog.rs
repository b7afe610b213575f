//! Read-only account catalog: `/account`, `/users`, `/leads/pipelines` (with
//! statuses), `/leads/custom_fields` and `/contacts/custom_fields`.

use serde_json::{json, Value};

use super::server::Req;
use super::state::{Field, Pipeline, State};
use super::wire::{hal_page, self_link, Paging, Reply};

pub(super) fn account(st: &State, req: &Req) -> Reply {
    let mut body = json!({
        "id": st.cfg.account_id,
        "name": st.cfg.subdomain,
        "subdomain": st.cfg.subdomain,
        "current_user_id": st.api_user(),
        "country": "RU",
        "currency": "RUB",
        "_links": self_link(format!("{}/api/v4/account", st.base_url)),
    });
    if req.query.with("datetime_settings") {
        body["_embedded"] = json!({"datetime_settings": {
            "date_pattern": "d.m.Y H:i",
            "short_date_pattern": "d.m.Y",
            "short_time_pattern": "H:i",
            "date_format": "d.m.Y",
            "time_format": "H:i",
            "timezone": "Europe/Moscow",
            "timezone_offset": "+03:00",
        }});
    }
    Reply::hal(body)
}

fn user_json(st: &State, id: u64, name: &str, active: bool) -> Value {
    json!({
        "id": id,
        "name": name,
        "email": format!("user{id}@{}.example", st.cfg.subdomain),
        "lang": "ru",
        "rights": {"is_admin": id == st.api_user(), "is_free": false, "is_active": active},
        "_links": self_link(format!("{}/api/v4/users/{id}", st.base_url)),
    })
}

pub(super) fn users(st: &State, req: &Req) -> Reply {
    let paging = match Paging::from_query(&req.query) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let all: Vec<Value> = st
        .users
        .iter()
        .map(|u| user_json(st, u.id, &u.name, u.active))
        .collect();
    let (items, next) = paging.slice(&all);
    let mut reply = hal_page(
        &st.base_url,
        "/api/v4/users",
        &req.query,
        &paging,
        "users",
        items,
        next,
    );
    add_total(&mut reply, all.len());
    reply
}

fn add_total(reply: &mut Reply, total: usize) {
    if let super::wire::Body::Hal(Value::Object(map)) = &mut reply.body {
        map.insert("_total_items".into(), json!(total));
    }
}

pub(super) fn user(st: &State, id: u64) -> Reply {
    match st.users.iter().find(|u| u.id == id) {
        Some(u) => Reply::hal(user_json(st, u.id, &u.name, u.active)),
        None => Reply::no_content(),
    }
}

fn statuses_json(st: &State, p: &Pipeline) -> Vec<Value> {
    p.statuses
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "name": s.name,
                "sort": s.sort,
                "is_editable": s.editable,
                "pipeline_id": p.id,
                "color": s.color,
                "type": s.kind,
                "account_id": st.cfg.account_id,
                "_links": self_link(format!(
                    "{}/api/v4/leads/pipelines/{}/statuses/{}",
                    st.base_url, p.id, s.id
                )),
            })
        })
        .collect()
}

fn pipeline_json(st: &State, p: &Pipeline) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "sort": p.sort,
        "is_main": p.is_main,
        "is_unsorted_on": true,
        "is_archive": false,
        "account_id": st.cfg.account_id,
        "_links": self_link(format!("{}/api/v4/leads/pipelines/{}", st.base_url, p.id)),
        "_embedded": {"statuses": statuses_json(st, p)},
    })
}

fn pipeline_not_found() -> Reply {
    Reply::not_found("Pipeline not found")
}

pub(super) fn pipelines(st: &State) -> Reply {
    if st.pipelines.is_empty() {
        return Reply::no_content();
    }
    let list: Vec<Value> = st.pipelines.iter().map(|p| pipeline_json(st, p)).collect();
    Reply::hal(json!({
        "_total_items": list.len(),
        "_links": self_link(format!("{}/api/v4/leads/pipelines", st.base_url)),
        "_embedded": {"pipelines": list},
    }))
}

pub(super) fn pipeline(st: &State, id: u64) -> Reply {
    match st.pipeline(id) {
        Some(p) => Reply::hal(pipeline_json(st, p)),
        None => pipeline_not_found(),
    }
}

pub(super) fn statuses(st: &State, id: u64) -> Reply {
    match st.pipeline(id) {
        Some(p) => {
            let list = statuses_json(st, p);
            Reply::hal(json!({
                "_total_items": list.len(),
                "_links": self_link(format!(
                    "{}/api/v4/leads/pipelines/{id}/statuses",
                    st.base_url
                )),
                "_embedded": {"statuses": list},
            }))
        }
        None => pipeline_not_found(),
    }
}

pub(super) fn status(st: &State, pipeline_id: u64, status_id: u64) -> Reply {
    let Some(p) = st.pipeline(pipeline_id) else {
        return pipeline_not_found();
    };
    let pos = p.statuses.iter().position(|s| s.id == status_id);
    match pos.and_then(|i| statuses_json(st, p).into_iter().nth(i)) {
        Some(v) => Reply::hal(v),
        None => Reply::not_found("Status not found"),
    }
}

pub(super) fn field_json(st: &State, f: &Field, entity: &str) -> Value {
    let enums: Vec<Value> = f
        .enums
        .iter()
        .enumerate()
        .map(|(i, (id, value))| json!({"id": id, "value": value, "sort": (i + 1) * 2}))
        .collect();
    json!({
        "id": f.id,
        "name": f.name,
        "type": f.field_type,
        "account_id": st.cfg.account_id,
        "code": f.code,
        "sort": f.sort,
        "is_api_only": false,
        "enums": if enums.is_empty() { Value::Null } else { Value::Array(enums) },
        "group_id": null,
        "required_statuses": [],
        "is_deletable": f.code.is_none(),
        "is_predefined": f.code.is_some(),
        "entity_type": entity,
        "_links": self_link(format!("{}/api/v4/{entity}/custom_fields/{}", st.base_url, f.id)),
    })
}

pub(super) fn custom_fields(st: &State, req: &Req, leads: bool) -> Reply {
    let paging = match Paging::from_query(&req.query) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (entity, fields) = if leads {
        ("leads", &st.lead_fields)
    } else {
        ("contacts", &st.contact_fields)
    };
    let all: Vec<Value> = fields.iter().map(|f| field_json(st, f, entity)).collect();
    let (items, next) = paging.slice(&all);
    let mut reply = hal_page(
        &st.base_url,
        &format!("/api/v4/{entity}/custom_fields"),
        &req.query,
        &paging,
        "custom_fields",
        items,
        next,
    );
    add_total(&mut reply, all.len());
    reply
}
