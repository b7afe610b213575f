//! The Avito simulator follows `shared/apis/avito.md`: the token and its 403 on
//! expiry, the flat and wrapped error envelopes, the order list (filters in both
//! encodings, paging, the exact order shape with the Cyrillic key), transitions
//! and tracking numbers with business failures inside a 200, the limits, the
//! messenger with its webhook probe and deliveries, and faults. Raw reqwest only.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use chrono::{TimeZone, Utc};
use orderbridge::sim::avito::{AvitoFault, AvitoSim, AvitoSimConfig, SimAvitoOrderSpec};
use reqwest::header::HeaderMap;
use reqwest::Client;
use serde_json::{json, Value};

const USER_ID: u64 = 94235311;

/// A configuration whose global cap does not get in the way.
fn roomy() -> AvitoSimConfig {
    AvitoSimConfig {
        global_per_second: 10_000,
        ..AvitoSimConfig::default()
    }
}

async fn sim() -> AvitoSim {
    AvitoSim::start(roomy()).await.unwrap()
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn at(secs: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).unwrap()
}

async fn token_call(sim: &AvitoSim, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = client()
        .post(format!("{}{path}", sim.base_url()))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn token(sim: &AvitoSim) -> String {
    let (status, body) = token_call(
        sim,
        "/token",
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "avito-client-id"),
            ("client_secret", "avito-client-secret"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

async fn send(rb: reqwest::RequestBuilder) -> (u16, Value, HeaderMap) {
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, headers)
}

async fn get(sim: &AvitoSim, tok: &str, path: &str) -> (u16, Value) {
    let (s, b, _) = send(
        client()
            .get(format!("{}{path}", sim.base_url()))
            .bearer_auth(tok),
    )
    .await;
    (s, b)
}

async fn post_json(sim: &AvitoSim, tok: &str, path: &str, body: Value) -> (u16, Value) {
    let (s, b, _) = send(
        client()
            .post(format!("{}{path}", sim.base_url()))
            .bearer_auth(tok)
            .json(&body),
    )
    .await;
    (s, b)
}

async fn transition(sim: &AvitoSim, tok: &str, id: &str, name: &str) -> (u16, Value) {
    post_json(
        sim,
        tok,
        "/order-management/1/order/applyTransition",
        json!({ "orderId": id, "transition": name }),
    )
    .await
}

async fn tracking(sim: &AvitoSim, tok: &str, id: &str, number: &str) -> (u16, Value) {
    post_json(
        sim,
        tok,
        "/order-management/1/order/setTrackingNumber",
        json!({ "orderId": id, "trackingNumber": number }),
    )
    .await
}

fn ids(body: &Value) -> Vec<String> {
    body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_string())
        .collect()
}

fn seed(sim: &AvitoSim, id: &str, created: i64, status: &str, service: &str) {
    let mut spec = SimAvitoOrderSpec::new(id, at(created));
    spec.status = status.to_string();
    spec.service_type = service.to_string();
    sim.create_order(spec);
}

/// A local webhook receiver: `/hook` answers 200 and records, `/broken` 500.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
}

