//! The dashboard at `/`: server-rendered HTML (maud), no external assets,
//! inline SVG. KPI tiles against their targets (green/amber/red), orders and
//! SLA breaches per hour over the last 24 h, the orders at risk now (nearest
//! deadline first, linked to their leads), outbox depth and dead letters,
//! each shop's last good poll, recent errors. It refreshes its `<main>` from
//! `/?part=main` every 15 s (no full reload, no flicker) and fits a 390 px
//! wide phone without scrolling sideways. The same access rule as `/api/kpi`.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::AppState;
use crate::sla::kpi::{self, Kpis, Standing};
use crate::store::kpi::{self as store, AtRisk};
use crate::store::outbox::DeadJob;
use crate::store::StoreError;

#[derive(Debug, serde::Deserialize)]
pub(super) struct PageQuery {
    part: Option<String>,
}

/// What one render shows.
struct Page {
    kpis: Kpis,
    hourly: Vec<(DateTime<Utc>, i64, i64)>,
    at_risk: Vec<AtRisk>,
    depth: BTreeMap<String, i64>,
    dead: Vec<DeadJob>,
    errors: Vec<(DateTime<Utc>, String, String, Option<String>)>,
    now: DateTime<Utc>,
}

async fn gather(state: &AppState) -> Result<Page, StoreError> {
    let now = Utc::now();
    let pool = &state.pool;
    Ok(Page {
        kpis: kpi::compute(pool, now - chrono::Duration::hours(24), now, None, now).await?,
        hourly: store::hourly(pool, now).await?,
        at_risk: store::at_risk(pool, 10).await?,
        depth: crate::store::outbox::depth(pool)
            .await?
            .into_iter()
            .collect(),
        dead: crate::store::outbox::list_dead(pool, 5).await?,
        errors: store::recent_errors(pool, 8).await?,
        now,
    })
}

pub(super) async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    if let Some(denied) = state.dashboard.access.check(&headers) {
        return denied;
    }
    let page = match gather(&state).await {
        Ok(page) => page,
        Err(error) => {
            tracing::warn!(%error, "The dashboard could not read its figures.");
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("the dashboard cannot read the database: {error}"),
            )
                .into_response();
        }
    };
    let main = main(&page, &state.dashboard.crm_urls);
    if query.part.as_deref() == Some("main") {
        return Html(main.into_string()).into_response();
    }
    Html(document(main).into_string()).into_response()
}

