//! Chargeback and the reference's failure modes as reports: SQL over `usage_events FINAL`, typed rows, and table, CSV or JSON text.
//!
//! Every figure is read with `FINAL`, so a replayed or re-sent event (same `event_id`) counts
//! once. Money stays integer nano-USD from ClickHouse to the printed `12.345678901`; ratios and
//! averages are the only floats. The SQL avoids JOIN (its syntax differs between ClickHouse
//! 18.16 and current releases) and runs on both; migration 0003 holds the same queries as views,
//! one calendar month (UTC) per row.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use clickhouse::{Client, Row};
use comfy_table::{CellAlignment, Table, presets};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tollgate_schemas::policy::PriceCard;

use tollgate_store::ClickHouseConfig;
use tollgate_store::migrate::check_database_name;

/// Frontier-share symptom of the reference: more than half of a workflow's cost on frontier models.
pub const DEFAULT_FRONTIER_SHARE: f64 = 0.5;
/// Context-stuffing symptom: more than 50K prompt tokens per request on average.
pub const DEFAULT_STUFFING_TOKENS: u64 = 50_000;
/// Agent-loop symptom: a session-hour above 3× the p95 session-hour of its workflow.
pub const DEFAULT_LOOP_K: f64 = 3.0;
/// Tokenizer drift: a model version whose token ratio is 10% above the previous version's.
pub const DEFAULT_DRIFT: f64 = 0.10;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("clickhouse query failed: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("invalid period: {0}")]
    Period(String),
    #[error("invalid argument: {0}")]
    Argument(String),
    #[error("cannot write csv: {0}")]
    Csv(String),
}

/// A chargeback grouping; `model` groups by provider and model together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Dimension {
    Project,
    Team,
    CostCenter,
    User,
    Workflow,
    Model,
}

impl Dimension {
    /// The `usage_events` columns this grouping shows, in order.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Dimension::Project => &["project"],
            Dimension::Team => &["team"],
            Dimension::CostCenter => &["cost_center"],
            Dimension::User => &["user_id"],
            Dimension::Workflow => &["workflow_tag"],
            Dimension::Model => &["provider", "model"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dimension::Project => "project",
            Dimension::Team => "team",
            Dimension::CostCenter => "cost-center",
            Dimension::User => "user",
            Dimension::Workflow => "workflow",
            Dimension::Model => "model",
        }
    }
}

/// The grouping columns of `dims` in the order given, each once (`--by team --by team` is `team`).
pub fn key_columns(dims: &[Dimension]) -> Vec<&'static str> {
    let mut cols: Vec<&'static str> = Vec::new();
    for d in dims {
        for c in d.columns() {
            if !cols.contains(c) {
                cols.push(c);
            }
        }
    }
    cols
}

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
        match (self.from, self.to) {
            (None, None) => "1".into(),
            (Some(f), None) => format!("ended_at >= toDateTime({f})"),
            (None, Some(t)) => format!("ended_at < toDateTime({t})"),
            (Some(f), Some(t)) => format!("ended_at >= toDateTime({f}) AND ended_at < toDateTime({t})"),
        }
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

/// Nano-USD as exact decimal dollars: `12345678901` → `12.345678901` (`price::usd_decimal`).
pub use tollgate_schemas::price::usd_decimal as format_usd;

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { 0.0 }
}

/// The SQL every report runs, for a database `db` (checked by the caller) and a period.
pub mod sql {
    use super::{Dimension, Period, key_columns};
    use tollgate_schemas::usage::sql::{PROMPT_TOKENS as PROMPT, TOTAL_TOKENS as TOKENS};

    pub fn chargeback(db: &str, dims: &[Dimension], p: &Period) -> String {
        let cols = key_columns(dims);
        let list = cols.join(", ");
        format!(
            "SELECT [{list}] AS keys, count() AS requests, countIf(status != 'ok') AS errors, \
             sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
             sum(cached_input_tokens) AS cached_input_tokens, sum(cost_nanos) AS cost_nanos \
             FROM {db}.usage_events FINAL WHERE {cond} GROUP BY {list} ORDER BY cost_nanos DESC, {list}",
            cond = p.condition()
        )
    }

    pub fn frontier_share(db: &str, p: &Period) -> String {
        let frontier = format!("(provider, model) IN (SELECT provider, model FROM {db}.frontier_models)");
        format!(
            "SELECT workflow_tag, count() AS requests, countIf({frontier}) AS frontier_requests, \
             sum(cost_nanos) AS all_cost, sumIf(cost_nanos, {frontier}) AS frontier_cost \
             FROM {db}.usage_events FINAL WHERE {cond} GROUP BY workflow_tag ORDER BY workflow_tag",
            cond = p.condition()
        )
    }

