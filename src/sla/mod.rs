//! SLAs: how long a lead may stay in a stage, who is responsible there, and
//! what happens when time runs out. [`calendar`] owns working time;
//! [`SlaPolicy`] turns a stage's SLA from the map (tightened by the
//! marketplace's own deadline) into a warning and a breach instant;
//! [`enter_stage`] records each stage entry with its source, responsible and
//! timers; [`pick_responsible`] chooses the responsible by the role's rule;
//! [`timers`] fires due warnings and breaches exactly once as amoCRM tasks.

pub mod alerts;
pub mod calendar;
pub mod kpi;
pub mod timers;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::config::SlaSettings;
use crate::mapping::Role;
use crate::store::sla::{self as store, NewEntry};
use crate::store::StoreError;
pub use calendar::{CalendarError, WorkCalendar};

/// Working time and the warning share: how a stage's SLA becomes instants.
#[derive(Debug, Clone)]
pub struct SlaPolicy {
    pub calendar: WorkCalendar,
    /// Share of the SLA after which the warning comes (0 < f < 1).
    pub warn_fraction: f64,
}

impl Default for SlaPolicy {
    fn default() -> Self {
        SlaPolicy {
            calendar: WorkCalendar::always(),
            warn_fraction: 0.8,
        }
    }
}

impl SlaPolicy {
    pub fn from_settings(settings: &SlaSettings) -> Result<SlaPolicy, CalendarError> {
        Ok(SlaPolicy {
            calendar: WorkCalendar::parse(
                &settings.timezone,
                &settings.working_hours,
                &settings.days_off,
            )?,
            warn_fraction: settings.warn_fraction,
        })
    }

    /// `(warn_at, deadline)` of a stage entered at `entered`: the map's SLA
    /// (`Some(Some(d))`: `d` of working time; `Some(None)`: the end of the
    /// working day; `None`: none), or the marketplace's own deadline when that
    /// is earlier. The warning comes at the policy's share of the working time
    /// to the deadline (of the wall time, when none of it is working time).
    pub fn timers(
        &self,
        entered: DateTime<Utc>,
        sla: Option<Option<Duration>>,
        marketplace_deadline: Option<DateTime<Utc>>,
    ) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let mapped = match sla {
            Some(Some(work)) => Some(self.calendar.add_working(entered, work)),
            Some(None) => Some(self.calendar.end_of_working_day(entered)),
            None => None,
        };
        let deadline = match (mapped, marketplace_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(deadline) = deadline else {
            return (None, None);
        };
        if deadline <= entered {
            return (Some(deadline), Some(deadline));
        }
        let working = self.calendar.working_between(entered, deadline);
        let warn_at = if working.is_zero() {
            let wall = (deadline - entered).to_std().unwrap_or(Duration::ZERO);
            entered
                + chrono::Duration::from_std(wall.mul_f64(self.warn_fraction)).unwrap_or_default()
        } else {
            self.calendar
                .add_working(entered, working.mul_f64(self.warn_fraction))
        };
        (Some(warn_at.min(deadline)), Some(deadline))
    }
}

/// A stage a lead just entered.
#[derive(Debug, Clone)]
pub struct StageEntered<'a> {
    pub order_id: i64,
    pub crm_account: &'a str,
    pub lead_id: i64,
    pub stage: (u64, u64),
    pub stage_name: &'a str,
    pub role: Option<&'a str>,
    /// `marketplace`, `manager` or `bridge`.
    pub source: &'static str,
    pub responsible_user_id: Option<u64>,
    pub sla: Option<Option<Duration>>,
    pub marketplace_deadline: Option<DateTime<Utc>>,
    pub at: DateTime<Utc>,
}

