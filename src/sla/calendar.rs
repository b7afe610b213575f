//! Working time: the `[sla]` section's timezone, working hours and days off,
//! and the arithmetic SLA deadlines need (a duration counts working time
//! only; "until the end of the working day" ends where the day's last working
//! interval does).
//!
//! `working_hours` is `"always"` (around the clock) or a list of day ranges
//! with their hours, separated by `;`: `"mon-fri 09:00-18:00; sat 10:00-14:00"`.
//! A day may have several intervals (`"mon-fri 09:00-13:00, 14:00-18:00"`).
//! Days off are dates (`2026-12-16`) when nobody works.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CalendarError {
    #[error("sla.timezone: `{0}` is not an IANA timezone (e.g. Asia/Almaty)")]
    Timezone(String),
    #[error("sla.working_hours: {0}")]
    Hours(String),
    #[error("sla.days_off: `{0}` is not a date (YYYY-MM-DD)")]
    DayOff(String),
}

/// Working hours in a timezone.
#[derive(Debug, Clone)]
pub struct WorkCalendar {
    tz: chrono_tz::Tz,
    /// `None`: around the clock. Otherwise the intervals of each weekday,
    /// Monday first, as seconds from midnight.
    week: Option<[Vec<(u32, u32)>; 7]>,
    days_off: BTreeSet<NaiveDate>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// How far ahead a deadline is looked for (a calendar whose days off cover
/// years ends there).
const HORIZON_DAYS: i64 = 3_660;

impl WorkCalendar {
    pub fn parse(
        timezone: &str,
        working_hours: &str,
        days_off: &[String],
    ) -> Result<WorkCalendar, CalendarError> {
        let tz: chrono_tz::Tz = timezone
            .parse()
            .map_err(|_| CalendarError::Timezone(timezone.to_string()))?;
        let days_off = days_off
            .iter()
            .map(|d| {
                NaiveDate::parse_from_str(d.trim(), "%Y-%m-%d")
                    .map_err(|_| CalendarError::DayOff(d.clone()))
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        let text = working_hours.trim();
        if text.eq_ignore_ascii_case("always") {
            return Ok(WorkCalendar {
                tz,
                week: None,
                days_off,
            });
        }
        let mut week: [Vec<(u32, u32)>; 7] = Default::default();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (days, hours) = part.split_once(char::is_whitespace).ok_or_else(|| {
                CalendarError::Hours(format!(
                    "`{part}`: give days and hours, e.g. `mon-fri 09:00-18:00`, or `always`"
                ))
            })?;
            let days = parse_days(days)?;
            for range in hours.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let (from, to) = range.split_once('-').ok_or_else(|| {
                    CalendarError::Hours(format!("`{range}`: a range is HH:MM-HH:MM"))
                })?;
                let (from, to) = (parse_time(from)?, parse_time(to)?);
                if to <= from {
                    return Err(CalendarError::Hours(format!(
                        "`{range}`: the end must be after the start (use 24:00 for midnight)"
                    )));
                }
                for day in &days {
                    week[*day].push((from, to));
                }
            }
        }
        for day in week.iter_mut() {
            day.sort_unstable();
            for pair in day.windows(2) {
                if pair[1].0 < pair[0].1 {
                    return Err(CalendarError::Hours(format!(
                        "`{working_hours}`: intervals of one day overlap"
                    )));
                }
            }
        }
        if week.iter().all(Vec::is_empty) {
            return Err(CalendarError::Hours(format!(
                "`{working_hours}` has no working time at all; give e.g. `mon-fri 09:00-18:00` or `always`"
            )));
        }
        Ok(WorkCalendar {
            tz,
            week: Some(week),
            days_off,
        })
    }

    /// The timezone working hours are in.
    pub fn timezone(&self) -> chrono_tz::Tz {
        self.tz
    }

    /// Around the clock in Asia/Almaty (tests and defaults).
    pub fn always() -> WorkCalendar {
        WorkCalendar {
            tz: chrono_tz::Asia::Almaty,
            week: None,
            days_off: BTreeSet::new(),
        }
    }