    pub fn context_stuffing(db: &str, p: &Period) -> String {
        format!(
            "SELECT workflow_tag, count() AS requests, sum({PROMPT}) AS prompt_tokens, max({PROMPT}) AS max_prompt_tokens \
             FROM {db}.usage_events FINAL WHERE status = 'ok' AND {cond} GROUP BY workflow_tag ORDER BY workflow_tag",
            cond = p.condition()
        )
    }

    /// Session-hours above `k` × the p95 session-hour of their workflow (over the same period).
    pub fn loops(db: &str, p: &Period, k: f64) -> String {
        format!(
            "SELECT workflow_tag, session_id, hour, requests, tokens, cost_nanos, workflow_p95_tokens FROM ( \
               SELECT workflow_tag, groupArray(session_id) AS sessions, groupArray(hour) AS hours, \
                 groupArray(requests) AS requests_a, groupArray(tokens) AS tokens_a, groupArray(cost_nanos) AS cost_a, \
                 toFloat64(quantile(0.95)(tokens)) AS workflow_p95_tokens \
               FROM ( \
                 SELECT workflow_tag, session_id, toStartOfHour(ended_at, 'UTC') AS hour, count() AS requests, \
                   sum({TOKENS}) AS tokens, sum(cost_nanos) AS cost_nanos \
                 FROM {db}.usage_events FINAL WHERE {cond} GROUP BY workflow_tag, session_id, hour \
               ) GROUP BY workflow_tag \
             ) ARRAY JOIN sessions AS session_id, hours AS hour, requests_a AS requests, tokens_a AS tokens, cost_a AS cost_nanos \
             WHERE tokens > {k:?} * workflow_p95_tokens \
             ORDER BY workflow_tag, session_id, hour",
            cond = p.condition()
        )
    }

    pub fn drift(db: &str, p: &Period) -> String {
        format!(
            "SELECT provider, model, model_version, min(ended_at) AS first_seen, max(ended_at) AS last_seen, \
             count() AS requests, sum({PROMPT}) AS prompt_tokens, sum(assumeNotNull(reference_input_tokens)) AS reference_tokens \
             FROM {db}.usage_events FINAL \
             WHERE status = 'ok' AND token_source = 'provider' AND isNotNull(reference_input_tokens) \
               AND assumeNotNull(reference_input_tokens) > 0 AND {cond} \
             GROUP BY provider, model, model_version ORDER BY provider, model, first_seen, model_version",
            cond = p.condition()
        )
    }

    pub fn untagged(db: &str, p: &Period) -> String {
        format!(
            "SELECT arrayStringConcat(arrayFilter(x -> x != '', [if(project = '', 'project', ''), \
               if(team = '', 'team', ''), if(cost_center = '', 'cost_center', '')]), ',') AS missing, \
             api_key_id, workflow_tag, count() AS requests, sum(cost_nanos) AS cost_nanos \
             FROM {db}.usage_events FINAL WHERE (project = '' OR team = '' OR cost_center = '') AND {cond} \
             GROUP BY missing, api_key_id, workflow_tag ORDER BY cost_nanos DESC, missing, api_key_id, workflow_tag",
            cond = p.condition()
        )
    }

    /// All spend in the period (the denominator of the untagged share).
    pub fn total_cost(db: &str, p: &Period) -> String {
        format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL WHERE {cond}", cond = p.condition())
    }
}

/// One chargeback group: `keys` are the grouping values in the order of [`key_columns`].
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct ChargebackRow {
    pub keys: Vec<String>,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cost_nanos: i64,
}

/// Sums of chargeback rows (integers: exact).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cost_nanos: i64,
}

