//! Avito API wire types, private to the connector. Parsing is lenient: open
//! enums, nullable blocks, the spec's Cyrillic "х" in `deliveryDateMaх`.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub(super) struct TokenWire {
    pub access_token: String,
    #[serde(default)]
    pub expires_in: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct OrdersPage {
    #[serde(default)]
    pub orders: Vec<OrderWire>,
    #[serde(rename = "hasMore", default)]
    pub has_more: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct OrderWire {
    pub id: String,
    #[serde(rename = "marketplaceId", default)]
    pub marketplace_id: Option<String>,
    #[serde(default)]
    pub status: String,
    #[serde(rename = "createdAt", default)]
    pub created_at: Option<String>,
    #[serde(rename = "updatedAt", default)]
    pub updated_at: Option<String>,
    #[serde(rename = "availableActions", default)]
    pub available_actions: Option<Vec<ActionWire>>,
    #[serde(default)]
    pub items: Vec<ItemWire>,
    #[serde(default)]
    pub prices: Option<PricesWire>,
    #[serde(default)]
    pub delivery: Option<DeliveryWire>,
    #[serde(default)]
    pub schedules: Option<SchedulesWire>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct ActionWire {
    pub name: String,
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct ItemWire {
    #[serde(rename = "avitoId", default)]
    pub avito_id: Option<Value>,
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub count: Option<f64>,
    #[serde(default)]
    pub prices: Option<ItemPricesWire>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct ItemPricesWire {
    #[serde(default)]
    pub price: Option<f64>,
    #[serde(default)]
    pub total: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct PricesWire {
    #[serde(default)]
    pub price: Option<f64>,
    #[serde(default)]
    pub commission: Option<f64>,
    #[serde(default)]
    pub delivery: Option<f64>,
    #[serde(default)]
    pub total: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct DeliveryWire {
    #[serde(rename = "serviceName", default)]
    pub service_name: Option<String>,
    #[serde(rename = "serviceType", default)]
    pub service_type: Option<String>,
    #[serde(rename = "trackingNumber", default)]
    pub tracking_number: Option<String>,
    #[serde(rename = "buyerInfo", default)]
    pub buyer_info: Option<BuyerWire>,
    #[serde(rename = "courierInfo", default)]
    pub courier_info: Option<AddressWire>,
    #[serde(rename = "terminalInfo", default)]
    pub terminal_info: Option<AddressWire>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct BuyerWire {
    #[serde(rename = "fullName", default)]
    pub full_name: Option<String>,
    #[serde(rename = "phoneNumber", default)]
    pub phone_number: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct AddressWire {
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct SchedulesWire {
    #[serde(rename = "confirmTill", default)]
    pub confirm_till: Option<String>,
    #[serde(rename = "shipTill", default)]
    pub ship_till: Option<String>,
    #[serde(rename = "deliveryDate", default)]
    pub delivery_date: Option<String>,
    /// The spec spells this key with a Cyrillic "х"; the Latin spelling is accepted too.
    #[serde(rename = "deliveryDateMaх", alias = "deliveryDateMax", default)]
    pub delivery_date_max: Option<String>,
}

/// `{success: bool}`; an empty body counts as success (seen in the wild).
#[derive(Debug, Deserialize)]
pub(super) struct SuccessWire {
    #[serde(default = "yes")]
    pub success: bool,
    #[serde(default)]
    pub error: Option<BusinessErrorWire>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
pub(super) struct BusinessErrorWire {
    #[serde(default)]
    pub code: Option<Value>,
    #[serde(default)]
    pub message: Option<String>,
}

/// Flat `{code, message}` (order management) or wrapped `{error: {code, message}}`.
pub(super) fn error_message(body: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return String::from_utf8_lossy(body).chars().take(200).collect();
    };
    let inner = value
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or(&value);
    inner
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            value
                .get("error_description")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .or_else(|| {
            value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| value.to_string().chars().take(200).collect())
}

#[derive(Debug, Deserialize)]
pub(super) struct SelfWire {
    pub id: u64,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatsWire {
    #[serde(default)]
    pub chats: Vec<ChatWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatWire {
    pub id: String,
    #[serde(default)]
    pub context: Option<Value>,
    #[serde(default)]
    pub users: Vec<Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct MessageWire {
    pub id: String,
    #[serde(default)]
    pub author_id: u64,
    #[serde(default)]
    pub created: i64,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Deserialize)]
pub(super) struct SubscriptionsWire {
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionWire>,
}

#[derive(Debug, Deserialize)]
pub(super) struct SubscriptionWire {
    pub url: String,
}