const STYLE: &str = r#"
*{box-sizing:border-box}body{margin:0;font:15px/1.4 system-ui,sans-serif;background:#f4f5f7;color:#1d2330}
header{padding:12px 16px;background:#1d2330;color:#fff}header h1{margin:0;font-size:18px}
main{padding:12px;max-width:1200px;margin:0 auto}
section{background:#fff;border-radius:8px;padding:12px;margin:0 0 12px;overflow-x:auto}
h2{font-size:15px;margin:0 0 8px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:8px;background:none;padding:0}
.tile{border-radius:8px;padding:10px;color:#fff}.tile b{display:block;font-size:24px}
.green{background:#2e8b57}.amber{background:#d98c00}.red{background:#c0392b}.none{background:#7a8190}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{padding:4px 6px;border-bottom:1px solid #e3e5e9;text-align:left;overflow-wrap:anywhere}th{overflow-wrap:normal}
svg{width:100%;max-width:760px;height:auto;display:block}.muted{color:#7a8190;font-size:12px}
"#;

const REFRESH: &str = r#"
// The layout's width, for checks from outside (a phone must not scroll
// sideways), also told to an embedding page (a phone-width frame).
function reportLayout() {
  const layout = {scrollWidth: document.documentElement.scrollWidth, viewportWidth: window.innerWidth};
  document.body.dataset.scrollWidth = layout.scrollWidth;
  document.body.dataset.viewportWidth = layout.viewportWidth;
  if (window.parent !== window) { window.parent.postMessage({orderbridgeLayout: layout}, '*'); }
}
window.addEventListener('load', reportLayout);
window.addEventListener('resize', reportLayout);
setInterval(async () => {
  try {
    const r = await fetch('/?part=main', {credentials: 'same-origin'});
    if (r.ok) { document.querySelector('main').innerHTML = await r.text(); }
  } catch (e) {}
}, 15000);
"#;

fn document(main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="ru" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "orderbridge" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { h1 { "orderbridge · KPIs and sync health" } }
                main { (main) }
                script { (PreEscaped(REFRESH)) }
            }
        }
    }
}

fn standing(s: Standing) -> &'static str {
    match s {
        Standing::Green => "green",
        Standing::Amber => "amber",
        Standing::Red => "red",
        Standing::None => "none",
    }
}

fn main(page: &Page, crm_urls: &BTreeMap<String, String>) -> Markup {
    let k = &page.kpis;
    html! {
        section.tiles {
            @for t in &k.tiles {
                div class=(format!("tile {}", standing(t.standing))) data-kpi=(t.name) {
                    (label(t.name))
                    b { (t.value.map(|v| format!("{v:.1} {}", t.unit)).unwrap_or_else(|| "–".into())) }
                    span { "target " (t.target) }
                }
            }
            div class=(format!("tile {}", if k.health.unassigned_now > 0 { "red" } else { "green" })) data-kpi="unassigned" {
                "without a responsible" b { (k.health.unassigned_now) } span { "now" }
            }
        }
        section {
            h2 { "Orders and SLA breaches per hour, last 24 h" }
            (chart(&page.hourly))
        }
        section {
            h2 { "Orders at risk now" }
            @if page.at_risk.is_empty() { p.muted { "No order has an SLA running." } }
            @else {
                table {
                    tr { th { "deadline" } th { "order" } th { "stage" } th { "lead" } }
                    @for r in &page.at_risk {
                        tr {
                            td { (deadline(r.deadline, page.now)) }
                            td { (r.marketplace) " " (r.code) }
                            td { (r.stage) }
                            td {
                                @match crm_urls.get(&r.crm_account) {
                                    Some(base) => a href=(format!("{}/leads/detail/{}", base.trim_end_matches('/'), r.lead_id)) { (r.lead_id) },
                                    None => (r.lead_id),
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Outbox" }
            p {
                "pending " b { (page.depth.get("pending").copied().unwrap_or(0)) }
                " · running " b { (page.depth.get("running").copied().unwrap_or(0)) }
                " · retrying " b { (k.health.jobs_retrying) }
                " · dead " b { (page.depth.get("dead").copied().unwrap_or(0)) }
                " · 429s (24 h) " b { (k.health.throttled_attempts) }
                " · open circuits " b { (k.health.open_circuits) }
            }
            @if !page.dead.is_empty() {
                table {
                    tr { th { "dead job" } th { "kind" } th { "last error" } }
                    @for d in &page.dead {
                        tr { td { (d.id) } td { (d.kind) } td { (d.last_error.clone().unwrap_or_default()) } }
                    }
                }
            }
        }
        section {
            h2 { "Shops" }
            table {
                tr { th { "shop" } th { "last good poll" } th { "last error" } }
                @for p in &k.polls {
                    tr {
                        td { (p.marketplace) ":" (p.shop) }
                        td { (p.last_success_at.map(|t| ago(t, page.now)).unwrap_or_else(|| "never".into())) }
                        td { (p.last_error.clone().unwrap_or_default()) }
                    }
                }
            }
        }
        section {
            h2 { "Recent errors" }
            @if page.errors.is_empty() { p.muted { "None." } }
            @else {
                table {
                    @for (at, kind, outcome, error) in &page.errors {
                        tr { td { (ago(*at, page.now)) } td { (kind) " " (outcome) } td { (error.clone().unwrap_or_default()) } }
                    }
                }
            }
        }
        p.muted { "Figures of the last 24 h, " (page.now.format("%Y-%m-%d %H:%M:%S UTC")) "; refreshed every 15 s. JSON: " a href="/api/kpi" { "/api/kpi" } }
    }
}

fn label(name: &str) -> &'static str {
    match name {
        "confirmation_p50" => "confirmation (p50)",
        "sla_compliance" => "SLA compliance",
        "full_cycle_p50" => "full cycle (p50)",
        "cancellation_rate" => "cancellations",
        _ => "kpi",
    }
}

fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - at).num_seconds();
    match s {
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

fn deadline(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if at < now {
        format!("overdue by {}", ago(at, now).trim_end_matches(" ago"))
    } else {
        let s = (at - now).num_seconds();
        match s {
            s if s < 3600 => format!("in {} min", s / 60),
            s => format!("in {} h", s / 3600),
        }
    }
}

/// 24 bars of orders per hour, breaches as red bars in front.
fn chart(hourly: &[(DateTime<Utc>, i64, i64)]) -> Markup {
    let max = hourly
        .iter()
        .map(|(_, o, b)| (*o).max(*b))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let (w, h) = (240.0, 64.0);
    let bar = w / hourly.len().max(1) as f64;
    html! {
        svg viewBox=(format!("0 0 {w} {}", h + 10.0)) role="img" aria-label="orders and SLA breaches per hour" {
            @for (i, (hour, orders, breaches)) in hourly.iter().enumerate() {
                @let x = i as f64 * bar;
                @let oh = h * *orders as f64 / max;
                @let bh = h * *breaches as f64 / max;
                rect x=(format!("{:.1}", x + 0.5)) y=(format!("{:.1}", h - oh)) width=(format!("{:.1}", bar - 1.0)) height=(format!("{oh:.1}")) fill="#5b7fbd" {
                    title { (hour.format("%H:00")) ": " (orders) " orders, " (breaches) " breaches" }
                }
                rect x=(format!("{:.1}", x + bar * 0.3)) y=(format!("{:.1}", h - bh)) width=(format!("{:.1}", bar * 0.4)) height=(format!("{bh:.1}")) fill="#c0392b" {}
                @if i % 6 == 0 {
                    text x=(format!("{:.1}", x)) y=(format!("{}", h + 9.0)) font-size="7" fill="#7a8190" { (hour.format("%H:00")) }
                }
            }
        }
        p.muted { "blue: orders first seen · red: SLA breaches" }
    }
}