impl Totals {
    pub fn of(rows: &[ChargebackRow]) -> Totals {
        rows.iter().fold(Totals::default(), |t, r| Totals {
            requests: t.requests + r.requests,
            errors: t.errors + r.errors,
            input_tokens: t.input_tokens + r.input_tokens,
            output_tokens: t.output_tokens + r.output_tokens,
            cached_input_tokens: t.cached_input_tokens + r.cached_input_tokens,
            cost_nanos: t.cost_nanos + r.cost_nanos,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct FrontierRow {
    pub workflow_tag: String,
    pub requests: u64,
    pub frontier_requests: u64,
    pub cost_nanos: i64,
    pub frontier_cost_nanos: i64,
}

impl FrontierRow {
    /// Frontier cost over all cost (0 when the workflow cost nothing).
    pub fn share(&self) -> f64 {
        ratio(self.frontier_cost_nanos as f64, self.cost_nanos as f64)
    }
}

#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct StuffingRow {
    pub workflow_tag: String,
    /// Successful requests.
    pub requests: u64,
    pub prompt_tokens: i64,
    pub max_prompt_tokens: i64,
}

impl StuffingRow {
    pub fn avg_prompt_tokens(&self) -> f64 {
        ratio(self.prompt_tokens as f64, self.requests as f64)
    }
}

#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct LoopRow {
    pub workflow_tag: String,
    pub session_id: String,
    /// Start of the hour, Unix seconds.
    pub hour: u32,
    pub requests: u64,
    pub tokens: i64,
    pub cost_nanos: i64,
    pub workflow_p95_tokens: f64,
}

impl LoopRow {
    pub fn ratio_to_p95(&self) -> f64 {
        ratio(self.tokens as f64, self.workflow_p95_tokens)
    }
}

#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct DriftRow {
    pub provider: String,
    pub model: String,
    pub model_version: String,
    pub first_seen: u32,
    pub last_seen: u32,
    pub requests: u64,
    pub prompt_tokens: i64,
    pub reference_tokens: i64,
}

impl DriftRow {
    /// The provider's prompt tokens per reference (tiktoken) token of the same text.
    pub fn token_ratio(&self) -> f64 {
        ratio(self.prompt_tokens as f64, self.reference_tokens as f64)
    }
}

/// A model version beside the version of the same provider and model seen before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    pub row: DriftRow,
    pub previous_version: Option<String>,
    /// `token_ratio / previous token_ratio - 1`.
    pub change: Option<f64>,
    pub flagged: bool,
}

