//! A validated map turned into routing: offline with names as admins wrote
//! them, and (online) with every pipeline, stage, user, custom field and enum
//! option resolved to its id in the live CRM. Online problems are reported
//! like offline ones: file, line, key, and what the CRM does have.

use std::collections::BTreeMap;
use std::time::Duration;

use super::model::{line_of, MapFile};
use super::validate::{parse_sla, MapIssue};
use crate::connectors::amocrm::{CustomField, Pipeline, User};

/// Where a status key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Stage {
        stage: String,
        /// The stage's id in the CRM, once resolved online.
        stage_id: Option<u64>,
        role: Option<String>,
        /// `None`: no SLA; `Some(None)`: end of day.
        sla: Option<Option<Duration>>,
    },
    Ignore,
}

/// What a manager's move into a stage does at the marketplace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageAction {
    pub stage: String,
    pub stage_id: Option<u64>,
    pub action: String,
    pub reason: Option<String>,
    pub comment: Option<String>,
    pub spaces: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub users: Vec<String>,
    pub user_ids: Vec<u64>,
    pub pick: String,
}

/// Where messenger leads go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessengerRoute {
    pub stage: String,
    /// The stage's id in the CRM, once resolved online.
    pub stage_id: Option<u64>,
    pub name: String,
    pub tags: Vec<String>,
}

/// A map ready to route by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingMap {
    pub file: String,
    pub pipeline: String,
    pub pipeline_id: Option<u64>,
    pub statuses: BTreeMap<String, Route>,
    pub actions: Vec<StageAction>,
    pub roles: BTreeMap<String, Role>,
    pub lead_name: Option<String>,
    pub tags: Vec<String>,
    /// Slot → (field as written, field id once resolved).
    pub fields: BTreeMap<String, (String, Option<u64>)>,
    /// Slot → marketplace value → (option label, enum id once resolved).
    pub enums: BTreeMap<String, BTreeMap<String, (String, Option<u64>)>>,
    /// Messenger leads (Avito maps with a `[messenger]` section).
    pub messenger: Option<MessengerRoute>,
    /// Every name above has its id.
    pub online: bool,
}

/// The roles of a map as written (no user ids yet).
pub(super) fn offline_roles(roles: &Roles) -> BTreeMap<String, Role> {
    roles
        .iter()
        .map(|(name, role)| {
            let r = role.get_ref();
            (
                name.get_ref().clone(),
                Role {
                    users: r.users.get_ref().iter().map(value_text).collect(),
                    user_ids: Vec::new(),
                    pick: r
                        .pick
                        .as_ref()
                        .map(|p| p.get_ref().clone())
                        .unwrap_or_else(|| "round_robin".into()),
                },
            )
        })
        .collect()
}

/// A map's `[roles]` as written.
pub(super) type Roles = BTreeMap<toml::Spanned<String>, toml::Spanned<super::model::RoleDef>>;

