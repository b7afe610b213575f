//! The KPIs a manager watches, for a time range and optionally one shop, as
//! the seed states their targets: confirmation time (< 15 min), SLA
//! compliance (> 95 %), full cycle (24–48 h), cancellations (< 5 %); with
//! the orders nobody is responsible for now and the sync's health. The same
//! [`Kpis`] feed `orderbridge kpi` and `GET /api/kpi`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::store::kpi::{self as store, Health, OrderFigures, ShopPoll, StageCompliance};
use crate::store::StoreError;

/// How a figure stands against its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    Green,
    Amber,
    Red,
    /// Nothing to judge yet.
    None,
}

/// One headline figure with its target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tile {
    pub name: &'static str,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub target: &'static str,
    pub standing: Standing,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cancellation {
    pub reason: Option<String>,
    pub orders: i64,
}

/// Everything the dashboard, the API and the command show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Kpis {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub shop: Option<String>,
    pub tiles: Vec<Tile>,
    /// Per marketplace and shop; the first row (no marketplace, no shop) is all of them.
    pub orders: Vec<OrderFigures>,
    /// Per stage; the first row (no stage) is all of them.
    pub sla: Vec<StageCompliance>,
    pub cancellations: Vec<Cancellation>,
    pub health: Health,
    pub polls: Vec<ShopPoll>,
}

/// Computes the KPIs of `[from, to)` (of `shop`, or all shops) at `now`.
pub async fn compute(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    shop: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Kpis, StoreError> {
    let orders = store::order_figures(pool, from, to, shop).await?;
    let sla = store::sla_compliance(pool, from, to, shop, now).await?;
    let cancellations = store::cancellation_reasons(pool, from, to, shop)
        .await?
        .into_iter()
        .map(|(reason, orders)| Cancellation { reason, orders })
        .collect();
    let health = store::health(pool, from, to, shop, now).await?;
    let polls = store::shop_polls(pool, shop).await?;
    let all = orders
        .iter()
        .find(|o| o.marketplace.is_none() && o.shop.is_none());
    let overall = sla.iter().find(|s| s.stage.is_none());
    let tiles = tiles(all, overall);
    Ok(Kpis {
        from,
        to,
        shop: shop.map(str::to_string),
        tiles,
        orders,
        sla,
        cancellations,
        health,
        polls,
    })
}

/// A range bound: an RFC 3339 moment, a date (its start in Almaty), or a
/// duration back from `now` (24h, 7d).
pub fn parse_moment(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    use chrono::TimeZone;
    let text = text.trim();
    if let Ok(moment) = DateTime::parse_from_rfc3339(text) {
        return Ok(moment.with_timezone(&Utc));
    }
    if let Ok(back) = humantime::parse_duration(text) {
        return chrono::Duration::from_std(back)
            .map(|d| now - d)
            .map_err(|_| format!("`{text}`: too far back; {MOMENTS_ACCEPTED}"));
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let start = date
            .and_hms_opt(0, 0, 0)
            .ok_or_else(|| format!("`{text}`: not a day; {MOMENTS_ACCEPTED}"))?;
        return chrono_tz::Asia::Almaty
            .from_local_datetime(&start)
            .earliest()
            .map(|d| d.with_timezone(&Utc))
            .ok_or_else(|| format!("`{text}`: not a day; {MOMENTS_ACCEPTED}"));
    }
    Err(format!("`{text}`: {MOMENTS_ACCEPTED}"))
}

/// What [`parse_moment`] accepts, for error messages.
pub const MOMENTS_ACCEPTED: &str = "give a date (2026-12-04, its start in Almaty), a moment (2026-12-04T09:00:00+05:00) or a duration back from now (36h, 7d)";

/// Publishes the KPIs of the last 24 h as gauges (labels: marketplace and
/// shop, or stage; `all` for the totals), for Prometheus and Grafana.
pub fn publish(kpis: &Kpis) {
    let label = |v: &Option<String>| v.clone().unwrap_or_else(|| "all".into());
    for o in &kpis.orders {
        let (m, s) = (label(&o.marketplace), label(&o.shop));
        let gauge = |name: &'static str, value: Option<f64>| {
            if let Some(value) = value {
                metrics::gauge!(name, "marketplace" => m.clone(), "shop" => s.clone()).set(value);
            }
        };
        gauge("orderbridge_kpi_orders", Some(o.orders as f64));
        gauge(
            "orderbridge_kpi_confirmation_p50_seconds",
            o.confirmation_p50_s,
        );
        gauge(
            "orderbridge_kpi_confirmation_p90_seconds",
            o.confirmation_p90_s,
        );
        gauge("orderbridge_kpi_full_cycle_p50_seconds", o.full_cycle_p50_s);
        gauge("orderbridge_kpi_full_cycle_p90_seconds", o.full_cycle_p90_s);
        gauge("orderbridge_kpi_lead_lag_p90_seconds", o.lead_lag_p90_s);
        gauge(
            "orderbridge_kpi_cancellation_ratio",
            (o.orders > 0).then(|| o.cancelled as f64 / o.orders as f64),
        );
    }
    for s in &kpis.sla {
        if let Some(percent) = compliance_percent(s) {
            metrics::gauge!("orderbridge_kpi_sla_compliance_ratio", "stage" => label(&s.stage))
                .set(percent / 100.0);
        }
    }
    metrics::gauge!("orderbridge_kpi_unassigned_orders").set(kpis.health.unassigned_now as f64);
}