/// Records the entry (closing the previous one, which ends its timers) with
/// its SLA timers. Entering the current stage again changes nothing.
pub async fn enter_stage(
    pool: &PgPool,
    policy: &SlaPolicy,
    entered: &StageEntered<'_>,
) -> Result<(), StoreError> {
    let (warn_at, deadline) = policy.timers(entered.at, entered.sla, entered.marketplace_deadline);
    let mut conn = pool.acquire().await?;
    store::enter(
        &mut conn,
        &NewEntry {
            order_id: entered.order_id,
            crm_account: entered.crm_account.to_string(),
            lead_id: entered.lead_id,
            pipeline_id: entered.stage.0 as i64,
            status_id: entered.stage.1 as i64,
            stage: entered.stage_name.to_string(),
            role: entered.role.map(str::to_string),
            source: entered.source,
            responsible_user_id: entered.responsible_user_id.map(|u| u as i64),
            entered_at: entered.at,
            warn_at,
            deadline,
        },
    )
    .await?;
    Ok(())
}

/// The responsible for a new entry into a stage of `role`, by the role's
/// rule: `round_robin` (in turn, a counter per role) or `least_loaded`
/// (fewest open stage entries, then the first listed). Only users the CRM
/// lists as active count (the map's resolution keeps only those). `None`:
/// nobody can be assigned.
pub async fn pick_responsible(
    pool: &PgPool,
    crm_account: &str,
    role_name: &str,
    role: &Role,
) -> Result<Option<u64>, StoreError> {
    let users = &role.user_ids;
    if users.is_empty() {
        return Ok(None);
    }
    if role.pick == "least_loaded" {
        let ids: Vec<i64> = users.iter().map(|u| *u as i64).collect();
        let load = store::open_load(pool, crm_account, &ids).await?;
        return Ok(users
            .iter()
            .min_by_key(|u| load.get(&(**u as i64)).copied().unwrap_or(0))
            .copied());
    }
    let turn = store::next_turn(pool, crm_account, role_name).await?;
    Ok(users
        .get(turn.unsigned_abs() as usize % users.len())
        .copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn almaty(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_str(&format!("{text} +0500"), "%Y-%m-%d %H:%M %z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap()
    }

    #[test]
    fn the_warning_comes_at_the_share_of_working_time_and_a_marketplace_deadline_tightens() {
        let policy = SlaPolicy {
            calendar: WorkCalendar::parse("Asia/Almaty", "mon-fri 09:00-18:00", &[]).unwrap(),
            warn_fraction: 0.8,
        };
        // Friday 17:00 + 2 h of working time: Monday 10:00; the warning at
        // 96 min of working time: Monday 09:36.
        let (warn, deadline) = policy.timers(
            almaty("2026-12-04 17:00"),
            Some(Some(Duration::from_secs(7200))),
            None,
        );
        assert_eq!(deadline, Some(almaty("2026-12-07 10:00")));
        assert_eq!(warn, Some(almaty("2026-12-07 09:36")));
        // Avito's confirmTill on Friday 17:30 is earlier: it wins, the warning
        // at 24 of its 30 minutes.
        let (warn, deadline) = policy.timers(
            almaty("2026-12-04 17:00"),
            Some(Some(Duration::from_secs(7200))),
            Some(almaty("2026-12-04 17:30")),
        );
        assert_eq!(deadline, Some(almaty("2026-12-04 17:30")));
        assert_eq!(warn, Some(almaty("2026-12-04 17:24")));
        // A later marketplace deadline changes nothing; no SLA and no deadline: no timers.
        let (_, deadline) = policy.timers(
            almaty("2026-12-04 10:00"),
            Some(Some(Duration::from_secs(3600))),
            Some(almaty("2026-12-05 10:00")),
        );
        assert_eq!(deadline, Some(almaty("2026-12-04 11:00")));
        assert_eq!(
            policy.timers(almaty("2026-12-04 10:00"), None, None),
            (None, None)
        );
        // End of day.
        let (_, deadline) = policy.timers(almaty("2026-12-04 10:00"), Some(None), None);
        assert_eq!(deadline, Some(almaty("2026-12-04 18:00")));
    }
}