    /// The working intervals of one local day, as UTC instants.
    fn intervals(&self, day: NaiveDate) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        if self.days_off.contains(&day) {
            return Vec::new();
        }
        let spans: Vec<(u32, u32)> = match &self.week {
            None => vec![(0, 86_400)],
            Some(week) => week[day.weekday().num_days_from_monday() as usize].clone(),
        };
        spans
            .into_iter()
            .filter_map(|(from, to)| Some((self.at(day, from)?, self.at(day, to)?)))
            .collect()
    }

    /// The instant of `seconds` after local midnight of `day` (24:00 is the next midnight).
    fn at(&self, day: NaiveDate, seconds: u32) -> Option<DateTime<Utc>> {
        let (day, seconds) = if seconds >= 86_400 {
            (day.succ_opt()?, seconds - 86_400)
        } else {
            (day, seconds)
        };
        let time = NaiveTime::from_num_seconds_from_midnight_opt(seconds, 0)?;
        self.tz
            .from_local_datetime(&NaiveDateTime::new(day, time))
            .earliest()
            .map(|t| t.with_timezone(&Utc))
    }

    fn local_day(&self, at: DateTime<Utc>) -> NaiveDate {
        at.with_timezone(&self.tz).date_naive()
    }

    /// `start` plus `work` of working time.
    pub fn add_working(&self, start: DateTime<Utc>, work: Duration) -> DateTime<Utc> {
        let mut left = chrono::Duration::from_std(work).unwrap_or(chrono::Duration::MAX);
        let mut day = self.local_day(start);
        for _ in 0..HORIZON_DAYS {
            for (from, to) in self.intervals(day) {
                if to <= start {
                    continue;
                }
                let from = from.max(start);
                let available = to - from;
                if left <= available {
                    return from + left;
                }
                left -= available;
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => break,
            }
        }
        start + chrono::Duration::from_std(work).unwrap_or(chrono::Duration::MAX)
    }

    /// Working time between `from` and `to`.
    pub fn working_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
        if to <= from {
            return Duration::ZERO;
        }
        let mut total = chrono::Duration::zero();
        let mut day = self.local_day(from);
        for _ in 0..HORIZON_DAYS {
            for (start, end) in self.intervals(day) {
                let (start, end) = (start.max(from), end.min(to));
                if end > start {
                    total += end - start;
                }
            }
            if self.at(day, 86_400).is_none_or(|midnight| midnight >= to) {
                break;
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => break,
            }
        }
        total.to_std().unwrap_or(Duration::ZERO)
    }

    /// The end of the working day `at` is in; outside working hours, the end
    /// of the next working day. Around the clock: the end of the local day.
    pub fn end_of_working_day(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        let mut day = self.local_day(at);
        for _ in 0..HORIZON_DAYS {
            if let Some((_, end)) = self.intervals(day).last() {
                if *end > at {
                    return *end;
                }
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => break,
            }
        }
        at
    }
}

fn parse_days(text: &str) -> Result<Vec<usize>, CalendarError> {
    let index = |name: &str| {
        DAYS.iter()
            .position(|d| d.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                CalendarError::Hours(format!(
                    "`{name}` is not a day; days are {}",
                    DAYS.join(", ")
                ))
            })
    };
    let mut days = Vec::new();
    for item in text.split(',').filter(|i| !i.trim().is_empty()) {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (index(from)?, index(to)?);
                if to < from {
                    return Err(CalendarError::Hours(format!(
                        "`{item}`: a day range runs forward (mon-fri)"
                    )));
                }
                days.extend(from..=to);
            }
            None => days.push(index(item)?),
        }
    }
    Ok(days)
}

