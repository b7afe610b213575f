//! Settings: the layered configuration and its validation.
//!
//! Layers, later ones win: the built-in `config/default.toml` (the reference
//! documentation of every key), the file given with `--config`, environment
//! variables `ORDERBRIDGE__SECTION__KEY`, and finally `DATABASE_URL`.
//! Everything is validated before any task starts; an error names the key's
//! full path and the layer (file) it came from. Secrets are
//! [`SecretString`]s and never print.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The reference configuration, compiled into the binary so that it runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// How the built-in layer is named in error messages.
pub const DEFAULT_ORIGIN: &str = "config/default.toml (built in)";

/// The whole configuration of one deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub telemetry: TelemetrySettings,
    pub outbox: OutboxSettings,
    pub reconcile: ReconcileSettings,
    pub sla: SlaSettings,
    pub alerts: AlertSettings,
    /// CRM accounts by name; shops refer to them by that name.
    #[serde(default)]
    pub crm_accounts: BTreeMap<String, CrmAccount>,
    /// Marketplace accounts (shops) by name.
    #[serde(default)]
    pub shops: BTreeMap<String, Shop>,
    /// Partner lead sources (buyout / trade-in programmes) by name.
    #[serde(default)]
    pub partners: BTreeMap<String, PartnerSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// May carry a password, hence secret.
    pub url: SecretString,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub webhook_body_limit_bytes: usize,
    /// The address amoCRM can reach this bridge at (e.g. `https://bridge.example.com`):
    /// with it, the daemon subscribes its own amoCRM webhooks; without it, the
    /// events poll is the only intake of managers' moves.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Required for the dashboard and `/api/kpi` when `listen` is not a
    /// loopback address (as `Authorization: Bearer …` or basic auth's password).
    #[serde(default)]
    pub access_token: Option<SecretString>,
}

/// SLA timers: working time and when warnings come.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaSettings {
    /// IANA timezone of the working hours (e.g. Asia/Almaty).
    pub timezone: String,
    /// `"always"`, or e.g. `"mon-fri 09:00-18:00; sat 10:00-14:00"`.
    pub working_hours: String,
    /// Dates (YYYY-MM-DD) when nobody works.
    #[serde(default)]
    pub days_off: Vec<String>,
    /// The share of a stage's SLA after which the responsible gets a warning task.
    pub warn_fraction: f64,
    /// How often due warnings and breaches are looked for.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

/// Alerts to on-call through an outgoing webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSettings {
    /// Where alerts are POSTed (JSON); secret, as relay URLs carry tokens.
    /// Unset: alerts are kept and logged only.
    #[serde(default)]
    pub url: Option<SecretString>,
    /// A shop's polls failing for longer than this is an alert.
    #[serde(with = "humantime_serde")]
    pub poll_failing_after: Duration,
    /// An event kind's alert (breaches, unassigned, dead letters) resolves
    /// after this long without a new one.
    #[serde(with = "humantime_serde")]
    pub quiet_after: Duration,
    /// How often conditions are checked.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Per delivery.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// The daemon's periodic reconciliation (and the command's default range).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// How often the daemon reconciles each CRM account; "0s" turns it off.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How far back a run reaches (further after a longer outage).
    #[serde(with = "humantime_serde")]
    pub look_back: Duration,
    /// The longest a run may take before it is stopped and retried.
    #[serde(with = "humantime_serde")]
    pub run_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `tracing` filter directives; `RUST_LOG` wins when set.
    pub log_filter: String,
    pub log_format: LogFormat,
    /// Write the logs to this file (appended) instead of stderr.
    #[serde(default)]
    pub log_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    pub concurrency: usize,
    pub claim_batch: u32,
    #[serde(with = "humantime_serde")]
    pub job_lease: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub target_lease_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A pending job of a kind no handler of this build runs is dead-lettered
    /// (with that reason) once it is this old; covers a rolling deploy.
    #[serde(with = "humantime_serde", default = "default_unhandled_grace")]
    pub unhandled_grace: Duration,
    pub retry: RetrySettings,
    /// Quotas by target key, e.g. `"amocrm:main"`. Targets not listed are not limited
    /// unless an account declares its own quota.
    #[serde(default)]
    pub limits: BTreeMap<String, RateQuota>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Delay before retry N (1-based); the job is dead-lettered after the last one.
    #[serde(deserialize_with = "durations")]
    pub schedule: Vec<Duration>,
    /// Random spread applied to each delay: 0.2 means ±20 %.
    pub jitter: f64,
    /// Minimum delay after a 429 or a timeout.
    #[serde(with = "humantime_serde")]
    pub throttle_floor: Duration,
    /// A server-given retry-after is honoured up to this bound.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

