//! Report periods: a half-open UTC window on `ended_at`, parsed from a month or from dates and
//! datetimes, checked against what ClickHouse `DateTime` holds, and written as the SQL condition
//! every report query carries (numbers only) and as text for titles and JSON.

use chrono::{DateTime, NaiveDate, NaiveDateTime};

use super::ReportError;
use crate::window::Granularity;

/// A half-open window [from, to) on `ended_at`, in Unix seconds (UTC); `None` is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Period {
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// ClickHouse `DateTime` holds seconds in [0, 2^32).
const MAX_DATETIME: i64 = u32::MAX as i64;

impl Period {
    /// Every event.
    pub const ALL: Period = Period { from: None, to: None };

    /// The calendar month `YYYY-MM`, UTC.
    pub fn month(text: &str) -> Result<Self, ReportError> {
        let bad = || ReportError::Period(format!("{text:?} is not a month (YYYY-MM)"));
        let (y, m) = text.trim().split_once('-').ok_or_else(bad)?;
        let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        let start = NaiveDate::from_ymd_opt(y, m, 1).ok_or_else(bad)?;
        let next = if m == 12 { NaiveDate::from_ymd_opt(y + 1, 1, 1) } else { NaiveDate::from_ymd_opt(y, m + 1, 1) };
        let next = next.ok_or_else(bad)?;
        Period::checked(Some(midnight(start)), Some(midnight(next)))
    }

    /// `[from, to)` from dates (`2026-04-01`, midnight UTC) or datetimes (`2026-04-01T12:30:00Z`,
    /// `2026-04-01 12:30`); either side may be open.
    pub fn between(from: Option<&str>, to: Option<&str>) -> Result<Self, ReportError> {
        let from = from.map(parse_instant).transpose().map_err(ReportError::Period)?;
        let to = to.map(parse_instant).transpose().map_err(ReportError::Period)?;
        Period::checked(from, to)
    }

    fn checked(from: Option<i64>, to: Option<i64>) -> Result<Self, ReportError> {
        for t in [from, to].into_iter().flatten() {
            if !(0..=MAX_DATETIME).contains(&t) {
                return Err(ReportError::Period(format!(
                    "{} is outside what ClickHouse DateTime holds (1970 to 2106)",
                    fmt_time(t)
                )));
            }
        }
        if let (Some(f), Some(t)) = (from, to) {
            if f >= t {
                return Err(ReportError::Period(format!("from {} is not before to {}", fmt_time(f), fmt_time(t))));
            }
        }
        Ok(Period { from, to })
    }

    /// The SQL condition on `ended_at` (numbers only: nothing a user typed reaches the SQL).
    pub fn condition(&self) -> String {
        self.condition_on("ended_at")
    }

    /// The same condition on another `DateTime` column (a rollup's `window_start`).
    pub fn condition_on(&self, column: &str) -> String {
        match (self.from, self.to) {
            (None, None) => "1".into(),
            (Some(f), None) => format!("{column} >= toDateTime({f})"),
            (None, Some(t)) => format!("{column} < toDateTime({t})"),
            (Some(f), Some(t)) => format!("{column} >= toDateTime({f}) AND {column} < toDateTime({t})"),
        }
    }

    /// The coarsest rollup granularity whose windows tile the period exactly (both bounds, where
    /// set, are window starts): summing those windows gives what summing the raw events does.
    /// `None` when a bound falls inside a minute.
    pub fn tiled_by(&self) -> Option<Granularity> {
        let aligned =
            |g: Granularity, b: Option<i64>| b.is_none_or(|b| u32::try_from(b).is_ok_and(|b| g.start(b) == b));
        [Granularity::Month, Granularity::Day, Granularity::Hour, Granularity::Minute]
            .into_iter()
            .find(|g| aligned(*g, self.from) && aligned(*g, self.to))
    }

    pub fn describe(&self) -> String {
        match (self.from, self.to) {
            (None, None) => "all time".into(),
            (f, t) => format!(
                "ended_at in [{}, {})",
                f.map_or_else(|| "-inf".into(), fmt_time),
                t.map_or_else(|| "+inf".into(), fmt_time)
            ),
        }
    }
}

fn midnight(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp())
}

/// Parses a UTC date or datetime into Unix seconds.
pub fn parse_instant(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.timestamp());
    }
    let naive = t.strip_suffix('Z').unwrap_or(t);
    for f in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(naive, f) {
            return Ok(dt.and_utc().timestamp());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(naive, "%Y-%m-%d") {
        return Ok(midnight(d));
    }
    Err(format!("{text:?} is not a date (2026-04-01) or a UTC datetime (2026-04-01T12:30:00Z)"))
}

/// `2026-04-01T12:30:00Z`.
pub fn fmt_time(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0).map_or_else(|| secs.to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}
