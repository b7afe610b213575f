//! The maps in force: loaded and validated at start, reloaded on SIGHUP and
//! when a map file changes. A reload validates every map (online where the CRM
//! answers) and swaps them in at once; any problem leaves the old maps in
//! force, logs the problems and keeps them for `/readyz`. Maps that could only
//! be checked offline (their CRM did not answer, or answered an error to a
//! request the maps need: kept per account, with the endpoint and the answer,
//! for `/readyz` and the jobs that wait for it) are retried online every 10 s;
//! a successful resolution wakes [`MapRegistry::resolved`]. Work that started
//! under a map keeps its `Arc` to that map until it finishes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::funnel::{load_funnel, resolve_funnel, validate_funnel, FunnelMap};
use super::resolve::{resolve_online, CrmDirectory, RoutingMap};
use super::{load, rules_for, validate};
use crate::config::{MarketplaceKind, Settings};
use crate::connectors::amocrm::AmoClient;

/// Where a shop's map comes from.
#[derive(Debug, Clone)]
pub struct MapSource {
    pub shop: String,
    pub marketplace: MarketplaceKind,
    pub crm_account: String,
    pub path: PathBuf,
}

impl MapSource {
    pub fn from_settings(settings: &Settings) -> Vec<MapSource> {
        settings
            .shops
            .iter()
            .map(|(name, shop)| MapSource {
                shop: name.clone(),
                marketplace: shop.marketplace,
                crm_account: shop.crm_account.clone(),
                path: shop.map.clone(),
            })
            .collect()
    }
}

/// Where a partner source's funnel map comes from.
#[derive(Debug, Clone)]
pub struct FunnelSource {
    pub source: String,
    pub crm_account: String,
    pub path: PathBuf,
}

impl FunnelSource {
    pub fn from_settings(settings: &Settings) -> Vec<FunnelSource> {
        settings
            .partners
            .iter()
            .map(|(name, partner)| FunnelSource {
                source: name.clone(),
                crm_account: partner.crm_account.clone(),
                path: partner.map.clone(),
            })
            .collect()
    }
}

/// The maps in force, by shop (and funnel maps by partner source).
#[derive(Debug, Default)]
pub struct MapSet {
    pub shops: BTreeMap<String, Arc<RoutingMap>>,
    pub funnels: BTreeMap<String, Arc<FunnelMap>>,
    /// CRM accounts whose maps could not be resolved online, and why (the
    /// endpoint and what the CRM answered).
    pub unresolved: BTreeMap<String, String>,
}

/// The start of every reason a job waits with while its maps are unresolved.
pub const UNRESOLVED: &str = "maps unresolved";

pub struct MapRegistry {
    sources: Vec<MapSource>,
    funnels: Vec<FunnelSource>,
    current: RwLock<Arc<MapSet>>,
    errors: RwLock<Vec<String>>,
    stamps: RwLock<Vec<Option<SystemTime>>>,
    /// Woken when a reload resolved every map online after some were not.
    resolved: tokio::sync::Notify,
}

/// Reads what the CRM accounts have; for an account that cannot be read, the
/// endpoint and what the CRM answered (or that it did not).
async fn directories(
    crm: &BTreeMap<String, AmoClient>,
) -> BTreeMap<String, Result<CrmDirectory, String>> {
    let mut found = BTreeMap::new();
    for (name, client) in crm {
        let at = |endpoint: &'static str| {
            move |error: crate::connectors::amocrm::AmoError| format!("GET {endpoint}: {error}")
        };
        let directory = async {
            Ok::<_, String>(CrmDirectory {
                pipelines: client
                    .reload_pipelines()
                    .await
                    .map_err(at("/api/v4/leads/pipelines"))?,
                users: client.users().await.map_err(at("/api/v4/users"))?,
                lead_fields: client
                    .lead_custom_fields()
                    .await
                    .map_err(at("/api/v4/leads/custom_fields"))?,
            })
        }
        .await;
        if let Err(problem) = &directory {
            tracing::error!(crm_account = %name, problem = %problem,
                "The maps cannot be resolved against this CRM account; nothing is written to it until they are (retried every 10 s).");
        }
        found.insert(name.clone(), directory);
    }
    found
}