/// `requests` per `per`, with at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateQuota {
    pub requests: u32,
    #[serde(with = "humantime_serde", default = "one_second")]
    pub per: Duration,
    #[serde(default = "one")]
    pub burst: u32,
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let items: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(items.into_iter().map(|s| s.into_inner()).collect())
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn one() -> u32 {
    1
}

/// An amoCRM account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrmAccount {
    /// `https://{subdomain}.amocrm.ru`, `.kommo.com`, or a simulator's address.
    pub base_url: String,
    pub auth: CrmAuth,
    #[serde(default = "amocrm_default_quota")]
    pub rate_limit: RateQuota,
    /// The account's subdomain and id, which webhooks must carry to be accepted.
    pub subdomain: Option<String>,
    pub account_id: Option<u64>,
    /// The unguessable path segment of `POST /hooks/amocrm/{secret}`.
    pub webhook_secret: Option<SecretString>,
    /// How long all traffic stops after amoCRM answers 403 (IP blocked), unless an
    /// operator resets the circuit first.
    #[serde(with = "humantime_serde", default = "default_circuit_cooldown")]
    pub circuit_cooldown: Duration,
    /// Per-request timeout.
    #[serde(with = "humantime_serde", default = "default_crm_timeout")]
    pub request_timeout: Duration,
    /// How often the events API is read for stage changes whose webhook was lost.
    #[serde(with = "humantime_serde", default = "default_events_poll")]
    pub events_poll_interval: Duration,
    /// How often the local contact index is refreshed (changes since the last refresh).
    #[serde(with = "humantime_serde", default = "default_contacts_refresh")]
    pub contacts_refresh_interval: Duration,
    /// How far back each events poll re-reads before its cursor (events that
    /// amoCRM records a little late are not missed).
    #[serde(with = "humantime_serde", default = "default_events_overlap")]
    pub events_poll_overlap: Duration,
    /// How often the daemon checks that amoCRM still has its webhook (and
    /// subscribes it again when amoCRM disabled it).
    #[serde(with = "humantime_serde", default = "default_webhook_check")]
    pub webhook_check_interval: Duration,
    /// The amoCRM user the bridge's token acts as (a dedicated technical user
    /// is best): a change by anyone else is a manager's, never an echo.
    #[serde(default)]
    pub api_user_id: Option<u64>,
    /// A request of the account's writer short of a batch (50) is not sent
    /// sooner than this after the previous one, so that more writes join it;
    /// no write waits longer. Off (0s) by default: measured with `bench
    /// pipeline`, the rate limiter's own wait fills the batches better.
    #[serde(with = "humantime_serde", default = "default_batch_fill")]
    pub batch_fill: Duration,
}

fn default_batch_fill() -> Duration {
    Duration::ZERO
}

fn default_unhandled_grace() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_events_overlap() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_webhook_check() -> Duration {
    Duration::from_secs(10 * 60)
}

fn default_events_poll() -> Duration {
    Duration::from_secs(60)
}

fn default_contacts_refresh() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_circuit_cooldown() -> Duration {
    Duration::from_secs(30 * 60)
}

