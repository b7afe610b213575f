//! Bad input never panics. Every parser of outside data (Kaspi and Avito
//! order list pages, amoCRM's and Avito's webhooks, a partner's JSON lead, the
//! TOML maps admins edit) gets the committed corpus (`tests/corpus/`,
//! `config/maps/`) mutated by proptest, byte-wise (flipped, cut, inserted,
//! repeated) and, for JSON, value-wise (a node swapped for a wrong type, a
//! huge number, a long string), plus arbitrary bytes. Each must return a value
//! or an error; a panic fails the case, which proptest shrinks and saves in
//! `tests/bad_input.regressions`. Inputs stay under 64 KiB, as the HTTP intake caps
//! bodies; a parse may not take more than a few times the input in output.
//! `PROPTEST_CASES` sets the cases per parser (`scripts/prove.sh bad-input
//! --full` runs 20,000).

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use serde_json::Value;

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(Path::new("tests/corpus").join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!seeds.is_empty(), "the corpus of {dir} is empty");
    seeds
}

fn maps() -> Vec<Vec<u8>> {
    ["kaspi", "avito", "buyout"]
        .iter()
        .map(|m| std::fs::read(format!("config/maps/{m}.toml")).unwrap())
        .collect()
}

/// One byte-level edit: (what, where, which byte).
type Edit = (u8, usize, u8);

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(op, at, byte) in edits {
        let len = bytes.len().max(1);
        match op % 4 {
            0 if !bytes.is_empty() => bytes[at % len] = byte,
            1 => bytes.truncate(at % (len + 1)),
            2 => bytes.insert(at % (bytes.len() + 1), byte),
            _ if !bytes.is_empty() => {
                let from = at % len;
                let to = (from + 1 + byte as usize).min(bytes.len());
                let piece = bytes[from..to].to_vec();
                bytes.splice(from..from, piece);
            }
            _ => {}
        }
    }
    bytes.truncate(64 * 1024);
    bytes
}

/// Values that break naive code: wrong types, extremes, long text.
fn nasty(which: u8) -> Value {
    match which % 12 {
        0 => Value::Null,
        1 => Value::Bool(true),
        2 => serde_json::json!(-1),
        3 => serde_json::json!(1e308),
        4 => serde_json::json!(u64::MAX),
        5 => serde_json::json!(i64::MIN),
        6 => Value::String(String::new()),
        7 => Value::String("Ж".repeat(5_000)),
        8 => serde_json::json!([]),
        9 => serde_json::json!({}),
        10 => Value::String("1745691162415".into()),
        _ => serde_json::json!([[[[{"a": [null]}]]]]),
    }
}

/// Every JSON pointer of a value.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                pointers(
                    v,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The seed with some of its nodes swapped for nasty values.
fn swap_values(seed: &[u8], swaps: &[(usize, u8)]) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<Value>(seed) else {
        return seed.to_vec();
    };
    for &(which, with) in swaps {
        let mut all = Vec::new();
        pointers(&value, String::new(), &mut all);
        let pointer = &all[which % all.len()];
        if pointer.is_empty() {
            value = nasty(with);
        } else if let Some(node) = value.pointer_mut(pointer) {
            *node = nasty(with);
        }
    }
    serde_json::to_vec(&value).unwrap()
}

/// A seed's byte-mutated and value-mutated versions, and arbitrary bytes.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    let bytes = seeds.clone();
    let values = seeds;
    prop_oneof![
        (0..n, prop::collection::vec(any::<Edit>(), 0..12))
            .prop_map(move |(i, edits)| apply(&bytes[i], &edits)),
        (
            0..n,
            prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)
        )
            .prop_map(move |(i, swaps)| swap_values(&values[i], &swaps)),
        prop::collection::vec(any::<u8>(), 0..2048),
    ]
}