/// Share of judged entries left within their SLA, in percent.
pub fn compliance_percent(c: &StageCompliance) -> Option<f64> {
    let judged = c.within + c.breached;
    (judged > 0).then(|| 100.0 * c.within as f64 / judged as f64)
}

fn tiles(all: Option<&OrderFigures>, sla: Option<&StageCompliance>) -> Vec<Tile> {
    let minutes = all.and_then(|a| a.confirmation_p50_s).map(|s| s / 60.0);
    let compliance = sla.and_then(compliance_percent);
    let cycle = all.and_then(|a| a.full_cycle_p50_s).map(|s| s / 3600.0);
    let cancelled = all
        .filter(|a| a.orders > 0)
        .map(|a| 100.0 * a.cancelled as f64 / a.orders as f64);
    vec![
        Tile {
            name: "confirmation_p50",
            value: minutes,
            unit: "min",
            target: "< 15 min",
            standing: judge(minutes, |m| m < 15.0, |m| m < 30.0),
        },
        Tile {
            name: "sla_compliance",
            value: compliance,
            unit: "%",
            target: "> 95 %",
            standing: judge(compliance, |c| c > 95.0, |c| c > 85.0),
        },
        Tile {
            name: "full_cycle_p50",
            value: cycle,
            unit: "h",
            target: "24–48 h",
            standing: judge(cycle, |h| h <= 48.0, |h| h <= 72.0),
        },
        Tile {
            name: "cancellation_rate",
            value: cancelled,
            unit: "%",
            target: "< 5 %",
            standing: judge(cancelled, |c| c < 5.0, |c| c < 10.0),
        },
    ]
}

fn judge(value: Option<f64>, green: impl Fn(f64) -> bool, amber: impl Fn(f64) -> bool) -> Standing {
    match value {
        None => Standing::None,
        Some(v) if green(v) => Standing::Green,
        Some(v) if amber(v) => Standing::Amber,
        Some(_) => Standing::Red,
    }
}

/// The KPIs as text tables (for `orderbridge kpi`).
pub fn render(kpis: &Kpis) -> String {
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
    let number = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
    let seconds = |v: Option<f64>| match v {
        Some(s) if s >= 3600.0 => format!("{:.1} h", s / 3600.0),
        Some(s) if s >= 60.0 => format!("{:.1} min", s / 60.0),
        Some(s) => format!("{s:.0} s"),
        None => "–".into(),
    };
    let mut out = format!(
        "KPIs from {} to {}{}\n",
        kpis.from.to_rfc3339(),
        kpis.to.to_rfc3339(),
        kpis.shop
            .as_ref()
            .map(|s| format!(", shop {s}"))
            .unwrap_or_default()
    );
    let mut tiles = Table::new();
    tiles.load_preset(UTF8_FULL_CONDENSED);
    tiles.set_header(vec!["kpi", "value", "target", "standing"]);
    for t in &kpis.tiles {
        tiles.add_row(vec![
            t.name.to_string(),
            format!("{} {}", number(t.value), t.unit),
            t.target.to_string(),
            format!("{:?}", t.standing).to_lowercase(),
        ]);
    }
    out.push_str(&tiles.to_string());
    let mut shops = Table::new();
    shops.load_preset(UTF8_FULL_CONDENSED);
    shops.set_header(vec![
        "shop",
        "orders",
        "confirmed",
        "confirm p50",
        "confirm p90",
        "completed",
        "cycle p50",
        "cycle p90",
        "cancelled",
        "lead lag p50",
        "lead lag p90",
    ]);
    for o in &kpis.orders {
        shops.add_row(vec![
            match (&o.marketplace, &o.shop) {
                (Some(m), Some(s)) => format!("{m}:{s}"),
                _ => "all".into(),
            },
            o.orders.to_string(),
            o.confirmed.to_string(),
            seconds(o.confirmation_p50_s),
            seconds(o.confirmation_p90_s),
            o.completed.to_string(),
            seconds(o.full_cycle_p50_s),
            seconds(o.full_cycle_p90_s),
            o.cancelled.to_string(),
            seconds(o.lead_lag_p50_s),
            seconds(o.lead_lag_p90_s),
        ]);
    }
    out.push('\n');
    out.push_str(&shops.to_string());
    let mut stages = Table::new();
    stages.load_preset(UTF8_FULL_CONDENSED);
    stages.set_header(vec!["stage", "within SLA", "breached", "compliance"]);
    for s in &kpis.sla {
        stages.add_row(vec![
            s.stage.clone().unwrap_or_else(|| "all stages".into()),
            s.within.to_string(),
            s.breached.to_string(),
            compliance_percent(s)
                .map(|c| format!("{c:.1} %"))
                .unwrap_or_else(|| "–".into()),
        ]);
    }
    out.push('\n');
    out.push_str(&stages.to_string());
    if !kpis.cancellations.is_empty() {
        out.push_str("\ncancellations:");
        for c in &kpis.cancellations {
            out.push_str(&format!(
                " {} ×{};",
                c.reason.as_deref().unwrap_or("no reason"),
                c.orders
            ));
        }
    }
    let h = &kpis.health;
    out.push_str(&format!(
        "\nnow: {} order(s) without a responsible; jobs pending {}, retrying {}, dead {}; 429s {}; open circuits {}",
        h.unassigned_now, h.jobs_pending, h.jobs_retrying, h.jobs_dead, h.throttled_attempts, h.open_circuits
    ));
    for p in &kpis.polls {
        out.push_str(&format!(
            "\nlast good poll of {}:{}: {}{}",
            p.marketplace,
            p.shop,
            p.last_success_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "never".into()),
            p.last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        ));
    }
    out
}
