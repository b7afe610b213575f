//! The outbox engine against a real PostgreSQL (a fresh database per test).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use orderbridge::config::RateQuota;
use orderbridge::outbox::clock::Clock;
use orderbridge::outbox::{Engine, JobContext};
use orderbridge::store::outbox::{self as store, Completion, Finish, NewJob, Replay};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_inside_a_rolled_back_transaction_leaves_no_job() {
    let db = fresh_db().await;
    let mut tx = db.pool.begin().await.unwrap();
    let enqueued = orderbridge::outbox::enqueue(&mut tx, &job("sync", "t", "order-1", json!({})))
        .await
        .unwrap();
    assert!(enqueued.inserted);
    // Visible inside the transaction...
    let inside: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_jobs")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, 1);
    tx.rollback().await.unwrap();
    // ...and gone with it.
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_jobs").await, 0);

    let mut tx = db.pool.begin().await.unwrap();
    orderbridge::outbox::enqueue(&mut tx, &job("sync", "t", "order-1", json!({})))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox_jobs").await, 1);
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_job_absorbs_enqueues_with_its_dedupe_key() {
    let db = fresh_db().await;
    let with_key = |v: i64| NewJob {
        dedupe_key: Some("sync:order-1".into()),
        ..job("sync", "t", "order-1", json!({ "v": v }))
    };
    let mut conn = db.pool.acquire().await.unwrap();
    let first = orderbridge::outbox::enqueue(&mut conn, &with_key(1))
        .await
        .unwrap();
    let second = orderbridge::outbox::enqueue(&mut conn, &with_key(2))
        .await
        .unwrap();
    assert!(first.inserted);
    assert!(!second.inserted, "a pending job with the key exists");
    assert_eq!(first.id, second.id);
    let pending = store::jobs_in_state(&db.pool, "pending").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].payload,
        json!({ "v": 2 }),
        "the payload is refreshed"
    );

    // A batch folds its own duplicates and merges into the pending job too.
    orderbridge::outbox::enqueue_many(&mut conn, &[with_key(3), with_key(4)])
        .await
        .unwrap();
    let pending = store::jobs_in_state(&db.pool, "pending").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].payload, json!({ "v": 4 }));

    // Once the job runs, a new change needs a new job (it may have read old state).
    let now = chrono::Utc::now();
    store::acquire_targets(&db.pool, "w", now, now + chrono::Duration::seconds(30), 10)
        .await
        .unwrap();
    let claimed = store::claim(
        &db.pool,
        "t",
        "w",
        now,
        now + chrono::Duration::seconds(30),
        10,
        &["sync".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(claimed.len(), 1);
    let third = orderbridge::outbox::enqueue(&mut conn, &with_key(5))
        .await
        .unwrap();
    assert!(third.inserted);
    assert_ne!(third.id, first.id);
    assert_eq!(
        store::jobs_in_state(&db.pool, "pending")
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store::jobs_in_state(&db.pool, "running")
            .await
            .unwrap()
            .len(),
        1
    );

    // The running job fails and goes back to pending: it folds into the newer one.
    let applied = store::complete(
        &db.pool,
        "w",
        &[Completion {
            job_id: first.id,
            attempt: 1,
            started_at: now,
            finished_at: now,
            remark: None,
            finish: Finish::Retry {
                run_at: now + chrono::Duration::seconds(60),
                error: "503".into(),
            },
        }],
    )
    .await
    .unwrap();
    assert_eq!(applied, vec![first.id]);
    let jobs = store::jobs_in_state(&db.pool, "pending").await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, third.id);
    assert_eq!(jobs[0].failures, 1, "the backoff carries over");
    assert!(jobs[0].run_at.is_some_and(|r| r > now));
    // And the reason of the wait with it (found by `prove api-faults`: a job
    // folded while the circuit was open lost the words a reset looks for).
    assert_eq!(jobs[0].last_error.as_deref(), Some("503"));
    drop(conn);
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sharing_an_ordering_key_run_one_at_a_time_oldest_first() {
    let db = fresh_db().await;
    const KEYS: usize = 16;
    const PER_KEY: usize = 25;
    let mut jobs = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            // Two targets: the ordering holds across targets too.
            let target = if seq % 2 == 0 {
                "amocrm:main"
            } else {
                "kaspi:shop"
            };
            jobs.push(job(
                "step",
                target,
                &format!("order-{key}"),
                json!({ "seq": seq }),
            ));
        }
    }
    enqueue_all(&db.pool, &jobs).await;

    let running_keys = Arc::new(Mutex::new(HashSet::new()));
    let seen: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let now_running = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (running_keys, seen, overlaps, peak, now_running) = (
            running_keys.clone(),
            seen.clone(),
            overlaps.clone(),
            peak.clone(),
            now_running.clone(),
        );
        FnHandler(move |job: JobContext| {
            let (running_keys, seen, overlaps, peak, now_running) = (
                running_keys.clone(),
                seen.clone(),
                overlaps.clone(),
                peak.clone(),
                now_running.clone(),
            );
            async move {
                if !running_keys
                    .lock()
                    .unwrap()
                    .insert(job.ordering_key.clone())
                {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                let n = now_running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                seen.lock()
                    .unwrap()
                    .entry(job.ordering_key.clone())
                    .or_default()
                    .push(job.payload["seq"].as_u64().unwrap_or(u64::MAX));
                tokio::time::sleep(Duration::from_millis(2)).await;
                now_running.fetch_sub(1, Ordering::SeqCst);
                running_keys.lock().unwrap().remove(&job.ordering_key);
                Ok(())
            }
        })
    };
    let mut config = test_config();
    config.concurrency = 8;
    let running = start(Engine::builder(db.pool.clone(), config).handler("step", handler));
    wait_for("all jobs done", Duration::from_secs(120), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    running.stop().await;

    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two jobs of one key ran at once"
    );
    assert!(
        peak.load(Ordering::SeqCst) > 1,
        "different keys should run in parallel"
    );
    assert!(
        peak.load(Ordering::SeqCst) <= 8,
        "concurrency is capped at 8"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), KEYS);
    for (key, order) in seen.iter() {
        let expected: Vec<u64> = (0..PER_KEY as u64).collect();
        assert_eq!(order, &expected, "jobs of {key} ran out of order");
    }
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_workers_run_ten_thousand_jobs_exactly_once() {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE ran (n INTEGER PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    const JOBS: usize = 10_000;
    const WORKERS: usize = 10;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|n| {
            job(
                "once",
                &format!("target-{}", n % WORKERS),
                &format!("order-{n}"),
                json!({ "n": n }),
            )
        })
        .collect();
    enqueue_all(&db.pool, &jobs).await;

    let per_worker: Arc<Vec<AtomicUsize>> =
        Arc::new((0..WORKERS).map(|_| AtomicUsize::new(0)).collect());
    let mut engines = Vec::new();
    for w in 0..WORKERS {
        let pool = db.pool.clone();
        let per_worker = per_worker.clone();
        let handler = FnHandler(move |job: JobContext| {
            let pool = pool.clone();
            let per_worker = per_worker.clone();
            async move {
                let n = job.payload["n"].as_i64().unwrap_or(-1) as i32;
                // The unique insert proves "exactly once": a second run fails it.
                sqlx::query("INSERT INTO ran (n) VALUES ($1)")
                    .bind(n)
                    .execute(&pool)
                    .await
                    .map_err(|e| Failure::Permanent(format!("ran twice? {e}")))?;
                per_worker[w].fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        });
        engines.push(start(
            Engine::builder(db.pool.clone(), test_config())
                .owner(format!("worker-{w}"))
                .handler("once", handler),
        ));
    }
    wait_for("all jobs done", Duration::from_secs(300), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    for engine in engines {
        engine.stop().await;
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM ran").await,
        JOBS as i64
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox_attempts WHERE outcome <> 'success'"
        )
        .await,
        0,
        "no attempt failed, so no job ran twice"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox_attempts WHERE outcome = 'success'"
        )
        .await,
        JOBS as i64
    );
    let busy = per_worker
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 0)
        .count();
    assert!(
        busy >= 3,
        "targets should be shared among replicas, only {busy} worked"
    );
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_killed_worker_is_finished_exactly_once_by_another() {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE ran (n INTEGER PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    let clock = manual_clock();
    let started = Arc::new(AtomicBool::new(false));
    let stuck = {
        let started = started.clone();
        FnHandler(move |_job: JobContext| {
            let started = started.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                futures::future::pending::<()>().await;
                Ok(())
            }
        })
    };
    let a = start(
        Engine::builder(db.pool.clone(), test_config())
            .owner("a")
            .clock(as_clock(&clock))
            .handler("once", stuck),
    );
    enqueue_all(&db.pool, &[job("once", "t", "order-1", json!({ "n": 1 }))]).await;
    wait_for(
        "worker a started the job",
        Duration::from_secs(10),
        || async { started.load(Ordering::SeqCst) },
    )
    .await;
    a.kill().await;
    assert_eq!(
        store::jobs_in_state(&db.pool, "running")
            .await
            .unwrap()
            .len(),
        1
    );

    let pool = db.pool.clone();
    let b = start(
        Engine::builder(db.pool.clone(), test_config())
            .owner("b")
            .clock(as_clock(&clock))
            .handler(
                "once",
                FnHandler(move |job: JobContext| {
                    let pool = pool.clone();
                    async move {
                        sqlx::query("INSERT INTO ran (n) VALUES ($1)")
                            .bind(job.payload["n"].as_i64().unwrap_or(-1) as i32)
                            .execute(&pool)
                            .await
                            .map_err(|e| Failure::Permanent(e.to_string()))?;
                        Ok(())
                    }
                }),
            ),
    );
    // While a's leases are valid, b must not touch the job.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM ran").await, 0);
    // Past both leases (target 2 s, job 5 s), b takes over.
    clock.advance(Duration::from_secs(6));
    wait_for("b finished the job", Duration::from_secs(10), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    b.stop().await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM ran").await, 1);
    let attempts = store::attempts_of(&db.pool, 1).await.unwrap();
    let outcomes: Vec<(i32, &str)> = attempts
        .iter()
        .map(|a| (a.attempt, a.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, vec![(1, "lease_expired"), (2, "success")]);
    db.drop_now().await.unwrap();
}

/// The crash suite's finding, once Avito's rate-limited transitions were in
/// its world: a daemon killed again and again while a slow job ran
/// dead-lettered that healthy job after 9 lost attempts, each counted as a
/// failure, so the manager's move never reached Avito. A lease lost with its
/// process (the replica's last heartbeat came before the lease's end) is not
/// the job's failure; three times the failure limit of such losses still
/// dead-letters a job that may be killing its process. A lease lost by a
/// replica that lived on is a failure, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_with_its_process_is_not_a_failure_but_one_lost_by_a_living_worker_is() {
    let db = fresh_db().await;
    enqueue_all(&db.pool, &[job("sync", "t", "order-1", json!({}))]).await;
    let secs = chrono::Duration::seconds;
    let kinds = ["sync".to_string()];
    let max_failures = 3;
    let t0 = chrono::Utc::now();
    // A replica that stays alive (heartbeats after its job's lease ran out).
    let t = t0;
    store::replica_heartbeat(&db.pool, "alive", t, t - secs(30))
        .await
        .unwrap();
    store::acquire_targets(&db.pool, "alive", t, t + secs(1), 1)
        .await
        .unwrap();
    let claimed = store::claim(&db.pool, "t", "alive", t, t + secs(1), 1, &kinds)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let id = claimed[0].id;
    store::replica_heartbeat(&db.pool, "alive", t + secs(4), t - secs(30))
        .await
        .unwrap();
    store::reap_expired(&db.pool, &["t".to_string()], t + secs(5), max_failures)
        .await
        .unwrap();
    let row = store::job(&db.pool, id).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.failures), ("pending", 1));
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("stopped renewing")),
        "{:?}",
        row.last_error
    );
    // Replicas that die while running it: each heartbeats, claims, is gone.
    for round in 1..=(max_failures * 3) {
        let t = t0 + secs(10 * i64::from(round));
        let owner = format!("killed-{round}");
        store::replica_heartbeat(&db.pool, &owner, t, t - secs(30))
            .await
            .unwrap();
        store::acquire_targets(&db.pool, &owner, t, t + secs(1), 1)
            .await
            .unwrap();
        let claimed = store::claim(&db.pool, "t", &owner, t, t + secs(1), 1, &kinds)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "round {round}");
        store::reap_expired(&db.pool, &["t".to_string()], t + secs(5), max_failures)
            .await
            .unwrap();
        let row = store::job(&db.pool, id).await.unwrap().unwrap();
        assert_eq!(
            row.failures, 1,
            "a lost process is not a failure (round {round})"
        );
        let want = if round < max_failures * 3 {
            "pending"
        } else {
            "dead"
        };
        assert_eq!(row.state, want, "round {round}: {:?}", row.last_error);
        assert!(
            row.last_error
                .as_deref()
                .is_some_and(|e| e.contains(&format!("died ({round} such losses"))),
            "{:?}",
            row.last_error
        );
    }
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_cannot_overwrite_the_new_owners_outcome() {
    let db = fresh_db().await;
    enqueue_all(&db.pool, &[job("sync", "t", "order-1", json!({}))]).await;
    let t0 = chrono::Utc::now();
    let secs = chrono::Duration::seconds;

    // Worker a claims attempt 1 with a 1-second lease, then stalls.
    assert_eq!(
        store::acquire_targets(&db.pool, "a", t0, t0 + secs(1), 1)
            .await
            .unwrap(),
        vec!["t"]
    );
    let a_job = store::claim(
        &db.pool,
        "t",
        "a",
        t0,
        t0 + secs(1),
        1,
        &["sync".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(a_job.len(), 1);
    assert_eq!(a_job[0].attempts, 1);
    let id = a_job[0].id;

    // Two seconds later worker b takes the target, reaps the job and claims attempt 2.
    let t2 = t0 + secs(2);
    assert_eq!(
        store::acquire_targets(&db.pool, "b", t2, t2 + secs(10), 1)
            .await
            .unwrap(),
        vec!["t"]
    );
    assert_eq!(
        store::reap_expired(&db.pool, &["t".to_string()], t2, 5)
            .await
            .unwrap(),
        1
    );
    let b_job = store::claim(
        &db.pool,
        "t",
        "b",
        t2,
        t2 + secs(10),
        1,
        &["sync".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(b_job.len(), 1);
    assert_eq!(b_job[0].attempts, 2);

    // a wakes up and reports a failure: fenced out.
    let stale = Completion {
        job_id: id,
        attempt: 1,
        started_at: t0,
        finished_at: t2,
        finish: Finish::Dead {
            error: "stale".into(),
        },
        remark: None,
    };
    assert!(store::complete(&db.pool, "a", std::slice::from_ref(&stale))
        .await
        .unwrap()
        .is_empty());
    let row = store::job(&db.pool, id).await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.attempts, row.locked_by.as_deref()),
        ("running", 2, Some("b"))
    );

    // b's outcome applies; a late success from a changes nothing either.
    let good = Completion {
        job_id: id,
        attempt: 2,
        started_at: t2,
        finished_at: t2,
        finish: Finish::Success,
        remark: None,
    };
    assert_eq!(
        store::complete(&db.pool, "b", &[good]).await.unwrap(),
        vec![id]
    );
    let late = Completion {
        finish: Finish::Success,
        ..stale
    };
    assert!(store::complete(&db.pool, "a", &[late])
        .await
        .unwrap()
        .is_empty());
    let outcomes: Vec<(i32, String)> = store::attempts_of(&db.pool, id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.attempt, a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![(1, "lease_expired".to_string()), (2, "success".to_string())]
    );
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_follow_the_retry_schedule_then_dead_letter() {
    let db = fresh_db().await;
    let clock = manual_clock();
    let mut config = test_config();
    config.schedule = schedule(&[10_000, 20_000], 0.0);
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        FnHandler(move |_job: JobContext| {
            let calls = calls.clone();
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                Err(Failure::Retry(format!("503 on call {n}")))
            }
        })
    };
    let running = start(
        Engine::builder(db.pool.clone(), config)
            .clock(as_clock(&clock))
            .handler("flaky", handler),
    );
    let t0 = clock.now();
    enqueue_all(&db.pool, &[job("flaky", "t", "order-1", json!({}))]).await;
    let job_row = || async { store::job(&db.pool, 1).await.unwrap().unwrap() };
    wait_for(
        "first failure recorded",
        Duration::from_secs(10),
        || async { job_row().await.failures == 1 },
    )
    .await;
    let row = job_row().await;
    assert_eq!(row.state, "pending");
    assert_eq!(
        row.run_at,
        Some(t0 + chrono::Duration::seconds(10)),
        "first delay is 10 s"
    );

    // Not due yet: nothing runs however often the engine looks.
    for _ in 0..5 {
        running.engine.wake();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    clock.advance(Duration::from_secs(10));
    wait_for("second failure", Duration::from_secs(10), || async {
        job_row().await.failures == 2
    })
    .await;
    let row = job_row().await;
    assert_eq!(
        row.run_at,
        Some(t0 + chrono::Duration::seconds(30)),
        "second delay is 20 s"
    );
    clock.advance(Duration::from_secs(19));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one second early: still waiting"
    );
    clock.advance(Duration::from_secs(1));
    wait_for("dead-lettered", Duration::from_secs(10), || async {
        job_row().await.state == "dead"
    })
    .await;
    running.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let row = job_row().await;
    let error = row.last_error.unwrap_or_default();
    assert!(
        error.contains("retries exhausted after 3 failed attempts"),
        "{error}"
    );
    assert!(error.contains("503 on call 3"), "{error}");
    let outcomes: Vec<String> = store::attempts_of(&db.pool, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, vec!["retry", "retry", "dead"]);
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_at_once_and_can_be_replayed() {
    let db = fresh_db().await;
    let broken = Arc::new(AtomicBool::new(true));
    let handler = {
        let broken = broken.clone();
        FnHandler(move |_job: JobContext| {
            let broken = broken.clone();
            async move {
                if broken.load(Ordering::SeqCst) {
                    Err(Failure::Permanent("400 Bad Request: unknown status".into()))
                } else {
                    Ok(())
                }
            }
        })
    };
    let running = start(Engine::builder(db.pool.clone(), test_config()).handler("push", handler));
    enqueue_all(
        &db.pool,
        &[
            job("push", "t", "order-1", json!({})),
            job("push", "t", "order-2", json!({})),
            job("nobody-handles-this", "t", "order-3", json!({})),
        ],
    )
    .await;
    wait_for("two dead letters", Duration::from_secs(10), || async {
        store::list_dead(&db.pool, 10).await.unwrap().len() == 2
    })
    .await;
    let dead = store::list_dead(&db.pool, 10).await.unwrap();
    for job in &dead {
        assert_eq!(job.attempts, 1, "permanent failures are not retried");
        let error = job.last_error.clone().unwrap_or_default();
        assert!(
            error.contains("permanent failure: 400 Bad Request"),
            "{error}"
        );
    }
    // A kind no handler serves is not claimed: it waits for a replica that can run it.
    let waiting = store::job(&db.pool, 3).await.unwrap().unwrap();
    assert_eq!((waiting.state.as_str(), waiting.attempts), ("pending", 0));

    // The operator fixes the cause and replays one, then discards another.
    broken.store(false, Ordering::SeqCst);
    assert_eq!(
        store::replay_dead(&db.pool, 1).await.unwrap(),
        Replay::Requeued
    );
    wait_for("replayed job done", Duration::from_secs(10), || async {
        store::job(&db.pool, 1).await.unwrap().is_none()
    })
    .await;
    assert!(store::discard_dead(&db.pool, 2).await.unwrap());
    assert_eq!(
        store::replay_dead(&db.pool, 2).await.unwrap(),
        Replay::NotFound
    );
    assert_eq!(store::replay_all_dead(&db.pool).await.unwrap(), (0, 0));
    running.stop().await;
    // A replica that knows the kind runs the waiting job.
    let newer = start(Engine::builder(db.pool.clone(), test_config()).handler(
        "nobody-handles-this",
        FnHandler(|_job: JobContext| async { Ok(()) }),
    ));
    wait_for("all done", Duration::from_secs(10), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    newer.stop().await;
    let outcomes: Vec<String> = store::attempts_of(&db.pool, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, vec!["dead", "success"]);
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_no_handler_runs_is_dead_lettered_with_the_reason_after_the_grace() {
    let db = fresh_db().await;
    let mut config = test_config();
    config.unhandled_grace = Duration::from_secs(2);
    let running = start(
        Engine::builder(db.pool.clone(), config)
            .handler("push", FnHandler(|_job: JobContext| async { Ok(()) })),
    );
    enqueue_all(
        &db.pool,
        &[
            job("push", "t", "order-1", json!({})),
            job("retired-kind", "t", "order-2", json!({})),
        ],
    )
    .await;
    // Within the grace it waits (a newer replica may have the handler).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let waiting = store::job(&db.pool, 2).await.unwrap().unwrap();
    assert_eq!(waiting.state, "pending");
    wait_for(
        "the unhandled job is dead",
        Duration::from_secs(10),
        || async { store::list_dead(&db.pool, 10).await.unwrap().len() == 1 },
    )
    .await;
    let dead = store::list_dead(&db.pool, 10).await.unwrap();
    let error = dead[0].last_error.clone().unwrap_or_default();
    assert!(
        error.contains("no handler for kind `retired-kind` in this build"),
        "{error}"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await,
        1,
        "the handled job ran"
    );
    running.stop().await;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_claimed_while_the_finisher_cannot_write_outcomes() {
    let db = fresh_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        FnHandler(move |_job: JobContext| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    // Every outcome write fails (attempt rows cannot be inserted) until the
    // constraint is dropped; claims keep working.
    sqlx::query("ALTER TABLE outbox_attempts ADD CONSTRAINT stalled CHECK (job_id < 0) NOT VALID")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut config = test_config();
    config.concurrency = 8;
    let running = start(Engine::builder(db.pool.clone(), config).handler("push", handler));
    // One job runs; writing its outcome fails: the finisher is stalled.
    enqueue_all(&db.pool, &[job("push", "t", "order-0", json!({}))]).await;
    wait_for("the first job ran", Duration::from_secs(10), || async {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Free slots, due jobs: still nothing is claimed until outcomes can be written.
    let jobs: Vec<_> = (1..20)
        .map(|i| job("push", "t", &format!("order-{i}"), json!({})))
        .collect();
    enqueue_all(&db.pool, &jobs).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no new claims while outcomes cannot be written"
    );
    sqlx::query("ALTER TABLE outbox_attempts DROP CONSTRAINT stalled")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_for("all done", Duration::from_secs(20), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 20, "each job ran exactly once");
    running.stop().await;
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_and_the_worker_lives_on() {
    let db = fresh_db().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        FnHandler(move |job: JobContext| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if job.attempt == 1 && job.ordering_key == "order-1" {
                    panic!("boom: malformed payload");
                }
                Ok(())
            }
        })
    };
    let running = start(Engine::builder(db.pool.clone(), test_config()).handler("push", handler));
    enqueue_all(
        &db.pool,
        &[
            job("push", "t", "order-1", json!({})),
            job("push", "t", "order-2", json!({})),
        ],
    )
    .await;
    wait_for("both done", Duration::from_secs(10), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    // The worker survived: a later job still runs.
    enqueue_all(&db.pool, &[job("push", "t", "order-3", json!({}))]).await;
    wait_for("third done", Duration::from_secs(10), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    running.stop().await;
    let attempts = store::attempts_of(&db.pool, 1).await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].outcome, "retry");
    assert_eq!(
        attempts[0].error.as_deref(),
        Some("handler panicked: boom: malformed payload")
    );
    assert_eq!(attempts[1].outcome, "success");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_never_exceeds_its_quota_in_any_second() {
    let db = fresh_db().await;
    let quota = RateQuota {
        requests: 10,
        per: Duration::from_secs(1),
        burst: 1,
    };
    let stamps: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handler = {
        let stamps = stamps.clone();
        FnHandler(move |_job: JobContext| {
            let stamps = stamps.clone();
            async move {
                stamps.lock().unwrap().push(Instant::now());
                Ok(())
            }
        })
    };
    let jobs: Vec<NewJob> = (0..35)
        .map(|i| job("push", "amocrm:main", &format!("order-{i}"), json!({})))
        .collect();
    enqueue_all(&db.pool, &jobs).await;
    let mut config = test_config();
    config.concurrency = 64;
    let running = start(
        Engine::builder(db.pool.clone(), config)
            .quota("amocrm:main", quota)
            .handler("push", handler),
    );
    wait_for("all done", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    running.stop().await;
    let mut stamps = stamps.lock().unwrap().clone();
    stamps.sort();
    assert_eq!(stamps.len(), 35);
    let max = orderbridge::bench::outbox::max_in_any_window(&stamps, Duration::from_secs(1));
    assert!(max <= 10, "{max} starts in one second, quota is 10");
    let span = stamps[34].duration_since(stamps[0]).as_secs_f64();
    let rate = 34.0 / span;
    assert!(
        rate > 8.5,
        "the quota should be used, not wasted: {rate:.2}/s"
    );
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_lease_passes_to_another_engine_on_release_and_on_expiry() {
    let db = fresh_db().await;
    let clock = manual_clock();
    let ran_by: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let handler_for = |name: &'static str| {
        let ran_by = ran_by.clone();
        FnHandler(move |job: JobContext| {
            let ran_by = ran_by.clone();
            async move {
                ran_by
                    .lock()
                    .unwrap()
                    .push((name.to_string(), job.ordering_key.clone()));
                Ok(())
            }
        })
    };
    let engine = |name: &'static str| {
        Engine::builder(db.pool.clone(), test_config())
            .owner(name)
            .clock(as_clock(&clock))
            .handler("push", handler_for(name))
    };
    let owner_now = || async {
        store::target_owner(&db.pool, "t", clock.now())
            .await
            .unwrap()
    };

    let a = start(engine("a"));
    enqueue_all(&db.pool, &[job("push", "t", "order-1", json!({}))]).await;
    wait_for("a ran order-1", Duration::from_secs(10), || async {
        ran_by.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(owner_now().await.as_deref(), Some("a"));

    let b = start(engine("b"));
    // One target, two replicas: b gets nothing while a holds it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(owner_now().await.as_deref(), Some("a"));
    assert!(b.engine.held_targets().is_empty());

    // Graceful hand-over: a stops and releases; b takes the target.
    a.stop().await;
    wait_for("b holds t", Duration::from_secs(10), || async {
        owner_now().await.as_deref() == Some("b")
    })
    .await;
    enqueue_all(&db.pool, &[job("push", "t", "order-2", json!({}))]).await;
    wait_for("b ran order-2", Duration::from_secs(10), || async {
        ran_by.lock().unwrap().len() == 2
    })
    .await;

    // Expiry: b dies without releasing; c takes over once the lease has expired.
    b.kill().await;
    let c = start(engine("c"));
    enqueue_all(&db.pool, &[job("push", "t", "order-3", json!({}))]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        owner_now().await.as_deref(),
        Some("b"),
        "b's lease has not expired yet"
    );
    assert_eq!(ran_by.lock().unwrap().len(), 2);
    clock.advance(Duration::from_secs(3));
    wait_for("c ran order-3", Duration::from_secs(10), || async {
        ran_by.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(owner_now().await.as_deref(), Some("c"));
    c.stop().await;
    let ran_by = ran_by.lock().unwrap().clone();
    assert_eq!(
        ran_by,
        vec![
            ("a".to_string(), "order-1".to_string()),
            ("b".to_string(), "order-2".to_string()),
            ("c".to_string(), "order-3".to_string()),
        ]
    );
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_job_stuck_as_running() {
    let db = fresh_db().await;
    let started = Arc::new(AtomicUsize::new(0));
    let handler = {
        let started = started.clone();
        FnHandler(move |job: JobContext| {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // order-0 finishes within the deadline; the others would take a minute.
                let secs = if job.ordering_key == "order-0" { 0 } else { 60 };
                tokio::time::sleep(Duration::from_millis(100 + secs * 1000)).await;
                Ok(())
            }
        })
    };
    let mut config = test_config();
    config.shutdown_deadline = Duration::from_millis(500);
    let running = start(Engine::builder(db.pool.clone(), config).handler("slow", handler));
    let jobs: Vec<NewJob> = (0..5)
        .map(|i| job("slow", "t", &format!("order-{i}"), json!({})))
        .collect();
    enqueue_all(&db.pool, &jobs).await;
    wait_for("all five started", Duration::from_secs(10), || async {
        started.load(Ordering::SeqCst) == 5
    })
    .await;
    let stopping = Instant::now();
    running.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the deadline bounds shutdown"
    );
    assert_eq!(
        store::jobs_in_state(&db.pool, "running")
            .await
            .unwrap()
            .len(),
        0
    );
    let pending = store::jobs_in_state(&db.pool, "pending").await.unwrap();
    assert_eq!(
        pending.len(),
        4,
        "order-0 finished, the rest went back to the queue"
    );
    for job in &pending {
        assert_eq!(job.failures, 0, "a release is not a failure");
        let outcomes: Vec<String> = store::attempts_of(&db.pool, job.id)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.outcome)
            .collect();
        assert_eq!(outcomes, vec!["released"]);
    }
    assert_eq!(
        store::target_owner(&db.pool, "t", chrono::Utc::now())
            .await
            .unwrap(),
        None
    );
    db.drop_now().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_back_off_while_the_database_drops_connections_and_lose_nothing() {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE ran (n INTEGER PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    const JOBS: usize = 600;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|n| job("once", "t", &format!("order-{n}"), json!({ "n": n })))
        .collect();
    enqueue_all(&db.pool, &jobs).await;
    let pool = db.pool.clone();
    let handler = FnHandler(move |job: JobContext| {
        let pool = pool.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let n = job.payload["n"].as_i64().unwrap_or(-1) as i32;
            match sqlx::query("INSERT INTO ran (n) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(n)
                .execute(&pool)
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => Err(Failure::Retry(e.to_string())),
            }
        }
    });
    let mut config = test_config();
    config.schedule = schedule(&[50, 50, 50, 50, 50, 50, 50, 50, 50, 50], 0.0);
    let running = start(Engine::builder(db.pool.clone(), config).handler("once", handler));
    // Kill every connection of the test database, five times, while jobs run.
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db.name)
        .execute(&admin)
        .await
        .unwrap();
    }
    wait_for("all jobs done", Duration::from_secs(120), || async {
        match sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_jobs")
            .fetch_one(&db.pool)
            .await
        {
            Ok(n) => n == 0,
            Err(_) => false,
        }
    })
    .await;
    running.stop().await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM ran").await,
        JOBS as i64,
        "no job lost"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(DISTINCT job_id) FROM outbox_attempts WHERE outcome = 'success'"
        )
        .await,
        JOBS as i64
    );
    admin.close().await;
    db.drop_now().await.unwrap();
}

/// A kind whose handler batches (`EngineBuilder::batched`) may have a batch in
/// flight on a target whose quota allows only two jobs ahead; other kinds keep
/// their cap and are not starved; an ordering key's jobs still run one at a
/// time, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_kind_fills_its_batch_while_other_kinds_and_key_order_hold() {
    let db = fresh_db().await;
    let quota = RateQuota {
        requests: 1,
        per: Duration::from_secs(1),
        burst: 1,
    };
    // Per request (the handler's client would take the permits): claim cap 2.
    let limiters = Arc::new(
        orderbridge::outbox::limits::Limiters::new([]).with_per_request("amocrm:main", quota),
    );
    assert_eq!(limiters.claim_cap("amocrm:main", 64), 2);
    #[derive(Default)]
    struct Seen {
        running: HashMap<String, usize>,
        max_running: HashMap<String, usize>,
        key_running: HashMap<String, usize>,
        key_overlap: usize,
        same_key_order: Vec<i64>,
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        FnHandler(move |job: JobContext| {
            let seen = seen.clone();
            async move {
                {
                    let mut s = seen.lock().unwrap();
                    let n = s.running.entry(job.kind.clone()).or_insert(0);
                    *n += 1;
                    let n = *n;
                    let max = s.max_running.entry(job.kind.clone()).or_insert(0);
                    *max = (*max).max(n);
                    let k = s.key_running.entry(job.ordering_key.clone()).or_insert(0);
                    *k += 1;
                    if *k > 1 {
                        s.key_overlap += 1;
                    }
                    if job.ordering_key == "same" {
                        let n = job.payload["n"].as_i64().unwrap();
                        s.same_key_order.push(n);
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut s = seen.lock().unwrap();
                *s.running.get_mut(&job.kind).unwrap() -= 1;
                *s.key_running.get_mut(&job.ordering_key).unwrap() -= 1;
                Ok(())
            }
        })
    };
    let handler = Arc::new(handler);
    let mut jobs: Vec<NewJob> = (0..40)
        .map(|i| job("create", "amocrm:main", &format!("order-{i}"), json!({})))
        .collect();
    jobs.extend((0..6).map(|n| job("create", "amocrm:main", "same", json!({ "n": n }))));
    jobs.extend((0..6).map(|i| job("task", "amocrm:main", &format!("task-{i}"), json!({}))));
    enqueue_all(&db.pool, &jobs).await;
    let mut config = test_config();
    config.concurrency = 64;
    let running = start(
        Engine::builder(db.pool.clone(), config)
            .limiters(limiters)
            .handler("create", handler.clone())
            .handler("task", handler)
            .batched("create", 20),
    );
    wait_for("all done", Duration::from_secs(30), || async {
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await == 0
    })
    .await;
    running.stop().await;
    {
        let s = seen.lock().unwrap();
        let create = s.max_running["create"];
        assert!(
            (15..=20).contains(&create),
            "a batch of `create` in flight, never more than 20: {create}"
        );
        let task = s.max_running["task"];
        assert!(
            (1..=2).contains(&task),
            "`task` keeps the target's claim cap of 2: {task}"
        );
        assert_eq!(s.key_overlap, 0, "one job per ordering key at a time");
        assert_eq!(s.same_key_order, vec![0, 1, 2, 3, 4, 5], "oldest first");
    }
    db.drop_now().await.unwrap();
}

/// A batch is claimed together but fenced one by one: when one member's
/// lease is lost (its renewal did not happen; another replica reaped and took
/// it), the batch's outcome finishes the other members and not that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_member_whose_lease_was_lost_is_not_finished_by_the_batch() {
    let db = fresh_db().await;
    let jobs: Vec<NewJob> = (0..5)
        .map(|i| job("create", "amocrm:main", &format!("order-{i}"), json!({})))
        .collect();
    enqueue_all(&db.pool, &jobs).await;
    let t0 = chrono::Utc::now();
    let secs = chrono::Duration::seconds;
    let kinds = ["create".to_string()];
    store::acquire_targets(&db.pool, "a", t0, t0 + secs(1), 1)
        .await
        .unwrap();
    let batch = store::claim(&db.pool, "amocrm:main", "a", t0, t0 + secs(1), 50, &kinds)
        .await
        .unwrap();
    assert_eq!(batch.len(), 5, "the whole batch in one claim");
    // a's heartbeat renews four of them; the last one's lease runs out.
    let lost = batch[4].id;
    let renewed: Vec<(i64, i32)> = batch[..4].iter().map(|j| (j.id, j.attempts)).collect();
    assert_eq!(
        store::renew_job_leases(&db.pool, "a", &renewed, t0 + secs(60))
            .await
            .unwrap(),
        4
    );
    // Replica b takes the target, reaps the expired member and runs it again.
    let t2 = t0 + secs(2);
    assert_eq!(
        store::acquire_targets(&db.pool, "b", t2, t2 + secs(10), 1)
            .await
            .unwrap(),
        vec!["amocrm:main"]
    );
    assert_eq!(
        store::reap_expired(&db.pool, &["amocrm:main".to_string()], t2, 5)
            .await
            .unwrap(),
        1
    );
    let again = store::claim(&db.pool, "amocrm:main", "b", t2, t2 + secs(10), 50, &kinds)
        .await
        .unwrap();
    assert_eq!(
        again.iter().map(|j| (j.id, j.attempts)).collect::<Vec<_>>(),
        vec![(lost, 2)]
    );
    // a's batch comes back: every member succeeded from a's point of view.
    let completions: Vec<Completion> = batch
        .iter()
        .map(|j| Completion {
            job_id: j.id,
            attempt: j.attempts,
            started_at: t0,
            finished_at: t2,
            finish: Finish::Success,
            remark: None,
        })
        .collect();
    let mut applied = store::complete(&db.pool, "a", &completions).await.unwrap();
    applied.sort();
    let mut expected: Vec<i64> = batch[..4].iter().map(|j| j.id).collect();
    expected.sort();
    assert_eq!(applied, expected, "the four members a still held finish");
    let row = store::job(&db.pool, lost).await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.attempts, row.locked_by.as_deref()),
        ("running", 2, Some("b")),
        "the lost member stays b's"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox_jobs").await,
        1,
        "finished jobs leave the queue"
    );
    db.drop_now().await.unwrap();
}