fn parse_time(text: &str) -> Result<u32, CalendarError> {
    let bad = || CalendarError::Hours(format!("`{text}` is not a time (HH:MM)"));
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn almaty(text: &str) -> DateTime<Utc> {
        // Asia/Almaty is UTC+5 all year.
        DateTime::parse_from_str(&format!("{text} +0500"), "%Y-%m-%d %H:%M %z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap()
    }

    fn office() -> WorkCalendar {
        WorkCalendar::parse(
            "Asia/Almaty",
            "mon-fri 09:00-18:00; sat 10:00-14:00",
            &["2026-12-16".into()],
        )
        .unwrap()
    }

    #[test]
    fn durations_count_working_time_only() {
        let cal = office();
        let minutes = |m: u64| Duration::from_secs(m * 60);
        // (start, working time, deadline), by hand. 2026-12-04 is a Friday,
        // 2026-12-16 (Independence Day) a Wednesday off.
        let table = [
            ("2026-12-04 10:00", minutes(30), "2026-12-04 10:30"),
            // Friday 17:30 + 2 h: 30 min on Friday, 1 h 30 on Saturday from 10:00.
            ("2026-12-04 17:30", minutes(120), "2026-12-05 11:30"),
            // Saturday 13:00 + 3 h: 1 h on Saturday, Sunday off, 2 h on Monday.
            ("2026-12-05 13:00", minutes(180), "2026-12-07 11:00"),
            // Entered at night (after midnight): the clock starts at 09:00.
            ("2026-12-08 00:30", minutes(15), "2026-12-08 09:15"),
            // Just before midnight on Friday: Saturday 10:00 + 1 h.
            ("2026-12-04 23:59", minutes(60), "2026-12-05 11:00"),
            // Tuesday 17:00 + 2 h: 1 h Tuesday, Wednesday off, 1 h Thursday.
            ("2026-12-15 17:00", minutes(120), "2026-12-17 10:00"),
            // Sunday: Monday 09:00 + 9 h = Monday 18:00 exactly.
            ("2026-12-06 12:00", minutes(540), "2026-12-07 18:00"),
        ];
        for (start, work, deadline) in table {
            assert_eq!(
                cal.add_working(almaty(start), work),
                almaty(deadline),
                "{start} + {work:?}"
            );
        }
    }

    #[test]
    fn end_of_the_working_day_and_working_time_between() {
        let cal = office();
        assert_eq!(
            cal.end_of_working_day(almaty("2026-12-04 11:00")),
            almaty("2026-12-04 18:00")
        );
        // After hours on Friday: Saturday's end.
        assert_eq!(
            cal.end_of_working_day(almaty("2026-12-04 19:00")),
            almaty("2026-12-05 14:00")
        );
        // Saturday after 14:00: Monday's end.
        assert_eq!(
            cal.end_of_working_day(almaty("2026-12-05 15:00")),
            almaty("2026-12-07 18:00")
        );
        assert_eq!(
            cal.working_between(almaty("2026-12-04 17:00"), almaty("2026-12-07 10:00")),
            Duration::from_secs((60 + 4 * 60 + 60) * 60)
        );
        let always = WorkCalendar::parse("Asia/Almaty", "always", &[]).unwrap();
        assert_eq!(
            always.add_working(almaty("2026-12-05 23:30"), Duration::from_secs(3600)),
            almaty("2026-12-06 00:30")
        );
        assert_eq!(
            always.end_of_working_day(almaty("2026-12-05 23:30")),
            almaty("2026-12-06 00:00")
        );
    }

    #[test]
    fn a_calendar_without_working_time_or_with_typos_is_refused() {
        for (tz, hours, why) in [
            ("Asia/Almaty", "", "no working time"),
            ("Asia/Almaty", "mon-fri 18:00-09:00", "end must be after"),
            ("Asia/Almaty", "mon-fry 09:00-18:00", "not a day"),
            ("Asia/Almaty", "mon-fri 9-18", "not a time"),
            ("Asia/Almaty", "mon-fri 09:00-13:00, 12:00-18:00", "overlap"),
            ("Asia/Almaaty", "always", "not an IANA timezone"),
        ] {
            let error = WorkCalendar::parse(tz, hours, &[]).unwrap_err().to_string();
            assert!(error.contains(why), "{hours}: {error}");
        }
        assert!(WorkCalendar::parse("Asia/Almaty", "always", &["16.12.2026".into()]).is_err());
    }
}