fn default_crm_timeout() -> Duration {
    Duration::from_secs(20)
}

fn amocrm_default_quota() -> RateQuota {
    RateQuota {
        requests: 7,
        per: Duration::from_secs(1),
        burst: 1,
    }
}

/// How the bridge authenticates to amoCRM.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum CrmAuth {
    LongLived {
        token: Option<SecretString>,
    },
    Oauth {
        client_id: String,
        client_secret: Option<SecretString>,
        redirect_uri: String,
        /// Used once to seed the token table; afterwards the rotating pair lives in PostgreSQL.
        initial_refresh_token: Option<SecretString>,
    },
}

/// The marketplaces orderbridge knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarketplaceKind {
    Kaspi,
    Avito,
}

impl MarketplaceKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            MarketplaceKind::Kaspi => "kaspi",
            MarketplaceKind::Avito => "avito",
        }
    }
}

impl fmt::Display for MarketplaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A marketplace account, bound to one CRM account and one status map.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shop {
    pub marketplace: MarketplaceKind,
    pub crm_account: String,
    pub map: PathBuf,
    pub base_url: String,
    #[serde(with = "humantime_serde", default = "default_shop_poll")]
    pub poll_interval: Duration,
    /// Kaspi: the `X-Auth-Token`.
    pub token: Option<SecretString>,
    /// Kaspi: `X-Merchant-Uid`, when the shop has one.
    pub merchant_uid: Option<String>,
    /// Avito: OAuth client id.
    pub client_id: Option<String>,
    /// Avito: OAuth client secret.
    pub client_secret: Option<SecretString>,
    /// Per-request timeout.
    #[serde(with = "humantime_serde", default = "default_shop_timeout")]
    pub request_timeout: Duration,
    /// Avito: the secret path segment of `POST /hooks/avito/{secret}` (messenger).
    pub webhook_secret: Option<SecretString>,
    /// Avito: request limits (per endpoint per minute, and a global cap per second).
    #[serde(default)]
    pub avito_limits: AvitoLimits,
}

/// Avito's documented per-endpoint quotas and a conservative global cap (the
/// one an earlier integration died on is not published).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AvitoLimits {
    pub orders_per_minute: u32,
    pub transitions_per_minute: u32,
    pub tracking_per_minute: u32,
    pub global_per_second: u32,
}

impl Default for AvitoLimits {
    fn default() -> Self {
        AvitoLimits {
            orders_per_minute: 500,
            transitions_per_minute: 100,
            tracking_per_minute: 100,
            global_per_second: 5,
        }
    }
}

impl AvitoLimits {
    /// The quotas by limiter key of account `name` (see `AvitoLimiters::keys`).
    pub fn quotas(&self, name: &str) -> Vec<(String, RateQuota)> {
        let minute = Duration::from_secs(60);
        let q = |requests: u32, per: Duration| RateQuota {
            requests,
            per,
            burst: 1,
        };
        vec![
            (
                format!("avito:{name}"),
                q(self.global_per_second, Duration::from_secs(1)),
            ),
            (
                format!("avito:{name}:orders"),
                q(self.orders_per_minute, minute),
            ),
            (
                format!("avito:{name}:transitions"),
                q(self.transitions_per_minute, minute),
            ),
            (
                format!("avito:{name}:tracking"),
                q(self.tracking_per_minute, minute),
            ),
        ]
    }
}

fn default_shop_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_shop_poll() -> Duration {
    Duration::from_secs(60)
}