/// A valid map resolved against its CRM account's directory; offline when the
/// account could not be read (the reason kept in `unresolved`) or has no
/// client here (offline validation, e.g. `check-config`); `None` when the
/// live CRM contradicts the map (its problems added to `problems`).
fn routing_for<R>(
    directories: &BTreeMap<String, Result<CrmDirectory, String>>,
    crm_account: &str,
    (unresolved, problems): (&mut BTreeMap<String, String>, &mut Vec<String>),
    online: impl FnOnce(&CrmDirectory) -> Result<R, Vec<super::MapIssue>>,
    offline: impl FnOnce() -> R,
) -> Option<R> {
    match directories.get(crm_account) {
        Some(Ok(directory)) => match online(directory) {
            Ok(routing) => Some(routing),
            Err(issues) => {
                problems.extend(issues.into_iter().map(|i| i.to_string()));
                None
            }
        },
        Some(Err(problem)) => {
            unresolved.insert(crm_account.to_string(), problem.clone());
            Some(offline())
        }
        None => Some(offline()),
    }
}

/// Loads and validates every map; all problems, or the new set.
async fn build(
    sources: &[MapSource],
    funnels: &[FunnelSource],
    crm: &BTreeMap<String, AmoClient>,
) -> Result<MapSet, Vec<String>> {
    let directories = directories(crm).await;
    let mut set = MapSet::default();
    let mut problems = Vec::new();
    for source in funnels {
        let file = source.path.display().to_string();
        let (map, text) = match load_funnel(&source.path) {
            Ok(loaded) => loaded,
            Err(error) => {
                problems.push(error.to_string());
                continue;
            }
        };
        let issues = validate_funnel(&file, &text, &map);
        if !issues.is_empty() {
            problems.extend(issues.into_iter().map(|i| i.to_string()));
            continue;
        }
        let routing = routing_for(
            &directories,
            &source.crm_account,
            (&mut set.unresolved, &mut problems),
            |directory| resolve_funnel(&file, &text, &map, directory),
            || FunnelMap::offline(&file, &map),
        );
        if let Some(routing) = routing {
            set.funnels.insert(source.source.clone(), Arc::new(routing));
        }
    }
    // (CRM account, field name) → (file, slot, option labels when the map has them).
    let mut shared_fields: SharedFields = BTreeMap::new();
    for source in sources {
        let file = source.path.display().to_string();
        let (map, text) = match load(&source.path) {
            Ok(loaded) => loaded,
            Err(error) => {
                problems.push(error.to_string());
                continue;
            }
        };
        let issues = validate(&file, &text, &map, &rules_for(source.marketplace));
        if !issues.is_empty() {
            problems.extend(issues.into_iter().map(|i| i.to_string()));
            continue;
        }
        if let Some(lead) = &map.lead {
            let lead = lead.get_ref();
            for (slot, field) in &lead.fields {
                let name = match field.get_ref() {
                    toml::Value::String(name) => name.trim().to_string(),
                    other => other.to_string(),
                };
                let labels = lead
                    .enums
                    .iter()
                    .find(|(s, _)| s.get_ref() == slot.get_ref())
                    .map(|(_, o)| o.values().map(|l| l.get_ref().clone()).collect());
                let entry = shared_fields
                    .entry((source.crm_account.clone(), name.to_lowercase()))
                    .or_insert_with(|| (name.clone(), Vec::new()));
                let entry = &mut entry.1;
                if !entry
                    .iter()
                    .any(|(f, s, _)| *f == file && s == slot.get_ref())
                {
                    entry.push((file.clone(), slot.get_ref().clone(), labels));
                }
            }
        }
        let routing = routing_for(
            &directories,
            &source.crm_account,
            (&mut set.unresolved, &mut problems),
            |directory| resolve_online(&file, &text, &map, directory),
            || RoutingMap::offline(&file, &map),
        );
        if let Some(routing) = routing {
            set.shops.insert(source.shop.clone(), Arc::new(routing));
        }
    }
    problems.extend(disagreeing_fields(&shared_fields));
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(problems)
    }
}

/// (CRM account, lower-cased field name) → (the field's name as written, and
/// per map writing it: file, slot, the option labels when it maps onto options).
type SharedFields =
    BTreeMap<(String, String), (String, Vec<(String, String, Option<Vec<String>>)>)>;

/// Maps of one CRM account that write the same lead field must agree on what
/// it takes: when one maps its values onto the field's options (a select) and
/// another writes raw values into it, amoCRM would refuse every lead of the
/// second. Names both maps, the field and the options.
fn disagreeing_fields(shared: &SharedFields) -> Vec<String> {
    let mut problems = Vec::new();
    for ((account, _), (field, users)) in shared {
        let Some((select_file, select_slot, Some(options))) =
            users.iter().find(|(_, _, labels)| labels.is_some())
        else {
            continue;
        };
        for (file, slot, labels) in users {
            if labels.is_none() && slot != "completion_code" {
                problems.push(format!(
                    "{file}: `lead.fields.{slot}` writes raw values into lead field `{field}` of CRM account `{account}`, which {select_file} (`lead.enums.{select_slot}`) treats as a select with the options: {}; map each value onto one of them under [lead.enums.{slot}] in {file}",
                    options.join(", ")
                ));
            }
        }
    }
    problems
}

