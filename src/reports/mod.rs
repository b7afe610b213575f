//! Reports the business settles with: the weekly commission settlement
//! ([`settle`]) of a partner programme's leads, or of an Avito shop's orders,
//! written as CSV, and its comparison with the partner's own report
//! ([`read_partner_csv`], [`compare`]).
//!
//! A partner lead is in a week's settlement when a status change of it was
//! reported in the week (Monday 00:00 to Monday 00:00 in `sla.timezone`); its
//! status is the last one of the week. It earns the commission (`rate` × its
//! buyout or client price, or `fixed`) in the week it first ends in one of
//! `commission.counts_when`: a deal paid in an earlier week earns nothing
//! again. An Avito order is in the week when its status changed in it; a
//! `closed` order earns Avito its own `prices.commission`.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use sqlx::PgPool;

use crate::config::{MarketplaceKind, Settings};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("`{0}` is not a week; write it as ISO year and week, e.g. 2026-W47")]
    BadWeek(String),
    #[error("no partner source or Avito shop `{name}` is configured (partner sources: {partners}; Avito shops: {shops})")]
    UnknownSource {
        name: String,
        partners: String,
        shops: String,
    },
    #[error("`{0}` is a Kaspi shop; Kaspi orders carry no commission to settle")]
    NotSettled(String),
    #[error("{file}: line {line}, column `{column}`: {message}")]
    Csv {
        file: String,
        line: u64,
        column: String,
        message: String,
    },
    #[error("{file}: {message}")]
    CsvShape { file: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A week: its name and its bounds in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Week {
    pub name: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Parses `2026-W47` (ISO week) into its bounds in `timezone`.
pub fn parse_week(text: &str, timezone: chrono_tz::Tz) -> Result<Week, SettleError> {
    let bad = || SettleError::BadWeek(text.to_string());
    let (year, week) = text.trim().split_once(['W', 'w']).ok_or_else(bad)?;
    let year: i32 = year.trim_end_matches('-').parse().map_err(|_| bad())?;
    let week: u32 = week.parse().map_err(|_| bad())?;
    let monday = NaiveDate::from_isoywd_opt(year, week, chrono::Weekday::Mon).ok_or_else(bad)?;
    let start = |day: NaiveDate| {
        timezone
            .from_local_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
            .earliest()
            .map(|t| t.with_timezone(&Utc))
    };
    let from = start(monday).ok_or_else(bad)?;
    let to = start(monday + chrono::Duration::days(7)).ok_or_else(bad)?;
    Ok(Week {
        name: format!("{year}-W{week:02}"),
        from,
        to,
    })
}

/// One settled lead (or order).
#[derive(Debug, Clone, PartialEq)]
pub struct SettlementLine {
    /// The partner's lead id (or the Avito order number).
    pub id: String,
    pub crm_lead_id: Option<i64>,
    /// The last status of the week.
    pub status: String,
    pub counts: bool,
    /// What the commission is computed on (the price), when known.
    pub base: Option<f64>,
    pub commission: f64,
    /// Reports of the week the partner has not taken yet.
    pub unsent: i64,
}

/// A week's settlement of one source.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub source: String,
    /// `partner` or `avito`.
    pub kind: &'static str,
    pub week: Week,
    pub lines: Vec<SettlementLine>,
}

impl Settlement {
    pub fn counted(&self) -> usize {
        self.lines.iter().filter(|l| l.counts).count()
    }

    pub fn total(&self) -> f64 {
        round2(self.lines.iter().map(|l| l.commission).sum())
    }

    pub fn unsent(&self) -> i64 {
        self.lines.iter().map(|l| l.unsent).sum()
    }

    /// The settlement as CSV: `lead_id,crm_lead_id,status,counts,base,commission`.
    pub fn to_csv(&self) -> String {
        let mut out = csv::Writer::from_writer(Vec::new());
        let _ = out.write_record([
            "lead_id",
            "crm_lead_id",
            "status",
            "counts",
            "base",
            "commission",
        ]);
        for l in &self.lines {
            let _ = out.write_record([
                l.id.clone(),
                l.crm_lead_id.map(|i| i.to_string()).unwrap_or_default(),
                l.status.clone(),
                if l.counts { "yes" } else { "no" }.to_string(),
                l.base.map(|b| format!("{b:.2}")).unwrap_or_default(),
                format!("{:.2}", l.commission),
            ]);
        }
        let _ = out.write_record(["total", "", "", "", "", &format!("{:.2}", self.total())]);
        String::from_utf8(out.into_inner().unwrap_or_default()).unwrap_or_default()
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The Avito status that earns Avito its commission.
const AVITO_SETTLED_STATUS: &str = "closed";

/// Settles one partner source (or Avito shop) for a week.
pub async fn settle(
    pool: &PgPool,
    settings: &Settings,
    source: &str,
    week: &Week,
) -> Result<Settlement, SettleError> {
    if let Some(partner) = settings.partners.get(source) {
        let c = &partner.commission;
        let rows = crate::store::partner::settlement_rows(
            pool,
            source,
            week.from,
            week.to,
            &c.counts_when,
        )
        .await?;
        let lines = rows
            .into_iter()
            .map(|r| {
                let base = if c.of == "client_price" {
                    r.client_price
                } else {
                    r.buyout_price
                };
                let counts = c.counts_when.contains(&r.final_status) && !r.counted_before;
                let commission = match (counts, c.fixed, c.rate) {
                    (false, _, _) => 0.0,
                    (true, Some(fixed), _) => fixed,
                    (true, None, Some(rate)) => round2(base.unwrap_or(0.0) * rate),
                    (true, None, None) => 0.0,
                };
                SettlementLine {
                    id: r.partner_lead_id,
                    crm_lead_id: r.crm_lead_id,
                    status: r.final_status,
                    counts,
                    base,
                    commission,
                    unsent: r.unsent,
                }
            })
            .collect();
        return Ok(Settlement {
            source: source.to_string(),
            kind: "partner",
            week: week.clone(),
            lines,
        });
    }
    match settings.shops.get(source).map(|s| s.marketplace) {
        Some(MarketplaceKind::Avito) => {
            let rows = crate::store::partner::order_settlement_rows(
                pool, "avito", source, week.from, week.to,
            )
            .await?;
            let lines = rows
                .into_iter()
                .map(|r| {
                    let counts = r.status_key == AVITO_SETTLED_STATUS;
                    let commission = r.commission_minor.unwrap_or(0) as f64 / 100.0;
                    SettlementLine {
                        id: r.code,
                        crm_lead_id: None,
                        status: r.status_key,
                        counts,
                        base: r.total_minor.map(|t| t as f64 / 100.0),
                        commission: if counts { commission } else { 0.0 },
                        unsent: 0,
                    }
                })
                .collect();
            Ok(Settlement {
                source: source.to_string(),
                kind: "avito",
                week: week.clone(),
                lines,
            })
        }
        Some(MarketplaceKind::Kaspi) => Err(SettleError::NotSettled(source.to_string())),
        None => {
            let names = |v: Vec<&String>| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.into_iter().cloned().collect::<Vec<_>>().join(", ")
                }
            };
            Err(SettleError::UnknownSource {
                name: source.to_string(),
                partners: names(settings.partners.keys().collect()),
                shops: names(
                    settings
                        .shops
                        .iter()
                        .filter(|(_, s)| s.marketplace == MarketplaceKind::Avito)
                        .map(|(n, _)| n)
                        .collect(),
                ),
            })
        }
    }
}

/// One line of the partner's own report.
#[derive(Debug, Clone, PartialEq)]
pub struct PartnerLine {
    pub id: String,
    pub status: String,
    pub amount: f64,
    /// Its line in the file (for messages).
    pub line: u64,
}

/// The partner's report's column names.
#[derive(Debug, Clone)]
pub struct PartnerColumns {
    pub lead_id: String,
    pub status: String,
    pub amount: String,
}

impl PartnerColumns {
    pub fn from_settings(settings: &Settings, source: &str) -> PartnerColumns {
        match settings.partners.get(source) {
            Some(p) => PartnerColumns {
                lead_id: p.settlement.lead_id_column.clone(),
                status: p.settlement.status_column.clone(),
                amount: p.settlement.amount_column.clone(),
            },
            None => PartnerColumns {
                lead_id: "lead_id".into(),
                status: "status".into(),
                amount: "commission".into(),
            },
        }
    }
}

/// Reads the partner's weekly CSV: exactly the three configured columns (in
/// any order); every problem names its line and column.
pub fn read_partner_csv(
    file: &str,
    text: &str,
    columns: &PartnerColumns,
) -> Result<Vec<PartnerLine>, SettleError> {
    let shape = |message: String| SettleError::CsvShape {
        file: file.to_string(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| shape(format!("cannot read the header: {e}")))?
        .clone();
    let wanted = [&columns.lead_id, &columns.status, &columns.amount];
    let unknown: Vec<&str> = header
        .iter()
        .filter(|h| !wanted.iter().any(|w| w.as_str() == *h))
        .collect();
    if !unknown.is_empty() {
        return Err(shape(format!(
            "unknown column(s) {}; the report has exactly the columns {}, {}, {} (partners.<source>.settlement names them)",
            unknown.join(", "),
            columns.lead_id,
            columns.status,
            columns.amount
        )));
    }
    let index = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| shape(format!("the column `{name}` is missing")))
    };
    let (id_at, status_at, amount_at) = (
        index(&columns.lead_id)?,
        index(&columns.status)?,
        index(&columns.amount)?,
    );
    let mut lines = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            SettleError::Csv {
                file: file.to_string(),
                line,
                column: "-".into(),
                message: e.to_string(),
            }
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let cell = |at: usize| record.get(at).unwrap_or("").to_string();
        let bad = |column: &str, message: String| SettleError::Csv {
            file: file.to_string(),
            line,
            column: column.to_string(),
            message,
        };
        let id = cell(id_at);
        if id.is_empty() {
            return Err(bad(&columns.lead_id, "the lead id is empty".into()));
        }
        if id == "total" {
            continue;
        }
        let raw = cell(amount_at);
        let amount: f64 = raw
            .replace(' ', "")
            .replace(',', ".")
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| bad(&columns.amount, format!("`{raw}` is not a number")))?;
        lines.push(PartnerLine {
            id,
            status: cell(status_at),
            amount,
            line,
        });
    }
    Ok(lines)
}