/// A partner programme that sends leads (buyout / trade-in requests) and wants
/// every status change of them reported back. The programme's API is private,
/// so its format is configuration: where each datum is in the partner's JSON
/// (`fields`, JSON pointers), how a report is sent (`report`), and how the
/// weekly commission is computed (`commission`, `settlement`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerSource {
    pub crm_account: String,
    /// The funnel map (e.g. `config/maps/buyout.toml`).
    pub map: PathBuf,
    /// The secret path segment of `POST /hooks/partner/{source}/{secret}`.
    pub webhook_secret: Option<SecretString>,
    /// Polled for new leads when set: `GET {poll_url}?cursor=…`, answered
    /// `{"leads": [...], "next_cursor": "…"}`.
    pub poll_url: Option<String>,
    /// Sent on polls as the value of `report.auth_header` too.
    #[serde(with = "humantime_serde", default = "default_shop_poll")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde", default = "default_partner_timeout")]
    pub request_timeout: Duration,
    /// Slot → JSON pointer into the partner's lead (see `PARTNER_SLOTS`).
    pub fields: BTreeMap<String, String>,
    /// Slots a lead must carry (else 422); `lead_id` always is.
    #[serde(default = "default_partner_required")]
    pub required: Vec<String>,
    /// The partner statuses a new lead may arrive in (its `status` slot, when
    /// mapped and sent); any other is refused with 422.
    #[serde(default = "default_intake_statuses")]
    pub intake_statuses: Vec<String>,
    pub report: PartnerReport,
    #[serde(default)]
    pub commission: PartnerCommission,
    #[serde(default)]
    pub settlement: PartnerSettlement,
}

/// The slots a partner lead may carry.
pub const PARTNER_SLOTS: &[&str] = &[
    "lead_id",
    "status",
    "model",
    "memory",
    "colour",
    "condition",
    "defects",
    "buyout_price",
    "client_price",
    "seller_name",
    "seller_phone",
    "city",
];

fn default_partner_required() -> Vec<String> {
    ["lead_id", "model", "seller_phone", "buyout_price"]
        .map(String::from)
        .to_vec()
}

fn default_intake_statuses() -> Vec<String> {
    vec!["new".into()]
}

fn default_partner_timeout() -> Duration {
    Duration::from_secs(20)
}

/// How a status report reaches the partner.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerReport {
    /// May hold `{lead_id}` and `{status}`.
    pub url: String,
    #[serde(default = "default_report_method")]
    pub method: String,
    /// The JSON body; placeholders `{lead_id}`, `{status}`, `{stage}`,
    /// `{crm_lead_id}`, `{changed_at}` (RFC 3339), `{seq}` (1, 2, … per lead)
    /// are replaced by JSON-escaped text.
    pub body: String,
    /// e.g. `Authorization`; sent with `auth_value`.
    pub auth_header: Option<String>,
    pub auth_value: Option<SecretString>,
    /// The partner's limits: at most this many requests a second and a minute.
    pub per_second: u32,
    pub per_minute: u32,
}

impl fmt::Debug for PartnerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartnerReport")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("auth_header", &self.auth_header)
            .field("per_second", &self.per_second)
            .field("per_minute", &self.per_minute)
            .finish_non_exhaustive()
    }
}

fn default_report_method() -> String {
    "POST".into()
}

/// What a deal earns the partner: a lead counts when its last status reported
/// in the week is one of `counts_when`; it earns `rate` × its `of` slot
/// (`buyout_price` or `client_price`), or `fixed`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartnerCommission {
    pub counts_when: Vec<String>,
    pub rate: Option<f64>,
    pub of: String,
    pub fixed: Option<f64>,
}

impl Default for PartnerCommission {
    fn default() -> Self {
        PartnerCommission {
            counts_when: vec!["sold".into()],
            rate: Some(0.05),
            of: "buyout_price".into(),
            fixed: None,
        }
    }
}

/// The column names of the partner's own weekly report (for `settle --compare`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartnerSettlement {
    pub lead_id_column: String,
    pub status_column: String,
    pub amount_column: String,
}