async fn receiver() -> Receiver {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = got.clone();
    let app = Router::new()
        .route(
            "/hook",
            post(move |Json(body): Json<Value>| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(body);
                    Json(json!({ "ok": true }))
                }
            }),
        )
        .route(
            "/broken",
            post(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver {
        url: format!("http://{addr}"),
        got,
    }
}

#[tokio::test]
async fn token_issue_bad_credentials_and_expiry_403() {
    let sim = sim().await;
    let (status, body) = token_call(
        &sim,
        "/token",
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "avito-client-id"),
            ("client_secret", "wrong"),
        ],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    let (status, body) = token_call(&sim, "/token", &[("grant_type", "password")]).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unsupported_grant_type");

    let (status, body) = token_call(
        &sim,
        "/token/",
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "avito-client-id"),
            ("client_secret", "avito-client-secret"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["expires_in"], 86400);
    assert_eq!(body["token_type"], "Bearer");
    let first = body["access_token"].as_str().unwrap().to_string();
    let second = token(&sim).await;
    assert_ne!(first, second);
    assert_eq!(sim.token_calls(), 4);
    // Both stay valid.
    for tok in [&first, &second] {
        let (status, _) = get(&sim, tok, "/order-management/1/orders").await;
        assert_eq!(status, 200);
    }

    sim.expire_tokens();
    let (status, body) = get(&sim, &first, "/order-management/1/orders").await;
    assert_eq!(status, 403);
    assert_eq!(body, json!({ "code": 403, "message": "Forbidden" }));
    let (status, body) = get(&sim, &second, "/core/v1/accounts/self").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], 403);

    let fresh = token(&sim).await;
    let (status, body) = get(&sim, &fresh, "/core/v1/accounts/self").await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], USER_ID);
    for key in ["name", "email", "phone", "phones", "profile_url"] {
        assert!(body.get(key).is_some(), "{key} in {body}");
    }
}

#[tokio::test]
async fn short_ttl_expires_by_itself() {
    let sim = AvitoSim::start(AvitoSimConfig {
        token_ttl: Duration::from_millis(300),
        ..roomy()
    })
    .await
    .unwrap();
    let tok = token(&sim).await;
    assert_eq!(get(&sim, &tok, "/order-management/1/orders").await.0, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&sim, &tok, "/order-management/1/orders").await.0, 403);
}

#[tokio::test]
async fn missing_or_unknown_token_is_401_flat_or_wrapped() {
    let sim = sim().await;
    let (status, body, _) =
        send(client().get(format!("{}/order-management/1/orders", sim.base_url()))).await;
    assert_eq!(status, 401);
    assert_eq!(body, json!({ "code": 401, "message": "Unauthorized" }));
    let (status, body) = get(
        &sim,
        "nope",
        &format!("/messenger/v2/accounts/{USER_ID}/chats"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({ "error": { "code": 401, "message": "Unauthorized" } })
    );
    let tok = token(&sim).await;
    let (status, body) = get(&sim, &tok, "/order-management/1/nothing").await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], 404);
    let (status, body) = get(&sim, &tok, "/messenger/v9/nothing").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], 404);
}

#[tokio::test]
async fn limit_over_20_is_400_and_paging_follows_has_more() {
    let sim = sim().await;
    let tok = token(&sim).await;
    let (status, body) = get(&sim, &tok, "/order-management/1/orders?limit=21").await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], 400);
    assert!(body["message"].is_string());
    assert!(body.get("error").is_none());

    // 45 orders; two share a creation time and sort by id.
    for i in 0..45 {
        seed(
            &sim,
            &format!("5000000000000{:04}", 44 - i),
            1_700_000_000 + i64::from(44 - i) / 2 * 2,
            "on_confirmation",
            "rdbs",
        );
    }
    let mut seen = Vec::new();
    let mut page = 1;
    loop {
        let (status, body) = get(
            &sim,
            &tok,
            &format!("/order-management/1/orders?limit=20&page={page}"),
        )
        .await;
        assert_eq!(status, 200);
        let got = ids(&body);
        let more = body["hasMore"].as_bool().unwrap();
        assert_eq!(got.len(), if more { 20 } else { 5 });
        seen.extend(got);
        if !more {
            break;
        }
        page += 1;
    }
    assert_eq!(page, 3);
    let expected: Vec<String> = (0..45).map(|i| format!("5000000000000{i:04}")).collect();
    assert_eq!(seen, expected);
    let (_, body) = get(&sim, &tok, "/order-management/1/orders?limit=20&page=9").await;
    assert_eq!(body, json!({ "orders": [], "hasMore": false }));
}

