//! Offline validation of a map: every status key mapped exactly once (or
//! explicitly ignored), no unknown key, known roles, good durations, actions
//! the marketplace has with their required parameters, no stage bound to two
//! actions. Every problem is reported, each with file, line and key, and what
//! would be valid.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use toml::Spanned;

use super::model::{line_of, MapFile};

/// One thing wrong with a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapIssue {
    pub file: String,
    pub line: usize,
    /// Dotted key, e.g. `statuses.accepted.sla`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for MapIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: `{}`: {}",
            self.file, self.line, self.key, self.message
        )
    }
}

/// An action a marketplace has, and the parameters it needs.
#[derive(Debug, Clone, Copy)]
pub struct ActionRule {
    pub name: &'static str,
    /// Allowed values of `reason`; `Some` means the reason is required.
    pub reasons: Option<&'static [&'static str]>,
    /// Takes `spaces` (1–50).
    pub takes_spaces: bool,
    /// A `[lead.fields]` slot the action cannot work without.
    pub needs_field: Option<&'static str>,
}

/// What a marketplace's maps may contain.
#[derive(Debug, Clone, Copy)]
pub struct MarketplaceRules {
    pub name: &'static str,
    pub status_keys: &'static [&'static str],
    pub actions: &'static [ActionRule],
}

const KASPI_ACTIONS: &[ActionRule] = &[
    ActionRule {
        name: "accept",
        reasons: None,
        takes_spaces: false,
        needs_field: None,
    },
    ActionRule {
        name: "assemble",
        reasons: None,
        takes_spaces: true,
        needs_field: None,
    },
    ActionRule {
        name: "complete",
        reasons: None,
        takes_spaces: false,
        needs_field: Some("completion_code"),
    },
    ActionRule {
        name: "cancel",
        reasons: Some(&[
            "BUYER_CANCELLATION_BY_MERCHANT",
            "BUYER_NOT_REACHABLE",
            "MERCHANT_OUT_OF_STOCK",
        ]),
        takes_spaces: false,
        needs_field: None,
    },
];

const AVITO_ACTIONS: &[ActionRule] = &[
    ActionRule {
        name: "confirm",
        reasons: None,
        takes_spaces: false,
        needs_field: None,
    },
    ActionRule {
        name: "reject",
        reasons: None,
        takes_spaces: false,
        needs_field: None,
    },
    ActionRule {
        name: "perform",
        reasons: None,
        takes_spaces: false,
        needs_field: None,
    },
    ActionRule {
        name: "receive",
        reasons: None,
        takes_spaces: false,
        needs_field: None,
    },
];

impl MarketplaceRules {
    pub fn kaspi() -> Self {
        MarketplaceRules {
            name: "Kaspi",
            status_keys: crate::connectors::kaspi::status::STATUS_KEYS,
            actions: KASPI_ACTIONS,
        }
    }

    pub fn avito() -> Self {
        MarketplaceRules {
            name: "Avito",
            status_keys: crate::connectors::avito::STATUS_KEYS,
            actions: AVITO_ACTIONS,
        }
    }
}

/// Parses an SLA: a duration like `15m`, `2h`, `1d`, or `end_of_day`.
pub fn parse_sla(value: &str) -> Option<Option<Duration>> {
    if value.trim() == "end_of_day" {
        return Some(None);
    }
    humantime::parse_duration(value.trim())
        .ok()
        .filter(|d| !d.is_zero())
        .map(Some)
}

const PICKS: &[&str] = &["round_robin", "least_loaded"];

/// Order data a lead field can carry.
pub const FIELD_SLOTS: &[&str] = &[
    "order_code",
    "items",
    "total",
    "delivery_mode",
    "delivery_address",
    "planned_date",
    "payment_mode",
    "item_title",
    "item_url",
    "item_price",
    // Not order data: the field the manager types Kaspi's completion code into.
    "completion_code",
];

