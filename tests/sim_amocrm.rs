//! The amoCRM simulator follows the documented API (`shared/apis/amocrm.md`).
//! Raw reqwest only: no orderbridge client code, so a misreading of the API
//! cannot hide on both sides.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Form, Router};
use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig, Fault};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const TOKEN: &str = "long-lived-test-token";

fn config() -> AmoSimConfig {
    AmoSimConfig {
        rate_per_second: 10_000,
        long_lived_token: Some(TOKEN.to_string()),
        ..AmoSimConfig::default()
    }
}

async fn start(cfg: AmoSimConfig) -> AmoSim {
    AmoSim::start(cfg).await.unwrap()
}

struct Answer {
    status: StatusCode,
    content_type: String,
    request_id: Option<String>,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
}

async fn call_with(
    sim: &AmoSim,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let client = reqwest::Client::new();
    let url = if path.starts_with("http") {
        path.to_string()
    } else {
        format!("{}{path}", sim.base_url())
    };
    let mut req = client.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let content_type = header("content-type").unwrap_or_default();
    let request_id = header("x-request-id");
    let text = resp.text().await.unwrap();
    Answer {
        status,
        content_type,
        request_id,
        text,
    }
}

async fn call(sim: &AmoSim, method: Method, path: &str, body: Option<Value>) -> Answer {
    call_with(sim, Some(TOKEN), method, path, body).await
}

async fn get(sim: &AmoSim, path: &str) -> Answer {
    call(sim, Method::GET, path, None).await
}

async fn ok_json(sim: &AmoSim, method: Method, path: &str, body: Value) -> Value {
    let a = call(sim, method, path, Some(body)).await;
    assert_eq!(a.status, 200, "{path}: {}", a.text);
    assert_eq!(a.content_type, "application/hal+json");
    a.json()
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A local webhook receiver recording (content type, form pairs) per POST.
type Received = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    async fn hook(
        State(got): State<Received>,
        headers: HeaderMap,
        Form(form): Form<Vec<(String, String)>>,
    ) -> &'static str {
        let ct = headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        got.lock().unwrap().push((ct, form));
        "ok"
    }
    let app = Router::new()
        .route("/hook/{secret}", post(hook))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook/s3cret"), got)
}

fn form_get<'a>(form: &'a [(String, String)], key: &str) -> &'a str {
    form.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {form:?}"))
}

async fn refresh(sim: &AmoSim, cfg: &AmoSimConfig, refresh_token: &str) -> Answer {
    let body = json!({
        "client_id": cfg.client_id, "client_secret": cfg.client_secret,
        "grant_type": "refresh_token", "refresh_token": refresh_token,
        "redirect_uri": cfg.redirect_uri,
    });
    call_with(sim, None, Method::POST, "/oauth2/access_token", Some(body)).await
}

