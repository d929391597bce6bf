//! Each budget's spend against its ceiling in the window now open, and the day it runs out at the
//! rate so far.
//!
//! The spend is read from `usage_events FINAL` with the enforcer's own definitions: the rows a
//! rule counts (`measures::ATTEMPTED_ROWS`), the measure's sum (`Measure::sql_sum`), the window
//! the enforcer keeps (`window::calendar_bounds` in the budget's time zone, on `ended_at_us`), and
//! the rule's matchers and scope. It is what the meter has written, a few seconds behind the
//! enforcer's counters; a budget that also names key subjects (`when.subjects`) cannot be told
//! apart in ClickHouse, which has no subject column, and is shown without a figure.

use std::fmt::Write as _;

use clickhouse::{Client, Row};
use serde::Deserialize;
use tollgate_schemas::decision::{Measure, RuleKind};
use tollgate_schemas::measures::ATTEMPTED_ROWS;
use tollgate_schemas::rules::{Rule, Scope, Window};
use tollgate_schemas::window::calendar_bounds;

/// Scopes listed per budget at most (the largest spenders), so a budget kept per user or per
/// session shows its top, not every caller-chosen id.
pub const SCOPES_SHOWN: usize = 50;

/// Where a budget's window stands at its current spend rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// At or over the ceiling already.
    Exceeded,
    /// Reaches the ceiling at this instant (microseconds) inside the window.
    RunsOutAt(i64),
    /// Stays under the ceiling until the window ends.
    Holds,
    /// Nothing spent yet: no rate to project.
    NoSpend,
    /// A sliding window never ends, so there is no day to name.
    Sliding,
}

/// The instant the ceiling is reached if spending goes on at the average rate since the window
/// opened: `now + (limit − spent) × (now − start) / spent`.
pub fn project(spent: i64, limit: i64, start_us: i64, end_us: Option<i64>, now_us: i64) -> Projection {
    let Some(end_us) = end_us else { return Projection::Sliding };
    if spent >= limit {
        return Projection::Exceeded;
    }
    if spent <= 0 {
        return Projection::NoSpend;
    }
    let elapsed = i128::from((now_us - start_us).max(1));
    let left = i128::from(limit - spent);
    let at = i128::from(now_us) + left * elapsed / i128::from(spent);
    if at >= i128::from(end_us) {
        Projection::Holds
    } else {
        Projection::RunsOutAt(i64::try_from(at).unwrap_or(i64::MAX))
    }
}

/// One scope of one budget.
#[derive(Debug, Clone)]
pub struct BudgetScope {
    pub scope: String,
    pub spent: i64,
    pub projection: Projection,
}

/// A budget as the page shows it.
#[derive(Debug, Clone)]
pub struct BudgetStatus {
    pub rule: Rule,
    pub window_start_us: i64,
    /// `None` for a sliding window.
    pub window_end_us: Option<i64>,
    pub scopes: Vec<BudgetScope>,
    /// Why there is no figure, when there is none.
    pub note: Option<String>,
}

#[derive(Debug, Row, Deserialize)]
struct Spent {
    scope: String,
    spent: i64,
}

/// A ClickHouse string literal.
pub fn sql_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The query of one budget's spend per scope in `[start, end)`; `None` when ClickHouse cannot
/// tell its traffic apart (a subject condition).
pub fn spend_sql(db: &str, rule: &Rule, start_us: i64, end_us: i64) -> Option<String> {
    if rule.subject_kind.is_some() || rule.subject_id.is_some() {
        return None;
    }
    // `ended_at` (whole seconds of `ended_at_us`) bounds the partitions read; `ended_at_us` is
    // the enforcer's own boundary.
    let (first_s, last_s) = (start_us.div_euclid(1_000_000), (end_us - 1).div_euclid(1_000_000));
    let mut cond = format!(
        "{ATTEMPTED_ROWS} AND ended_at >= toDateTime({first_s}) AND ended_at <= toDateTime({last_s}) \
         AND ended_at_us >= {start_us} AND ended_at_us < {end_us}"
    );
    for (field, value) in &rule.matchers {
        let _ = write!(cond, " AND {} = {}", field.name(), sql_string(value));
    }
    let scope = match &rule.scope {
        Scope::Global => "'global'".to_owned(),
        Scope::Named(n) => sql_string(n),
        Scope::Field(f) => {
            let _ = write!(cond, " AND {} != ''", f.name());
            format!("concat({}, {})", sql_string(&format!("{}:", f.scope_prefix())), f.name())
        }
        Scope::ApiKey => {
            cond.push_str(" AND api_key_id != ''");
            "concat('api_key:', api_key_id)".to_owned()
        }
    };
    Some(format!(
        "SELECT {scope} AS scope, {sum} AS spent FROM {db}.usage_events FINAL WHERE {cond} \
         GROUP BY scope ORDER BY spent DESC, scope LIMIT {SCOPES_SHOWN}",
        sum = rule.measure.sql_sum()
    ))
}