/// Placeholders of the lead name template.
pub const TEMPLATE_FIELDS: &[&str] = &["code", "total", "customer", "marketplace", "shop"];

/// Placeholders of the messenger lead name template.
pub const MESSENGER_FIELDS: &[&str] = &["item", "buyer", "shop"];

/// The `{placeholders}` of a template.
pub fn placeholders(template: &str) -> Vec<&str> {
    template
        .split('{')
        .skip(1)
        .filter_map(|part| part.split_once('}').map(|(name, _)| name.trim()))
        .collect()
}

/// Checks a map's `[roles]`: each names users and a known pick rule.
pub(super) fn check_roles(
    roles: &super::resolve::Roles,
    bad: &mut impl FnMut(std::ops::Range<usize>, String, String),
) {
    for (name, role) in roles {
        let key = format!("roles.{}", name.get_ref());
        if role.get_ref().users.get_ref().is_empty() {
            bad(
                role.get_ref().users.span(),
                format!("{key}.users"),
                "names no user; list the amoCRM users (names or ids) who may be responsible".into(),
            );
        }
        if let Some(pick) = &role.get_ref().pick {
            if !PICKS.contains(&pick.get_ref().as_str()) {
                bad(
                    pick.span(),
                    format!("{key}.pick"),
                    format!(
                        "`{}` is not a rule; use one of: {}",
                        pick.get_ref(),
                        PICKS.join(", ")
                    ),
                );
            }
        }
    }
}

/// Checks a row's `role` (one of `role_names`) and `sla` (a duration).
pub(super) fn check_role_and_sla(
    key: &str,
    role: Option<&Spanned<String>>,
    sla: Option<&Spanned<String>>,
    role_names: &[&str],
    bad: &mut impl FnMut(std::ops::Range<usize>, String, String),
) {
    if let Some(role) = role {
        if !role_names.contains(&role.get_ref().as_str()) {
            bad(
                role.span(),
                format!("{key}.role"),
                format!(
                    "no role `{}` is defined; defined roles: {}",
                    role.get_ref(),
                    if role_names.is_empty() {
                        "none".to_string()
                    } else {
                        role_names.join(", ")
                    }
                ),
            );
        }
    }
    if let Some(sla) = sla {
        if parse_sla(sla.get_ref()).is_none() {
            bad(
                sla.span(),
                format!("{key}.sla"),
                format!(
                    "`{}` is not a duration; write e.g. 15m, 2h, 1d, or end_of_day",
                    sla.get_ref()
                ),
            );
        }
    }
}

