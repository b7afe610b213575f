//! Configuration layering and validation: every bad input names its key and layer.

use std::path::PathBuf;
use std::time::Duration;

use orderbridge::config::{ConfigError, Settings};
use secrecy::ExposeSecret;

fn write_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("orderbridge-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn issues(result: Result<Settings, ConfigError>) -> Vec<(String, String, String)> {
    match result {
        Ok(_) => panic!("expected the configuration to be refused"),
        Err(ConfigError::Invalid(issues)) => issues
            .into_iter()
            .map(|i| (i.key, i.origin, i.message))
            .collect(),
        Err(other) => panic!("expected validation issues, got {other}"),
    }
}

const TWO_ACCOUNTS: &str = r#"
[crm_accounts.main]
base_url = "https://example.amocrm.ru"
[crm_accounts.main.auth]
mode = "long_lived"
token = "crm-token-SECRET-1"

[crm_accounts.other]
base_url = "http://127.0.0.1:9000"
rate_limit = { requests = 3 }
[crm_accounts.other.auth]
mode = "oauth"
client_id = "client"
client_secret = "oauth-SECRET-2"
redirect_uri = "https://bridge.example.com/oauth"

[shops.kaspi_main]
marketplace = "kaspi"
crm_account = "main"
map = "config/maps/kaspi.toml"
base_url = "https://kaspi.kz/shop/api/v2"
token = "kaspi-SECRET-3"

[shops.kaspi_second]
marketplace = "kaspi"
crm_account = "other"
map = "config/maps/kaspi-b.toml"
base_url = "http://127.0.0.1:9001"
token = "kaspi-SECRET-4"

[shops.avito_main]
marketplace = "avito"
crm_account = "main"
map = "config/maps/avito.toml"
base_url = "https://api.avito.ru"
client_id = "avito-client"
client_secret = "avito-SECRET-5"
"#;

#[test]
fn the_built_in_defaults_load_and_validate() {
    let settings = Settings::load_from(None, env(&[])).unwrap();
    assert_eq!(settings.outbox.concurrency, 200);
    assert_eq!(
        settings.outbox.retry.schedule.first(),
        Some(&Duration::from_secs(1))
    );
    assert!(settings.crm_accounts.is_empty() && settings.shops.is_empty());
}