/// Every budget of the policy, with its spend now.
pub async fn statuses(client: &Client, db: &str, rules: &[Rule], now_us: i64) -> Vec<BudgetStatus> {
    let mut out = Vec::new();
    for rule in rules.iter().filter(|r| r.kind == RuleKind::Budget) {
        let (start, end) = match &rule.window {
            Window::Calendar { period, timezone } => {
                let tz = jiff::tz::TimeZone::get(timezone).unwrap_or(jiff::tz::TimeZone::UTC);
                let (s, e) = calendar_bounds(*period, &tz, now_us);
                (s, Some(e))
            }
            Window::Sliding { seconds } => {
                (now_us.saturating_sub(i64::try_from(*seconds).unwrap_or(i64::MAX).saturating_mul(1_000_000)), None)
            }
        };
        let mut status =
            BudgetStatus { rule: rule.clone(), window_start_us: start, window_end_us: end, scopes: vec![], note: None };
        match spend_sql(db, rule, start, end.unwrap_or(now_us + 1)) {
            None => status.note = Some("scoped on key subjects, which ClickHouse does not record".into()),
            Some(sql) => match client.query(&sql).fetch_all::<Spent>().await {
                Ok(mut rows) => {
                    // One counter for all the budget's traffic: shown at zero before any spend
                    // (ClickHouse versions differ on whether a constant GROUP BY over no rows
                    // answers a row).
                    if rows.is_empty() {
                        match &rule.scope {
                            Scope::Global => rows.push(Spent { scope: "global".into(), spent: 0 }),
                            Scope::Named(n) => rows.push(Spent { scope: n.clone(), spent: 0 }),
                            Scope::Field(_) | Scope::ApiKey => {}
                        }
                    }
                    status.scopes = rows
                        .into_iter()
                        .map(|r| BudgetScope {
                            projection: project(r.spent, rule.limit, start, end, now_us),
                            scope: r.scope,
                            spent: r.spent,
                        })
                        .collect();
                }
                Err(e) => status.note = Some(format!("spend unavailable: {e}")),
            },
        }
        out.push(status);
    }
    out
}

/// A figure of `measure` as the reports print it (money as exact dollars).
pub fn figure(measure: Measure, value: i64) -> String {
    crate::live::amount(measure, value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use tollgate_schemas::decision::Measure;
    use tollgate_schemas::rules::{Action, Field};

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn projection_at_the_average_rate() {
        // Half spent after 10 of 30 days: the other half takes 10 more.
        assert_eq!(project(50, 100, 0, Some(30 * DAY), 10 * DAY), Projection::RunsOutAt(20 * DAY));
        assert_eq!(project(10, 100, 0, Some(30 * DAY), 10 * DAY), Projection::Holds);
        assert_eq!(project(100, 100, 0, Some(30 * DAY), DAY), Projection::Exceeded);
        assert_eq!(project(0, 100, 0, Some(30 * DAY), DAY), Projection::NoSpend);
        assert_eq!(project(5, 100, 0, None, DAY), Projection::Sliding);
        // No overflow at the extremes.
        assert_eq!(project(1, i64::MAX, 0, Some(i64::MAX), i64::MAX / 2), Projection::Holds);
    }

    #[test]
    fn the_spend_query_keeps_to_the_rule_and_quotes_its_values() {
        let rule = Rule {
            id: "b".into(),
            kind: RuleKind::Budget,
            matchers: vec![(Field::Project, "it's\\x".into())],
            subject_kind: None,
            subject_id: None,
            scope: Scope::Field(Field::Team),
            measure: Measure::CostNanos,
            limit: 100,
            window: Window::Sliding { seconds: 60 },
            action: Action::HardBlock,
            action_name: "hard_block".into(),
            audit: false,
            cut_streams: false,
            queue_timeout_ms: 0,
            alerts: vec![],
        };
        let sql = spend_sql("db", &rule, 1, 2).unwrap();
        assert!(sql.contains("project = 'it\\'s\\\\x'"), "{sql}");
        assert!(sql.contains("concat('team:', team)") && sql.contains("team != ''"), "{sql}");
        assert!(sql.contains("status != 'rejected'") && sql.contains("ended_at_us >= 1 AND ended_at_us < 2"), "{sql}");
        let month = spend_sql("db", &rule, 1_796_083_200_000_000, 1_798_761_600_000_000).unwrap();
        assert!(month.contains("ended_at >= toDateTime(1796083200) AND ended_at <= toDateTime(1798761599)"), "{month}");
        let mut subject = rule.clone();
        subject.subject_id = Some("u".into());
        assert!(spend_sql("db", &subject, 1, 2).is_none());
    }
}
