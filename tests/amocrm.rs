//! Contract tests of the amoCRM client against the amoCRM simulator (real HTTP,
//! real PostgreSQL): every operation and every error path of the connector.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use orderbridge::config::RateQuota;
use orderbridge::connectors::amocrm::*;
use orderbridge::domain::{Email, Phone};
use orderbridge::outbox::limits::Limiters;
use orderbridge::outbox::RetryAction;
use orderbridge::sim::amocrm::{AmoSim, AmoSimConfig, Fault};
use orderbridge::store::ScratchDatabase;
use secrecy::SecretString;

const SEVEN_PER_SECOND: RateQuota = RateQuota {
    requests: 7,
    per: Duration::from_secs(1),
    burst: 1,
};

fn oauth(config: &AmoSimConfig) -> AmoAuth {
    AmoAuth::OAuth {
        client_id: config.client_id.clone(),
        client_secret: SecretString::from(config.client_secret.clone()),
        redirect_uri: config.redirect_uri.clone(),
    }
}

struct Setup {
    db: ScratchDatabase,
    sim: AmoSim,
    config: AmoSimConfig,
    limiters: Arc<Limiters>,
}

impl Setup {
    async fn new(config: AmoSimConfig) -> Setup {
        let db = fresh_db().await;
        let sim = AmoSim::start(config.clone())
            .await
            .expect("simulator starts");
        let limiters =
            Arc::new(Limiters::new([]).with_per_request("amocrm:main", SEVEN_PER_SECOND));
        Setup {
            db,
            sim,
            config,
            limiters,
        }
    }

    fn account(&self, auth: AmoAuth) -> AmoAccount {
        AmoAccount {
            name: "main".into(),
            base_url: reqwest::Url::parse(&self.sim.base_url()).unwrap(),
            auth,
            timeout: Duration::from_secs(2),
            circuit_cooldown: Duration::from_secs(600),
        }
    }

    /// An OAuth client whose token table is seeded with the simulator's refresh token.
    async fn client(&self) -> AmoClient {
        let client = AmoClient::new(
            self.account(oauth(&self.config)),
            self.db.pool.clone(),
            self.limiters.limiter("amocrm:main"),
        )
        .unwrap();
        client
            .seed_refresh_token(&SecretString::from(
                self.config.initial_refresh_token.clone(),
            ))
            .await
            .unwrap();
        client
    }

    async fn finish(self) {
        self.db.drop_now().await.unwrap();
    }
}

fn lead(request_id: &str, pipeline: u64, status: u64) -> NewLead {
    NewLead {
        request_id: request_id.into(),
        name: format!("Order {request_id}"),
        price: Some(4590),
        pipeline_id: pipeline,
        status_id: status,
        responsible_user_id: None,
        fields: vec![],
        tags: vec!["kaspi".into()],
        contact_ids: vec![],
    }
}

async fn stored_tokens(db: &ScratchDatabase) -> (Option<String>, String, Option<String>) {
    let row = orderbridge::store::tokens::current(&db.pool, "main")
        .await
        .unwrap()
        .unwrap();
    (
        row.access_token,
        row.refresh_token,
        row.previous_refresh_token,
    )
}