#[tokio::test]
async fn filters_by_statuses_in_both_encodings_ids_and_date_from() {
    let sim = sim().await;
    let tok = token(&sim).await;
    seed(&sim, "1", 1000, "on_confirmation", "rdbs");
    seed(&sim, "2", 2000, "ready_to_ship", "rdbs");
    seed(&sim, "3", 3000, "in_transit", "rdbs");
    seed(&sim, "4", 4000, "closed", "rdbs");
    let q = |query: &str| format!("/order-management/1/orders?{query}");
    let (_, body) = get(
        &sim,
        &tok,
        &q("statuses=on_confirmation&statuses=in_transit"),
    )
    .await;
    assert_eq!(ids(&body), ["1", "3"]);
    let (_, body) = get(&sim, &tok, &q("statuses=on_confirmation,in_transit")).await;
    assert_eq!(ids(&body), ["1", "3"]);
    let (_, body) = get(&sim, &tok, &q("ids=4&ids=2")).await;
    assert_eq!(ids(&body), ["2", "4"]);
    let (_, body) = get(&sim, &tok, &q("ids=4,2&statuses=closed")).await;
    assert_eq!(ids(&body), ["4"]);
    let (_, body) = get(&sim, &tok, &q("dateFrom=2000")).await;
    assert_eq!(ids(&body), ["2", "3", "4"]);
    let (_, body) = get(&sim, &tok, &q("statuses=confirming")).await;
    assert_eq!(ids(&body), Vec::<String>::new());
    let (status, _) = get(&sim, &tok, &q("dateFrom=yesterday")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn order_shape_follows_the_spec_with_the_cyrillic_key() {
    let sim = sim().await;
    let tok = token(&sim).await;
    let mut spec = SimAvitoOrderSpec::new("50000000000000000", at(1_478_033_079));
    spec.ship_till = Some(at(1_478_119_479));
    spec.delivery_cost = 300;
    sim.create_order(spec);
    let (status, body) = get(
        &sim,
        &tok,
        "/order-management/1/orders?ids=50000000000000000",
    )
    .await;
    assert_eq!(status, 200);
    let o = &body["orders"][0];
    assert_eq!(o["id"], "50000000000000000");
    assert_eq!(o["marketplaceId"], "70000000000000000");
    assert_eq!(o["status"], "on_confirmation");
    assert_eq!(o["createdAt"], "2016-11-01T20:44:39Z");
    assert_eq!(o["updatedAt"], "2016-11-01T20:44:39Z");
    assert_eq!(
        o["availableActions"],
        json!([{ "name": "confirm", "required": true }, { "name": "reject", "required": false }])
    );
    let item = &o["items"][0];
    assert_eq!(item["avitoId"], "2799377316");
    assert_eq!(item["id"], "132768483");
    assert_eq!(item["title"], "Кеды Venice");
    assert_eq!(item["count"], 1);
    assert_eq!(item["chatId"], "u2i-50000000000000000");
    assert_eq!(item["prices"]["commission"], 20);
    assert_eq!(
        o["prices"],
        json!({ "price": 1000, "discount": 0, "commission": 20, "delivery": 300, "total": 980 })
    );
    let d = &o["delivery"];
    assert_eq!(d["serviceType"], "rdbs");
    assert_eq!(
        d["buyerInfo"],
        json!({ "fullName": "Пушкин Александр", "phoneNumber": "79876543210" })
    );
    assert!(d["courierInfo"].is_null() && d.get("courierInfo").is_some());
    assert!(d.get("trackingNumber").is_none(), "absent for rdbs");
    assert!(d.get("dispatchNumber").is_none(), "absent for rdbs");
    let s = o["schedules"].as_object().unwrap();
    assert_eq!(s["confirmTill"], "2016-11-02T20:44:39Z");
    assert_eq!(s["shipTill"], "2016-11-02T20:44:39Z");
    assert!(s.contains_key("deliveryDateMa\u{0445}"), "Cyrillic х key");
    assert!(!s.contains_key("deliveryDateMax"), "no Latin x key");
    assert!(s["setTrackingNumberTill"].is_null() && s["deliveryDate"].is_null());
    assert!(o["returnPolicy"].is_null() && o.get("returnPolicy").is_some());

    seed(&sim, "7", 10, "ready_to_ship", "dbs");
    let (_, body) = get(&sim, &tok, "/order-management/1/orders?ids=7").await;
    let d = &body["orders"][0]["delivery"];
    assert!(d["trackingNumber"].is_null() && d.get("trackingNumber").is_some());
    assert!(d["terminalInfo"]["code"].is_string());
}

#[tokio::test]
async fn available_actions_follow_status_and_service() {
    let sim = sim().await;
    let tok = token(&sim).await;
    let cases: [(&str, &str, &str, Value); 8] = [
        (
            "1",
            "on_confirmation",
            "dbs",
            json!([["confirm", true], ["reject", false]]),
        ),
        (
            "2",
            "ready_to_ship",
            "rdbs",
            json!([["perform", true], ["reject", false]]),
        ),
        (
            "3",
            "ready_to_ship",
            "dbs",
            json!([["setTrackNumber", true]]),
        ),
        ("4", "in_transit", "rdbs", json!([["receive", true]])),
        ("5", "in_transit", "dbs", json!([])),
        ("6", "ready_to_ship", "pvz", json!([])),
        ("7", "delivered", "rdbs", json!([])),
        ("8", "canceled", "rdbs", json!([])),
    ];
    for (id, status, service, _) in &cases {
        seed(&sim, id, 100, status, service);
    }
    let (_, body) = get(&sim, &tok, "/order-management/1/orders").await;
    for (i, (id, _, _, expected)) in cases.iter().enumerate() {
        let o = &body["orders"][i];
        assert_eq!(o["id"], *id);
        let got: Vec<Value> = o["availableActions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| json!([a["name"], a["required"]]))
            .collect();
        assert_eq!(Value::Array(got), *expected, "order {id}");
    }
}

#[tokio::test]
async fn transitions_apply_when_available_and_fail_inside_200_otherwise() {
    let sim = sim().await;
    let tok = token(&sim).await;
    seed(&sim, "1", 100, "on_confirmation", "rdbs");
    let before = sim.order("1").unwrap().updated_at;

    assert_eq!(
        transition(&sim, &tok, "1", "perform").await,
        (200, json!({ "success": false }))
    );
    assert_eq!(sim.order("1").unwrap().status, "on_confirmation");
    assert_eq!(
        transition(&sim, &tok, "1", "confirm").await,
        (200, json!({ "success": true }))
    );
    let o = sim.order("1").unwrap();
    assert_eq!(o.status, "ready_to_ship");
    assert!(o.updated_at > before);
    assert_eq!(
        transition(&sim, &tok, "1", "perform").await.1["success"],
        true
    );
    assert_eq!(
        transition(&sim, &tok, "1", "receive").await.1["success"],
        true
    );
    let o = sim.order("1").unwrap();
    assert_eq!(o.status, "delivered");
    assert_eq!(o.transitions, ["confirm", "perform", "receive"]);
    assert_eq!(
        transition(&sim, &tok, "1", "reject").await.1["success"],
        false
    );

    seed(&sim, "2", 100, "on_confirmation", "rdbs");
    assert_eq!(
        transition(&sim, &tok, "2", "reject").await.1["success"],
        true
    );
    assert_eq!(sim.order("2").unwrap().status, "canceled");

    let (status, body) = transition(&sim, &tok, "2", "cancel").await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], 400);
    let (status, body) = transition(&sim, &tok, "404", "confirm").await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], 404);
    let (status, _) = post_json(
        &sim,
        &tok,
        "/order-management/1/order/applyTransition",
        json!("not an object"),
    )
    .await;
    assert_eq!(status, 400);

    // Avito moves the order; the seller then sees the new status.
    seed(&sim, "3", 100, "on_confirmation", "rdbs");
    let before = sim.order("3").unwrap().updated_at;
    sim.set_status("3", "in_dispute");
    let o = sim.order("3").unwrap();
    assert_eq!(o.status, "in_dispute");
    assert!(o.updated_at > before);

    // SuccessFalse: answered false without applying, once.
    seed(&sim, "4", 100, "on_confirmation", "rdbs");
    sim.inject(AvitoFault::SuccessFalse, 1);
    assert_eq!(
        transition(&sim, &tok, "4", "confirm").await,
        (200, json!({ "success": false }))
    );
    assert_eq!(sim.order("4").unwrap().status, "on_confirmation");
    assert_eq!(
        transition(&sim, &tok, "4", "confirm").await.1["success"],
        true
    );
}