/// Pairs each version with the one of the same (provider, model) first seen before it.
pub fn drift_against_previous(rows: Vec<DriftRow>, threshold: f64) -> Vec<Drift> {
    let mut out: Vec<Drift> = Vec::with_capacity(rows.len());
    let mut sorted = rows;
    sorted.sort_by(|a, b| {
        (&a.provider, &a.model, a.first_seen, &a.model_version).cmp(&(
            &b.provider,
            &b.model,
            b.first_seen,
            &b.model_version,
        ))
    });
    for row in sorted {
        let prev = out.last().map(|d| &d.row).filter(|p| p.provider == row.provider && p.model == row.model);
        let (previous_version, change) = match prev {
            Some(p) if p.token_ratio() > 0.0 => {
                (Some(p.model_version.clone()), Some(row.token_ratio() / p.token_ratio() - 1.0))
            }
            Some(p) => (Some(p.model_version.clone()), None),
            None => (None, None),
        };
        let flagged = change.is_some_and(|c| c > threshold);
        out.push(Drift { row, previous_version, change, flagged });
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct UntaggedRow {
    /// The attribution fields that are empty, comma-separated (`project,cost_center`).
    pub missing: String,
    pub api_key_id: String,
    pub workflow_tag: String,
    pub requests: u64,
    pub cost_nanos: i64,
}

#[derive(Debug, Clone, Row, Serialize)]
struct TierRow {
    sync_id: u64,
    provider: String,
    model: String,
    tier: String,
    price_card_version: String,
}

/// Runs the reports against one database.
#[derive(Clone)]
pub struct Reporter {
    client: Client,
    db: String,
}

impl Reporter {
    pub fn new(cfg: &ClickHouseConfig) -> Result<Self, ReportError> {
        check_database_name(&cfg.database).map_err(ReportError::Argument)?;
        Ok(Reporter { client: cfg.client(), db: cfg.database.clone() })
    }

    pub fn database(&self) -> &str {
        &self.db
    }

    /// Cost per group of `dims` (at least one) in the period, largest first.
    pub async fn chargeback(&self, dims: &[Dimension], p: &Period) -> Result<Vec<ChargebackRow>, ReportError> {
        if dims.is_empty() {
            return Err(ReportError::Argument("chargeback needs at least one grouping (--by)".into()));
        }
        Ok(self.client.query(&sql::chargeback(&self.db, dims, p)).fetch_all().await?)
    }

    pub async fn frontier_share(&self, p: &Period) -> Result<Vec<FrontierRow>, ReportError> {
        Ok(self.client.query(&sql::frontier_share(&self.db, p)).fetch_all().await?)
    }

    pub async fn context_stuffing(&self, p: &Period) -> Result<Vec<StuffingRow>, ReportError> {
        Ok(self.client.query(&sql::context_stuffing(&self.db, p)).fetch_all().await?)
    }

    /// Session-hours above `k` × their workflow's p95 session-hour.
    pub async fn loops(&self, p: &Period, k: f64) -> Result<Vec<LoopRow>, ReportError> {
        if !(k.is_finite() && k > 0.0) {
            return Err(ReportError::Argument(format!("--k must be a positive number, not {k}")));
        }
        Ok(self.client.query(&sql::loops(&self.db, p, k)).fetch_all().await?)
    }

    pub async fn drift(&self, p: &Period, threshold: f64) -> Result<Vec<Drift>, ReportError> {
        let rows: Vec<DriftRow> = self.client.query(&sql::drift(&self.db, p)).fetch_all().await?;
        Ok(drift_against_previous(rows, threshold))
    }

    pub async fn untagged(&self, p: &Period) -> Result<Vec<UntaggedRow>, ReportError> {
        Ok(self.client.query(&sql::untagged(&self.db, p)).fetch_all().await?)
    }

    /// All spend in the period, nano-USD.
    pub async fn total_cost(&self, p: &Period) -> Result<i64, ReportError> {
        Ok(self.client.query(&sql::total_cost(&self.db, p)).fetch_one::<i64>().await?)
    }

    /// Writes the card's (provider, model, tier) as the newest sync; returns the rows written.
    pub async fn sync_model_tiers(&self, card: &PriceCard) -> Result<usize, ReportError> {
        let last: u64 =
            self.client.query(&format!("SELECT max(sync_id) FROM {}.model_tiers", self.db)).fetch_one::<u64>().await?;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let sync_id = now_ms.max(last + 1);
        let mut insert = self.client.insert::<TierRow>("model_tiers").await?;
        for p in &card.prices {
            insert
                .write(&TierRow {
                    sync_id,
                    provider: p.provider.clone(),
                    model: p.model.clone(),
                    tier: p.tier.as_str().into(),
                    price_card_version: card.version.clone(),
                })
                .await?;
        }
        insert.end().await?;
        Ok(card.prices.len())
    }

    /// How many (provider, model) pairs the newest sync marks frontier.
    pub async fn frontier_models(&self) -> Result<u64, ReportError> {
        Ok(self.client.query(&format!("SELECT count() FROM {}.frontier_models", self.db)).fetch_one::<u64>().await?)
    }
}

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// What a column holds, which decides how it prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A grouping value.
    Key,
    Number,
    /// Nano-USD, printed as exact dollars; JSON adds the integer under `<name minus _usd>_nanos`.
    Usd,
    /// A float printed with this many decimals.
    Float(usize),
    Flag,
    Time,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Int(i64),
    UInt(u64),
    Float(f64),
    Flag(bool),
    Time(i64),
    Empty,
}

/// A printable report: columns, rows, and a total (printed as a last `TOTAL` row in table and
/// CSV, as a `total` object in JSON).
#[derive(Debug, Clone)]
pub struct Output {
    pub name: &'static str,
    pub title: String,
    pub period: Period,
    pub parameters: Vec<(&'static str, Value)>,
    pub columns: Vec<(String, Kind)>,
    pub rows: Vec<Vec<Cell>>,
    pub total: Option<Vec<Cell>>,
}

fn cols(list: &[(&str, Kind)]) -> Vec<(String, Kind)> {
    list.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect()
}

impl Output {
    pub fn chargeback(dims: &[Dimension], period: Period, rows: &[ChargebackRow]) -> Output {
        let keys = key_columns(dims);
        let mut columns: Vec<(String, Kind)> = keys.iter().map(|k| ((*k).to_owned(), Kind::Key)).collect();
        columns.extend(cols(&[
            ("requests", Kind::Number),
            ("errors", Kind::Number),
            ("input_tokens", Kind::Number),
            ("output_tokens", Kind::Number),
            ("cached_input_tokens", Kind::Number),
            ("cost_usd", Kind::Usd),
        ]));
        let figures = |t: Totals| {
            vec![
                Cell::UInt(t.requests),
                Cell::UInt(t.errors),
                Cell::Int(t.input_tokens),
                Cell::Int(t.output_tokens),
                Cell::Int(t.cached_input_tokens),
                Cell::Int(t.cost_nanos),
            ]
        };
        let body = rows
            .iter()
            .map(|r| {
                let mut cells: Vec<Cell> = r.keys.iter().map(|k| Cell::Text(k.clone())).collect();
                cells.extend(figures(Totals::of(std::slice::from_ref(r))));
                cells
            })
            .collect();
        let names: Vec<&str> = dims.iter().map(|d| d.name()).collect();
        Output {
            name: "chargeback",
            title: format!("chargeback by {}", names.join(", ")),
            period,
            parameters: vec![("by", json!(names))],
            columns,
            rows: body,
            total: Some(total_row(keys.len(), figures(Totals::of(rows)))),
        }
    }

    pub fn frontier_share(period: Period, threshold: f64, rows: &[FrontierRow]) -> Output {
        let mut sorted: Vec<&FrontierRow> = rows.iter().collect();
        sorted.sort_by(|a, b| b.share().total_cmp(&a.share()).then(b.cost_nanos.cmp(&a.cost_nanos)));
        let body = sorted
            .iter()
            .map(|r| {
                vec![
                    Cell::Text(r.workflow_tag.clone()),
                    Cell::UInt(r.requests),
                    Cell::UInt(r.frontier_requests),
                    Cell::Int(r.cost_nanos),
                    Cell::Int(r.frontier_cost_nanos),
                    Cell::Float(r.share()),
                    Cell::Flag(r.share() > threshold),
                ]
            })
            .collect();
        let sum = FrontierRow {
            workflow_tag: String::new(),
            requests: rows.iter().map(|r| r.requests).sum(),
            frontier_requests: rows.iter().map(|r| r.frontier_requests).sum(),
            cost_nanos: rows.iter().map(|r| r.cost_nanos).sum(),
            frontier_cost_nanos: rows.iter().map(|r| r.frontier_cost_nanos).sum(),
        };
        Output {
            name: "frontier-share",
            title: format!("frontier-model share of cost per workflow (flagged above {threshold})"),
            period,
            parameters: vec![("threshold", json!(threshold))],
            columns: cols(&[
                ("workflow_tag", Kind::Key),
                ("requests", Kind::Number),
                ("frontier_requests", Kind::Number),
                ("cost_usd", Kind::Usd),
                ("frontier_cost_usd", Kind::Usd),
                ("frontier_share", Kind::Float(4)),
                ("flagged", Kind::Flag),
            ]),
            rows: body,
            total: Some(total_row(
                1,
                vec![
                    Cell::UInt(sum.requests),
                    Cell::UInt(sum.frontier_requests),
                    Cell::Int(sum.cost_nanos),
                    Cell::Int(sum.frontier_cost_nanos),
                    Cell::Float(sum.share()),
                    Cell::Empty,
                ],
            )),
        }
    }

    pub fn context_stuffing(period: Period, threshold: u64, rows: &[StuffingRow]) -> Output {
        let mut sorted: Vec<&StuffingRow> = rows.iter().collect();
        sorted.sort_by(|a, b| b.avg_prompt_tokens().total_cmp(&a.avg_prompt_tokens()));
        let body = sorted
            .iter()
            .map(|r| {
                vec![
                    Cell::Text(r.workflow_tag.clone()),
                    Cell::UInt(r.requests),
                    Cell::Int(r.prompt_tokens),
                    Cell::Float(r.avg_prompt_tokens()),
                    Cell::Int(r.max_prompt_tokens),
                    Cell::Flag(r.avg_prompt_tokens() > threshold as f64),
                ]
            })
            .collect();
        let sum = StuffingRow {
            workflow_tag: String::new(),
            requests: rows.iter().map(|r| r.requests).sum(),
            prompt_tokens: rows.iter().map(|r| r.prompt_tokens).sum(),
            max_prompt_tokens: rows.iter().map(|r| r.max_prompt_tokens).max().unwrap_or(0),
        };
        Output {
            name: "context-stuffing",
            title: format!("prompt tokens per successful request per workflow (flagged above {threshold})"),
            period,
            parameters: vec![("threshold", json!(threshold))],
            columns: cols(&[
                ("workflow_tag", Kind::Key),
                ("requests", Kind::Number),
                ("prompt_tokens", Kind::Number),
                ("avg_prompt_tokens", Kind::Float(1)),
                ("max_prompt_tokens", Kind::Number),
                ("flagged", Kind::Flag),
            ]),
            rows: body,
            total: Some(total_row(
                1,
                vec![
                    Cell::UInt(sum.requests),
                    Cell::Int(sum.prompt_tokens),
                    Cell::Float(sum.avg_prompt_tokens()),
                    Cell::Int(sum.max_prompt_tokens),
                    Cell::Empty,
                ],
            )),
        }
    }

    pub fn loops(period: Period, k: f64, rows: &[LoopRow]) -> Output {
        let mut sorted: Vec<&LoopRow> = rows.iter().collect();
        sorted.sort_by(|a, b| b.ratio_to_p95().total_cmp(&a.ratio_to_p95()));
        let body = sorted
            .iter()
            .map(|r| {
                vec![
                    Cell::Text(r.workflow_tag.clone()),
                    Cell::Text(r.session_id.clone()),
                    Cell::Time(i64::from(r.hour)),
                    Cell::UInt(r.requests),
                    Cell::Int(r.tokens),
                    Cell::Float(r.workflow_p95_tokens),
                    Cell::Float(r.ratio_to_p95()),
                    Cell::Int(r.cost_nanos),
                ]
            })
            .collect();
        Output {
            name: "loops",
            title: format!("session-hours above {k} x the p95 session-hour tokens of their workflow"),
            period,
            parameters: vec![("k", json!(k))],
            columns: cols(&[
                ("workflow_tag", Kind::Key),
                ("session_id", Kind::Key),
                ("hour", Kind::Time),
                ("requests", Kind::Number),
                ("tokens", Kind::Number),
                ("workflow_p95_tokens", Kind::Float(1)),
                ("ratio_to_p95", Kind::Float(2)),
                ("cost_usd", Kind::Usd),
            ]),
            rows: body,
            total: Some(total_row(
                3,
                vec![
                    Cell::UInt(rows.iter().map(|r| r.requests).sum()),
                    Cell::Int(rows.iter().map(|r| r.tokens).sum()),
                    Cell::Empty,
                    Cell::Empty,
                    Cell::Int(rows.iter().map(|r| r.cost_nanos).sum()),
                ],
            )),
        }
    }

    pub fn drift(period: Period, threshold: f64, rows: &[Drift]) -> Output {
        let opt_float = |v: Option<f64>| v.map_or(Cell::Empty, Cell::Float);
        let body = rows
            .iter()
            .map(|d| {
                let r = &d.row;
                vec![
                    Cell::Text(r.provider.clone()),
                    Cell::Text(r.model.clone()),
                    Cell::Text(r.model_version.clone()),
                    Cell::Time(i64::from(r.first_seen)),
                    Cell::Time(i64::from(r.last_seen)),
                    Cell::UInt(r.requests),
                    Cell::Float(ratio(r.prompt_tokens as f64, r.requests as f64)),
                    Cell::Float(ratio(r.reference_tokens as f64, r.requests as f64)),
                    Cell::Float(r.token_ratio()),
                    d.previous_version.clone().map_or(Cell::Empty, Cell::Text),
                    opt_float(d.change),
                    Cell::Flag(d.flagged),
                ]
            })
            .collect();
        Output {
            name: "drift",
            title: format!(
                "provider tokens per reference token, per model version (flagged {:.0}% above the previous version)",
                threshold * 100.0
            ),
            period,
            parameters: vec![("threshold", json!(threshold))],
            columns: cols(&[
                ("provider", Kind::Key),
                ("model", Kind::Key),
                ("model_version", Kind::Key),
                ("first_seen", Kind::Time),
                ("last_seen", Kind::Time),
                ("requests", Kind::Number),
                ("avg_prompt_tokens", Kind::Float(1)),
                ("avg_reference_tokens", Kind::Float(1)),
                ("token_ratio", Kind::Float(4)),
                ("previous_version", Kind::Key),
                ("change_vs_previous", Kind::Float(4)),
                ("flagged", Kind::Flag),
            ]),
            rows: body,
            total: None,
        }
    }

    /// `all_cost_nanos`: every event's cost in the period, for each row's share of spend.
    pub fn untagged(period: Period, all_cost_nanos: i64, rows: &[UntaggedRow]) -> Output {
        let share = |c: i64| Cell::Float(ratio(c as f64, all_cost_nanos as f64));
        let body = rows
            .iter()
            .map(|r| {
                vec![
                    Cell::Text(r.missing.clone()),
                    Cell::Text(r.api_key_id.clone()),
                    Cell::Text(r.workflow_tag.clone()),
                    Cell::UInt(r.requests),
                    Cell::Int(r.cost_nanos),
                    share(r.cost_nanos),
                ]
            })
            .collect();
        let cost: i64 = rows.iter().map(|r| r.cost_nanos).sum();
        Output {
            name: "untagged",
            title: format!(
                "spend without a project, team or cost centre (all spend {} USD)",
                format_usd(all_cost_nanos)
            ),
            period,
            parameters: vec![("all_cost_nanos", json!(all_cost_nanos))],
            columns: cols(&[
                ("missing", Kind::Key),
                ("api_key_id", Kind::Key),
                ("workflow_tag", Kind::Key),
                ("requests", Kind::Number),
                ("cost_usd", Kind::Usd),
                ("share_of_spend", Kind::Float(4)),
            ]),
            rows: body,
            total: Some(total_row(
                3,
                vec![Cell::UInt(rows.iter().map(|r| r.requests).sum()), Cell::Int(cost), share(cost)],
            )),
        }
    }

    /// The report as text in `format` (ends with a newline).
    pub fn render(&self, format: Format) -> Result<String, ReportError> {
        match format {
            Format::Table => Ok(self.table()),
            Format::Csv => self.csv(),
            Format::Json => Ok(format!("{}\n", self.json())),
        }
    }

    fn text(&self, col: usize, cell: &Cell) -> String {
        let kind = self.columns.get(col).map_or(Kind::Key, |c| c.1);
        match (cell, kind) {
            (Cell::Int(n), Kind::Usd) => format_usd(*n),
            (Cell::Int(n), _) => n.to_string(),
            (Cell::UInt(n), _) => n.to_string(),
            (Cell::Float(f), Kind::Float(d)) => format!("{f:.d$}"),
            (Cell::Float(f), _) => f.to_string(),
            (Cell::Flag(b), _) => if *b { "yes" } else { "no" }.into(),
            (Cell::Time(t), _) => fmt_time(*t),
            (Cell::Text(s), _) => s.clone(),
            (Cell::Empty, _) => String::new(),
        }
    }

    fn header(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.0.clone()).collect()
    }

    fn table(&self) -> String {
        let mut t = Table::new();
        t.load_preset(presets::ASCII_FULL_CONDENSED);
        t.set_header(self.header());
        for row in self.rows.iter().chain(self.total.iter()) {
            // An empty grouping value (an absent envelope field) reads better as "(none)".
            let cells = row.iter().enumerate().map(|(i, c)| match c {
                Cell::Text(t) if t.is_empty() => "(none)".to_owned(),
                _ => self.text(i, c),
            });
            t.add_row(cells.collect::<Vec<_>>());
        }
        for (i, (_, kind)) in self.columns.iter().enumerate() {
            if matches!(kind, Kind::Number | Kind::Usd | Kind::Float(_)) {
                if let Some(c) = t.column_mut(i) {
                    c.set_cell_alignment(CellAlignment::Right);
                }
            }
        }
        let n = self.rows.len();
        format!("{}; {}; {n} row{}\n{t}\n", self.title, self.period.describe(), if n == 1 { "" } else { "s" })
    }

    fn csv(&self) -> Result<String, ReportError> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let err = |e: csv::Error| ReportError::Csv(e.to_string());
        w.write_record(self.header()).map_err(err)?;
        for row in self.rows.iter().chain(self.total.iter()) {
            w.write_record(row.iter().enumerate().map(|(i, c)| self.text(i, c))).map_err(err)?;
        }
        let bytes = w.into_inner().map_err(|e| ReportError::Csv(e.to_string()))?;
        String::from_utf8(bytes).map_err(|e| ReportError::Csv(e.to_string()))
    }

    fn json_object(&self, row: &[Cell], skip_keys: bool) -> Map<String, Value> {
        let mut obj = Map::new();
        for (i, cell) in row.iter().enumerate() {
            let Some((name, kind)) = self.columns.get(i) else { continue };
            if skip_keys && *kind == Kind::Key {
                continue;
            }
            let value = match (cell, kind) {
                (Cell::Int(n), Kind::Usd) => {
                    let base = name.strip_suffix("_usd").unwrap_or(name);
                    obj.insert(format!("{base}_nanos"), json!(n));
                    json!(format_usd(*n))
                }
                (Cell::Int(n), _) => json!(n),
                (Cell::UInt(n), _) => json!(n),
                (Cell::Float(f), _) if f.is_finite() => json!(f),
                (Cell::Float(_), _) | (Cell::Empty, _) => Value::Null,
                (Cell::Flag(b), _) => json!(b),
                (Cell::Time(t), _) => json!(fmt_time(*t)),
                (Cell::Text(s), _) => json!(s),
            };
            obj.insert(name.clone(), value);
        }
        obj
    }

    /// `{"report", "title", "from", "to", "parameters", "rows": [...], "total": {...}}`; money
    /// as exact decimal strings (`cost_usd`) and integer nano-USD (`cost_nanos`).
    pub fn json(&self) -> Value {
        let mut params = Map::new();
        for (k, v) in &self.parameters {
            params.insert((*k).to_owned(), v.clone());
        }
        let rows: Vec<Value> = self.rows.iter().map(|r| Value::Object(self.json_object(r, false))).collect();
        let mut out = json!({
            "report": self.name,
            "title": self.title,
            "from": self.period.from.map(fmt_time),
            "to": self.period.to.map(fmt_time),
            "parameters": params,
            "rows": rows,
        });
        if let (Some(t), Value::Object(o)) = (&self.total, &mut out) {
            o.insert("total".into(), Value::Object(self.json_object(t, true)));
        }
        out
    }
}

