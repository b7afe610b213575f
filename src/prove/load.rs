//! `orderbridge prove load`: the daemon (its own process) in the suites'
//! [`World`] under the two loads a shop meets.
//!
//! - **The backlog after an outage**: the daemon is killed, a 72-hour
//!   outage's orders pile up at Kaspi (`--backlogs 1200,10000`: the seed's
//!   400 a day, then a big shop's; created evenly over the outage, one in ten
//!   already cancelled by its buyer), and the daemon is started again. Timed
//!   until every order has its lead in its stage and no job is open; with the
//!   amoCRM requests it took, the rate-limit 429s and the restarted process's
//!   peak RSS (`VmHWM`).
//! - **A webhook flood**: `--flood-rate` (1,000) amoCRM webhooks a second for
//!   `--flood-secs` (10) from loopback, each a distinct status change of a
//!   lead the bridge does not know, while orders and managers' moves keep
//!   flowing. Every one must be answered 200 within amoCRM's 2 s, stored in
//!   the inbox and processed; managers' moves made during the flood must
//!   still reach Kaspi (the common verdict).

use std::io::Write;
use std::time::{Duration, Instant};

use super::world::{World, HOOK_SECRET};
use super::ProveError;
use crate::bench::pipeline::peak_rss_mb;
use crate::bench::{failed, BenchError};
use crate::config::Settings;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Orders waiting after each outage, one outage after the other.
    #[arg(long, value_delimiter = ',', default_values_t = [1_200, 10_000])]
    pub backlogs: Vec<usize>,
    /// How long each outage lasted (its orders are spread over it).
    #[arg(long, default_value_t = 72)]
    pub outage_hours: u64,
    /// amoCRM webhooks a second during the flood.
    #[arg(long, default_value_t = 1_000)]
    pub flood_rate: u64,
    /// How long the flood lasts.
    #[arg(long, default_value_t = 10)]
    pub flood_secs: u64,
    /// New Kaspi orders a second around the backlogs and during the flood.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Seeds the managers' choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// amoCRM's deadline for a webhook's answer.
const HOOK_DEADLINE: Duration = Duration::from_secs(2);
/// The flood's lead ids: far from any the simulator hands out.
const FLOOD_LEAD_BASE: u64 = 800_000_000;

pub async fn run(
    settings: &Settings,
    args: &LoadArgs,
    out: &mut impl Write,
) -> Result<(), ProveError> {
    super::in_scratch_database(settings, out, async |admin, db| {
        let mut world = World::start(admin, db, 1, args.seed, &[]).await?;
        let mut figures = Vec::new();
        let mut broken = Vec::new();
        world.flow(args.rate, Duration::from_secs(5)).await?;
        for (i, n) in args.backlogs.iter().enumerate() {
            backlog(&mut world, i, *n, args, &mut figures, &mut broken).await?;
        }
        flood(&mut world, args, &mut figures, &mut broken).await?;
        let converge_s = world.settle(Duration::from_secs(300)).await?;
        let (mut common, mut promises) = world.verdict().await?;
        common.push(("converge_s", format!("{converge_s:.1}")));
        common.append(&mut figures);
        promises.append(&mut broken);
        Ok((common, promises))
    })
    .await
}

/// Figure names of the first and the second backlog.
const BACKLOG_KEYS: [[&str; 5]; 2] = [
    [
        "backlog_1_orders",
        "backlog_1_catch_up_s",
        "backlog_1_amocrm_requests",
        "backlog_1_http_429",
        "backlog_1_peak_rss_mb",
    ],
    [
        "backlog_2_orders",
        "backlog_2_catch_up_s",
        "backlog_2_amocrm_requests",
        "backlog_2_http_429",
        "backlog_2_peak_rss_mb",
    ],
];