fn partner_fields() -> BTreeMap<String, String> {
    [
        ("lead_id", "/id"),
        ("status", "/status"),
        ("model", "/device/model"),
        ("memory", "/device/memory"),
        ("colour", "/device/colour"),
        ("condition", "/device/condition"),
        ("defects", "/device/defects"),
        ("buyout_price", "/prices/buyout"),
        ("client_price", "/prices/client"),
        ("seller_name", "/seller/name"),
        ("seller_phone", "/seller/phone"),
        ("city", "/city"),
    ]
    .into_iter()
    .map(|(slot, pointer)| (slot.to_string(), pointer.to_string()))
    .collect()
}

#[test]
fn the_corpus_itself_parses() {
    for seed in corpus("kaspi") {
        let (orders, _) = orderbridge::connectors::kaspi::parse_order_list("shop", &seed).unwrap();
        assert!(!orders.is_empty());
    }
    for seed in corpus("avito") {
        let (orders, _) =
            orderbridge::connectors::avito::parse_orders_page("account", &seed).unwrap();
        assert!(!orders.is_empty());
    }
    for seed in corpus("amocrm_webhook") {
        orderbridge::connectors::amocrm::webhook::parse(&seed).unwrap();
    }
    for seed in corpus("avito_webhook") {
        let delivery = orderbridge::connectors::avito::webhook::parse(&seed).unwrap();
        assert!(matches!(
            delivery,
            orderbridge::connectors::avito::webhook::Delivery::Message(_)
        ));
    }
    let fields = partner_fields();
    for seed in corpus("partner") {
        let value: Value = serde_json::from_slice(&seed).unwrap();
        orderbridge::connectors::partner::read_lead(&fields, &["model".into()], &value).unwrap();
    }
    for seed in maps() {
        let text = String::from_utf8(seed).unwrap();
        assert!(
            orderbridge::mapping::model::parse("map.toml", &text).is_ok()
                || orderbridge::mapping::funnel::parse_funnel("map.toml", &text).is_ok()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn kaspi_order_lists_never_panic(body in inputs(corpus("kaspi"))) {
        if let Ok((orders, _)) = orderbridge::connectors::kaspi::parse_order_list("shop", &body) {
            // One order per listed resource at most.
            prop_assert!(orders.len() <= body.len());
        }
    }

    #[test]
    fn avito_order_pages_never_panic(body in inputs(corpus("avito"))) {
        if let Ok((orders, _)) = orderbridge::connectors::avito::parse_orders_page("account", &body) {
            prop_assert!(orders.len() <= body.len());
        }
    }

    #[test]
    fn amocrm_webhooks_never_panic(body in inputs(corpus("amocrm_webhook"))) {
        let _ = orderbridge::connectors::amocrm::webhook::parse(&body);
    }

    #[test]
    fn avito_webhooks_never_panic(body in inputs(corpus("avito_webhook"))) {
        let _ = orderbridge::connectors::avito::webhook::parse(&body);
    }

    #[test]
    fn partner_leads_never_panic(body in inputs(corpus("partner"))) {
        if let Ok(value) = serde_json::from_slice::<Value>(&body) {
            match orderbridge::connectors::partner::read_lead(
                &partner_fields(),
                &["model".into(), "seller_phone".into()],
                &value,
            ) {
                Ok(lead) => prop_assert!(!lead.lead_id.is_empty()),
                // Every problem is named.
                Err(problems) => prop_assert!(!problems.is_empty()),
            }
        }
    }

    #[test]
    fn maps_never_panic(body in inputs(maps())) {
        let text = String::from_utf8_lossy(&body);
        if let Ok(map) = orderbridge::mapping::model::parse("map.toml", &text) {
            for rules in [
                orderbridge::mapping::MarketplaceRules::kaspi(),
                orderbridge::mapping::MarketplaceRules::avito(),
            ] {
                let _ = orderbridge::mapping::validate("map.toml", &text, &map, &rules);
            }
        }
        if let Ok(funnel) = orderbridge::mapping::funnel::parse_funnel("map.toml", &text) {
            let _ = orderbridge::mapping::funnel::validate_funnel("map.toml", &text, &funnel);
        }
    }
}