// ---- auth -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_refreshes_and_commits_the_new_pair_before_using_it() {
    let s = Setup::new(AmoSimConfig::default()).await;
    s.sim.seed_pipeline("Kaspi", &["New order", "Assembling"]);
    let client = s.client().await;
    let pipelines = client.pipelines().await.unwrap();
    assert_eq!(s.sim.refresh_calls(), 1);
    let (access, refresh, previous) = stored_tokens(&s.db).await;
    assert!(access.is_some(), "the access token is stored");
    assert_ne!(
        refresh, s.config.initial_refresh_token,
        "the refresh token rotated"
    );
    assert_eq!(
        previous.as_deref(),
        Some(s.config.initial_refresh_token.as_str())
    );
    // The pipeline as amoCRM has it: incoming first, won/lost system stages.
    let kaspi = pipelines.iter().find(|p| p.name == "Kaspi").unwrap();
    let kinds: Vec<StageKind> = kaspi.stages.iter().map(|s| s.kind).collect();
    assert_eq!(kinds.first(), Some(&StageKind::Incoming));
    assert!(kinds.contains(&StageKind::Won) && kinds.contains(&StageKind::Lost));
    // Later calls use the stored token: no more refreshes.
    client.users().await.unwrap();
    client.reload_pipelines().await.unwrap();
    assert_eq!(s.sim.refresh_calls(), 1);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_lost_between_refresh_and_commit_is_recovered() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    // A process refreshed with the stored token and crashed before committing:
    // amoCRM rotated, our table still holds the old refresh token.
    let lost = reqwest::Client::new()
        .post(format!("{}/oauth2/access_token", s.sim.base_url()))
        .json(&serde_json::json!({
            "client_id": s.config.client_id,
            "client_secret": s.config.client_secret,
            "grant_type": "refresh_token",
            "refresh_token": s.config.initial_refresh_token,
            "redirect_uri": s.config.redirect_uri,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(lost.status(), 200);
    // The old token is still good until the new one is used: the client recovers.
    client.users().await.unwrap();
    let (_, refresh, _) = stored_tokens(&s.db).await;
    assert_ne!(refresh, s.config.initial_refresh_token);
    // And the rotated pair keeps working across a forced refresh.
    sqlx::query("UPDATE oauth_tokens SET access_token = 'expired-token'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let fresh = AmoClient::new(
        s.account(oauth(&s.config)),
        s.db.pool.clone(),
        s.limiters.limiter("amocrm:main"),
    )
    .unwrap();
    fresh.users().await.unwrap();
    assert_eq!(s.sim.refresh_calls(), 3);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_refreshes_make_one_refresh_call() {
    let s = Setup::new(AmoSimConfig::default()).await;
    // Two replicas (two clients, one database), both without an access token.
    let a = s.client().await;
    let b = AmoClient::new(
        s.account(oauth(&s.config)),
        s.db.pool.clone(),
        s.limiters.limiter("amocrm:main"),
    )
    .unwrap();
    let (ra, rb) = tokio::join!(a.users(), b.users());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(s.sim.refresh_calls(), 1, "one refresh for both replicas");
    assert_eq!(s.sim.count_status(401), 0);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_triggers_one_refresh_and_one_retry() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    client.users().await.unwrap();
    assert_eq!(s.sim.refresh_calls(), 1);
    // The stored access token stops working (e.g. revoked by amoCRM).
    sqlx::query("UPDATE oauth_tokens SET access_token = 'no-longer-valid'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let other = AmoClient::new(
        s.account(oauth(&s.config)),
        s.db.pool.clone(),
        s.limiters.limiter("amocrm:main"),
    )
    .unwrap();
    other.users().await.unwrap();
    assert_eq!(s.sim.refresh_calls(), 2, "exactly one refresh");
    assert_eq!(s.sim.count_status(401), 1, "exactly one refused call");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_integration_is_a_permanent_failure() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    client.users().await.unwrap();
    s.sim.revoke_all_tokens();
    let error = client.users().await.unwrap_err();
    assert!(
        matches!(
            error,
            AmoError::Unauthorized {
                after_refresh: true,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.is_alert());
    assert!(matches!(error.classify(), RetryAction::Permanent { .. }));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_token_is_used_as_is_and_never_refreshed() {
    let config = AmoSimConfig {
        long_lived_token: Some("long-lived-token-abc".into()),
        ..AmoSimConfig::default()
    };
    let s = Setup::new(config).await;
    let good = AmoClient::new(
        s.account(AmoAuth::LongLived(SecretString::from(
            "long-lived-token-abc",
        ))),
        s.db.pool.clone(),
        None,
    )
    .unwrap();
    good.users().await.unwrap();
    let bad = AmoClient::new(
        s.account(AmoAuth::LongLived(SecretString::from("wrong"))),
        s.db.pool.clone(),
        None,
    )
    .unwrap();
    let error = bad.users().await.unwrap_err();
    assert!(
        matches!(
            error,
            AmoError::Unauthorized {
                after_refresh: false,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(s.sim.refresh_calls(), 0);
    assert!(!format!(
        "{:?}",
        s.account(AmoAuth::LongLived(SecretString::from(
            "long-lived-token-abc"
        )))
    )
    .contains("abc"));
    s.finish().await;
}

// ---- rate limit and circuit -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_make_no_429_and_use_the_budget() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    client.users().await.unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8u64 {
        let client = client.clone();
        tasks.spawn(async move {
            for i in 0..125u64 {
                // A missing lead: 204, never an error.
                let found = client.lead(1_000_000 + worker * 1000 + i).await.unwrap();
                assert!(found.is_none());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = 1000.0 / elapsed;
    assert_eq!(s.sim.count_status(429), 0, "no request over the limit");
    assert!(
        rate >= 0.95 * 7.0,
        "only {rate:.2} req/s of the 7 req/s budget"
    );
    assert!(rate <= 7.0, "{rate:.2} req/s is over the limit");
    s.finish().await;
}

/// Three replicas, each its own process-local limiter at 7/s, share the
/// account's request slots through the database: together they stay within
/// amoCRM's 7 a second (each alone would send 7), with no 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_request_slots_stay_within_the_accounts_seven_a_second() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let spacing = Duration::from_secs(1).mul_f64(orderbridge::connectors::amocrm::RATE_MARGIN) / 7;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        // A limiter of its own per replica, as separate processes have.
        let own = Limiters::new([]).with_per_request("amocrm:main", SEVEN_PER_SECOND);
        let client = AmoClient::new(
            s.account(oauth(&s.config)),
            s.db.pool.clone(),
            own.limiter("amocrm:main"),
        )
        .unwrap()
        .with_shared_slots(spacing);
        client
            .seed_refresh_token(&SecretString::from(s.config.initial_refresh_token.clone()))
            .await
            .unwrap();
        replicas.push(client);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (r, client) in replicas.into_iter().enumerate() {
        for worker in 0..3u64 {
            let client = client.clone();
            tasks.spawn(async move {
                for i in 0..10u64 {
                    let id = 2_000_000 + r as u64 * 10_000 + worker * 100 + i;
                    assert!(client.lead(id).await.unwrap().is_none());
                }
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(s.sim.count_status(429), 0, "no request over the limit");
    let busiest = s.sim.max_requests_in_any_second();
    assert!(busiest <= 7, "{busiest} requests in one second");
    let calls = s.sim.requests().len() as f64;
    assert!(
        calls / elapsed >= 0.85 * 7.0,
        "the replicas together use the budget: {:.2} req/s",
        calls / elapsed
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_after_the_servers_retry_after() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    client.users().await.unwrap();
    s.sim.inject(Fault::TooManyRequests, 1);
    let error = client.users().await.unwrap_err();
    let AmoError::RateLimited {
        retry_after: Some(after),
    } = error
    else {
        panic!("expected a 429 with retry_after, got {error}");
    };
    assert!(matches!(
        AmoError::RateLimited { retry_after: Some(after) }.classify(),
        RetryAction::RetryAfter { after: a, .. } if a == after
    ));
    client.users().await.unwrap();
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_stops_all_traffic_to_the_account_until_reset() {
    let config = AmoSimConfig {
        rate_per_second: 3,
        block_after_429s: 2,
        long_lived_token: Some("long-lived-token-abc".into()),
        ..AmoSimConfig::default()
    };
    let s = Setup::new(config).await;
    let token = || AmoAuth::LongLived(SecretString::from("long-lived-token-abc"));
    // An integration that ignores the limit (no limiter) gets the IP blocked.
    let reckless = AmoClient::new(s.account(token()), s.db.pool.clone(), None).unwrap();
    let mut blocked = None;
    for _ in 0..50 {
        match reckless.users().await {
            Err(e @ AmoError::Blocked { .. }) => {
                blocked = Some(e);
                break;
            }
            Ok(_) | Err(AmoError::RateLimited { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let blocked = blocked.expect("the simulator blocks after repeated 429s");
    assert!(blocked.is_alert());
    assert!(s.sim.is_blocked());
    let calls = s.sim.requests().len();
    // No more traffic from this client, nor from another replica's.
    let error = reckless.users().await.unwrap_err();
    assert!(matches!(error, AmoError::CircuitOpen { .. }), "{error}");
    assert!(matches!(error.classify(), RetryAction::Wait { .. }));
    let other = AmoClient::new(s.account(token()), s.db.pool.clone(), None).unwrap();
    assert!(matches!(
        other.users().await,
        Err(AmoError::CircuitOpen { .. })
    ));
    assert_eq!(
        s.sim.requests().len(),
        calls,
        "not one request after the 403"
    );
    let open = orderbridge::store::circuits::list_open(&s.db.pool, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].target, "amocrm:main");

    // Two jobs put off for 30 min: one by the open circuit (its last error
    // the connector's own), one by a 500's back-off.
    let put_off: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox_jobs (kind, target, ordering_key, payload, run_at, last_error, failures)
         VALUES ('crm_test', 'amocrm:main', 'k1', '{}', now() + interval '30 minutes', $1, 1),
                ('crm_test', 'amocrm:main', 'k2', '{}', now() + interval '30 minutes', 'amoCRM answered 500', 1)
         RETURNING id",
    )
    .bind(error.to_string())
    .fetch_all(&s.db.pool)
    .await
    .unwrap();

    // Support unblocks the IP; the operator resets the circuit: what the
    // circuit put off is due at once (found by `prove api-faults`: it waited
    // out the 30-minute cool-down after the reset), nothing else.
    s.sim.unblock();
    assert_eq!(
        orderbridge::store::circuits::close(&s.db.pool, "amocrm:main")
            .await
            .unwrap(),
        (true, 1)
    );
    let due: Vec<bool> =
        sqlx::query_scalar("SELECT run_at IS NULL FROM outbox_jobs WHERE id = ANY($1) ORDER BY id")
            .bind(&put_off)
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(due, [true, false]);
    // A replica that still had the circuit cached as open put a job off
    // after the reset; the moment it reads the circuit gone, that job is due.
    let late: i64 = sqlx::query_scalar(
        "INSERT INTO outbox_jobs (kind, target, ordering_key, payload, run_at, last_error, failures)
         VALUES ('crm_test', 'amocrm:main', 'k3', '{}', now() + interval '10 minutes', $1, 1)
         RETURNING id",
    )
    .bind(error.to_string())
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    other.users().await.unwrap();
    let woken: bool = sqlx::query_scalar("SELECT run_at IS NULL FROM outbox_jobs WHERE id = $1")
        .bind(late)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert!(woken, "the job put off on the stale circuit still waits");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_timeouts_and_resets_are_retryable() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    client.users().await.unwrap();
    s.sim.inject(Fault::ServerError, 1);
    let e = client.users().await.unwrap_err();
    assert!(matches!(e, AmoError::Server { status: 500, .. }), "{e}");
    assert!(matches!(e.classify(), RetryAction::Retry { .. }));
    s.sim.inject(Fault::ConnectionReset, 1);
    let e = client.users().await.unwrap_err();
    assert!(
        matches!(e, AmoError::Network(_) | AmoError::Decode { .. }),
        "{e}"
    );
    assert!(matches!(e.classify(), RetryAction::Retry { .. }));
    s.sim.inject(Fault::Timeout, 1);
    let e = client.users().await.unwrap_err();
    assert!(matches!(e, AmoError::Timeout(_)), "{e}");
    assert!(matches!(
        e.classify(),
        RetryAction::Retry {
            cause: orderbridge::outbox::RetryCause::Timeout,
            ..
        }
    ));
    client.users().await.unwrap();
    s.finish().await;
}

// ---- leads ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_invalid_item_creates_the_others() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let pipeline = s.sim.seed_pipeline("Kaspi", &["New order"]);
    let stage = pipeline.stages[1].0;
    let client = s.client().await;
    let outcome = client
        .create_leads(&[
            lead("KSP-1", pipeline.id, stage),
            lead("KSP-2", pipeline.id, 999_999),
            lead("KSP-3", pipeline.id, stage),
        ])
        .await
        .unwrap();
    let done: Vec<&str> = outcome.done.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(done, vec!["KSP-1", "KSP-3"]);
    assert_eq!(outcome.rejected.len(), 1);
    assert_eq!(outcome.rejected[0].request_id, "KSP-2");
    assert!(!outcome.rejected[0].errors.is_empty());
    let leads = s.sim.leads();
    assert_eq!(leads.len(), 2);
    assert!(leads
        .iter()
        .all(|l| l.status_id == stage && l.pipeline_id == pipeline.id));
    assert!(leads.iter().all(|l| l.tags == vec!["kaspi".to_string()]));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_at_most_fifty_and_a_504_splits_them() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let pipeline = s.sim.seed_pipeline("Kaspi", &["New order"]);
    let stage = pipeline.stages[1].0;
    let client = s.client().await;
    let many: Vec<NewLead> = (0..120)
        .map(|i| lead(&format!("KSP-{i}"), pipeline.id, stage))
        .collect();
    let outcome = client.create_leads(&many).await.unwrap();
    assert_eq!(outcome.done.len(), 120);
    let posts: Vec<usize> = s
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v4/leads")
        .map(|r| {
            serde_json::from_str::<Vec<serde_json::Value>>(&r.body)
                .map(|v| v.len())
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(posts, vec![50, 50, 20]);

    s.sim.inject(Fault::GatewayTimeout, 1);
    let four: Vec<NewLead> = (0..4)
        .map(|i| lead(&format!("SPLIT-{i}"), pipeline.id, stage))
        .collect();
    let outcome = client.create_leads(&four).await.unwrap();
    assert_eq!(outcome.done.len(), 4);
    let sizes: Vec<(u16, usize)> = s
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.body.contains("SPLIT-"))
        .map(|r| {
            (
                r.status,
                serde_json::from_str::<Vec<serde_json::Value>>(&r.body)
                    .map(|v| v.len())
                    .unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(sizes, vec![(504, 4), (200, 2), (200, 2)]);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_move_stage_with_pipeline_and_add_tags_without_replacing() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let pipeline = s.sim.seed_pipeline("Kaspi", &["New order", "Assembling"]);
    let (new, assembling) = (pipeline.stages[1].0, pipeline.stages[2].0);
    let field = s.sim.seed_lead_field("Order code", "text", &[]);
    let user = s.sim.seed_user("Aigerim");
    let client = s.client().await;
    let created = client
        .create_leads(&[lead("KSP-1", pipeline.id, new)])
        .await
        .unwrap();
    let id = created.done[0].1;
    let outcome = client
        .update_leads(&[LeadUpdate {
            id,
            stage: Some((pipeline.id, assembling)),
            price: Some(5000),
            responsible_user_id: Some(user),
            fields: vec![FieldValue {
                field_id: field.id,
                values: vec![FieldInput::Text("KSP-1".into())],
            }],
            tags_to_add: vec!["accepted".into()],
            ..LeadUpdate::default()
        }])
        .await
        .unwrap();
    assert_eq!(outcome.done, vec![(id.to_string(), id)]);
    let stored = s.sim.lead(id).unwrap();
    assert_eq!(
        (stored.pipeline_id, stored.status_id, stored.price),
        (pipeline.id, assembling, 5000)
    );
    assert_eq!(stored.responsible_user_id, user);
    let mut tags = stored.tags.clone();
    tags.sort();
    assert_eq!(tags, vec!["accepted".to_string(), "kaspi".to_string()]);
    let patch = s
        .sim
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.method == "PATCH")
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&patch.body).unwrap();
    assert_eq!(
        body[0]["pipeline_id"], pipeline.id,
        "status is always sent with its pipeline"
    );

    // Read back: by id, by ids, by updated_at.
    let read = client.lead(id).await.unwrap().unwrap();
    assert_eq!(read.status_id, assembling);
    assert!(read
        .fields
        .iter()
        .any(|(f, v)| *f == field.id && v == &vec!["KSP-1".to_string()]));
    assert_eq!(client.leads_by_ids(&[id, 987_654]).await.unwrap().len(), 1);
    assert_eq!(client.leads_updated_since(0).await.unwrap().len(), 1);
    // An unknown id in an update is refused alone.
    let outcome = client
        .update_leads(&[
            LeadUpdate {
                id: 424_242,
                stage: Some((pipeline.id, new)),
                ..LeadUpdate::default()
            },
            LeadUpdate {
                id,
                stage: Some((pipeline.id, WON_STATUS_ID)),
                ..LeadUpdate::default()
            },
        ])
        .await
        .unwrap();
    assert_eq!(outcome.done.len(), 1);
    assert_eq!(outcome.rejected.len(), 1);
    assert_eq!(outcome.rejected[0].request_id, "424242");
    assert_eq!(s.sim.lead(id).unwrap().status_id, WON_STATUS_ID);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_updated_since_reads_every_page() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let pipeline = s.sim.seed_pipeline("Kaspi", &["New order"]);
    let client = s.client().await;
    let many: Vec<NewLead> = (0..260)
        .map(|i| lead(&format!("KSP-{i}"), pipeline.id, pipeline.stages[1].0))
        .collect();
    client.create_leads(&many).await.unwrap();
    let read = client.leads_updated_since(0).await.unwrap();
    assert_eq!(read.len(), 260);
    let pages = s
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v4/leads")
        .count();
    assert_eq!(pages, 2, "250 per page");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_answers_are_204_and_never_errors() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    assert_eq!(client.lead(123_456).await.unwrap(), None);
    assert!(client.leads_by_ids(&[123_456]).await.unwrap().is_empty());
    let phone = Phone::parse("+77000000000").unwrap();
    assert!(client
        .find_contacts(Some(&phone), None)
        .await
        .unwrap()
        .is_empty());
    assert!(client
        .status_changes_since(chrono::Utc::now().timestamp())
        .await
        .unwrap()
        .is_empty());
    assert!(client
        .leads_updated_since(chrono::Utc::now().timestamp() + 3600)
        .await
        .unwrap()
        .is_empty());
    assert!(s.sim.count_status(204) >= 5);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complex_create_reads_the_bare_array_answer() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let pipeline = s.sim.seed_pipeline("Avito", &["New order"]);
    let client = s.client().await;
    let created = client
        .create_leads_complex(&[NewComplexLead {
            lead: lead("AV-1", pipeline.id, pipeline.stages[1].0),
            contact: Some(NewContact {
                request_id: "AV-1".into(),
                name: "Ivan".into(),
                phone: Some(Phone::parse("+7 701 555 44 33").unwrap()),
                email: Email::parse("ivan@example.kz"),
            }),
        }])
        .await
        .unwrap();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].request_id, "AV-1");
    assert!(!created[0].merged);
    let contact_id = created[0].contact_id.expect("a contact was created");
    let contact = s
        .sim
        .contacts()
        .into_iter()
        .find(|c| c.id == contact_id)
        .unwrap();
    assert_eq!(contact.phones, vec!["+77015554433".to_string()]);
    assert_eq!(
        s.sim.lead(created[0].lead_id).unwrap().contact_ids,
        vec![contact_id]
    );
    s.finish().await;
}

// ---- contacts, notes, tasks ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_search_keeps_only_real_phone_and_email_matches() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let same = s.sim.seed_contact("Ivan", &["8 (701) 123-45-67"], &[]);
    // Fuzzy hits amoCRM returns for the same digits: a longer number, a name.
    s.sim.seed_contact("Other", &["+7 701 123 45 678"], &[]);
    s.sim
        .seed_contact("Courier 7011234567", &["+77779998877"], &[]);
    let by_mail = s.sim.seed_contact("Aigul", &[], &["Aigul@Example.kz"]);
    s.sim
        .seed_contact("Near", &[], &["aigul@example.kz.evil.com"]);
    let client = s.client().await;
    let phone = Phone::parse("+77011234567").unwrap();
    let found = client.find_contacts(Some(&phone), None).await.unwrap();
    assert_eq!(found.iter().map(|c| c.id).collect::<Vec<_>>(), vec![same]);
    let email = Email::parse("aigul@example.kz").unwrap();
    let found = client.find_contacts(None, Some(&email)).await.unwrap();
    assert_eq!(
        found.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![by_mail]
    );
    let both = client
        .find_contacts(Some(&phone), Some(&email))
        .await
        .unwrap();
    assert_eq!(both.len(), 2);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_links_notes_and_tasks_are_written() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let pipeline = s.sim.seed_pipeline("Kaspi", &["New order"]);
    let user = s.sim.seed_user("Manager");
    let client = s.client().await;
    let lead_id = client
        .create_leads(&[lead("KSP-9", pipeline.id, pipeline.stages[1].0)])
        .await
        .unwrap()
        .done[0]
        .1;
    let contacts = client
        .create_contacts(&[NewContact {
            request_id: "c-1".into(),
            name: "Dana".into(),
            phone: Some(Phone::parse("87019998877").unwrap()),
            email: None,
        }])
        .await
        .unwrap();
    let contact_id = contacts.done[0].1;
    assert_eq!(contacts.done[0].0, "c-1");
    client
        .link_contact(lead_id, contact_id, true)
        .await
        .unwrap();
    assert!(s
        .sim
        .links()
        .iter()
        .any(|l| l.lead_id == lead_id && l.contact_id == contact_id && l.main));
    let notes = client
        .add_notes(&[NewNote {
            request_id: "n-1".into(),
            lead_id,
            text: "Order cancelled by the buyer".into(),
        }])
        .await
        .unwrap();
    assert_eq!(notes.done.len(), 1);
    assert!(s.sim.notes().iter().any(|n| n.entity_id == lead_id
        && n.note_type == "common"
        && n.text == "Order cancelled by the buyer"));
    let tasks = client
        .add_tasks(&[NewTask {
            request_id: "sla-KSP-9".into(),
            text: "SLA: order KSP-9 not accepted within 15 min".into(),
            complete_till: 1_900_000_000,
            responsible_user_id: Some(user),
            lead_id: Some(lead_id),
        }])
        .await
        .unwrap();
    assert_eq!(tasks.done.len(), 1);
    let task = &s.sim.tasks()[0];
    assert_eq!(
        (
            task.entity_id,
            task.entity_type.as_deref(),
            task.responsible_user_id
        ),
        (Some(lead_id), Some("leads"), user)
    );
    assert_eq!(task.complete_till, 1_900_000_000);
    s.finish().await;
}

// ---- reference data, events, webhooks ----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_stage_id_refreshes_the_pipeline_cache() {
    let s = Setup::new(AmoSimConfig::default()).await;
    s.sim.seed_pipeline("Kaspi", &["New order"]);
    let field = s
        .sim
        .seed_lead_field("Delivery", "select", &["Kaspi Delivery", "Pickup"]);
    let client = s.client().await;
    client.pipelines().await.unwrap();
    let later = s.sim.seed_pipeline("Avito", &["Confirm"]);
    let stage = client
        .stage(later.id, later.stages[1].0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stage.name, "Confirm");
    assert_eq!(client.stage(later.id, 1).await.unwrap(), None);
    let fields = client.lead_custom_fields().await.unwrap();
    let delivery = fields.iter().find(|f| f.id == field.id).unwrap();
    assert_eq!(
        delivery
            .enums
            .iter()
            .map(|e| e.1.as_str())
            .collect::<Vec<_>>(),
        vec!["Kaspi Delivery", "Pickup"]
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_change_events_are_read_across_pages() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let pipeline = s.sim.seed_pipeline("Kaspi", &["New order", "Assembling"]);
    let manager = s.sim.seed_user("Manager");
    let client = s.client().await;
    let from = chrono::Utc::now().timestamp() - 1;
    let lead_id = client
        .create_leads(&[lead("KSP-1", pipeline.id, pipeline.stages[1].0)])
        .await
        .unwrap()
        .done[0]
        .1;
    for i in 0..260 {
        let stage = if i % 2 == 0 {
            pipeline.stages[2].0
        } else {
            pipeline.stages[1].0
        };
        s.sim
            .manager_moves_lead(lead_id, pipeline.id, stage, manager);
    }
    let events = client.status_changes_since(from).await.unwrap();
    assert_eq!(events.len(), 260, "every move, over two pages");
    let pages = s
        .sim
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v4/events")
        .count();
    assert_eq!(pages, 2);
    let last = events.last().unwrap();
    assert_eq!(last.lead_id, lead_id);
    assert_eq!(last.created_by, manager);
    assert!(last.after.is_some() && last.before.is_some());
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_webhook_is_subscribed_again() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    let destination = "https://bridge.example/hooks/amocrm/0123456789abcdef";
    assert!(client
        .ensure_webhook(destination, &["status_lead"])
        .await
        .unwrap());
    assert!(
        !client
            .ensure_webhook(destination, &["status_lead"])
            .await
            .unwrap(),
        "already fine"
    );
    s.sim.set_webhook_disabled(destination, true);
    assert!(client
        .ensure_webhook(destination, &["status_lead"])
        .await
        .unwrap());
    let hooks = client.webhooks().await.unwrap();
    assert_eq!(hooks.len(), 1);
    assert!(!hooks[0].disabled);
    assert_eq!(hooks[0].settings, vec!["status_lead".to_string()]);
    s.finish().await;
}

/// Found by `orderbridge prove api-faults`: during a 429 storm every job kept
/// its own short retry and the account drew 4 requests a second of 429s (a
/// real account gets blocked for that). A 429 now pauses the whole account,
/// longer for each 429 in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_pauses_the_whole_account_longer_each_time() {
    let s = Setup::new(AmoSimConfig::default()).await;
    let client = s.client().await;
    client.users().await.unwrap();
    s.sim.fault_every(Fault::TooManyRequests, 1);
    let before = s.sim.requests().len();
    let storm = Duration::from_secs(6);
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = client.clone();
        callers.spawn(async move {
            while started.elapsed() < storm {
                let answer = client.users().await;
                assert!(
                    matches!(answer, Err(AmoError::RateLimited { .. })),
                    "{answer:?}"
                );
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    let during = s.sim.requests().len() - before;
    // Unpaused, four callers at 7 a second would have sent about 42.
    assert!(during <= 10, "{during} requests during a {storm:?} storm");
    s.sim.lift_steady_fault();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.finish().await;
}