#[tokio::test]
async fn every_api_call_needs_a_valid_bearer_token() {
    let cfg = AmoSimConfig {
        access_token_ttl: Duration::from_secs(2),
        ..config()
    };
    let sim = start(cfg.clone()).await;
    sim.seed_pipeline("Sales", &["New"]);
    for token in [None, Some("wrong")] {
        let a = call_with(&sim, token, Method::GET, "/api/v4/leads/pipelines", None).await;
        assert_eq!(a.status, 401);
        assert_eq!(a.content_type, "application/problem+json");
        assert_eq!(a.json()["title"], "Unauthorized");
        assert_eq!(a.json()["status"], 401);
        assert!(a.request_id.is_some(), "every response has X-Request-Id");
    }
    let a = get(&sim, "/api/v4/leads/pipelines").await;
    assert_eq!(a.status, 200);
    assert!(a.request_id.is_some());

    // An OAuth access token works until its TTL runs out.
    let t = refresh(&sim, &cfg, &cfg.initial_refresh_token).await.json();
    let access = t["access_token"].as_str().unwrap().to_string();
    let a = call_with(
        &sim,
        Some(&access),
        Method::GET,
        "/api/v4/leads/pipelines",
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let a = call_with(
        &sim,
        Some(&access),
        Method::GET,
        "/api/v4/leads/pipelines",
        None,
    )
    .await;
    assert_eq!(a.status, 401);

    // Uninstall revokes everything, the long-lived token included.
    sim.revoke_all_tokens();
    assert_eq!(get(&sim, "/api/v4/leads/pipelines").await.status, 401);
    assert_eq!(
        refresh(&sim, &cfg, t["refresh_token"].as_str().unwrap())
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn refresh_rotates_and_the_previous_token_lasts_until_the_new_one_is_used() {
    let cfg = config();
    let sim = start(cfg.clone()).await;
    let r0 = cfg.initial_refresh_token.clone();
    let first = refresh(&sim, &cfg, &r0).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let first = first.json();
    for key in [
        "token_type",
        "expires_in",
        "server_time",
        "access_token",
        "refresh_token",
    ] {
        assert!(first.get(key).is_some(), "missing {key}");
    }
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 86400);
    let r1 = first["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r1, r0);

    // The response was "lost": the old refresh token still works.
    let retry = refresh(&sim, &cfg, &r0).await;
    assert_eq!(retry.status, 200);
    let r2 = retry.json()["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r2, r1);
    let a2 = retry.json()["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        call_with(&sim, Some(&a2), Method::GET, "/api/v4/leads", None)
            .await
            .status,
        204
    );

    // Using the new one retires the old one.
    let third = refresh(&sim, &cfg, &r2).await;
    assert_eq!(third.status, 200);
    let revoked = refresh(&sim, &cfg, &r0).await;
    assert_eq!(revoked.status, 401);
    assert_eq!(
        revoked.text,
        r#"{"hint":"Token has been revoked","title":"Некорректный запрос","type":"https://developers.amocrm.ru/v3/errors/OAuthProblemJson","status":401,"detail":"В запросе отсутствует ряд параметров или параметры невалидны"}"#
    );
    assert_eq!(
        refresh(&sim, &cfg, &r1).await.status,
        401,
        "a superseded token is dead"
    );
    assert_eq!(refresh(&sim, &cfg, "def50200bogus").await.status, 401);

    // Wrong client secret, unsupported grant.
    let bad = json!({"client_id": cfg.client_id, "client_secret": "nope", "grant_type": "refresh_token",
                     "refresh_token": r2, "redirect_uri": cfg.redirect_uri});
    assert_eq!(
        call_with(&sim, None, Method::POST, "/oauth2/access_token", Some(bad))
            .await
            .status,
        401
    );
    let code = json!({"client_id": cfg.client_id, "client_secret": cfg.client_secret,
                      "grant_type": "authorization_code", "code": "x", "redirect_uri": cfg.redirect_uri});
    assert_eq!(
        call_with(&sim, None, Method::POST, "/oauth2/access_token", Some(code))
            .await
            .status,
        400
    );
    assert_eq!(sim.refresh_calls(), 7);
}

#[tokio::test]
async fn too_many_requests_then_blocked_until_unblocked() {
    let sim = start(AmoSimConfig {
        rate_per_second: 7,
        ..config()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(get(&sim, "/api/v4/leads").await);
    }
    assert!(statuses[..7].iter().all(|a| a.status == 204));
    let limited = &statuses[7];
    assert_eq!(limited.status, 429);
    assert_eq!(limited.content_type, "application/problem+json");
    let body = limited.json();
    assert_eq!(body["title"], "Too Many Requests");
    assert_eq!(body["type"], "https://httpstatus.es/429");
    assert_eq!(
        body["detail"],
        "You have sent too many requests in a given amount of time. Please try again later."
    );
    assert!(body["retry_after"].as_u64().unwrap() >= 1);

    // Keep hammering: after 20 429s every request is 403 with an nginx page.
    let mut blocked = None;
    for _ in 0..200 {
        let a = get(&sim, "/api/v4/leads").await;
        if a.status == 403 {
            blocked = Some(a);
            break;
        }
    }
    let blocked = blocked.expect("never blocked");
    assert!(blocked.content_type.starts_with("text/html"));
    assert!(blocked.text.contains("nginx"));
    assert_eq!(sim.count_status(429), 20);
    assert!(sim.is_blocked());
    let token = refresh(&sim, &config(), "x").await;
    assert_eq!(token.status, 403, "the token endpoint is blocked too");

    sim.unblock();
    assert!(!sim.is_blocked());
    assert_eq!(get(&sim, "/api/v4/leads").await.status, 204);
    assert_eq!(sim.rate_limited(), 20);

    // Blocked on demand (the fault suite's 403 phase), lifted the same way.
    sim.block();
    assert_eq!(get(&sim, "/api/v4/leads").await.status, 403);
    sim.unblock();
    assert_eq!(get(&sim, "/api/v4/leads").await.status, 204);
}

#[tokio::test]
async fn a_steady_fault_hits_every_nth_request_until_lifted_and_is_no_rate_limit() {
    let sim = start(config()).await;
    sim.fault_every(Fault::ServerError, 3);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get(&sim, "/api/v4/leads").await.status);
    }
    assert_eq!(statuses, [204, 204, 500, 204, 204, 500]);
    sim.fault_every(Fault::TooManyRequests, 1);
    assert_eq!(get(&sim, "/api/v4/leads").await.status, 429);
    assert_eq!(
        sim.rate_limited(),
        0,
        "an injected 429 is not the rate limit's"
    );
    sim.lift_steady_fault();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert_eq!(get(&sim, "/api/v4/leads").await.status, 204);
    }
}

#[tokio::test]
async fn empty_results_are_204_without_a_body() {
    let sim = start(config()).await;
    sim.seed_contact("Ivan", &["+77011234567"], &[]);
    for path in [
        "/api/v4/leads/987654",
        "/api/v4/leads",
        "/api/v4/contacts?query=nobody",
        "/api/v4/events?filter[type]=lead_status_changed&filter[created_at][from]=0",
        "/api/v4/contacts/1",
    ] {
        let a = get(&sim, path).await;
        assert_eq!(a.status, 204, "{path}");
        assert_eq!(a.text, "", "{path}");
    }
}

#[tokio::test]
async fn create_leads_echoes_request_ids_and_fills_defaults() {
    let sim = start(config()).await;
    let user = sim.seed_user("Manager");
    let pipe = sim.seed_pipeline("Sales", &["New order", "Assembled"]);
    let field = sim.seed_lead_field("Marketplace", "select", &["Kaspi", "Avito"]);
    let code = sim.seed_lead_field("Order code", "text", &[]);
    let contact = sim.seed_contact("Ivan", &["+77011234567"], &[]);
    let body = json!([
        {"name": "Order #1", "price": 4590, "request_id": "kaspi-1",
         "pipeline_id": pipe.id, "status_id": pipe.stages[2].0, "responsible_user_id": user,
         "custom_fields_values": [
            {"field_id": field.id, "values": [{"enum_id": field.enums[1].0}]},
            {"field_id": code.id, "values": [{"value": "K-1"}]}],
         "_embedded": {"tags": [{"name": "kaspi"}], "contacts": [{"id": contact}]}},
        {"name": "Order #2"}
    ]);
    let v = ok_json(&sim, Method::POST, "/api/v4/leads", body).await;
    let rows = v["_embedded"]["leads"].as_array().unwrap();
    assert_eq!(rows[0]["request_id"], "kaspi-1");
    assert_eq!(
        rows[1]["request_id"], "1",
        "index when request_id is absent"
    );
    let first = rows[0]["id"].as_u64().unwrap();
    let second = rows[1]["id"].as_u64().unwrap();
    assert!(rows[0]["_links"]["self"]["href"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/api/v4/leads/{first}")));

    let lead = sim.lead(first).unwrap();
    assert_eq!(
        (lead.pipeline_id, lead.status_id, lead.price),
        (pipe.id, pipe.stages[2].0, 4590)
    );
    assert_eq!(lead.tags, vec!["kaspi".to_string()]);
    assert_eq!(lead.contact_ids, vec![contact]);
    assert_eq!(lead.request_id.as_deref(), Some("kaspi-1"));
    let other = sim.lead(second).unwrap();
    assert_eq!(other.pipeline_id, pipe.id);
    assert_eq!(
        other.status_id, pipe.stages[1].0,
        "first stage after incoming"
    );

    let read = get(&sim, &format!("/api/v4/leads/{first}?with=contacts")).await;
    assert_eq!(read.status, 200);
    let read = read.json();
    assert_eq!(read["responsible_user_id"], user);
    assert_eq!(read["_embedded"]["contacts"][0]["id"], contact);
    assert_eq!(read["_embedded"]["tags"][0]["name"], "kaspi");
    let cf = read["custom_fields_values"].as_array().unwrap();
    let sel = cf.iter().find(|f| f["field_id"] == field.id).unwrap();
    assert_eq!(sel["field_type"], "select");
    assert_eq!(sel["values"][0]["value"], "Avito");
    assert_eq!(sel["values"][0]["enum_id"], field.enums[1].0);
    assert!(
        read.get("request_id").is_none(),
        "request_id is not stored in reads"
    );
}

#[tokio::test]
async fn one_invalid_item_rejects_the_whole_batch() {
    let sim = start(config()).await;
    let pipe = sim.seed_pipeline("Sales", &["New"]);
    let field = sim.seed_lead_field("Kind", "select", &["A"]);
    let body = json!([
        {"name": "fine", "request_id": "ok-1", "pipeline_id": pipe.id},
        {"name": "bad", "request_id": "bad-2", "pipeline_id": pipe.id, "status_id": 999},
        {"name": "bad too", "custom_fields_values": [
            {"field_id": 1, "values": [{"value": "x"}]},
            {"field_id": field.id, "values": [{"enum_id": 5}]}]}
    ]);
    let a = call(&sim, Method::POST, "/api/v4/leads", Some(body)).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.content_type, "application/problem+json");
    let v = a.json();
    assert_eq!(v["title"], "Bad Request");
    let errs = v["validation-errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0]["request_id"], "bad-2");
    assert_eq!(errs[0]["errors"][0]["path"], "status_id");
    assert_eq!(errs[0]["errors"][0]["code"], "NotSupportedChoice");
    assert_eq!(errs[1]["request_id"], "2");
    let paths: Vec<&str> = errs[1]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "custom_fields_values.0.field_id",
            "custom_fields_values.1.values.0.enum_id"
        ]
    );
    assert!(sim.leads().is_empty(), "nothing created");

    for bad in [json!({"name": "not an array"}), json!([])] {
        let a = call(&sim, Method::POST, "/api/v4/leads", Some(bad)).await;
        assert_eq!(a.status, 400);
        assert_eq!(a.json()["detail"], "Request data can not be empty");
    }
}

#[tokio::test]
async fn more_than_250_is_422() {
    let sim = start(config()).await;
    sim.seed_pipeline("Sales", &["New"]);
    let many: Vec<Value> = (0..251).map(|i| json!({"name": format!("L{i}")})).collect();
    for method in [Method::POST, Method::PATCH] {
        let a = call(
            &sim,
            method,
            "/api/v4/leads",
            Some(Value::Array(many.clone())),
        )
        .await;
        assert_eq!(a.status, 422);
        assert_eq!(
            a.json(),
            json!({"title":"Unprocessable Entity","type":"https://httpstatus.es/422","status":422,"detail":"Limit 250 per page"})
        );
    }
    assert_eq!(get(&sim, "/api/v4/leads?limit=251").await.status, 422);
    let exactly: Vec<Value> = (0..250).map(|i| json!({"name": format!("L{i}")})).collect();
    ok_json(&sim, Method::POST, "/api/v4/leads", Value::Array(exactly)).await;
    assert_eq!(sim.leads().len(), 250);
}

#[tokio::test]
async fn complex_create_answers_a_bare_array() {
    let sim = start(config()).await;
    let pipe = sim.seed_pipeline("Sales", &["New"]);
    let contact = |phone: &str| {
        json!({"first_name": "Ivan", "custom_fields_values": [
        {"field_code": "PHONE", "values": [{"value": phone, "enum_code": "MOB"}]},
        {"field_code": "EMAIL", "values": [{"value": "ivan@example.com", "enum_code": "WORK"}]}]})
    };
    let body = json!([
        {"name": "Order A", "price": 10, "pipeline_id": pipe.id, "request_id": "a",
         "_embedded": {"contacts": [contact("+7 (701) 123-45-67")], "companies": [{"name": "ACME"}]}},
        {"name": "Order B", "_embedded": {"contacts": [contact("+7 (701) 123-45-67")]}}
    ]);
    let v = ok_json(&sim, Method::POST, "/api/v4/leads/complex", body).await;
    let rows = v.as_array().expect("bare array");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["request_id"], json!(["a"]));
    assert_eq!(rows[1]["request_id"], json!(["1"]));
    assert_eq!(rows[0]["merged"], false);
    assert!(rows[0]["company_id"].is_u64());
    assert!(rows[1]["company_id"].is_null());
    let (c0, c1) = (
        rows[0]["contact_id"].as_u64().unwrap(),
        rows[1]["contact_id"].as_u64().unwrap(),
    );
    assert_ne!(c0, c1, "no duplicate control inside one request");
    let contacts = sim.contacts();
    let stored = contacts.iter().find(|c| c.id == c0).unwrap();
    assert_eq!(
        stored.phones,
        vec!["+7 (701) 123-45-67".to_string()],
        "stored as entered"
    );
    assert_eq!(stored.emails, vec!["ivan@example.com".to_string()]);
    let lead = sim.lead(rows[0]["id"].as_u64().unwrap()).unwrap();
    assert_eq!(lead.contact_ids, vec![c0]);

    let read = get(&sim, &format!("/api/v4/contacts/{c0}")).await.json();
    let phone = &read["custom_fields_values"][0];
    assert_eq!(phone["field_code"], "PHONE");
    assert_eq!(phone["field_type"], "multitext");
    assert_eq!(phone["values"][0]["enum_code"], "MOB");
    assert!(phone["values"][0]["enum_id"].is_u64());

    let many: Vec<Value> = (0..51).map(|i| json!({"name": format!("L{i}")})).collect();
    let a = call(
        &sim,
        Method::POST,
        "/api/v4/leads/complex",
        Some(Value::Array(many)),
    )
    .await;
    assert_eq!(a.status, 422);
}

#[tokio::test]
async fn patch_tags_to_add_and_delete_versus_replace() {
    let sim = start(config()).await;
    sim.seed_pipeline("Sales", &["New"]);
    let v = ok_json(
        &sim,
        Method::POST,
        "/api/v4/leads",
        json!([{"name": "L", "_embedded": {"tags": [{"name": "a"}, {"name": "b"}]}}]),
    )
    .await;
    let id = v["_embedded"]["leads"][0]["id"].as_u64().unwrap();
    let patch = |body: Value| {
        let sim = sim.clone();
        async move { ok_json(&sim, Method::PATCH, "/api/v4/leads", body).await }
    };
    let v = patch(json!([{"id": id, "tags_to_add": [{"name": "c"}]}])).await;
    assert_eq!(v["_embedded"]["leads"][0]["id"], id);
    assert!(v["_embedded"]["leads"][0]["updated_at"].is_i64());
    assert_eq!(sim.lead(id).unwrap().tags, ["a", "b", "c"]);
    patch(json!([{"id": id, "tags_to_delete": [{"name": "a"}]}])).await;
    assert_eq!(sim.lead(id).unwrap().tags, ["b", "c"]);
    patch(json!([{"id": id, "_embedded": {"tags": [{"name": "x"}]}}])).await;
    assert_eq!(sim.lead(id).unwrap().tags, ["x"], "_embedded.tags replaces");
    patch(json!([{"id": id, "_embedded": {"tags": null}}])).await;
    assert!(sim.lead(id).unwrap().tags.is_empty());

    // Single PATCH; unknown id in a batch is a validation error naming its item.
    let one = ok_json(
        &sim,
        Method::PATCH,
        &format!("/api/v4/leads/{id}"),
        json!({"price": 7}),
    )
    .await;
    assert_eq!(one["id"], id);
    assert_eq!(sim.lead(id).unwrap().price, 7);
    let a = call(
        &sim,
        Method::PATCH,
        "/api/v4/leads",
        Some(json!([{"id": id, "price": 1}, {"id": 42, "request_id": "ghost"}])),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["validation-errors"][0]["request_id"], "ghost");
    assert_eq!(sim.lead(id).unwrap().price, 7, "nothing applied");
}

#[tokio::test]
async fn api_status_change_fires_a_form_webhook_and_records_an_event() {
    let sim = start(config()).await;
    let api_user = sim.seed_user("Integration");
    let pipe = sim.seed_pipeline("Sales", &["New", "Paid"]);
    let (url, got) = receiver().await;
    let hook = ok_json(
        &sim,
        Method::POST,
        "/api/v4/webhooks",
        json!({"destination": url, "settings": ["status_lead"], "sort": 10}),
    )
    .await;
    assert_eq!(hook["destination"], url.as_str());
    assert_eq!(hook["disabled"], false);
    let v = ok_json(
        &sim,
        Method::POST,
        "/api/v4/leads",
        json!([{"name": "Order 7", "price": 100}]),
    )
    .await;
    let id = v["_embedded"]["leads"][0]["id"].as_u64().unwrap();
    let since = chrono::Utc::now().timestamp() - 1;

    let paid = pipe.stages[2].0;
    ok_json(
        &sim,
        Method::PATCH,
        "/api/v4/leads",
        json!([{"id": id, "status_id": paid, "pipeline_id": pipe.id}]),
    )
    .await;
    let (ct, form) = wait_for("webhook", || got.lock().unwrap().first().cloned()).await;
    assert_eq!(ct, "application/x-www-form-urlencoded");
    assert_eq!(form_get(&form, "leads[status][0][id]"), id.to_string());
    assert_eq!(
        form_get(&form, "leads[status][0][status_id]"),
        paid.to_string()
    );
    assert_eq!(
        form_get(&form, "leads[status][0][old_status_id]"),
        pipe.stages[1].0.to_string()
    );
    assert_eq!(
        form_get(&form, "leads[status][0][pipeline_id]"),
        pipe.id.to_string()
    );
    assert_eq!(
        form_get(&form, "leads[status][0][old_pipeline_id]"),
        pipe.id.to_string()
    );
    assert_eq!(
        form_get(&form, "leads[status][0][modified_user_id]"),
        api_user.to_string()
    );
    assert_eq!(
        form_get(&form, "leads[status][0][responsible_user_id]"),
        api_user.to_string()
    );
    assert_eq!(form_get(&form, "leads[status][0][price]"), "100");
    assert_eq!(form_get(&form, "leads[status][0][name]"), "Order 7");
    assert!(form_get(&form, "leads[status][0][last_modified]")
        .parse::<i64>()
        .is_ok());
    assert_eq!(form_get(&form, "account[subdomain]"), "example");
    assert_eq!(form_get(&form, "account[id]"), "31361463");
    let deliveries = wait_for("delivery record", || {
        let d = sim.webhook_deliveries();
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(deliveries[0].status, Some(200));
    assert_eq!(deliveries[0].destination, url);

    let events = get(
        &sim,
        &format!(
            "/api/v4/events?filter[type]=lead_status_changed&filter[created_at][from]={since}"
        ),
    )
    .await;
    assert_eq!(events.status, 200);
    let e = &events.json()["_embedded"]["events"][0];
    assert!(e["id"].is_string(), "event id is a string");
    assert_eq!(e["type"], "lead_status_changed");
    assert_eq!(e["entity_type"], "lead");
    assert_eq!(e["entity_id"], id);
    assert_eq!(e["created_by"], api_user);
    assert_eq!(
        e["value_after"][0]["lead_status"],
        json!({"id": paid, "pipeline_id": pipe.id})
    );
    assert_eq!(e["value_before"][0]["lead_status"]["id"], pipe.stages[1].0);
    assert_eq!(e["account_id"], 31361463);

    // 142 without pipeline_id is valid (the lead's pipeline); an unknown stage is not.
    ok_json(
        &sim,
        Method::PATCH,
        &format!("/api/v4/leads/{id}"),
        json!({"status_id": 142}),
    )
    .await;
    assert_eq!(sim.lead(id).unwrap().status_id, 142);
    let bad = call(
        &sim,
        Method::PATCH,
        "/api/v4/leads",
        Some(json!([{"id": id, "status_id": 5}])),
    )
    .await;
    assert_eq!(bad.status, 400);
    wait_for("second webhook", || {
        (got.lock().unwrap().len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn manager_moves_fire_webhooks_and_events_with_the_manager_as_author() {
    let sim = start(config()).await;
    sim.seed_user("Integration");
    let manager = sim.seed_user("Aigul");
    let pipe = sim.seed_pipeline("Sales", &["New", "Paid"]);
    let other = sim.seed_pipeline("Returns", &["Open"]);
    let (url, got) = receiver().await;
    let (quiet, quiet_got) = receiver().await;
    ok_json(
        &sim,
        Method::POST,
        "/api/v4/webhooks",
        json!({"destination": url, "settings": ["status_lead", "update_lead"]}),
    )
    .await;
    ok_json(
        &sim,
        Method::POST,
        "/api/v4/webhooks",
        json!({"destination": quiet, "settings": ["status_lead"]}),
    )
    .await;
    sim.set_webhook_disabled(&quiet, true);
    let v = ok_json(&sim, Method::POST, "/api/v4/leads", json!([{"name": "L"}])).await;
    let id = v["_embedded"]["leads"][0]["id"].as_u64().unwrap();

    sim.manager_moves_lead(id, other.id, other.stages[1].0, manager);
    let (_, form) = wait_for("webhook", || got.lock().unwrap().first().cloned()).await;
    assert_eq!(
        form_get(&form, "leads[status][0][pipeline_id]"),
        other.id.to_string()
    );
    assert_eq!(
        form_get(&form, "leads[status][0][old_pipeline_id]"),
        pipe.id.to_string()
    );
    assert_eq!(
        form_get(&form, "leads[status][0][modified_user_id]"),
        manager.to_string()
    );
    assert_eq!(form_get(&form, "leads[update][0][id]"), id.to_string());
    let lead = sim.lead(id).unwrap();
    assert_eq!(
        (lead.pipeline_id, lead.status_id),
        (other.id, other.stages[1].0)
    );

    let e = get(
        &sim,
        "/api/v4/events?filter[type]=lead_status_changed&filter[created_at]=0",
    )
    .await
    .json();
    assert_eq!(e["_embedded"]["events"][0]["created_by"], manager);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        quiet_got.lock().unwrap().is_empty(),
        "disabled hooks get nothing"
    );

    // Re-posting the destination re-enables it.
    let again = ok_json(
        &sim,
        Method::POST,
        "/api/v4/webhooks",
        json!({"destination": quiet, "settings": ["status_lead"]}),
    )
    .await;
    assert_eq!(again["disabled"], false);
    assert_eq!(sim.webhooks().len(), 2);
    let listed = get(
        &sim,
        &format!("/api/v4/webhooks?filter[destination]={}", quiet),
    )
    .await
    .json();
    assert_eq!(listed["_embedded"]["webhooks"].as_array().unwrap().len(), 1);
    let gone = call(
        &sim,
        Method::DELETE,
        "/api/v4/webhooks",
        Some(json!({"destination": quiet})),
    )
    .await;
    assert_eq!(gone.status, 204);
    assert_eq!(sim.webhooks().len(), 1);
}

#[tokio::test]
async fn contact_query_is_fuzzy_and_full_text() {
    let sim = start(config()).await;
    let exact = sim.seed_contact("Ivan", &["+7 (701) 123-45-67"], &["Ivan@Example.com"]);
    let longer = sim.seed_contact("Petr", &["+7 701 123 45 678"], &[]);
    let named = sim.seed_contact("Courier 87011234567", &[], &[]);
    let unrelated = sim.seed_contact("Olga", &["+77770000000"], &[]);
    let found = get(&sim, "/api/v4/contacts?query=7011234567").await;
    assert_eq!(found.status, 200);
    let ids: Vec<u64> = found.json()["_embedded"]["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&exact) && ids.contains(&longer) && ids.contains(&named));
    assert!(!ids.contains(&unrelated));
    let by_mail = get(&sim, "/api/v4/contacts?query=ivan%40example.com")
        .await
        .json();
    assert_eq!(by_mail["_embedded"]["contacts"][0]["id"], exact);
    assert_eq!(
        get(&sim, "/api/v4/contacts?query=5678").await.status,
        204,
        "fewer than 5 digits"
    );

    let created = ok_json(&sim, Method::POST, "/api/v4/contacts", json!([
        {"name": "New", "request_id": "c1", "custom_fields_values": [{"field_code": "PHONE", "values": [{"value": "8 701 123 45 67"}]}]}
    ])).await;
    assert_eq!(created["_embedded"]["contacts"][0]["request_id"], "c1");
    let id = created["_embedded"]["contacts"][0]["id"].as_u64().unwrap();
    let c = sim.contacts().into_iter().find(|c| c.id == id).unwrap();
    assert_eq!(c.phones, ["8 701 123 45 67"]);
}

#[tokio::test]
async fn leads_and_events_paginate_with_next_links() {
    let sim = start(config()).await;
    let pipe = sim.seed_pipeline("Sales", &["A", "B"]);
    let body: Vec<Value> = (0..7).map(|i| json!({"name": format!("L{i}")})).collect();
    ok_json(&sim, Method::POST, "/api/v4/leads", Value::Array(body)).await;
    let mut url =
        "/api/v4/leads?order[updated_at]=asc&filter[updated_at][from]=0&limit=3".to_string();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = get(&sim, &url).await;
        assert_eq!(page.status, 200);
        let v = page.json();
        pages += 1;
        assert_eq!(v["_page"], pages);
        seen.extend(
            v["_embedded"]["leads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["id"].as_u64().unwrap()),
        );
        match v["_links"]["next"]["href"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
    }
    assert_eq!((pages, seen.len()), (3, 7));
    let one = get(
        &sim,
        &format!(
            "/api/v4/leads?filter[id][]={}&filter[id][]={}",
            seen[0], seen[1]
        ),
    )
    .await
    .json();
    assert_eq!(one["_embedded"]["leads"].as_array().unwrap().len(), 2);

    for (i, id) in seen.iter().enumerate().take(5) {
        sim.manager_moves_lead(*id, pipe.id, pipe.stages[2 + i % 2].0, 1);
    }
    let p1 = get(
        &sim,
        "/api/v4/events?filter[type]=lead_status_changed&limit=2",
    )
    .await
    .json();
    assert_eq!(p1["_embedded"]["events"].as_array().unwrap().len(), 2);
    let next = p1["_links"]["next"]["href"].as_str().unwrap().to_string();
    let p2 = get(&sim, &next).await.json();
    assert_eq!(p2["_page"], 2);
    let p3 = get(
        &sim,
        "/api/v4/events?filter[type]=lead_status_changed&limit=2&page=3",
    )
    .await
    .json();
    assert_eq!(p3["_embedded"]["events"].as_array().unwrap().len(), 1);
    assert!(p3["_links"].get("next").is_none());
    assert_eq!(get(&sim, "/api/v4/events?limit=2&page=4").await.status, 204);
}

#[tokio::test]
async fn injected_faults_replace_the_next_answers() {
    let sim = start(config()).await;
    sim.inject(Fault::ServerError, 1);
    let a = get(&sim, "/api/v4/leads").await;
    assert_eq!(a.status, 500);
    assert_eq!(a.content_type, "application/problem+json");
    assert!(a.json()["trace_id"].is_string());

    sim.inject(Fault::GatewayTimeout, 1);
    assert_eq!(get(&sim, "/api/v4/leads").await.status, 504);

    sim.inject(Fault::TooManyRequests, 1);
    let a = get(&sim, "/api/v4/leads").await;
    assert_eq!(a.status, 429);
    assert!(a.json()["retry_after"].is_u64());

    sim.inject(Fault::ConnectionReset, 1);
    let err = reqwest::Client::new()
        .get(format!("{}/api/v4/leads", sim.base_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect_err("the connection is dropped");
    assert!(!err.is_status());
    assert_eq!(sim.count_status(0), 1);

    sim.inject(Fault::Timeout, 1);
    let err = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .get(format!("{}/api/v4/leads", sim.base_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect_err("held past the client timeout");
    assert!(err.is_timeout());

    // The token endpoint is an API call like any other.
    sim.inject(Fault::ServerError, 1);
    assert_eq!(refresh(&sim, &config(), "x").await.status, 500);
    assert_eq!(
        get(&sim, "/api/v4/leads").await.status,
        204,
        "faults are used up"
    );
    let log = sim.requests();
    assert_eq!(log.len(), 7);
    assert_eq!(log[0].path, "/api/v4/leads");
}

#[tokio::test]
async fn catalog_links_notes_and_tasks() {
    let sim = start(config()).await;
    let pipe = sim.seed_pipeline("Sales", &["New"]);
    let user = sim.seed_user("Aigul");
    let field = sim.seed_lead_field("Delivery", "date", &[]);
    let v = get(&sim, "/api/v4/leads/pipelines").await.json();
    let statuses = &v["_embedded"]["pipelines"][0]["_embedded"]["statuses"];
    assert_eq!(statuses[0]["type"], 1);
    assert_eq!(statuses[2]["id"], 142);
    assert_eq!(statuses[3]["id"], 143);
    assert_eq!(
        get(
            &sim,
            &format!("/api/v4/leads/pipelines/{}/statuses", pipe.id)
        )
        .await
        .status,
        200
    );
    let missing = get(&sim, "/api/v4/leads/pipelines/1/statuses").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["detail"], "Pipeline not found");
    let fields = get(&sim, "/api/v4/leads/custom_fields?page=1&limit=50")
        .await
        .json();
    assert_eq!(fields["_embedded"]["custom_fields"][0]["id"], field.id);
    let users = get(&sim, "/api/v4/users").await.json();
    assert_eq!(users["_embedded"]["users"][0]["id"], user);
    assert!(users["_embedded"]["users"][0]["email"].is_string());
    assert_eq!(get(&sim, "/api/v4/nothing/here").await.status, 404);
    assert_eq!(
        call(&sim, Method::DELETE, "/api/v4/leads", None)
            .await
            .status,
        405
    );

    // date fields come back at midnight in the account timezone (UTC+3).
    let v = ok_json(
        &sim,
        Method::POST,
        "/api/v4/leads",
        json!([{"custom_fields_values": [
        {"field_id": field.id, "values": [{"value": 1634601600}]}]}]),
    )
    .await;
    let id = v["_embedded"]["leads"][0]["id"].as_u64().unwrap();
    assert_eq!(
        sim.lead(id).unwrap().custom_fields_values[0]["values"][0]["value"],
        1634590800
    );

    let contact = sim.seed_contact("Ivan", &["+77011234567"], &[]);
    let link = ok_json(&sim, Method::POST, &format!("/api/v4/leads/{id}/link"),
        json!([{"to_entity_id": contact, "to_entity_type": "contacts", "metadata": {"is_main": true}}])).await;
    assert_eq!(link["_embedded"]["links"][0]["to_entity_id"], contact);
    assert!(sim
        .links()
        .iter()
        .any(|l| l.lead_id == id && l.contact_id == contact && l.main));
    let unknown = call(
        &sim,
        Method::POST,
        "/api/v4/leads/1/link",
        Some(json!([{"to_entity_id": contact, "to_entity_type": "contacts"}])),
    )
    .await;
    assert_eq!(unknown.status, 404);

    let notes = ok_json(
        &sim,
        Method::POST,
        "/api/v4/leads/notes",
        json!([{"entity_id": id, "note_type": "common", "params": {"text": "hello"}}]),
    )
    .await;
    assert_eq!(notes["_embedded"]["notes"][0]["entity_id"], id);
    assert_eq!(notes["_embedded"]["notes"][0]["request_id"], "0");
    assert_eq!(sim.notes()[0].text, "hello");
    let bad_note = call(
        &sim,
        Method::POST,
        "/api/v4/leads/notes",
        Some(json!([{"entity_id": id, "note_type": "shout", "params": {"text": "x"}}])),
    )
    .await;
    assert_eq!(bad_note.status, 400);

    let tasks = ok_json(
        &sim,
        Method::POST,
        "/api/v4/tasks",
        json!([{"text": "SLA", "complete_till": 1760980000,
        "entity_id": id, "entity_type": "leads", "task_type_id": 1, "request_id": "sla-1"}]),
    )
    .await;
    assert_eq!(tasks["_embedded"]["tasks"][0]["request_id"], "sla-1");
    assert_eq!(sim.tasks()[0].entity_id, Some(id));
    let bad = call(
        &sim,
        Method::POST,
        "/api/v4/tasks",
        Some(json!([{"text": "no deadline"}])),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json()["validation-errors"][0]["errors"][0]["path"],
        "complete_till"
    );
}

#[tokio::test]
async fn complex_metadata_incoming_and_webhook_settings_are_checked() {
    let sim = start(config()).await;
    let pipe = sim.seed_pipeline("Sales", &["New", "Paid"]);
    let v = ok_json(
        &sim,
        Method::POST,
        "/api/v4/leads/complex",
        json!([{"name": "From a form", "status_id": pipe.stages[2].0,
                "_embedded": {"metadata": {"category": "forms", "form_id": "1"}}}]),
    )
    .await;
    let lead = sim.lead(v[0]["id"].as_u64().unwrap()).unwrap();
    assert_eq!(
        lead.status_id, pipe.stages[0].0,
        "metadata puts it in the incoming stage"
    );

    let bad = call(
        &sim,
        Method::POST,
        "/api/v4/webhooks",
        Some(json!({"destination": "https://x.example/h", "settings": ["status_leads"]})),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json()["validation-errors"][0]["errors"][0]["path"],
        "settings.0"
    );
    assert_eq!(get(&sim, "/api/v4/webhooks").await.status, 204);

    // If-Modified-Since in the future: nothing modified since.
    let a = reqwest::Client::new()
        .get(format!("{}/api/v4/leads", sim.base_url()))
        .bearer_auth(TOKEN)
        .header("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 204);
}

#[tokio::test]
async fn the_token_endpoint_counts_against_the_rate_limit() {
    let cfg = AmoSimConfig {
        rate_per_second: 2,
        ..config()
    };
    let sim = start(cfg.clone()).await;
    assert_eq!(
        refresh(&sim, &cfg, &cfg.initial_refresh_token).await.status,
        200
    );
    assert_eq!(refresh(&sim, &cfg, "stale").await.status, 401);
    assert_eq!(get(&sim, "/api/v4/leads").await.status, 429);
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        get(&sim, "/api/v4/leads").await.status,
        204,
        "the window slides"
    );
}

#[tokio::test]
async fn a_failing_webhook_is_disabled_after_more_than_100_failures() {
    let sim = start(config()).await;
    let pipe = sim.seed_pipeline("Sales", &["A", "B"]);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    ok_json(
        &sim,
        Method::POST,
        "/api/v4/webhooks",
        json!({"destination": dead, "settings": ["status_lead"]}),
    )
    .await;
    let v = ok_json(&sim, Method::POST, "/api/v4/leads", json!([{"name": "L"}])).await;
    let id = v["_embedded"]["leads"][0]["id"].as_u64().unwrap();
    for i in 0..101 {
        sim.manager_moves_lead(id, pipe.id, pipe.stages[2 - i % 2].0, 1);
        if i == 99 {
            wait_for("100 failures", || {
                (sim.webhook_deliveries().len() == 100).then_some(())
            })
            .await;
            assert!(
                !sim.webhooks()[0].disabled,
                "100 failures are not more than 100"
            );
        }
    }
    wait_for("disabled", || sim.webhooks()[0].disabled.then_some(())).await;
    assert!(sim.webhook_deliveries().iter().all(|d| d.status.is_none()));
    let listed = get(&sim, "/api/v4/webhooks").await.json();
    assert_eq!(listed["_embedded"]["webhooks"][0]["disabled"], true);
}

#[test]
fn the_handle_can_be_shared_across_tasks() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    send_sync::<AmoSim>();
}

#[tokio::test]
async fn a_held_request_waits_unanswered_and_is_carried_out_when_released() {
    let sim = start(config()).await;
    let pipe = sim.seed_pipeline("Sales", &["New", "Paid"]);
    let v = ok_json(
        &sim,
        Method::POST,
        "/api/v4/leads",
        json!([{"name": "Order 8", "price": 100}]),
    )
    .await;
    let id = v["_embedded"]["leads"][0]["id"].as_u64().unwrap();
    let mut held = sim.hold_next("GET", "/api/v4/leads", "filter[updated_at][from]");
    // Another listing, without that parameter, is not held.
    assert_eq!(get(&sim, "/api/v4/leads").await.status, 200);
    let listing = {
        let path = "/api/v4/leads?filter%5Bupdated_at%5D%5Bfrom%5D=0".to_string();
        let base = sim.base_url();
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(format!("{base}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    assert!(
        held.reached(Duration::from_secs(5)).await,
        "the listing arrives"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!listing.is_finished(), "and waits unanswered");
    // A change made while it waits is in its answer: it is carried out after.
    let paid = pipe.stages[2].0;
    sim.drift_lead_stage(id, pipe.id, paid);
    held.release();
    let answer = listing.await.unwrap();
    assert_eq!(answer["_embedded"]["leads"][0]["status_id"], paid);
}
