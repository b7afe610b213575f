//! The Kaspi simulator follows `shared/apis/kaspi.md`: headers and their quirks,
//! the list window and paging, the resource shapes, the transition table and
//! the two-step completion, faults and latency. Raw reqwest only.

use std::time::{Duration, Instant};

use orderbridge::sim::kaspi::{KaspiFault, KaspiSim, KaspiSimConfig, SimEntrySpec, SimOrderSpec};
use reqwest::{Client, RequestBuilder};
use serde_json::{json, Value};

const TOKEN: &str = "kaspi-test-token";
const DAY: i64 = 24 * 3600 * 1000;
const JSON_API: &str = "application/vnd.api+json";

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn sim() -> KaspiSim {
    KaspiSim::start(KaspiSimConfig::default()).await.unwrap()
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The headers a correct client sends.
fn api(rb: RequestBuilder) -> RequestBuilder {
    rb.header("Accept", JSON_API)
        .header("Content-Type", JSON_API)
        .header("X-Auth-Token", TOKEN)
}

async fn send(rb: RequestBuilder) -> (u16, Value) {
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    if status == 200 || ct.contains("json") {
        assert!(ct.starts_with(JSON_API), "content type {ct}");
    }
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

async fn get(sim: &KaspiSim, path_and_query: &str) -> (u16, Value) {
    send(api(
        client().get(format!("{}{path_and_query}", sim.base_url()))
    ))
    .await
}

async fn post(sim: &KaspiSim, body: Value) -> (u16, Value) {
    send(api(client().post(format!("{}/orders", sim.base_url()))).body(body.to_string())).await
}

fn transition(id: &str, code: &str, status: &str) -> Value {
    json!({ "data": { "type": "orders", "id": id, "attributes": { "code": code, "status": status } } })
}

fn window(from: i64, to: i64) -> String {
    format!("filter[orders][creationDate][$ge]={from}&filter[orders][creationDate][$le]={to}")
}

fn list_url(extra: &str) -> String {
    let now = now_ms();
    format!(
        "/orders?page[number]=0&page[size]=20&{}{extra}",
        window(now - 13 * DAY, now)
    )
}

fn title(body: &Value) -> String {
    body["errors"][0]["title"].as_str().unwrap().to_string()
}

fn spec(code: &str) -> SimOrderSpec {
    SimOrderSpec::new(code, now_ms() - DAY)
}

#[tokio::test]
async fn accept_header_must_name_json_api_or_the_answer_is_a_404_html_page() {
    let sim = sim().await;
    let url = format!("{}{}", sim.base_url(), list_url(""));
    for accept in [None, Some("application/json"), Some("*/*")] {
        let mut rb = client().get(&url).header("X-Auth-Token", TOKEN);
        if let Some(a) = accept {
            rb = rb.header("Accept", a);
        }
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 404);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/html"), "{ct}");
        assert!(resp.text().await.unwrap().contains("<html"));
    }
    // Checked before auth: a bad token without Accept still gets the HTML 404.
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    // With charset it is accepted.
    let resp = client()
        .get(&url)
        .header("Accept", "application/vnd.api+json;charset=UTF-8")
        .header("X-Auth-Token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn a_bad_or_missing_token_gets_401_with_json_api_errors() {
    let sim = sim().await;
    let url = format!("{}{}", sim.base_url(), list_url(""));
    let (status, body) = send(
        client()
            .get(&url)
            .header("Accept", JSON_API)
            .header("X-Auth-Token", "wrong"),
    )
    .await;
    assert_eq!(status, 401);
    assert!(!title(&body).is_empty());
    let (status, _) = send(client().get(&url).header("Accept", JSON_API)).await;
    assert_eq!(status, 401);
    assert_eq!(sim.count_status(401), 2);
}

#[tokio::test]
async fn without_the_merchant_uid_every_filter_returns_zero_orders_with_200() {
    let sim = KaspiSim::start(KaspiSimConfig {
        merchant_uid: Some("30000001".into()),
        ..KaspiSimConfig::default()
    })
    .await
    .unwrap();
    let order = sim.create_order(spec("500001"));
    let url = format!("{}{}", sim.base_url(), list_url(""));
    for uid in [None, Some("30000002")] {
        let mut rb = api(client().get(&url));
        if let Some(u) = uid {
            rb = rb.header("X-Merchant-Uid", u);
        }
        let (status, body) = send(rb).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"], json!([]));
        assert_eq!(body["meta"], json!({ "pageCount": 0, "totalCount": 0 }));
    }
    let (status, body) = get(&sim, "/orders?filter[orders][code]=500001").await;
    assert_eq!(
        (status, body["meta"]["totalCount"].as_u64()),
        (200, Some(0))
    );
    let (status, _) = get(&sim, &format!("/orders/{}", order.id)).await;
    assert_eq!(status, 404);

    let (status, body) = send(api(client().get(&url)).header("X-Merchant-Uid", "30000001")).await;
    assert_eq!(status, 200);
    assert_eq!(body["meta"]["totalCount"], 1);
    assert_eq!(body["data"][0]["id"], order.id.as_str());
}

#[tokio::test]
async fn the_creation_date_window_is_required_and_at_most_14_days() {
    let sim = sim().await;
    let now = now_ms();
    let (status, body) = get(
        &sim,
        &format!(
            "/orders?page[number]=0&page[size]=10&{}",
            window(now - 15 * DAY, now)
        ),
    )
    .await;
    assert_eq!(status, 400);
    let t = title(&body);
    assert!(t.contains("period") && t.contains("14 days"), "{t}");
    // Exactly 14 days is fine.
    let (status, _) = get(
        &sim,
        &format!(
            "/orders?page[number]=0&page[size]=10&{}",
            window(now - 14 * DAY, now)
        ),
    )
    .await;
    assert_eq!(status, 200);
    // $le defaults to now, so an old $ge alone is over the limit.
    let (status, _) = get(
        &sim,
        &format!(
            "/orders?page[number]=0&page[size]=10&filter[orders][creationDate][$ge]={}",
            now - 15 * DAY
        ),
    )
    .await;
    assert_eq!(status, 400);
    // Missing $ge.
    let (status, body) = get(
        &sim,
        &format!("/orders?page[number]=0&page[size]=10&filter[orders][creationDate][$le]={now}"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(title(&body).contains("$ge"));
    // Windows in the past work.
    sim.create_order(SimOrderSpec::new("old1", now - 40 * DAY));
    let (status, body) = get(
        &sim,
        &format!(
            "/orders?page[number]=0&page[size]=10&{}",
            window(now - 45 * DAY, now - 31 * DAY)
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"][0]["attributes"]["code"], "old1");
}

#[tokio::test]
async fn pages_are_zero_based_capped_at_100_and_sorted_by_creation_date() {
    let sim = sim().await;
    let base = now_ms() - 10 * DAY;
    // Created in reverse so the answer's order is the simulator's doing.
    for i in (0..250).rev() {
        sim.create_order(SimOrderSpec::new(&format!("7{i:05}"), base + i * 60_000));
    }
    let w = window(base, now_ms());
    let (status, body) = get(&sim, &format!("/orders?page[number]=0&page[size]=500&{w}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().unwrap().len(), 100);
    assert_eq!(body["meta"], json!({ "pageCount": 3, "totalCount": 250 }));
    assert_eq!(body["data"][0]["attributes"]["code"], "700000");
    assert_eq!(body["data"][99]["attributes"]["code"], "700099");
    assert_eq!(body["included"], json!([]));
    let (_, body) = get(&sim, &format!("/orders?page[number]=2&page[size]=100&{w}")).await;
    assert_eq!(body["data"].as_array().unwrap().len(), 50);
    assert_eq!(body["data"][0]["attributes"]["code"], "700200");
    let (_, body) = get(&sim, &format!("/orders?page[number]=3&page[size]=100&{w}")).await;
    assert_eq!(body["data"], json!([]));
    assert_eq!(body["meta"]["pageCount"], 3);
    let (_, body) = get(&sim, &format!("/orders?page[number]=0&page[size]=7&{w}")).await;
    assert_eq!(body["meta"], json!({ "pageCount": 36, "totalCount": 250 }));
    // No orders: pageCount 0.
    let (_, body) = get(
        &sim,
        &format!(
            "/orders?page[number]=0&page[size]=10&{}",
            window(base - 5 * DAY, base - DAY)
        ),
    )
    .await;
    assert_eq!(body["meta"], json!({ "pageCount": 0, "totalCount": 0 }));
    // Paging parameters are required.
    let (status, _) = get(&sim, &format!("/orders?page[size]=10&{w}")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn state_and_status_filters_are_optional_single_values() {
    let sim = sim().await;
    sim.create_order(spec("1"));
    let mut archived = spec("2");
    archived.state = "ARCHIVE".into();
    archived.status = "COMPLETED".into();
    sim.create_order(archived);
    let (_, body) = get(&sim, &list_url("")).await;
    assert_eq!(body["meta"]["totalCount"], 2);
    let (_, body) = get(&sim, &list_url("&filter[orders][state]=ARCHIVE")).await;
    assert_eq!(body["meta"]["totalCount"], 1);
    assert_eq!(body["data"][0]["attributes"]["code"], "2");
    let (_, body) = get(&sim, &list_url("&filter[orders][status]=APPROVED_BY_BANK")).await;
    assert_eq!(body["data"][0]["attributes"]["code"], "1");
    let (status, _) = get(&sim, &list_url("&filter[orders][state]=BOGUS")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn include_adds_customers_and_entries() {
    let sim = sim().await;
    let mut s = spec("800001");
    s.customer_name = "Марат Маратов".into();
    s.entries.push(SimEntrySpec {
        sku: "SKU-2".into(),
        name: "Сковорода".into(),
        quantity: 2,
        base_price: 1000.0,
    });
    let order = sim.create_order(s);

    let (_, body) = get(&sim, &list_url("")).await;
    assert_eq!(body["included"], json!([]));
    assert!(body["data"][0]["relationships"]["entries"]
        .get("data")
        .is_none());
    assert!(
        body["data"][0]["relationships"]["entries"]["links"]["related"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/orders/{}/entries", order.id))
    );

    let (_, body) = get(&sim, &list_url("&include[orders]=user")).await;
    let inc = body["included"].as_array().unwrap();
    assert_eq!(inc.len(), 1);
    assert_eq!(inc[0]["type"], "customers");
    assert_eq!(
        inc[0]["id"],
        body["data"][0]["relationships"]["user"]["data"]["id"]
    );
    assert_eq!(inc[0]["attributes"]["cellPhone"], "7021234567");
    assert_eq!(inc[0]["attributes"]["lastName"], "Маратов");

    let (_, body) = get(&sim, &list_url("&include[orders]=entries")).await;
    let inc = body["included"].as_array().unwrap();
    assert_eq!(inc.len(), 2);
    assert!(inc.iter().all(|e| e["type"] == "orderentries"));
    let ids: Vec<&Value> = body["data"][0]["relationships"]["entries"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["id"])
        .collect();
    assert_eq!(ids, vec![&inc[0]["id"], &inc[1]["id"]]);
    let e = &inc[1]["attributes"];
    assert_eq!(e["entryNumber"], 1);
    assert_eq!(e["quantity"], 2);
    assert_eq!(e["basePrice"], json!(1000.0));
    assert_eq!(e["totalPrice"], json!(2000.0));
    assert_eq!(e["unitType"], "PIECES");
    assert_eq!(
        e["offer"],
        json!({ "code": "SKU-2", "name": "Сковорода", "isImeiRequired": false })
    );
    assert_eq!(
        inc[1]["relationships"]["product"]["data"]["type"],
        "masterproducts"
    );
    assert_eq!(
        inc[1]["relationships"]["deliveryPointOfService"]["data"]["type"],
        "pointofservices"
    );

    let (_, body) = get(&sim, &list_url("&include[orders]=user,entries")).await;
    assert_eq!(body["included"].as_array().unwrap().len(), 3);

    let (status, body) = get(&sim, &format!("/orders/{}/entries", order.id)).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let entry_id = body["data"][0]["id"].as_str().unwrap().to_string();
    let (status, body) = get(&sim, &format!("/orderentries/{entry_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["attributes"]["offer"]["code"], "355654asiuowl");
    let (status, body) = get(&sim, &format!("/orderentries/{entry_id}/product")).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["type"], "masterproducts");
}

#[tokio::test]
async fn the_order_resource_has_the_documented_shape() {
    let sim = sim().await;
    let order = sim.create_order(spec("496149022"));
    assert_ne!(order.id, order.code);
    let (status, body) = get(&sim, &format!("/orders/{}", order.id)).await;
    assert_eq!(status, 200);
    assert_eq!(body["included"], json!([]));
    let d = &body["data"];
    assert_eq!(d["type"], "orders");
    assert_eq!(d["id"], order.id.as_str());
    assert!(d["links"]["self"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/orders/{}", order.id)));
    let a = &d["attributes"];
    assert_eq!(a["code"], "496149022");
    assert_eq!(a["totalPrice"], json!(5990.0));
    assert!(a["totalPrice"].is_f64());
    for key in [
        "creationDate",
        "deliveryCostForSeller",
        "isKaspiDelivery",
        "preOrder",
        "approvedByBankDate",
        "signatureRequired",
        "status",
        "pickupPointId",
        "state",
        "deliveryCost",
        "customer",
        "originAddress",
        "kaspiDelivery",
        "assembled",
        "deliveryMode",
        "paymentMode",
    ] {
        assert!(a.get(key).is_some(), "missing {key}");
    }
    assert_eq!(a["customer"]["cellPhone"], "7021234567");
    assert_eq!(a["customer"]["name"], "Марат");
    assert!(a.get("cancellationReason").is_none());
    assert!(a.get("deliveryAddress").is_none());
    assert_eq!(a["kaspiDelivery"]["waybill"], Value::Null);
    assert_eq!(d["relationships"]["user"]["data"]["type"], "customers");

    // A merchant-delivery order on credit with integer prices.
    let mut s = spec("4000");
    s.is_kaspi_delivery = false;
    s.delivery_mode = "DELIVERY_LOCAL".into();
    s.payment_mode = "PAY_WITH_CREDIT".into();
    s.total_price = 4000.0;
    s.integer_prices = true;
    s.delivery_address = Some("Алматы, улица Наурызбай батыра, 154А".into());
    s.planned_delivery_date_ms = Some(1_706_896_790_999);
    let o = sim.create_order(s);
    let (_, body) = get(&sim, &format!("/orders/{}?include[orders]=entries", o.id)).await;
    let a = &body["data"]["attributes"];
    assert_eq!(a["totalPrice"].to_string(), "4000");
    assert_eq!(a["creditTerm"], 3);
    assert_eq!(a["plannedDeliveryDate"], 1_706_896_790_999i64);
    assert_eq!(a["deliveryAddress"]["town"], "Алматы");
    assert_eq!(
        a["deliveryAddress"]["formattedAddress"],
        "Алматы, улица Наурызбай батыра, 154А"
    );
    assert!(a.get("kaspiDelivery").is_none());
    assert_eq!(
        body["included"][0]["attributes"]["basePrice"].to_string(),
        "5990"
    );

    let (status, body) = get(&sim, "/orders/NoSuchOrder").await;
    assert_eq!(status, 404);
    assert!(!title(&body).is_empty());
    let (status, body) = get(&sim, "/products").await;
    assert_eq!(status, 404);
    assert!(body["errors"].is_array());
}

async fn accepted_kaspi_order(sim: &KaspiSim, code: &str) -> (String, String) {
    let o = sim.create_order(spec(code));
    let (status, _) = post(sim, transition(&o.id, code, "ACCEPTED_BY_MERCHANT")).await;
    assert_eq!(status, 200);
    (o.id, o.code)
}

async fn assemble(sim: &KaspiSim, id: &str, spaces: Value) -> (u16, Value) {
    post(
        sim,
        json!({ "data": { "type": "orders", "id": id,
                          "attributes": { "status": "ASSEMBLE", "numberOfSpace": spaces } } }),
    )
    .await
}

#[tokio::test]
async fn the_waybill_url_is_signed_anew_on_every_read_but_its_number_is_stable() {
    let sim = sim().await;
    let (id, _) = accepted_kaspi_order(&sim, "900001").await;
    let (status, echo) = assemble(&sim, &id, json!("2")).await;
    assert_eq!(status, 200);
    assert_eq!(echo["data"]["attributes"]["status"], "ASSEMBLED");
    assert_eq!(echo["data"]["attributes"]["numberOfSpace"], 2);
    let (_, one) = get(&sim, &format!("/orders/{id}")).await;
    let (_, two) = get(&sim, &list_url("")).await;
    let k1 = &one["data"]["attributes"]["kaspiDelivery"];
    let k2 = &two["data"][0]["attributes"]["kaspiDelivery"];
    assert!(k1["waybill"].is_string());
    assert_ne!(k1["waybill"], k2["waybill"]);
    assert_eq!(k1["waybillNumber"], k2["waybillNumber"]);
    assert!(k1["waybillNumber"].is_string());
    assert_eq!(one["data"]["attributes"]["assembled"], true);
    let mut a1 = one["data"]["attributes"].clone();
    let mut a2 = two["data"][0]["attributes"].clone();
    a1["kaspiDelivery"]["waybill"] = Value::Null;
    a2["kaspiDelivery"]["waybill"] = Value::Null;
    assert_eq!(a1, a2, "only the waybill differs");

    let sim_order = sim.order(&id).unwrap();
    assert!(sim_order.assembled);
    assert_eq!(sim_order.number_of_space, Some(2));
    assert_eq!(
        sim_order.waybill_number.as_deref(),
        k1["waybillNumber"].as_str()
    );

    // The signed URL serves the PDF with the token.
    let pdf = client()
        .get(k1["waybill"].as_str().unwrap())
        .header("X-Auth-Token", TOKEN)
        .header("Accept", "application/pdf")
        .send()
        .await
        .unwrap();
    assert_eq!(pdf.status().as_u16(), 200);
    assert_eq!(pdf.headers()["content-type"], "application/pdf");

    // The courier picks it up.
    sim.courier_picks_up(&id, 1_745_755_274_000);
    let (_, body) = get(&sim, &format!("/orders/{id}")).await;
    assert_eq!(
        body["data"]["attributes"]["kaspiDelivery"]["courierTransmissionDate"],
        1_745_755_274_000i64
    );
}

#[tokio::test]
async fn delivery_fields_are_nested_or_top_level_as_configured() {
    let sim = sim().await;
    let mut flat = spec("910002");
    flat.nested_delivery_fields = false;
    let flat = sim.create_order(flat);
    sim.kaspi_accepts_order(&flat.id);
    let (status, _) = assemble(&sim, &flat.id, json!("1")).await;
    assert_eq!(status, 200);
    let (_, body) = get(&sim, &format!("/orders/{}", flat.id)).await;
    let a = &body["data"]["attributes"];
    assert!(a.get("kaspiDelivery").is_none());
    for key in [
        "waybill",
        "courierTransmissionDate",
        "courierTransmissionPlanningDate",
        "waybillNumber",
        "express",
        "returnedToWarehouse",
        "firstMileCourier",
    ] {
        assert!(a.get(key).is_some(), "missing top-level {key}");
    }
    assert!(a["waybill"].is_string());
    let nested = sim.create_order(spec("910001"));
    let (_, body) = get(&sim, &format!("/orders/{}", nested.id)).await;
    let a = &body["data"]["attributes"];
    assert!(a.get("waybillNumber").is_none());
    assert!(a["kaspiDelivery"].get("waybillNumber").is_some());
}

#[tokio::test]
async fn lookup_by_code_needs_no_window_and_finds_old_orders() {
    let sim = sim().await;
    let old = sim.create_order(SimOrderSpec::new("123456789", now_ms() - 40 * DAY));
    let (status, body) = get(
        &sim,
        "/orders?filter[orders][code]=123456789&include[orders]=entries",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], old.id.as_str());
    assert_eq!(body["meta"], json!({ "pageCount": 1, "totalCount": 1 }));
    assert_eq!(body["included"][0]["type"], "orderentries");
    let (status, body) = get(&sim, "/orders?filter[orders][code]=nope").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!([]));
}

#[tokio::test]
async fn accept_is_allowed_only_from_approved_by_bank() {
    let sim = sim().await;
    for (mode, kaspi, state) in [
        ("DELIVERY_REGIONAL_TODOOR", true, "KASPI_DELIVERY"),
        ("DELIVERY_PICKUP", false, "PICKUP"),
        ("DELIVERY_LOCAL", false, "DELIVERY"),
    ] {
        let mut s = spec(&format!("acc-{mode}"));
        s.delivery_mode = mode.into();
        s.is_kaspi_delivery = kaspi;
        let o = sim.create_order(s);
        let (status, body) = post(&sim, transition(&o.id, &o.code, "ACCEPTED_BY_MERCHANT")).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({ "data": { "type": "orders", "id": o.id,
                              "attributes": { "code": o.code, "status": "ACCEPTED_BY_MERCHANT" },
                              "relationships": {}, "links": {} }, "included": [] })
        );
        let now = sim.order(&o.id).unwrap();
        assert_eq!(
            (now.status.as_str(), now.state.as_str()),
            ("ACCEPTED_BY_MERCHANT", state)
        );
        // Again: refused.
        let (status, body) = post(&sim, transition(&o.id, &o.code, "ACCEPTED_BY_MERCHANT")).await;
        assert_eq!(status, 400);
        assert!(title(&body).contains("ACCEPTED_BY_MERCHANT"));
    }
    for status in ["COMPLETED", "CANCELLED", "CANCELLING", "RETURNED"] {
        let mut s = spec(&format!("acc-{status}"));
        s.status = status.into();
        s.state = "ARCHIVE".into();
        let o = sim.create_order(s);
        let (code, body) = post(&sim, transition(&o.id, &o.code, "ACCEPTED_BY_MERCHANT")).await;
        assert_eq!(code, 400, "{status}");
        assert!(title(&body).contains("can't be accepted"));
    }
}

#[tokio::test]
async fn completion_takes_two_steps_with_the_buyers_code() {
    let sim = sim().await;
    let mut s = spec("co-1");
    s.is_kaspi_delivery = false;
    s.delivery_mode = "DELIVERY_PICKUP".into();
    let o = sim.create_order(s);
    sim.kaspi_accepts_order(&o.id);
    let url = format!("{}/orders", sim.base_url());
    let body = transition(&o.id, &o.code, "COMPLETED").to_string();
    let step = |code: &str| {
        api(client().post(&url))
            .header("X-Security-Code", code)
            .header("X-Send-Code", "true")
            .body(body.clone())
    };
    // Step 1: the code goes to the buyer, the order stays open.
    let (status, echo) = send(step("")).await;
    assert_eq!(status, 200);
    assert_eq!(echo["data"]["attributes"]["status"], "ACCEPTED_BY_MERCHANT");
    let code = sim.security_code(&o.id).unwrap();
    assert_eq!(code.len(), 4);
    assert!(code.chars().all(|c| c.is_ascii_digit()));
    assert_eq!(sim.order(&o.id).unwrap().status, "ACCEPTED_BY_MERCHANT");
    // A wrong code.
    let wrong = if code == "0000" { "1111" } else { "0000" };
    let (status, err) = send(step(wrong)).await;
    assert_eq!(status, 400);
    assert_eq!(
        err,
        json!({ "errors": [{ "title": "Security code is not valid. And the order cannot be completed without it" }] })
    );
    assert_eq!(
        title(&err),
        "Security code is not valid. And the order cannot be completed without it"
    );
    // No security header at all.
    let (status, _) = send(api(client().post(&url)).body(body.clone())).await;
    assert_eq!(status, 400);
    // The right code completes.
    let (status, echo) = send(step(&code)).await;
    assert_eq!(status, 200);
    assert_eq!(echo["data"]["attributes"]["status"], "COMPLETED");
    let done = sim.order(&o.id).unwrap();
    assert_eq!(
        (done.status.as_str(), done.state.as_str()),
        ("COMPLETED", "ARCHIVE")
    );
    assert!(done.completed_with_code);
    // Again.
    let (status, err) = send(step(&code)).await;
    assert_eq!(status, 400);
    assert_eq!(
        title(&err),
        "Order already has been completed, so it can't be completed again."
    );
}

#[tokio::test]
async fn completion_is_refused_for_cancelled_unsigned_and_unaccepted_orders() {
    let sim = sim().await;
    let url = format!("{}/orders", sim.base_url());
    let cases = [
        (
            "CANCELLED",
            "ARCHIVE",
            "Order is cancelled, so it can't be completed.",
        ),
        (
            "CANCELLING",
            "KASPI_DELIVERY",
            "Order is cancelled, so it can't be completed.",
        ),
        (
            "COMPLETED",
            "ARCHIVE",
            "Order already has been completed, so it can't be completed again.",
        ),
        (
            "ACCEPTED_BY_MERCHANT",
            "SIGN_REQUIRED",
            "Order is not may complete allowed",
        ),
        (
            "APPROVED_BY_BANK",
            "SIGN_REQUIRED",
            "Order is not may complete allowed",
        ),
        ("APPROVED_BY_BANK", "NEW", "can't be completed"),
        ("RETURNED", "ARCHIVE", "can't be completed"),
    ];
    for (n, (status, state, expected)) in cases.into_iter().enumerate() {
        let mut s = spec(&format!("cr-{n}"));
        s.status = status.into();
        s.state = state.into();
        let o = sim.create_order(s);
        let (code, err) = send(
            api(client().post(&url))
                .header("X-Security-Code", "")
                .header("X-Send-Code", "true")
                .body(transition(&o.id, &o.code, "COMPLETED").to_string()),
        )
        .await;
        assert_eq!(code, 400, "{status}/{state}");
        assert!(
            title(&err).contains(expected),
            "{status}/{state}: {}",
            title(&err)
        );
        assert!(sim.security_code(&o.id).is_none());
    }
}

fn cancel_body(id: &str, code: &str, reason: Option<&str>, comment: Option<String>) -> Value {
    let mut attrs = json!({ "code": code, "status": "CANCELLED" });
    if let Some(r) = reason {
        attrs["cancellationReason"] = json!(r);
    }
    if let Some(c) = comment {
        attrs["cancellationComment"] = json!(c);
    }
    json!({ "data": { "type": "orders", "id": id, "attributes": attrs } })
}

#[tokio::test]
async fn cancel_needs_a_known_reason_and_a_short_comment() {
    let sim = sim().await;
    let o = sim.create_order(spec("ca-1"));
    let (status, err) = post(&sim, cancel_body(&o.id, &o.code, None, None)).await;
    assert_eq!(status, 400);
    assert!(title(&err).contains("cancellationReason"));
    let (status, _) = post(
        &sim,
        cancel_body(&o.id, &o.code, Some("TIMEOUT_BUYER_PICKUP"), None),
    )
    .await;
    assert_eq!(status, 400);
    let long = "я".repeat(1001);
    let (status, err) = post(
        &sim,
        cancel_body(&o.id, &o.code, Some("MERCHANT_OUT_OF_STOCK"), Some(long)),
    )
    .await;
    assert_eq!(status, 400);
    assert!(title(&err).contains("1000"));
    assert_eq!(sim.order(&o.id).unwrap().status, "APPROVED_BY_BANK");

    // From APPROVED_BY_BANK, with a 1000-char comment.
    let max = "я".repeat(1000);
    let (status, echo) = post(
        &sim,
        cancel_body(
            &o.id,
            &o.code,
            Some("MERCHANT_OUT_OF_STOCK"),
            Some(max.clone()),
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(echo["data"]["attributes"]["status"], "CANCELLED");
    assert_eq!(
        echo["data"]["attributes"]["cancellationReason"],
        "MERCHANT_OUT_OF_STOCK"
    );
    let c = sim.order(&o.id).unwrap();
    assert_eq!(
        (c.status.as_str(), c.state.as_str()),
        ("CANCELLED", "ARCHIVE")
    );
    assert_eq!(
        c.cancellation_reason.as_deref(),
        Some("MERCHANT_OUT_OF_STOCK")
    );
    assert_eq!(c.cancellation_comment, Some(max));
    let (_, body) = get(&sim, &format!("/orders/{}", o.id)).await;
    assert_eq!(
        body["data"]["attributes"]["cancellationReason"],
        "MERCHANT_OUT_OF_STOCK"
    );

    // From ACCEPTED_BY_MERCHANT, every accepted reason.
    for reason in [
        "BUYER_CANCELLATION_BY_MERCHANT",
        "BUYER_NOT_REACHABLE",
        "MERCHANT_OUT_OF_STOCK",
    ] {
        let (id, code) = accepted_kaspi_order(&sim, &format!("ca-{reason}")).await;
        let (status, _) = post(&sim, cancel_body(&id, &code, Some(reason), None)).await;
        assert_eq!(status, 200, "{reason}");
    }
    // Refused from every other status.
    for status in [
        "CANCELLED",
        "CANCELLING",
        "COMPLETED",
        "RETURNED",
        "KASPI_DELIVERY_RETURN_REQUESTED",
    ] {
        let mut s = spec(&format!("cx-{status}"));
        s.status = status.into();
        let o = sim.create_order(s);
        let (code, err) = post(
            &sim,
            cancel_body(&o.id, &o.code, Some("MERCHANT_OUT_OF_STOCK"), None),
        )
        .await;
        assert_eq!(code, 400, "{status}");
        assert!(title(&err).contains("can't be cancelled"));
    }
}

#[tokio::test]
async fn assemble_is_for_accepted_kaspi_delivery_orders_with_a_string_number_of_spaces() {
    let sim = sim().await;
    let (id, _) = accepted_kaspi_order(&sim, "as-1").await;
    for bad in [json!(2), json!("0"), json!("51"), json!("two"), Value::Null] {
        let (status, err) = assemble(&sim, &id, bad.clone()).await;
        assert_eq!(status, 400, "{bad}");
        assert!(title(&err).contains("numberOfSpace"));
    }
    assert!(!sim.order(&id).unwrap().assembled);
    let (status, _) = assemble(&sim, &id, json!("50")).await;
    assert_eq!(status, 200);
    let (status, err) = assemble(&sim, &id, json!("2")).await;
    assert_eq!(status, 400);
    assert!(title(&err).contains("already"));

    // Not accepted yet.
    let o = sim.create_order(spec("as-2"));
    let (status, err) = assemble(&sim, &o.id, json!("1")).await;
    assert_eq!(status, 400);
    assert!(title(&err).contains("ACCEPTED_BY_MERCHANT"));
    // Not Kaspi Delivery.
    let mut s = spec("as-3");
    s.is_kaspi_delivery = false;
    s.delivery_mode = "DELIVERY_PICKUP".into();
    let o = sim.create_order(s);
    sim.kaspi_accepts_order(&o.id);
    let (status, err) = assemble(&sim, &o.id, json!("1")).await;
    assert_eq!(status, 400);
    assert!(title(&err).contains("KASPI_DELIVERY"));
    // Courier pickup before assembly is ignored.
    let (id2, _) = accepted_kaspi_order(&sim, "as-4").await;
    sim.courier_picks_up(&id2, 1);
    assert_eq!(sim.order(&id2).unwrap().courier_transmission_date_ms, None);
}

#[tokio::test]
async fn arrived_and_arrived_backward_follow_their_preconditions() {
    let sim = sim().await;
    let mut pre = spec("ar-1");
    pre.pre_order = true;
    let pre = sim.create_order(pre);
    let (status, _) = post(&sim, transition(&pre.id, &pre.code, "ARRIVED")).await;
    assert_eq!(status, 400, "not accepted yet");
    sim.kaspi_accepts_order(&pre.id);
    let (status, _) = post(&sim, transition(&pre.id, &pre.code, "ARRIVED")).await;
    assert_eq!(status, 200);
    let (id, code) = accepted_kaspi_order(&sim, "ar-2").await;
    let (status, err) = post(&sim, transition(&id, &code, "ARRIVED")).await;
    assert_eq!(status, 400);
    assert!(title(&err).contains("pre-order"));

    let (status, _) = post(&sim, transition(&id, &code, "ARRIVED_BACKWARD")).await;
    assert_eq!(status, 400);
    sim.buyer_cancels(&id, "BUYER_CANCELLATION_BY_COURIER");
    let (status, _) = post(&sim, transition(&id, &code, "ARRIVED_BACKWARD")).await;
    assert_eq!(status, 200);
    let (_, body) = get(&sim, &format!("/orders/{id}")).await;
    assert_eq!(
        body["data"]["attributes"]["kaspiDelivery"]["returnedToWarehouse"],
        true
    );
    assert_eq!(
        body["data"]["attributes"]["cancellationReason"],
        "BUYER_CANCELLATION_BY_COURIER"
    );
    assert_eq!(body["data"]["attributes"]["status"], "CANCELLING");
    sim.cancellation_confirmed(&id);
    let c = sim.order(&id).unwrap();
    assert_eq!(
        (c.status.as_str(), c.state.as_str()),
        ("CANCELLED", "ARCHIVE")
    );
}

#[tokio::test]
async fn malformed_and_unknown_transitions_are_refused() {
    let sim = sim().await;
    let o = sim.create_order(spec("mx-1"));
    let cases = [
        json!({ "data": { "id": o.id, "attributes": { "status": "ACCEPTED_BY_MERCHANT" } } }),
        json!({ "data": { "type": "orders", "attributes": { "status": "ACCEPTED_BY_MERCHANT" } } }),
        json!({ "data": { "type": "orders", "id": o.id, "attributes": {} } }),
        json!({ "data": { "type": "orders", "id": o.id, "attributes": { "status": "SHIPPED" } } }),
        json!({ "data": { "type": "orders", "id": o.id, "attributes": { "code": "other", "status": "ACCEPTED_BY_MERCHANT" } } }),
        json!([1, 2]),
    ];
    for body in cases {
        let (status, err) = post(&sim, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert!(!title(&err).is_empty());
    }
    let (status, _) =
        send(api(client().post(format!("{}/orders", sim.base_url()))).body("{not json")).await;
    assert_eq!(status, 400);
    let (status, _) = post(&sim, transition("Tm9wZQ", "x", "ACCEPTED_BY_MERCHANT")).await;
    assert_eq!(status, 404);
    // The documented Content-Type is required on POST.
    let (status, _) = send(
        client()
            .post(format!("{}/orders", sim.base_url()))
            .header("Accept", JSON_API)
            .header("X-Auth-Token", TOKEN)
            .header("Content-Type", "application/json")
            .body(transition(&o.id, &o.code, "ACCEPTED_BY_MERCHANT").to_string()),
    )
    .await;
    assert_eq!(status, 415);
    assert_eq!(sim.order(&o.id).unwrap().status, "APPROVED_BY_BANK");
    // A transition without `code` is fine (optional in the newer doc).
    let (status, _) = post(
        &sim,
        json!({ "data": { "type": "orders", "id": o.id, "attributes": { "status": "ACCEPTED_BY_MERCHANT" } } }),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn handle_actions_move_orders_like_kaspi_and_the_buyer() {
    let sim = sim().await;
    let o = sim.create_order(spec("ha-1"));
    sim.kaspi_completes(&o.id);
    let c = sim.order_by_code("ha-1").unwrap();
    assert_eq!(
        (c.status.as_str(), c.state.as_str()),
        ("COMPLETED", "ARCHIVE")
    );
    assert!(!c.completed_with_code);
    sim.buyer_requests_return(&o.id);
    assert_eq!(
        sim.order(&o.id).unwrap().status,
        "KASPI_DELIVERY_RETURN_REQUESTED"
    );
    sim.returned(&o.id);
    assert_eq!(sim.order(&o.id).unwrap().status, "RETURNED");

    let o2 = sim.create_order(spec("ha-2"));
    sim.set_field(&o2.id, "totalPrice", json!(7000.0));
    sim.set_field(&o2.id, "kaspiDelivery.express", json!(true));
    sim.set_field(&o2.id, "state", json!("SIGN_REQUIRED"));
    let (_, body) = get(&sim, &format!("/orders/{}", o2.id)).await;
    let a = &body["data"]["attributes"];
    assert_eq!(a["totalPrice"], json!(7000.0));
    assert_eq!(a["kaspiDelivery"]["express"], true);
    assert_eq!(a["state"], "SIGN_REQUIRED");
    assert_eq!(a["signatureRequired"], true);
    assert_eq!(sim.order(&o2.id).unwrap().state, "SIGN_REQUIRED");
    assert_eq!(sim.orders().len(), 2);
}

#[tokio::test]
async fn a_steady_fault_hits_every_nth_request_until_lifted() {
    let sim = sim().await;
    let url = list_url("");
    sim.fault_every(KaspiFault::ServerError, 5);
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(get(&sim, &url).await.0);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 2);
    assert_eq!((statuses[4], statuses[9]), (500, 500));
    sim.lift_steady_fault();
    for _ in 0..5 {
        assert_eq!(get(&sim, &url).await.0, 200);
    }
}

#[tokio::test]
async fn injected_faults_answer_instead_of_the_api_then_stop() {
    let sim = sim().await;
    let url = list_url("");

    sim.inject(KaspiFault::ServerError, 1);
    let (status, body) = get(&sim, &url).await;
    assert_eq!(status, 500);
    assert!(body["errors"].is_array());

    sim.inject(KaspiFault::TooManyRequests, 2);
    assert_eq!(get(&sim, &url).await.0, 429);
    assert_eq!(get(&sim, &url).await.0, 429);

    sim.inject(KaspiFault::HtmlForbidden, 1);
    let resp = api(client().get(format!("{}{url}", sim.base_url())))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());

    sim.inject(KaspiFault::ConnectionReset, 1);
    let err = api(client().get(format!("{}{url}", sim.base_url())))
        .send()
        .await;
    assert!(err.is_err(), "{err:?}");
    assert_eq!(sim.count_status(0), 1);

    sim.inject(KaspiFault::Timeout, 1);
    let short = Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let err = api(short.get(format!("{}{url}", sim.base_url())))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout());

    assert_eq!(get(&sim, &url).await.0, 200);
    let log = sim.requests();
    assert_eq!(log.len(), 7);
    assert_eq!(log[6].status, 200);
    assert!(log[6].query.contains("page[size]=20") || log[6].query.contains("page%5Bsize%5D=20"));
    assert!(log[6]
        .headers
        .iter()
        .any(|(k, v)| k == "x-auth-token" && v == TOKEN));
    assert_eq!(log[6].path, "/shop/api/v2/orders");
}

#[tokio::test]
async fn latency_is_added_to_every_answer() {
    let sim = KaspiSim::start(KaspiSimConfig {
        latency: Duration::from_millis(300),
        ..KaspiSimConfig::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    assert_eq!(get(&sim, &list_url("")).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    sim.set_latency(Duration::ZERO);
    let started = Instant::now();
    sim.inject(KaspiFault::ServerError, 1);
    assert_eq!(get(&sim, &list_url("")).await.0, 500);
    assert!(started.elapsed() < Duration::from_millis(300));
    sim.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    sim.inject(KaspiFault::TooManyRequests, 1);
    assert_eq!(get(&sim, &list_url("")).await.0, 429);
    assert!(started.elapsed() >= Duration::from_millis(200));
}
