//! The maps in force: loaded and validated at start, reloaded on SIGHUP and
//! when a map file changes. A reload validates every map (online where the CRM
//! answers) and swaps them in at once; any problem leaves the old maps in
//! force, logs the problems and keeps them for `/readyz`. Maps that could only
//! be checked offline (their CRM did not answer) are retried online every 30 s. Work that started
//! under a map keeps its `Arc` to that map until it finishes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

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

/// The maps in force, by shop.
#[derive(Debug, Default)]
pub struct MapSet {
    pub shops: BTreeMap<String, Arc<RoutingMap>>,
}

pub struct MapRegistry {
    sources: Vec<MapSource>,
    current: RwLock<Arc<MapSet>>,
    errors: RwLock<Vec<String>>,
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

/// Reads what the CRM accounts have (`None` when a CRM does not answer).
async fn directories(crm: &BTreeMap<String, AmoClient>) -> BTreeMap<String, Option<CrmDirectory>> {
    let mut found = BTreeMap::new();
    for (name, client) in crm {
        let directory = async {
            Ok::<_, crate::connectors::amocrm::AmoError>(CrmDirectory {
                pipelines: client.reload_pipelines().await?,
                users: client.users().await?,
                lead_fields: client.lead_custom_fields().await?,
            })
        }
        .await;
        match directory {
            Ok(d) => {
                found.insert(name.clone(), Some(d));
            }
            Err(error) => {
                tracing::warn!(crm_account = %name, %error, "The CRM did not answer; maps are validated offline only.");
                found.insert(name.clone(), None);
            }
        }
    }
    found
}

/// Loads and validates every map; all problems, or the new set.
async fn build(
    sources: &[MapSource],
    crm: &BTreeMap<String, AmoClient>,
) -> Result<MapSet, Vec<String>> {
    let directories = directories(crm).await;
    let mut set = MapSet::default();
    let mut problems = Vec::new();
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
        let routing = match directories
            .get(&source.crm_account)
            .and_then(Option::as_ref)
        {
            Some(directory) => match resolve_online(&file, &text, &map, directory) {
                Ok(routing) => routing,
                Err(issues) => {
                    problems.extend(issues.into_iter().map(|i| i.to_string()));
                    continue;
                }
            },
            None => RoutingMap::offline(&file, &map),
        };
        set.shops.insert(source.shop.clone(), Arc::new(routing));
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(problems)
    }
}

fn stamps(sources: &[MapSource]) -> Vec<Option<SystemTime>> {
    sources
        .iter()
        .map(|s| std::fs::metadata(&s.path).and_then(|m| m.modified()).ok())
        .collect()
}

impl MapRegistry {
    /// Loads the maps; refuses to start with any problem.
    pub async fn load(
        sources: Vec<MapSource>,
        crm: &BTreeMap<String, AmoClient>,
    ) -> Result<MapRegistry, Vec<String>> {
        let set = build(&sources, crm).await?;
        let stamps = stamps(&sources);
        Ok(MapRegistry {
            sources,
            current: RwLock::new(Arc::new(set)),
            errors: RwLock::new(Vec::new()),
            stamps: RwLock::new(stamps),
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
        *self.stamps.write().unwrap_or_else(|p| p.into_inner()) = stamps(&self.sources);
        match build(&self.sources, crm).await {
            Ok(set) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
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

    /// Whether some map could only be validated offline (its CRM did not answer).
    pub fn any_offline(&self) -> bool {
        self.current().shops.values().any(|m| !m.online)
    }

    /// Whether a map file changed since the last load.
    pub fn changed_on_disk(&self) -> bool {
        *self.stamps.read().unwrap_or_else(|p| p.into_inner()) != stamps(&self.sources)
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
        let retry_offline = Duration::from_secs(30);
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
