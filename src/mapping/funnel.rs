//! Funnel maps: the CRM pipeline a partner programme's leads (buyout /
//! trade-in requests) go through, e.g. `config/maps/buyout.toml`. Unlike a
//! marketplace map, the stages lead and the partner follows: each stage names
//! the partner status it reports (`report`), its responsible role and its SLA;
//! `[intake]` names the stage a new lead lands in; `[lead.fields]` says which
//! amoCRM lead field each datum of the partner's lead goes into. This module
//! owns the model, offline validation (every problem with file, line and key)
//! and the resolution of names to ids in the live CRM.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::model::{line_of, MapError, PipelineRef, RoleDef};
use super::resolve::{
    find_pipeline, offline_roles, resolve_roles, same, value_text, CrmDirectory, Role,
};
use super::validate::{check_role_and_sla, check_roles, parse_sla, placeholders, MapIssue};

/// A funnel map as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelFile {
    pub pipeline: Spanned<PipelineRef>,
    #[serde(default)]
    pub roles: BTreeMap<Spanned<String>, Spanned<RoleDef>>,
    pub intake: Spanned<IntakeDef>,
    /// Stage name (as admins see it) → what it means.
    pub stages: BTreeMap<Spanned<String>, Spanned<FunnelStageDef>>,
    #[serde(default)]
    pub lead: Option<FunnelLeadDef>,
}

/// Which datum of a partner lead goes into which amoCRM lead field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelLeadDef {
    /// Slot → amoCRM lead custom field (name or id).
    #[serde(default)]
    pub fields: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

/// Where a new partner lead lands, and what it is called.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeDef {
    pub stage: Spanned<String>,
    /// e.g. `"Выкуп: {model} {memory}"`; placeholders: [`FUNNEL_TEMPLATE_FIELDS`].
    pub name: Spanned<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// One stage of the funnel.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelStageDef {
    pub role: Option<Spanned<String>>,
    /// `15m`, `2h`, `1d`, or `end_of_day`.
    pub sla: Option<Spanned<String>>,
    /// The partner status a move into this stage reports; none: nothing is sent.
    pub report: Option<Spanned<String>>,
}

/// What a partner lead carries that a lead field can take.
pub const FUNNEL_FIELD_SLOTS: &[&str] = &[
    "partner_lead_id",
    "model",
    "memory",
    "colour",
    "condition",
    "defects",
    "buyout_price",
    "client_price",
    "city",
    "source",
];

/// Placeholders of the funnel's lead name.
pub const FUNNEL_TEMPLATE_FIELDS: &[&str] = &[
    "model", "memory", "colour", "city", "seller", "lead_id", "source",
];

/// One stage, ready to route by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunnelStage {
    pub name: String,
    pub stage_id: Option<u64>,
    pub role: Option<String>,
    /// `None`: no SLA; `Some(None)`: end of day.
    pub sla: Option<Option<Duration>>,
    pub report: Option<String>,
}

/// A funnel map ready to route by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunnelMap {
    pub file: String,
    pub pipeline: String,
    pub pipeline_id: Option<u64>,
    pub intake_stage: String,
    pub lead_name: String,
    pub tags: Vec<String>,
    pub stages: Vec<FunnelStage>,
    pub roles: BTreeMap<String, Role>,
    /// Slot → (field as written, field id once resolved).
    pub fields: BTreeMap<String, (String, Option<u64>)>,
    /// Every name above has its id.
    pub online: bool,
}

impl FunnelMap {
    /// The intake stage.
    pub fn intake(&self) -> Option<&FunnelStage> {
        self.stage_named(&self.intake_stage)
    }

    pub fn stage_named(&self, name: &str) -> Option<&FunnelStage> {
        self.stages.iter().find(|s| same(&s.name, name))
    }

    /// The stage with this id in the funnel's pipeline.
    pub fn stage_by_id(&self, pipeline_id: u64, stage_id: u64) -> Option<&FunnelStage> {
        (self.pipeline_id == Some(pipeline_id))
            .then(|| self.stages.iter().find(|s| s.stage_id == Some(stage_id)))
            .flatten()
    }