async fn backlog(
    world: &mut World,
    index: usize,
    n: usize,
    args: &LoadArgs,
    figures: &mut Vec<(&'static str, String)>,
    broken: &mut Vec<String>,
) -> Result<(), BenchError> {
    let Some(keys) = BACKLOG_KEYS.get(index) else {
        return Err(failed("at most two backlogs"));
    };
    // Nothing open before the outage, so the catch-up is the backlog's.
    world.settle(Duration::from_secs(120)).await?;
    world.daemons[0].kill_now();
    world.backlog(n, Duration::from_secs(args.outage_hours * 3600));
    let requests_before = world.amo.requests().len();
    let limited_before = world.amo.rate_limited();
    eprintln!(
        "prove load: {n} orders piled up during a {} h outage; daemon started again",
        args.outage_hours
    );
    let started = Instant::now();
    world.daemons[0] = world.start_daemon(0)?;
    let pid = world.daemons[0].pid();
    let mut rss: f64 = 0.0;
    let limit = Duration::from_secs(30 * 60);
    loop {
        world.check_daemons()?;
        rss = rss.max(peak_rss_mb(pid));
        if world.linked().await? >= world.created as i64
            && world.open_jobs().await? == 0
            && world.wrong_stages().await? == 0
        {
            break;
        }
        if started.elapsed() > limit {
            broken.push(format!(
                "the backlog of {n} was not caught up within 30 min"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let catch_up = started.elapsed().as_secs_f64();
    rss = rss.max(peak_rss_mb(pid));
    let requests = world.amo.requests().len() - requests_before;
    let limited = world.amo.rate_limited() - limited_before;
    eprintln!("prove load: backlog of {n} caught up in {catch_up:.1} s");
    figures.extend([
        (keys[0], n.to_string()),
        (keys[1], format!("{catch_up:.1}")),
        (keys[2], requests.to_string()),
        (keys[3], limited.to_string()),
        (keys[4], format!("{rss:.1}")),
    ]);
    Ok(())
}

/// One flood webhook: a status change of a lead the bridge does not know.
fn flood_form(world: &World, i: u64) -> String {
    let pipeline = world.pipeline();
    let (to, from) = (pipeline.stages[1].0, pipeline.stages[0].0);
    let now = chrono::Utc::now().timestamp();
    let p = "leads[status][0]";
    let fields = [
        (format!("{p}[id]"), (FLOOD_LEAD_BASE + i).to_string()),
        (format!("{p}[name]"), format!("Flood {i}")),
        (format!("{p}[status_id]"), to.to_string()),
        (format!("{p}[old_status_id]"), from.to_string()),
        (format!("{p}[pipeline_id]"), pipeline.id.to_string()),
        (format!("{p}[old_pipeline_id]"), pipeline.id.to_string()),
        (format!("{p}[last_modified]"), now.to_string()),
        (format!("{p}[modified_user_id]"), "1".to_string()),
        (format!("{p}[account_id]"), "31361463".to_string()),
        ("account[subdomain]".to_string(), "example".to_string()),
        ("account[id]".to_string(), "31361463".to_string()),
    ];
    serde_urlencoded::to_string(fields).unwrap_or_default()
}

async fn flood(
    world: &mut World,
    args: &LoadArgs,
    figures: &mut Vec<(&'static str, String)>,
    broken: &mut Vec<String>,
) -> Result<(), BenchError> {
    let total = args.flood_rate * args.flood_secs;
    eprintln!(
        "prove load: {} amoCRM webhooks a second for {} s",
        args.flood_rate, args.flood_secs
    );
    let url = format!("{}/hooks/amocrm/{HOOK_SECRET}", world.base_url(0));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(failed)?;
    let forms: Vec<String> = (0..total).map(|i| flood_form(world, i)).collect();
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    // Sent in bursts every 10 ms, as many as are due by then.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut forms = forms.into_iter();
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        // Orders and managers keep going meanwhile.
        world.pump(args.rate);
        let due =
            ((started.elapsed().as_secs_f64() * args.flood_rate as f64) as u64 + 1).min(total);
        while sent < due {
            let Some(form) = forms.next() else { break };
            sent += 1;
            let (http, url) = (http.clone(), url.clone());
            sends.spawn(async move {
                let asked = Instant::now();
                let status = http
                    .post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(form)
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().as_u16());
                (status, asked.elapsed())
            });
        }
    }
    let mut answers: Vec<(Option<u16>, Duration)> = Vec::with_capacity(total as usize);
    while let Some(answer) = sends.join_next().await {
        answers.push(answer.map_err(failed)?);
    }
    let sending_s = started.elapsed().as_secs_f64();
    let ok = answers.iter().filter(|(s, _)| *s == Some(200)).count();
    let late = answers.iter().filter(|(_, t)| *t > HOOK_DEADLINE).count();
    let mut times: Vec<f64> = answers
        .iter()
        .map(|(_, t)| t.as_secs_f64() * 1000.0)
        .collect();
    times.sort_by(f64::total_cmp);
    let pick = |p: f64| {
        times
            .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    // Every one stored and processed.
    let flood_lead = FLOOD_LEAD_BASE as i64;
    let stored_sql = format!(
        "SELECT count(*) FROM inbox WHERE source = 'amocrm' AND (payload->>'lead_id')::bigint >= {flood_lead}"
    );
    let processed_sql = format!("{stored_sql} AND processed_at IS NOT NULL");
    let waiting = Instant::now();
    let (mut stored, mut processed) = (0, 0);
    while waiting.elapsed() < Duration::from_secs(180) {
        world.pump(args.rate);
        world.check_daemons()?;
        stored = super::world::count(&world.pool, &stored_sql).await?;
        processed = super::world::count(&world.pool, &processed_sql).await?;
        if processed >= total as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let processed_after = started.elapsed().as_secs_f64();
    let pid = world.daemons[0].pid();
    if ok < total as usize {
        broken.push(format!(
            "{} flood webhooks not answered 200",
            total as usize - ok
        ));
    }
    if late > 0 {
        broken.push(format!("{late} flood webhooks answered after amoCRM's 2 s"));
    }
    if stored < total as i64 {
        broken.push(format!(
            "{} flood webhooks not stored",
            total as i64 - stored
        ));
    }
    if processed < total as i64 {
        broken.push(format!(
            "{} flood webhooks not processed within 180 s",
            total as i64 - processed
        ));
    }
    figures.extend([
        ("flood_webhooks", total.to_string()),
        ("flood_sending_s", format!("{sending_s:.1}")),
        ("flood_answered_200", ok.to_string()),
        ("flood_over_2s", late.to_string()),
        ("flood_p50_ms", format!("{:.0}", pick(0.50))),
        ("flood_p99_ms", format!("{:.0}", pick(0.99))),
        (
            "flood_max_ms",
            format!("{:.0}", times.last().copied().unwrap_or(0.0)),
        ),
        ("flood_stored", stored.to_string()),
        ("flood_processed", processed.to_string()),
        (
            "flood_all_processed_after_s",
            format!("{processed_after:.1}"),
        ),
        ("flood_peak_rss_mb", format!("{:.1}", peak_rss_mb(pid))),
    ]);
    Ok(())
}