#[tokio::test]
async fn tracking_number_business_errors_inside_200() {
    let sim = sim().await;
    let tok = token(&sim).await;
    seed(&sim, "1", 100, "ready_to_ship", "dbs");
    seed(&sim, "2", 100, "ready_to_ship", "dbs");
    seed(&sim, "3", 100, "ready_to_ship", "rdbs");

    let (status, body) = tracking(&sim, &tok, "1", "12").await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "incorrect_number");
    assert!(body["error"]["message"].is_string());

    assert_eq!(
        tracking(&sim, &tok, "1", "01-01031002199").await.1,
        json!({ "success": true })
    );
    let o = sim.order("1").unwrap();
    assert_eq!(o.status, "in_transit");
    assert_eq!(o.tracking_number.as_deref(), Some("01-01031002199"));
    let (_, body) = get(&sim, &tok, "/order-management/1/orders?ids=1").await;
    assert_eq!(
        body["orders"][0]["delivery"]["trackingNumber"],
        "01-01031002199"
    );

    let (_, body) = tracking(&sim, &tok, "1", "01-01031002200").await;
    assert_eq!(body["error"]["code"], "already_set");
    let (_, body) = tracking(&sim, &tok, "2", "01-01031002199").await;
    assert_eq!(body["error"]["code"], "already_set");
    let (_, body) = tracking(&sim, &tok, "3", "01-01031002201").await;
    assert_eq!(body["success"], false);
    assert!(body["error"]["code"].is_string());
    assert_eq!(sim.order("3").unwrap().status, "ready_to_ship");

    let (status, body) = tracking(&sim, &tok, "404", "01-01031002201").await;
    assert_eq!((status, body["code"].clone()), (404, json!(404)));
}