    /// The partner statuses this funnel reports, each once.
    pub fn reported_statuses(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for status in self.stages.iter().filter_map(|s| s.report.clone()) {
            if !all.contains(&status) {
                all.push(status);
            }
        }
        all
    }
}

/// Reads and parses a funnel map file (syntax and shape only).
pub fn load_funnel(path: &Path) -> Result<(FunnelFile, String), MapError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| MapError::Read {
        file: file.clone(),
        error: e.to_string(),
    })?;
    parse_funnel(&file, &text).map(|map| (map, text))
}

pub fn parse_funnel(file: &str, text: &str) -> Result<FunnelFile, MapError> {
    toml::from_str(text).map_err(|e| MapError::Syntax {
        file: file.to_string(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().to_string(),
    })
}

/// Validates a parsed funnel map; empty means valid.
pub fn validate_funnel(file: &str, text: &str, map: &FunnelFile) -> Vec<MapIssue> {
    let mut issues = Vec::new();
    let mut bad = |span: std::ops::Range<usize>, key: String, message: String| {
        issues.push(MapIssue {
            file: file.to_string(),
            line: line_of(text, span.start),
            key,
            message,
        })
    };
    let role_names: Vec<&str> = map.roles.keys().map(|k| k.get_ref().as_str()).collect();
    check_roles(&map.roles, &mut bad);
    let stages = &map.stages;
    if stages.is_empty() {
        let end = text.len().saturating_sub(1);
        bad(
            end..end,
            "stages".into(),
            "names no stage; list every stage of the funnel as [stages.\"<name>\"]".into(),
        );
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (name, stage) in stages {
        let key = format!("stages.\"{}\"", name.get_ref());
        let normal = name.get_ref().trim().to_lowercase();
        if let Some(first) = seen.get(&normal) {
            bad(
                name.span(),
                key.clone(),
                format!(
                    "stage `{}` is already listed at line {first}",
                    name.get_ref()
                ),
            );
        } else {
            seen.insert(normal, line_of(text, name.span().start));
        }
        let s = stage.get_ref();
        check_role_and_sla(&key, s.role.as_ref(), s.sla.as_ref(), &role_names, &mut bad);
        if let Some(report) = &s.report {
            let r = report.get_ref();
            if r.trim().is_empty() || r.chars().any(char::is_whitespace) {
                bad(
                    report.span(),
                    format!("{key}.report"),
                    format!("`{r}` is not a partner status (one word, e.g. `inspected`); leave `report` out to send nothing"),
                );
            }
        }
    }
    let intake = map.intake.get_ref();
    if !stages
        .keys()
        .any(|k| same(k.get_ref(), intake.stage.get_ref()))
    {
        bad(
            intake.stage.span(),
            "intake.stage".into(),
            format!(
                "`{}` is not one of the [stages]; they are: {}",
                intake.stage.get_ref(),
                stages
                    .keys()
                    .map(|k| k.get_ref().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    for placeholder in placeholders(intake.name.get_ref()) {
        if !FUNNEL_TEMPLATE_FIELDS.contains(&placeholder) {
            bad(
                intake.name.span(),
                "intake.name".into(),
                format!(
                    "`{{{placeholder}}}` is not a placeholder; use: {}",
                    FUNNEL_TEMPLATE_FIELDS.join(", ")
                ),
            );
        }
    }
    match &map.lead {
        Some(lead) => {
            let end = text.len().saturating_sub(1);
            let span = lead
                .fields
                .keys()
                .next()
                .map(|k| k.span())
                .unwrap_or(end..end);
            for slot in lead.fields.keys() {
                if !FUNNEL_FIELD_SLOTS.contains(&slot.get_ref().as_str()) {
                    bad(
                        slot.span(),
                        format!("lead.fields.{}", slot.get_ref()),
                        format!(
                            "`{}` is not a partner lead slot; the slots are: {}",
                            slot.get_ref(),
                            FUNNEL_FIELD_SLOTS.join(", ")
                        ),
                    );
                }
            }
            if !lead.fields.keys().any(|k| k.get_ref() == "partner_lead_id") {
                bad(
                    span.clone(),
                    "lead.fields.partner_lead_id".into(),
                    "is required: a lead is found again by the partner's lead id after a crash"
                        .into(),
                );
            }
        }
        None => {
            let end = text.len().saturating_sub(1);
            bad(
                end..end,
                "lead".into(),
                "needs [lead.fields] (at least partner_lead_id)".into(),
            );
        }
    }
    issues.sort_by(|a, b| (a.line, &a.key).cmp(&(b.line, &b.key)));
    issues
}

impl FunnelMap {
    /// The routing of a funnel map that passed offline validation.
    pub fn offline(file: &str, map: &FunnelFile) -> FunnelMap {
        let intake = map.intake.get_ref();
        let lead = map.lead.as_ref();
        FunnelMap {
            file: file.to_string(),
            pipeline: value_text(map.pipeline.get_ref().name.get_ref()),
            pipeline_id: None,
            intake_stage: intake.stage.get_ref().trim().to_string(),
            lead_name: intake.name.get_ref().clone(),
            tags: intake.tags.clone(),
            stages: map
                .stages
                .iter()
                .map(|(name, s)| {
                    let s = s.get_ref();
                    FunnelStage {
                        name: name.get_ref().trim().to_string(),
                        stage_id: None,
                        role: s.role.as_ref().map(|r| r.get_ref().clone()),
                        sla: s.sla.as_ref().and_then(|v| parse_sla(v.get_ref())),
                        report: s.report.as_ref().map(|r| r.get_ref().trim().to_string()),
                    }
                })
                .collect(),
            roles: offline_roles(&map.roles),
            fields: lead
                .map(|l| {
                    l.fields
                        .iter()
                        .map(|(slot, f)| (slot.get_ref().clone(), (value_text(f.get_ref()), None)))
                        .collect()
                })
                .unwrap_or_default(),
            online: false,
        }
    }
}

/// Resolves every name of a (valid) funnel map against the live CRM.
pub fn resolve_funnel(
    file: &str,
    text: &str,
    map: &FunnelFile,
    crm: &CrmDirectory,
) -> Result<FunnelMap, Vec<MapIssue>> {
    let mut routing = FunnelMap::offline(file, map);
    let mut issues = Vec::new();
    let mut bad = |span: std::ops::Range<usize>, key: String, message: String| {
        issues.push(MapIssue {
            file: file.to_string(),
            line: line_of(text, span.start),
            key,
            message,
        })
    };
    let Some(pipeline) = find_pipeline(&map.pipeline, crm, &mut bad) else {
        return Err(issues);
    };
    routing.pipeline_id = Some(pipeline.id);
    for name in map.stages.keys() {
        let found = pipeline.stages.iter().find(|s| {
            same(&s.name, name.get_ref()) || name.get_ref().trim().parse::<u64>().ok() == Some(s.id)
        });
        match found {
            Some(stage) => {
                if let Some(r) = routing
                    .stages
                    .iter_mut()
                    .find(|s| same(&s.name, name.get_ref()))
                {
                    r.stage_id = Some(stage.id);
                }
            }
            None => bad(
                name.span(),
                format!("stages.\"{}\"", name.get_ref()),
                format!(
                    "pipeline `{}` has no stage `{}`; its stages are: {}",
                    pipeline.name,
                    name.get_ref().trim(),
                    pipeline
                        .stages
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }
    resolve_roles(&map.roles, crm, &mut routing.roles, &mut bad);
    if let Some(lead) = &map.lead {
        for (slot, field) in &lead.fields {
            let wanted = field.get_ref();
            let found = crm.lead_fields.iter().find(|f| match wanted {
                toml::Value::Integer(id) => f.id == *id as u64,
                other => same(&f.name, &value_text(other)),
            });
            match found {
                Some(f) if matches!(f.field_type.as_str(), "select" | "multiselect" | "radiobutton") => bad(
                    field.span(),
                    format!("lead.fields.{}", slot.get_ref()),
                    format!("field `{}` is a {} in amoCRM, but partner values are written as they are; use a text or numeric field", f.name, f.field_type),
                ),
                Some(f) => {
                    if let Some(entry) = routing.fields.get_mut(slot.get_ref()) {
                        entry.1 = Some(f.id);
                    }
                }
                None => bad(
                    field.span(),
                    format!("lead.fields.{}", slot.get_ref()),
                    format!(
                        "the CRM has no lead field `{}`; its lead fields are: {}",
                        value_text(wanted),
                        crm.lead_fields
                            .iter()
                            .map(|f| f.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            }
        }
    }
    if issues.is_empty() {
        routing.online = true;
        Ok(routing)
    } else {
        issues.sort_by(|a, b| (a.line, &a.key).cmp(&(b.line, &b.key)));
        Err(issues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[pipeline]
name = "Выкуп"
[roles.buyer]
users = ["Закупщик"]
[intake]
stage = "Новая заявка"
name = "Выкуп: {model} {memory}"
[stages."Новая заявка"]
role = "buyer"
sla = "30m"
report = "accepted"
[stages."Продано"]
report = "sold"
[stages."Без отчёта"]
[lead.fields]
partner_lead_id = "ID партнёра"
model = "Модель"
"#;

    fn issues(text: &str) -> Vec<MapIssue> {
        match parse_funnel("buyout.toml", text) {
            Ok(map) => validate_funnel("buyout.toml", text, &map),
            Err(e) => vec![MapIssue {
                file: "buyout.toml".into(),
                line: 0,
                key: "syntax".into(),
                message: e.to_string(),
            }],
        }
    }

    #[test]
    fn a_good_funnel_validates_and_routes() {
        assert_eq!(issues(GOOD), vec![]);
        let map = parse_funnel("b", GOOD).expect("parses");
        let routing = FunnelMap::offline("b", &map);
        assert_eq!(
            routing.intake().map(|s| s.name.as_str()),
            Some("Новая заявка")
        );
        assert_eq!(routing.reported_statuses(), vec!["accepted", "sold"]);
        assert_eq!(
            routing
                .stage_named("продано")
                .and_then(|s| s.report.as_deref()),
            Some("sold")
        );
    }

    #[test]
    fn the_shipped_buyout_map_is_valid_with_fifteen_stages() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/maps/buyout.toml");
        let (map, text) = load_funnel(&path).expect("parses");
        assert_eq!(validate_funnel("buyout.toml", &text, &map), vec![]);
        let routing = FunnelMap::offline("buyout.toml", &map);
        assert_eq!(routing.stages.len(), 15);
        assert!(routing.stages.iter().all(|s| s.role.is_some()));
        assert_eq!(
            routing.stages.iter().filter(|s| s.report.is_none()).count(),
            1
        );
        assert_eq!(routing.reported_statuses().len(), 14);
    }

    #[test]
    fn every_mistake_is_named_with_its_line_and_key() {
        let text = GOOD
            .replace("stage = \"Новая заявка\"", "stage = \"Новая\"")
            .replace("sla = \"30m\"", "sla = \"soon\"")
            .replace("report = \"sold\"", "report = \"sold out\"")
            .replace("role = \"buyer\"", "role = \"seller\"")
            .replace("{memory}", "{price}")
            .replace("partner_lead_id = ", "partner_id = ");
        let found = issues(&text);
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        for key in [
            "intake.stage",
            "stages.\"Новая заявка\".sla",
            "stages.\"Продано\".report",
            "stages.\"Новая заявка\".role",
            "intake.name",
            "lead.fields.partner_id",
            "lead.fields.partner_lead_id",
        ] {
            assert!(keys.contains(&key), "{key} not in {found:#?}");
        }
        assert!(found.iter().all(|i| i.line > 0), "{found:#?}");
        let line_of_sla = found
            .iter()
            .find(|i| i.key.ends_with(".sla"))
            .map(|i| i.line);
        assert_eq!(line_of_sla, Some(11));
    }
}