/// Validates a parsed map; empty means valid.
pub fn validate(file: &str, text: &str, map: &MapFile, rules: &MarketplaceRules) -> Vec<MapIssue> {
    let mut issues = Vec::new();
    let mut bad = |span: std::ops::Range<usize>, key: String, message: String| {
        issues.push(MapIssue {
            file: file.to_string(),
            line: line_of(text, span.start),
            key,
            message,
        });
    };
    let role_names: Vec<&str> = map.roles.keys().map(|k| k.get_ref().as_str()).collect();

    check_roles(&map.roles, &mut bad);

    // Status rows.
    for (status, row) in &map.statuses {
        let name = status.get_ref();
        let key = format!("statuses.{name}");
        if !rules.status_keys.contains(&name.as_str()) {
            bad(
                status.span(),
                key.clone(),
                format!(
                    "{} has no status key `{name}`; its keys are: {}",
                    rules.name,
                    rules.status_keys.join(", ")
                ),
            );
            continue;
        }
        let r = row.get_ref();
        match (&r.stage, r.ignore) {
            (Some(stage), true) => bad(
                stage.span(),
                format!("{key}.stage"),
                "a status is either mapped to a stage or `ignore = true`, not both".into(),
            ),
            (None, false) => bad(
                row.span(),
                key.clone(),
                "needs a `stage` (the CRM stage this status goes to), or `ignore = true`".into(),
            ),
            _ => {}
        }
        check_role_and_sla(&key, r.role.as_ref(), r.sla.as_ref(), &role_names, &mut bad);
    }
    // Every status key exactly once (a missing one is a hole in the map).
    let end = text.len().saturating_sub(1);
    for status in rules.status_keys {
        if !map.statuses.keys().any(|k| k.get_ref() == status) {
            bad(end..end, format!("statuses.{status}"), format!("{} status `{status}` is not mapped; add `[statuses.{status}]` with a `stage`, or `ignore = true`", rules.name));
        }
    }

    // Actions: one per stage, of this marketplace, with their parameters.
    let mut stages: BTreeMap<String, &Spanned<String>> = BTreeMap::new();
    let action_names: Vec<&str> = rules.actions.iter().map(|a| a.name).collect();
    for (stage, row) in &map.actions {
        let key = format!("actions.\"{}\"", stage.get_ref());
        let normal = stage.get_ref().trim().to_lowercase();
        if let Some(first) = stages.get(&normal) {
            bad(stage.span(), key.clone(), format!("stage `{}` is already bound to an action at line {}; a stage stands for one action", stage.get_ref().trim(), line_of(text, first.span().start)));
        } else {
            stages.insert(normal, stage);
        }
        let r = row.get_ref();
        let Some(rule) = rules.actions.iter().find(|a| a.name == r.action.get_ref()) else {
            bad(
                r.action.span(),
                format!("{key}.action"),
                format!(
                    "{} has no action `{}`; it has: {}",
                    rules.name,
                    r.action.get_ref(),
                    action_names.join(", ")
                ),
            );
            continue;
        };
        match (rule.reasons, &r.reason) {
            (Some(reasons), None) => bad(
                row.span(),
                format!("{key}.reason"),
                format!(
                    "`{}` needs a `reason`, one of: {}",
                    rule.name,
                    reasons.join(", ")
                ),
            ),
            (Some(reasons), Some(reason)) if !reasons.contains(&reason.get_ref().as_str()) => bad(
                reason.span(),
                format!("{key}.reason"),
                format!(
                    "`{}` is not a reason {} accepts; use one of: {}",
                    reason.get_ref(),
                    rules.name,
                    reasons.join(", ")
                ),
            ),
            (None, Some(reason)) => bad(
                reason.span(),
                format!("{key}.reason"),
                format!("`{}` takes no reason", rule.name),
            ),
            _ => {}
        }
        if let Some(comment) = &r.comment {
            if comment.get_ref().chars().count() > 1000 {
                bad(
                    comment.span(),
                    format!("{key}.comment"),
                    "is longer than the 1000 characters Kaspi accepts".into(),
                );
            }
        }
        if let Some(slot) = rule.needs_field {
            let has = map
                .lead
                .as_ref()
                .is_some_and(|l| l.get_ref().fields.keys().any(|f| f.get_ref() == slot));
            if !has {
                bad(
                    r.action.span(),
                    format!("{key}.action"),
                    format!("`{}` needs the lead field the manager types the buyer's code into: add `{slot} = \"<field name>\"` under [lead.fields]", rule.name),
                );
            }
        }
        if let Some(spaces) = &r.spaces {
            if !rule.takes_spaces {
                bad(
                    spaces.span(),
                    format!("{key}.spaces"),
                    format!("`{}` takes no `spaces`", rule.name),
                );
            } else if !(1..=50).contains(spaces.get_ref()) {
                bad(
                    spaces.span(),
                    format!("{key}.spaces"),
                    format!("{} parcels is outside 1–50", spaces.get_ref()),
                );
            }
        }
    }
    // The lead: template placeholders, field slots, enum slots.
    if let Some(lead) = &map.lead {
        let lead = lead.get_ref();
        for name in placeholders(lead.name.get_ref()) {
            if !TEMPLATE_FIELDS.contains(&name) {
                bad(
                    lead.name.span(),
                    "lead.name".into(),
                    format!(
                        "`{{{name}}}` is not a placeholder; use: {}",
                        TEMPLATE_FIELDS
                            .iter()
                            .map(|f| format!("{{{f}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
        for slot in lead.fields.keys().chain(lead.enums.keys()) {
            if !FIELD_SLOTS.contains(&slot.get_ref().as_str()) {
                bad(
                    slot.span(),
                    format!("lead.fields.{}", slot.get_ref()),
                    format!(
                        "`{}` is not order data the bridge has; use: {}",
                        slot.get_ref(),
                        FIELD_SLOTS.join(", ")
                    ),
                );
            }
        }
        if !lead.fields.keys().any(|f| f.get_ref() == "order_code") {
            bad(
                lead.name.span(),
                "lead.fields.order_code".into(),
                "is required: the bridge finds a lead again by the order code in this field after a crash (add `order_code = \"<field name>\"` under [lead.fields])".into(),
            );
        }
        for slot in lead.enums.keys() {
            if !lead.fields.keys().any(|f| f.get_ref() == slot.get_ref()) {
                bad(
                    slot.span(),
                    format!("lead.enums.{}", slot.get_ref()),
                    "has option labels but no field in [lead.fields] to put them in".into(),
                );
            }
        }
    }
    // Messenger leads: Avito only; known placeholders.
    if let Some(messenger) = &map.messenger {
        if rules.name != "Avito" {
            bad(
                messenger.span(),
                "messenger".into(),
                format!(
                    "{} has no messenger; only Avito maps take a [messenger] section",
                    rules.name
                ),
            );
        }
        let m = messenger.get_ref();
        for name in placeholders(m.name.get_ref()) {
            if !MESSENGER_FIELDS.contains(&name) {
                bad(
                    m.name.span(),
                    "messenger.name".into(),
                    format!(
                        "`{{{name}}}` is not a placeholder; use: {}",
                        MESSENGER_FIELDS
                            .iter()
                            .map(|f| format!("{{{f}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
    }
    issues.sort_by(|a, b| (a.line, &a.key).cmp(&(b.line, &b.key)));
    issues
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::model::parse;
    use proptest::prelude::*;

    const KASPI: &str = include_str!("../../config/maps/kaspi.toml");
    const AVITO: &str = include_str!("../../config/maps/avito.toml");

    fn check(text: &str) -> Vec<MapIssue> {
        let map = parse("kaspi.toml", text).unwrap();
        validate("kaspi.toml", text, &map, &MarketplaceRules::kaspi())
    }

    #[test]
    fn the_shipped_maps_are_valid() {
        assert_eq!(check(KASPI), vec![]);
        let map = parse("avito.toml", AVITO).unwrap();
        assert_eq!(
            validate("avito.toml", AVITO, &map, &MarketplaceRules::avito()),
            vec![]
        );
    }

    /// The shipped Kaspi map with one line replaced.
    fn edited(find: &str, replace: &str) -> String {
        assert!(KASPI.contains(find), "the shipped map has no `{find}`");
        KASPI.replacen(find, replace, 1)
    }

    fn line_with(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn each_error_names_file_line_and_key_and_what_is_valid() {
        // (edit, expected key, words the message must contain)
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "[statuses.accepted]",
                "[statuses.acepted]",
                "statuses.acepted",
                &["no status key `acepted`", "accepted"],
            ),
            (
                "sla = \"2h\"",
                "sla = \"2 hours-ish\"",
                "statuses.accepted.sla",
                &["not a duration", "15m"],
            ),
            (
                "role = \"warehouse\"",
                "role = \"wearhouse\"",
                "statuses.accepted.role",
                &["no role `wearhouse`", "warehouse"],
            ),
            (
                "action = \"accept\"",
                "action = \"teleport\"",
                "actions.\"В работе / Сборка\".action",
                &["no action `teleport`", "accept, assemble, complete, cancel"],
            ),
            (
                "reason = \"MERCHANT_OUT_OF_STOCK\"",
                "reason = \"BORED\"",
                "actions.\"Закрыто и не реализовано\".reason",
                &["BORED", "MERCHANT_OUT_OF_STOCK"],
            ),
            (
                "pick = \"round_robin\"",
                "pick = \"random\"",
                "roles.sales_manager.pick",
                &["round_robin, least_loaded"],
            ),
        ];
        for (find, replace, key, words) in cases {
            let text = edited(find, replace);
            let issues = check(&text);
            let issue = issues
                .iter()
                .find(|i| i.key == *key)
                .unwrap_or_else(|| panic!("no issue for {key}: {issues:?}"));
            assert_eq!(issue.file, "kaspi.toml");
            assert_eq!(issue.line, line_with(&text, replace), "{issue}");
            for word in *words {
                assert!(issue.message.contains(word), "{issue} lacks {word}");
            }
        }
    }

    #[test]
    fn an_unmapped_status_and_a_missing_reason_are_reported_together() {
        let text = edited("[statuses.returned]", "[statuses.retuned]").replacen(
            "reason = \"MERCHANT_OUT_OF_STOCK\"\n",
            "",
            1,
        );
        let keys: Vec<String> = check(&text).into_iter().map(|i| i.key).collect();
        for expected in [
            "statuses.retuned",
            "statuses.returned",
            "actions.\"Закрыто и не реализовано\".reason",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "{expected} missing from {keys:?}"
            );
        }
    }

    #[test]
    fn kaspi_completion_needs_the_code_field() {
        let text = edited("completion_code = \"Код выдачи\"\n", "");
        let issues = check(&text);
        let issue = issues
            .iter()
            .find(|i| i.key == "actions.\"Успешно реализовано\".action")
            .unwrap_or_else(|| panic!("no completion-code issue in {issues:?}"));
        assert!(issue.message.contains("completion_code"), "{issue:?}");
    }

    #[test]
    fn a_stage_bound_to_two_actions_and_a_duplicate_key_are_refused() {
        let text = format!("{KASPI}\n[actions.\" готов к отгрузке \"]\naction = \"accept\"\n");
        let issues = check(&text);
        assert!(
            issues
                .iter()
                .any(|i| i.message.contains("already bound to an action")),
            "{issues:?}"
        );
        let twice = format!("{KASPI}\n[statuses.new]\nstage = \"Новая заявка\"\n");
        let error = parse("kaspi.toml", &twice).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("kaspi.toml:") && text.contains("duplicate"),
            "{text}"
        );
    }

    fn status_rows() -> Vec<&'static str> {
        crate::connectors::kaspi::status::STATUS_KEYS.to_vec()
    }

    proptest! {
        /// Deleting any status rows, stages or roles never yields a map that is
        /// accepted with a hole: every deletion is either harmless or reported.
        #[test]
        fn deletions_never_leave_an_accepted_hole(rows in proptest::collection::vec(any::<bool>(), 12), stages in proptest::collection::vec(any::<bool>(), 12)) {
            let mut table: toml::Table = KASPI.parse().unwrap();
            let statuses = table.get_mut("statuses").and_then(|s| s.as_table_mut()).unwrap();
            let mut holes = 0;
            for (i, key) in status_rows().iter().enumerate() {
                if rows[i] {
                    statuses.remove(*key);
                    holes += 1;
                } else if stages[i] {
                    if let Some(row) = statuses.get_mut(*key).and_then(|r| r.as_table_mut()) {
                        if row.remove("stage").is_some() && !row.contains_key("ignore") {
                            holes += 1;
                        }
                    }
                }
            }
            let text = toml::to_string(&table).unwrap();
            let issues = check(&text);
            if holes > 0 {
                prop_assert!(!issues.is_empty(), "a map with {} holes was accepted", holes);
            }
        }
    }
}