#[tokio::test]
async fn per_endpoint_limit_is_429_flat_without_rate_headers() {
    let sim = AvitoSim::start(AvitoSimConfig {
        transitions_per_minute: 5,
        ..roomy()
    })
    .await
    .unwrap();
    let tok = token(&sim).await;
    seed(&sim, "1", 100, "delivered", "rdbs");
    for _ in 0..5 {
        assert_eq!(transition(&sim, &tok, "1", "confirm").await.0, 200);
    }
    let (status, body, headers) = send(
        client()
            .post(format!(
                "{}/order-management/1/order/applyTransition",
                sim.base_url()
            ))
            .bearer_auth(&tok)
            .json(&json!({ "orderId": "1", "transition": "confirm" })),
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], 429);
    // The spec attaches no X-RateLimit-* to order-management, nor Retry-After anywhere.
    assert!(headers.get("x-ratelimit-limit").is_none());
    assert!(headers.get("retry-after").is_none());
    // Other endpoints keep their own budget.
    assert_eq!(get(&sim, &tok, "/order-management/1/orders").await.0, 200);
    assert_eq!(tracking(&sim, &tok, "1", "00000").await.0, 200);
    assert_eq!(sim.count_status(429), 1);
    assert_eq!(sim.rate_limited(), 1);
}