/// A difference between the bridge's settlement and the partner's report.
#[derive(Debug, Clone, PartialEq)]
pub enum Discrepancy {
    /// In the bridge's settlement, not in the partner's report.
    MissingAtPartner {
        id: String,
        status: String,
    },
    /// In the partner's report, not in the bridge's settlement.
    MissingHere {
        id: String,
        status: String,
        line: u64,
    },
    Status {
        id: String,
        ours: String,
        theirs: String,
    },
    Amount {
        id: String,
        ours: f64,
        theirs: f64,
    },
}

impl Discrepancy {
    pub fn kind(&self) -> &'static str {
        match self {
            Discrepancy::MissingAtPartner { .. } => "missing_at_partner",
            Discrepancy::MissingHere { .. } => "missing_here",
            Discrepancy::Status { .. } => "status",
            Discrepancy::Amount { .. } => "amount",
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Discrepancy::MissingAtPartner { id, .. }
            | Discrepancy::MissingHere { id, .. }
            | Discrepancy::Status { id, .. }
            | Discrepancy::Amount { id, .. } => id,
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Discrepancy::MissingAtPartner { status, .. } => {
                format!("ours: {status}; not in the partner's report")
            }
            Discrepancy::MissingHere { status, line, .. } => {
                format!("the partner's line {line}: {status}; not in ours")
            }
            Discrepancy::Status { ours, theirs, .. } => format!("ours: {ours}, theirs: {theirs}"),
            Discrepancy::Amount { ours, theirs, .. } => {
                format!("ours: {ours:.2}, theirs: {theirs:.2}")
            }
        }
    }
}

