//! Status maps that admins edit (TOML): for each connector status key the CRM
//! stage, the responsible role and the SLA (or an explicit `ignore`); for each
//! CRM stage the marketplace action it stands for; the roles. This module owns
//! loading a map with the position of every key, and offline validation that
//! reports every problem at once with file, line and key. Resolution of names
//! against the live CRM and hot reload build on it. Partner programmes' funnel
//! maps (stages that report partner statuses) are in [`funnel`].

pub mod funnel;
pub mod model;
pub mod registry;
pub mod resolve;
pub mod validate;

pub use funnel::{FunnelMap, FunnelStage};
pub use model::{load, ActionRow, MapError, MapFile, StatusRow};
pub use registry::{FunnelSource, MapRegistry, MapSet, MapSource, UNRESOLVED};
pub use resolve::{
    resolve_online, CrmDirectory, MessengerRoute, Role, Route, RoutingMap, StageAction,
};
pub use validate::{validate, MapIssue, MarketplaceRules};

use crate::config::{MarketplaceKind, Settings};

/// The rules of a marketplace kind.
pub fn rules_for(kind: MarketplaceKind) -> MarketplaceRules {
    match kind {
        MarketplaceKind::Kaspi => MarketplaceRules::kaspi(),
        MarketplaceKind::Avito => MarketplaceRules::avito(),
    }
}

/// Loads and validates (offline) the map of every shop; returns every problem
/// as a printable line (file, line, key, message). Empty means all maps are valid.
pub fn check_shop_maps(settings: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for shop in settings.shops.values() {
        // One map may serve several shops of one kind: check it once per kind.
        if !seen.insert((shop.map.clone(), shop.marketplace.to_string())) {
            continue;
        }
        match load(&shop.map) {
            Ok((map, text)) => {
                let file = shop.map.display().to_string();
                problems.extend(
                    validate(&file, &text, &map, &rules_for(shop.marketplace))
                        .into_iter()
                        .map(|i| i.to_string()),
                );
            }
            Err(error) => problems.push(error.to_string()),
        }
    }
    for partner in settings.partners.values() {
        match funnel::load_funnel(&partner.map) {
            Ok((map, text)) => {
                let file = partner.map.display().to_string();
                problems.extend(
                    funnel::validate_funnel(&file, &text, &map)
                        .into_iter()
                        .map(|i| i.to_string()),
                );
            }
            Err(error) => problems.push(error.to_string()),
        }
    }
    problems
}