#[tokio::test]
async fn global_per_second_cap_spans_endpoints() {
    let sim = AvitoSim::start(AvitoSimConfig {
        global_per_second: 3,
        ..AvitoSimConfig::default()
    })
    .await
    .unwrap();
    let tok = token(&sim).await;
    assert_eq!(get(&sim, &tok, "/order-management/1/orders").await.0, 200);
    assert_eq!(get(&sim, &tok, "/core/v1/accounts/self").await.0, 200);
    assert_eq!(
        get(
            &sim,
            &tok,
            &format!("/messenger/v2/accounts/{USER_ID}/chats")
        )
        .await
        .0,
        200
    );
    let (status, body, headers) = send(
        client()
            .get(format!("{}/core/v1/accounts/self", sim.base_url()))
            .bearer_auth(&tok),
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], 429);
    assert_eq!(headers["x-ratelimit-limit"], "3");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert!(headers.get("retry-after").is_none());
    let (status, body) = get(&sim, &tok, "/order-management/1/orders").await;
    assert_eq!(status, 429);
    assert_eq!(body["code"], 429);
    assert_eq!(sim.rate_limited(), 2);
    // The token endpoint is not capped.
    token(&sim).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&sim, &tok, "/order-management/1/orders").await.0, 200);
}

#[tokio::test]
async fn webhook_subscription_probes_and_deliveries_carry_the_v3_shape() {
    let sim = sim().await;
    let tok = token(&sim).await;
    let rx = receiver().await;

    let (status, body) = post_json(
        &sim,
        &tok,
        "/messenger/v3/webhook",
        json!({ "url": format!("{}/broken", rx.url) }),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], 400);
    let (status, _) = post_json(
        &sim,
        &tok,
        "/messenger/v3/webhook",
        json!({ "url": "http://127.0.0.1:9/none" }),
    )
    .await;
    assert_eq!(status, 400);
    assert!(sim.webhook_urls().is_empty());

    let hook = format!("{}/hook", rx.url);
    let (status, body) =
        post_json(&sim, &tok, "/messenger/v3/webhook", json!({ "url": hook })).await;
    assert_eq!((status, body), (200, json!({ "ok": true })));
    assert_eq!(
        *rx.got.lock().unwrap(),
        vec![json!({})],
        "the probe is {{}}"
    );
    assert_eq!(sim.webhook_urls(), vec![hook.clone()]);
    let (_, body) = post_json(&sim, &tok, "/messenger/v1/subscriptions", json!({})).await;
    assert_eq!(
        body,
        json!({ "subscriptions": [{ "url": hook, "version": "3" }] })
    );

    let chat = "u2i-isUW4p7EZVu4R4Zk6ts2G";
    let id = sim
        .buyer_writes(
            chat,
            1768287444,
            "iPhone 13 Pro",
            141906442,
            "Иван",
            "Выкупите?",
        )
        .await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    let w = &got[1];
    assert_eq!(w["version"], "v3.0.0");
    assert!(w["id"].is_string() && w["timestamp"].is_i64());
    assert_eq!(w["payload"]["type"], "message");
    let v = &w["payload"]["value"];
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["chat_id"], chat);
    assert_eq!(v["chat_type"], "u2i");
    assert_eq!(v["user_id"], USER_ID);
    assert_eq!(v["author_id"], 141906442);
    assert_eq!(v["item_id"], 1768287444);
    assert!(v["created"].is_i64() && v["published_at"].is_string());
    assert!(v["read"].is_null() && v.get("read").is_some());
    assert_eq!(v["type"], "text");
    assert_eq!(v["content"], json!({ "text": "Выкупите?" }));

    sim.seller_writes(chat, "Да").await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got[2]["payload"]["value"]["author_id"], USER_ID);
    assert_eq!(got[2]["payload"]["value"]["item_id"], 1768287444);
    let deliveries = sim.webhook_deliveries();
    assert_eq!(deliveries.len(), 2);
    assert!(deliveries
        .iter()
        .all(|d| d.status == Some(200) && d.url == hook));

    let (status, body) = post_json(
        &sim,
        &tok,
        "/messenger/v1/webhook/unsubscribe",
        json!({ "url": hook }),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "ok": true })));
    sim.buyer_writes(chat, 1768287444, "iPhone 13 Pro", 141906442, "Иван", "Алло")
        .await;
    assert_eq!(rx.got.lock().unwrap().len(), 3);
    assert_eq!(sim.webhook_deliveries().len(), 2);
}