impl Default for PartnerSettlement {
    fn default() -> Self {
        PartnerSettlement {
            lead_id_column: "lead_id".into(),
            status_column: "status".into(),
            amount_column: "commission".into(),
        }
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Full dotted path of the key, e.g. `shops.kaspi_main.token`.
    pub key: String,
    /// The layer the key came from (a file, the environment) or where it belongs.
    pub origin: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({}): {}", self.key, self.origin, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration:\n{}", list(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn list(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| format!("  - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Settings {
    /// Loads the layers and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let file_origin = file.map(|p| p.display().to_string());
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing {
                    path: path.to_path_buf(),
                });
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let database_url = env.get("DATABASE_URL").cloned();
        let database_url_env = database_url.is_some();
        let overrides: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ORDERBRIDGE__"))
            .collect();
        let overrides_keys: Vec<String> = overrides.keys().cloned().collect();
        builder = builder.add_source(
            config::Environment::with_prefix("ORDERBRIDGE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("outbox.retry.schedule")
                .source(Some(overrides)),
        );
        builder = builder.set_override_option("database.url", database_url)?;
        let layered = builder.build()?;
        let layers = Layers {
            file: match (file, file_origin) {
                (Some(path), Some(name)) => std::fs::read_to_string(path)
                    .ok()
                    .and_then(|text| text.parse::<toml::Table>().ok())
                    .map(|table| (name, table)),
                _ => None,
            },
            env_keys: overrides_keys,
            database_url_env,
        };

        let settings: Settings = match serde_path_to_error::deserialize(layered.clone()) {
            Ok(s) => s,
            Err(err) => {
                let key = err.path().to_string();
                let origin = layers.origin_of(&key);
                return Err(ConfigError::Invalid(vec![ConfigIssue {
                    key,
                    origin,
                    message: err.into_inner().to_string(),
                }]));
            }
        };
        let issues = settings.validate(|key| layers.origin_of(key));
        if issues.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError::Invalid(issues))
        }
    }

    /// Checks what serde cannot: references between sections, secrets, ranges.
    fn validate(&self, origin: impl Fn(&str) -> String) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut bad = |key: String, message: String| {
            let origin = origin(&key);
            issues.push(ConfigIssue {
                key,
                origin,
                message,
            });
        };
        if self.database.url.expose_secret().trim().is_empty() {
            bad("database.url".into(), "must not be empty".into());
        }
        if self.database.max_connections == 0 {
            bad(
                "database.max_connections".into(),
                "must be at least 1".into(),
            );
        }
        if let Err(error) = crate::sla::calendar::WorkCalendar::parse(
            &self.sla.timezone,
            &self.sla.working_hours,
            &self.sla.days_off,
        ) {
            let key = match &error {
                crate::sla::calendar::CalendarError::Timezone(_) => "sla.timezone",
                crate::sla::calendar::CalendarError::Hours(_) => "sla.working_hours",
                crate::sla::calendar::CalendarError::DayOff(_) => "sla.days_off",
            };
            bad(key.into(), error.to_string());
        }
        if !(self.sla.warn_fraction > 0.0 && self.sla.warn_fraction < 1.0) {
            bad(
                "sla.warn_fraction".into(),
                "must be between 0 and 1 (e.g. 0.8: a warning at 80% of the SLA)".into(),
            );
        }
        if self.sla.check_interval.is_zero() {
            bad("sla.check_interval".into(), "must be longer than 0s".into());
        }
        let o = &self.outbox;
        if o.concurrency == 0 {
            bad("outbox.concurrency".into(), "must be at least 1".into());
        }
        if o.claim_batch == 0 || o.claim_batch > 5000 {
            bad(
                "outbox.claim_batch".into(),
                "must be between 1 and 5000".into(),
            );
        }
        if o.heartbeat_interval.is_zero() || o.heartbeat_interval >= o.target_lease_ttl {
            bad(
                "outbox.heartbeat_interval".into(),
                "must be positive and shorter than outbox.target_lease_ttl".into(),
            );
        }
        if o.heartbeat_interval >= o.job_lease {
            bad(
                "outbox.heartbeat_interval".into(),
                "must be shorter than outbox.job_lease".into(),
            );
        }
        if o.poll_interval.is_zero() {
            bad("outbox.poll_interval".into(), "must be positive".into());
        }
        if o.retry.schedule.is_empty() {
            bad(
                "outbox.retry.schedule".into(),
                "needs at least one delay".into(),
            );
        }
        if !(0.0..=1.0).contains(&o.retry.jitter) {
            bad(
                "outbox.retry.jitter".into(),
                "must be between 0.0 and 1.0".into(),
            );
        }
        if o.retry.max_retry_after < o.retry.throttle_floor {
            bad(
                "outbox.retry.max_retry_after".into(),
                "must not be shorter than outbox.retry.throttle_floor".into(),
            );
        }
        for (target, quota) in &o.limits {
            check_quota(&format!("outbox.limits.{target}"), quota, &mut bad);
        }
        for (name, crm) in &self.crm_accounts {
            let base = format!("crm_accounts.{name}");
            check_url(&format!("{base}.base_url"), &crm.base_url, &mut bad);
            check_quota(&format!("{base}.rate_limit"), &crm.rate_limit, &mut bad);
            if crm.webhook_secret.is_some() && (crm.subdomain.is_none() || crm.account_id.is_none())
            {
                bad(
                    format!("{base}.webhook_secret"),
                    "webhooks need `subdomain` and `account_id` too, to check who sent them".into(),
                );
            }
            if let Some(secret) = &crm.webhook_secret {
                if secret.expose_secret().len() < 16 {
                    bad(format!("{base}.webhook_secret"), "must be at least 16 characters (it is the only proof a webhook is genuine)".into());
                }
            }
            match &crm.auth {
                CrmAuth::LongLived { token } => {
                    check_secret(&format!("{base}.auth.token"), token.as_ref(), &mut bad)
                }
                CrmAuth::Oauth {
                    client_secret,
                    redirect_uri,
                    ..
                } => {
                    check_secret(
                        &format!("{base}.auth.client_secret"),
                        client_secret.as_ref(),
                        &mut bad,
                    );
                    check_url(&format!("{base}.auth.redirect_uri"), redirect_uri, &mut bad);
                }
            }
        }
        for (name, shop) in &self.shops {
            let base = format!("shops.{name}");
            check_url(&format!("{base}.base_url"), &shop.base_url, &mut bad);
            if !self.crm_accounts.contains_key(&shop.crm_account) {
                let known: Vec<&str> = self.crm_accounts.keys().map(String::as_str).collect();
                bad(
                    format!("{base}.crm_account"),
                    format!(
                        "names no configured CRM account `{}` (configured: {})",
                        shop.crm_account,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            if shop.poll_interval.is_zero() {
                bad(format!("{base}.poll_interval"), "must be positive".into());
            }
            match shop.marketplace {
                MarketplaceKind::Kaspi => {
                    check_secret(&format!("{base}.token"), shop.token.as_ref(), &mut bad);
                    for extra in [
                        ("client_id", shop.client_id.is_some()),
                        ("client_secret", shop.client_secret.is_some()),
                    ] {
                        if extra.1 {
                            bad(
                                format!("{base}.{}", extra.0),
                                "is an Avito key; a Kaspi shop does not use it".into(),
                            );
                        }
                    }
                }
                MarketplaceKind::Avito => {
                    if shop
                        .client_id
                        .as_deref()
                        .is_none_or(|s| s.trim().is_empty())
                    {
                        bad(
                            format!("{base}.client_id"),
                            "is required for an Avito account".into(),
                        );
                    }
                    check_secret(
                        &format!("{base}.client_secret"),
                        shop.client_secret.as_ref(),
                        &mut bad,
                    );
                    if let Some(secret) = &shop.webhook_secret {
                        if secret.expose_secret().len() < 16 {
                            bad(
                                format!("{base}.webhook_secret"),
                                "must be at least 16 characters".into(),
                            );
                        }
                    }
                    let l = shop.avito_limits;
                    for (key, value) in [
                        ("orders_per_minute", l.orders_per_minute),
                        ("transitions_per_minute", l.transitions_per_minute),
                        ("tracking_per_minute", l.tracking_per_minute),
                        ("global_per_second", l.global_per_second),
                    ] {
                        if value == 0 {
                            bad(
                                format!("{base}.avito_limits.{key}"),
                                "must be at least 1".into(),
                            );
                        }
                    }
                    if shop.token.is_some() || shop.merchant_uid.is_some() {
                        bad(format!("{base}.token"), "is a Kaspi key; an Avito account does not use `token` or `merchant_uid`".into());
                    }
                }
            }
        }
        for (name, partner) in &self.partners {
            let base = format!("partners.{name}");
            if !self.crm_accounts.contains_key(&partner.crm_account) {
                bad(
                    format!("{base}.crm_account"),
                    format!("names no configured CRM account `{}`", partner.crm_account),
                );
            }
            if self.shops.contains_key(name) {
                bad(
                    base.clone(),
                    "a shop has the same name; give the partner source its own".into(),
                );
            }
            if let Some(url) = &partner.poll_url {
                check_url(&format!("{base}.poll_url"), url, &mut bad);
            }
            if let Some(secret) = &partner.webhook_secret {
                if secret.expose_secret().len() < 16 {
                    bad(
                        format!("{base}.webhook_secret"),
                        "must be at least 16 characters".into(),
                    );
                }
            }
            if partner.webhook_secret.is_none() && partner.poll_url.is_none() {
                bad(
                    base.clone(),
                    "needs `webhook_secret` (leads pushed to POST /hooks/partner/{source}/{secret}) or `poll_url` (leads polled), or both".into(),
                );
            }
            for (slot, pointer) in &partner.fields {
                if !PARTNER_SLOTS.contains(&slot.as_str()) {
                    bad(
                        format!("{base}.fields.{slot}"),
                        format!(
                            "is not a partner slot; the slots are: {}",
                            PARTNER_SLOTS.join(", ")
                        ),
                    );
                }
                if !(pointer.is_empty() || pointer.starts_with('/')) {
                    bad(
                        format!("{base}.fields.{slot}"),
                        format!("`{pointer}` is not a JSON pointer (it starts with `/`, e.g. `/device/model`)"),
                    );
                }
            }
            if !partner.fields.contains_key("lead_id") {
                bad(
                    format!("{base}.fields.lead_id"),
                    "is required: the partner's lead id makes a repeated lead one lead".into(),
                );
            }
            for slot in &partner.required {
                if !partner.fields.contains_key(slot) {
                    bad(
                        format!("{base}.required"),
                        format!("names `{slot}`, which has no pointer under {base}.fields"),
                    );
                }
            }
            let r = &partner.report;
            let url = r.url.replace("{lead_id}", "x").replace("{status}", "x");
            check_url(&format!("{base}.report.url"), &url, &mut bad);
            if !matches!(r.method.to_uppercase().as_str(), "POST" | "PUT" | "PATCH") {
                bad(
                    format!("{base}.report.method"),
                    "must be POST, PUT or PATCH".into(),
                );
            }
            if r.per_second == 0 {
                bad(
                    format!("{base}.report.per_second"),
                    "must be at least 1".into(),
                );
            }
            if r.per_minute == 0 {
                bad(
                    format!("{base}.report.per_minute"),
                    "must be at least 1".into(),
                );
            }
            if r.auth_header.is_some() != r.auth_value.is_some() {
                bad(
                    format!("{base}.report.auth_header"),
                    "`auth_header` and `auth_value` go together".into(),
                );
            }
            let c = &partner.commission;
            if c.rate.is_some() == c.fixed.is_some() {
                bad(
                    format!("{base}.commission"),
                    "give exactly one of `rate` (a share of `of`) or `fixed`".into(),
                );
            }
            if c.rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                bad(
                    format!("{base}.commission.rate"),
                    "must be between 0 and 1 (0.05 is 5 %)".into(),
                );
            }
            if !matches!(c.of.as_str(), "buyout_price" | "client_price") {
                bad(
                    format!("{base}.commission.of"),
                    "must be `buyout_price` or `client_price`".into(),
                );
            }
        }
        issues
    }

    /// Rate quotas by target key: explicit `outbox.limits` plus one per CRM account.
    pub fn target_quotas(&self) -> BTreeMap<String, RateQuota> {
        let mut quotas = BTreeMap::new();
        for (name, crm) in &self.crm_accounts {
            quotas.insert(format!("amocrm:{name}"), crm.rate_limit);
        }
        for (target, quota) in &self.outbox.limits {
            quotas.insert(target.clone(), *quota);
        }
        quotas
    }
}

fn check_quota(key: &str, quota: &RateQuota, bad: &mut impl FnMut(String, String)) {
    if quota.requests == 0 {
        bad(format!("{key}.requests"), "must be at least 1".into());
    }
    if quota.burst == 0 {
        bad(format!("{key}.burst"), "must be at least 1".into());
    }
    if quota.per.is_zero() {
        bad(format!("{key}.per"), "must be positive".into());
    }
}

fn check_url(key: &str, value: &str, bad: &mut impl FnMut(String, String)) {
    match reqwest::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => {}
        Ok(url) => bad(
            key.to_string(),
            format!("must be an http(s) URL, not {}:", url.scheme()),
        ),
        Err(e) => bad(key.to_string(), format!("is not a URL ({e})")),
    }
}

fn check_secret(key: &str, value: Option<&SecretString>, bad: &mut impl FnMut(String, String)) {
    match value {
        None => bad(key.to_string(), "secret is missing".into()),
        Some(s) if s.expose_secret().trim().is_empty() => {
            bad(key.to_string(), "secret is empty".into())
        }
        Some(_) => {}
    }
}

/// The layers as loaded, to say where a key came from.
struct Layers {
    file: Option<(String, toml::Table)>,
    env_keys: Vec<String>,
    database_url_env: bool,
}

impl Layers {
    /// The layer a key (or its nearest existing parent) came from; for a missing
    /// key, the operator's file (where it belongs) or the built-in defaults.
    fn origin_of(&self, key: &str) -> String {
        if key == "database.url" && self.database_url_env {
            return "environment variable DATABASE_URL".to_string();
        }
        let mut path: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
        while !path.is_empty() {
            let env_name = format!("ORDERBRIDGE__{}", path.join("__")).to_uppercase();
            if self.env_keys.iter().any(|k| k.to_uppercase() == env_name) {
                return format!("environment variable {env_name}");
            }
            if let Some((name, table)) = &self.file {
                if lookup(table, &path) {
                    return name.clone();
                }
            }
            if lookup_default(&path) {
                return DEFAULT_ORIGIN.to_string();
            }
            path.pop();
        }
        match &self.file {
            Some((name, _)) => name.clone(),
            None => DEFAULT_ORIGIN.to_string(),
        }
    }
}

fn lookup(table: &toml::Table, path: &[&str]) -> bool {
    let mut current = table;
    for (i, part) in path.iter().enumerate() {
        match current.get(*part) {
            Some(toml::Value::Table(t)) => current = t,
            Some(_) => return i + 1 == path.len(),
            None => return false,
        }
    }
    true
}

fn lookup_default(path: &[&str]) -> bool {
    DEFAULT_TOML
        .parse::<toml::Table>()
        .map(|t| lookup(&t, path))
        .unwrap_or(false)
}