/// Resolves every role's users to their ids in the CRM; a user the CRM lacks
/// is a problem (`bad(span, key, message)`), a deactivated one is skipped.
pub(super) fn resolve_roles(
    roles: &Roles,
    crm: &CrmDirectory,
    resolved: &mut BTreeMap<String, Role>,
    bad: &mut impl FnMut(std::ops::Range<usize>, String, String),
) {
    for (name, role) in roles {
        for user in role.get_ref().users.get_ref() {
            let found = crm.users.iter().find(|u| match user {
                toml::Value::Integer(id) => u.id == *id as u64,
                other => same(&u.name, &value_text(other)),
            });
            match found {
                // A deactivated user is known but never made responsible.
                Some(u) if !u.active => {
                    tracing::warn!(role = %name.get_ref(), user = %u.name,
                        "A role's user is deactivated in amoCRM; nobody gets leads through it.");
                }
                Some(u) => {
                    if let Some(r) = resolved.get_mut(name.get_ref()) {
                        r.user_ids.push(u.id);
                    }
                }
                None => bad(
                    role.get_ref().users.span(),
                    format!("roles.{}.users", name.get_ref()),
                    format!(
                        "the CRM has no user `{}`; its users are: {}",
                        value_text(user),
                        crm.users
                            .iter()
                            .map(|u| u.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            }
        }
    }
}

pub(super) fn value_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl RoutingMap {
    /// The routing of a map that passed offline validation (names only).
    pub fn offline(file: &str, map: &MapFile) -> RoutingMap {
        RoutingMap {
            file: file.to_string(),
            pipeline: value_text(map.pipeline.get_ref().name.get_ref()),
            pipeline_id: None,
            statuses: map
                .statuses
                .iter()
                .map(|(key, row)| {
                    let r = row.get_ref();
                    let route = match (&r.stage, r.ignore) {
                        (Some(stage), false) => Route::Stage {
                            stage: value_text(stage.get_ref()),
                            stage_id: None,
                            role: r.role.as_ref().map(|x| x.get_ref().clone()),
                            sla: r.sla.as_ref().and_then(|s| parse_sla(s.get_ref())),
                        },
                        _ => Route::Ignore,
                    };
                    (key.get_ref().clone(), route)
                })
                .collect(),
            actions: map
                .actions
                .iter()
                .map(|(stage, row)| {
                    let r = row.get_ref();
                    StageAction {
                        stage: stage.get_ref().trim().to_string(),
                        stage_id: None,
                        action: r.action.get_ref().clone(),
                        reason: r.reason.as_ref().map(|x| x.get_ref().clone()),
                        comment: r.comment.as_ref().map(|x| x.get_ref().clone()),
                        spaces: r.spaces.as_ref().map(|x| *x.get_ref() as u32),
                    }
                })
                .collect(),
            roles: offline_roles(&map.roles),
            lead_name: map
                .lead
                .as_ref()
                .map(|l| l.get_ref().name.get_ref().clone()),
            tags: map
                .lead
                .as_ref()
                .map(|l| l.get_ref().tags.clone())
                .unwrap_or_default(),
            fields: map
                .lead
                .iter()
                .flat_map(|l| l.get_ref().fields.iter())
                .map(|(slot, field)| (slot.get_ref().clone(), (value_text(field.get_ref()), None)))
                .collect(),
            enums: map
                .lead
                .iter()
                .flat_map(|l| l.get_ref().enums.iter())
                .map(|(slot, options)| {
                    (
                        slot.get_ref().clone(),
                        options
                            .iter()
                            .map(|(value, label)| (value.clone(), (label.get_ref().clone(), None)))
                            .collect(),
                    )
                })
                .collect(),
            messenger: map.messenger.as_ref().map(|m| {
                let m = m.get_ref();
                MessengerRoute {
                    stage: value_text(m.stage.get_ref()),
                    stage_id: None,
                    name: m.name.get_ref().clone(),
                    tags: m.tags.clone(),
                }
            }),
            online: false,
        }
    }

    /// Where a status key goes.
    pub fn route(&self, status: &str) -> Option<&Route> {
        self.statuses.get(status)
    }

    /// The first status row that routes to stage `stage_id` (its name, role
    /// and SLA): what a lead moved into that stage by a manager gets.
    pub fn stage_route(&self, stage_id: u64) -> Option<&Route> {
        self.statuses
            .values()
            .find(|r| matches!(r, Route::Stage { stage_id: Some(id), .. } if *id == stage_id))
    }

    /// The action of a stage, by id (online) or name.
    pub fn action_for_stage(
        &self,
        stage_id: Option<u64>,
        stage_name: &str,
    ) -> Option<&StageAction> {
        self.actions.iter().find(|a| {
            (stage_id.is_some() && a.stage_id == stage_id)
                || a.stage.to_lowercase() == stage_name.trim().to_lowercase()
        })
    }
}

/// What the live CRM has.
#[derive(Debug, Clone, Default)]
pub struct CrmDirectory {
    pub pipelines: Vec<Pipeline>,
    pub users: Vec<User>,
    pub lead_fields: Vec<CustomField>,
}

/// The live pipeline a map names (by name or id); `None` after reporting
/// what the CRM has instead.
pub(super) fn find_pipeline<'c>(
    wanted: &toml::Spanned<super::model::PipelineRef>,
    crm: &'c CrmDirectory,
    bad: &mut impl FnMut(std::ops::Range<usize>, String, String),
) -> Option<&'c Pipeline> {
    let name = wanted.get_ref().name.get_ref();
    let found = crm.pipelines.iter().find(|p| match name {
        toml::Value::Integer(id) => p.id == *id as u64,
        other => same(&p.name, &value_text(other)),
    });
    if found.is_none() {
        bad(
            wanted.get_ref().name.span(),
            "pipeline.name".into(),
            format!(
                "the CRM has no pipeline `{}`; it has: {}",
                value_text(name),
                crm.pipelines
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    found
}

pub(super) fn same(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// Resolves every name of a (valid) map against the live CRM.
pub fn resolve_online(
    file: &str,
    text: &str,
    map: &MapFile,
    crm: &CrmDirectory,
) -> Result<RoutingMap, Vec<MapIssue>> {
    let mut routing = RoutingMap::offline(file, map);
    let mut issues = Vec::new();
    let mut bad = |span: std::ops::Range<usize>, key: String, message: String| {
        issues.push(MapIssue {
            file: file.to_string(),
            line: line_of(text, span.start),
            key,
            message,
        })
    };
    let list = |names: Vec<String>| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };

    // The pipeline, by name or id.
    let Some(pipeline) = find_pipeline(&map.pipeline, crm, &mut bad) else {
        return Err(issues);
    };
    routing.pipeline_id = Some(pipeline.id);
    let stage_names = || list(pipeline.stages.iter().map(|s| s.name.clone()).collect());
    let stage_id = |name: &str| {
        pipeline
            .stages
            .iter()
            .find(|s| same(&s.name, name) || name.trim().parse::<u64>().ok() == Some(s.id))
            .map(|s| s.id)
    };

    for (key, row) in &map.statuses {
        let Some(stage) = &row.get_ref().stage else {
            continue;
        };
        let name = value_text(stage.get_ref());
        match stage_id(&name) {
            Some(id) => {
                if let Some(Route::Stage { stage_id, .. }) = routing.statuses.get_mut(key.get_ref())
                {
                    *stage_id = Some(id);
                }
            }
            None => bad(
                stage.span(),
                format!("statuses.{}.stage", key.get_ref()),
                format!(
                    "pipeline `{}` has no stage `{name}`; its stages are: {}",
                    pipeline.name,
                    stage_names()
                ),
            ),
        }
    }
    for stage in map.actions.keys() {
        match stage_id(stage.get_ref()) {
            Some(id) => {
                if let Some(action) = routing
                    .actions
                    .iter_mut()
                    .find(|a| a.stage == stage.get_ref().trim())
                {
                    action.stage_id = Some(id);
                }
            }
            None => bad(
                stage.span(),
                format!("actions.\"{}\"", stage.get_ref()),
                format!(
                    "pipeline `{}` has no stage `{}`; its stages are: {}",
                    pipeline.name,
                    stage.get_ref().trim(),
                    stage_names()
                ),
            ),
        }
    }
    if let Some(messenger) = &map.messenger {
        let stage = messenger.get_ref().stage.get_ref();
        let name = value_text(stage);
        match stage_id(&name) {
            Some(id) => {
                if let Some(route) = routing.messenger.as_mut() {
                    route.stage_id = Some(id);
                }
            }
            None => bad(
                messenger.get_ref().stage.span(),
                "messenger.stage".into(),
                format!(
                    "pipeline `{}` has no stage `{name}`; its stages are: {}",
                    pipeline.name,
                    stage_names()
                ),
            ),
        }
    }
    resolve_roles(&map.roles, crm, &mut routing.roles, &mut bad);
    if let Some(lead) = &map.lead {
        let lead = lead.get_ref();
        let field_names = || list(crm.lead_fields.iter().map(|f| f.name.clone()).collect());
        for (slot, field) in &lead.fields {
            let wanted = field.get_ref();
            let found = crm.lead_fields.iter().find(|f| match wanted {
                toml::Value::Integer(id) => f.id == *id as u64,
                other => same(&f.name, &value_text(other)),
            });
            match found {
                Some(f) => {
                    if let Some(entry) = routing.fields.get_mut(slot.get_ref()) {
                        entry.1 = Some(f.id);
                    }
                    let has_enums = lead.enums.keys().any(|s| s.get_ref() == slot.get_ref());
                    let selects = matches!(
                        f.field_type.as_str(),
                        "select" | "multiselect" | "radiobutton"
                    );
                    if selects && !has_enums && slot.get_ref() != "completion_code" {
                        bad(
                            field.span(),
                            format!("lead.fields.{}", slot.get_ref()),
                            format!(
                                "field `{}` is a {} in amoCRM and takes only its options, but this map writes raw values into it; map each value onto an option under [lead.enums.{}]; its options are: {}",
                                f.name,
                                f.field_type,
                                slot.get_ref(),
                                list(f.enums.iter().map(|(_, l)| l.clone()).collect())
                            ),
                        );
                    }
                    if let Some(options) = lead
                        .enums
                        .iter()
                        .find(|(s, _)| s.get_ref() == slot.get_ref())
                        .map(|(_, o)| o)
                    {
                        for (value, label) in options {
                            match f.enums.iter().find(|(_, l)| same(l, label.get_ref())) {
                                Some((id, _)) => {
                                    if let Some(e) = routing
                                        .enums
                                        .get_mut(slot.get_ref())
                                        .and_then(|m| m.get_mut(value))
                                    {
                                        e.1 = Some(*id);
                                    }
                                }
                                None => bad(
                                    label.span(),
                                    format!("lead.enums.{}.{value}", slot.get_ref()),
                                    format!(
                                        "field `{}` has no option `{}`; its options are: {}",
                                        f.name,
                                        label.get_ref(),
                                        list(f.enums.iter().map(|(_, l)| l.clone()).collect())
                                    ),
                                ),
                            }
                        }
                    }
                }
                None => bad(
                    field.span(),
                    format!("lead.fields.{}", slot.get_ref()),
                    format!(
                        "the CRM has no lead field `{}`; its lead fields are: {}",
                        value_text(wanted),
                        field_names()
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