#[tokio::test]
async fn chats_unread_only_messages_and_read_marking() {
    let sim = sim().await;
    let tok = token(&sim).await;
    let rx = receiver().await;
    let hook = format!("{}/hook", rx.url);
    post_json(&sim, &tok, "/messenger/v3/webhook", json!({ "url": hook })).await;

    sim.buyer_writes("u2i-a", 11, "iPhone 12", 501, "Анна", "Привет")
        .await;
    sim.buyer_writes("u2i-b", 22, "iPhone 13", 502, "Борис", "Здравствуйте")
        .await;
    let chats = format!("/messenger/v2/accounts/{USER_ID}/chats");
    let (status, body) = get(&sim, &tok, &format!("{chats}?unread_only=true")).await;
    assert_eq!(status, 200);
    assert_eq!(body["chats"].as_array().unwrap().len(), 2);
    let c = body["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "u2i-a")
        .unwrap();
    assert_eq!(c["context"]["type"], "item");
    assert_eq!(c["context"]["value"]["id"], 11);
    assert_eq!(c["context"]["value"]["title"], "iPhone 12");
    assert_eq!(c["context"]["value"]["user_id"], USER_ID);
    assert_eq!(c["last_message"]["content"]["text"], "Привет");
    assert!(c["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["id"] == 501));
    assert!(c["created"].is_i64() && c["updated"].is_i64());

    let messages = format!("/messenger/v3/accounts/{USER_ID}/chats/u2i-a/messages/");
    let (status, body) = get(&sim, &tok, &messages).await;
    assert_eq!(status, 200);
    let m = &body[0];
    assert_eq!(m["author_id"], 501);
    assert_eq!(m["direction"], "in");
    assert_eq!(m["type"], "text");
    assert_eq!(m["content"]["text"], "Привет");
    assert_eq!(m["is_read"], false);
    // Reading messages does not mark the chat read.
    let (_, body) = get(&sim, &tok, &format!("{chats}?unread_only=true")).await;
    assert_eq!(body["chats"].as_array().unwrap().len(), 2);

    let (status, body) = post_json(
        &sim,
        &tok,
        &format!("/messenger/v1/accounts/{USER_ID}/chats/u2i-a/read"),
        json!({}),
    )
    .await;
    assert_eq!((status, body), (200, json!({ "ok": true })));
    let (_, body) = get(&sim, &tok, &format!("{chats}?unread_only=true")).await;
    let left: Vec<&Value> = body["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["id"])
        .collect();
    assert_eq!(left, [&json!("u2i-b")]);
    let (_, body) = get(&sim, &tok, &chats).await;
    assert_eq!(body["chats"].as_array().unwrap().len(), 2);
    let (_, body) = get(&sim, &tok, &messages).await;
    assert_eq!(body[0]["is_read"], true);

    // Sending through the API: stored as "out" and echoed to the webhook.
    let (status, body) = post_json(
        &sim,
        &tok,
        &format!("/messenger/v1/accounts/{USER_ID}/chats/u2i-a/messages"),
        json!({ "message": { "text": "Добрый день" }, "type": "text" }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["direction"], "out");
    let (_, body) = get(&sim, &tok, &messages).await;
    assert_eq!(body[0]["direction"], "out");
    assert_eq!(body[0]["author_id"], USER_ID);
    for _ in 0..50 {
        if sim.webhook_deliveries().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deliveries = sim.webhook_deliveries();
    assert_eq!(deliveries.len(), 3);
    assert_eq!(deliveries[2].body["payload"]["value"]["author_id"], USER_ID);

    // Another account's id in the path: 403 wrapped.
    let (status, body) = get(&sim, &tok, "/messenger/v2/accounts/1/chats").await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], 403);
    let (status, body) = get(
        &sim,
        &tok,
        &format!("/messenger/v3/accounts/{USER_ID}/chats/u2i-zzz/messages/"),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], 404);
}

#[tokio::test]
async fn faults_use_the_envelope_of_the_path_and_spare_the_token() {
    let sim = sim().await;
    sim.inject(AvitoFault::ServerError, 2);
    let tok = token(&sim).await;
    let (status, body) = get(&sim, &tok, "/order-management/1/orders").await;
    assert_eq!(status, 500);
    assert_eq!(body["code"], 500);
    assert!(body["message"].is_string());
    let (status, body) = get(&sim, &tok, "/core/v1/accounts/self").await;
    assert_eq!(status, 500);
    assert_eq!(body["error"]["code"], 500);

    sim.inject(AvitoFault::TooManyRequests, 1);
    let (status, body, headers) = send(
        client()
            .get(format!("{}/order-management/1/orders", sim.base_url()))
            .bearer_auth(&tok),
    )
    .await;
    assert_eq!((status, body["code"].clone()), (429, json!(429)));
    assert!(headers.get("retry-after").is_none());
    // An injected 429 is not the account's limit.
    assert_eq!(sim.rate_limited(), 0);

    sim.inject(AvitoFault::ConnectionReset, 1);
    let err = client()
        .get(format!("{}/order-management/1/orders", sim.base_url()))
        .bearer_auth(&tok)
        .send()
        .await;
    assert!(err.is_err());
    assert_eq!(sim.count_status(0), 1);

    sim.inject(AvitoFault::Timeout, 1);
    let quick = Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = quick
        .get(format!("{}/order-management/1/orders", sim.base_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout());

    assert_eq!(get(&sim, &tok, "/order-management/1/orders").await.0, 200);
    let log = sim.requests();
    assert!(log
        .iter()
        .any(|r| r.path == "/token" && r.method == "POST" && r.status == 200));
    let last = log.last().unwrap();
    assert_eq!(
        (last.path.as_str(), last.status),
        ("/order-management/1/orders", 200)
    );
}

#[tokio::test]
async fn bad_input_gets_4xx_never_a_crash() {
    let sim = sim().await;
    let tok = token(&sim).await;
    seed(&sim, "1", 100, "on_confirmation", "rdbs");
    let orders = "/order-management/1/orders";
    for query in [
        "limit=-1",
        "limit=abc",
        "page=0",
        "page=x",
        "limit=99999999999999999999",
    ] {
        let (status, body) = get(&sim, &tok, &format!("{orders}?{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["code"], 400, "{query}");
    }
    // limit=0 means the default page of 20; a far page is empty.
    let (_, body) = get(&sim, &tok, &format!("{orders}?limit=0")).await;
    assert_eq!(ids(&body), ["1"]);
    let (status, body) = get(&sim, &tok, &format!("{orders}?page=9223372036854775807")).await;
    assert_eq!((status, body["hasMore"].clone()), (200, json!(false)));
    for body in [
        json!({}),
        json!({ "orderId": 1, "transition": "confirm" }),
        json!([1, 2]),
    ] {
        let (status, _) = post_json(
            &sim,
            &tok,
            "/order-management/1/order/applyTransition",
            body.clone(),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let (status, _) = post_json(
            &sim,
            &tok,
            "/order-management/1/order/setTrackingNumber",
            body.clone(),
        )
        .await;
        assert_eq!(status, 400, "{body}");
    }
    let (status, body) = post_json(&sim, &tok, "/messenger/v3/webhook", json!({ "url": 5 })).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["message"], "Validation error");
    let (status, _) = post_json(
        &sim,
        &tok,
        "/messenger/v3/webhook",
        json!({ "url": "not a url" }),
    )
    .await;
    assert_eq!(status, 400);
    let chats = format!("/messenger/v2/accounts/{USER_ID}/chats");
    for query in ["limit=0", "limit=101", "offset=1001", "unread_only=maybe"] {
        let (status, body) = get(&sim, &tok, &format!("{chats}?{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["error"]["code"], 400, "{query}");
    }
    let (status, _, _) = send(
        client()
            .post(format!("{}/token", sim.base_url()))
            .body(vec![0xff, 0xfe, b'=', b'%']),
    )
    .await;
    assert_eq!(status, 400);
    // Still serving.
    assert_eq!(get(&sim, &tok, orders).await.0, 200);
}
