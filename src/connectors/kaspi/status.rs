//! Derivation of the Kaspi status key from `state`, `status`, `assembled`,
//! `kaspiDelivery.courierTransmissionDate` and `preOrder`: Kaspi has no
//! shipping status of its own, so the sub-stages accepted → assembled → handed
//! to courier are derived. The keys are listed in `config/maps/kaspi.toml`.
//! Values the facts do not know become an explicit unknown key, never a guess.

/// Every status key this connector produces (besides `unknown:…`).
pub const STATUS_KEYS: &[&str] = &[
    "new",
    "sign_required",
    "accepted",
    "preorder_accepted",
    "assembled",
    "handed_to_courier",
    "completed",
    "cancelling",
    "cancelled",
    "return_requested",
    "return_pending",
    "returned",
];

/// Keys after which the order does not change any more.
pub const TERMINAL_KEYS: &[&str] = &["completed", "cancelled", "returned"];

/// The derived key, or `Err(raw)` for a combination the facts do not cover.
pub fn derive(
    state: &str,
    status: &str,
    assembled: bool,
    handed_to_courier: bool,
    pre_order: bool,
) -> Result<&'static str, String> {
    let key = match status {
        "COMPLETED" => "completed",
        "CANCELLED" => "cancelled",
        "CANCELLING" => "cancelling",
        "RETURNED" => "returned",
        "KASPI_DELIVERY_RETURN_REQUESTED" => "return_requested",
        "RETURN_ACCEPTED_BY_MERCHANT" => "return_pending",
        "APPROVED_BY_BANK" => match state {
            "SIGN_REQUIRED" => "sign_required",
            "NEW" | "PICKUP" | "DELIVERY" | "KASPI_DELIVERY" => "new",
            _ => return Err(format!("{state}/{status}")),
        },
        "ACCEPTED_BY_MERCHANT" => match state {
            "SIGN_REQUIRED" => "sign_required",
            "PICKUP" | "DELIVERY" | "KASPI_DELIVERY" => {
                if handed_to_courier {
                    "handed_to_courier"
                } else if assembled {
                    "assembled"
                } else if pre_order {
                    "preorder_accepted"
                } else {
                    "accepted"
                }
            }
            _ => return Err(format!("{state}/{status}")),
        },
        _ => return Err(format!("{state}/{status}")),
    };
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_combination_has_its_key() {
        // (state, status, assembled, courier, preOrder) → key
        let table: &[(&str, &str, bool, bool, bool, &str)] = &[
            ("NEW", "APPROVED_BY_BANK", false, false, false, "new"),
            ("NEW", "APPROVED_BY_BANK", false, false, true, "new"),
            (
                "SIGN_REQUIRED",
                "APPROVED_BY_BANK",
                false,
                false,
                false,
                "sign_required",
            ),
            (
                "SIGN_REQUIRED",
                "ACCEPTED_BY_MERCHANT",
                false,
                false,
                false,
                "sign_required",
            ),
            (
                "KASPI_DELIVERY",
                "APPROVED_BY_BANK",
                false,
                false,
                false,
                "new",
            ),
            (
                "PICKUP",
                "ACCEPTED_BY_MERCHANT",
                false,
                false,
                false,
                "accepted",
            ),
            (
                "DELIVERY",
                "ACCEPTED_BY_MERCHANT",
                false,
                false,
                false,
                "accepted",
            ),
            (
                "KASPI_DELIVERY",
                "ACCEPTED_BY_MERCHANT",
                false,
                false,
                false,
                "accepted",
            ),
            (
                "PICKUP",
                "ACCEPTED_BY_MERCHANT",
                false,
                false,
                true,
                "preorder_accepted",
            ),
            (
                "KASPI_DELIVERY",
                "ACCEPTED_BY_MERCHANT",
                true,
                false,
                false,
                "assembled",
            ),
            (
                "KASPI_DELIVERY",
                "ACCEPTED_BY_MERCHANT",
                true,
                true,
                false,
                "handed_to_courier",
            ),
            (
                "KASPI_DELIVERY",
                "ACCEPTED_BY_MERCHANT",
                false,
                true,
                false,
                "handed_to_courier",
            ),
            ("ARCHIVE", "COMPLETED", true, true, false, "completed"),
            ("PICKUP", "COMPLETED", false, false, false, "completed"),
            (
                "KASPI_DELIVERY",
                "CANCELLING",
                true,
                false,
                false,
                "cancelling",
            ),
            ("ARCHIVE", "CANCELLED", false, false, false, "cancelled"),
            (
                "KASPI_DELIVERY",
                "KASPI_DELIVERY_RETURN_REQUESTED",
                true,
                true,
                false,
                "return_requested",
            ),
            (
                "ARCHIVE",
                "RETURN_ACCEPTED_BY_MERCHANT",
                true,
                true,
                false,
                "return_pending",
            ),
            ("ARCHIVE", "RETURNED", true, true, false, "returned"),
        ];
        for (state, status, assembled, courier, pre, key) in table {
            assert_eq!(
                derive(state, status, *assembled, *courier, *pre),
                Ok(*key),
                "{state}/{status}"
            );
            assert!(STATUS_KEYS.contains(key));
        }
    }

    #[test]
    fn the_shipped_map_documents_and_covers_every_key() {
        let map = include_str!("../../../config/maps/kaspi.toml");
        let table: toml::Table = map.parse().unwrap();
        let statuses = table["statuses"].as_table().unwrap();
        for key in STATUS_KEYS {
            assert!(
                map.contains(&format!("#   {key} ")),
                "{key} is not documented in the map's comments"
            );
            assert!(
                statuses.contains_key(*key),
                "{key} has no row in [statuses]"
            );
        }
        assert_eq!(
            statuses.len(),
            STATUS_KEYS.len(),
            "no row for a key that does not exist"
        );
    }

    #[test]
    fn unknown_values_are_explicit() {
        assert_eq!(
            derive("NEW", "TELEPORTED", false, false, false),
            Err("NEW/TELEPORTED".into())
        );
        assert_eq!(
            derive("ARCHIVE", "ACCEPTED_BY_MERCHANT", false, false, false),
            Err("ARCHIVE/ACCEPTED_BY_MERCHANT".into())
        );
        assert_eq!(
            derive("MOON", "APPROVED_BY_BANK", false, false, false),
            Err("MOON/APPROVED_BY_BANK".into())
        );
    }
}
