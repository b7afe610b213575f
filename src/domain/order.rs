//! A marketplace order as the rest of the bridge sees it, whatever marketplace
//! it came from: identity, derived status key, money, customer, delivery, items.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::contact::{Email, Phone};

/// The marketplaces orderbridge knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Marketplace {
    Kaspi,
    Avito,
}

impl Marketplace {
    pub fn as_str(&self) -> &'static str {
        match self {
            Marketplace::Kaspi => "kaspi",
            Marketplace::Avito => "avito",
        }
    }
}

/// An amount in minor units (tiyn, kopecks) of the marketplace's currency.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Money(pub i64);

impl Money {
    /// From a major-unit amount that may arrive as an integer or a float
    /// (`4000`, `4000.0`, `5990.5`); rounded to the minor unit.
    pub fn from_major(amount: f64) -> Option<Money> {
        if !amount.is_finite() || amount.abs() > 1e15 {
            return None;
        }
        Some(Money((amount * 100.0).round() as i64))
    }

    /// Whole major units, rounded (amoCRM's `price` is an integer).
    pub fn major_rounded(&self) -> i64 {
        (self.0 as f64 / 100.0).round() as i64
    }
}

/// A connector's status key (e.g. `accepted`, `handed_to_courier`), as listed in
/// the marketplace's map. Unknown combinations carry their raw values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StatusKey(pub String);

impl StatusKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StatusKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Customer {
    pub name: Option<String>,
    /// Normalised; `None` when the marketplace sent none or it did not parse.
    #[serde(with = "phone_serde")]
    pub phone: Option<Phone>,
    /// Normalised (lower-cased); no marketplace of today sends one, a partner
    /// source may. A buyer with an email and no phone is matched by it.
    #[serde(default, with = "email_serde")]
    pub email: Option<Email>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Delivery {
    /// The marketplace's delivery mode (e.g. `DELIVERY_REGIONAL_TODOOR`).
    pub mode: Option<String>,
    /// Delivered by the marketplace's own service (Kaspi Доставка).
    pub by_marketplace: bool,
    pub address: Option<String>,
    pub planned_date: Option<DateTime<Utc>>,
    pub waybill_number: Option<String>,
    /// When the courier took the parcel.
    pub handed_to_courier_at: Option<DateTime<Utc>>,
    pub cost: Option<Money>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderItem {
    /// The merchant's SKU.
    pub sku: Option<String>,
    pub name: String,
    pub quantity: f64,
    pub unit_price: Money,
    pub total: Money,
}

/// A marketplace order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub marketplace: Marketplace,
    /// The shop (marketplace account) name in config.
    pub account: String,
    /// The marketplace's opaque id.
    pub external_id: String,
    /// The number people see.
    pub code: String,
    pub status: StatusKey,
    /// Terminal: completed, cancelled or returned; no further change expected.
    pub is_terminal: bool,
    pub raw_state: Option<String>,
    pub raw_status: Option<String>,
    pub created_at: DateTime<Utc>,
    pub total: Money,
    pub customer: Customer,
    pub delivery: Delivery,
    pub payment_mode: Option<String>,
    pub pre_order: bool,
    pub cancellation_reason: Option<String>,
    /// Empty until the lines were read.
    pub items: Vec<OrderItem>,
    /// The marketplace's own deadline for the order's current status (Avito:
    /// `confirmTill` while on confirmation, `shipTill` while ready to ship):
    /// it tightens the stage's SLA when earlier.
    #[serde(default)]
    pub marketplace_deadline: Option<DateTime<Utc>>,
    /// What the marketplace keeps of the order (Avito's `prices.commission`);
    /// settled weekly (`orderbridge settle`).
    #[serde(default)]
    pub commission: Option<Money>,
}

mod email_serde {
    use super::Email;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(email: &Option<Email>, s: S) -> Result<S::Ok, S::Error> {
        match email {
            Some(e) => s.serialize_some(e.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Email>, D::Error> {
        let raw: Option<String> = Option::deserialize(d)?;
        Ok(raw.and_then(|r| Email::parse(&r)))
    }
}

/// An optional phone as its E.164 text (`#[serde(with = …)]`).
pub mod phone_serde {
    use super::Phone;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(phone: &Option<Phone>, s: S) -> Result<S::Ok, S::Error> {
        match phone {
            Some(p) => s.serialize_some(p.as_e164()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Phone>, D::Error> {
        let raw: Option<String> = Option::deserialize(d)?;
        Ok(raw.and_then(|r| Phone::parse(&r).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_accepts_integers_and_floats() {
        assert_eq!(Money::from_major(4000.0), Some(Money(400_000)));
        assert_eq!(Money::from_major(5990.5), Some(Money(599_050)));
        assert_eq!(Money::from_major(f64::NAN), None);
        assert_eq!(Money(599_050).major_rounded(), 5991);
    }
}