/// A total row: `TOTAL` under the first grouping column, blanks under the others.
fn total_row(keys: usize, figures: Vec<Cell>) -> Vec<Cell> {
    let mut cells: Vec<Cell> =
        (0..keys).map(|i| if i == 0 { Cell::Text("TOTAL".into()) } else { Cell::Empty }).collect();
    cells.extend(figures);
    cells
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn months_and_bounds_are_half_open_utc() {
        let p = Period::month("2026-04").unwrap();
        assert_eq!(p.from, Some(parse_instant("2026-04-01T00:00:00Z").unwrap()));
        assert_eq!(p.to, Some(parse_instant("2026-05-01").unwrap()));
        assert_eq!(Period::month("2026-12").unwrap().to, Some(parse_instant("2027-01-01").unwrap()));
        assert_eq!(
            p.condition(),
            format!("ended_at >= toDateTime({}) AND ended_at < toDateTime({})", 1_775_001_600, 1_777_593_600)
        );
        assert!(Period::month("2026-13").is_err());
        assert!(Period::month("April").is_err());
        assert_eq!(parse_instant("2026-04-01 12:30").unwrap(), 1_775_001_600 + 12 * 3600 + 30 * 60);
        assert_eq!(parse_instant("2026-04-01T14:30:00+02:00").unwrap(), 1_775_001_600 + 12 * 3600 + 30 * 60);
        assert!(parse_instant("yesterday").is_err());
        assert!(Period::between(Some("2026-04-02"), Some("2026-04-01")).is_err());
        assert!(Period::between(Some("1969-12-31"), None).is_err());
        assert_eq!(Period::between(None, None).unwrap(), Period::ALL);
        assert_eq!(Period::ALL.condition(), "1");
    }

    #[test]
    fn model_grouping_is_provider_and_model_and_keys_are_unique() {
        assert_eq!(key_columns(&[Dimension::Team, Dimension::Model, Dimension::Team]), ["team", "provider", "model"]);
        let q = sql::chargeback("db", &[Dimension::CostCenter, Dimension::User], &Period::ALL);
        assert!(q.contains("GROUP BY cost_center, user_id"), "{q}");
        assert!(q.contains("FROM db.usage_events FINAL"), "{q}");
        assert!(!q.contains('?'), "no bind placeholders: {q}");
    }

    #[test]
    fn drift_compares_each_version_with_the_one_before() {
        let row = |v: &str, first: u32, prompt: i64| DriftRow {
            provider: "anthropic".into(),
            model: "claude-opus".into(),
            model_version: v.into(),
            first_seen: first,
            last_seen: first + 10,
            requests: 10,
            prompt_tokens: prompt,
            reference_tokens: 1000,
        };
        let d = drift_against_previous(vec![row("b", 200, 1300), row("a", 100, 1000), row("c", 300, 1320)], 0.10);
        assert_eq!(d.iter().map(|d| d.row.model_version.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(d.iter().map(|d| d.flagged).collect::<Vec<_>>(), [false, true, false]);
        assert_eq!(d[1].previous_version.as_deref(), Some("a"));
        assert!((d[1].change.unwrap() - 0.3).abs() < 1e-9);
    }

    #[test]
    fn outputs_carry_totals_in_every_format() {
        let rows = vec![
            ChargebackRow {
                keys: vec!["t1".into()],
                requests: 2,
                errors: 1,
                input_tokens: 10,
                output_tokens: 5,
                cached_input_tokens: 0,
                cost_nanos: 1_000_000_001,
            },
            ChargebackRow {
                keys: vec!["t,2".into()],
                requests: 1,
                errors: 0,
                input_tokens: 1,
                output_tokens: 1,
                cached_input_tokens: 1,
                cost_nanos: 2,
            },
        ];
        let out = Output::chargeback(&[Dimension::Team], Period::ALL, &rows);
        let csv = out.render(Format::Csv).unwrap();
        assert_eq!(
            csv,
            "team,requests,errors,input_tokens,output_tokens,cached_input_tokens,cost_usd\n\
             t1,2,1,10,5,0,1.000000001\n\"t,2\",1,0,1,1,1,0.000000002\nTOTAL,3,1,11,6,1,1.000000003\n"
        );
        let json = out.json();
        assert_eq!(json["total"]["cost_usd"], "1.000000003");
        assert_eq!(json["total"]["cost_nanos"], 1_000_000_003);
        assert_eq!(json["rows"][1]["team"], "t,2");
        assert!(json["total"].get("team").is_none());
        let table = out.render(Format::Table).unwrap();
        assert!(table.contains("TOTAL") && table.contains("1.000000003"), "{table}");
    }
}