#[test]
fn layers_apply_in_order_file_then_environment_then_database_url() {
    let file = write_file(
        "layers.toml",
        "[outbox]\nconcurrency = 3\nclaim_batch = 7\n",
    );
    let settings = Settings::load_from(Some(&file), env(&[])).unwrap();
    assert_eq!(
        (settings.outbox.concurrency, settings.outbox.claim_batch),
        (3, 7)
    );

    let settings = Settings::load_from(
        Some(&file),
        env(&[
            ("ORDERBRIDGE__OUTBOX__CONCURRENCY", "5"),
            ("ORDERBRIDGE__OUTBOX__RETRY__SCHEDULE", "2s,1m"),
            ("ORDERBRIDGE__DATABASE__URL", "postgres://env@db/x"),
            ("DATABASE_URL", "postgres://wins@db/y"),
            ("UNRELATED", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(settings.outbox.concurrency, 5, "environment beats the file");
    assert_eq!(
        settings.outbox.claim_batch, 7,
        "the file beats the defaults"
    );
    assert_eq!(
        settings.outbox.retry.schedule,
        vec![Duration::from_secs(2), Duration::from_secs(60)]
    );
    assert_eq!(
        settings.database.url.expose_secret(),
        "postgres://wins@db/y"
    );
}

#[test]
fn any_number_of_accounts_and_shops_each_bound_to_one_crm_account() {
    let file = write_file("accounts.toml", TWO_ACCOUNTS);
    let settings = Settings::load_from(Some(&file), env(&[])).unwrap();
    assert_eq!(settings.crm_accounts.len(), 2);
    assert_eq!(settings.shops.len(), 3);
    assert_eq!(settings.shops["kaspi_second"].crm_account, "other");
    assert_eq!(
        settings.shops["kaspi_second"].base_url,
        "http://127.0.0.1:9001"
    );
    let quotas = settings.target_quotas();
    assert_eq!(
        quotas["amocrm:main"].requests, 7,
        "amoCRM's 7 req/s is the default"
    );
    assert_eq!(quotas["amocrm:other"].requests, 3);
}

#[test]
fn secrets_never_print() {
    let file = write_file("secrets.toml", TWO_ACCOUNTS);
    let settings = Settings::load_from(
        Some(&file),
        env(&[("DATABASE_URL", "postgres://user:db-SECRET-6@host/db")]),
    )
    .unwrap();
    let printed = format!("{settings:?}");
    for n in 1..=6 {
        assert!(
            !printed.contains(&format!("SECRET-{n}")),
            "secret {n} leaked: {printed}"
        );
    }
    assert!(printed.contains("REDACTED"));
}

#[test]
fn an_unknown_key_is_refused_with_its_path_and_file() {
    let file = write_file("typo.toml", "[outbox]\nconcurency = 3\n");
    let found = issues(Settings::load_from(Some(&file), env(&[])));
    assert_eq!(found.len(), 1);
    let (key, origin, message) = &found[0];
    assert_eq!(key, "outbox.concurency");
    assert_eq!(origin, &file.display().to_string());
    assert!(message.contains("unknown field `concurency`"), "{message}");
}

#[test]
fn a_wrong_type_is_refused_with_its_path_and_layer() {
    let file = write_file("type.toml", "[outbox]\njob_lease = \"soon\"\n");
    let found = issues(Settings::load_from(Some(&file), env(&[])));
    assert_eq!(found[0].0, "outbox.job_lease");
    assert_eq!(found[0].1, file.display().to_string());

    let found = issues(Settings::load_from(
        None,
        env(&[("ORDERBRIDGE__OUTBOX__CONCURRENCY", "many")]),
    ));
    assert_eq!(found[0].0, "outbox.concurrency");
    assert_eq!(
        found[0].1,
        "environment variable ORDERBRIDGE__OUTBOX__CONCURRENCY"
    );
}

#[test]
fn missing_secrets_and_dangling_references_are_all_reported_at_once() {
    let file = write_file(
        "missing.toml",
        r#"
[crm_accounts.main]
base_url = "https://example.amocrm.ru"
auth = { mode = "long_lived" }

[shops.kaspi_main]
marketplace = "kaspi"
crm_account = "mian"
map = "config/maps/kaspi.toml"
base_url = "not a url"

[shops.avito_main]
marketplace = "avito"
crm_account = "main"
map = "config/maps/avito.toml"
base_url = "https://api.avito.ru"
client_id = "id"
"#,
    );
    let found = issues(Settings::load_from(Some(&file), env(&[])));
    let keys: Vec<&str> = found.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "crm_accounts.main.auth.token",
            "shops.avito_main.client_secret",
            "shops.kaspi_main.base_url",
            "shops.kaspi_main.crm_account",
            "shops.kaspi_main.token",
        ]
    );
    for (key, origin, _) in &found {
        assert_eq!(origin, &file.display().to_string(), "{key}");
    }
    let crm = found
        .iter()
        .find(|i| i.0 == "shops.kaspi_main.crm_account")
        .unwrap();
    assert!(
        crm.2.contains("`mian`") && crm.2.contains("configured: main"),
        "{}",
        crm.2
    );
    assert!(found[0].2.contains("secret is missing"));
}

#[test]
fn a_secret_given_by_environment_satisfies_validation() {
    let file = write_file(
        "env-secret.toml",
        "[crm_accounts.main]\nbase_url = \"https://example.amocrm.ru\"\nauth = { mode = \"long_lived\" }\n",
    );
    let settings = Settings::load_from(
        Some(&file),
        env(&[("ORDERBRIDGE__CRM_ACCOUNTS__MAIN__AUTH__TOKEN", "from-env")]),
    )
    .unwrap();
    match &settings.crm_accounts["main"].auth {
        orderbridge::config::CrmAuth::LongLived { token: Some(token) } => {
            assert_eq!(token.expose_secret(), "from-env")
        }
        other => panic!("unexpected auth {other:?}"),
    }
}

#[test]
fn out_of_range_engine_settings_are_refused() {
    let file = write_file(
        "ranges.toml",
        "[outbox]\nconcurrency = 0\nheartbeat_interval = \"1m\"\n[outbox.retry]\njitter = 1.5\nschedule = []\n",
    );
    let keys: Vec<String> = issues(Settings::load_from(Some(&file), env(&[])))
        .into_iter()
        .map(|i| i.0)
        .collect();
    for expected in [
        "outbox.concurrency",
        "outbox.heartbeat_interval",
        "outbox.retry.schedule",
        "outbox.retry.jitter",
    ] {
        assert!(
            keys.iter().any(|k| k == expected),
            "{expected} missing from {keys:?}"
        );
    }
}

#[test]
fn a_missing_config_file_is_an_error() {
    let missing = std::env::temp_dir().join("orderbridge-no-such-file.toml");
    assert!(matches!(
        Settings::load_from(Some(&missing), env(&[])),
        Err(ConfigError::Missing { .. })
    ));
}

#[test]
fn working_hours_without_any_working_time_are_refused_at_load() {
    let file = write_file(
        "no-hours.toml",
        "[sla]\nworking_hours = \"\"\nwarn_fraction = 1.5\n",
    );
    let found = issues(Settings::load_from(Some(&file), env(&[])));
    let keys: Vec<&str> = found.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        vec!["sla.working_hours", "sla.warn_fraction"],
        "{found:?}"
    );
    assert!(
        found[0].2.contains("no working time at all"),
        "{}",
        found[0].2
    );
    assert_eq!(found[0].1, file.display().to_string());
    let ok = write_file(
        "office-hours.toml",
        "[sla]\nworking_hours = \"mon-fri 09:00-18:00; sat 10:00-14:00\"\ndays_off = [\"2026-12-16\"]\n",
    );
    assert!(Settings::load_from(Some(&ok), env(&[])).is_ok());
}