/// Every difference, by lead id.
pub fn compare(ours: &Settlement, theirs: &[PartnerLine]) -> Vec<Discrepancy> {
    let mine: BTreeMap<&str, &SettlementLine> =
        ours.lines.iter().map(|l| (l.id.as_str(), l)).collect();
    let partner: BTreeMap<&str, &PartnerLine> = theirs.iter().map(|l| (l.id.as_str(), l)).collect();
    let mut found = Vec::new();
    for (id, line) in &mine {
        match partner.get(id) {
            None => found.push(Discrepancy::MissingAtPartner {
                id: id.to_string(),
                status: line.status.clone(),
            }),
            Some(p) => {
                if p.status != line.status {
                    found.push(Discrepancy::Status {
                        id: id.to_string(),
                        ours: line.status.clone(),
                        theirs: p.status.clone(),
                    });
                }
                if (p.amount - line.commission).abs() > 0.005 {
                    found.push(Discrepancy::Amount {
                        id: id.to_string(),
                        ours: line.commission,
                        theirs: p.amount,
                    });
                }
            }
        }
    }
    for (id, p) in &partner {
        if !mine.contains_key(id) {
            found.push(Discrepancy::MissingHere {
                id: id.to_string(),
                status: p.status.clone(),
                line: p.line,
            });
        }
    }
    found.sort_by(|a, b| (a.id(), a.kind()).cmp(&(b.id(), b.kind())));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> PartnerColumns {
        PartnerColumns {
            lead_id: "lead_id".into(),
            status: "status".into(),
            amount: "commission".into(),
        }
    }

    #[test]
    fn weeks_are_iso_weeks_in_the_timezone() {
        let week = parse_week("2026-W47", chrono_tz::Asia::Almaty).expect("week");
        // Monday 16 November 2026, 00:00 in Almaty (UTC+5) is 19:00 UTC on the 15th.
        assert_eq!(week.from.to_rfc3339(), "2026-11-15T19:00:00+00:00");
        assert_eq!(week.to - week.from, chrono::Duration::days(7));
        for bad in ["2026-47", "2026-W54", "W47", "", "2026-Wxx"] {
            assert!(parse_week(bad, chrono_tz::UTC).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_partners_csv_is_read_and_every_mistake_named() {
        let lines = read_partner_csv(
            "p.csv",
            "status,lead_id,commission\nsold,AV-1,\"1 750,00\"\nno_contact,AV-2,0\n",
            &columns(),
        )
        .expect("valid");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].amount, 1750.0);
        let error = read_partner_csv(
            "p.csv",
            "lead_id,status,commission\nAV-1,sold,12\nAV-2,sold,abc\n",
            &columns(),
        )
        .expect_err("bad number")
        .to_string();
        assert_eq!(
            error,
            "p.csv: line 3, column `commission`: `abc` is not a number"
        );
        let error = read_partner_csv("p.csv", "lead,status,commission,extra\n", &columns())
            .expect_err("unknown columns")
            .to_string();
        assert!(error.contains("unknown column(s) lead, extra"), "{error}");
    }

    #[test]
    fn comparison_finds_each_difference_and_nothing_else() {
        let week = parse_week("2026-W47", chrono_tz::UTC).expect("week");
        let line = |id: &str, status: &str, commission: f64| SettlementLine {
            id: id.into(),
            crm_lead_id: None,
            status: status.into(),
            counts: commission > 0.0,
            base: None,
            commission,
            unsent: 0,
        };
        let ours = Settlement {
            source: "p".into(),
            kind: "partner",
            week,
            lines: vec![
                line("A", "sold", 100.0),
                line("B", "bought", 50.0),
                line("C", "no_contact", 0.0),
                line("D", "listed", 10.0),
            ],
        };
        let theirs = read_partner_csv(
            "p.csv",
            "lead_id,status,commission\nA,sold,100\nB,listed,50\nC,no_contact,5\nE,sold,20\n",
            &columns(),
        )
        .expect("valid");
        let found = compare(&ours, &theirs);
        let kinds: Vec<(&str, &str)> = found.iter().map(|d| (d.id(), d.kind())).collect();
        assert_eq!(
            kinds,
            vec![
                ("B", "status"),
                ("C", "amount"),
                ("D", "missing_at_partner"),
                ("E", "missing_here")
            ]
        );
    }
}