fn stamps(sources: &[MapSource], funnels: &[FunnelSource]) -> Vec<Option<SystemTime>> {
    sources
        .iter()
        .map(|s| &s.path)
        .chain(funnels.iter().map(|f| &f.path))
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
}

impl MapRegistry {
    /// Loads the maps; refuses to start with any problem.
    pub async fn load(
        sources: Vec<MapSource>,
        crm: &BTreeMap<String, AmoClient>,
    ) -> Result<MapRegistry, Vec<String>> {
        Self::load_with_funnels(sources, Vec::new(), crm).await
    }

    /// Loads the shops' maps and the partner sources' funnel maps; refuses
    /// to start with any problem.
    pub async fn load_with_funnels(
        sources: Vec<MapSource>,
        funnels: Vec<FunnelSource>,
        crm: &BTreeMap<String, AmoClient>,
    ) -> Result<MapRegistry, Vec<String>> {
        let set = build(&sources, &funnels, crm).await?;
        let stamps = stamps(&sources, &funnels);
        Ok(MapRegistry {
            sources,
            funnels,
            current: RwLock::new(Arc::new(set)),
            errors: RwLock::new(Vec::new()),
            stamps: RwLock::new(stamps),
            resolved: tokio::sync::Notify::new(),
        })
    }

    /// The maps in force now (keep the `Arc` for the whole of a job).
    pub fn current(&self) -> Arc<MapSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The problems of the last reload that was refused (empty after a good one).
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads, validates and swaps in every map at once; on any problem the old
    /// maps stay in force and the problems are kept and returned.
    pub async fn reload(&self, crm: &BTreeMap<String, AmoClient>) -> Result<(), Vec<String>> {
        *self.stamps.write().unwrap_or_else(|p| p.into_inner()) =
            stamps(&self.sources, &self.funnels);
        match build(&self.sources, &self.funnels, crm).await {
            Ok(set) => {
                let was_unresolved = !self.current().unresolved.is_empty();
                let now_resolved = set.unresolved.is_empty();
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                if was_unresolved && now_resolved {
                    tracing::info!(
                        "Every map is resolved against its CRM now; waiting jobs are released."
                    );
                    self.resolved.notify_waiters();
                }
                self.errors
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                tracing::info!(maps = self.sources.len(), "Status maps reloaded.");
                Ok(())
            }
            Err(problems) => {
                for problem in &problems {
                    tracing::error!(problem = %problem, "A map reload was refused; the previous maps stay in force.");
                }
                *self.errors.write().unwrap_or_else(|p| p.into_inner()) = problems.clone();
                Err(problems)
            }
        }
    }

    /// Waits until a reload resolves every map online after some were not.
    pub async fn resolved(&self) {
        self.resolved.notified().await
    }

    /// The CRM accounts whose maps are not resolved, and why.
    pub fn unresolved(&self) -> BTreeMap<String, String> {
        self.current().unresolved.clone()
    }

    /// Whether some map could only be validated offline (its CRM did not answer).
    pub fn any_offline(&self) -> bool {
        let set = self.current();
        set.shops.values().any(|m| !m.online) || set.funnels.values().any(|m| !m.online)
    }

    /// Whether a map file changed since the last load.
    pub fn changed_on_disk(&self) -> bool {
        *self.stamps.read().unwrap_or_else(|p| p.into_inner())
            != stamps(&self.sources, &self.funnels)
    }

    /// Reloads on SIGHUP and when a map file changes (checked every `every`).
    pub async fn watch(
        self: Arc<Self>,
        crm: BTreeMap<String, AmoClient>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While a CRM did not answer, try to resolve its maps online again now and then.
        let retry_offline = Duration::from_secs(10);
        let mut last_try = std::time::Instant::now();
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<()>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = signalled => {
                    tracing::info!("SIGHUP received; reloading the status maps.");
                    let _ = self.reload(&crm).await;
                }
                _ = tick.tick() => {
                    if self.changed_on_disk() {
                        tracing::info!("A map file changed; reloading the status maps.");
                        last_try = std::time::Instant::now();
                        let _ = self.reload(&crm).await;
                    } else if self.any_offline() && last_try.elapsed() >= retry_offline {
                        last_try = std::time::Instant::now();
                        let _ = self.reload(&crm).await;
                    }
                }
            }
        }
    }
}
